"""pgvault reseed and orphans on two real nodes: the founding story without a failover manager.

A is the primary, archiving through pgvault; B a streaming standby made with
pg_basebackup. B is cut off (primary_conninfo emptied), A takes more writes —
acknowledged, never replicated — and crashes. B is promoted onto timeline 2
and takes writes. Then `pgvault reseed --delta` rebuilds A from the vault as a
standby of B: A's tail past the fork point is kept under orphans/ (the fork LSN
is B's switch point, the commits and their time range are exactly A's
unreplicated rows), A streams from B and holds B's rows, not its own. Replaying
the orphan into a scratch node (the README's procedure) brings back exactly
A's rows. Point-in-time restores after the failover, on timeline 2 and on
timeline 1 before the fork, hold exactly the rows committed by their target.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import time
from datetime import UTC, timedelta

import pytest

from pgvault.targets import format_time
from pgvault.wal import format_lsn, parse_history
from tests.archive_env import archive_command, make_archive_env
from tests.clihelp import run_pgvault
from tests.fixtures.pgcluster import (
    PgFactory,
    as_pg_user,
    make_pg_owned_dir,
    pg_bindir,
)
from tests.test_pitr_oracle import archive_everything, between, check, restore_rows
from tests.test_restore import Restored

QUIET = "autovacuum = off\n"  # no background transactions: the commit counts are exact


def insert(cluster, ids, *, pause: float = 0.002) -> None:
    with cluster.connect() as conn:
        for i in ids:
            conn.execute("INSERT INTO o (id) VALUES (%s)", (i,))
            time.sleep(pause)


def commits(cluster) -> dict[int, object]:
    """id → commit time of every row."""
    return {r[0]: r[1] for r in cluster.sql("SELECT id, pg_xact_commit_timestamp(xmin) FROM o")}


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def make_standby(factory: PgFactory, primary, config: str):
    standby = factory.create_standby(primary, archive_command=archive_command(config), conf=QUIET)
    wait_for(lambda: standby.sql("SELECT status FROM pg_stat_wal_receiver") == [("streaming",)], "B to stream")
    return standby


def caught_up(standby, primary) -> bool:
    lsn = primary.one("SELECT pg_current_wal_lsn()::text")
    return standby.one("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)) is True


def wal_checksums(data_dir: str) -> dict[str, str]:
    out = {}
    wal = os.path.join(data_dir, "pg_wal")
    for name in os.listdir(wal):
        if len(name) == 24:
            with open(os.path.join(wal, name), "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def replay_orphan(env, orphan_id: str, *, timeline: int) -> set[int]:
    """The README's procedure: restore the old timeline into a scratch node, put the orphan in its pg_wal, start."""
    r = Restored("pgvault-orphan-replay-")
    try:
        res = run_pgvault("restore", "--to", "latest", "--timeline", str(timeline), "--data-dir", r.data_dir,
                          "--port", str(r.port), "--no-archive", config=env.config, timeout=300)
        assert res.code == 0, res.err
        res = run_pgvault("orphans", "fetch", orphan_id, os.path.join(r.data_dir, "pg_wal"), config=env.config)
        assert res.code == 0, res.err
        subprocess.run(["chown", "-R", "postgres:postgres", os.path.join(r.data_dir, "pg_wal")], check=True)
        log = os.path.join(r.base, "scratch.log")
        subprocess.run(as_pg_user([os.path.join(pg_bindir(), "pg_ctl"), "-D", r.data_dir, "-l", log, "-w",
                                   "-o", f"-k {r.base}", "start"]), check=True, capture_output=True, cwd=r.base)
        wait_for(lambda: r.sql("SELECT pg_is_in_recovery()") == [(False,)], "the scratch node to promote", 120)
        return {row[0] for row in r.sql("SELECT id FROM o")}
    finally:
        r.remove()


@pytest.fixture(scope="module")
def story(pg_template):
    """The failover story, run once; returns what each test checks."""
    factory = PgFactory(*pg_template)
    tmp = make_pg_owned_dir("pgvault-reseed-")
    try:
        yield _run_story(factory, tmp)
    finally:
        factory.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def _run_story(factory: PgFactory, tmp: str) -> dict:
    a = factory.create(conf=QUIET)
    env = make_archive_env(a, tmp, backend="local")
    a.sql("CREATE TABLE o (id int PRIMARY KEY)")
    insert(a, range(1, 51))
    res = env.pgvault("backup", "--json")
    assert res.code == 0, res.err
    b = make_standby(factory, a, env.config)

    insert(a, range(51, 151))  # replicated
    wait_for(lambda: caught_up(b, a), "B to replay A's rows")
    archive_everything(a)
    before_fork = commits(a)

    # B is cut off; A takes writes nobody else sees, then crashes
    b.sql("ALTER SYSTEM SET primary_conninfo = ''")
    b.reload()
    wait_for(lambda: b.sql("SELECT count(*) FROM pg_stat_wal_receiver") == [(0,)], "B's WAL receiver to stop")
    insert(a, range(151, 166))
    # A completes the segment holding the fork point and archives it, then goes on in the next one
    fork_segment = a.one("SELECT pg_walfile_name(pg_current_wal_lsn())")
    archive_everything(a)
    insert(a, range(166, 181))
    on_a = commits(a)
    a.stop(mode="immediate")
    a_wal = wal_checksums(a.data_dir)
    # …and its checkpoint would have removed that archived segment from pg_wal: reseed must find it in the vault
    os.remove(os.path.join(a.data_dir, "pg_wal", fork_segment))

    assert b.one("SELECT pg_promote()") is True
    insert(b, range(1001, 1101))
    archive_everything(b)
    with open(os.path.join(b.data_dir, "pg_wal", "00000002.history")) as f:
        switch = parse_history(f.read())[-1].switch_lsn

    refusals = {
        "no --delta": run_pgvault("reseed", "--data-dir", a.data_dir, "--primary-conninfo", b.conninfo,
                                  config=env.config),
        "the primary runs there": run_pgvault("reseed", "--data-dir", b.data_dir, "--primary-conninfo", b.conninfo,
                                              "--delta", config=env.config),
    }
    untouched = wal_checksums(a.data_dir) == {k: v for k, v in a_wal.items() if k != fork_segment}

    started = time.monotonic()
    res = run_pgvault("reseed", "--data-dir", a.data_dir, "--primary-conninfo", b.conninfo, "--delta",
                      "--slot", "node_a", "--json", config=env.config, timeout=600)
    reseed_seconds = time.monotonic() - started
    a.started = True  # running again (reseed started it): stopped at teardown
    assert res.code == 0, f"{res.err}\n{a.log()[-3000:]}"
    insert(b, range(2001, 2011))
    wait_for(lambda: caught_up(a, b), "A to replay B's new rows")
    on_b, rows_on_a = commits(b), {r[0] for r in a.sql("SELECT id FROM o")}
    again = run_pgvault("reseed", "--data-dir", a.data_dir, "--primary-conninfo", b.conninfo, "--delta", "--json",
                        config=env.config)
    listing = run_pgvault("orphans", "--json", config=env.config)
    refusals["a standby as the primary"] = run_pgvault(
        "reseed", "--data-dir", os.path.join(tmp, "new-node"), "--primary-conninfo", a.conninfo, config=env.config)
    # A, a standby of B now, stopped and reseeded again: on B's timeline, nothing past B's position, nothing kept
    a.stop()
    insert(b, range(3001, 3011))
    rerun = run_pgvault("reseed", "--data-dir", a.data_dir, "--primary-conninfo", b.conninfo, "--delta", "--json",
                        config=env.config, timeout=600)
    a.started = True
    wait_for(lambda: caught_up(a, b), "A to replay B's rows after the second reseed")
    listing_after = run_pgvault("orphans", "--json", config=env.config)
    return {"fork_segment": fork_segment, "refusals": refusals, "untouched": untouched, "rerun": rerun, "listing_after": listing_after,"a": a, "b": b, "env": env, "result": json.loads(res.out), "stderr": res.err, "switch": switch,
            "before_fork": before_fork, "on_a": on_a, "a_wal": a_wal, "on_b": on_b,
            "rows_on_a": rows_on_a, "again": again, "listing": listing,
            "reseed_seconds": reseed_seconds}


@pytest.mark.integration
def test_reseed_keeps_the_old_primarys_tail_and_makes_it_stream_from_the_new_one(story):
    result, on_a, before_fork = story["result"], story["on_a"], story["before_fork"]
    tail = {i: ts for i, ts in on_a.items() if i not in before_fork}
    assert sorted(tail) == list(range(151, 181))
    assert result["action"] == "reseeded"
    assert result["divergence"]["diverged"] is True
    assert result["divergence"]["fork_lsn"] == format_lsn(story["switch"])
    orphan = result["orphan"]
    assert orphan["newly_kept"] is True
    assert orphan["fork_lsn"] == format_lsn(story["switch"]) and orphan["fork_timeline"] == 1
    assert orphan["primary_timeline"] == 2
    assert orphan["commits"] == len(tail)  # exactly A's unreplicated transactions
    assert orphan["first_commit_time"] == min(tail.values()).astimezone(UTC).isoformat()
    assert orphan["last_commit_time"] == max(tail.values()).astimezone(UTC).isoformat()
    # each kept segment is A's pg_wal file as it was, byte for byte
    segments = orphan["segments"]
    assert [s["name"] for s in segments] == [story["fork_segment"], _next_segment(story["fork_segment"])]
    assert [s["source"] for s in segments] == ["vault", "pg_wal"]  # the first as A had archived it
    for seg in segments:
        assert story["a_wal"][seg["name"]] == seg["sha256"]
    # A is a standby of B through the slot, with B's rows and not its own
    assert result["streaming"]["status"] == "streaming" and result["streaming"]["received_timeline"] == 2
    assert result["streaming"]["slot_name"] == "node_a" and result["slot_created"] is True
    assert story["a"].one("SELECT pg_is_in_recovery()") is True
    assert story["rows_on_a"] == set(before_fork) | set(range(1001, 1101)) | set(range(2001, 2011))
    print(f"reseed took {story['reseed_seconds']:.1f} s")


@pytest.mark.integration
def test_a_healthy_standby_is_left_alone_and_the_orphan_is_listed(story):
    again = story["again"]
    assert again.code == 0, again.err
    assert json.loads(again.out)["action"] == "left-alone"
    assert story["listing"].code == 0, story["listing"].err
    kept = json.loads(story["listing"].out)["orphans"]
    assert [o["id"] for o in kept] == [story["result"]["orphan"]["id"]]
    text = run_pgvault("orphans", config=story["env"].config)
    assert text.code == 0 and "30 committed transactions" in text.out, text.out


@pytest.mark.integration
def test_replaying_the_orphan_brings_back_every_row_the_old_primary_acknowledged(story):
    rows = replay_orphan(story["env"], story["result"]["orphan"]["id"], timeline=1)
    check("the old timeline with its orphaned tail replayed", rows, set(story["on_a"]))


@pytest.mark.integration
def test_point_in_time_restores_after_the_failover_are_exact_on_both_timelines(story):
    rng = random.Random(20261127)
    on_b, before_fork = story["on_b"], story["before_fork"]
    env = story["env"]
    new = sorted(ts for i, ts in on_b.items() if 1001 <= i <= 1100)
    moment = between(rng, new[10], new[-10])
    _result, restored = restore_rows(env, format_time(moment))
    check(f"a time on timeline 2 ({format_time(moment)})", restored, {i for i, ts in on_b.items() if ts <= moment})
    old = sorted(ts for i, ts in before_fork.items() if 51 <= i <= 150)
    moment = between(rng, old[10], old[-10] - timedelta(milliseconds=1))
    _result, restored = restore_rows(env, format_time(moment), "--timeline", "1")
    check(f"a time on timeline 1 before the fork ({format_time(moment)})", restored,
          {i for i, ts in before_fork.items() if ts <= moment})


@pytest.mark.integration
def test_reseed_refuses_what_it_must_not_touch_and_keeps_nothing_when_nothing_diverged(story):
    refusals = story["refusals"]
    for what, expected in (("no --delta", "the directory is not empty"),
                           ("the primary runs there", "is not a healthy standby of the primary: it is not in recovery"),
                           ("a standby as the primary", "is a standby (in recovery), not the primary")):
        res = refusals[what]
        assert res.code == 100 and expected in res.err, (what, res.code, res.err)
    assert story["untouched"]  # the refused reseed changed nothing of A's WAL
    rerun = story["rerun"]
    assert rerun.code == 0, rerun.err
    again = json.loads(rerun.out)
    assert again["action"] == "reseeded" and again["orphan"] is None
    assert again["divergence"] == {"diverged": False, "fork_lsn": None, "fork_timeline": None}
    assert again["node"]["timeline"] == 2 and again["streaming"]["status"] == "streaming"
    assert [o["id"] for o in json.loads(story["listing_after"].out)["orphans"]] == [story["result"]["orphan"]["id"]]
    assert {r[0] for r in story["a"].sql("SELECT id FROM o")} >= set(range(3001, 3011))


def _next_segment(name: str) -> str:
    from pgvault.wal import parse_segment_name, segment_name

    tli, segno = parse_segment_name(name)
    return segment_name(tli, segno + 1)
