"""The daemon's scheduler with an injected clock (no sleeping), its config keys, and the daemon's pure parts."""

from __future__ import annotations

import io
import json
import random
from datetime import UTC, datetime, timedelta

import pytest

from pgvault.config import load_settings
from pgvault.daemon import EventLog, JobRun, role_allows
from pgvault.errors import (
    EXIT_CODES,
    ConfigError,
    DaemonAlreadyRunningError,
    DaemonError,
    DrillError,
)
from pgvault.schedule import (
    Decision,
    JobQueue,
    JobSchedule,
    ScheduleConfig,
    Scheduler,
    next_time,
    parse_duration,
    previous_time,
    schedule_config,
)
from pgvault.status import DrillRecord, JobRecord, StateStore, StatusReport, archive_lag
from tests.asserts import raises_exactly


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC) if "+" not in text else datetime.fromisoformat(text)


def config(*jobs: tuple[str, str], tz: str = "UTC", catch_up: float = 3600, jitter: float = 0) -> ScheduleConfig:
    return ScheduleConfig(jobs=tuple(JobSchedule(j, c) for j, c in jobs), timezone=tz, catch_up=catch_up, jitter=jitter)


def runs(decisions: list[Decision]) -> list[tuple[str, str, str]]:
    return [(d.job, d.action, d.scheduled_for.isoformat()) for d in decisions]


# --- durations and cron moments ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("0", 0), ("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("1.5h", 5400), ("14d", 14 * 86400),
    ("2w", 14 * 86400), ("250ms", 0.25), (" 3 h ", 10800),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1y", "-1h", "1h30m", "soon"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("cron", "after", "expected"), [
    ("0 2 * * *", "2026-11-27T01:59:59", "2026-11-27T02:00:00+00:00"),
    ("0 2 * * *", "2026-11-27T02:00:00", "2026-11-28T02:00:00+00:00"),  # strictly after
    ("*/15 * * * *", "2026-11-27T10:07:00", "2026-11-27T10:15:00+00:00"),
    ("* * * * * */10", "2026-11-27T10:00:03", "2026-11-27T10:00:10+00:00"),  # seconds, croniter's 6th field
    ("0 3 * * 0", "2026-11-27T12:00:00", "2026-11-29T03:00:00+00:00"),  # Sunday
])
def test_next_time_in_utc(cron, after, expected):
    assert next_time(cron, at(after), "UTC").isoformat() == expected


def test_local_time_across_daylight_saving():
    # 02:00 in Berlin is 01:00 UTC in winter and 00:00 UTC in summer; on 2026-03-29 02:00 does not exist
    assert next_time("0 2 * * *", at("2026-01-10T12:00:00"), "Europe/Berlin") == at("2026-01-11T01:00:00")
    assert next_time("0 2 * * *", at("2026-07-10T12:00:00"), "Europe/Berlin") == at("2026-07-11T00:00:00")
    assert next_time("30 3 * * *", at("2026-03-28T12:00:00"), "Europe/Berlin") == at("2026-03-29T01:30:00")


def test_previous_time_includes_the_moment_itself():
    assert previous_time("0 2 * * *", at("2026-11-27T02:00:00"), "UTC") == at("2026-11-27T02:00:00")
    assert previous_time("0 2 * * *", at("2026-11-27T01:59:59"), "UTC") == at("2026-11-26T02:00:00")


# --- the scheduler -------------------------------------------------------------------------------


def test_jobs_fall_due_at_their_times_and_move_on():
    s = Scheduler(config(("full", "0 2 * * *"), ("incremental", "0 * * * *")))
    assert s.start(at("2026-11-27T00:30:00"), {}) == []
    assert s.next_wakeup() == at("2026-11-27T01:00:00")
    assert s.due(at("2026-11-27T00:59:59")) == []
    assert runs(s.due(at("2026-11-27T01:00:00"))) == [("incremental", "run", "2026-11-27T01:00:00+00:00")]
    assert s.due(at("2026-11-27T01:00:01")) == []
    # both at 02:00: in JOBS order, full first
    assert runs(s.due(at("2026-11-27T02:00:00.5"))) == [("full", "run", "2026-11-27T02:00:00+00:00"),
                                                         ("incremental", "run", "2026-11-27T02:00:00+00:00")]
    assert s.upcoming() == {"full": at("2026-11-28T02:00:00"), "incremental": at("2026-11-27T03:00:00")}


def test_a_job_due_while_it_still_runs_is_skipped_with_a_reason():
    s = Scheduler(config(("incremental", "0 * * * *")))
    s.start(at("2026-11-27T00:30:00"), {})
    (first,) = s.due(at("2026-11-27T01:00:00"))
    assert first.action == "run"
    (second,) = s.due(at("2026-11-27T02:00:00"), busy={"incremental"})
    assert (second.action, second.reason) == ("skip", "its previous run is still running or waiting to run")
    (third,) = s.due(at("2026-11-27T03:00:00"), busy={"full"})  # another job running does not matter here
    assert third.action == "run"


def test_runs_missed_while_busy_or_suspended_coalesce_into_one():
    s = Scheduler(config(("incremental", "0 * * * *")))
    s.start(at("2026-11-27T00:30:00"), {})
    # the clock jumps five hours (suspended machine): one run, then the next hour
    assert runs(s.due(at("2026-11-27T05:10:00"))) == [("incremental", "run", "2026-11-27T01:00:00+00:00")]
    assert s.next_wakeup() == at("2026-11-27T06:00:00")


@pytest.mark.parametrize(("last_started", "now", "caught"), [
    ("2026-11-26T02:00:05", "2026-11-27T02:40:00", ["full"]),  # missed 02:00 by 40 min: within 1h
    ("2026-11-26T02:00:05", "2026-11-27T03:00:00", ["full"]),  # exactly the catch-up limit
    ("2026-11-26T02:00:05", "2026-11-27T03:00:01", []),  # too late: wait for tomorrow
    ("2026-11-27T02:00:01", "2026-11-27T02:40:00", []),  # it did run at 02:00
    (None, "2026-11-27T02:40:00", []),  # never ran under a daemon: nothing was missed
])
def test_catch_up_of_a_run_missed_while_the_daemon_was_down(last_started, now, caught):
    s = Scheduler(config(("full", "0 2 * * *")))
    last = {"full": at(last_started)} if last_started else {}
    assert s.start(at(now), last) == caught
    decisions = s.due(at(now))
    if caught:
        assert [(d.job, d.action, d.catch_up, d.scheduled_for) for d in decisions] == [
            ("full", "run", True, at("2026-11-27T02:00:00"))]
        assert s.next_wakeup() == at("2026-11-28T02:00:00")
    else:
        assert decisions == []
        assert s.next_wakeup() == at("2026-11-28T02:00:00")


def test_catch_up_zero_turns_it_off():
    s = Scheduler(config(("full", "0 2 * * *"), catch_up=0))
    assert s.start(at("2026-11-27T02:00:01"), {"full": at("2026-11-26T02:00:00")}) == []


def test_jitter_delays_within_its_bound_and_keeps_the_scheduled_moment():
    s = Scheduler(config(("incremental", "0 * * * *"), jitter=300), rng=random.Random(7))
    s.start(at("2026-11-27T00:30:00"), {})
    wake = s.next_wakeup()
    assert at("2026-11-27T01:00:00") < wake <= at("2026-11-27T01:05:00")
    assert s.due(wake - timedelta(microseconds=1)) == []
    assert runs(s.due(wake)) == [("incremental", "run", "2026-11-27T01:00:00+00:00")]
    again = Scheduler(config(("incremental", "0 * * * *"), jitter=300), rng=random.Random(7))
    again.start(at("2026-11-27T00:30:00"), {})
    assert again.next_wakeup() == wake  # the random source is injected: reproducible


def test_reschedule_keeps_unchanged_jobs_and_restarts_changed_ones():
    s = Scheduler(config(("full", "0 2 * * *"), ("dump", "0 4 * * *")))
    s.start(at("2026-11-27T00:30:00"), {})
    s.reschedule(config(("full", "0 2 * * *"), ("dump", "30 0 * * *"), ("verify", "0 5 * * *")),
                 at("2026-11-27T01:00:00"))
    assert s.upcoming() == {"full": at("2026-11-27T02:00:00"), "dump": at("2026-11-28T00:30:00"),
                            "verify": at("2026-11-27T05:00:00")}
    s.reschedule(config(("verify", "0 5 * * *")), at("2026-11-27T01:00:00"))
    assert set(s.upcoming()) == {"verify"}


def test_nothing_scheduled():
    s = Scheduler(config())
    assert s.start(at("2026-11-27T00:00:00")) == [] and s.next_wakeup() is None and s.due(at("2030-01-01T00:00:00")) == []


def test_queue_runs_one_job_at_a_time_in_order():
    q = JobQueue()
    d = {job: Decision(job, "run", at("2026-11-27T02:00:00")) for job in ("full", "dump", "drill")}
    q.add(d["full"])
    q.add(d["dump"])
    q.add(Decision("drill", "skip", at("2026-11-27T02:00:00"), reason="x"))  # a skip never queues
    assert q.busy() == {"full", "dump"}
    assert q.take() == d["full"] and q.take() is None  # one at a time
    assert q.busy() == {"full", "dump"} and q.waiting() == ["dump"]
    q.finished()
    assert q.take() == d["dump"]
    q.finished()
    q.add(d["drill"])
    assert q.clear() == ["drill"] and q.take() is None and q.busy() == set()


def test_schedule_config_from_settings():
    settings = load_settings(None, environ={"PGVAULT_SCHEDULE_FULL": "0 2 * * 0", "PGVAULT_SCHEDULE_DRILL": "0 6 * * *",
                                             "PGVAULT_SCHEDULE_CATCH_UP": "30m", "PGVAULT_SCHEDULE_JITTER": "2m",
                                             "PGVAULT_SCHEDULE_TIMEZONE": "Europe/Berlin"})
    c = schedule_config(settings.schedule)
    assert c == ScheduleConfig(jobs=(JobSchedule("full", "0 2 * * 0"), JobSchedule("drill", "0 6 * * *")),
                               timezone="Europe/Berlin", catch_up=1800, jitter=120)
    default = load_settings(None, environ={})
    assert schedule_config(default.schedule).jobs == () and default.metrics.listen == "127.0.0.1:9187"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("full", "0 25 * * *", ('expected a cron expression: 5 fields (minute hour day month weekday, e.g. "0 2 * * *"), '
                           'or 6 with seconds last (e.g. "* * * * * */30")')),
    ("drill", "every night", "expected a cron expression"),
    ("timezone", "Mars/Olympus", 'expected an IANA time zone such as "UTC" or "Europe/Berlin"'),
    ("catch_up", "1 hour", 'expected a duration such as "0", "90s", "30m", "1h" or "1d"'),
    ("jitter", "-5s", 'expected a duration such as "0", "90s", "30m", "1h" or "1d"'),
])
def test_bad_schedule_keys_are_named(tmp_path, key, value, expected):
    path = tmp_path / "pgvault.toml"
    path.write_text(f"[schedule]\n{key} = {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), environ={})
    assert str(info.value).startswith(f"{path}: [schedule] {key} = {value!r}: {expected}")


@pytest.mark.parametrize("listen", ["9187", "localhost", "127.0.0.1:99999", ":x"])
def test_bad_metrics_address(tmp_path, listen):
    path = tmp_path / "pgvault.toml"
    path.write_text(f'[metrics]\nlisten = "{listen}"\n')
    with raises_exactly(ConfigError, f'{path}: [metrics] listen = {listen!r}: expected HOST:PORT '
                                     '(e.g. "127.0.0.1:9187"), or "" for none'):
        load_settings(str(path), environ={})


def test_metrics_can_be_turned_off(tmp_path):
    path = tmp_path / "pgvault.toml"
    path.write_text('[metrics]\nlisten = ""\n')
    assert load_settings(str(path), environ={}).metrics.listen == ""


# --- the daemon's pure parts -----------------------------------------------------------------------


@pytest.mark.parametrize(("backup_from", "role", "allowed", "why"), [
    ("primary", "primary", True, ""),
    ("primary", "standby", False, 'this node is a standby and [backup] from = "primary"'),
    ("standby", "standby", True, ""),
    ("standby", "primary", False, 'this node is a primary and [backup] from = "standby"'),
    ("any", "primary", True, ""),
    ("any", "standby", False, ('this node is a standby and [backup] from = "any" (the daemon runs jobs on the '
                              'primary; set "standby" to run them on the standby)')),
])
def test_exactly_one_node_of_a_pair_runs_the_jobs(backup_from, role, allowed, why):
    assert role_allows(backup_from, role) == (allowed, why)


def test_event_log_is_one_line_per_event_in_either_format():
    clock = lambda: at("2026-11-27T02:00:00.123")
    text, js = io.StringIO(), io.StringIO()
    EventLog("text", text, clock)("job_started", "full: started\nsecond line?", job="full")
    EventLog("json", js, clock)("job_started", "full: started", job="full", pid=42)
    assert text.getvalue() == "2026-11-27T02:00:00.123Z info    full: started | second line?\n"
    assert json.loads(js.getvalue()) == {"time": "2026-11-27T02:00:00.123Z", "level": "info", "event": "job_started",
                                         "message": "full: started", "job": "full", "pid": 42}
    assert js.getvalue().count("\n") == 1


def test_job_results_give_bytes_and_errors():
    run = JobRun(decision=Decision("full", "run", at("2026-11-27T02:00:00")), cmd=["x"], log=EventLog("text", io.StringIO()))
    run.stdout, run.exit_code = json.dumps({"label": "L", "bytes_stored": 1234}), 0
    assert run.bytes_stored() == 1234 and run.error() is None
    run.stdout = json.dumps({"globals": {"stored_size": 10}, "databases": [{"stored_size": 5}, {"stored_size": 7}]})
    assert run.bytes_stored() == 22
    run.stdout, run.exit_code = "", 81
    run.errors = ["pgvault: error: another backup or dump of this cluster is running", "HINT: wait"]
    assert run.bytes_stored() is None and run.error() == "another backup or dump of this cluster is running"
    run.errors = []
    assert run.error() == "exited with code 81"


def test_job_records_count_successes_failures_and_skips():
    rec = JobRecord("full").started(at("2026-11-27T02:00:00"))
    rec = rec.finished(at("2026-11-27T02:01:00"), exit_code=0, seconds=60.0, bytes_stored=100, error=None)
    rec = rec.finished(at("2026-11-28T02:01:00"), exit_code=82, seconds=5.0, bytes_stored=None, error="WAL late")
    rec = rec.skipped(at("2026-11-29T02:00:00"), "this node is a standby")
    assert (rec.runs, rec.failures, rec.skips) == (2, 1, 1)
    assert rec.last_success == "2026-11-27T02:01:00+00:00" and rec.last_failure == "2026-11-28T02:01:00+00:00"
    assert (rec.last_bytes, rec.last_error, rec.last_exit_code) == (100, "WAL late", 82)


def test_state_files_round_trip_and_tolerate_garbage(tmp_path):
    store = StateStore(str(tmp_path / "state"))
    assert store.read_jobs() == {} and store.read_drill() is None
    jobs = {"full": JobRecord("full", last_success="2026-11-27T02:01:00+00:00", runs=3)}
    store.write_jobs(jobs)
    assert store.read_jobs() == jobs
    drill = DrillRecord(ok=True, started_at="a", finished_at="b", backup="L", rto_seconds=4.5, rpo_seconds=0.0,
                        databases=({"name": "postgres", "tables": 1, "rows": 2},))
    store.write_drill(drill)
    assert store.read_drill() == drill
    (tmp_path / "state" / "jobs.json").write_text("{torn")
    assert store.read_jobs() == {}
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["drill.json", "jobs.json"]  # no temp files


@pytest.mark.parametrize(("current", "archived", "lag"), [
    ("000000010000000000000010", "00000001000000000000000F", 0),
    ("000000010000000000000010", "00000001000000000000000A", 5),
    ("000000020000000100000002", "0000000200000000000000FF", 2),  # across a log file boundary
    (None, "00000001000000000000000F", None),  # a standby writes no segment
    ("000000010000000000000010", None, None),  # nothing archived yet
    ("000000010000000000000010", "00000001000000000000000F.partial", 0),
])
def test_archive_lag(current, archived, lag):
    assert archive_lag(current, archived, segment_size=16 << 20) == lag


def test_metrics_of_a_report():
    from pgvault.metrics import render

    now = at("2026-11-27T03:00:00")
    report = StatusReport(
        collected_at=now, cluster="main", daemon_pid=1234, role="primary", backups=2,
        jobs={"full": JobRecord("full", last_success="2026-11-27T02:01:00+00:00", last_duration_seconds=61.5,
                                last_bytes=4096, last_exit_code=0, runs=1),
              "incremental": JobRecord("incremental", skips=3, last_failure="2026-11-27T02:30:00+00:00",
                                       last_exit_code=82, runs=1, failures=1)},
        drill=DrillRecord(ok=True, started_at="2026-11-27T02:50:00+00:00", finished_at="2026-11-27T02:51:00+00:00",
                          rto_seconds=42.0, rpo_seconds=0.5),
        last_backup_at=at("2026-11-27T02:01:00"), newest_segment_at=at("2026-11-27T02:59:00"),
        archive_lag_segments=3, archive_failing=False,
        window_earliest=at("2026-11-26T02:00:00"), window_latest=at("2026-11-27T02:59:00"),
    )
    samples = parse_metrics(render(report))
    assert samples == samples | {
        ("pgvault_job_last_success_timestamp_seconds", (("kind", "full"),)): at("2026-11-27T02:01:00").timestamp(),
        ("pgvault_job_last_duration_seconds", (("kind", "full"),)): 61.5,
        ("pgvault_job_last_bytes", (("kind", "full"),)): 4096,
        ("pgvault_job_last_run_failed", (("kind", "full"),)): 0,
        ("pgvault_job_last_run_failed", (("kind", "incremental"),)): 1,
        ("pgvault_job_skips_total", (("kind", "incremental"),)): 3,
        ("pgvault_job_failures_total", (("kind", "incremental"),)): 1,
        ("pgvault_wal_archive_lag_segments", ()): 3,
        ("pgvault_wal_archive_failing", ()): 0,
        ("pgvault_wal_newest_segment_age_seconds", ()): 60,
        ("pgvault_restorable_window_seconds", ()): 89940,
        ("pgvault_restorable_window_latest_timestamp_seconds", ()): at("2026-11-27T02:59:00").timestamp(),
        ("pgvault_backup_last_timestamp_seconds", ()): at("2026-11-27T02:01:00").timestamp(),
        ("pgvault_drill_last_success", ()): 1,
        ("pgvault_drill_rto_seconds", ()): 42,
        ("pgvault_drill_rpo_seconds", ()): 0.5,
        ("pgvault_daemon_running", ()): 1,
        ("pgvault_node_is_primary", ()): 1,
    }
    # unknown facts have no sample at all (an alert sees "no data", not "1970")
    names = {name for name, _labels in samples}
    assert "pgvault_dump_last_timestamp_seconds" not in names
    assert "pgvault_backup_last_full_timestamp_seconds" not in names
    failed = render(StatusReport(collected_at=now, cluster="main",
                                 drill=DrillRecord(ok=False, started_at="x", finished_at="2026-11-27T02:51:00+00:00",
                                                   error="no backup", rto_seconds=3.0)))
    failed = parse_metrics(failed)
    assert failed[("pgvault_drill_last_success", ())] == 0
    assert ("pgvault_drill_rto_seconds", ()) not in failed and ("pgvault_daemon_running", ()) in failed


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_exit_codes_of_the_daemon_and_drills():
    assert (EXIT_CODES[DaemonError], EXIT_CODES[DaemonAlreadyRunningError], EXIT_CODES[DrillError]) == (110, 111, 112)
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)


# --- deployment files ---------------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    from pgvault.metrics import families

    report = StatusReport(collected_at=at("2026-11-27T03:00:00"), cluster="main",
                          jobs={"full": JobRecord("full")})
    names = set()
    for family in families(report):
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_alert_rules_use_only_metrics_pgvault_exports():
    import re
    from pathlib import Path

    import yaml

    rules = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "prometheus-alerts.yml").read_text())
    (group,) = rules["groups"]
    exported = exported_metric_names()
    used = set()
    for rule in group["rules"]:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("warning", "critical")
        used |= set(re.findall(r"\bpgvault_[a-z_]+", rule["expr"]))
    assert used and used <= exported, used - exported
    alerts = {r["alert"] for r in group["rules"]}
    # what the issue asks for: no backup > 26 h, archive lag, a failed drill, a shrinking window
    assert {"PgvaultNoRecentBackup", "PgvaultWalArchiveLag", "PgvaultDrillFailed",
            "PgvaultRestorableWindowShrinking"} <= alerts
    backup_rule = next(r for r in group["rules"] if r["alert"] == "PgvaultNoRecentBackup")
    assert "26 * 3600" in backup_rule["expr"] and "pgvault_backup_last_timestamp_seconds" in backup_rule["expr"]


def test_systemd_unit_runs_the_daemon_as_postgres_and_lets_it_stop_its_job():
    import configparser
    from pathlib import Path

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string((Path(__file__).parents[1] / "deploy" / "pgvault.service").read_text())
    service = unit["Service"]
    assert service["User"] == "postgres" and service["Restart"] == "on-failure"
    assert service["ExecStart"].endswith(" daemon --log-format text")
    # SIGTERM to the daemon only: it interrupts its job cleanly; the default would kill the job too
    assert service["KillMode"] == "mixed" and int(service["TimeoutStopSec"]) > 60
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    for directive in ("ProtectSystem", "ProtectHome", "PrivateTmp", "NoNewPrivileges", "ReadWritePaths"):
        assert service.get(directive), directive
    assert unit["Install"]["WantedBy"] == "multi-user.target"
