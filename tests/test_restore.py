"""pgvault restore and plan: the delta materializer and recovery settings on plain files, then the commands
on real clusters (refusals, --delta on a damaged node, plan changes nothing, warnings)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import time

import pytest

from pgvault.backup.errors import BackupError
from pgvault.backup.manifest import Tablespace
from pgvault.backup.materialize import materialize_backup
from pgvault.errors import EXIT_CODES, CorruptObjectError
from pgvault.restore import (
    BLOCK_BEGIN,
    ConfSetting,
    RecoveryError,
    RestoreError,
    archive_warnings,
    effective_conf,
    pgvault_restore_command,
    read_conf,
    recovery_block_settings,
    write_recovery_settings,
)
from pgvault.storage.local import LocalStorage
from pgvault.targets import parse_target
from tests.clihelp import run_pgvault
from tests.fixtures.pgcluster import (
    as_pg_user,
    free_port,
    make_pg_owned_dir,
    pg_bindir,
    pgvault_executable,
)
from tests.test_backup_units import KIB, copy_dir, make_data_dir, tree

CHECKSUM = "SELECT count(*), md5(coalesce(string_agg(t::text, ',' ORDER BY id), '')) FROM {} t"


def test_restore_errors_have_their_own_exit_codes():
    assert (RestoreError.exit_code, RecoveryError.exit_code) == (90, 91)
    assert EXIT_CODES[RestoreError] == 90 and EXIT_CODES[RecoveryError] == 91
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)  # no code shared by two errors


# --- delta, on plain files --------------------------------------------------------------


def _backup_of_fake_dir(tmp_path):
    storage = LocalStorage(str(tmp_path / "vault"))
    data = str(tmp_path / "data")
    ts = str(tmp_path / "ts")
    make_data_dir(data, tablespace_dir=ts)
    with open(os.path.join(data, "base/1/16384"), "wb") as f:
        f.write(os.urandom(1000 * KIB))  # 16 blocks of 64 KiB, split across objects of 256 KiB
    manifest, _stats = copy_dir(storage, data, tmp_path, label="20261127T203000ZF",
                                tablespaces=(Tablespace(16400, ts),))
    return storage, manifest, ts


def _without_recovery_files(t):
    return {k: v for k, v in t.items() if k not in ("backup_label", "tablespace_map")}


def test_delta_fetches_only_the_damaged_blocks_and_removes_what_the_backup_lacks(tmp_path):
    storage, manifest, _ts = _backup_of_fake_dir(tmp_path)
    dest = str(tmp_path / "restored")
    ts = str(tmp_path / "ts2")
    first = materialize_backup(storage, manifest, dest, keyring=None, tmp_dir=str(tmp_path),
                               tablespace_map={16400: ts})
    assert first.files_fetched == first.files and not first.delta
    expected = tree(dest)

    big = os.path.join(dest, "base/1/16384")
    with open(big, "r+b") as f:  # one flipped byte in block 9 of 16
        f.seek(9 * 64 * KIB + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.truncate(os.path.join(dest, "base/1/1259"), 8192)  # cut short: extended again, then fetched
    os.remove(os.path.join(dest, "global/1262"))
    os.chmod(os.path.join(dest, "pg_xact/0000"), 0o600)  # only its mode is wrong (backed up as 0644)
    for extra in ("postmaster.pid", "base/1/99999", "pg_wal/000000010000000000000009",
                  "pg_wal/archive_status/000000010000000000000009.ready", os.path.join(ts, "PG_15_202209061/1/777")):
        with open(os.path.join(dest, extra), "wb") as f:
            f.write(b"not in the backup")
    os.makedirs(os.path.join(ts, "PG_14_201909212/1"))  # another version's directory in the same location
    with open(os.path.join(ts, "PG_14_201909212/1/1"), "wb") as f:
        f.write(b"not ours")
    os.makedirs(os.path.join(dest, "base/5/6"))  # a whole directory tree the backup does not have
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    os.symlink(outside, os.path.join(dest, "base/1/evil"))  # a link the backup does not have: removed, not followed
    shutil.rmtree(os.path.join(dest, "pg_stat_tmp"))
    with open(os.path.join(dest, "pg_stat_tmp"), "wb") as f:  # a file where a directory belongs
        f.write(b"x")

    seen = []
    result = materialize_backup(storage, manifest, dest, keyring=None, tmp_dir=str(tmp_path), delta=True,
                                progress=seen.append, tablespace_map={16400: ts})
    assert result.delta
    assert {k: v for k, v in tree(dest).items() if "PG_14_" not in k} == expected
    assert (outside / "precious").read_bytes() == b"keep me"
    assert os.path.exists(os.path.join(ts, "PG_14_201909212/1/1"))  # another version's directory is not ours
    assert os.stat(os.path.join(dest, "pg_xact/0000")).st_mode & 0o777 == 0o644
    assert (result.files_fetched, result.files_kept) == (3, result.files - 3)
    # block 9 of the big file (64 KiB), 1259 (one block of 24 KiB) and 1262 (deleted), nothing else
    assert result.bytes_written == 64 * KIB + 3 * 8192 + 8192
    assert result.entries_removed == 9  # the 7 above, and backup_label and tablespace_map (written anew)
    assert result.bytes_checked < result.bytes_total
    assert {p.phase for p in seen} == {"compare", "fetch"}
    assert os.listdir(os.path.join(dest, "pg_wal")) == ["archive_status"]
    assert os.listdir(os.path.join(dest, "pg_wal", "archive_status")) == []

    again = materialize_backup(storage, manifest, dest, keyring=None, tmp_dir=str(tmp_path), delta=True,
                               tablespace_map={16400: ts})
    assert (again.files_fetched, again.bytes_written, again.objects_read, again.entries_removed) == (0, 0, 0, 2)
    assert {k: v for k, v in tree(dest).items() if "PG_14_" not in k} == expected  # (the two removed: backup_label and tablespace_map, written again)


def test_delta_into_an_empty_directory_is_a_full_restore_and_a_damaged_block_is_still_caught(tmp_path):
    storage, manifest, _ts = _backup_of_fake_dir(tmp_path)
    moved = str(tmp_path / "moved")
    dest = str(tmp_path / "restored")
    result = materialize_backup(storage, manifest, dest, keyring=None, delta=True, tablespace_map={16400: moved})
    assert not result.delta and result.files_fetched == result.files
    with open(os.path.join(dest, "base/1/16384"), "r+b") as f:
        f.write(b"\0" * 1000 * KIB)
    # the objects holding its blocks are damaged in the vault: the delta must not write them
    data_dir = os.path.join(str(tmp_path / "vault"), "backups", manifest.label, "data")
    for name in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, name)
        with open(path, "rb") as f:
            blob = bytearray(f.read())
        blob[len(blob) // 2] ^= 0xFF
        os.chmod(path, 0o644)
        with open(path, "wb") as f:
            f.write(blob)
    with pytest.raises(CorruptObjectError):
        materialize_backup(storage, manifest, dest, keyring=None, delta=True, tablespace_map={16400: moved})


def test_delta_refuses_a_tablespace_location_that_is_not_this_directorys(tmp_path):
    storage, manifest, ts = _backup_of_fake_dir(tmp_path)
    dest = str(tmp_path / "restored")
    other = str(tmp_path / "other")
    materialize_backup(storage, manifest, dest, keyring=None, tablespace_map={16400: other})
    # the backup's own location (ts) holds the original's tablespace, and dest's link points elsewhere
    before = tree(ts)
    with pytest.raises(BackupError, match=r"the tablespace 16400 location .*/ts is not empty; refusing to write "
                                          r"into it \(.*pg_tblspc/16400 does not point to it"):
        materialize_backup(storage, manifest, dest, keyring=None, delta=True)
    assert tree(ts) == before
    # relocated to where its link points: fine, and the original location is never touched
    materialize_backup(storage, manifest, dest, keyring=None, delta=True, tablespace_map={16400: other})
    assert tree(ts) == before


# --- recovery settings and configuration ----------------------------------------------


def test_write_recovery_settings_replaces_the_block_and_drops_stale_targets(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "postgresql.auto.conf").write_text(
        "# Do not edit this file manually!\nport = 5432\nrecovery_target_xid = '123'\n"
        f"{BLOCK_BEGIN} (old)\nrestore_command = 'old'\nrecovery_target = 'immediate'\n# pgvault restore: end\n"
        "Recovery_Target_Name='x'\nwork_mem = '8MB'")
    (data / "standby.signal").write_text("")
    write_recovery_settings(str(data), {"restore_command": "'new'", "recovery_target_time": "'2026-11-27T03:15:00+00:00'"},
                            comment="c")
    assert (data / "postgresql.auto.conf").read_text() == (
        "# Do not edit this file manually!\nport = 5432\nwork_mem = '8MB'\n"
        f"{BLOCK_BEGIN} (c)\nrestore_command = 'new'\nrecovery_target_time = '2026-11-27T03:15:00+00:00'\n"
        "# pgvault restore: end\n")
    assert (data / "recovery.signal").exists() and not (data / "standby.signal").exists()
    assert os.stat(data / "postgresql.auto.conf").st_mode & 0o777 == 0o600


def test_config_reading_follows_includes_and_finds_archiving_into_the_vault(tmp_path):
    data = tmp_path / "data"
    (data / "conf.d").mkdir(parents=True)
    (data / "postgresql.conf").write_text(
        "archive_mode = off\ninclude_dir 'conf.d'\ninclude = 'missing.conf'  # PostgreSQL would fail; we go on\n"
        "recovery_target_name = 'old point' # a comment\nrecovery_min_apply_delay = '5min'\n")
    (data / "conf.d" / "10-archive.conf").write_text("archive_mode on\n")
    (data / "postgresql.auto.conf").write_text(
        "archive_command = '\"/opt/pgvault venv/bin/pgvault\" --config \"/etc/pgvault/pgvault.toml\" wal-push \"%p\"'\n")
    conf = effective_conf(str(data))
    assert conf["archive_mode"] == ConfSetting("on", str(data / "conf.d" / "10-archive.conf"), 1)
    assert conf["archive_command"].value == '"/opt/pgvault venv/bin/pgvault" --config "/etc/pgvault/pgvault.toml" wal-push "%p"'
    assert conf["recovery_target_name"].value == "old point"
    (warning,) = archive_warnings(conf, config_path="/etc/pgvault/pgvault.toml")
    assert warning.startswith("the restored configuration archives through pgvault into this vault: archive_mode = on (")
    assert "once promoted, this node pushes the WAL of a new timeline there" in warning
    (other,) = archive_warnings(conf, config_path="/etc/other.toml")
    assert "into the vault of /etc/pgvault/pgvault.toml" in other
    assert archive_warnings(conf | {"archive_mode": ConfSetting("off", "x", 1)}, config_path=None) == []
    assert archive_warnings(conf | {"archive_library": ConfSetting("basic_archive", "x", 1)}, config_path=None) == []
    assert read_conf(str(tmp_path / "absent.conf")) == {}

    from pgvault.planner import CatalogSnapshot, plan_restore
    from tests.test_planner import backup, segs

    snapshot = CatalogSnapshot(backups=(backup("20261127T040000ZF", 1, "0/1000028", "0/1000100", "04:01:00"),),
                               wal=segs(1, range(1, 10)))
    plan = plan_restore(snapshot, parse_target("2026-11-27T04:03:30+00:00"))
    settings, notes = recovery_block_settings(plan, restore_command="cmd", pause=True, port=6543,
                                              disable_archiving=True, conf=conf)
    assert settings == {
        "restore_command": "'cmd'", "recovery_target_name": "''",
        "recovery_target_time": "'2026-11-27T04:03:30+00:00'", "recovery_target_inclusive": "'true'",
        "recovery_target_timeline": "'1'", "recovery_target_action": "'pause'", "recovery_min_apply_delay": "0",
        "port": "6543", "archive_mode": "'off'"}
    assert notes == [f"recovery_target_name = 'old point' ({data / 'postgresql.conf'} line 4) is reset to ''",
                     f"recovery_min_apply_delay = '5min' ({data / 'postgresql.conf'} line 5) is reset to 0"]


def test_restore_command_quotes_for_the_shell_and_escapes_percent():
    assert pgvault_restore_command("/usr/bin/pgvault", "/etc/pgvault/pgvault.toml") == (
        "/usr/bin/pgvault --config /etc/pgvault/pgvault.toml wal-fetch %f %p")
    assert pgvault_restore_command("/opt/my venv/pgvault", "/etc/100%/it's.toml") == (
        "'/opt/my venv/pgvault' --config '/etc/100%%/it'\"'\"'s.toml' wal-fetch %f %p")
    assert pgvault_restore_command("/usr/bin/pgvault", None) == "/usr/bin/pgvault wal-fetch %f %p"


# --- the commands, on real clusters ---------------------------------------------------------

pytest_integration = pytest.mark.integration


def restore_cli(env, *args, timeout=600):
    """`pgvault restore` as root (it gives the files to postgres and starts the server as postgres)."""
    return run_pgvault("restore", "--timeout", "240", *args, config=env.config, timeout=timeout)


def stop_server(data_dir):
    subprocess.run(as_pg_user([os.path.join(pg_bindir(), "pg_ctl"), "-D", data_dir, "-m", "immediate", "-w", "stop"]),
                   capture_output=True)


class Restored:
    """A postgres-owned directory holding a restore's data directory; its server is stopped at the end."""

    def __init__(self, prefix="pgvault-restored-"):
        self.base = make_pg_owned_dir(prefix)
        self.data_dir = os.path.join(self.base, "data")
        self.port = free_port()

    def connect(self):
        import psycopg

        return psycopg.connect(f"host={self.base} port={self.port} user=postgres dbname=postgres", autocommit=True)

    def sql(self, query, params=None):
        with self.connect() as conn:
            return conn.execute(query, params).fetchall()

    def stop(self):
        stop_server(self.data_dir)

    def remove(self):
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def restored():
    made = []

    def make():
        r = Restored()
        made.append(r)
        return r

    yield make
    for r in made:
        r.remove()


@pytest.fixture
def local_env(pg_tmp, pg_cluster):
    from tests.archive_env import make_archive_env

    return make_archive_env(pg_cluster, pg_tmp, backend="local")


def backup(env, *args):
    res = env.pgvault("backup", "--json", *args)
    assert res.code == 0, res.err
    return json.loads(res.out)


def archive_now(env):
    env.wait_archived(env.cluster.one("SELECT pg_walfile_name(pg_switch_wal())"))


def vault_listing(env):
    root = os.path.join(env.base, "vault")
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest_integration
def test_plan_json_changes_nothing_and_shows_the_settings(local_env):
    env, cluster = local_env, local_env.cluster
    cluster.sql("CREATE TABLE p AS SELECT g AS id FROM generate_series(1, 100) g")
    full = backup(env)
    cluster.sql("INSERT INTO p VALUES (101)")
    archive_now(env)
    before = vault_listing(env)
    res = env.pgvault("plan", "--to", "latest", "--json")
    assert res.code == 0, res.err
    plan = json.loads(res.out)
    assert plan["backup"]["label"] == full["label"] and plan["timeline"] == 1
    assert plan["recovery_settings"] == {"recovery_target_timeline": "'1'"}
    assert plan["restore_command"] == f"'{pgvault_executable()} --config ''{env.config}'' wal-fetch %f %p'"
    assert plan["recovery_target_action"] == "'promote'"
    assert plan["wal"]["segments"] >= 1 and plan["bytes_to_fetch"] > 0
    text = env.pgvault("plan", "--to", "lsn:" + cluster.one("SELECT pg_current_wal_lsn()::text"))
    # the current position is not archived yet: the planner says why, with the window
    assert text.code == 71 and "cannot restore to lsn:" in text.err and "the restorable window is" in text.err
    text = env.pgvault("plan", "--to", "immediate")
    assert text.code == 0, text.err
    assert f"backup    {full['label']}" in text.out and "settings  recovery_target = 'immediate'" in text.out
    assert "  restore   restore_command = '" in text.out
    assert env.pgvault("plan", "--to", "yesterday").code == 70
    assert vault_listing(env) == before


@pytest_integration
def test_refusals_leave_the_directory_untouched(local_env, restored, tmp_path):
    env, cluster = local_env, local_env.cluster
    backup(env)
    archive_now(env)

    # a running server's own directory, even with --delta
    listing = {p: file_digest(os.path.join(cluster.data_dir, p)) for p in ("PG_VERSION", "global/pg_control")}
    res = restore_cli(env, "--to", "latest", "--data-dir", cluster.data_dir, "--delta")
    assert res.code == 90, res.err
    assert (f"pgvault: error: refusing to restore into {cluster.data_dir}: a PostgreSQL server is running there "
            f"({cluster.data_dir}/postmaster.pid names process ") in res.err
    assert "HINT: stop that server first" in res.err
    assert {p: file_digest(os.path.join(cluster.data_dir, p)) for p in listing} == listing

    # a stale postmaster.pid whose socket still answers (the server runs in another pid namespace, say)
    r = restored()
    os.makedirs(r.data_dir)
    with open(os.path.join(cluster.data_dir, "postmaster.pid")) as f:
        lines = f.read().splitlines()
    with open(os.path.join(r.data_dir, "postmaster.pid"), "w") as f:
        f.write("\n".join(["999999999"] + lines[1:]) + "\n")
    res = restore_cli(env, "--to", "latest", "--data-dir", r.data_dir, "--delta")
    assert res.code == 90 and f"a server answers on {cluster.base}/.s.PGSQL.{cluster.port}" in res.err
    assert os.listdir(r.data_dir) == ["postmaster.pid"]

    # a non-empty directory without --delta
    os.remove(os.path.join(r.data_dir, "postmaster.pid"))
    with open(os.path.join(r.data_dir, "mine"), "w") as f:
        f.write("x")
    res = restore_cli(env, "--to", "latest", "--data-dir", r.data_dir)
    assert res.code == 90
    assert f"pgvault: error: refusing to restore into {r.data_dir}: the directory is not empty" in res.err
    assert "pass --delta to rebuild it in place" in res.err
    assert os.listdir(r.data_dir) == ["mine"]

    # a delta over another cluster's directory
    other = restored()
    subprocess.run(as_pg_user(["cp", "-a", cluster.data_dir, other.data_dir]), check=True)
    os.remove(os.path.join(other.data_dir, "postmaster.pid"))
    with open(os.path.join(other.data_dir, "global", "pg_control"), "r+b") as f:
        f.write(b"\x01\x02\x03\x04\x05\x06\x07\x08")
    res = restore_cli(env, "--to", "latest", "--data-dir", other.data_dir, "--delta")
    assert res.code == 90 and "it holds the cluster with system identifier 578437695752307201" in res.err

    # an unreachable target: exit 71 before the directory is even created
    absent = os.path.join(r.base, "absent")
    res = restore_cli(env, "--to", "2001-01-01T00:00:00+00:00", "--data-dir", absent)
    assert res.code == 71 and "it is before the earliest restorable point" in res.err
    assert not os.path.exists(absent)
    os.remove(os.path.join(r.data_dir, "mine"))
    res = restore_cli(env, "--to", "2001-01-01T00:00:00+00:00", "--data-dir", r.data_dir, "--delta")
    assert res.code == 71 and os.listdir(r.data_dir) == []

    res = restore_cli(env, "--to", "latest", "--data-dir", absent, "--pause")
    assert res.code == 90 and "--pause needs a recovery target" in res.err and not os.path.exists(absent)


@pytest_integration
def test_warns_about_archiving_into_the_same_vault(local_env, restored):
    env = local_env
    label = backup(env)["label"]
    archive_now(env)
    r = restored()
    res = restore_cli(env, "--to", "immediate", "--data-dir", r.data_dir, "--json")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    (warning,) = result["warnings"]
    assert warning.startswith("the restored configuration archives through pgvault into this vault: archive_mode = on")
    assert f"WARNING: {warning}" in res.err
    assert result["plan"]["backup"] == label and result["started"] is False and result["owner"] == "postgres"
    assert result["recovery_settings"]["recovery_target"] == "'immediate'"
    assert result["recovery_settings"]["recovery_target_action"] == "'promote'"
    assert os.path.exists(os.path.join(r.data_dir, "recovery.signal"))
    st = os.stat(r.data_dir)
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.stat(r.base).st_uid != 0

    quiet = restored()
    res = restore_cli(env, "--to", "immediate", "--data-dir", quiet.data_dir, "--no-archive")
    assert res.code == 0, res.err
    assert "WARNING" not in res.err and "  archive_mode = 'off'" in res.out


def damage(data_dir, relations):
    """Truncate the first relation file, flip bytes in the second, delete the third."""
    truncated, flipped, deleted = (os.path.join(data_dir, p) for p in relations)
    os.truncate(truncated, os.path.getsize(truncated) // 3)
    with open(flipped, "r+b") as f:
        f.seek(8192 * 3 + 100)
        f.write(b"\xde\xad\xbe\xef")
    os.remove(deleted)


@pytest_integration
@pytest.mark.slow
def test_delta_rebuilds_a_damaged_node_fetching_only_what_differs(local_env, restored):
    env, cluster = local_env, local_env.cluster
    for name in ("a", "b", "c"):
        cluster.sql(f"CREATE TABLE {name} AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 60000) g")
    cluster.sql("VACUUM (FREEZE, ANALYZE)")
    expected = [cluster.sql(CHECKSUM.format(n)) for n in ("a", "b", "c")]
    paths = [cluster.one(f"SELECT pg_relation_filepath('{n}')") for n in ("a", "b", "c")]
    backup(env)
    archive_now(env)

    r = restored()
    res = restore_cli(env, "--to", "latest", "--data-dir", r.data_dir, "--no-archive", "--port", str(r.port), "--json")
    assert res.code == 0, res.err
    first = json.loads(res.out)
    damage(r.data_dir, paths)
    res = restore_cli(env, "--to", "latest", "--data-dir", r.data_dir, "--delta", "--no-archive",
                      "--port", str(r.port), "--start", "--json")
    assert res.code == 0, res.err
    delta = json.loads(res.out)
    assert delta["delta"] and delta["files"] == first["files"]
    # only the three relation files: postgresql.auto.conf, cut back to its size, lost the pgvault block
    # appended to it and matches again; recovery.signal (not in the backup) was removed
    assert delta["files_fetched"] == 3 and delta["files_kept"] == first["files"] - 3
    a, _b, c = (os.path.getsize(os.path.join(cluster.data_dir, p)) for p in paths)
    # what was cut off a (and its last intact block), one block of b, all of c: 256 KiB blocks
    assert c + (a - a // 3) < delta["bytes_fetched"] <= c + (a - a // 3) + 2 * 256 * 1024
    assert delta["entries_removed"] == 2  # recovery.signal and backup_label, written anew
    assert delta["reached"]["state"] == "promoted" and delta["reached"]["timeline"] == 2
    assert [r.sql(CHECKSUM.format(n)) for n in ("a", "b", "c")] == expected

    # and again after the node ran (promoted onto timeline 2, its own WAL in pg_wal): same data back
    r.stop()
    damage(r.data_dir, paths)
    started = time.monotonic()
    res = restore_cli(env, "--to", "latest", "--data-dir", r.data_dir, "--delta", "--no-archive",
                      "--port", str(r.port), "--start", "--json")
    assert res.code == 0, res.err
    again = json.loads(res.out)
    assert again["files_kept"] > again["files"] // 2 and again["entries_removed"] > 0
    assert [r.sql(CHECKSUM.format(n)) for n in ("a", "b", "c")] == expected
    assert time.monotonic() - started < 60


@pytest_integration
def test_an_incremental_chain_from_an_s3_vault_and_a_server_that_refuses_our_socket(pg_tmp, pg_cluster, s3_bucket,
                                                                                    restored):
    from tests.archive_env import make_archive_env

    env = make_archive_env(pg_cluster, pg_tmp, backend="s3", s3=s3_bucket)
    cluster = env.cluster
    # the restored server will take no password-less socket connection (the tests' own go over TCP)
    with open(os.path.join(cluster.data_dir, "pg_hba.conf"), "w") as f:
        f.write("local all all scram-sha-256\nhost all all 127.0.0.1/32 trust\n")
    cluster.reload()
    cluster.sql("CREATE TABLE s AS SELECT g AS id FROM generate_series(1, 5000) g")
    full = backup(env)
    cluster.sql("UPDATE s SET id = -id WHERE id <= 100")
    incr = backup(env, "--type", "incr")
    assert incr["parent"] == full["label"]
    cluster.sql("INSERT INTO s VALUES (0)")
    expected = cluster.sql(CHECKSUM.format("s"))
    archive_now(env)

    r = restored()
    res = restore_cli(env, "--to", "latest", "--data-dir", r.data_dir, "--no-archive", "--port", str(r.port),
                      "--start", "--json")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["plan"]["chain"] == [full["label"], incr["label"]]
    assert result["reached"] == {"state": "promoted", "timeline": 2, "lsn": None, "replay_lsn": None,
                                 "last_transaction_time": None, "last_commit_xid": None, "last_commit_time": None}
    (warning,) = result["warnings"]
    assert warning.startswith("cannot connect to the restored server to read the point it reached: ")
    assert "password" in warning
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={r.port} user=postgres dbname=postgres") as conn:
        assert conn.execute(CHECKSUM.format("s")).fetchall() == expected
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)


@pytest_integration
def test_a_target_postgresql_never_meets_exits_91(local_env, restored):
    env, cluster = local_env, local_env.cluster
    backup(env)
    cluster.sql("CREATE TABLE n (id int)")
    archive_now(env)
    r = restored()
    res = restore_cli(env, "--to", "name:never made", "--data-dir", r.data_dir, "--no-archive", "--port", str(r.port),
                      "--start")
    assert res.code == 91, res.err
    log = os.path.join(r.base, f"restore-{os.listdir(os.path.join(env.base, 'vault', 'main', 'backups'))[0]}.log")
    assert (f"pgvault: error: PostgreSQL did not reach the target name:never made: recovery ended before the "
            f"configured recovery target was reached, and the server stopped (log: {log})") in res.err
    assert "HINT: the archived WAL ends before the target" in res.err
    with open(log) as f:
        assert "recovery ended before configured recovery target was reached" in f.read()


@pytest_integration
def test_a_read_only_file_restores_as_its_owner_with_its_mode(local_env, restored):
    """A 0400 file (a server.key kept in the data directory) restored and delta-restored by postgres, not root."""
    env, cluster = local_env, local_env.cluster
    key_path = os.path.join(cluster.data_dir, "server.key")
    with open(key_path, "wb") as f:
        f.write(b"-----BEGIN PRIVATE KEY-----\n" + os.urandom(900))
    owner = os.stat(cluster.data_dir)
    os.chown(key_path, owner.st_uid, owner.st_gid)
    os.chmod(key_path, 0o400)
    with open(key_path, "rb") as f:
        key = f.read()
    backup(env)
    archive_now(env)
    r = restored()
    res = env.pgvault("restore", "--to", "latest", "--data-dir", r.data_dir, "--no-archive")
    assert res.code == 0, res.err
    restored_key = os.path.join(r.data_dir, "server.key")
    assert stat.S_IMODE(os.stat(restored_key).st_mode) == 0o400
    with open(restored_key, "rb") as f:
        assert f.read() == key
    os.chmod(restored_key, 0o600)
    with open(restored_key, "r+b") as f:  # damaged, and read-only again: delta must still fix it
        f.write(b"X")
    os.chmod(restored_key, 0o400)
    res = env.pgvault("restore", "--to", "latest", "--data-dir", r.data_dir, "--no-archive", "--delta")
    assert res.code == 0, res.err
    assert stat.S_IMODE(os.stat(restored_key).st_mode) == 0o400
    with open(restored_key, "rb") as f:
        assert f.read() == key


def test_find_pg_ctl_takes_the_backups_major_and_names_the_others_it_saw(tmp_path):
    from pgvault.restore import RestoreError, find_pg_ctl
    from tests.fixtures.pgcluster import pg_bindir

    real = find_pg_ctl(bin_dir=pg_bindir(), major=15)
    assert real == os.path.join(pg_bindir(), "pg_ctl")
    other = tmp_path / "pg_ctl"  # what an old install's pg_ctl answers
    other.write_text("#!/bin/sh\necho 'pg_ctl (PostgreSQL) 14.9'\n")
    other.chmod(0o755)
    with pytest.raises(RestoreError, match=f"no pg_ctl of PostgreSQL 15 .*: {other} is PostgreSQL 14"):
        find_pg_ctl(bin_dir=str(tmp_path), major=15)
