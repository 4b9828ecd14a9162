"""The restore planner: (catalog snapshot, target) → :class:`Plan`, or a :class:`PlanError` — pure.

No storage, no files, no clock: everything comes in as values. The rules:

* **Timelines.** ``--timeline latest`` is the highest timeline the vault knows
  (a history file or archived WAL). Timeline 1 needs no history; a timeline
  N > 1 exists only with its archived ``N.history``. Recovery onto N reads, for
  each segment number, the file :func:`~pgvault.wal.timeline_of_segment` names
  (N's *path*); archived WAL of other timelines is ignored, and so are
  ``.partial`` files (recovery never replays them).
* **Backups.** A backup can serve timeline N when its start and its
  consistency point (the byte before ``stop_lsn``) both lie on the backup's own
  timeline in N's history — PostgreSQL's own check, ``tliOfPointInHistory(
  minRecoveryPoint - 1)`` — and every segment from its start to the one holding
  its stop LSN is archived. Such a backup is *restorable*; its WAL *run* is the
  unbroken stretch of archived segments on the path from its start.
* **Reaching a target** from a restorable backup:

  - time T: the backup's ``stop_time`` ≤ T, and a segment of its run from its
    consistency segment on was completed at or after T (``completed_ms`` bounds
    every commit time inside, so every commit ≤ T is in the WAL up to it). The
    first such segment ends the planned WAL.
  - lsn L: ``stop_lsn`` ≤ L and the segment holding L is in the run.
  - immediate: the WAL up to the consistency point.
  - latest: the run must reach the newest archived segment on the path; WAL
    after a gap cannot be replayed, and restoring short of it would not be
    "latest", so that is refused.
  - xid / name: cannot be located without reading WAL; the plan takes the whole
    run and says so in a note; PostgreSQL (13+) fails if it never meets them.

* The chosen backup is the newest (by consistency LSN, then ``stop_time``) that
  reaches the target, or exactly the one ``backup=`` names. Anything else is a
  :class:`PlanError` naming the restorable window (earliest and latest points).

The planned WAL is the minimum needed; for a time target PostgreSQL reads on
until the first commit after the target, so recovery may fetch a few more
segments through ``restore_command``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Sequence

from pgvault.catalog import ArchivedWal
from pgvault.errors import PlanError
from pgvault.targets import Target, format_time, recovery_settings
from pgvault.wal import (
    DEFAULT_SEGMENT_SIZE,
    HistoryEntry,
    check_segment_size,
    format_lsn,
    history_file_name,
    lsn_to_prev_segno,
    lsn_to_segno,
    segment_name,
    segno_start_lsn,
    timeline_of_lsn,
    timeline_of_segment,
)

#: The restore throughput assumed for the duration estimate, in bytes per second (200 MB/s).
DEFAULT_THROUGHPUT = 200_000_000

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class BackupPoint:
    """What the planner needs of one base backup.

    ``stop_lsn`` is the consistency point (recovery must replay WAL up to it);
    ``stop_time`` is when ``pg_backup_stop`` returned, so every commit before
    the consistency point has a commit time ≤ ``stop_time``. ``bytes_stored``
    is what restoring this backup fetches (for an incremental backup, the
    catalog's total over its ``chain``, the labels from the full backup to this one).
    """

    label: str
    timeline: int
    start_lsn: int
    stop_lsn: int
    start_time: datetime
    stop_time: datetime
    bytes_stored: int
    chain: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.stop_lsn <= self.start_lsn:
            raise ValueError(f"backup {self.label}: stop LSN must be after the start LSN")
        for moment in (self.start_time, self.stop_time):
            if moment.tzinfo is None or moment.utcoffset() is None:
                raise ValueError(f"backup {self.label}: times must be timezone-aware")
        if not self.chain:
            object.__setattr__(self, "chain", (self.label,))


@dataclass(frozen=True)
class CatalogSnapshot:
    """The vault's backups and WAL index at one moment.

    ``histories`` maps a timeline to the parsed entries of its archived
    ``.history`` file (timeline 1 has none). History entries in ``wal`` are
    ignored: ``histories`` is what counts.
    """

    backups: tuple[BackupPoint, ...] = ()
    wal: tuple[ArchivedWal, ...] = ()
    histories: Mapping[int, tuple[HistoryEntry, ...]] = field(default_factory=dict)
    segment_size: int = DEFAULT_SEGMENT_SIZE


# ------------------------------------------------------------------ outputs


@dataclass(frozen=True)
class RestorablePoint:
    """One end of a restorable interval.

    A start is a backup's consistency point (``backup`` is set). An end is the
    end of an unbroken run of archived WAL: ``time`` is the completion time of
    its newest segment, ``lsn`` the first position past it (exclusive) and
    ``segment`` its last segment's name.
    """

    time: datetime
    lsn: int
    backup: str | None = None
    segment: str | None = None


@dataclass(frozen=True)
class RestorableInterval:
    """Targets from ``start`` to ``end`` (times inclusive; LSNs up to, not including, ``end.lsn``)."""

    start: RestorablePoint
    end: RestorablePoint


@dataclass(frozen=True)
class RestorableWindow:
    """What can be restored on one timeline: one interval per unbroken WAL run holding a backup."""

    timeline: int
    intervals: tuple[RestorableInterval, ...]

    @property
    def earliest(self) -> RestorablePoint | None:
        return self.intervals[0].start if self.intervals else None

    @property
    def latest(self) -> RestorablePoint | None:
        return self.intervals[-1].end if self.intervals else None

    def describe(self, unit: str = "time") -> str:
        """``"the restorable window is A .. B"`` (or ``windows are A .. B, C .. D``), in times or LSNs."""
        if not self.intervals:
            return f"nothing is restorable on timeline {self.timeline}"
        spans = ", ".join(f"{_point(i.start, unit)} .. {_point(i.end, unit)}" for i in self.intervals)
        if len(self.intervals) == 1:
            return f"the restorable window is {spans}"
        return f"the restorable windows are {spans}"


@dataclass(frozen=True)
class Plan:
    """Everything a restore will do, decided before it starts.

    ``wal`` is every segment to replay, in replay order, starting with the one
    holding the backup's start LSN, each from the timeline recovery reads it
    from; ``history`` is the target timeline's history.
    """

    target: Target
    timeline: int
    history: tuple[HistoryEntry, ...]
    backup: BackupPoint
    wal: tuple[ArchivedWal, ...]
    wal_bytes: int
    bytes_to_fetch: int
    estimated_seconds: float
    throughput: float
    window: RestorableWindow
    notes: tuple[str, ...] = ()

    @property
    def recovery_settings(self) -> dict[str, str]:
        """The ``recovery_target_*`` settings, pinned to the planned timeline."""
        return recovery_settings(self.target, self.timeline)


# ------------------------------------------------------------------ internals


def _us(moment: datetime) -> int:
    """Microseconds since the Unix epoch (exact integer arithmetic for comparisons)."""
    delta = moment - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _point(point: RestorablePoint, unit: str) -> str:
    return format_lsn(point.lsn) if unit == "lsn" else format_time(point.time)


def _join(numbers: Sequence[int]) -> str:
    return ", ".join(str(n) for n in numbers)


@dataclass(frozen=True)
class _Candidate:
    """A restorable backup on the path, with its WAL positions as segment numbers."""

    backup: BackupPoint
    first: int  # segment holding start_lsn
    consistent: int  # segment holding the byte before stop_lsn
    run_end: int  # last segment of the unbroken run from ``first``

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.backup.stop_lsn, _us(self.backup.stop_time), self.backup.label)


class _Index:
    """The archived segments by (timeline, segno); copies with different content are unusable."""

    def __init__(self, snapshot: CatalogSnapshot) -> None:
        self.segments: dict[tuple[int, int], ArchivedWal] = {}
        self.conflicts: set[tuple[int, int]] = set()
        self.partials: list[ArchivedWal] = []
        for entry in snapshot.wal:
            if entry.file.kind == "partial":
                self.partials.append(entry)
            if entry.file.kind != "segment":
                continue
            assert entry.file.segno is not None
            key = (entry.timeline, entry.file.segno)
            other = self.segments.get(key)
            if other is not None and other.sha256 != entry.sha256:
                self.conflicts.add(key)
            elif other is None or entry.completed_ms < other.completed_ms:
                self.segments[key] = entry
        for key in self.conflicts:
            del self.segments[key]

    def timelines(self, snapshot: CatalogSnapshot) -> set[int]:
        found = {tli for tli, _ in self.segments} | {tli for tli, _ in self.conflicts}
        found |= {p.timeline for p in self.partials} | set(snapshot.histories)
        return found or {1}


class _View:
    """The archive as recovery onto one timeline sees it: path, runs, restorable backups, window."""

    def __init__(self, snapshot: CatalogSnapshot, index: _Index, timeline: int) -> None:
        self.snapshot = snapshot
        self.index = index
        self.timeline = timeline
        self.history = tuple(snapshot.histories.get(timeline, ())) if timeline > 1 else ()
        self.seg = snapshot.segment_size
        # Segments archived on the path, and their unbroken runs.
        present = sorted(s for (tli, s) in index.segments if self.owner(s) == tli)
        self.present = present
        self.runs: list[tuple[int, int]] = []
        for s in present:
            if self.runs and self.runs[-1][1] == s - 1:
                self.runs[-1] = (self.runs[-1][0], s)
            else:
                self.runs.append((s, s))
        self._run_starts = [a for a, _ in self.runs]
        self.candidates: list[_Candidate] = []  # newest first
        self.rejected: dict[str, str] = {}  # label → why it cannot serve this timeline
        for backup in snapshot.backups:
            why = self.why_not_on_path(backup)
            if why is None:
                first = lsn_to_segno(backup.start_lsn, segment_size=self.seg)
                consistent = lsn_to_prev_segno(backup.stop_lsn, segment_size=self.seg)
                run = self.run_of(first)
                if run is not None and run[1] >= consistent:
                    self.candidates.append(_Candidate(backup, first, consistent, run[1]))
                    continue
                why = f"it cannot become consistent: {self.missing_after(first - 1 if run is None else run[1])}"
            self.rejected[backup.label] = why
        self.candidates.sort(key=lambda c: c.key, reverse=True)
        self.window = self._window()

    # -- path

    def owner(self, segno: int) -> int:
        return timeline_of_segment(segno, self.timeline, self.history, segment_size=self.seg)

    def name(self, segno: int) -> str:
        return segment_name(self.owner(segno), segno, segment_size=self.seg)

    def segment(self, segno: int) -> ArchivedWal:
        return self.index.segments[(self.owner(segno), segno)]

    def run_of(self, segno: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self._run_starts, segno) - 1
        if i >= 0 and self.runs[i][0] <= segno <= self.runs[i][1]:
            return self.runs[i]
        return None

    @property
    def last_segno(self) -> int | None:
        return self.present[-1] if self.present else None

    def missing_after(self, segno: int) -> str:
        """Describe the hole that starts right after ``segno`` on the path."""
        first = segno + 1
        if (self.owner(first), first) in self.index.conflicts:
            return f"segment {self.name(first)} is archived twice with different content"
        i = bisect.bisect_right(self.present, first)
        if i == len(self.present):
            return f"segment {self.name(first)} is not archived"
        last = self.present[i] - 1
        if last == first:
            return f"segment {self.name(first)} is missing"
        return f"segments {self.name(first)} .. {self.name(last)} are missing"

    def why_not_on_path(self, backup: BackupPoint) -> str | None:
        """None when ``backup`` lies on this timeline's history, else why not."""
        path = [e.parent_timeline for e in self.history] + [self.timeline]
        label, tli = backup.label, backup.timeline
        if tli not in path:
            return f"backup {label} is on timeline {tli}, which is not in the history of timeline {self.timeline}"
        start_tli = timeline_of_lsn(backup.start_lsn, self.timeline, self.history)
        if path.index(start_tli) < path.index(tli):
            # A timeline begins where the one before it in the history was left.
            begun = dict(zip(path[1:], (e.switch_lsn for e in self.history)))[tli]
            return (
                f"backup {label} starts at {format_lsn(backup.start_lsn)} on timeline {tli}, "
                f"before timeline {tli} began at {format_lsn(begun)}"
            )
        if start_tli != tli or timeline_of_lsn(backup.stop_lsn - 1, self.timeline, self.history) != tli:
            left = next(e.switch_lsn for e in self.history if e.parent_timeline == tli)
            return (
                f"the history of timeline {self.timeline} leaves timeline {tli} at {format_lsn(left)}, "
                f"before backup {label} became consistent at {format_lsn(backup.stop_lsn)}"
            )
        return None

    # -- window

    def _completed_max(self, first: int, last: int) -> int:
        return max(self.segment(s).completed_ms for s in range(first, last + 1))

    def _window(self) -> RestorableWindow:
        by_run: dict[int, _Candidate] = {}
        for c in self.candidates:
            best = by_run.get(c.run_end)
            if best is None or c.key < best.key:
                by_run[c.run_end] = c
        intervals = []
        self.interval_ends = sorted(by_run)  # the last segment of each interval's run
        for run_end in self.interval_ends:
            c = by_run[run_end]  # the earliest backup of the run
            start = RestorablePoint(
                c.backup.stop_time.astimezone(timezone.utc), c.backup.stop_lsn, backup=c.backup.label
            )
            intervals.append(RestorableInterval(start, self.end_of_run(c)))
        return RestorableWindow(self.timeline, tuple(intervals))

    def end_of_run(self, c: _Candidate) -> RestorablePoint:
        """The latest point candidate ``c`` reaches: the end of its WAL run."""
        return RestorablePoint(
            _from_ms(self._completed_max(c.consistent, c.run_end)),
            segno_start_lsn(c.run_end + 1, segment_size=self.seg),
            segment=self.name(c.run_end),
        )

    # -- reaching a target

    def reach(self, c: _Candidate, target: Target) -> int | None:
        """The last segment to replay to reach ``target`` from candidate ``c``, or None if it cannot."""
        if target.kind == "time":
            assert target.time is not None
            t = _us(target.time)
            if _us(c.backup.stop_time) > t:
                return None
            for s in range(c.consistent, c.run_end + 1):
                if self.segment(s).completed_ms * 1000 >= t:
                    return s
            return None
        if target.kind == "lsn":
            assert target.lsn is not None
            if c.backup.stop_lsn > target.lsn:
                return None
            end = max(c.consistent, lsn_to_segno(target.lsn, segment_size=self.seg))
            return end if end <= c.run_end else None
        if target.kind == "immediate":
            return c.consistent
        if target.kind == "latest":
            return c.run_end if c.run_end == self.last_segno else None
        return c.run_end  # xid, name

    def end_point(self, run_end: int) -> str:
        """Why the WAL stops after ``run_end``."""
        last = self.last_segno
        if last is not None and last > run_end:
            return f"after it {self.missing_after(run_end)}"
        return f"the end of the archived WAL, segment {self.name(run_end)}"

    def no_backup_reason(self) -> str:
        if not self.snapshot.backups:
            return "the vault has no backups"
        on_path = [b for b in self.snapshot.backups if self.why_not_on_path(b) is None]
        if not on_path:
            newest = max(self.snapshot.backups, key=lambda b: (b.stop_lsn, _us(b.stop_time), b.label))
            return f"no backup lies on the history of timeline {self.timeline} ({self.rejected[newest.label]})"
        newest = max(on_path, key=lambda b: (b.stop_lsn, _us(b.stop_time), b.label))
        return f"backup {newest.label} {self.rejected[newest.label].removeprefix('it ')}"

    def refusal(self, target: Target) -> PlanError:
        """The error for a target no restorable backup reaches."""
        prefix = f"cannot restore to {target} on timeline {self.timeline}"
        window = self.window
        if not window.intervals:
            return self.error(
                f"{prefix}: no backup can be restored on timeline {self.timeline}: {self.no_backup_reason()}"
            )
        unit = "lsn" if target.kind == "lsn" else "time"
        span = window.describe(unit)
        first, last = window.intervals[0], window.intervals[-1]
        if target.kind in ("time", "lsn"):
            if target.kind == "time":
                assert target.time is not None
                pos = _us(target.time)
                starts = [_us(i.start.time) for i in window.intervals]
                ends = [_us(i.end.time) for i in window.intervals]
                after_end = [pos > e for e in ends]
            else:
                assert target.lsn is not None
                pos = target.lsn
                starts = [i.start.lsn for i in window.intervals]
                ends = [i.end.lsn for i in window.intervals]
                after_end = [pos >= e for e in ends]
            if pos < starts[0]:
                return self.error(
                    f"{prefix}: it is before the earliest restorable point {_point(first.start, unit)} "
                    f"(backup {first.start.backup}); {span}"
                )
            if after_end[-1]:
                return self.error(
                    f"{prefix}: it is after the latest restorable point {_point(last.end, unit)} "
                    f"({self.end_point(self.interval_ends[-1])}); {span}"
                )
            for i in range(len(window.intervals) - 1):
                if after_end[i] and pos < starts[i + 1]:
                    a, b = window.intervals[i], window.intervals[i + 1]
                    return self.error(
                        f"{prefix}: it falls in a gap between the restorable points {_point(a.end, unit)} "
                        f"and {_point(b.start, unit)} (backup {b.start.backup}): "
                        f"{self.missing_after(self.interval_ends[i])}; {span}"
                    )
            return self.error(f"{prefix}: no backup reaches it; {span}")
        if target.kind == "latest":
            return self.error(
                f"{prefix}: the archived WAL cannot be replayed to its end: "
                f"{self.missing_after(self.interval_ends[-1])}; the latest restorable point is "
                f"{format_time(last.end.time)} ({format_lsn(last.end.lsn)}); {span}",
                hint=f"to restore up to the gap, pass --to {format_time(last.end.time)}",
            )
        return self.error(f"{prefix}: no backup reaches it; {span}")  # pragma: no cover - candidates exist

    def forced_refusal(self, target: Target, label: str) -> PlanError:
        """The error for a target the backup named by ``--backup`` does not reach."""
        prefix = f"cannot restore to {target} on timeline {self.timeline} from backup {label}"
        unit = "lsn" if target.kind == "lsn" else "time"
        span = self.window.describe(unit)
        if label in self.rejected:
            return self.error(f"{prefix}: {self.rejected[label]}; {span}")
        c = next(c for c in self.candidates if c.backup.label == label)
        b = c.backup
        if target.time is not None and _us(b.stop_time) > _us(target.time):
            why = f"it became consistent at {format_time(b.stop_time)}, after the target"
        elif target.lsn is not None and b.stop_lsn > target.lsn:
            why = f"it became consistent at {format_lsn(b.stop_lsn)}, after the target"
        else:
            end = self.end_of_run(c)
            why = f"its WAL ends at {_point(end, unit)} ({self.end_point(c.run_end)})"
        return self.error(f"{prefix}: {why}; {span}", hint="choose an older backup, or leave out --backup")

    def error(self, message: str, *, hint: str | None = None) -> PlanError:
        return PlanError(
            message, earliest=self.window.earliest, latest=self.window.latest, window=self.window, hint=hint
        )


def _resolve_timeline(snapshot: CatalogSnapshot, index: _Index, target: Target, timeline: int | str) -> int:
    known = index.timelines(snapshot)
    if timeline == "latest":
        tli = max(known)
        if tli > 1 and tli not in snapshot.histories:
            raise PlanError(
                f"cannot restore to {target} on timeline {tli}: timeline {tli} has archived WAL but no "
                f"{history_file_name(tli)}, so its history is unknown",
                hint="archive the history file from the server's pg_wal, or pass --timeline",
            )
        return tli
    if not isinstance(timeline, int) or isinstance(timeline, bool) or timeline < 1:
        raise ValueError(f"invalid timeline {timeline!r}")
    if timeline > 1 and timeline not in snapshot.histories:
        existing = sorted({1} | set(snapshot.histories))
        message = (
            f"cannot restore to {target} on timeline {timeline}: timeline {timeline} does not exist in the vault "
            f"(no {history_file_name(timeline)} is archived); the vault has timeline"
            f"{'s' if len(existing) > 1 else ''} {_join(existing)}"
        )
        view = _View(snapshot, index, existing[-1])
        if view.window.intervals:
            message += f"; on timeline {existing[-1]} {view.window.describe('lsn' if target.kind == 'lsn' else 'time')}"
        raise PlanError(message, earliest=view.window.earliest, latest=view.window.latest, window=view.window)
    return timeline


# ------------------------------------------------------------------ the planner


def plan_restore(
    snapshot: CatalogSnapshot,
    target: Target,
    *,
    timeline: int | str = "latest",
    backup: str | None = None,
    throughput: float = DEFAULT_THROUGHPUT,
) -> Plan:
    """Plan a restore of ``snapshot`` to ``target`` on ``timeline`` (a number or ``"latest"``).

    ``backup`` forces that backup (by label); ``throughput`` (bytes per second)
    drives the duration estimate. Raises :class:`PlanError` when the target
    cannot be reached exactly, naming the restorable window.
    """
    check_segment_size(snapshot.segment_size)
    if not throughput > 0:
        raise ValueError(f"throughput must be positive, got {throughput!r}")
    index = _Index(snapshot)
    tli = _resolve_timeline(snapshot, index, target, timeline)
    view = _View(snapshot, index, tli)

    chosen: _Candidate | None = None
    end: int | None = None
    if backup is not None:
        if all(b.label != backup for b in snapshot.backups):
            labels = sorted(b.label for b in snapshot.backups)
            have = f"the backups are {', '.join(labels)}" if labels else "the vault has no backups"
            raise view.error(f"cannot restore to {target}: there is no backup {backup!r}; {have}")
        chosen = next((c for c in view.candidates if c.backup.label == backup), None)
        end = None if chosen is None else view.reach(chosen, target)
        if chosen is None or end is None:
            raise view.forced_refusal(target, backup)
    else:
        for candidate in view.candidates:
            end = view.reach(candidate, target)
            if end is not None:
                chosen = candidate
                break
        if chosen is None or end is None:
            raise view.refusal(target)

    wal = tuple(view.segment(s) for s in range(chosen.first, end + 1))
    wal_bytes = sum(w.size for w in wal)
    total = chosen.backup.bytes_stored + wal_bytes
    return Plan(
        target=target,
        timeline=tli,
        history=view.history,
        backup=chosen.backup,
        wal=wal,
        wal_bytes=wal_bytes,
        bytes_to_fetch=total,
        estimated_seconds=total / throughput,
        throughput=throughput,
        window=view.window,
        notes=tuple(_notes(view, chosen, end, target)),
    )


def _notes(view: _View, chosen: _Candidate, end: int, target: Target) -> list[str]:
    notes = []
    if target.kind in ("xid", "name"):
        what = "transaction" if target.kind == "xid" else "restore point"
        notes.append(
            f"xid/name targets cannot be located before replay: the plan includes all WAL to the end of "
            f"the archived run on timeline {view.timeline} ({view.name(end)}); the restore verifies the "
            f"{what} was reached"
        )
        notes.append(
            f"the {what} must come after backup {chosen.backup.label} became consistent "
            f"({format_time(chosen.backup.stop_time)}); if it is older, pass --backup with an older backup"
        )
        if view.last_segno is not None and view.last_segno > end:
            notes.append(f"WAL archived after the gap is not reachable: {view.missing_after(end)}")
    if target.kind == "time" and end == chosen.run_end:
        notes.append(
            f"the target is in the last archived segment of this run ({view.name(end)}): recovery stops at "
            "the first commit after the target; if none is archived, recovery ends before the target "
            "and the restore reports it"
        )
    if target.kind in ("latest", "xid", "name"):
        for partial in view.index.partials:
            if partial.timeline == view.timeline and (partial.file.segno or 0) > end:
                notes.append(f"{partial.name} (the unfinished end of timeline {view.timeline}) is not replayed")
    if len(chosen.backup.chain) > 1:
        notes.append(f"incremental backup: restores the chain {' → '.join(chosen.backup.chain)}")
    return notes


# ------------------------------------------------------------------ output


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _human_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{max(round(seconds), 1)} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _wal_stretches(plan: Plan) -> list[tuple[int, ArchivedWal, ArchivedWal]]:
    """Consecutive planned segments grouped by timeline: (timeline, first, last)."""
    stretches: list[tuple[int, ArchivedWal, ArchivedWal]] = []
    for w in plan.wal:
        if stretches and stretches[-1][0] == w.timeline:
            stretches[-1] = (w.timeline, stretches[-1][1], w)
        else:
            stretches.append((w.timeline, w, w))
    return stretches


def _point_dict(point: RestorablePoint | None) -> dict[str, Any] | None:
    if point is None:
        return None
    out: dict[str, Any] = {"time": format_time(point.time), "lsn": format_lsn(point.lsn)}
    if point.backup is not None:
        out["backup"] = point.backup
    if point.segment is not None:
        out["segment"] = point.segment
    return out


def describe_window(window: RestorableWindow) -> dict[str, Any]:
    """A restorable window as JSON-ready data."""
    return {
        "timeline": window.timeline,
        "earliest": _point_dict(window.earliest),
        "latest": _point_dict(window.latest),
        "intervals": [{"start": _point_dict(i.start), "end": _point_dict(i.end)} for i in window.intervals],
    }


def describe_plan(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data (for ``pgvault plan --json``)."""
    target: dict[str, Any] = {"kind": plan.target.kind, "text": str(plan.target)}
    if plan.target.time is not None:
        target["time"] = format_time(plan.target.time)
    if plan.target.lsn is not None:
        target["lsn"] = format_lsn(plan.target.lsn)
    if plan.target.xid is not None:
        target["xid"] = plan.target.xid
    if plan.target.name is not None:
        target["name"] = plan.target.name
    b = plan.backup
    return {
        "target": target,
        "timeline": plan.timeline,
        "history": [
            {"parent_timeline": e.parent_timeline, "switch_lsn": format_lsn(e.switch_lsn)} for e in plan.history
        ],
        "backup": {
            "label": b.label,
            "timeline": b.timeline,
            "start_lsn": format_lsn(b.start_lsn),
            "stop_lsn": format_lsn(b.stop_lsn),
            "start_time": format_time(b.start_time),
            "stop_time": format_time(b.stop_time),
            "bytes_stored": b.bytes_stored,
            "chain": list(b.chain),
        },
        "wal": {
            "segments": len(plan.wal),
            "bytes": plan.wal_bytes,
            "first": plan.wal[0].name if plan.wal else None,
            "last": plan.wal[-1].name if plan.wal else None,
            "files": [
                {"name": w.name, "timeline": w.timeline, "segno": w.file.segno, "size": w.size, "sha256": w.sha256}
                for w in plan.wal
            ],
        },
        "bytes_to_fetch": plan.bytes_to_fetch,
        "throughput": plan.throughput,
        "estimated_seconds": round(plan.estimated_seconds, 3),
        "window": describe_window(plan.window),
        "recovery_settings": plan.recovery_settings,
        "notes": list(plan.notes),
    }


def format_plan(plan: Plan) -> str:
    """The plan as text for people (``pgvault plan``)."""
    b = plan.backup
    lines = [f"Restore to {plan.target} on timeline {plan.timeline}"]
    lines.append(
        f"  backup    {b.label} (timeline {b.timeline}, consistent at {format_lsn(b.stop_lsn)}, "
        f"{format_time(b.stop_time)}), {_human_bytes(b.bytes_stored)}"
    )
    if len(b.chain) > 1:
        lines.append(f"  chain     {' → '.join(b.chain)}")
    stretches = ", then ".join(
        f"timeline {tli}: {first.name} .. {last.name}" if first is not last else f"timeline {tli}: {first.name}"
        for tli, first, last in _wal_stretches(plan)
    )
    plural = "s" if len(plan.wal) != 1 else ""
    lines.append(f"  WAL       {len(plan.wal)} segment{plural}, {_human_bytes(plan.wal_bytes)}")
    lines.append(f"            {stretches}")
    lines.append(
        f"  fetch     {_human_bytes(plan.bytes_to_fetch)}, about {_human_seconds(plan.estimated_seconds)} "
        f"at {plan.throughput / 1e6:g} MB/s"
    )
    spans = [f"{format_time(i.start.time)} .. {format_time(i.end.time)}" for i in plan.window.intervals]
    lines.append(f"  window    {spans[0] if spans else '-'}")
    lines.extend(f"            {s}" for s in spans[1:])
    settings = [f"{k} = {v}" for k, v in plan.recovery_settings.items()]
    lines.append(f"  settings  {settings[0]}")
    lines.extend(f"            {s}" for s in settings[1:])
    lines.extend(f"  note: {n}" for n in plan.notes)
    return "\n".join(lines)


def restorable_window(snapshot: CatalogSnapshot, *, timeline: int | str = "latest") -> RestorableWindow:
    """What can be restored today on ``timeline`` (``"latest"``: the newest timeline), with no target in mind."""
    check_segment_size(snapshot.segment_size)
    index = _Index(snapshot)
    tli = _resolve_timeline(snapshot, index, Target(kind="latest"), timeline)
    return _View(snapshot, index, tli).window
