"""`pgvault verify`: every object read back and checked, the WAL chain checked for gaps; each problem named.

The WAL chain logic is pure and tested with tables (timelines included); object checks run on serverless
vaults (see tests/test_expire.py); then the command on a real cluster: a flipped byte and a missing segment.
"""

from __future__ import annotations

import json
import os

import pytest

from pgvault.backup import layout
from pgvault.backup.errors import BackupNotFoundError
from pgvault.catalog import format_wal_key, list_archived_wal, parse_wal_key
from pgvault.errors import EXIT_CODES, VerifyFailedError
from pgvault.verify import format_report, path_timeline, verify_backups, wal_chain
from pgvault.wal import HistoryEntry, segment_name, segno_start_lsn
from tests.test_expire import RECORD, make_vault, push_wal

SEG = 16 * 1024 * 1024


def flip_byte(path: str, where: float = 0.5) -> None:
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    blob[int(len(blob) * where)] ^= 0x01
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(blob)


def test_verify_failed_has_its_exit_code():
    assert VerifyFailedError.exit_code == 105 and EXIT_CODES[VerifyFailedError] == 105


# ------------------------------------------------------------------ the WAL chain (pure)


def wal(*names: str, sha: str = "ab" * 32):
    return [parse_wal_key(format_wal_key(n, sha256=sha, completed_ms=0, size=SEG)) for n in names]


def segs(timeline: int, first: int, last: int) -> list[str]:
    return [segment_name(timeline, s) for s in range(first, last + 1)]


# timeline 2 forked from 1 at 0/7000100 (segment 7: its file on timeline 2 holds the start of timeline 2)
HIST = {2: (HistoryEntry(1, segno_start_lsn(7) + 0x100),)}


@pytest.mark.parametrize("files,start,stop,histories,timeline,first,last,gaps", [
    # a plain run: from the start segment to the last archived one
    (segs(1, 2, 9), 2, 3, {}, 1, 2, 9, []),
    # one segment missing, then two
    ([*segs(1, 2, 4), *segs(1, 6, 9)], 2, 3, {}, 1, 2, 9, [(5, 5)]),
    ([*segs(1, 2, 4), *segs(1, 7, 9)], 2, 3, {}, 1, 2, 9, [(5, 6)]),
    # the consistency segment itself never arrived
    (segs(1, 2, 2), 2, 3, {}, 1, 2, 3, [(3, 3)]),
    # WAL before the backup's start does not matter
    ([*segs(1, 0, 0), *segs(1, 4, 6)], 4, 5, {}, 1, 4, 6, []),
    # across a promotion: timeline 1 to segment 6, timeline 2 from 7 (timeline 1's own 7-9 are not on the path)
    ([*segs(1, 2, 9), *segs(2, 7, 10)], 2, 3, HIST, 2, 2, 10, []),
    ([*segs(1, 2, 6), *segs(2, 7, 7), *segs(2, 9, 10)], 2, 3, HIST, 2, 2, 10, [(8, 8)]),
    ([*segs(1, 2, 9), *segs(2, 8, 10)], 2, 3, HIST, 2, 2, 10, [(7, 7)]),  # timeline 1's 7 is not what replays
    # a backup of the old primary after the fork: its own timeline only
    ([*segs(1, 2, 12), *segs(2, 7, 10)], 8, 9, HIST, 1, 8, 12, []),
])
def test_wal_chain(files, start, stop, histories, timeline, first, last, gaps):
    chain = wal_chain(wal(*files), timeline=1, start_lsn=segno_start_lsn(start) + 0x28,
                      stop_lsn=segno_start_lsn(stop) + 0x100, histories=histories, segment_size=SEG)
    assert chain.timeline == timeline
    owner = (lambda s: 2 if timeline == 2 and s >= 7 else 1)
    assert (chain.first, chain.last) == (segment_name(owner(first), first), segment_name(owner(last), last))
    assert list(chain.gaps) == [(segment_name(owner(a), a), segment_name(owner(b), b)) for a, b in gaps]


def test_wal_chain_names_a_segment_archived_twice_with_different_content():
    files = wal(*segs(1, 2, 5)) + wal(segment_name(1, 4), sha="cd" * 32)
    chain = wal_chain(files, timeline=1, start_lsn=segno_start_lsn(2), stop_lsn=segno_start_lsn(3) + 1,
                      histories={}, segment_size=SEG)
    assert chain.conflicts == (segment_name(1, 4),) and chain.gaps == ()


@pytest.mark.parametrize("tli,stop,expected", [
    (1, segno_start_lsn(3), 3),  # consistent before both forks: the newest timeline
    (1, segno_start_lsn(7), 2),  # after 3's fork (at segment 5), before 2's (at 7)
    (1, segno_start_lsn(8), 1),  # after both: only its own timeline
    (2, segno_start_lsn(8), 2),
])
def test_path_timeline(tli, stop, expected):
    histories = {2: (HistoryEntry(1, segno_start_lsn(7) + 0x100),), 3: (HistoryEntry(1, segno_start_lsn(5)),)}
    assert path_timeline(tli, stop, histories) == expected


# ------------------------------------------------------------------ objects, on serverless vaults


def test_a_sound_vault_verifies_and_every_object_is_read(tmp_path):
    storage, (f1, i2, f3, i4), dumps = make_vault(tmp_path)
    seen = []
    report = verify_backups(storage, record=RECORD, keyring=None, progress=seen.append, read_wal=True)
    assert report.ok, [str(p) for p in report.problems]
    assert [i.label for i in report.items] == [f1.label, i2.label, f3.label, i4.label, *dumps]
    data = {info.key for info in storage.list("backups/") if "/data/" in info.key and "20261105" not in info.key}
    globals_ = {info.key for info in storage.list("dumps/") if info.key.endswith("globals.sql")
                and "20261105" not in info.key}
    assert report.objects_read == len(data) + len(globals_)  # each once, though incrementals share them
    assert report.wal_read == 36  # segments 10..45: from the oldest backup's start to the end
    assert seen[-1].objects_done == seen[-1].objects_total == report.objects_read + report.wal_read
    assert seen[-1].bytes_done >= sum(info.size for info in storage.list("backups/") if info.key in data)
    item = report.items[1]
    assert item.kind == "incr" and item.wal.first == segment_name(1, 20) and item.wal.last == segment_name(1, 45)
    assert item.objects > len({k for k in data if i2.label in k})  # its own objects and its full backup's
    assert format_report(report).endswith("no problems")


def test_a_flipped_byte_a_missing_object_and_a_broken_chain_are_each_named(tmp_path):
    storage, (f1, i2, f3, i4), _dumps = make_vault(tmp_path)
    data_f1 = sorted(info.key for info in storage.list(f"backups/{f1.label}/data/"))
    flip_byte(os.path.join(storage.root, data_f1[0]))
    os.remove(os.path.join(storage.root, data_f1[1]))  # (the last holds pg_control: the incremental has its own)
    os.remove(os.path.join(storage.root, layout.manifest_key(f3.label)))
    report = verify_backups(storage, record=RECORD, keyring=None)
    assert not report.ok
    by_item = {i.label: i for i in report.items}
    assert f3.label not in by_item  # without its manifest it is no backup
    assert by_item[i4.label].problems[0].message == (
        f"its incremental chain is broken: backup {f3.label} is missing, so it cannot be restored")
    for label in (f1.label, i2.label):  # the incremental reads its full backup's objects too
        messages = {p.object: p.message for p in by_item[label].problems}
        assert messages[data_f1[1]] == f"object {data_f1[1]} is missing from the vault"
        assert messages[data_f1[0]].startswith(f"object {data_f1[0]} is corrupt: ")
    text = format_report(report)
    assert f"✗ backup (full) {f1.label}: " in text and f"    object {data_f1[1]} is missing from the vault" in text
    assert text.endswith(f"{len(report.problems)} problems")
    # only the backups asked for
    only = verify_backups(storage, record=RECORD, keyring=None, labels=[i2.label])
    assert [i.label for i in only.items] == [i2.label] and len(only.problems) == 2


def test_a_damaged_files_list_and_dump_are_named(tmp_path):
    storage, (f1, _i2, _f3, _i4), dumps = make_vault(tmp_path)
    flip_byte(os.path.join(storage.root, layout.files_key(f1.label)), 0.9)
    flip_byte(os.path.join(storage.root, f"dumps/{dumps[0]}/globals.sql"))
    report = verify_backups(storage, record=RECORD, keyring=None, labels=[f1.label, dumps[0]])
    (backup_problem,) = report.items[0].problems
    assert backup_problem.object == layout.files_key(f1.label)
    assert backup_problem.message.startswith(f"files.jsonl cannot be read: object {layout.files_key(f1.label)} is "
                                             "corrupt")
    (dump_problem,) = report.items[1].problems
    assert dump_problem.object == f"dumps/{dumps[0]}/globals.sql" and "is corrupt" in dump_problem.message


def test_a_gap_in_the_wal_is_named_for_each_backup_it_cuts(tmp_path):
    storage, (f1, i2, f3, _i4), _dumps = make_vault(tmp_path)
    (gone,) = [e for e in list_archived_wal(storage) if e.name == segment_name(1, 35)]
    os.remove(os.path.join(storage.root, gone.key))
    report = verify_backups(storage, record=RECORD, keyring=None)
    message = f"gap in its WAL on timeline 1: segment {segment_name(1, 35)} is missing"
    assert {i.label: [p.message for p in i.problems] for i in report.items if i.problems} == {
        b.label: [message] for b in (f1, i2, f3)}  # not i4: it starts after the gap
    push_wal(storage, 1, [50, 51])  # a hole of several segments further on
    report = verify_backups(storage, record=RECORD, keyring=None, labels=[f3.label])
    assert [p.message for p in report.problems] == [
        message, f"gap in its WAL on timeline 1: segments {segment_name(1, 46)} .. {segment_name(1, 49)} are missing"]


def test_an_unknown_label_is_an_error():
    import tempfile

    from pgvault.storage.local import LocalStorage

    with tempfile.TemporaryDirectory() as root, pytest.raises(BackupNotFoundError) as info:
        verify_backups(LocalStorage(root), record=RECORD, keyring=None, labels=["20261101T020000ZF"])
    assert str(info.value) == f"there is no backup or dump 20261101T020000ZF in file://{root}; the vault has: none"


# ------------------------------------------------------------------ the command on a real cluster


@pytest.mark.slow
@pytest.mark.integration
def test_verify_catches_a_flipped_byte_and_a_missing_segment(pg_tmp, pg_cluster):
    from tests.archive_env import make_archive_env
    from tests.test_restore import backup

    env = make_archive_env(pg_cluster, pg_tmp, backend="local")
    cluster = env.cluster
    cluster.sql("CREATE TABLE v AS SELECT g AS id, md5(g::text) FROM generate_series(1, 20000) g")
    full = backup(env)
    cluster.sql("UPDATE v SET id = -id WHERE id <= 100")
    incr = backup(env, "--type", "incr")
    for _ in range(3):  # segments after the incremental: one can go missing in the middle
        env.wait_archived(env.switch())

    res = env.pgvault("verify", "--json", "--read-wal")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["ok"] and [i["label"] for i in report["items"]] == [full["label"], incr["label"]]
    archived = [e.name for e in list_archived_wal(env.storage) if e.file.kind == "segment"]
    assert report["wal_read"] == len([n for n in archived if n >= full["start_wal"]]) >= 2
    assert report["items"][1]["wal"]["first"] == incr["start_wal"] and report["objects_read"] > 1

    vault = os.path.join(env.base, "vault", "main")
    from pgvault.backup.manifest import iter_files, read_manifest

    shared = sorted({s.object for e in iter_files(env.storage, read_manifest(env.storage, incr["label"], None), None)
                     for s in e.sources if s.object.startswith(f"backups/{full['label']}/")})
    bad = shared[len(shared) // 2]  # an object of the full backup that the incremental reads too
    flip_byte(os.path.join(vault, bad))
    res = env.pgvault("verify")
    assert res.code == 105, res.err
    assert f"✗ backup (full) {full['label']}: " in res.out
    assert f"    object {bad} is corrupt: " in res.out
    assert f"pgvault: error: verify found 2 problems: backup {full['label']}: object {bad} is corrupt: " in res.err

    # a segment after the incremental's start goes missing: a named gap, for both backups
    segments = sorted((e for e in list_archived_wal(env.storage) if e.file.kind == "segment"), key=lambda e: e.name)
    middle = next(e for e in segments if e.name > incr["stop_wal"])  # archived segments follow it: a gap
    os.remove(os.path.join(vault, middle.key))
    res = env.pgvault("verify", "--backup", incr["label"], "--json")
    assert res.code == 105
    problems = json.loads(res.out)["problems"]
    messages = sorted(p["message"] for p in problems)
    assert len(messages) == 2 and messages[0] == f"gap in its WAL on timeline 1: segment {middle.name} is missing"
    assert messages[1].startswith(f"object {bad} is corrupt: ")
    res = env.pgvault("verify", "--backup", "20200101T000000ZF")
    assert res.code == 83 and "there is no backup or dump 20200101T000000ZF" in res.err


@pytest.mark.slow
@pytest.mark.integration
def test_an_encrypted_vault_verifies_and_an_unencrypted_stand_in_is_named(pg_tmp, pg_cluster):
    from pgvault import codec
    from tests.archive_env import make_encrypted_archive_env
    from tests.test_restore import archive_now, backup

    env, _key_file = make_encrypted_archive_env(pg_cluster, pg_tmp)
    full = backup(env)
    archive_now(env)
    res = env.pgvault("verify", "--read-wal", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["ok"]

    # an object replaced by a well-formed but unencrypted one of the same name and content checksum
    key = min(i.key for i in env.storage.list(f"backups/{full['label']}/data/"))
    from pgvault.config import load_settings
    from pgvault.context import keyring_for

    keyring = keyring_for(load_settings(env.config, environ={}), env.storage)
    with env.storage.open(key) as f:
        plain = codec.decode_bytes(f.read(), name=key, keyring=keyring)
    blob, _sha = codec.encode_bytes(plain, name=key, compression="zstd", level=1, key=None)
    path = os.path.join(env.base, "vault", "main", key)
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(blob)
    res = env.pgvault("verify", "--json")
    assert res.code == 105
    (problem,) = json.loads(res.out)["problems"]
    assert problem["object"] == key and problem["subject"] == f"backup {full['label']}"
    assert problem["message"] == (f"object {key} is corrupt: it is not encrypted, but this vault requires "
                                  "encryption (replaced object?)")
