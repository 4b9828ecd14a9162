"""WAL archiving end to end: archive_command and restore_command through pgvault on a live cluster."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.archive_env import make_archive_env, make_encrypted_archive_env, new_master_key
from tests.clihelp import run_pgvault
from tests.fixtures.pgcluster import as_pg_user, chown_tree

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", pytest.param("s3")])
def env(request, pg_cluster, pg_tmp):
    s3 = request.getfixturevalue("s3_bucket") if request.param == "s3" else None
    return make_archive_env(pg_cluster, pg_tmp, backend=request.param, s3=s3)


def scratch(env, name):
    """A postgres-owned scratch directory inside the env (whose path has a space)."""
    path = os.path.join(env.base, name)
    os.makedirs(path, exist_ok=True)
    chown_tree(path)
    return path


def test_segments_arrive_and_list_shows_them(env):
    names = [env.switch() for _ in range(3)]
    env.wait_archived(names[-1])
    assert set(names) <= env.archived_names()
    listing = env.listing()
    (tl1,) = [w for w in listing["wal"] if w["timeline"] == 1]
    assert tl1["last"] == names[-1]
    assert tl1["gaps"] == []
    assert listing["newest_archived_segment_at"] is not None


def test_repush_is_idempotent_and_divergence_is_refused(env):
    name = env.switch()
    env.wait_archived(name)
    work = scratch(env, "work")
    copy = os.path.join(work, name)
    res = env.pgvault("wal-fetch", name, copy)
    assert res.code == 0, res.err
    assert env.pgvault("wal-push", copy).code == 0  # identical content: success, nothing new stored
    before = {i.key for i in env.storage.list("wal/")}

    with open(copy, "r+b") as f:  # same name, different content: a second primary on this timeline
        f.seek(8192 + 100)
        byte = f.read(1)
        f.seek(8192 + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    res = env.pgvault("wal-push", copy)
    assert res.code == 40
    assert f"archive divergence: {name} is already in the vault with sha256 " in res.err
    assert "but this server's copy has sha256 " in res.err
    assert "HINT: two servers may be writing the same timeline" in res.err
    assert {i.key for i in env.storage.list("wal/")} == before  # nothing overwritten or added


def test_a_segment_that_changes_while_it_is_pushed_is_not_archived(pg_cluster, pg_tmp, monkeypatch):
    from pgvault import archive, context
    from pgvault.config import load_settings
    from pgvault.errors import PgvaultError
    from pgvault.storage.local import LocalStorage
    from pgvault.vault import require_vault_record

    env = make_archive_env(pg_cluster, pg_tmp, backend="local")
    name = env.switch()
    env.wait_archived(name)
    copy = os.path.join(scratch(env, "changing"), name)
    assert env.pgvault("wal-fetch", name, copy).code == 0
    os.utime(copy, (time.time() - 3600,) * 2)  # completed an hour ago: a write now shows in its mtime
    record = require_vault_record(context.storage_for(load_settings(env.config)))
    empty = LocalStorage(os.path.join(env.base, "other vault", "main"), create=True)
    real_prepare = archive.codec.prepare_payload

    def written_to_meanwhile(data, **kw):
        prepared = real_prepare(data, **kw)
        with open(copy, "r+b") as f:  # a recycled segment being rewritten, say
            f.seek(8192)
            f.write(b"\xff" * 16)
        return prepared

    monkeypatch.setattr(archive.codec, "prepare_payload", written_to_meanwhile)
    with pytest.raises(PgvaultError, match=f"WAL file {copy} changed while it was being archived"):
        archive.push_wal_file(copy, storage=empty, record=record, options=archive.CodecOptions())
    assert [info.key for info in empty.list("wal/")] == []
    monkeypatch.setattr(archive.codec, "prepare_payload", real_prepare)
    pushed = archive.push_wal_file(copy, storage=empty, record=record, options=archive.CodecOptions())
    assert [info.key for info in empty.list("wal/")] == [pushed.key]  # unchanged since: archived


def test_foreign_cluster_segment_is_refused(env, pg_factory):
    other = pg_factory.create(fresh=True, start=False)
    work = scratch(env, "foreign")
    segment = os.path.join(work, "000000010000000000000001")
    shutil.copy(os.path.join(other.data_dir, "pg_wal", "000000010000000000000001"), segment)
    chown_tree(work)
    before = {i.key for i in env.storage.list("")}
    res = env.pgvault("wal-push", segment)
    assert res.code == 41
    assert "belongs to the cluster with system identifier" in res.err
    assert str(env.cluster.system_identifier()) in res.err
    assert {i.key for i in env.storage.list("")} == before  # nothing stored


def test_wal_fetch_missing_exits_1_and_corrupt_exits_above_125(env):
    name = env.switch()
    env.wait_archived(name)
    work = scratch(env, "fetch")
    res = env.pgvault("wal-fetch", "0000000100000000000000F0", os.path.join(work, "x"))
    assert res.code == 1
    assert not os.path.exists(os.path.join(work, "x"))
    res = env.pgvault("wal-fetch", "00000009.history", os.path.join(work, "h"))
    assert res.code == 1

    (key,) = [i.key for i in env.storage.list("wal/") if i.key.split("/")[-1].startswith(name + ".")]
    corrupt_object(env, key)
    res = env.pgvault("wal-fetch", name, os.path.join(work, name))
    assert res.code == 255
    assert key in res.err
    assert "stopping recovery" in res.err
    assert not os.path.exists(os.path.join(work, name))
    assert not [f for f in os.listdir(work) if f.endswith(".tmp")]


def corrupt_object(env, key):
    """Flip one byte in the middle of a stored object, behind pgvault's back."""
    if env.backend == "local":
        path = os.path.join(env.storage.root, *key.split("/"))
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(size // 2)
            b = f.read(1)
            f.seek(size // 2)
            f.write(bytes([b[0] ^ 0x01]))
    else:
        from tests.fixtures.s3server import make_client

        endpoint, bucket = env.s3
        client = make_client(endpoint)
        full = f"pfx/main/{key}"
        data = bytearray(client.get_object(Bucket=bucket, Key=full)["Body"].read())
        data[len(data) // 2] ^= 0x01
        client.put_object(Bucket=bucket, Key=full, Body=bytes(data))


def test_vault_unreachable_for_a_while_loses_nothing(pg_cluster, pg_tmp, request):
    """Local backend: the vault directory becomes unwritable; PostgreSQL keeps the WAL and catches up."""
    env = make_archive_env(pg_cluster, pg_tmp, backend="local")
    first = env.switch()
    env.wait_archived(first)
    vault_dir = os.path.join(env.base, "vault")
    os.chmod(vault_dir, 0o000)
    try:
        held = [env.switch() for _ in range(3)]
        deadline = time.monotonic() + 30
        while pg_cluster.one("SELECT failed_count FROM pg_stat_archiver") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pg_cluster.one("SELECT failed_count FROM pg_stat_archiver") >= 2
        for name in held:  # PostgreSQL still has every segment it could not archive
            assert os.path.exists(os.path.join(pg_cluster.data_dir, "pg_wal", name))
        res = env.pgvault("check")
        assert "✗ WAL archiving: failing since" in res.out
    finally:
        os.chmod(vault_dir, 0o755)
    env.wait_archived(held[-1])
    (tl1,) = [w for w in env.listing()["wal"] if w["timeline"] == 1]
    assert tl1["gaps"] == [] and tl1["last"] == held[-1]
    assert {first, *held} <= env.archived_names()


def test_s3_endpoint_down_for_a_while_loses_nothing(pg_cluster, pg_tmp, s3_bucket):
    from tests.fixtures.tcpproxy import TcpProxy
    from urllib.parse import urlsplit

    endpoint, _bucket = s3_bucket
    target = urlsplit(endpoint.url)
    proxy = TcpProxy(target.hostname, target.port)
    try:
        env = make_archive_env(pg_cluster, pg_tmp, backend="s3", s3=s3_bucket,
                               endpoint_url=f"http://127.0.0.1:{proxy.port}")
        first = env.switch()
        env.wait_archived(first)
        proxy.cut()
        held = [env.switch() for _ in range(3)]
        deadline = time.monotonic() + 30
        while pg_cluster.one("SELECT failed_count FROM pg_stat_archiver") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pg_cluster.one("SELECT failed_count FROM pg_stat_archiver") >= 1
        for name in held:
            assert os.path.exists(os.path.join(pg_cluster.data_dir, "pg_wal", name))
        proxy.restore()
        env.wait_archived(held[-1])
        assert {first, *held} <= env.archived_names()
        (tl1,) = [w for w in env.listing()["wal"] if w["timeline"] == 1]
        assert tl1["gaps"] == []
    finally:
        proxy.close()


KILLED_PUT = textwrap.dedent("""
    import os, sys, time
    from pgvault.config import load_settings
    from pgvault.context import storage_for
    storage = storage_for(load_settings(sys.argv[1]))
    class Stalls:
        sent = 0
        def read(self, n=-1):
            if self.sent >= 12 << 20:
                open(sys.argv[3], "w").close()  # tell the test we are midway
                time.sleep(3600)
            n = 1 << 20 if n is None or n < 0 else min(n, 1 << 20)
            self.sent += n
            return os.urandom(n)
    storage.put(sys.argv[2], Stalls())
""")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_midway_leaves_nothing_visible_and_retry_succeeds(backend, pg_cluster, pg_tmp, request):
    s3 = request.getfixturevalue("s3_bucket") if backend == "s3" else None
    env = make_archive_env(pg_cluster, pg_tmp, backend=backend, s3=s3)
    name = env.switch()
    env.wait_archived(name)
    key = "wal/0000000100000000/killed-object"
    flag = os.path.join(env.base, "midway")
    proc = subprocess.Popen(as_pg_user([sys.executable, "-c", KILLED_PUT, env.config, key, flag]))
    deadline = time.monotonic() + 60
    while not os.path.exists(flag) and time.monotonic() < deadline:
        assert proc.poll() is None, "the writer died before reaching the middle"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", flag], check=False)
    assert env.storage.stat(key) is None
    assert key not in {i.key for i in env.storage.list("wal/")}
    # Retrying the same put succeeds: the killed attempt left nothing that blocks the name.
    import io

    payload = os.urandom(13 << 20)
    env.storage.put(key, io.BytesIO(payload))
    with env.storage.open(key) as f:
        assert f.read() == payload
    env.storage.delete(key)
    # The archive keeps working: the next segment goes through.
    later = env.switch()
    env.wait_archived(later)
    assert later in env.archived_names()


def test_path_with_spaces_and_history_files_on_promotion(pg_factory, pg_tmp):
    """A standby promoted onto timeline 2 archives its .history and .partial files into the same vault."""
    primary = pg_factory.create()
    env = make_archive_env(primary, pg_tmp, backend="local")
    assert " " in env.config
    env.wait_archived(env.switch())
    from tests.archive_env import archive_command

    standby = pg_factory.create_standby(primary, archive_command=archive_command(env.config))
    primary.sql("CREATE TABLE moved(x int); INSERT INTO moved VALUES (1)")
    standby.run([standby.bin("pg_ctl"), "-D", standby.data_dir, "-w", "promote"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = env.archived_names()
        if "00000002.history" in names and any(n.endswith(".partial") for n in names):
            break
        time.sleep(0.2)
    names = env.archived_names()
    assert "00000002.history" in names
    assert any(n.startswith("00000001") and n.endswith(".partial") for n in names)
    timelines = {w["timeline"]: w for w in env.listing()["wal"]}
    assert timelines[2]["history_file"] is True
    # restore_command brings the history file back
    work = os.path.join(env.base, "h")
    os.makedirs(work)
    chown_tree(work)
    res = env.pgvault("wal-fetch", "00000002.history", os.path.join(work, "00000002.history"))
    assert res.code == 0, res.err
    assert open(os.path.join(work, "00000002.history")).read().startswith("1\t")


def test_async_push_ahead_drains_the_queue(pg_cluster, pg_tmp):
    env = make_archive_env(pg_cluster, pg_tmp, backend="local", extra="async = true\nparallel = 2")
    pg_cluster.set(archive_command="/bin/false")
    pg_cluster.reload()
    names = [env.switch() for _ in range(8)]  # a backlog of .ready segments
    ready = set(os.listdir(os.path.join(pg_cluster.data_dir, "pg_wal", "archive_status")))
    assert {n + ".ready" for n in names} <= ready
    from tests.archive_env import archive_command

    pg_cluster.set(archive_command=archive_command(env.config))
    pg_cluster.reload()
    env.wait_archived(names[-1])
    assert set(names) <= env.archived_names()
    spool_archive = os.path.join(env.base, "spool", "main", "archive")
    assert os.path.isdir(spool_archive)
    # Every marker was consumed by the call for its own segment (fast path) or pruned. One may
    # outlive a race (the worker marks a file just as PostgreSQL's own call archives it); the
    # next call prunes it, so after one more segment none of the backlog's markers is left.
    last = env.switch()
    env.wait_archived(last)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [m for m in os.listdir(spool_archive) if m.endswith(".done") and m[:-5] in names]
        if not left:
            break
        time.sleep(0.2)
    assert left == []


def test_fast_path_answers_from_the_spool_without_heavy_imports(pg_cluster, pg_tmp):
    env = make_archive_env(pg_cluster, pg_tmp, backend="local", extra="async = true")
    name = env.switch()
    env.wait_archived(name)
    work = scratch(env, "fast")
    copy = os.path.join(work, name)
    assert env.pgvault("wal-fetch", name, copy).code == 0
    from pgvault.spool import Spool

    spool = Spool(os.path.join(env.base, "spool"), "main")
    spool.ensure_archive_dir()
    spool.mark_pushed(copy)
    chown_tree(os.path.join(env.base, "spool"))
    probe = ("import sys, runpy; sys.argv = ['pgvault', '--config', sys.argv[1], 'wal-push', sys.argv[2]];"
             "import pgvault.entry as e;"
             "ok = e._fast_wal_push(sys.argv[1:]);"
             "heavy = [m for m in ('boto3', 'botocore', 'psycopg', 'cryptography', 'zstandard', 'click') if m in sys.modules];"
             "print(ok, heavy)")
    out = subprocess.run(as_pg_user([sys.executable, "-c", probe, env.config, copy]),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True []"
    assert not spool.has_marker(name)  # consumed


def test_a_call_for_a_claimed_segment_waits_for_that_push(pg_cluster, pg_tmp):
    """A backup claims its last segment while it pushes it (spool): PostgreSQL's call for the same
    segment waits, then answers from the backup's marker; without a marker it pushes the file itself."""
    from pgvault.spool import Spool
    from tests.fixtures.pgcluster import pgvault_executable

    env = make_archive_env(pg_cluster, pg_tmp, backend="local")  # synchronous archiving, the default
    name = env.switch()
    env.wait_archived(name)
    copy = os.path.join(scratch(env, "claimed"), name)
    assert env.pgvault("wal-fetch", name, copy).code == 0
    for info in list(env.storage.list("wal/")):  # as if it had never been archived
        if name in info.key:
            env.storage.delete(info.key)
    spool = Spool(os.path.join(env.base, "spool"), "main")

    def push() -> subprocess.Popen:
        return subprocess.Popen(as_pg_user([pgvault_executable(), "--config", env.config, "wal-push", copy]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stored() -> bool:
        return name in env.archived_names()

    claim = spool.claim_push(name)
    assert claim is not None
    chown_tree(os.path.join(env.base, "spool"))
    call = push()
    time.sleep(0.5)
    assert call.poll() is None  # waiting for the claimed push
    spool.mark_pushed(copy)  # the backup's push is done: its marker, then the claim ends
    spool.release_claim(claim)
    assert call.wait(timeout=30) == 0, call.communicate()
    assert not spool.has_marker(name)  # consumed
    assert not stored()  # answered from the marker: the call itself pushed nothing

    claim = spool.claim_push(name)
    call = push()
    time.sleep(0.3)
    assert call.poll() is None
    spool.release_claim(claim)  # no marker: the backup's push failed
    assert call.wait(timeout=30) == 0, call.communicate()
    assert stored()  # so the call pushed it itself

    other = spool.claim_push("000000010000000000000099")  # another segment's claim holds nothing up
    try:
        assert push().wait(timeout=30) == 0
    finally:
        spool.release_claim(other)


def test_prefetch_fills_the_spool_for_the_next_segments(pg_cluster, pg_tmp):
    env = make_archive_env(pg_cluster, pg_tmp, backend="local", extra="prefetch = 3")
    names = [env.switch() for _ in range(5)]
    env.wait_archived(names[-1])
    work = scratch(env, "prefetch")
    assert env.pgvault("wal-fetch", names[0], os.path.join(work, names[0])).code == 0
    restore_spool = os.path.join(env.base, "spool", "main", "restore")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        present = set(os.listdir(restore_spool)) if os.path.isdir(restore_spool) else set()
        if set(names[1:4]) <= present:
            break
        time.sleep(0.1)
    assert set(names[1:4]) <= set(os.listdir(restore_spool))
    assert names[4] not in os.listdir(restore_spool)  # only `prefetch` segments ahead
    # the next fetch is served from the spool, byte for byte what was archived
    dest = os.path.join(work, names[1])
    assert env.pgvault("wal-fetch", names[1], dest).code == 0
    from pgvault.archive import file_sha256
    from pgvault.catalog import find_archived

    (entry,) = find_archived(env.storage, names[1])
    assert file_sha256(dest)[0] == entry.sha256
    assert names[1] not in os.listdir(restore_spool)


def test_encrypted_archive_round_trip_and_wrong_key(pg_cluster, pg_tmp):
    env, key_file = make_encrypted_archive_env(pg_cluster, pg_tmp)
    other_key = new_master_key(os.path.join(env.base, "other.key"))
    name = env.switch()
    env.wait_archived(name)
    (entry,) = [i for i in env.storage.list("wal/") if i.key.split("/")[-1].startswith(name + ".")]
    from pgvault.codec import read_header

    with env.storage.open(entry.key) as f:
        assert read_header(f).encrypted
    work = scratch(env, "enc")
    assert env.pgvault("wal-fetch", name, os.path.join(work, name)).code == 0
    assert os.path.getsize(os.path.join(work, name)) == 16 * 1024 * 1024

    wrong = env.config + ".wrong"
    with open(env.config) as f:
        text = f.read().replace(key_file, other_key)
    with open(wrong, "w") as f:
        f.write(text)
    res = run_pgvault("wal-fetch", name, os.path.join(work, "again"), config=wrong, as_postgres=True)
    assert res.code == 255
    assert "is not a key of this vault" in res.err
    assert not os.path.exists(os.path.join(work, "again"))


def test_push_ahead_worker_skips_its_starters_file_once_and_lingers_for_new_ones(pg_cluster, pg_tmp):
    import threading

    from pgvault.archive import CodecOptions
    from pgvault.pushahead import run_worker
    from pgvault.spool import Spool
    from pgvault.vault import require_vault_record

    env = make_archive_env(pg_cluster, pg_tmp, backend="local")
    first, second = env.switch(), env.switch()
    env.wait_archived(second)
    # A stand-in pg_wal holding copies of two real segments (their originals are archived: the
    # vault's copies are identical, so the worker's pushes succeed as "already archived").
    wal_dir = os.path.join(pg_tmp, "fake_pg_wal")
    os.makedirs(os.path.join(wal_dir, "archive_status"))
    for name in (first, second):
        shutil.copyfile(os.path.join(pg_cluster.data_dir, "pg_wal", name), os.path.join(wal_dir, name))
    open(os.path.join(wal_dir, "archive_status", first + ".ready"), "w").close()
    spool = Spool(os.path.join(pg_tmp, "spool"), "main")
    pushed: list[int] = []
    worker = threading.Thread(target=lambda: pushed.append(run_worker(
        wal_dir, storage=env.storage, record=require_vault_record(env.storage), options=CodecOptions(),
        spool=spool, parallel=2, skip=first, linger=1.5, skip_grace=0.8)))
    started = time.monotonic()
    worker.start()
    time.sleep(0.3)
    open(os.path.join(wal_dir, "archive_status", second + ".ready"), "w").close()  # a new file
    deadline = time.monotonic() + 5
    while not spool.has_marker(second) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spool.has_marker(second) and not spool.has_marker(first)  # the starter's file is left alone ...
    while not spool.has_marker(first) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spool.has_marker(first) and time.monotonic() - started >= 0.8  # ... for the grace time only
    assert worker.is_alive()
    worker.join(timeout=10)
    assert not worker.is_alive() and pushed == [2]
    assert 1.5 <= time.monotonic() - started < 8  # it left once idle for the linger time


def test_the_worker_lock_is_held_from_the_moment_a_worker_is_started(pg_cluster, pg_tmp):
    from pgvault.pushahead import _worker_running, start_worker
    from pgvault.spool import Spool

    env = make_archive_env(pg_cluster, pg_tmp, backend="local")
    spool = Spool(os.path.join(pg_tmp, "root-spool"), "main")
    spool.ensure_archive_dir()
    wal_dir = os.path.join(pg_tmp, "empty_pg_wal")
    os.makedirs(os.path.join(wal_dir, "archive_status"))
    assert start_worker(wal_dir, spool=spool, config_path=env.config) is True
    assert _worker_running(spool)  # at once: the starter took the lock and handed it over
    assert start_worker(wal_dir, spool=spool, config_path=env.config) is False  # never two workers
    deadline = time.monotonic() + 30
    while _worker_running(spool) and time.monotonic() < deadline:  # it lingers, finds nothing, leaves
        time.sleep(0.1)
    assert not _worker_running(spool)
