"""`pgvault init`, `check`, `config` and `key` through the real console script, on a real cluster."""

import json
import os
import shutil

import pytest

from tests.clihelp import run_pgvault, write_config
from tests.fixtures.pgcluster import pgvault_executable

pytestmark = pytest.mark.integration


def config_for(pg_tmp, cluster, *, extra="", url=None):
    url = url or f"file://{pg_tmp}/vault"
    return write_config(os.path.join(pg_tmp, "pgvault.toml"), f"""
[vault]
url = "{url}"
[postgres]
conninfo = "{cluster.conninfo}"
data_dir = "{cluster.data_dir}"
{extra}
""")


def test_help_and_version_list_every_command():
    res = run_pgvault("--help")
    assert res.code == 0
    for command in ("init", "check", "config", "key"):
        assert f"  {command} " in res.out
    res = run_pgvault("--version")
    assert res.code == 0 and res.out.startswith("pgvault, version ")


def test_init_creates_record_and_is_idempotent(pg_cluster, pg_tmp):
    cfg = config_for(pg_tmp, pg_cluster)
    first = run_pgvault("init", "--json", config=cfg, as_postgres=True)
    assert first.code == 0, first.err
    data = json.loads(first.out)
    assert data["created"] is True
    assert data["record"]["system_identifier"] == str(pg_cluster.system_identifier())
    assert data["record"]["pg_major_version"] == 15
    assert data["record"]["encryption_key_id"] is None
    assert os.path.exists(os.path.join(pg_tmp, "vault", "main", "vault.json"))

    again = run_pgvault("init", config=cfg, as_postgres=True)
    assert again.code == 0, again.err
    assert "already initialized for this cluster; nothing changed" in again.out


def test_init_refuses_a_vault_of_another_cluster(pg_factory, pg_tmp):
    first = pg_factory.create()
    other = pg_factory.create(fresh=True)  # initdb again: a different system identifier
    assert first.system_identifier() != other.system_identifier()
    assert run_pgvault("init", config=config_for(pg_tmp, first), as_postgres=True).code == 0
    res = run_pgvault("init", config=config_for(pg_tmp, other), as_postgres=True)
    assert res.code == 25
    assert f"belongs to the cluster with system identifier {first.system_identifier()}" in res.err
    assert f"this server's is {other.system_identifier()}" in res.err
    assert "Traceback" not in res.err


def test_init_without_server_reads_the_control_file(pg_cluster, pg_tmp):
    sysid = pg_cluster.system_identifier()
    pg_cluster.stop()
    res = run_pgvault("init", "--json", config=config_for(pg_tmp, pg_cluster), as_postgres=True)
    assert res.code == 0, res.err
    assert json.loads(res.out)["record"]["system_identifier"] == str(sysid)


def test_check_reports_each_item_and_fails_on_archive_command(pg_cluster, pg_tmp):
    cfg = config_for(pg_tmp, pg_cluster)
    assert run_pgvault("init", config=cfg, as_postgres=True).code == 0
    res = run_pgvault("check", config=cfg, as_postgres=True)
    assert res.code == 50
    assert "✓ vault reachable and writable" in res.out
    assert "✓ PostgreSQL reachable" in res.out
    assert "✓ vault initialized for this cluster" in res.out
    assert "✓ wal_level: wal_level = replica" in res.out
    assert "✓ archive_mode" in res.out
    assert "✗ archive_command: archive_command = '/bin/false'" in res.out
    assert f"hint: set archive_command = '{'pgvault --config ' + cfg + ' wal-push %p'}'" in res.out

    assert "✓ encryption key: off: the vault is not encrypted and [encryption] key_file is not set" in res.out

    # a relative --config: the hint names the file wherever the server runs the command from
    res = run_pgvault("check", config="pgvault.toml", as_postgres=True, cwd=pg_tmp)
    assert f"hint: set archive_command = 'pgvault --config {cfg} wal-push %p'" in res.out

    # mentioning pgvault is not enough: the server must run it
    pg_cluster.set(archive_command=f"true # {pgvault_executable()} --config {cfg} wal-push %p")
    pg_cluster.reload()
    res = run_pgvault("check", config=cfg, as_postgres=True)
    assert res.code == 50
    assert "does not run pgvault wal-push %p" in res.out

    pg_cluster.set(archive_command=f"{pgvault_executable()} --config {cfg} wal-push %p")
    pg_cluster.reload()
    res = run_pgvault("check", "--json", config=cfg, as_postgres=True)
    assert res.code == 0, res.out
    items = json.loads(res.out)["items"]
    assert all(i["ok"] for i in items) and len(items) == 9


def test_check_on_unreachable_vault_and_postgres(pg_tmp):
    cfg = write_config(os.path.join(pg_tmp, "c.toml"), """
[vault]
url = "s3://no-such-bucket/x"
endpoint_url = "http://127.0.0.1:9"
access_key_id = "k"
secret_access_key = "s3cr3t-never-shown"
[postgres]
conninfo = "host=127.0.0.1 port=9 connect_timeout=2"
""")
    res = run_pgvault("check", config=cfg)
    assert res.code == 50
    assert "✗ vault reachable and writable" in res.out
    assert "✗ PostgreSQL reachable" in res.out
    # what depends on them is listed too, as not checked
    for name in ("vault initialized for this cluster", "encryption key"):
        assert f"✗ {name}: not checked\n    hint: could not be checked: the vault is not reachable" in res.out
    for name in ("wal_level", "archive_mode", "archive_command", "WAL archiving"):
        assert f"✗ {name}: not checked\n    hint: could not be checked: PostgreSQL is not reachable" in res.out
    assert "8 of 9 checks failed" in res.err
    assert "s3cr3t-never-shown" not in res.out + res.err


def test_config_errors_are_one_line_without_traceback(tmp_path):
    cfg = write_config(str(tmp_path / "bad.toml"), '[vault]\nurl = "ftp://host/x"\n')
    expected = "expected a URL file:///absolute/path or s3://bucket/optional/prefix"
    res = run_pgvault("init", config=cfg)
    assert res.code == 10
    assert res.err.splitlines()[0] == (
        f"pgvault: error: {cfg}: [vault] url = 'ftp://host/x': unknown scheme 'ftp'; {expected}")
    assert "Traceback" not in res.err
    res = run_pgvault("config", config=cfg)
    assert res.code == 10 and "unknown scheme 'ftp'" in res.err
    res = run_pgvault("check", config=cfg)
    assert res.code == 50
    assert f"✗ config valid: {cfg}: [vault] url = 'ftp://host/x': unknown scheme 'ftp'; {expected}" in res.out
    assert "✗ vault reachable and writable: not checked" in res.out
    res = run_pgvault("init", env={"PGVAULT_VAULT_URL": "ftp://x/y"})
    assert res.code == 10
    assert res.err.splitlines()[0] == (
        f"pgvault: error: environment variable PGVAULT_VAULT_URL = 'ftp://x/y': unknown scheme 'ftp'; {expected}")
    res = run_pgvault("init", env={"PGVAULT_VAULT_CLUSTER": "my cluster"})
    assert res.code == 10
    assert res.err.startswith("pgvault: error: environment variable PGVAULT_VAULT_CLUSTER = 'my cluster': expected a name")

    cfg = write_config(str(tmp_path / "bad2.toml"), "[compression]\nlevel = 99\n")
    res = run_pgvault("check", config=cfg)
    assert res.code == 50
    assert f"✗ config valid: {cfg}: [compression] level = 99: expected an integer from 1 to 19" in res.out

    res = run_pgvault("--debug", "init", config=cfg)
    assert res.code == 10 and "Traceback" in res.err


def test_config_shows_effective_settings_without_secrets(tmp_path):
    cfg = write_config(str(tmp_path / "c.toml"), '[vault]\nsecret_access_key = "hunter2"\n')
    res = run_pgvault("config", "--json", config=cfg, env={"PGVAULT_VAULT_CLUSTER": "east"})
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["vault"]["cluster"] == "east"
    assert data["vault"]["secret_access_key"] == "********"
    assert "hunter2" not in res.out


def test_encrypted_init_and_key_file_permissions(pg_cluster, pg_tmp):
    key_file = os.path.join(pg_tmp, "master.key")
    res = run_pgvault("key", "generate", key_file, as_postgres=True)
    assert res.code == 0, res.err
    assert oct(os.stat(key_file).st_mode & 0o777) == "0o600"
    cfg = config_for(pg_tmp, pg_cluster, extra=f'[encryption]\nkey_file = "{key_file}"\n')
    res = run_pgvault("init", "--json", config=cfg, as_postgres=True)
    assert res.code == 0, res.err
    assert json.loads(res.out)["record"]["encryption_key_id"]

    os.chmod(key_file, 0o644)
    res = run_pgvault("check", config=cfg, as_postgres=True)
    assert res.code == 50
    assert "✗ encryption key" in res.out and "chmod 600" in res.out


def test_init_and_every_writer_refuse_a_config_that_disagrees_with_the_vault_record(pg_cluster, pg_tmp):
    key_file = os.path.join(pg_tmp, "master.key")
    assert run_pgvault("key", "generate", key_file, as_postgres=True).code == 0
    plain = config_for(pg_tmp, pg_cluster)
    keyed = write_config(os.path.join(pg_tmp, "keyed.toml"),
                         open(plain).read() + f'[encryption]\nkey_file = "{key_file}"\n')
    vault = os.path.join(pg_tmp, "vault", "main")
    wal = os.path.join(pg_cluster.data_dir, "pg_wal", pg_cluster.one("SELECT pg_walfile_name(pg_current_wal_lsn())"))

    # an unencrypted vault, then a key configured: init changes nothing and says why
    assert run_pgvault("init", config=plain, as_postgres=True).code == 0
    res = run_pgvault("init", config=keyed, as_postgres=True)
    assert res.code == 11
    assert res.err.splitlines()[0] == (f"pgvault: error: the vault file://{vault} is not encrypted (its record was "
                                       f"created without a key), but [encryption] key_file is set ({key_file})")
    assert res.err.splitlines()[1].startswith("HINT: remove [encryption] key_file")
    assert not os.path.exists(os.path.join(vault, "keys"))  # no vault key written
    res = run_pgvault("check", config=keyed, as_postgres=True)
    assert res.code == 50 and "✗ encryption key: the vault file://" in res.out
    res = run_pgvault("wal-push", wal, config=keyed, as_postgres=True)
    assert res.code == 11 and not os.path.exists(os.path.join(vault, "wal"))
    new_key = os.path.join(pg_tmp, "new.key")
    assert run_pgvault("key", "generate", new_key, as_postgres=True).code == 0
    res = run_pgvault("key", "rotate", "--new-key-file", new_key, config=keyed, as_postgres=True)
    assert res.code == 11 and "is not encrypted" in res.err
    assert not os.path.exists(os.path.join(vault, "keys"))

    # an encrypted vault, then the key left out: nothing is written in plaintext
    shutil.rmtree(vault)
    res = run_pgvault("init", "--json", config=keyed, as_postgres=True)
    assert res.code == 0, res.err
    key_id = json.loads(res.out)["record"]["encryption_key_id"]
    res = run_pgvault("init", config=plain, as_postgres=True)
    assert res.code == 11
    assert res.err.splitlines()[0] == (f"pgvault: error: the vault file://{vault} is encrypted (vault key {key_id}), "
                                       "but no encryption key is configured ([encryption] key_file is not set)")
    res = run_pgvault("check", config=plain, as_postgres=True)
    assert res.code == 50 and f"✗ encryption key: the vault file://{vault} is encrypted" in res.out
    res = run_pgvault("wal-push", wal, config=plain, as_postgres=True)
    assert res.code == 11  # PostgreSQL keeps the segment and retries
    assert not os.path.exists(os.path.join(vault, "wal"))
    res = run_pgvault("init", config=keyed, as_postgres=True)  # the agreeing config: still a no-op
    assert res.code == 0 and "nothing changed" in res.out
