"""When the daemon's jobs run: cron schedules, catch-up of missed runs, jitter — pure, with an injected clock.

Nothing here sleeps, reads a clock or starts anything: the daemon asks
:meth:`Scheduler.due` what to do at the moment it passes in, and
:meth:`Scheduler.next_wakeup` when to ask again. Tests drive it with made-up
moments.

- Cron strings are croniter's: five fields (minute hour day month weekday), or
  six with seconds as the *last* field (``* * * * * */10``: every ten seconds).
  They are evaluated in ``timezone`` (an IANA name), so ``0 2 * * *`` is 02:00
  local time across daylight-saving changes.
- Missed runs: runs that fell due while the daemon was down are not replayed
  one by one. At start-up, a job whose most recent scheduled time is after its
  last recorded start, and no further back than ``catch_up``, runs once.
  A job the daemon has never run is not caught up (there was no run to miss).
  Runs missed while the daemon was up but busy coalesce the same way: one run.
- Jitter: each run starts up to ``jitter`` seconds after its scheduled time,
  chosen by the injected random source, so that many nodes on one schedule do
  not hit a shared vault at the same second.
- A job that falls due while it is still running (or waiting to run) is
  skipped; the decision says so, and the daemon logs it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

#: The jobs the daemon knows, in the order they run when they fall due at the same moment:
#: backups before the dump, expiry after them, the checks last (they read what the others wrote).
JOBS = ("full", "incremental", "dump", "expire", "verify", "drill")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> float:
    """Seconds in ``"90s"``, ``"15m"``, ``"1h"``, ``"14d"``, ``"2w"`` (a bare number is seconds); ValueError otherwise."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return float(m[1]) * _UNIT_SECONDS[m[2]]


def is_valid_cron(expression: str) -> bool:
    """A cron string croniter accepts: 5 fields, or 6 with seconds last."""
    from croniter import croniter

    return isinstance(expression, str) and len(expression.split()) in (5, 6) and croniter.is_valid(expression)


def is_valid_timezone(name: str) -> bool:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class JobSchedule:
    job: str
    cron: str


@dataclass(frozen=True)
class ScheduleConfig:
    """The ``[schedule]`` section as plain values (seconds, not strings)."""

    jobs: tuple[JobSchedule, ...]
    timezone: str = "UTC"
    catch_up: float = 3600.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        for js in self.jobs:
            if js.job not in JOBS:
                raise ValueError(f"unknown job {js.job!r}: one of {', '.join(JOBS)}")
            if not is_valid_cron(js.cron):
                raise ValueError(f"[schedule] {js.job} = {js.cron!r} is not a cron expression")
        if not is_valid_timezone(self.timezone):
            raise ValueError(f"unknown timezone {self.timezone!r}")
        if self.catch_up < 0 or self.jitter < 0:
            raise ValueError("catch_up and jitter must not be negative")


def schedule_config(section) -> ScheduleConfig:
    """ScheduleConfig from the config's ScheduleSettings (already validated by config)."""
    jobs = tuple(JobSchedule(job, getattr(section, job)) for job in JOBS if getattr(section, job))
    return ScheduleConfig(jobs=jobs, timezone=section.timezone, catch_up=parse_duration(section.catch_up),
                          jitter=parse_duration(section.jitter))


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("times must be timezone-aware")
    return moment


def next_time(cron: str, after: datetime, tz: str) -> datetime:
    """The first scheduled moment strictly after ``after`` (in UTC)."""
    from zoneinfo import ZoneInfo

    from croniter import croniter

    local = _aware(after).astimezone(ZoneInfo(tz))
    return croniter(cron, local).get_next(datetime).astimezone(UTC)


def previous_time(cron: str, at: datetime, tz: str) -> datetime:
    """The last scheduled moment at or before ``at`` (in UTC)."""
    from zoneinfo import ZoneInfo

    from croniter import croniter

    local = _aware(at).astimezone(ZoneInfo(tz))
    # croniter's get_prev is strictly before its start: start a microsecond later to include ``at`` itself
    return croniter(cron, local + timedelta(microseconds=1)).get_prev(datetime).astimezone(UTC)


@dataclass(frozen=True)
class Decision:
    """What to do with one job at one moment: ``run`` it, or ``skip`` it (``reason`` says why)."""

    job: str
    action: str  # "run" | "skip"
    scheduled_for: datetime  # the cron moment (before jitter)
    reason: str = ""
    catch_up: bool = False


@dataclass
class _Slot:
    cron: str
    scheduled_for: datetime  # the next cron moment
    fire_at: datetime  # scheduled_for + jitter
    catch_up: bool = False


@dataclass
class Scheduler:
    """Which jobs are due at a given moment; state is only each job's next run."""

    config: ScheduleConfig
    rng: random.Random = field(default_factory=random.Random)
    _slots: dict[str, _Slot] = field(default_factory=dict, init=False)

    def start(self, now: datetime, last_started: Mapping[str, datetime | None] | None = None) -> list[str]:
        """Set every job's next run from ``now``; returns the jobs caught up (due at once).

        ``last_started`` is when each job last started (from the daemon's state);
        a job missing from it is not caught up.
        """
        last_started = last_started or {}
        caught = []
        self._slots = {}
        for js in self.config.jobs:
            missed = previous_time(js.cron, now, self.config.timezone)
            last = last_started.get(js.job)
            if (last is not None and _aware(last) < missed
                    and (now - missed).total_seconds() <= self.config.catch_up):
                self._slots[js.job] = _Slot(js.cron, missed, now, catch_up=True)
                caught.append(js.job)
            else:
                self._slots[js.job] = self._slot(js.cron, now)
        return caught

    def reschedule(self, config: ScheduleConfig, now: datetime) -> None:
        """A new configuration (SIGHUP): unchanged jobs keep their next run, others start from ``now``."""
        old, same_zone = self._slots, config.timezone == self.config.timezone
        self.config = config
        self._slots = {}
        for js in config.jobs:
            kept = old.get(js.job)
            if kept is not None and kept.cron == js.cron and same_zone:
                self._slots[js.job] = kept
            else:
                self._slots[js.job] = self._slot(js.cron, now)

    def _slot(self, cron: str, after: datetime) -> _Slot:
        at = next_time(cron, after, self.config.timezone)
        delay = self.rng.uniform(0, self.config.jitter) if self.config.jitter else 0.0
        return _Slot(cron, at, at + timedelta(seconds=delay))

    def due(self, now: datetime, busy: Iterable[str] = ()) -> list[Decision]:
        """The jobs whose time has come at ``now``, in :data:`JOBS` order; each then moves to its next run.

        ``busy`` are the jobs running or waiting to run: one of them that falls due
        again is skipped, never queued twice. Several missed moments of one job
        (the daemon was busy or suspended) give one decision.
        """
        busy = set(busy)
        decisions = []
        for job in JOBS:
            slot = self._slots.get(job)
            if slot is None or slot.fire_at > now:
                continue
            if job in busy:
                decisions.append(Decision(job, "skip", slot.scheduled_for,
                                          reason="its previous run is still running or waiting to run"))
            else:
                decisions.append(Decision(job, "run", slot.scheduled_for, catch_up=slot.catch_up))
            self._slots[job] = self._slot(slot.cron, max(now, slot.scheduled_for))
        return decisions

    def next_wakeup(self) -> datetime | None:
        """The earliest moment a job falls due (None: nothing is scheduled)."""
        return min((s.fire_at for s in self._slots.values()), default=None)

    def upcoming(self) -> dict[str, datetime]:
        """Each scheduled job's next cron moment (for status and logs)."""
        return {job: slot.scheduled_for for job, slot in self._slots.items()}


class JobQueue:
    """Jobs wait here and run one at a time, in the order they fell due.

    One at a time because they share the vault: backups and dumps hold its
    backup lock, expiry deletes what verify and drill read.
    """

    def __init__(self) -> None:
        self._waiting: list[Decision] = []
        self.running: str | None = None

    def busy(self) -> set[str]:
        return {d.job for d in self._waiting} | ({self.running} if self.running else set())

    def add(self, decision: Decision) -> None:
        if decision.action == "run":
            self._waiting.append(decision)

    def take(self) -> Decision | None:
        """The next job to start, if none runs now."""
        if self.running is not None or not self._waiting:
            return None
        decision = self._waiting.pop(0)
        self.running = decision.job
        return decision

    def finished(self) -> None:
        self.running = None

    def waiting(self) -> list[str]:
        return [d.job for d in self._waiting]

    def clear(self) -> list[str]:
        dropped = self.waiting()
        self._waiting = []
        return dropped
