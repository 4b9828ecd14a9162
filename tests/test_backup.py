"""Physical backups end to end: real clusters archiving through pgvault, `pgvault backup`, and restores
materialized into new data directories that PostgreSQL then recovers and opens."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from pgvault.backup.leftovers import find_leftovers
from pgvault.backup.lock import read_holder
from pgvault.backup.manifest import iter_files, list_backups, read_manifest
from pgvault.backup.materialize import materialize_backup
from pgvault.catalog import list_archived_wal
from pgvault.spool import Spool
from tests.archive_env import archive_command, make_archive_env, restore_command
from tests.clihelp import write_config
from tests.fixtures.pgcluster import BASE_CONF, PG_USER, chown_tree, make_pg_owned_dir, pgvault_executable

pytestmark = pytest.mark.integration

CHECKSUM = "SELECT count(*), md5(coalesce(string_agg(t::text, ',' ORDER BY id), '')) FROM {} t"


def keyring_of(env):
    from pgvault.config import load_settings
    from pgvault.context import keyring_for

    return keyring_for(load_settings(env.config, environ={}), env.storage)


def backup(env, *args: str, config: str | None = None) -> dict:
    res = env.pgvault("backup", "--json", *args) if config is None else run_as_postgres(config, "backup", "--json", *args)
    assert res.code == 0, res.err
    return json.loads(res.out)


def run_as_postgres(config, *args, env=None):
    from tests.clihelp import run_pgvault

    return run_pgvault(*args, config=config, as_postgres=True, env=env)


def restore_and_start(env, pg_factory, label, *, tablespace_map=None, extra_dirs=()):
    """Materialize backup ``label`` into a new cluster directory, recover to its end (immediate), start."""
    manifest = read_manifest(env.storage, label, keyring=keyring_of(env))
    node = pg_factory.create(start=False)
    shutil.rmtree(node.data_dir)
    materialize_backup(env.storage, manifest, node.data_dir, keyring=keyring_of(env), parallel=2,
                       tablespace_map=tablespace_map)
    for path in (node.base, *extra_dirs):
        chown_tree(path)
    node.append_conf(BASE_CONF.format(port=node.port, sockdir=node.base))
    # never archive from the restored node into the test's vault (it would start timeline 2 there)
    node.set(archive_mode="off", restore_command=restore_command(env.config), recovery_target="immediate",
             recovery_target_action="promote")
    open(os.path.join(node.data_dir, "recovery.signal"), "w").close()
    chown_tree(node.data_dir)
    node.start()
    return node


class Writer(threading.Thread):
    """Inserts numbered rows, one transaction each, until stopped; ``committed`` is the last id committed."""

    def __init__(self, cluster, table="w"):
        super().__init__(daemon=True)
        self.cluster, self.table = cluster, table
        self.committed = 0
        self.halt = threading.Event()
        cluster.sql(f"CREATE TABLE IF NOT EXISTS {table}(id int PRIMARY KEY, pad text)")

    def run(self):
        with self.cluster.connect() as conn:
            i = 0
            while not self.halt.is_set():
                i += 1
                conn.execute(f"INSERT INTO {self.table} VALUES (%s, repeat('x', 200))", (i,))
                self.committed = i

    def stop(self):
        self.halt.set()
        self.join()


# pg_tmp before the clusters: fixtures are torn down in reverse, so the clusters (whose
# archive_command writes into pg_tmp) stop before it is removed.
@pytest.fixture(params=["local", "s3"])
def env(request, pg_tmp, pg_cluster):
    s3 = request.getfixturevalue("s3_bucket") if request.param == "s3" else None
    return make_archive_env(pg_cluster, pg_tmp, backend=request.param, s3=s3)


@pytest.fixture
def local_env(pg_tmp, pg_cluster):
    return make_archive_env(pg_cluster, pg_tmp, backend="local")


def test_full_backup_under_concurrent_writes_restores_everything_committed_before_it(env, pg_factory):
    cluster = env.cluster
    cluster.sql("CREATE TABLE fixed AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g")
    expected = cluster.sql(CHECKSUM.format("fixed"))
    writer = Writer(cluster)
    writer.start()
    time.sleep(0.3)
    before = writer.committed  # every row up to this id committed before pg_backup_start
    result = backup(env)
    writer.stop()
    assert result["type"] == "full" and result["requested"] == "full" and result["parent"] is None
    assert result["backup_from"] == "primary" and result["timeline"] == 1
    assert result["bytes_read"] > 20 << 20 and 0 < result["bytes_stored"] < result["bytes_read"]
    assert result["file_count"] > 900 and result["start_lsn"] <= result["stop_lsn"]
    (listed,) = list_backups(env.storage, keyring=None)
    assert listed.label == result["label"] and listed.to_dict()["stop_lsn"] == result["stop_lsn"]
    assert find_leftovers(env.storage) == [] and read_holder(env.storage) is None
    entries = {e.path: e for e in iter_files(env.storage, listed, keyring=None)}
    assert "postmaster.pid" not in entries and "pg_wal/archive_status" in entries
    assert not [p for p in entries if p.startswith("pg_wal/0")]

    node = restore_and_start(env, pg_factory, result["label"])
    assert node.sql(CHECKSUM.format("fixed")) == expected
    assert node.one("SELECT count(*) FROM w WHERE id <= %s", (before,)) == before
    assert node.one("SELECT count(*) FROM w") <= writer.committed


@pytest.mark.slow
def test_incremental_stores_only_changes_and_restores_exactly(local_env, pg_factory):
    env, cluster = local_env, local_env.cluster
    cluster.sql("CREATE TABLE acc (id int PRIMARY KEY, balance int, pad text)")
    cluster.sql("INSERT INTO acc SELECT g, 0, repeat(md5(g::text), 3) FROM generate_series(1, 200000) g")
    # as pgbench -i does: else the first read after the load sets hint bits on every page (a real change)
    cluster.sql("VACUUM (FREEZE, ANALYZE) acc")
    full = backup(env)
    cluster.sql("UPDATE acc SET balance = balance + 1 WHERE id BETWEEN 50001 AND 52000")  # 1%, contiguous
    cluster.sql("CREATE TABLE added AS SELECT g AS id FROM generate_series(1, 1000) g")
    expected = cluster.sql(CHECKSUM.format("acc")), cluster.sql(CHECKSUM.format("added"))
    incr = backup(env, "--type", "incr")
    assert incr["type"] == "incr" and incr["parent"] == full["label"] and incr["requested"] == "incr"
    assert incr["label"] > full["label"] and incr["label"].endswith("I")
    assert incr["bytes_stored"] < full["bytes_stored"] / 10, (incr, full)
    assert incr["reused_files"] > 500  # unchanged files are not even read
    assert abs(incr["bytes_read"] - full["bytes_read"]) < 2 << 20  # the same database, block for block

    node = restore_and_start(env, pg_factory, incr["label"])
    assert (node.sql(CHECKSUM.format("acc")), node.sql(CHECKSUM.format("added"))) == expected


def test_incremental_with_no_backup_yet_takes_a_full_one_and_says_so(local_env):
    env = local_env
    res = env.pgvault("backup", "--type", "incr", "--json")
    assert res.code == 0, res.err
    first = json.loads(res.out)
    assert first["type"] == "full" and first["requested"] == "incr" and first["label"].endswith("F")
    assert first["notices"] == ["no backup to build an incremental on yet: taking a full backup"]
    assert "pgvault backup: no backup to build an incremental on yet: taking a full backup" in res.err
    res = env.pgvault("backup", "--type", "incr")  # text output
    assert res.code == 0, res.err
    assert f"committed: incr on {first['label']}" in res.out
    assert "from the primary, timeline 1" in res.out
    assert [m.type for m in list_backups(env.storage, keyring=None)] == ["full", "incr"]


@pytest.mark.slow
def test_backup_from_a_standby(pg_tmp, pg_factory):
    primary = pg_factory.create()
    env = make_archive_env(primary, pg_tmp, backend="local")
    primary.sql("CREATE TABLE s AS SELECT g AS id FROM generate_series(1, 5000) g")
    standby = pg_factory.create_standby(primary, archive_command=archive_command(env.config))
    config = write_config(os.path.join(env.base, "standby.toml"), open(env.config).read()
                          .replace(primary.conninfo, standby.conninfo).replace(primary.data_dir, standby.data_dir)
                          + '\n[backup]\nfrom = "standby"\n')
    chown_tree(env.base)

    wrong = run_as_postgres(env.config, "backup", env={"PGVAULT_BACKUP_FROM": "standby"})
    assert wrong.code == 80
    assert '[backup] from = "standby", but the server at ' in wrong.err and "is a primary" in wrong.err
    # the standby's files with the primary's server: same system identifier, still refused
    wrong = run_as_postgres(env.config, "backup", env={"PGVAULT_POSTGRES_DATA_DIR": standby.data_dir})
    assert wrong.code == 80
    assert (f"[postgres] data_dir {standby.data_dir} is the data directory of the server of {standby.data_dir} "
            f"on port {standby.port}, but the server at ") in wrong.err
    assert f"runs on {primary.data_dir} (port {primary.port})" in wrong.err

    # The standby's stop point is in a segment the primary must complete and archive.
    halt = threading.Event()

    def switch_wal():
        while not halt.wait(0.5):
            primary.sql("INSERT INTO s VALUES (-1); SELECT pg_switch_wal()")

    switcher = threading.Thread(target=switch_wal, daemon=True)
    switcher.start()
    try:
        deadline = time.monotonic() + 30
        while standby.one("SELECT count(*) FROM pg_class WHERE relname = 's'") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        result = backup(env, config=config)
    finally:
        halt.set()
        switcher.join()
    assert result["backup_from"] == "standby"
    node = restore_and_start(env, pg_factory, result["label"])
    assert node.one("SELECT count(*) FROM s WHERE id > 0") == 5000


def popen_backup(env, *args):
    """`pgvault backup` running as postgres, with its own pid (no runuser in between) so it can be killed."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    return subprocess.Popen([pgvault_executable(), "--config", env.config, "backup", *args], user=PG_USER,
                            group=PG_USER, env=environment, cwd="/tmp", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def break_archiving(cluster):
    cluster.set(archive_command="/bin/false")
    cluster.reload()


@pytest.mark.slow
def test_sigkill_midway_leaves_nothing_listed_and_the_next_backup_cleans_up(pg_tmp, pg_cluster):
    env = make_archive_env(pg_cluster, pg_tmp, backend="local", extra="[backup]\nparallel = 1")
    pg_cluster.sql("CREATE TABLE big AS SELECT g AS id, md5(g::text) || repeat('y', 300) AS v "
                   "FROM generate_series(1, 400000) g")  # ~150 MB: several 64 MiB objects, one at a time
    break_archiving(pg_cluster)  # and it could never commit anyway
    proc = popen_backup(env)
    deadline = time.monotonic() + 60
    while not any(i.key.endswith("/data/000000") for i in env.storage.list("backups/")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()  # returns once the child holding the session has gone too (it shares stderr)
    # That child saw its parent go: the session is closed, so the server ended the backup.
    assert pg_cluster.one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgvault'") == 0
    (left,) = find_leftovers(env.storage)
    assert not left.keys[-1].endswith("manifest.json")
    assert list_backups(env.storage, keyring=None) == []
    holder = read_holder(env.storage)
    assert holder is not None and holder.label == left.label and holder.pid == proc.pid

    pg_cluster.set(archive_command=archive_command(env.config))
    pg_cluster.reload()
    res = env.pgvault("backup", "--json")
    assert res.code == 0, res.err
    assert f"pgvault backup: removed the stale lock of backup {left.label} (pid {proc.pid} on " in res.err
    assert f"pgvault backup: removed the leftovers of the interrupted backup {left.label} (" in res.err
    assert find_leftovers(env.storage) == [] and read_holder(env.storage) is None
    assert [m.label for m in list_backups(env.storage, keyring=None)] == [json.loads(res.out)["label"]]


def test_the_backup_pushes_its_last_segment_itself_once_the_archiver_is_shown_to_work(pg_tmp, pg_cluster, pg_factory):
    """archive_command holds every WAL file but the current segment while a file says so, so the backup's last
    segment waits in pg_wal; the backup must commit anyway (within wal_timeout) because it pushes that segment
    itself, and archive_command's own call for it later answers from the marker the backup left, without the
    vault (made unreadable for that call)."""
    env = make_archive_env(pg_cluster, pg_tmp, backend="local", extra="[backup]\nwal_timeout = 10")
    hold = os.path.join(env.base, "hold")  # holds the one name archive_command may still push
    pg_cluster.set(archive_command=f'while [ -e "{hold}" ] && ! grep -qx "%f" "{hold}"; do sleep 0.05; done; '
                                   + archive_command(env.config))
    pg_cluster.reload()
    env.wait_archived(env.switch())
    pg_cluster.sql("INSERT INTO t VALUES (2)")  # the current segment has WAL: pg_backup_start completes it
    current = pg_cluster.one("SELECT pg_walfile_name(pg_current_wal_lsn())")
    with open(hold, "w") as f:
        f.write(current + "\n")
    failed_before = pg_cluster.one("SELECT failed_count FROM pg_stat_archiver")

    result = backup(env)
    stop_wal = result["stop_wal"]
    assert stop_wal > current and os.path.exists(hold)  # committed while archive_command held it
    assert stop_wal in env.archived_names()
    assert pg_cluster.one("SELECT last_archived_wal FROM pg_stat_archiver") == current
    spool = Spool(os.path.join(env.base, "spool"), "main")
    assert spool.has_marker(stop_wal)

    wal_dir = os.path.join(env.base, "vault", "main", "wal")
    os.chmod(wal_dir, 0)  # a push of its own would fail now
    try:
        with open(hold, "a") as f:
            f.write(stop_wal + "\n")  # let that call go (not yet the .backup file's: it needs the vault)
        env.wait_archived(stop_wal)
        assert pg_cluster.one("SELECT failed_count FROM pg_stat_archiver") == failed_before
        assert not spool.has_marker(stop_wal)  # consumed by that call
    finally:
        os.chmod(wal_dir, 0o700)
    os.unlink(hold)
    env.wait_archived(stop_wal + ".")  # the .backup file: archiving goes on as usual
    assert pg_cluster.one("SELECT failed_count FROM pg_stat_archiver") == failed_before
    (copy,) = [e for e in list_archived_wal(env.storage) if e.name == stop_wal]  # one copy: one key
    assert copy.size == 16 * 1024 * 1024
    node = restore_and_start(env, pg_factory, result["label"])
    assert node.one("SELECT count(*) FROM t") == 2


def test_pgvault_backup_leaves_psycopg_to_its_session_process(local_env):
    """The console script starts the session's process first; importing psycopg here again would
    put its ~45 ms back in front of pg_backup_start (see pgsession)."""
    script = ("import sys\n"
              "import pgvault.entry as entry\n"
              "exit_at_once = entry._exit_at_once  # how the backup's process ends (no atexit)\n"
              "def ending(code):\n"
              "    print('psycopg imported:', 'psycopg' in sys.modules, file=sys.stderr)\n"
              "    exit_at_once(code)\n"
              "entry._exit_at_once = ending\n"
              f"sys.argv = ['pgvault', '--config', {local_env.config!r}, 'backup', '--json']\n"
              "entry.main()\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    done = subprocess.run([sys.executable, "-c", script], user=PG_USER, group=PG_USER, env=environment, cwd="/tmp",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["type"] == "full"
    assert done.stderr.strip().splitlines()[-1] == "psycopg imported: False"


@pytest.mark.slow
def test_a_second_backup_is_refused_and_broken_archiving_times_out_clearly(pg_tmp, pg_cluster):
    env = make_archive_env(pg_cluster, pg_tmp, backend="local", extra="[backup]\nwal_timeout = 4")
    break_archiving(pg_cluster)
    first = popen_backup(env)
    deadline = time.monotonic() + 30
    while (holder := read_holder(env.storage)) is None:
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = env.pgvault("backup")
    assert second.code == 81, second.err
    assert "another backup or dump of this cluster is running on this host" in second.err
    assert f"backup {holder.label} (pid {first.pid} on " in second.err

    _out, err = first.communicate(timeout=60)
    assert first.returncode == 82, err
    assert "WAL segment 00000001000000000000000" in err
    assert "needed to make the backup consistent, did not reach the vault" in err
    assert "within 4 s; the backup was not committed" in err
    assert "HINT: archiving fails on the server (last failure: " in err
    assert list_backups(env.storage, keyring=None) == []
    assert find_leftovers(env.storage) == [] and read_holder(env.storage) is None  # cleaned up after itself


def test_bad_input_gives_one_clear_error_each(local_env, pg_factory):
    env, cluster = local_env, local_env.cluster

    def run(**overrides):
        return run_as_postgres(env.config, "backup", env=overrides)

    from tests.fixtures.pgcluster import free_port

    res = run(PGVAULT_POSTGRES_CONNINFO=f"host=127.0.0.1 port={free_port()} user=postgres connect_timeout=3")
    assert res.code == 30 and "pgvault: error: cannot connect to PostgreSQL (" in res.err

    empty = make_pg_owned_dir("pgvault-notdata-")
    try:
        res = run(PGVAULT_POSTGRES_DATA_DIR=empty)
        assert res.code == 30
        assert f"pgvault: error: {empty} is not a PostgreSQL data directory" in res.err
    finally:
        shutil.rmtree(empty)

    other = pg_factory.create(fresh=True, start=False)
    res = run(PGVAULT_POSTGRES_DATA_DIR=other.data_dir)
    assert res.code == 80
    assert f"[postgres] data_dir {other.data_dir} holds the cluster with system identifier" in res.err
    assert f"port={cluster.port}" in res.err and "but the server at " in res.err
    assert "HINT: set [postgres] data_dir to the data directory of the server" in res.err

    res = run(PGVAULT_BACKUP_FROM="standby")
    assert res.code == 80 and "is a primary" in res.err

    cluster.set(archive_mode="off")
    cluster.restart()
    res = run()
    assert res.code == 80
    assert "archive_mode is 'off' on the server at" in res.err
    assert "the backup could never be made consistent" in res.err
    assert "HINT: set archive_mode = on" in res.err
    assert read_holder(env.storage) is None and list(env.storage.list("backups/")) == []
    assert res.err.count("pgvault: error:") == 1


@pytest.mark.slow
def test_tablespaces_are_backed_up_and_restored_to_a_new_location(local_env, pg_factory):
    env, cluster = local_env, local_env.cluster
    location = make_pg_owned_dir("pgvault-ts-")
    moved = make_pg_owned_dir("pgvault-ts-moved-")
    try:
        cluster.sql(f"CREATE TABLESPACE space LOCATION '{location}'")
        cluster.sql("CREATE TABLE far (id int) TABLESPACE space")
        cluster.sql("INSERT INTO far SELECT generate_series(1, 10000)")
        oid = cluster.one("SELECT oid FROM pg_tablespace WHERE spcname = 'space'")
        result = backup(env)
        manifest = read_manifest(env.storage, result["label"], keyring=None)
        assert [(t.oid, t.location) for t in manifest.tablespaces] == [(oid, location)]
        assert manifest.tablespace_map == f"{oid} {location}\n"
        node = restore_and_start(env, pg_factory, result["label"], tablespace_map={oid: moved}, extra_dirs=(moved,))
        assert node.one("SELECT sum(id) FROM far") == 10000 * 10001 // 2
        assert os.readlink(os.path.join(node.data_dir, "pg_tblspc", str(oid))) == moved
        assert node.one("SELECT pg_tablespace_location(%s)", (oid,)) == moved
    finally:
        shutil.rmtree(location, ignore_errors=True)
        shutil.rmtree(moved, ignore_errors=True)


def test_encrypted_vault_backs_up_encrypted_objects(pg_tmp, pg_cluster):
    from tests.archive_env import make_encrypted_archive_env

    env, _key_file = make_encrypted_archive_env(pg_cluster, pg_tmp)
    result = backup(env)
    from pgvault.codec import read_header

    keys = [i.key for i in env.storage.list(f"backups/{result['label']}/")]
    assert any(k.endswith("manifest.json") for k in keys) and any("/data/" in k for k in keys)
    for key in keys:
        with env.storage.open(key) as f:
            assert read_header(f).encrypted, key
    with pytest.raises(Exception, match="no encryption key is configured"):
        list_backups(env.storage, keyring=None)
    manifest = read_manifest(env.storage, result["label"], keyring=keyring_of(env), require_encryption=True)
    dest = os.path.join(pg_tmp, "restored")
    materialize_backup(env.storage, manifest, dest, keyring=keyring_of(env), require_encryption=True)
    for name in ("PG_VERSION", "global/1262"):
        with open(os.path.join(dest, name), "rb") as a, open(os.path.join(pg_cluster.data_dir, name), "rb") as b:
            assert a.read() == b.read()
