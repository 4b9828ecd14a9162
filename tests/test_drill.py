"""`pgvault drill` against a real cluster archiving into a local vault, and `pgvault status` showing it."""

from __future__ import annotations

import json
import os
import pwd
from datetime import UTC, datetime

import pytest

from pgvault.backup.manifest import list_backups
from pgvault.drill import Transaction, WalScan, newest_transaction, rpo_seconds
from tests.archive_env import make_archive_env
from tests.clihelp import run_pgvault
from tests.fixtures.pgcluster import PG_USER
from tests.test_verify import flip_byte

WALDUMP = """\
rmgr: Heap        len (rec/tot):     59/    59, tx:        740, lsn: 0/03000108, prev 0/030000D0, desc: INSERT off 3
rmgr: Transaction len (rec/tot):     34/    34, tx:        740, lsn: 0/03000148, prev 0/03000108, desc: COMMIT 2026-11-27 23:09:43.320950 UTC
rmgr: Transaction len (rec/tot):     34/    34, tx:        741, lsn: 0/03000170, prev 0/03000148, desc: ABORT 2026-11-27 23:09:44 UTC
rmgr: Standby     len (rec/tot):     50/    50, tx:          0, lsn: 0/03000198, prev 0/03000170, desc: RUNNING_XACTS
pg_waldump: error: error in WAL record at 0/30001D0: invalid record length at 0/3000208: wanted 24, got 0
"""


def test_the_newest_transaction_in_pg_waldump_output():
    assert newest_transaction(WALDUMP) == Transaction(0x03000170, datetime(2026, 11, 27, 23, 9, 44, tzinfo=UTC))
    assert newest_transaction(WALDUMP.replace("desc: ABORT 2026-11-27 23:09:44 UTC", "desc: RUNNING_XACTS")) == \
        Transaction(0x03000148, datetime(2026, 11, 27, 23, 9, 43, 320950, tzinfo=UTC))
    assert newest_transaction("rmgr: XLOG len (rec/tot): 114/114, tx: 0, lsn: 0/1, prev 0/0, desc: CHECKPOINT") is None


@pytest.mark.parametrize(("replayed_to", "reached", "rpo"), [
    (0x03000171, None, 0.0),  # replayed past it (or the backup holds it): nothing lost
    (0x03000170, datetime(2026, 11, 27, 23, 9, 40, tzinfo=UTC), 4.0),  # stopped before it: 4 s of commits lost
    (None, datetime(2026, 11, 27, 23, 9, 50, tzinfo=UTC), 0.0),
    (0x03000100, None, None),  # stopped before it and replayed no transaction: unknown, never "0"
])
def test_rpo(replayed_to, reached, rpo):
    newest = Transaction(0x03000170, datetime(2026, 11, 27, 23, 9, 44, tzinfo=UTC))
    assert rpo_seconds(WalScan(newest, None), replayed_to=replayed_to, reached_time=reached) == rpo


@pytest.mark.parametrize(("scanned_from", "replayed_to", "rpo"), [
    (0x03000000, 0x04000000, 0.0),  # no transaction in the WAL searched, and the restore got past its start
    (0x03000000, 0x03000000, 0.0),
    (0x03000000, 0x02FFFFFF, None),
    (None, 0x04000000, None),  # pg_waldump missing: unknown
    (0x03000000, None, None),
])
def test_rpo_when_the_search_found_no_transaction(scanned_from, replayed_to, rpo):
    assert rpo_seconds(WalScan(None, scanned_from), replayed_to=replayed_to, reached_time=None) == rpo


@pytest.fixture
def env(pg_tmp, pg_cluster):
    return make_archive_env(pg_cluster, pg_tmp, backend="local")


def amcheck_installed(cluster) -> bool:
    return cluster.one("SELECT count(*) FROM pg_available_extensions WHERE name = 'amcheck'") > 0


def scratch_of(env) -> str:
    return os.path.join(env.base, "spool", "main", "drill")


@pytest.mark.integration
@pytest.mark.slow
def test_a_drill_restores_the_newest_backup_checks_it_and_measures_rto_and_rpo(env):
    cluster = env.cluster
    cluster.sql("CREATE DATABASE app")
    cluster.sql("CREATE TABLE before_backup AS SELECT g AS id FROM generate_series(1, 1000) g")
    cluster.sql("CREATE MATERIALIZED VIEW not_yet AS SELECT 1 AS x WITH NO DATA")  # unreadable until refreshed
    res = env.pgvault("backup", "--json")
    assert res.code == 0, res.err
    label = json.loads(res.out)["label"]
    # after the backup: only the archived WAL brings these back
    cluster.sql("CREATE TABLE after_backup (id int PRIMARY KEY, v text)")
    cluster.sql("INSERT INTO after_backup SELECT g, md5(g::text) FROM generate_series(1, 2500) g")
    last_commit = cluster.one("SELECT now()")  # the commit time of the INSERT above is close to this
    env.wait_archived(env.switch())
    newest_commit = cluster.one("SELECT timestamp FROM pg_last_committed_xact()")

    res = env.pgvault("drill", "--json")
    assert res.code == 0, res.err
    drill = json.loads(res.out)
    assert drill["ok"] is True and drill["error"] is None and drill["backup"] == label
    by_name = {d["name"]: d for d in drill["databases"]}
    assert set(by_name) == {"postgres", "app", "template1"}
    assert by_name["postgres"]["tables"] == 3  # before_backup, after_backup and t (env.switch), not not_yet
    assert by_name["postgres"]["rows"] == 1000 + 2500 + 1
    assert by_name["app"] == {"name": "app", "tables": 0, "rows": 0}
    if amcheck_installed(cluster):
        assert drill["amcheck"].startswith("ok: ") and int(drill["amcheck"].split()[1]) > 0
    else:
        assert drill["amcheck"] == "skipped: the amcheck extension is not installed (postgresql-contrib)"
    assert 0 < drill["rto_seconds"] < 120
    # it replayed the whole archive: the newest archived transaction (env.switch's INSERT) is the last replayed
    assert drill["newest_archived_commit"] == newest_commit.isoformat()
    assert drill["reached_transaction_time"] == drill["newest_archived_commit"]
    assert drill["rpo_seconds"] == 0.0
    assert newest_commit >= last_commit
    assert drill["bytes_restored"] > 20 << 20
    assert "pgvault drill: restoring backup " in res.err
    assert os.listdir(scratch_of(env)) == []  # the scratch is gone, its server stopped
    assert list_backups(env.storage, keyring=None)[0].label == label  # nothing written into the vault
    assert not [k for k in env.archived_names() if k.startswith("00000002")]  # never archived a new timeline

    status = env.pgvault("status", "--json")
    assert status.code == 0, status.err
    report = json.loads(status.out)
    assert report["drill"] == drill
    assert report["role"] == "primary" and report["daemon"]["running"] is False
    assert report["backups"]["count"] == 1 and report["backups"]["last"]["label"] == label
    assert report["restorable_window"]["earliest"] is not None and report["errors"] == []
    text = env.pgvault("status")
    assert text.code == 0, text.err
    assert "drill       passed " in text.out and f"backup {label}, RTO " in text.out

    # as root, the way a person runs it: the server runs as the scratch directory's owner (postgres),
    # and the state file stays postgres's for the daemon to write next
    as_root = run_pgvault("drill", "--json", config=env.config)
    assert as_root.code == 0, as_root.err
    again = json.loads(as_root.out)
    assert again["ok"] and again["backup"] == label and again["rpo_seconds"] == 0.0
    assert again["databases"] == drill["databases"]
    state = os.path.join(env.base, "spool", "main", "daemon", "drill.json")
    assert pwd.getpwuid(os.stat(state).st_uid).pw_name == PG_USER
    assert os.listdir(scratch_of(env)) == []


@pytest.mark.integration
def test_a_failed_drill_is_an_error_with_its_reason_and_shows_in_status(env):
    res = env.pgvault("drill")
    assert res.code == 112, res.err
    assert res.err.splitlines() == [
        ("pgvault: error: drill failed: cannot restore to latest on timeline 1: no backup can be restored on "
        "timeline 1: the vault has no backups"),
        "HINT: a drill restores the newest backup and the WAL after it; `pgvault list` shows what the vault holds"]
    reason = res.err.split("pgvault: error: ", 1)[1].splitlines()[0]
    status = json.loads(env.pgvault("status", "--json").out)
    assert status["drill"]["ok"] is False and status["drill"]["error"] == reason
    metrics = env.pgvault("status", "--metrics")
    assert "pgvault_drill_last_success 0.0" in metrics.out.splitlines()


@pytest.mark.integration
@pytest.mark.slow
def test_a_corrupt_backup_object_fails_the_drill_and_leaves_no_scratch(env):
    res = env.pgvault("backup", "--json")
    assert res.code == 0, res.err
    label = json.loads(res.out)["label"]
    env.wait_archived(env.switch())
    data = sorted(i.key for i in env.storage.list(f"backups/{label}/data/"))
    flip_byte(os.path.join(env.base, "vault", "main", data[0]))
    res = env.pgvault("drill")
    assert res.code == 112, res.err
    assert "pgvault: error: drill failed: " in res.err and data[0].split("/")[-1] in res.err
    assert os.listdir(scratch_of(env)) == []
