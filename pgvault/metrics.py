"""Prometheus exposition of a :class:`~pgvault.status.StatusReport` (what the jobs record plus live facts).

:func:`families` maps one report to metric families — pure, tested without a
server. :class:`ReportCollector` hands the daemon's latest report to
prometheus_client at each scrape (the report is refreshed by the daemon, not by
the scrape: listing a large S3 vault every 15 s would cost more than it tells).
Per-job metrics carry the job in a ``kind`` label (``job`` is Prometheus's own target label).
Times are Unix seconds; a fact that is unknown is left out rather than shown as 0,
so that alerts on it see "no data" instead of "a very old backup".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from pgvault.status import StatusReport, parse_time

PREFIX = "pgvault_"


def _ts(moment: datetime | str | None) -> float | None:
    if isinstance(moment, str):
        moment = parse_time(moment)
    return None if moment is None else moment.timestamp()


def _gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    labels = labels or {}
    family = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
    if value is not None:
        family.add_metric(list(labels.values()), value)
    return family


def families(report: StatusReport) -> list:
    """Every metric family of ``report`` (families with no sample when the fact is unknown)."""
    out = [
        _gauge("daemon_running", "1 when a pgvault daemon holds this node's lock", 1 if report.daemon_pid else 0),
        _gauge("status_collected_timestamp_seconds", "When these facts were read", _ts(report.collected_at)),
        _gauge("status_errors", "Parts of the status that could not be read (see pgvault status)", len(report.errors)),
        _gauge("node_is_primary", "1 on a primary, 0 on a standby",
               None if report.role is None else int(report.role == "primary")),
    ]

    per_job = {
        "last_success_timestamp_seconds": ("When the job last succeeded on this node", "last_success"),
        "last_failure_timestamp_seconds": ("When the job last failed on this node", "last_failure"),
        "last_started_timestamp_seconds": ("When the job last started on this node", "last_started"),
    }
    for suffix, (doc, attr) in per_job.items():
        family = GaugeMetricFamily(PREFIX + "job_" + suffix, doc, labels=["kind"])
        for job, rec in sorted(report.jobs.items()):
            value = _ts(getattr(rec, attr))
            if value is not None:
                family.add_metric([job], value)
        out.append(family)
    duration = GaugeMetricFamily(PREFIX + "job_last_duration_seconds", "How long the job's last run took", labels=["kind"])
    stored = GaugeMetricFamily(PREFIX + "job_last_bytes", "Bytes the job's last successful run stored in the vault",
                               labels=["kind"])
    failed = GaugeMetricFamily(PREFIX + "job_last_run_failed", "1 when the job's last run failed", labels=["kind"])
    runs = CounterMetricFamily(PREFIX + "job_runs", "Runs of the job on this node", labels=["kind"])
    failures = CounterMetricFamily(PREFIX + "job_failures", "Failed runs of the job on this node", labels=["kind"])
    skips = CounterMetricFamily(PREFIX + "job_skips",
                                "Runs skipped: the job was still running, or this node is not the one that backs up",
                                labels=["kind"])
    for job, rec in sorted(report.jobs.items()):
        if rec.last_duration_seconds is not None:
            duration.add_metric([job], rec.last_duration_seconds)
        if rec.last_bytes is not None:
            stored.add_metric([job], rec.last_bytes)
        if rec.last_exit_code is not None:
            failed.add_metric([job], 0 if rec.last_exit_code == 0 else 1)
        runs.add_metric([job], rec.runs)
        failures.add_metric([job], rec.failures)
        skips.add_metric([job], rec.skips)
    out += [duration, stored, failed, runs, failures, skips]

    out += [
        _gauge("backups", "Committed backups in the vault", report.backups),
        _gauge("backup_last_timestamp_seconds", "When the newest backup in the vault stopped (any node)",
               _ts(report.last_backup_at)),
        _gauge("backup_last_full_timestamp_seconds", "When the newest full backup in the vault stopped",
               _ts(report.last_full_backup_at)),
        _gauge("dump_last_timestamp_seconds", "When the newest logical dump in the vault stopped", _ts(report.last_dump_at)),
        _gauge("wal_newest_segment_timestamp_seconds", "Completion time of the newest archived WAL segment",
               _ts(report.newest_segment_at)),
        _gauge("wal_newest_segment_age_seconds", "Age of the newest archived WAL segment",
               report.newest_segment_age_seconds),
        _gauge("wal_archive_lag_segments", "Completed WAL segments the server has not archived yet (primary)",
               report.archive_lag_segments),
        _gauge("wal_archive_failing", "1 when the server's last archive attempt failed",
               None if report.archive_failing is None else int(report.archive_failing)),
        _gauge("restorable_window_earliest_timestamp_seconds", "The earliest point a restore can reach",
               _ts(report.window_earliest)),
        _gauge("restorable_window_latest_timestamp_seconds", "The latest point a restore can reach",
               _ts(report.window_latest)),
        _gauge("restorable_window_seconds", "Length of the restorable window", report.window_seconds),
    ]
    d = report.drill
    out += [
        _gauge("drill_last_success", "1 when the last restore drill passed, 0 when it failed",
               None if d is None else int(d.ok)),
        _gauge("drill_last_timestamp_seconds", "When the last restore drill finished", _ts(d.finished_at) if d else None),
        _gauge("drill_rto_seconds", "Restore time of the last passing drill (start until the server was open)",
               d.rto_seconds if d and d.ok else None),
        _gauge("drill_rpo_seconds", "Newest archived commit minus the last transaction the drill replayed",
               d.rpo_seconds if d and d.ok else None),
    ]
    return out


class ReportCollector(Collector):
    """Yields the families of whatever report ``latest()`` returns at scrape time."""

    def __init__(self, latest: Callable[[], StatusReport | None]) -> None:
        self.latest = latest

    def collect(self) -> Iterator:
        report = self.latest()
        if report is not None:
            yield from families(report)


def registry_for(latest: Callable[[], StatusReport | None]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(latest))
    return registry


def render(report: StatusReport) -> str:
    """The Prometheus text format of one report (for tests and `pgvault status --metrics`)."""
    from prometheus_client import generate_latest

    return generate_latest(registry_for(lambda: report)).decode()


def serve(listen: str, registry: CollectorRegistry):
    """Start the /metrics HTTP server on ``listen`` (HOST:PORT) in a thread; returns an object with shutdown()."""
    from prometheus_client import start_http_server

    from pgvault.errors import DaemonError

    host, _sep, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        started = start_http_server(int(port), addr=host, registry=registry)
    except OSError as exc:
        raise DaemonError(f"cannot serve metrics on {listen}: {exc.strerror or exc}",
                          hint="choose a free address in [metrics] listen, or set it to \"\" to serve none") from None
    server = started[0] if isinstance(started, tuple) else None
    return server
