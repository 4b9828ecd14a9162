"""How things stand: what the daemon's jobs and the last drill recorded, plus live facts of the vault and server.

Two small JSON files in the node's state directory (``<spool_dir>/<cluster>/daemon/``)
carry what only this node knows: ``jobs.json`` (written by the daemon alone: each
job's last start, success, failure, duration, bytes, skip) and ``drill.json``
(written by `pgvault drill`, whoever runs it). Everything else is read live each
time: the vault's backups, dumps, archived WAL and restorable window, and the
server's role and pg_stat_archiver. `pgvault status` and the daemon's /metrics
show the same :class:`StatusReport`; it works without a running daemon.

Backup freshness comes from the vault, not from jobs.json: on a failover pair only
one node backs up, and both must tell monitoring how old the newest backup is.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from pgvault.errors import PgvaultError

JOBS_FILE = "jobs.json"
DRILL_FILE = "drill.json"
LOCK_FILE = "daemon.lock"


def state_dir(spool_dir: str, cluster: str) -> str:
    """Where this node keeps the daemon's lock and state for ``cluster``."""
    return os.path.join(spool_dir, cluster, "daemon")


def iso_time(moment: datetime | None) -> str | None:
    """How state files and --json write a moment: UTC, to the second."""
    return None if moment is None else moment.astimezone(UTC).isoformat(timespec="seconds")


def parse_time(text: str | None) -> datetime | None:
    """A moment as iso_time wrote it; None for nothing or anything unreadable."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


# --- what jobs and drills record ------------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    """One job kind's history on this node, as the daemon saw it."""

    job: str
    last_started: str | None = None
    last_finished: str | None = None
    last_success: str | None = None
    last_failure: str | None = None
    last_duration_seconds: float | None = None
    last_bytes: int | None = None  # stored in the vault by the last successful run (backups, dumps)
    last_exit_code: int | None = None
    last_error: str | None = None
    last_skipped: str | None = None
    last_skip_reason: str | None = None
    runs: int = 0
    failures: int = 0
    skips: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def started(self, at: datetime) -> JobRecord:
        return replace(self, last_started=iso_time(at))

    def finished(self, at: datetime, *, exit_code: int, seconds: float, bytes_stored: int | None,
                 error: str | None) -> JobRecord:
        ok = exit_code == 0
        return replace(
            self, last_finished=iso_time(at), last_exit_code=exit_code, last_duration_seconds=round(seconds, 3),
            runs=self.runs + 1, failures=self.failures + (0 if ok else 1),
            last_success=iso_time(at) if ok else self.last_success, last_failure=self.last_failure if ok else iso_time(at),
            last_bytes=bytes_stored if ok and bytes_stored is not None else self.last_bytes,
            last_error=None if ok else error)

    def skipped(self, at: datetime, reason: str) -> JobRecord:
        return replace(self, last_skipped=iso_time(at), last_skip_reason=reason, skips=self.skips + 1)


@dataclass(frozen=True)
class DrillRecord:
    """The outcome of one restore drill (``drill.json``)."""

    ok: bool
    started_at: str
    finished_at: str
    backup: str | None = None
    error: str | None = None
    rto_seconds: float | None = None  # from the start of the drill until the restored server was open
    rpo_seconds: float | None = None  # newest archived commit minus the last transaction the drill replayed
    newest_archived_commit: str | None = None
    reached_transaction_time: str | None = None
    reached_lsn: str | None = None
    wal_end_lsn: str | None = None
    databases: tuple[dict[str, Any], ...] = ()
    amcheck: str | None = None  # "ok: N indexes", "skipped: …"
    bytes_restored: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DrillRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["databases"] = tuple(values.get("databases") or ())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["databases"] = list(self.databases)
        return data


class StateStore:
    """The state directory's JSON files: read tolerantly, written atomically (temp file, fsync, rename)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def ensure(self) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            from pgvault.errors import DaemonError

            raise DaemonError(f"cannot create the state directory {self.directory}: {exc.strerror}",
                              hint="[archive] spool_dir must be writable by the user running pgvault (postgres)") from None

    def _read(self, name: str) -> Any:
        try:
            with open(os.path.join(self.directory, name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # absent (never ran) or torn by a crash of an old version: start afresh

    def _write(self, name: str, data: Any) -> None:
        self.ensure()
        path = os.path.join(self.directory, name)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            if os.geteuid() == 0:  # root running `pgvault drill`: keep the file the directory owner's
                st = os.stat(self.directory)
                os.chown(tmp, st.st_uid, st.st_gid)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def read_jobs(self) -> dict[str, JobRecord]:
        data = self._read(JOBS_FILE)
        if not isinstance(data, dict):
            return {}
        return {job: JobRecord.from_dict(rec) for job, rec in data.items() if isinstance(rec, dict)}

    def write_jobs(self, jobs: dict[str, JobRecord]) -> None:
        self._write(JOBS_FILE, {job: asdict(rec) for job, rec in jobs.items()})

    def read_drill(self) -> DrillRecord | None:
        data = self._read(DRILL_FILE)
        try:
            return DrillRecord.from_dict(data) if isinstance(data, dict) else None
        except TypeError:
            return None

    def write_drill(self, drill: DrillRecord) -> None:
        self._write(DRILL_FILE, drill.to_dict())


# --- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusReport:
    collected_at: datetime
    cluster: str
    vault: str | None = None
    daemon_pid: int | None = None
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    next_runs: dict[str, str] = field(default_factory=dict)  # only from a running daemon
    drill: DrillRecord | None = None
    role: str | None = None  # "primary" | "standby" (None: server unreachable)
    backups: int = 0
    last_backup: dict[str, Any] | None = None  # label, type, stop_time, bytes_stored, duration_seconds
    last_full_backup_at: datetime | None = None
    last_backup_at: datetime | None = None
    last_dump_at: datetime | None = None
    newest_segment_at: datetime | None = None
    archive_lag_segments: int | None = None
    archive_failing: bool | None = None
    archive_last_failure_at: datetime | None = None
    window_earliest: datetime | None = None
    window_latest: datetime | None = None
    window_timeline: int | None = None
    errors: tuple[str, ...] = ()

    @property
    def newest_segment_age_seconds(self) -> float | None:
        if self.newest_segment_at is None:
            return None
        return max(0.0, (self.collected_at - self.newest_segment_at).total_seconds())

    @property
    def window_seconds(self) -> float | None:
        if self.window_earliest is None or self.window_latest is None:
            return None
        return (self.window_latest - self.window_earliest).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        return {
            "collected_at": iso_time(self.collected_at),
            "cluster": self.cluster,
            "vault": self.vault,
            "daemon": {"running": self.daemon_pid is not None, "pid": self.daemon_pid,
                       "next_runs": dict(self.next_runs)},
            "role": self.role,
            "jobs": {job: asdict(rec) for job, rec in sorted(self.jobs.items())},
            "drill": self.drill.to_dict() if self.drill else None,
            "backups": {"count": self.backups, "last": self.last_backup,
                        "last_full_at": iso_time(self.last_full_backup_at), "last_at": iso_time(self.last_backup_at)},
            "last_dump_at": iso_time(self.last_dump_at),
            "wal": {"newest_segment_at": iso_time(self.newest_segment_at),
                    "newest_segment_age_seconds": _round(self.newest_segment_age_seconds),
                    "archive_lag_segments": self.archive_lag_segments, "archive_failing": self.archive_failing,
                    "archive_last_failure_at": iso_time(self.archive_last_failure_at)},
            "restorable_window": {"timeline": self.window_timeline, "earliest": iso_time(self.window_earliest),
                                  "latest": iso_time(self.window_latest), "seconds": _round(self.window_seconds)},
            "errors": list(self.errors),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def archive_lag(current_wal: str | None, last_archived_wal: str | None, *, segment_size: int) -> int | None:
    """Completed segments not archived yet: between the last archived one and the one being written.

    None on a standby (no segment is being written) or before anything was archived.
    """
    from pgvault.wal import parse_segment_name

    if not current_wal or not last_archived_wal:
        return None
    try:
        current = parse_segment_name(current_wal[:24], segment_size=segment_size)[1]
        archived = parse_segment_name(last_archived_wal[:24], segment_size=segment_size)[1]
    except PgvaultError:
        return None
    return max(0, current - archived - 1)


def collect_status(settings, *, now: datetime | None = None, next_runs: dict[str, str] | None = None,
                   daemon_pid: int | None = None) -> StatusReport:
    """Everything :class:`StatusReport` holds; each part that cannot be read is named in ``errors``."""
    now = now or datetime.now(UTC)
    store = StateStore(state_dir(settings.archive.spool_dir, settings.vault.cluster))
    errors: list[str] = []
    values: dict[str, Any] = {
        "collected_at": now, "cluster": settings.vault.cluster, "jobs": store.read_jobs(),
        "drill": store.read_drill(),
        "next_runs": dict(next_runs) if next_runs is not None else _next_runs(settings.schedule, now),
        "daemon_pid": daemon_pid if daemon_pid is not None else _running_daemon(settings),
    }
    try:
        values.update(_vault_facts(settings))
    except PgvaultError as exc:
        errors.append(f"vault: {exc.message}")
    try:
        values.update(_server_facts(settings, segment_size=values.pop("_segment_size", None)))
    except PgvaultError as exc:
        errors.append(f"PostgreSQL: {exc.message}")
    return StatusReport(errors=tuple(errors), **values)


def _running_daemon(settings) -> int | None:
    from pgvault.daemon import lock_holder, lock_path

    return lock_holder(lock_path(settings.archive.spool_dir, settings.vault.cluster, settings.vault.url))


def _next_runs(section, now: datetime) -> dict[str, str]:
    """Each scheduled job's next cron moment after ``now`` (without jitter): what a running daemon would do."""
    from pgvault.schedule import next_time, schedule_config

    config = schedule_config(section)
    return {js.job: iso_time(next_time(js.cron, now, config.timezone)) for js in config.jobs}


def _vault_facts(settings) -> dict[str, Any]:
    from pgvault import context
    from pgvault.dump import list_dumps
    from pgvault.planner import restorable_window
    from pgvault.snapshot import load_catalog
    from pgvault.vault import require_vault_record

    storage = context.storage_for(settings, create=False)
    record = require_vault_record(storage)
    keyring = context.keyring_for(settings, storage)
    loaded = load_catalog(storage, record=record, keyring=keyring)
    out: dict[str, Any] = {"vault": storage.description, "_segment_size": record.wal_segment_size,
                           "backups": len(loaded.manifests)}
    manifests = sorted(loaded.manifests.values(), key=lambda m: m.stop_time)
    if manifests:
        m = manifests[-1]
        out["last_backup"] = {"label": m.label, "type": m.type, "stop_time": iso_time(m.stop_time),
                              "bytes_stored": m.bytes_stored, "duration_seconds": m.duration_seconds,
                              "backup_from": m.backup_from}
        out["last_backup_at"] = m.stop_time
        fulls = [m for m in manifests if m.type == "full"]
        out["last_full_backup_at"] = fulls[-1].stop_time if fulls else None
    newest = max((w.completed_ms for w in loaded.snapshot.wal if w.file.kind == "segment"), default=0)
    if newest:
        out["newest_segment_at"] = datetime.fromtimestamp(newest / 1000, tz=UTC)
    window = restorable_window(loaded.snapshot)
    out["window_timeline"] = window.timeline
    if window.intervals:
        out["window_earliest"], out["window_latest"] = window.earliest.time, window.latest.time
    dumps = list_dumps(storage, keyring, require_encryption=record.encryption_key_id is not None)
    if dumps:
        out["last_dump_at"] = parse_time(dumps[-1].stopped_at)
    return out


def _server_facts(settings, *, segment_size: int | None) -> dict[str, Any]:
    from pgvault import pg

    with pg.connect(settings.postgres.conninfo, connect_timeout=5) as conn:
        facts = pg.server_facts(conn)
        archiver = pg.archiver_status(conn)
    return {
        "role": "standby" if facts.in_recovery else "primary",
        "archive_lag_segments": archive_lag(archiver.current_wal, archiver.last_archived_wal,
                                            segment_size=segment_size or facts.wal_segment_size),
        "archive_failing": archiver.failing,
        "archive_last_failure_at": archiver.last_failed_time,
    }


# --- for people ---------------------------------------------------------------------------------


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = (now - moment).total_seconds()
    return f"{iso_time(moment)} ({_human(seconds)} ago)"


def _human(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_status(report: StatusReport) -> str:
    now = report.collected_at
    lines = [f"cluster {report.cluster}" + (f", vault {report.vault}" if report.vault else "")]
    lines.append("  daemon      " + (f"running (pid {report.daemon_pid})" if report.daemon_pid else "not running"))
    lines.append(f"  this node   {report.role or 'unknown'}")
    last = report.last_backup
    lines.append(f"  backups     {report.backups}; newest {_ago(report.last_backup_at, now)}"
                 + (f": {last['label']} ({last['type']}, from the {last['backup_from']})" if last else ""))
    lines.append(f"              newest full {_ago(report.last_full_backup_at, now)}")
    lines.append(f"  dumps       newest {_ago(report.last_dump_at, now)}")
    lag = "unknown" if report.archive_lag_segments is None else f"{report.archive_lag_segments} segment(s) waiting"
    failing = ""
    if report.archive_failing:
        failing = f"; FAILING since {iso_time(report.archive_last_failure_at)}"
    lines.append(f"  WAL         newest archived segment {_ago(report.newest_segment_at, now)}; "
                 f"archive lag {lag}{failing}")
    if report.window_earliest is not None:
        lines.append(f"  window      {iso_time(report.window_earliest)} .. {iso_time(report.window_latest)} "
                     f"(timeline {report.window_timeline}, {_human(report.window_seconds or 0)})")
    else:
        lines.append("  window      nothing is restorable")
    d = report.drill
    if d is None:
        lines.append("  drill       never")
    elif d.ok:
        lines.append(f"  drill       passed {_ago(parse_time(d.finished_at), now)}: backup {d.backup}, "
                     f"RTO {d.rto_seconds:.1f} s, RPO " + ("unknown" if d.rpo_seconds is None else f"{d.rpo_seconds:.1f} s"))
    else:
        lines.append(f"  drill       FAILED {_ago(parse_time(d.finished_at), now)}: {d.error}")
    if report.jobs or report.next_runs:
        lines.append("  jobs")
    for job in sorted(set(report.jobs) | set(report.next_runs)):
        rec = report.jobs.get(job) or JobRecord(job)
        state = (f"last success {_ago(parse_time(rec.last_success), now)}"
                 + (f", last failure {_ago(parse_time(rec.last_failure), now)}: {rec.last_error}"
                    if rec.last_failure and (rec.last_success or "") < rec.last_failure else "")
                 + (f", {rec.last_duration_seconds:.1f} s" if rec.last_duration_seconds is not None else ""))
        upcoming = f"; next {report.next_runs[job]}" if job in report.next_runs else ""
        lines.append(f"    {job:<12} {state}{upcoming}")
    for error in report.errors:
        lines.append(f"  unknown: {error}")
    return "\n".join(lines)
