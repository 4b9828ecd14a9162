"""`pgvault expire`: the plan carried out on a vault, in a crash-safe order, under the backup lock.

First on serverless vaults (backups of a fake data directory, WAL objects by hand): what goes, in which
order, and an interruption at every single delete leaves every listed backup whole. Then on a real cluster:
after expire, a restore to the earliest point of what is kept still works.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from datetime import UTC, datetime, timedelta

import pytest

from pgvault import codec
from pgvault.backup import layout
from pgvault.backup.blockmap import merge_join
from pgvault.backup.copy import Copier
from pgvault.backup.errors import BackupInProgressError
from pgvault.backup.lock import BackupLock, read_holder
from pgvault.backup.manifest import (
    FilesWriter,
    SpooledFiles,
    write_manifest,
)
from pgvault.backup.scan import scan_data_dir
from pgvault.catalog import format_wal_key
from pgvault.dump import DumpedObject, DumpRecord, format_globals_key, write_dump_record
from pgvault.errors import EXIT_CODES, ExpireError
from pgvault.expire import format_expire, run_expire
from pgvault.retention import RetentionPolicy
from pgvault.storage.local import LocalStorage
from pgvault.vault import VaultRecord
from pgvault.verify import verify_backups
from pgvault.wal import segment_name, segno_start_lsn
from tests.test_backup_units import KIB, OPTIONS, make_data_dir, sample_manifest

SEG = 16 * 1024 * 1024
DAY0 = datetime(2026, 11, 1, tzinfo=UTC)
RECORD = VaultRecord(format_version=1, cluster="main", system_identifier=7712957296978327350, pg_major_version=15,
                     wal_segment_size=SEG, encryption_key_id=None, created_at="2026-11-01T00:00:00+00:00",
                     created_by="test")


def at(day: float, hour: float = 0) -> datetime:
    return DAY0 + timedelta(days=day - 1, hours=hour)


# ------------------------------------------------------------------ a serverless vault


def fake_backup(storage, data_dir, tmp_path, *, day: int, parent=None):
    """A backup of ``data_dir`` as take_backup stores it, starting on ``day`` at segment 10·day (consistent in the next)."""
    label = layout.format_label(at(day, 2), "incr" if parent else "full")
    spool = str(tmp_path / "spool")
    writer = FilesWriter(spool)
    parents = iter(SpooledFiles(storage, parent, keyring=None, require_encryption=False, tmp_dir=spool)) \
        if parent else iter(())
    copier = Copier(storage=storage, data_dir=data_dir, label=label, options=OPTIONS, writer=writer,
                    block_size=64 * KIB, parallel=2, object_size=256 * KIB,
                    trust_mtime_before=parent.start_time.timestamp() - 1 if parent else None)
    stats = copier.run(merge_join(scan_data_dir(data_dir, pg_major_version=15), parents))
    sha, _size, stored = writer.store(storage, layout.files_key(label), options=OPTIONS)
    writer.close()
    start, stop = segno_start_lsn(10 * day) + 0x28, segno_start_lsn(10 * day + 1) + 0x100
    manifest = sample_manifest(label, type="incr" if parent else "full", parent=parent.label if parent else None,
                               block_size=64 * KIB, files_sha256=sha, file_count=stats.files,
                               bytes_read=stats.bytes_read, bytes_stored=stats.bytes_stored + stored,
                               start_lsn=start, stop_lsn=stop, start_wal=segment_name(1, 10 * day),
                               stop_wal=segment_name(1, 10 * day + 1), start_time=at(day, 2),
                               stop_time=at(day, 2.5), tablespaces=())
    write_manifest(storage, manifest, options=OPTIONS)
    return manifest


def push_wal(storage, timeline: int, segnos, *, completed=None) -> None:
    """Archive stand-ins for WAL segments (the vault checks checksums, not WAL contents)."""
    for segno in segnos:
        name = segment_name(timeline, segno)
        plain = f"wal {name}".encode() * 100
        ms = int(((completed or at(segno / 10, 3)) - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1000)
        key = format_wal_key(name, sha256=hashlib.sha256(plain).hexdigest(), completed_ms=ms, size=len(plain))
        blob, _sha = codec.encode_bytes(plain, name=key, compression="zstd", level=1, key=None)
        storage.put(key, io.BytesIO(blob))


def fake_dump(storage, day: int) -> str:
    label = at(day, 1).strftime("%Y%m%dT%H%M%SZD")
    key = format_globals_key(label)
    plain = b"CREATE ROLE app;\n" * 50
    blob, sha = codec.encode_bytes(plain, name=key, compression="zstd", level=1, key=None)
    storage.put(key, io.BytesIO(blob))
    record = DumpRecord(format_version=1, label=label, cluster="main", system_identifier=RECORD.system_identifier,
                        pg_version="15.8", pg_version_num=150008, pg_dump_version="15.8",
                        started_at=at(day, 1).isoformat(), stopped_at=at(day, 1.1).isoformat(), duration_seconds=1.0,
                        host="test", globals=DumpedObject(key=key, sha256=sha, size=len(plain), stored_size=len(blob)),
                        databases=())
    write_dump_record(storage, record, options=OPTIONS)
    return label


def make_vault(tmp_path, storage=None):
    """Days 1-4: F, I, F, I; WAL from segment 10 to 45; dumps on days 1-3; one leftover of each kind."""
    storage = storage or LocalStorage(str(tmp_path / "vault"))
    data = str(tmp_path / "data")
    make_data_dir(data)
    with open(os.path.join(data, "base/1/16384"), "wb") as f:
        f.write(os.urandom(600 * KIB))
    f1 = fake_backup(storage, data, tmp_path, day=1)
    with open(os.path.join(data, "base/1/16384"), "r+b") as f:
        f.write(b"changed")
    i2 = fake_backup(storage, data, tmp_path, day=2, parent=f1)
    f3 = fake_backup(storage, data, tmp_path, day=3)
    with open(os.path.join(data, "global/1262"), "r+b") as f:
        f.write(b"changed")
    i4 = fake_backup(storage, data, tmp_path, day=4, parent=f3)
    push_wal(storage, 1, range(10, 46))
    dumps = [fake_dump(storage, d) for d in (1, 2, 3)]
    blob, _sha = codec.encode_bytes(b"partial", name="backups/20261105T020000ZF/data/000000", compression="none")
    storage.put("backups/20261105T020000ZF/data/000000", io.BytesIO(blob))  # an interrupted backup
    blob, _sha = codec.encode_bytes(b"partial", name="dumps/20261105T010000ZD/globals.sql", compression="none")
    storage.put("dumps/20261105T010000ZD/globals.sql", io.BytesIO(blob))  # an interrupted dump
    orphan = "orphans/20261102T000000Z-1/wal/000000010000000000000011"
    blob, _sha = codec.encode_bytes(b"diverged WAL", name=orphan, compression="none")
    storage.put(orphan, io.BytesIO(blob))  # WAL of a diverged node: never expired
    return storage, [f1, i2, f3, i4], dumps


class RecordingStorage:
    """The same vault, recording every delete (and raising at the ``crash_at``-th: an interruption)."""

    def __init__(self, inner, crash_at: int | None = None) -> None:
        self.inner, self.crash_at = inner, crash_at
        self.description = inner.description
        self.deleted: list[str] = []

    def put(self, key, source):
        return self.inner.put(key, source)

    def open(self, key):
        return self.inner.open(key)

    def stat(self, key):
        return self.inner.stat(key)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def delete(self, key):
        if not key.startswith("locks/"):
            if self.crash_at is not None and len(self.deleted) == self.crash_at:
                raise Interrupted(key)
            self.deleted.append(key)
        self.inner.delete(key)


class Interrupted(Exception):
    pass


def keys(storage) -> set[str]:
    return {info.key for info in storage.list("")}


POLICY = RetentionPolicy(full=1, dumps=1)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def vault_storage(request, tmp_path):
    """An empty vault on either backend (S3: moto's server)."""
    if request.param == "local":
        return LocalStorage(str(tmp_path / "vault"))
    from pgvault.storage.s3 import S3Storage

    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket=bucket, prefix="vault/main", endpoint_url=endpoint.url, region=endpoint.region,
                     access_key_id=endpoint.access_key, secret_access_key=endpoint.secret_key)
NOW = at(4, 12)


def test_expire_error_code():
    assert ExpireError.exit_code == 106 and EXIT_CODES[ExpireError] == 106


def test_expire_removes_what_the_plan_says_in_a_safe_order(tmp_path, vault_storage):
    storage, (f1, i2, f3, i4), dumps = make_vault(tmp_path, vault_storage)
    before = keys(storage)
    dry = run_expire(storage, record=RECORD, keyring=None, policy=POLICY, lock_dir=str(tmp_path / "lock"),
                     now=NOW, dry_run=True)
    assert keys(storage) == before  # a dry run writes nothing, not even the lock
    assert [r.label for r in dry.backups] == [i2.label, f1.label]
    assert [r.label for r in dry.dumps] == [dumps[1], dumps[0]]
    assert [(r.kind, r.label) for r in dry.leftovers] == [("backup leftovers", "20261105T020000ZF"),
                                                          ("dump leftovers", "20261105T010000ZD")]
    assert dry.wal_files == 20 and dry.plan.wal_keep_from == segment_name(1, 30)
    text = format_expire(dry)
    assert f"would remove backup {i2.label} (incr): " in text
    assert f"    because full = 1: built on full backup {f1.label}, which is not one of the 1 newest" in text
    assert f"would remove 20 WAL files {segment_name(1, 10)} .. {segment_name(1, 29)}, 54.7 KiB\n" in text
    assert dry.plan.expire_wal_bytes == 20 * 2800
    assert f"keep backup {f3.label} (full): full = 1: one of the 1 newest full backups; backup {i4.label} is " \
           "built on it" in text

    recording = RecordingStorage(storage)
    done = run_expire(recording, record=RECORD, keyring=None, policy=POLICY, lock_dir=str(tmp_path / "lock"),
                      now=NOW)
    expected_gone = {k for k in before if k.startswith((f"backups/{i2.label}/", f"backups/{f1.label}/",
                                                       f"dumps/{dumps[0]}/", f"dumps/{dumps[1]}/",
                                                       "backups/20261105T020000ZF/", "dumps/20261105T010000ZD/"))}
    wal_gone = {w.key for w in dry.plan.expire_wal}
    assert set(recording.deleted) == expected_gone | wal_gone
    assert keys(storage) == before - expected_gone - wal_gone
    assert "orphans/20261102T000000Z-1/wal/000000010000000000000011" in keys(storage)
    assert read_holder(storage) is None  # the lock is released
    # the order: each backup's manifest first, the newest backup first; dumps' records first; WAL last, oldest first
    order = recording.deleted
    assert order[0] == layout.manifest_key(i2.label)
    assert order.index(layout.manifest_key(f1.label)) > max(order.index(k) for k in order
                                                           if k.startswith(f"backups/{i2.label}/"))
    first_of = {lbl: min(i for i, k in enumerate(order) if k.startswith(f"dumps/{lbl}/")) for lbl in dumps[:2]}
    assert all(order[first_of[lbl]] == f"dumps/{lbl}/dump.json" for lbl in dumps[:2])
    assert order[-20:] == [w.key for w in dry.plan.expire_wal]
    assert [w.file.segno for w in dry.plan.expire_wal] == list(range(10, 30))
    assert done.to_dict()["bytes"] == dry.to_dict()["bytes"] > 20 * 1000
    # and what is left is whole
    assert verify_backups(storage, record=RECORD, keyring=None).ok
    again = run_expire(storage, record=RECORD, keyring=None, policy=POLICY, lock_dir=str(tmp_path / "lock"), now=NOW)
    assert not again.removed_anything and format_expire(again).endswith("nothing to remove")


@pytest.mark.slow
def test_an_interruption_at_any_delete_leaves_every_listed_backup_whole(tmp_path):
    storage, _backups, _dumps = make_vault(tmp_path)
    pristine = str(tmp_path / "pristine")
    shutil.copytree(storage.root, pristine)
    recording = RecordingStorage(storage)
    run_expire(recording, record=RECORD, keyring=None, policy=POLICY, lock_dir=str(tmp_path / "lock"), now=NOW)
    final = keys(storage)
    total = len(recording.deleted)
    assert total > 30
    for crash_at in range(total):
        root = str(tmp_path / f"run{crash_at}")
        shutil.copytree(pristine, root)
        vault = LocalStorage(root)
        with pytest.raises(Interrupted):
            run_expire(RecordingStorage(vault, crash_at=crash_at), record=RECORD, keyring=None, policy=POLICY,
                       lock_dir=str(tmp_path / "lock"), now=NOW)
        report = verify_backups(vault, record=RECORD, keyring=None)
        assert report.ok, (crash_at, [str(p) for p in report.problems])
        assert read_holder(vault) is None
        run_expire(vault, record=RECORD, keyring=None, policy=POLICY, lock_dir=str(tmp_path / "lock"), now=NOW)
        assert keys(vault) == final, crash_at
        shutil.rmtree(root)


def test_a_running_backup_refuses_expire_but_not_a_dry_run(tmp_path):
    storage, _backups, _dumps = make_vault(tmp_path)
    lock = BackupLock(storage, label="20261105T020000ZF", lock_dir=str(tmp_path / "other-lock"))
    lock.acquire()
    before = keys(storage)
    try:
        with pytest.raises(BackupInProgressError, match=r"another backup or dump of this cluster is running: backup "
                                                        r"20261105T020000ZF \(pid "):
            run_expire(storage, record=RECORD, keyring=None, policy=POLICY, lock_dir=str(tmp_path / "lock"), now=NOW)
        assert keys(storage) == before
        # a dry run goes ahead, and does not take the running backup's objects for leftovers
        dry = run_expire(storage, record=RECORD, keyring=None, policy=POLICY, lock_dir=str(tmp_path / "lock"),
                         now=NOW, dry_run=True)
        assert [r.label for r in dry.leftovers] == ["20261105T010000ZD"]
        assert dry.notices[0].startswith("backup 20261105T020000ZF (pid ")
    finally:
        lock.release()


def test_a_plan_that_would_break_a_kept_chain_is_refused(tmp_path, monkeypatch):
    """The executor checks the plan against files.jsonl: a planner bug cannot remove what a kept backup reads."""
    import pgvault.expire as expire_mod
    from pgvault.retention import Decision, plan_expiry

    storage, (f1, i2, _f3, _i4), _dumps = make_vault(tmp_path)

    def broken_plan(catalog, policy, now):  # a planner that forgets chains: keeps I2, drops its full backup F1
        plan = plan_expiry(catalog, policy, now)
        keep = tuple(d for d in plan.keep_backups) + (Decision(i2.label, "incr", ("bug",)),)
        return type(plan)(**{**plan.__dict__, "keep_backups": keep,
                             "expire_backups": (Decision(f1.label, "full", ("bug",)),)})

    monkeypatch.setattr(expire_mod, "plan_expiry", broken_plan)
    before = keys(storage)
    with pytest.raises(ExpireError, match=rf"refusing to expire: backup {i2.label} is kept, but its file \S+ reads "
                                          rf"backups/{f1.label}/data/\d+ of backup {f1.label}, which the plan "
                                          "removes; nothing was removed"):
        run_expire(storage, record=RECORD, keyring=None, policy=POLICY, lock_dir=str(tmp_path / "lock"), now=NOW)
    assert keys(storage) == before


def test_no_retention_configured_removes_nothing_but_leftovers(tmp_path):
    storage, _backups, _dumps = make_vault(tmp_path)
    before = keys(storage)
    result = run_expire(storage, record=RECORD, keyring=None, policy=RetentionPolicy(),
                        lock_dir=str(tmp_path / "lock"), now=NOW)
    assert not result.backups and not result.dumps and not result.wal_files
    assert keys(storage) == before - {"backups/20261105T020000ZF/data/000000", "dumps/20261105T010000ZD/globals.sql"}
    text = format_expire(result)
    assert "note: no [retention] policy is configured: nothing is removed (set [retention] full, window or dumps)" in text
    assert "WAL: nothing to remove (no backup retention is configured: all WAL is kept)" in text


# ------------------------------------------------------------------ a real cluster


@pytest.mark.integration
@pytest.mark.slow
def test_after_expire_the_earliest_kept_point_still_restores(pg_tmp, pg_cluster):
    from tests.archive_env import make_archive_env
    from tests.clihelp import run_pgvault
    from tests.test_restore import Restored, archive_now, backup, vault_listing

    env = make_archive_env(pg_cluster, pg_tmp, backend="local")
    cluster = env.cluster
    cluster.sql("CREATE TABLE o (id int)")
    cluster.sql("INSERT INTO o SELECT generate_series(1, 100)")
    first = backup(env)
    cluster.sql("INSERT INTO o SELECT generate_series(101, 200)")
    archive_now(env)
    archive_now(env)  # a few segments between the two backups: the ones expire must remove
    second = backup(env)
    cluster.sql("INSERT INTO o SELECT generate_series(201, 300)")
    third = backup(env, "--type", "incr")
    cluster.sql("INSERT INTO o SELECT generate_series(301, 400)")
    archive_now(env)

    res = env.pgvault("expire")  # no [retention]: nothing goes
    assert res.code == 0, res.err
    assert "note: no [retention] policy is configured: nothing is removed" in res.out

    with open(env.config, "a") as f:
        f.write("[retention]\nfull = 1\n")
    before = vault_listing(env)
    res = env.pgvault("expire", "--dry-run", "--json")
    assert res.code == 0, res.err
    dry = json.loads(res.out)
    assert vault_listing(env) == before
    assert [b["label"] for b in dry["backups"]["expire"]] == [first["label"]]
    assert [b["label"] for b in dry["backups"]["keep"]] == [second["label"], third["label"]]
    assert dry["wal"]["keep_from"] == second["start_wal"] and dry["wal"]["expire"] >= 3

    res = env.pgvault("expire", "--json")
    assert res.code == 0, res.err
    done = json.loads(res.out)
    assert [b["label"] for b in done["backups"]["expire"]] == [first["label"]]
    listing = env.listing()
    assert [b["label"] for b in listing["backups"]] == [second["label"], third["label"]]
    (wal,) = listing["wal"]
    assert wal["first"] == second["start_wal"] and wal["gaps"] == []
    window = listing["restorable_window"]
    assert window["earliest"]["backup"] == second["label"]

    # the earliest point of what is kept: restores, with exactly the rows committed before the second backup
    r = Restored()
    try:
        res = run_pgvault("restore", "--to", window["earliest"]["time"], "--data-dir", r.data_dir, "--port",
                          str(r.port), "--start", "--no-archive", "--timeout", "240", config=env.config, timeout=300)
        assert res.code == 0, res.err
        assert r.sql("SELECT count(*), max(id) FROM o") == [(200, 200)]
    finally:
        r.remove()
