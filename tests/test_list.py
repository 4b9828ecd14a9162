"""`pgvault list`: backups, dumps, WAL per timeline and the restorable window, as a user sees them."""

import json

import pytest

from tests.archive_env import make_archive_env

pytestmark = pytest.mark.integration


def test_list_shows_backup_wal_and_window(pg_cluster, pg_tmp):
    env = make_archive_env(pg_cluster, pg_tmp, backend="local")
    empty = env.listing()
    assert empty["backups"] == [] and empty["dumps"] == []
    assert empty["restorable_window"]["intervals"] == []

    res = env.pgvault("backup", "--json")
    assert res.code == 0, res.err
    label = json.loads(res.out)["label"]
    env.wait_archived(env.switch())
    res = env.pgvault("dump", "--db", "postgres")
    assert res.code == 0, res.err

    data = env.listing()
    (backup,) = data["backups"]
    assert backup["label"] == label and backup["type"] == "full" and backup["timeline"] == 1
    assert backup["vault_bytes"] > 0 and backup["database_bytes"] > backup["vault_bytes"]
    (dump,) = data["dumps"]
    assert dump["databases"] == ["postgres"]
    window = data["restorable_window"]
    assert window["timeline"] == 1
    (interval,) = window["intervals"]
    assert interval["start"]["backup"] == label
    assert interval["end"]["time"] >= backup["stop_time"]

    text = env.pgvault("list")
    assert text.code == 0
    assert f"  {label}  full" in text.out
    assert "restorable window (timeline 1): " in text.out
