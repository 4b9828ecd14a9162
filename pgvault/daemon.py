"""`pgvault daemon`: run the scheduled jobs, one at a time, on the node that should; serve /metrics.

The pieces, each elsewhere: *when* jobs run is :mod:`pgvault.schedule` (pure),
*what the node knows* is :mod:`pgvault.status`, *how it is exposed* is
:mod:`pgvault.metrics`. This module is the loop that ties them together, the
lock that keeps it single, and the job runner.

Jobs run as subprocesses — the very `pgvault backup|dump|expire|verify|drill`
commands a person runs — not as function calls in the daemon's process:

- a job can be stopped at any point and clean up after itself: SIGINT makes
  the child raise KeyboardInterrupt, so take_backup's own ``finally`` deletes
  what the uncommitted backup wrote and releases the vault lock, the same path
  as Ctrl-C on the command line. Threads inside a job (parallel copy) never
  have to be made cancellable, and a job that ignores it can still be killed
  without taking the daemon with it;
- a crash, a leak or a stuck library call in a job ends with the job; the
  daemon, its schedule and its metrics keep going;
- each job reads the configuration as it is when it starts (SIGHUP affects the
  next jobs, never one half-way through), and its memory is returned when it ends.

The cost is a process start per job (a fraction of a second), nothing next to
a backup. Exactly one node of a failover pair runs jobs: before each one the
daemon asks its server ``pg_is_in_recovery()`` and compares with ``[backup]
from`` (see :func:`role_allows`), so after a failover the new primary takes over
without any change of configuration.

Signals: SIGTERM/SIGINT stop scheduling and interrupt the running job (SIGINT
to it: it aborts cleanly, nothing half-committed), wait for it, exit 0.
SIGHUP reloads the configuration (schedule, metrics address); a configuration
that does not load is logged and the old one kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TextIO

from pgvault.errors import DaemonAlreadyRunningError, DaemonError, PgvaultError
from pgvault.schedule import Decision, JobQueue, Scheduler, schedule_config
from pgvault.status import (
    LOCK_FILE,
    JobRecord,
    StateStore,
    StatusReport,
    collect_status,
    iso_time,
    parse_time,
    state_dir,
)

#: After SIGTERM, how long a job has to end cleanly before it is killed (systemd's TimeoutStopSec is 90 s).
STOP_GRACE_SECONDS = 60
#: The longest the loop sleeps: how soon a signal is acted on.
SIGNAL_POLL_SECONDS = 0.5
#: How often the facts behind /metrics are read again (and after every job).
REFRESH_SECONDS = 60

#: The command each job runs (after `pgvault --config FILE`).
JOB_COMMANDS: dict[str, list[str]] = {
    "full": ["backup", "--type", "full", "--json"],
    "incremental": ["backup", "--type", "incr", "--json"],
    "dump": ["dump", "--json"],
    "expire": ["expire"],
    "verify": ["verify"],
    "drill": ["drill", "--json"],
}


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- one daemon per cluster and vault -------------------------------------------------------


def lock_path(spool_dir: str, cluster: str, vault_url: str) -> str:
    """The lock file of the daemon for this cluster and vault (a hash of the vault's URL: two vaults, two daemons)."""
    digest = hashlib.sha256(f"{vault_url}\0{cluster}".encode()).hexdigest()[:12]
    return os.path.join(state_dir(spool_dir, cluster), f"{LOCK_FILE}.{digest}")


def _pid_is_daemon(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"daemon" in argv


def lock_holder(path: str) -> int | None:
    """The pid written in a daemon lock file, if that process still runs as a daemon (read-only: never locks)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid and _pid_is_daemon(pid) else None


class DaemonLock:
    """An exclusive flock held for the daemon's life; the file names the holder's pid for the next one."""

    def __init__(self, path: str, *, what: str) -> None:
        self.path, self.what = path, what
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DaemonError(f"cannot create the daemon's lock file {self.path}: {exc.strerror}",
                              hint="[archive] spool_dir must be writable by the user running the daemon (postgres)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode().strip() or "unknown"
            finally:
                os.close(fd)
            raise DaemonAlreadyRunningError(
                f"another pgvault daemon for {self.what} runs on this host (pid {pid}); one at a time",
                hint=f"stop it first (systemctl stop pgvault, or kill {pid}); it holds {self.path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


# --- which node runs jobs ---------------------------------------------------------------------


def role_allows(backup_from: str, role: str) -> tuple[bool, str]:
    """Whether a node in ``role`` ("primary"/"standby") runs the jobs under ``[backup] from``, and why not.

    "any" means the primary here: the same configuration runs on both nodes of a
    pair, and one of them must be the one.
    """
    wanted = "primary" if backup_from == "any" else backup_from
    if role == wanted:
        return True, ""
    why = f"this node is a {role} and [backup] from = {json.dumps(backup_from)}"
    if backup_from == "any":
        why += " (the daemon runs jobs on the primary; set \"standby\" to run them on the standby)"
    return False, why


def node_role(conninfo: str) -> str:
    from pgvault import pg

    with pg.connect(conninfo, connect_timeout=5) as conn:
        in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
    return "standby" if in_recovery else "primary"


# --- logging --------------------------------------------------------------------------------------


class EventLog:
    """One line per event on ``stream``: text for people, JSON (``--log-format json``) for log shippers."""

    def __init__(self, fmt: str = "text", stream: TextIO | None = None, clock: Callable[[], datetime] = now_utc) -> None:
        if fmt not in ("text", "json"):
            raise ValueError("log format must be text or json")
        self.fmt, self.stream, self.clock = fmt, stream or sys.stderr, clock
        self._lock = threading.Lock()

    def __call__(self, event: str, message: str, *, level: str = "info", **fields: Any) -> None:
        at = self.clock().isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.fmt == "json":
            line = json.dumps({"time": at, "level": level, "event": event, "message": message, **fields},
                              default=str, sort_keys=False)
        else:
            line = f"{at} {level:<7} {' | '.join(message.splitlines())}"
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


# --- running one job ------------------------------------------------------------------------------


@dataclass
class JobRun:
    """A job's subprocess and what it said; ``finished`` is set when it has exited."""

    decision: Decision
    cmd: list[str]
    log: EventLog
    env: dict[str, str] | None = None
    started_at: datetime = field(default_factory=now_utc)
    began: float = field(default_factory=time.monotonic)
    proc: subprocess.Popen | None = None
    stdout: str = ""
    errors: list[str] = field(default_factory=list)
    exit_code: int | None = None
    seconds: float = 0.0
    finished: threading.Event = field(default_factory=threading.Event)
    on_exit: Callable[[], None] | None = None
    _stdout_reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def job(self) -> str:
        return self.decision.job

    def start(self) -> None:
        # Its own session: a Ctrl-C meant for the daemon reaches the job only through the daemon,
        # which decides how to stop it.
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=self.env, start_new_session=True,
                                     cwd="/")
        self._stdout_reader = threading.Thread(target=self._collect_stdout, daemon=True, name=f"{self.job}-stdout")
        self._stdout_reader.start()
        threading.Thread(target=self._relay_stderr, daemon=True, name=f"{self.job}-stderr").start()

    def _collect_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()

    def _relay_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            if not line:
                continue
            if line.startswith(("pgvault: error:", "HINT:", "pgvault: internal error", "pgvault: interrupted")):
                self.errors.append(line)
            self.log("job_output", f"{self.job}: {line}", job=self.job, pid=self.proc.pid)
        self.exit_code = self.proc.wait()
        self.seconds = time.monotonic() - self.began
        self._stdout_reader.join()  # the result may still be in the pipe when the process has exited
        self.finished.set()
        if self.on_exit is not None:
            self.on_exit()

    def interrupt(self) -> None:
        """Ask the job to stop: SIGINT, which pgvault turns into a clean abort (nothing half-committed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def result_json(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.stdout)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def bytes_stored(self) -> int | None:
        data = self.result_json() or {}
        if "bytes_stored" in data:  # pgvault backup --json
            return int(data["bytes_stored"])
        if "databases" in data and "globals" in data:  # pgvault dump --json: the record
            return int(data["globals"].get("stored_size", 0)) + sum(int(d.get("stored_size", 0))
                                                                    for d in data["databases"])
        return None

    def label(self) -> str | None:
        """The label of the backup or dump the job committed (from its --json result)."""
        label = (self.result_json() or {}).get("label")
        return label if isinstance(label, str) else None

    def error(self) -> str | None:
        if self.exit_code == 0:
            return None
        message = next((e.removeprefix("pgvault: error: ") for e in self.errors if e.startswith("pgvault: error:")),
                       None) or (self.errors[-1] if self.errors else None)
        return message or f"exited with code {self.exit_code}"


# --- the daemon ------------------------------------------------------------------------------------


class Daemon:
    """The loop. ``load_settings()`` reads the configuration (again on SIGHUP); ``base_cmd`` runs pgvault."""

    def __init__(self, *, load_settings: Callable[[], Any], base_cmd: list[str], log: EventLog,
                 clock: Callable[[], datetime] = now_utc, env: dict[str, str] | None = None) -> None:
        self.load_settings, self.base_cmd, self.log, self.clock, self.env = load_settings, base_cmd, log, clock, env
        self.settings = load_settings()
        self.scheduler = Scheduler(schedule_config(self.settings.schedule))
        self.queue = JobQueue()
        self.store = StateStore(state_dir(self.settings.archive.spool_dir, self.settings.vault.cluster))
        self.jobs: dict[str, JobRecord] = {}
        self.current: JobRun | None = None
        self.report: StatusReport | None = None
        self._wake = threading.Event()
        self._refresh = threading.Event()
        self._stop = False
        self._reload = False
        self._metrics_server = None
        self._metrics_listen = ""
        self._lock: DaemonLock | None = None
        self._started = False

    # Signal handlers only set flags (no locks: an Event.set() in a handler can deadlock against the
    # main thread's own wait); the loop sleeps in short slices and does the work.
    def _on_stop(self, _signum, _frame) -> None:
        self._stop = True

    def _on_reload(self, _signum, _frame) -> None:
        self._reload = True

    def run(self) -> int:
        s = self.settings
        self._lock = DaemonLock(lock_path(s.archive.spool_dir, s.vault.cluster, s.vault.url),
                                what=f"cluster {s.vault.cluster} and vault {s.vault.url}")
        self._lock.acquire()
        try:
            self.store.ensure()
            self.jobs = self.store.read_jobs()
            self._serve_metrics()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_stop)
            signal.signal(signal.SIGHUP, self._on_reload)
            threading.Thread(target=self._refresher, daemon=True, name="status-refresh").start()
            now = self.clock()
            last = {job: parse_time(rec.last_started) for job, rec in self.jobs.items()}
            caught = self.scheduler.start(now, last)
            self._started = True
            self.log("daemon_started", f"pgvault daemon started (pid {os.getpid()}) for cluster {s.vault.cluster}, "
                     f"vault {s.vault.url}; schedule: {self._describe_schedule()}"
                     + (f"; metrics on http://{self._metrics_listen}/metrics" if self._metrics_listen else ""),
                     pid=os.getpid(), schedule=self._schedule_fields(), metrics=self._metrics_listen or None)
            for job in caught:
                self.log("job_catch_up", f"{job}: a run was missed while the daemon was down; running it now",
                         job=job)
            if not self.scheduler.config.jobs:
                self.log("no_jobs", "no job is scheduled: set cron strings under [schedule]", level="warning")
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _loop(self) -> None:
        while not self._stop:
            if self._reload:
                self._reload = False
                self._do_reload()
            now = self.clock()
            for decision in self.scheduler.due(now, self.queue.busy()):
                if decision.action == "skip":
                    self._skip(decision.job, now, f"due at {iso_time(decision.scheduled_for)} but {decision.reason}")
                else:
                    self.queue.add(decision)
            if self.current is not None and self.current.finished.is_set():
                self._finish(self.current)
            if self.current is None:
                decision = self.queue.take()
                if decision is not None:
                    self._start(decision)
            self._wake.wait(min(SIGNAL_POLL_SECONDS, self._sleep_seconds()))
            self._wake.clear()

    def _sleep_seconds(self) -> float:
        if self.queue.waiting() and self.current is None:
            return 0.0
        wake = self.scheduler.next_wakeup()
        if wake is None:
            return 5.0
        return max(0.0, min(5.0, (wake - self.clock()).total_seconds()))

    def _start(self, decision: Decision) -> None:
        job, now = decision.job, self.clock()
        try:
            role = node_role(self.settings.postgres.conninfo)
        except PgvaultError as exc:
            self.queue.finished()
            self._skip(job, now, f"cannot tell this node's role: {exc.message}")
            return
        allowed, why = role_allows(self.settings.backup.from_, role)
        if not allowed:
            self.queue.finished()
            self._skip(job, now, why)
            return
        run = JobRun(decision=decision, cmd=[*self.base_cmd, *JOB_COMMANDS[job]], log=self.log, env=self.env,
                     on_exit=self._wake.set)
        try:
            run.start()
        except OSError as exc:
            self.queue.finished()
            error = f"cannot start {run.cmd[0]}: {exc.strerror}"
            self._record(job, lambda rec: rec.finished(now, exit_code=127, seconds=0, bytes_stored=None, error=error))
            self.log("job_failed", f"{job}: {error}", level="error", job=job)
            return
        self.current = run
        self._record(job, lambda rec: rec.started(run.started_at))
        late = (now - decision.scheduled_for).total_seconds()
        self.log("job_started", f"{job}: started (pid {run.proc.pid}) on the {role}, scheduled for "
                 f"{iso_time(decision.scheduled_for)}" + (", catching up a missed run" if decision.catch_up else "")
                 + (f", {late:.0f} s late" if late >= 1 else ""),
                 job=job, pid=run.proc.pid, scheduled_for=decision.scheduled_for.isoformat(),
                 catch_up=decision.catch_up, command=JOB_COMMANDS[job])

    def _finish(self, run: JobRun) -> None:
        self.current = None
        self.queue.finished()
        now, error, stored = self.clock(), run.error(), run.bytes_stored()
        self._record(run.job, lambda rec: rec.finished(now, exit_code=run.exit_code or 0, seconds=run.seconds,
                                                      bytes_stored=stored, error=error))
        label = run.label()
        fields = {"job": run.job, "exit_code": run.exit_code, "seconds": round(run.seconds, 3), "bytes": stored,
                  "label": label}
        if error is None:
            self.log("job_succeeded", f"{run.job}: succeeded in {run.seconds:.1f} s"
                     + (f": {label}" if label else "") + (f", {stored} bytes stored" if stored is not None else ""),
                     **fields)
        else:
            self.log("job_failed", f"{run.job}: failed (exit {run.exit_code}) after {run.seconds:.1f} s: {error}",
                     level="error", error=error, **fields)
        self._refresh.set()

    def _skip(self, job: str, now: datetime, reason: str) -> None:
        self._record(job, lambda rec: rec.skipped(now, reason))
        self.log("job_skipped", f"{job}: skipped: {reason}", level="warning", job=job, reason=reason)

    def _record(self, job: str, change: Callable[[JobRecord], JobRecord]) -> None:
        self.jobs[job] = change(self.jobs.get(job) or JobRecord(job))
        try:
            self.store.write_jobs(self.jobs)
        except (OSError, PgvaultError) as exc:
            self.log("state_not_saved", f"cannot save the job state in {self.store.directory}: {exc}", level="error")

    def _do_reload(self) -> None:
        try:
            settings = self.load_settings()
            config = schedule_config(settings.schedule)
        except (PgvaultError, ValueError) as exc:
            self.log("reload_failed", f"configuration not reloaded, the old one stays: {exc}", level="error")
            return
        moved = (settings.vault.cluster, settings.vault.url, settings.archive.spool_dir) != (
            self.settings.vault.cluster, self.settings.vault.url, self.settings.archive.spool_dir)
        if moved:
            self.log("reload_partial", "the vault, cluster or spool_dir changed: restart the daemon for that; "
                     "schedule and metrics reloaded", level="warning")
        self.settings = settings if not moved else _keep_place(settings, self.settings)
        self.scheduler.reschedule(config, self.clock())
        try:
            self._serve_metrics()
        except DaemonError as exc:
            self.log("metrics_failed", exc.message, level="error")
        self.log("reloaded", f"configuration reloaded; schedule: {self._describe_schedule()}",
                 schedule=self._schedule_fields())

    def _serve_metrics(self) -> None:
        listen = self.settings.metrics.listen
        if listen == self._metrics_listen:
            return
        self._stop_metrics()
        if listen:
            from pgvault.metrics import registry_for, serve

            self._metrics_server = serve(listen, registry_for(self._current_report))
            self._metrics_listen = listen

    def _stop_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        self._metrics_listen = ""

    def _current_report(self) -> StatusReport | None:
        """The last collected facts with the jobs as they are now (a skip shows at once, without a vault listing)."""
        report = self.report
        return None if report is None else replace(report, jobs=dict(self.jobs), next_runs=self._next_runs())

    def _refresher(self) -> None:
        while True:
            try:
                self.report = collect_status(self.settings, next_runs=self._next_runs(), daemon_pid=os.getpid())
            except Exception as exc:  # noqa: BLE001 (a thread's boundary: the metrics must not die with it)
                self.log("status_failed", f"cannot collect the status: {exc.__class__.__name__}: {exc}",
                         level="error")
            self._refresh.wait(REFRESH_SECONDS)
            self._refresh.clear()

    def _next_runs(self) -> dict[str, str]:
        return {job: at.isoformat(timespec="seconds") for job, at in self.scheduler.upcoming().items()}

    def _describe_schedule(self) -> str:
        c = self.scheduler.config
        if not c.jobs:
            return "nothing scheduled"
        return ", ".join(f"{js.job} {js.cron!r}" for js in c.jobs) + f" ({c.timezone})"

    def _schedule_fields(self) -> dict[str, str]:
        return {js.job: js.cron for js in self.scheduler.config.jobs}

    def _shutdown(self) -> None:
        run = self.current
        if run is not None and not run.finished.is_set():
            self.log("job_interrupted", f"{run.job}: stopping: interrupting it (pid {run.proc.pid}); "
                     "an uncommitted backup is removed, never half-committed", level="warning", job=run.job)
            run.interrupt()
            if not run.finished.wait(STOP_GRACE_SECONDS):
                self.log("job_killed", f"{run.job}: did not stop within {STOP_GRACE_SECONDS} s: killed; the next "
                         "backup removes what it left", level="error", job=run.job)
                run.kill()
                run.finished.wait(10)
            if run.finished.is_set():
                self._finish(run)
        dropped = self.queue.clear()
        if dropped:
            self.log("jobs_dropped", f"not started: {', '.join(dropped)}", jobs=dropped)
        self._stop_metrics()
        if self._lock is not None:
            self._lock.release()
        if self._started:
            self.log("daemon_stopped", "pgvault daemon stopped")


def _keep_place(new, old):
    """New settings, but the vault, cluster and spool directory the daemon started with (its lock and state)."""
    return new._replace(vault=old.vault, archive=new.archive._replace(spool_dir=old.archive.spool_dir))


