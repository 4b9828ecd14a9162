"""Logical dumps: `pgvault dump`, `dumps` and `restore-dump` on real clusters, and the pure key/record helpers."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest

from pgvault import dump as dumplib
from pgvault.errors import EXIT_CODES, DumpError
from pgvault.storage.base import validate_key
from pgvault.storage.local import LocalStorage
from tests.clihelp import Result, run_pgvault, write_config
from tests.fixtures.pgcluster import PgCluster, as_pg_user, chown_tree, free_port, pgvault_executable

WEIRD = "we ird 'q\"ü db/\\ü"  # spaces, both quotes, non-ASCII, a slash and a backslash


# --- pure: keys and records -----------------------------------------------------

@pytest.mark.parametrize("name", ["app", "postgres", WEIRD, "ü" * 63, "a" * 63, "-x", ".hidden", "dump", "globals"])
def test_database_keys_are_valid_and_parse_back(name):
    label = dumplib.format_dump_label(datetime(2026, 11, 27, 20, 30, 0, tzinfo=timezone.utc))
    assert label == "20261127T203000ZD"
    key = dumplib.format_database_key(label, name)
    assert validate_key(key) == key
    assert key.startswith("dumps/20261127T203000ZD/") and key.endswith(".dump")
    parsed = dumplib.parse_dump_key(key)
    assert parsed is not None and parsed.kind == "database" and parsed.label == label
    assert parsed.matches(name) and not parsed.matches(name + "x")


def test_similar_names_get_different_keys():
    label = "20261127T203000ZD"
    names = ["a b", "a_b", "a'b", "a\"b", "aüb"]
    keys = {dumplib.format_database_key(label, n) for n in names}
    assert len(keys) == len(names)


def test_label_and_key_parsing():
    label = "20261127T203000ZD"
    assert dumplib.parse_dump_label(label) == datetime(2026, 11, 27, 20, 30, tzinfo=timezone.utc)
    for bad in ("20261127T203000Z", "20261327T203000ZD", "x", "", "20261127T203000ZD/"):
        assert dumplib.parse_dump_label(bad) is None
    assert dumplib.parse_dump_key(dumplib.format_record_key(label)) == dumplib.DumpKey(label, "record")
    assert dumplib.parse_dump_key(dumplib.format_globals_key(label)) == dumplib.DumpKey(label, "globals")
    for bad in ("dumps/20261127T203000ZD/other.txt", "dumps/x/dump.json", "wal/20261127T203000ZD/dump.json",
                "dumps/20261127T203000ZD/a/dump.json"):
        assert dumplib.parse_dump_key(bad) is None
    with pytest.raises(ValueError):
        dumplib.format_record_key("not-a-label")


def _record(label: str, names: list[str]) -> dumplib.DumpRecord:
    obj = dumplib.DumpedObject(key=dumplib.format_globals_key(label), sha256="0" * 64, size=10, stored_size=20)
    dbs = tuple(dumplib.DumpedDatabase(
        name=n, key=dumplib.format_database_key(label, n), sha256="1" * 64, size=100, stored_size=50, seconds=0.5,
        owner="postgres", encoding="UTF8", collate="C", ctype="C", locale_provider="c", icu_locale=None)
        for n in names)
    return dumplib.DumpRecord(
        format_version=1, label=label, cluster="main", system_identifier=7312345678901234567, pg_version="15.8",
        pg_version_num=150008, pg_dump_version="15.8", started_at="2026-11-27T20:30:00+00:00",
        stopped_at="2026-11-27T20:30:01+00:00", duration_seconds=1.0, host="h", globals=obj, databases=dbs)


def test_record_round_trip_and_tampered_keys(tmp_path):
    record = _record("20261127T203000ZD", ["app", WEIRD])
    again = dumplib.DumpRecord.from_json(record.to_json(), where="x")
    assert again == record
    assert again.database(WEIRD).key == dumplib.format_database_key(record.label, WEIRD)
    data = json.loads(record.to_json())
    data["databases"][0]["key"] = data["databases"][1]["key"]
    with pytest.raises(DumpError, match="names objects outside its own dump"):
        dumplib.DumpRecord.from_json(json.dumps(data).encode(), where="x")


def test_listing_reads_records_only_and_leftovers_are_removed(tmp_path):
    from pgvault.archive import CodecOptions

    storage = LocalStorage(str(tmp_path / "vault"))
    done = _record("20261127T203000ZD", ["app"])
    dumplib.write_dump_record(storage, done, options=CodecOptions())
    for key in (done.globals.key, done.databases[0].key,
                "dumps/20261127T210000ZD/globals.sql", dumplib.format_database_key("20261127T210000ZD", "app"),
                "dumps/notalabel/x"):
        storage.put(key, io.BytesIO(b"x"))
    assert [d.label for d in dumplib.list_dumps(storage, None)] == ["20261127T203000ZD"]
    assert list(dumplib.find_leftovers(storage)) == ["20261127T210000ZD"]
    assert dumplib.remove_leftovers(storage) == ("20261127T210000ZD",)
    assert [i.key for i in storage.list("dumps/")] == sorted([
        "dumps/20261127T203000ZD/dump.json", done.globals.key, done.databases[0].key, "dumps/notalabel/x"])
    assert [d.label for d in dumplib.list_dumps(storage, None)] == ["20261127T203000ZD"]


def test_dump_error_has_its_exit_code():
    assert EXIT_CODES[DumpError] == 60


# --- real clusters -------------------------------------------------------------


@dataclass
class DumpEnv:
    cluster: PgCluster
    config: str
    base: str
    storage: object  # a Storage on the same vault, for looking behind pgvault's back
    vault_toml: str = ""

    def pgvault(self, *args: str, config: str | None = None, **kw) -> Result:
        return run_pgvault(*args, config=config or self.config, as_postgres=True, **kw)

    def ok(self, *args: str) -> Result:
        res = self.pgvault(*args)
        assert res.code == 0, f"pgvault {' '.join(args)} exited {res.code}:\n{res.err}"
        return res

    def dump(self, *args: str) -> dict:
        return json.loads(self.ok("dump", "--json", *args).out)

    def listing(self) -> list[dict]:
        return json.loads(self.ok("dumps", "--json").out)

    def write_config(self, name: str, *, conninfo: str | None = None, extra: str = "") -> str:
        path = write_config(os.path.join(self.base, name), f"""
[vault]
{self.vault_toml}
[postgres]
conninfo = "{conninfo or self.cluster.conninfo}"
{extra}
[archive]
spool_dir = "{self.base}/spool"
""")
        chown_tree(self.base)
        return path

    def scratch(self, name: str) -> str:
        path = os.path.join(self.base, name)
        os.makedirs(path, exist_ok=True)
        chown_tree(path)
        return path

    def count(self, db: str, table: str) -> int:
        with self.db(db) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def db(self, name: str):
        import psycopg
        from psycopg.conninfo import make_conninfo

        return psycopg.connect(make_conninfo(self.cluster.conninfo, dbname=name), autocommit=True)

    def databases(self) -> set[str]:
        return {r[0] for r in self.cluster.sql("SELECT datname FROM pg_database")}


def make_env(cluster: PgCluster, pg_tmp: str, *, key_file: str | None = None, s3=None) -> DumpEnv:
    base = os.path.join(pg_tmp, "dir with space")
    os.makedirs(base, exist_ok=True)
    if s3 is None:
        vault = f'url = "file://{base}/vault"'
    else:
        endpoint, bucket = s3
        vault = (f'url = "s3://{bucket}/pfx"\nendpoint_url = "{endpoint.url}"\nregion = "{endpoint.region}"\n'
                 f'access_key_id = "{endpoint.access_key}"\nsecret_access_key = "{endpoint.secret_key}"')
    env = DumpEnv(cluster=cluster, config="", base=base, storage=None, vault_toml=vault)
    extra = f'[encryption]\nkey_file = "{key_file}"' if key_file else ""
    env.config = env.write_config("pgvault.toml", extra=extra)
    env.ok("init")
    from pgvault.config import load_settings
    from pgvault.context import storage_for

    env.storage = storage_for(load_settings(env.config, environ={}), create=False)
    return env


def create_db(env: DumpEnv, name: str, tables: dict[str, int]) -> None:
    from psycopg import sql

    env.cluster.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)).as_string(None))
    with env.db(name) as conn:
        for table, rows in tables.items():
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
            conn.execute(f"INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, {rows}) g")


def drop_db(env: DumpEnv, name: str) -> None:
    from psycopg import sql

    env.cluster.sql(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)).as_string(None))


@pytest.fixture
def env(pg_cluster, pg_tmp) -> DumpEnv:
    return make_env(pg_cluster, pg_tmp)


def assert_one_line_error(res: Result, code: int, *parts: str) -> None:
    assert res.code == code, f"expected exit {code}, got {res.code}:\n{res.err}"
    lines = res.err.strip().splitlines()
    assert lines[0].startswith("pgvault: error: "), res.err
    assert len(lines) == 2 and lines[1].startswith("HINT: "), res.err
    assert "Traceback" not in res.err
    for part in parts:
        assert part in res.err, res.err


@pytest.mark.integration
def test_dump_and_restore_round_trip(env):
    create_db(env, "app", {"orders": 1234, "customers": 56})
    create_db(env, WEIRD, {"t": 78})
    record = env.dump()

    label = record["label"]
    assert dumplib.parse_dump_label(label) is not None
    assert {d["name"] for d in record["databases"]} == {"app", "postgres", WEIRD}  # templates excluded
    keys = {i.key for i in env.storage.list(f"dumps/{label}/")}
    assert keys == ({f"dumps/{label}/dump.json", f"dumps/{label}/globals.sql"}
                    | {dumplib.format_database_key(label, d["name"]) for d in record["databases"]})
    weird = next(d for d in record["databases"] if d["name"] == WEIRD)
    assert weird["key"] == dumplib.format_database_key(label, WEIRD) and len(weird["sha256"]) == 64
    assert weird["size"] > 0 and record["pg_version_num"] // 10000 == 15 and record["duration_seconds"] >= 0
    assert record["started_at"] <= record["stopped_at"]
    assert [d["label"] for d in env.listing()] == [label]
    text = env.ok("dumps").out
    assert label in text and '"we ird' in text

    drop_db(env, "app")
    drop_db(env, WEIRD)
    out = env.ok("restore-dump", label, "--db", "app").out
    assert f"restored database app of dump {label}" in out
    env.ok("restore-dump", label, "--db", WEIRD)
    assert env.count("app", "orders") == 1234
    assert env.count("app", "customers") == 56
    assert env.count(WEIRD, "t") == 78


@pytest.mark.integration
def test_restore_into_new_names_with_one_and_two_jobs(env):
    create_db(env, "app", {"orders": 5000, "customers": 300})
    with env.db("app") as conn:
        conn.execute("CREATE INDEX ON orders (note)")
    label = env.dump("--db", "app")["label"]
    temp = env.scratch("restore tmp")

    res = env.ok("restore-dump", label, "--db", "app", "--into", "app one", "--jobs", "1", "--json")
    assert json.loads(res.out)["database"] == {"name": "app", "into": "app one", "jobs": 1,
                                              "size": json.loads(res.out)["database"]["size"],
                                              "seconds": json.loads(res.out)["database"]["seconds"]}
    env.ok("restore-dump", label, "--db", "app", "--into", "app_two", "--jobs", "2", "--temp-dir", temp)
    for db in ("app one", "app_two"):
        assert env.count(db, "orders") == 5000
        assert env.count(db, "customers") == 300
    assert os.listdir(temp) == []  # the temporary copy is gone


@pytest.mark.integration
def test_s3_vault_round_trip(pg_cluster, pg_tmp, s3_bucket):
    env = make_env(pg_cluster, pg_tmp, s3=s3_bucket)
    create_db(env, "app", {"t": 20000})
    create_db(env, WEIRD, {"t": 5})
    label = env.dump()["label"]
    assert [d["label"] for d in env.listing()] == [label]
    env.ok("restore-dump", label, "--db", "app", "--into", "app2")
    env.ok("restore-dump", label, "--db", WEIRD, "--into", "w2", "--jobs", "2")
    assert env.count("app2", "t") == 20000
    assert env.count("w2", "t") == 5


@pytest.mark.integration
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_corrupt_dump_is_refused_and_leaves_no_database(env, jobs):
    create_db(env, "app", {"t": 50000})
    record = env.dump("--db", "app")
    entry = next(d for d in record["databases"] if d["name"] == "app")
    path = os.path.join(env.storage.root, *entry["key"].split("/"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # one flipped byte in the middle of the stored object
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    res = env.pgvault("restore-dump", record["label"], "--db", "app", "--into", "app2", "--jobs", jobs)
    assert res.code == 24, res.err
    assert f"object {entry['key']} is corrupt" in res.err
    assert "app2" not in env.databases()


@pytest.mark.integration
def test_globals_bring_back_roles(env):
    env.cluster.sql("CREATE ROLE dump_tester LOGIN CONNECTION LIMIT 7")
    label = env.dump("--db", "postgres")["label"]
    env.cluster.sql("DROP ROLE dump_tester")

    script = env.ok("restore-dump", label, "--globals", "--print").out
    assert "CREATE ROLE dump_tester;" in script
    res = env.ok("restore-dump", label, "--globals")
    assert f"restored the globals of dump {label}" in res.out
    assert env.cluster.one("SELECT rolconnlimit FROM pg_roles WHERE rolname = 'dump_tester'") == 7
    assert env.cluster.one("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'dump_tester'") is True


@pytest.mark.integration
def test_restore_recreates_a_missing_owner_from_the_globals(env):
    env.cluster.sql("CREATE ROLE app_owner")
    create_db(env, "owned", {"t": 10})
    env.cluster.sql('ALTER DATABASE owned OWNER TO app_owner')
    with env.db("owned") as conn:
        conn.execute("ALTER TABLE t OWNER TO app_owner")
    label = env.dump("--db", "owned")["label"]
    drop_db(env, "owned")
    env.cluster.sql("DROP ROLE app_owner")

    res = env.pgvault("restore-dump", label, "--db", "owned", "--into", "owned2")
    assert_one_line_error(res, 60, "cannot create database 'owned2'", "app_owner",
                          f"pgvault restore-dump {label} --globals")
    res = env.pgvault("restore-dump", label, "--db", "owned")
    assert_one_line_error(res, 60, "restoring database 'owned'", "was dropped")
    assert "owned" not in env.databases()

    env.ok("restore-dump", label, "--globals", "--db", "owned")
    assert env.count("owned", "t") == 10
    assert env.cluster.one("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'owned'") == "app_owner"


@pytest.mark.integration
def test_encrypted_vault_round_trip(pg_cluster, pg_tmp):
    keys = os.path.join(pg_tmp, "keys")
    os.makedirs(keys)
    chown_tree(pg_tmp)
    key_file = os.path.join(keys, "master.key")
    assert run_pgvault("key", "generate", key_file, as_postgres=True).code == 0
    env = make_env(pg_cluster, pg_tmp, key_file=key_file)
    create_db(env, "secret", {"t": 321})
    label = env.dump("--db", "secret")["label"]

    from pgvault.codec import read_header

    for info in env.storage.list(f"dumps/{label}/"):
        with env.storage.open(info.key) as f:
            header = read_header(f)
            assert header.encrypted, info.key
            payload = f.read()  # after the header, which names the object (the key holds a slug of the name)
        assert b"secret" not in payload and b"row 1" not in payload and b"CREATE" not in payload
    env.ok("restore-dump", label, "--db", "secret", "--into", "secret2")
    env.ok("restore-dump", label, "--db", "secret", "--into", "secret3", "--jobs", "2")
    assert env.count("secret2", "t") == 321
    assert env.count("secret3", "t") == 321

    no_key = env.write_config("nokey.toml")
    res = env.pgvault("dumps", config=no_key)
    assert res.code == 11 and "no encryption key is configured" in res.err


def _wait(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
def test_interrupted_dump_is_never_listed_and_is_cleaned_up_next_time(env):
    create_db(env, "app", {"t": 100})
    create_db(env, "zz_locked", {"t": 10})
    first = env.dump()["label"]

    # pg_dump of zz_locked waits for this lock; meanwhile the globals and the other databases are stored.
    locker = env.db("zz_locked")
    locker.autocommit = False
    locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
    proc = subprocess.Popen(as_pg_user([pgvault_executable(), "--config", env.config, "dump"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(lambda: env.cluster.sql("SELECT 1 FROM pg_stat_activity WHERE datname = 'zz_locked' "
                                      "AND application_name = 'pg_dump' AND wait_event_type = 'Lock'"),
              "pg_dump to wait for the lock")
        os.killpg(proc.pid, signal.SIGKILL)  # pgvault and its pg_dump, at once
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        locker.rollback()
        locker.close()

    leftovers = dumplib.find_leftovers(env.storage)
    assert len(leftovers) == 1
    (label,) = leftovers
    assert label != first
    assert dumplib.format_globals_key(label) in leftovers[label]
    assert dumplib.format_database_key(label, "app") in leftovers[label]
    assert [d["label"] for d in env.listing()] == [first]
    res = env.pgvault("restore-dump", label, "--db", "app", "--into", "x")
    assert_one_line_error(res, 23, f"dump {label} is not in the vault")

    # A new label: labels are wall-clock seconds, so wait for the wall clock (not a monotonic sleep).
    while dumplib.format_dump_label(datetime.now(timezone.utc)) <= label:
        time.sleep(0.05)
    res = env.ok("dump", "--db", "app")
    assert f"removed the leftovers of interrupted dump(s): {label}" in res.err
    assert dumplib.find_leftovers(env.storage) == {}
    assert not list(env.storage.list(f"dumps/{label}/"))
    assert len(env.listing()) == 2


@pytest.mark.integration
def test_failing_pg_dump_leaves_nothing(env):
    create_db(env, "app", {"t": 100})
    create_db(env, "broken", {"t": 1000})
    path = os.path.join(env.cluster.data_dir, _relation_path(env, "broken", "t"))
    env.cluster.stop()
    with open(path, "r+b") as f:  # an invalid page header: COPY fails midway through the dump
        f.write(b"\xff" * 8192)
    env.cluster.start()

    res = env.pgvault("dump")
    assert_one_line_error(res, 60, "pg_dump of database 'broken' failed (exit status 1)",
                          "invalid page in block 0", "the dump was not recorded")
    assert list(env.storage.list("dumps/")) == []
    assert env.listing() == []
    env.ok("dump", "--db", "app")  # the other databases still dump
    assert len(env.listing()) == 1


def _relation_path(env: DumpEnv, db: str, table: str) -> str:
    with env.db(db) as conn:
        return conn.execute("SELECT pg_relation_filepath(%s)", (table,)).fetchone()[0]


@pytest.mark.integration
def test_bad_input_gives_one_line_errors(env, pg_tmp):
    create_db(env, "app", {"t": 3})
    label = env.dump("--db", "app")["label"]

    assert_one_line_error(env.pgvault("restore-dump", "20990101T000000ZD", "--db", "app"), 23,
                          "dump 20990101T000000ZD is not in the vault", "pgvault dumps")
    assert_one_line_error(env.pgvault("restore-dump", "nonsense", "--db", "app"), 23, "is not a dump label")
    assert_one_line_error(env.pgvault("dump", "--db", "app", "--db", "nope"), 60,
                          "database 'nope' does not exist on the server", "'app'")
    assert_one_line_error(env.pgvault("restore-dump", label, "--db", "nope"), 60,
                          f"dump {label} has no database 'nope'", "it holds: 'app'")
    assert_one_line_error(env.pgvault("restore-dump", label, "--db", "app"), 60,
                          "database 'app' already exists on the server", "--into NEWNAME")
    assert_one_line_error(env.pgvault("restore-dump", label, "--db", "app", "--into", "postgres"), 60,
                          "database 'postgres' already exists")
    assert env.pgvault("restore-dump", label).code == 2  # neither --db nor --globals: a usage error

    fake = env.scratch("fake bin")
    for tool in ("pg_dump", "pg_restore"):
        with open(os.path.join(fake, tool), "w") as f:
            f.write(f'#!/bin/sh\n[ "$1" = --version ] && echo "{tool} (PostgreSQL) 14.9" && exit 0\nexit 1\n')
        os.chmod(os.path.join(fake, tool), 0o755)
    old = env.write_config("old.toml", extra=f'bin_dir = "{fake}"')
    assert_one_line_error(env.pgvault("dump", config=old), 60,
                          f"pg_dump 14 ({fake}/pg_dump) cannot dump a PostgreSQL 15 server",
                          "set [postgres] bin_dir to PostgreSQL 15's bin directory")
    assert_one_line_error(env.pgvault("restore-dump", label, "--db", "app", "--into", "x", config=old), 60,
                          "pg_restore 14", "cannot restore into a PostgreSQL 15 server")
    assert "x" not in env.databases()
    empty = env.scratch("empty bin")
    assert_one_line_error(env.pgvault("dump", config=env.write_config("empty.toml", extra=f'bin_dir = "{empty}"')),
                          60, f"pg_dump not found in [postgres] bin_dir {empty}")

    down = env.write_config("down.toml", conninfo=f"host=127.0.0.1 port={free_port()} user=postgres "
                                                  "password=s3cret-pw dbname=postgres")
    for args in (("dump",), ("restore-dump", label, "--db", "app", "--into", "y"),
                 ("restore-dump", label, "--globals")):
        res = env.pgvault(*args, config=down)
        assert_one_line_error(res, 30, "cannot connect to PostgreSQL", "set [postgres] conninfo")
        assert "s3cret-pw" not in res.err
    assert len(env.listing()) == 1


@pytest.mark.integration
def test_a_dump_is_refused_while_a_backup_holds_the_vault_lock(pg_cluster, pg_tmp):
    """Dumps take the vault's backup lock: the leftovers cleanup can never remove a running job's objects."""
    from pgvault.backup.lock import BackupLock
    from tests.archive_env import make_archive_env
    from pgvault.config import load_settings
    from pgvault.context import storage_for

    env = make_archive_env(pg_cluster, pg_tmp, backend="local")
    storage = storage_for(load_settings(env.config, environ={}), create=False)
    held = BackupLock(storage, label="20261127T000000ZF", lock_dir=os.path.join(pg_tmp, "otherlock"))
    held.acquire()
    chown_tree(pg_tmp)  # the lock object root just wrote must not block postgres later
    try:
        res = env.pgvault("dump")
        assert res.code == 81
        assert "another backup or dump of this cluster is running: backup 20261127T000000ZF" in res.err
    finally:
        held.release()
    res = env.pgvault("dump")
    assert res.code == 0, res.err
