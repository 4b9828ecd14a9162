"""`pgvault daemon` for real: second-level schedules against real clusters and a local vault.

The daemon runs as the postgres user (as under systemd), logs JSON lines that
the tests read as events, and serves /metrics on a free loopback port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgvault.backup.leftovers import find_leftovers
from pgvault.backup.lock import read_holder
from pgvault.backup.manifest import list_backups
from tests.archive_env import archive_command, make_archive_env
from tests.clihelp import write_config
from tests.fixtures.pgcluster import (
    PG_USER,
    chown_tree,
    free_port,
    pgvault_executable,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class DaemonProc:
    """A `pgvault daemon --log-format json` subprocess whose events are collected as they come."""

    def __init__(self, config: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
        # no runuser in between: the pid is the daemon's, for signals and for the lock's message
        self.proc = subprocess.Popen([pgvault_executable(), "--config", config, "daemon", "--log-format", "json"],
                                     user=PG_USER, group=PG_USER, env=env, cwd="/tmp", stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self.raw: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.raw.append(line)
            try:
                self.events.append(json.loads(line))
            except ValueError:
                pass

    def wait_for(self, predicate, timeout: float = 30, what: str = "event") -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            assert self.proc.poll() is None or seen < len(self.events), f"daemon exited: {''.join(self.raw)}"
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout} s:\n{''.join(self.raw)}")

    def named(self, event: str, **fields) -> list[dict]:
        return [e for e in self.events if e["event"] == event and all(e.get(k) == v for k, v in fields.items())]

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_metric(port: int, name: str, labels: tuple = (), timeout: float = 20) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = metrics(port).get((name, labels))
        if value is not None:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{name}{dict(labels)} not on /metrics within {timeout} s: {metrics(port)}")


def once_at(moment: datetime) -> str:
    """A croniter string (seconds last) that fires once a day, at ``moment`` (UTC)."""
    return f"{moment.minute} {moment.hour} * * * {moment.second}"


def with_schedule(env_config: str, path: str, text: str, *, replace: tuple[tuple[str, str], ...] = ()) -> str:
    body = Path(env_config).read_text()
    for old, new in replace:
        body = body.replace(old, new)
    return write_config(path, body + text)


def test_scheduled_backups_run_only_on_the_primary_and_a_drill_shows_on_metrics(pg_tmp, pg_factory):
    primary = pg_factory.create()
    env = make_archive_env(primary, pg_tmp, backend="local")
    primary.sql("CREATE TABLE s AS SELECT g AS id FROM generate_series(1, 5000) g")
    standby = pg_factory.create_standby(primary, archive_command=archive_command(env.config))

    p_port, s_port = free_port(), free_port()
    drill_at = (datetime.now(UTC) + timedelta(seconds=7)).replace(microsecond=0)
    schedule = '\n[schedule]\nfull = "* * * * * */3"\ndrill = "{drill}"\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    p_config = with_schedule(env.config, os.path.join(env.base, "primary.toml"),
                             schedule.format(drill=once_at(drill_at), port=p_port))
    # the standby's daemon: the same schedule and vault, its own server, data directory and spool
    s_config = with_schedule(env.config, os.path.join(env.base, "standby.toml"),
                             schedule.format(drill=once_at(drill_at), port=s_port),
                             replace=((primary.conninfo, standby.conninfo), (primary.data_dir, standby.data_dir),
                                      (f"{env.base}/spool", f"{env.base}/standby-spool")))
    chown_tree(env.base)

    on_primary, on_standby = DaemonProc(p_config), DaemonProc(s_config)
    try:
        started = on_primary.wait_for(lambda e: e["event"] == "daemon_started", what="start")
        assert started["schedule"] == {"full": "* * * * * */3", "drill": once_at(drill_at)}
        assert started["metrics"] == f"127.0.0.1:{p_port}"
        drill = on_primary.wait_for(lambda e: e["event"] in ("job_succeeded", "job_failed") and e["job"] == "drill",
                                    timeout=60, what="drill")
        assert drill["event"] == "job_succeeded", "".join(on_primary.raw)
        on_primary.wait_for(lambda e: e["event"] == "job_succeeded" and e["job"] == "full"
                            and len(on_primary.named("job_succeeded", job="full")) >= 2, what="two backups")
        skipped = on_standby.wait_for(lambda e: e["event"] == "job_skipped" and e["job"] == "full", what="skip")
        assert skipped["reason"] == ('this node is a standby and [backup] from = "any" (the daemon runs jobs on the '
                                     'primary; set "standby" to run them on the standby)')

        assert metrics(p_port)[("pgvault_node_is_primary", ())] == 1
        assert wait_metric(p_port, "pgvault_drill_last_success") == 1
        m = metrics(p_port)
        assert m[("pgvault_drill_rto_seconds", ())] > 0 and m[("pgvault_drill_rpo_seconds", ())] >= 0
        assert m[("pgvault_job_last_success_timestamp_seconds", (("kind", "full"),))] > time.time() - 60
        assert m[("pgvault_job_last_bytes", (("kind", "full"),))] > 0
        assert m[("pgvault_backups", ())] >= 1
        assert m[("pgvault_daemon_running", ())] == 1
        s_metrics = metrics(s_port)
        assert s_metrics[("pgvault_node_is_primary", ())] == 0
        assert s_metrics[("pgvault_job_skips_total", (("kind", "full"),))] >= 1
        assert ("pgvault_job_last_success_timestamp_seconds", (("kind", "full"),)) not in s_metrics
    finally:
        assert on_primary.stop() == 0, "".join(on_primary.raw)
        assert on_standby.stop() == 0, "".join(on_standby.raw)

    # on schedule: every full run was scheduled on a multiple of 3 s; the first started within a second of it
    runs = on_primary.named("job_started", job="full")
    assert runs and all(datetime.fromisoformat(r["scheduled_for"]).second % 3 == 0 for r in runs)
    first = runs[0]
    assert datetime.fromisoformat(first["time"]) - \
        datetime.fromisoformat(first["scheduled_for"]) < timedelta(seconds=1.5)
    (drill_run,) = on_primary.named("job_started", job="drill")
    assert datetime.fromisoformat(drill_run["scheduled_for"]) == drill_at
    assert not on_standby.named("job_started")
    backups = list_backups(env.storage, keyring=None)
    succeeded = [e["label"] for e in on_primary.named("job_succeeded", job="full")]
    assert len(succeeded) >= 2 and all(e["bytes"] > 0 for e in on_primary.named("job_succeeded", job="full"))
    # each success is a committed backup; a run interrupted at the stop may have committed just before it
    assert set(succeeded) <= {b.label for b in backups} and len(backups) <= len(runs)
    assert {b.backup_from for b in backups} == {"primary"}
    assert on_primary.named("daemon_stopped") and on_standby.named("daemon_stopped")


def test_sigterm_during_a_backup_leaves_nothing_half_committed_and_a_second_daemon_is_refused(pg_tmp, pg_cluster):
    env = make_archive_env(pg_cluster, pg_tmp, backend="local", extra="[backup]\nwal_timeout = 120")
    pg_cluster.set(archive_command="/bin/false")  # the backup then waits for its WAL: it cannot commit
    pg_cluster.reload()
    config = with_schedule(env.config, os.path.join(env.base, "daemon.toml"),
                           '\n[schedule]\nfull = "* * * * * */2"\n[metrics]\nlisten = ""\n')
    chown_tree(env.base)
    daemon = DaemonProc(config)
    try:
        started = daemon.wait_for(lambda e: e["event"] == "job_started" and e["job"] == "full", what="backup")
        deadline = time.monotonic() + 30
        while (holder := read_holder(env.storage)) is None:
            assert time.monotonic() < deadline, "".join(daemon.raw)
            time.sleep(0.05)
        assert holder.pid == started["pid"]

        second = subprocess.run([pgvault_executable(), "--config", config, "daemon"], user=PG_USER, group=PG_USER,
                                check=False, capture_output=True, text=True, timeout=30, cwd="/tmp")
        assert second.returncode == 111, second.stderr
        assert (f"pgvault: error: another pgvault daemon for cluster main and vault file://{env.base}/vault runs on "
                f"this host (pid {daemon.proc.pid}); one at a time") in second.stderr

        # the same backup falls due again while it runs: skipped and said so
        daemon.wait_for(lambda e: e["event"] == "job_skipped" and e["job"] == "full", what="skip")
        skipped = daemon.named("job_skipped", job="full")[0]
        assert skipped["reason"].endswith("but its previous run is still running or waiting to run")

        # SIGHUP: a broken config is refused (the old one stays), a good one is taken
        text = Path(config).read_text()
        write_config(config, text.replace('full = "* * * * * */2"', 'full = "every two seconds"'))
        daemon.proc.send_signal(signal.SIGHUP)
        refused = daemon.wait_for(lambda e: e["event"] == "reload_failed", what="refused reload")
        assert "[schedule] full = 'every two seconds': expected a cron expression" in refused["message"]
        write_config(config, text.replace('full = "* * * * * */2"', 'full = "* * * * * */2"\ndump = "0 3 * * *"'))
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = daemon.wait_for(lambda e: e["event"] == "reloaded", what="reload")
        assert reloaded["schedule"] == {"full": "* * * * * */2", "dump": "0 3 * * *"}
        assert daemon.stop() == 0, "".join(daemon.raw)
    finally:
        if daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)
    names = [e["event"] for e in daemon.events]
    assert names.index("job_interrupted") < names.index("job_failed") < names.index("daemon_stopped")
    failed = daemon.named("job_failed", job="full")[0]
    assert failed["exit_code"] == 130 and failed["error"] == "pgvault: interrupted"
    # the interrupted backup cleaned up after itself: nothing listed, nothing left, no lock
    assert list_backups(env.storage, keyring=None) == []
    assert find_leftovers(env.storage) == [] and read_holder(env.storage) is None
    state = json.loads(Path(env.base, "spool", "main", "daemon", "jobs.json").read_text())
    assert state["full"]["last_exit_code"] == 130 and state["full"]["failures"] == 1 and state["full"]["skips"] >= 1

    pg_cluster.set(archive_command=archive_command(env.config))
    pg_cluster.reload()
    res = env.pgvault("backup", "--json")
    assert res.code == 0, res.err
    assert "removed" not in res.err  # there was nothing to clean up
    assert [b["label"] for b in env.listing()["backups"]] == [json.loads(res.out)["label"]]
