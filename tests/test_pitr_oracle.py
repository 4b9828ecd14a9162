"""The correctness oracle of point-in-time restore: every restore holds exactly the rows committed up to its target.

A workload commits one row per transaction, without pause, while WAL is archived
through pgvault; a full backup, more writes, an incremental, more writes. At the
end the source tells each row's commit time (track_commit_timestamp) and xid.
Then `pgvault restore --to T --start` into a fresh directory, for targets of
every kind, and the restored rows must be exactly the rows whose commit is at or
before the target: times between the backups (random, and exactly on a commit:
targets are inclusive), each backup's consistency time, after the incremental;
an LSN, a restore point and the full backup's consistency point (`immediate`)
taken while the workload paused, so the row set is known; xids (inclusive);
`latest`. Then a failover: a standby made with pg_basebackup, archiving through
the same vault, is promoted onto timeline 2 and takes writes; a time on
timeline 2 and a time before the fork with --timeline 1 restore exactly too.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest

from pgvault.targets import format_time
from tests.archive_env import archive_command, make_archive_env
from tests.clihelp import run_pgvault
from tests.test_restore import Restored

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Workload(threading.Thread):
    """Inserts rows 1, 2, 3, … one transaction each, until stopped; can pause between transactions."""

    def __init__(self, cluster, *, first_id: int = 1, delay: float = 0.003) -> None:
        super().__init__(daemon=True)
        self.cluster, self.delay = cluster, delay
        self.next_id = first_id
        self.committed = first_id - 1
        self.error: BaseException | None = None
        self._halt, self._pause, self._paused = threading.Event(), threading.Event(), threading.Event()

    def run(self) -> None:
        try:
            with self.cluster.connect() as conn:
                while not self._halt.is_set():
                    if self._pause.is_set():
                        self._paused.set()
                        time.sleep(0.002)
                        continue
                    conn.execute("INSERT INTO o (id) VALUES (%s)", (self.next_id,))
                    self.committed = self.next_id
                    self.next_id += 1
                    time.sleep(self.delay)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    @contextmanager
    def paused(self):
        """Nothing commits inside; yields the last committed id."""
        self._paused.clear()
        self._pause.set()
        assert self._paused.wait(30), "the workload did not pause"
        try:
            yield self.committed
        finally:
            self._pause.clear()

    def stop(self) -> int:
        self._halt.set()
        self.join()
        assert self.error is None, self.error
        return self.committed


def backup(env, *args) -> dict:
    res = env.pgvault("backup", "--json", *args)
    assert res.code == 0, res.err
    return json.loads(res.out)


def commits(cluster) -> list[tuple[int, datetime, int]]:
    """(id, commit time, xid) of every row, in commit order."""
    return [(r[0], r[1], int(r[2])) for r in cluster.sql(
        "SELECT id, pg_xact_commit_timestamp(xmin), xmin::text::bigint FROM o ORDER BY id")]


def archive_everything(cluster, timeout: float = 60) -> None:
    """Switch WAL and wait until the segment just completed is archived (primary or promoted standby)."""
    name = cluster.one("SELECT pg_walfile_name(pg_switch_wal())")
    deadline = time.monotonic() + timeout
    while (cluster.one("SELECT last_archived_wal FROM pg_stat_archiver") or "") < name:
        assert time.monotonic() < deadline, f"{name} not archived: {cluster.log()[-2000:]}"
        time.sleep(0.1)


def restore_rows(env, target: str, *extra: str) -> tuple[dict, set[int]]:
    """`pgvault restore --to target --start` into a fresh directory; the result record and the restored ids."""
    r = Restored("pgvault-oracle-")
    try:
        res = run_pgvault("restore", "--to", target, "--data-dir", r.data_dir, "--port", str(r.port), "--start",
                          "--no-archive", "--json", "--timeout", "240", *extra, config=env.config, timeout=300)
        if res.code != 0:
            logs = [os.path.join(r.base, n) for n in os.listdir(r.base) if n.endswith(".log")]
            tail = ""
            for path in logs:
                with open(path) as f:
                    tail += f.read()[-3000:]
            raise AssertionError(f"restore to {target} failed ({res.code}): {res.err}\n{tail}")
        return json.loads(res.out), {row[0] for row in r.sql("SELECT id FROM o")}
    finally:
        r.remove()


def check(what: str, restored: set[int], expected: set[int]) -> None:
    missing, extra = sorted(expected - restored), sorted(restored - expected)
    assert not missing and not extra, (
        f"{what}: {len(restored)} rows restored, {len(expected)} expected; missing {missing[:5]}"
        f"{'…' if len(missing) > 5 else ''}, extra {extra[:5]}{'…' if len(extra) > 5 else ''}")


def up_to(rows, moment: datetime) -> set[int]:
    return {i for i, ts, _xid in rows if ts <= moment}


def check_time(env, rows, moment: datetime, what: str, *, backup: dict, extra: tuple[str, ...] = (),
               timeline: int = 1) -> None:
    result, restored = restore_rows(env, format_time(moment), *extra)
    expected = up_to(rows, moment)
    check(f"{what} ({format_time(moment)})", restored, expected)
    assert result["plan"]["backup"] == backup["label"], (what, result["plan"])
    reached = result["reached"]
    assert reached["state"] == "promoted" and reached["timeline"] > timeline
    newest_expected = max(ts for i, ts, _x in rows if i in expected)
    if reached["last_transaction_time"] is None:  # nothing committed from the backup's start to the target
        assert newest_expected < datetime.fromisoformat(backup["start_time"]), (what, reached)
    else:
        assert newest_expected <= datetime.fromisoformat(reached["last_transaction_time"]) <= moment, (what, reached)


def between(rng: random.Random, a: datetime, b: datetime) -> datetime:
    return a + timedelta(microseconds=rng.randrange(1, int((b - a) / timedelta(microseconds=1))))


def test_every_restore_holds_exactly_the_rows_committed_up_to_its_target(pg_tmp, pg_factory):
    rng = random.Random(os.environ.get("PGVAULT_ORACLE_SEED", "20261127"))
    primary = pg_factory.create()
    env = make_archive_env(primary, pg_tmp, backend="local")
    primary.sql("CREATE TABLE o (id int PRIMARY KEY)")
    work = Workload(primary)
    work.start()
    time.sleep(1)
    with work.paused() as at_full:  # nothing commits during the full backup: `immediate` is exact
        full = backup(env)
    time.sleep(2)
    incr = backup(env, "--type", "incr")  # the workload runs through this one
    assert incr["type"] == "incr" and incr["parent"] == full["label"]
    time.sleep(1.5)
    with work.paused() as at_lsn:
        lsn = primary.one("SELECT pg_current_wal_lsn()::text")
    time.sleep(0.5)
    with work.paused() as at_name:
        primary.sql("SELECT pg_create_restore_point('oracle point')")
    time.sleep(1.5)
    last_id = work.stop()
    archive_everything(primary)
    rows = commits(primary)
    assert [i for i, _ts, _x in rows] == list(range(1, last_id + 1))

    full_stop, incr_start, incr_stop = (datetime.fromisoformat(v) for v in (
        full["stop_time"], incr["start_time"], incr["stop_time"]))
    after_incr = [r for r in rows if r[1] > incr_stop + timedelta(milliseconds=200)]
    between_backups = [r for r in rows if full_stop < r[1] < incr_start]
    assert len(between_backups) > 100 and len(after_incr) > 100

    # times
    for n in range(2):
        check_time(env, rows, between(rng, full_stop, incr_start), f"a random time between the backups #{n + 1}",
                   backup=full)
    on_commit = rng.choice(between_backups)[1]
    check_time(env, rows, on_commit, "exactly a commit's time (inclusive)", backup=full)
    check_time(env, rows, full_stop, "the full backup's consistency time", backup=full)
    check_time(env, rows, incr_stop, "the incremental's consistency time", backup=incr)
    check_time(env, rows, between(rng, incr_stop, after_incr[-1][1]), "a random time after the incremental",
               backup=incr)

    # LSN, restore point (paused workload, with --pause for one), immediate
    result, restored = restore_rows(env, f"lsn:{lsn}")
    check(f"lsn:{lsn}", restored, set(range(1, at_lsn + 1)))
    assert result["plan"]["backup"] == incr["label"]
    r = Restored("pgvault-oracle-")
    try:
        res = run_pgvault("restore", "--to", "name:oracle point", "--data-dir", r.data_dir, "--port", str(r.port),
                          "--start", "--pause", "--no-archive", "--json", "--timeout", "240", config=env.config,
                          timeout=300)
        assert res.code == 0, res.err
        paused = json.loads(res.out)
        assert paused["reached"]["state"] == "paused" and paused["reached"]["timeline"] == 1
        assert r.sql("SELECT pg_is_in_recovery(), pg_get_wal_replay_pause_state()") == [(True, "paused")]
        check("name:oracle point (paused at it)", {row[0] for row in r.sql("SELECT id FROM o")},
              set(range(1, at_name + 1)))
    finally:
        r.remove()
    result, restored = restore_rows(env, "immediate", "--backup", full["label"])
    check("immediate (the full backup)", restored, set(range(1, at_full + 1)))

    # xids: inclusive; one before the incremental needs the older backup
    xid_row = rng.choice(after_incr[:-50])
    result, restored = restore_rows(env, f"xid:{xid_row[2]}")
    check(f"xid:{xid_row[2]} (row {xid_row[0]})", restored, set(range(1, xid_row[0] + 1)))
    xid_row = rng.choice(between_backups)
    result, restored = restore_rows(env, f"xid:{xid_row[2]}", "--backup", full["label"])
    check(f"xid:{xid_row[2]} (row {xid_row[0]}) from the full backup", restored, set(range(1, xid_row[0] + 1)))

    # latest: everything archived
    result, restored = restore_rows(env, "latest")
    check("latest", restored, set(range(1, last_id + 1)))

    # --- a failover: a standby takes over on timeline 2 and archives through the same vault
    standby = pg_factory.create_standby(primary, archive_command=archive_command(env.config))
    work = Workload(primary, first_id=last_id + 1)
    work.start()
    time.sleep(2.5)
    last_id = work.stop()
    archive_everything(primary)
    end = primary.one("SELECT pg_current_wal_lsn()")
    deadline = time.monotonic() + 60
    while standby.one("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(end),)) is not True:
        assert time.monotonic() < deadline, "the standby did not catch up"
        time.sleep(0.1)
    rows_tl1 = commits(primary)
    primary.stop()
    assert standby.one("SELECT pg_promote()") is True
    assert standby.one("SELECT timeline_id FROM pg_control_checkpoint()") in (1, 2)
    work = Workload(standby, first_id=last_id + 1)
    work.start()
    time.sleep(2.5)
    work.stop()
    archive_everything(standby)
    rows_tl2 = commits(standby)
    assert standby.one("SELECT pg_walfile_name(pg_current_wal_lsn())").startswith("00000002")

    fork = [r for r in rows_tl1 if r[0] > rows[-1][0]]
    check_time(env, rows_tl1, between(rng, fork[0][1], fork[-1][1] - timedelta(milliseconds=200)),
               "a time on timeline 1 before the fork (--timeline 1)", backup=incr,
               extra=("--timeline", "1"))
    on_tl2 = [r for r in rows_tl2 if r[0] > last_id]
    assert len(on_tl2) > 100
    check_time(env, rows_tl2, between(rng, on_tl2[0][1], on_tl2[-1][1] - timedelta(milliseconds=200)),
               "a time on timeline 2", backup=incr, timeline=2)
