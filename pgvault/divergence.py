"""Did a node write WAL the new primary never saw? Pure functions, no I/O.

A node (say the old primary) holds WAL on its own timeline path; the current
primary's timeline has a history (its ``.history`` file). The two agree up to
the **fork point**: the first LSN at which the timeline each history assigns
differs. WAL the node holds at or beyond the fork point is a diverged tail: it
never reached the new primary, so replaying it would split the cluster in two,
and throwing it away would lose acknowledged commits. Reseed keeps it (see
:mod:`pgvault.orphans`) before it touches the node.

The tail is read with ``pg_waldump`` (PostgreSQL's own reader: it checks every
record's CRC and page address, so recycled segments never count); this module
parses its output and ``pg_controldata``'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pgvault.errors import WalFormatError
from pgvault.wal import HistoryEntry, format_lsn, parse_lsn, timeline_of_lsn


def timeline_path(timeline: int, history: Sequence[HistoryEntry]) -> list[tuple[int, int, int | None]]:
    """``[(timeline, first LSN, end LSN or None), …]``: which timeline holds which WAL, oldest first.

    ``history`` is ``timeline``'s own history (empty for timeline 1). The last
    stretch, the timeline itself, is open-ended (``None``).
    """
    path, start = [], 0
    for entry in history:
        path.append((entry.parent_timeline, start, entry.switch_lsn))
        start = entry.switch_lsn
    path.append((timeline, start, None))
    return path


def fork_point(node_timeline: int, node_history: Sequence[HistoryEntry],
               primary_timeline: int, primary_history: Sequence[HistoryEntry]) -> int | None:
    """The first LSN whose WAL the node and the primary read from different timelines (None: they never part).

    Both histories describe the path from timeline 1; the timelines they assign
    are step functions of the LSN that only change at switch points, so it is
    enough to compare them at 0 and at each switch point, in order.
    """
    points = sorted({0} | {e.switch_lsn for e in node_history} | {e.switch_lsn for e in primary_history})
    for lsn in points:
        if timeline_of_lsn(lsn, node_timeline, node_history) != timeline_of_lsn(lsn, primary_timeline, primary_history):
            return lsn
    return None


def tail_stretches(node_timeline: int, node_history: Sequence[HistoryEntry],
                   fork: int) -> list[tuple[int, int, int | None]]:
    """The node's own WAL from ``fork`` on: ``[(timeline, start, end or None), …]``, each read with pg_waldump -t."""
    out = []
    for tli, start, end in timeline_path(node_timeline, node_history):
        if end is not None and end <= fork:
            continue
        out.append((tli, max(start, fork), end))
    return out


# --- pg_controldata ---------------------------------------------------------------------


@dataclass(frozen=True)
class ControlData:
    """What reseed needs of a data directory's pg_control (from ``pg_controldata``)."""

    system_identifier: int
    state: str  # e.g. "shut down", "in production", "in archive recovery", "shut down in recovery"
    checkpoint_lsn: int
    redo_lsn: int
    timeline: int  # the latest checkpoint's timeline
    min_recovery_lsn: int
    min_recovery_timeline: int

    def to_dict(self) -> dict:
        return {"system_identifier": str(self.system_identifier), "state": self.state,
                "checkpoint_lsn": format_lsn(self.checkpoint_lsn), "redo_lsn": format_lsn(self.redo_lsn),
                "timeline": self.timeline, "min_recovery_lsn": format_lsn(self.min_recovery_lsn),
                "min_recovery_timeline": self.min_recovery_timeline}


_CONTROL_FIELDS = {
    "system_identifier": "Database system identifier",
    "state": "Database cluster state",
    "checkpoint_lsn": "Latest checkpoint location",
    "redo_lsn": "Latest checkpoint's REDO location",
    "timeline": "Latest checkpoint's TimeLineID",
    "min_recovery_lsn": "Minimum recovery ending location",
    "min_recovery_timeline": "Min recovery ending loc's timeline",
}


def parse_controldata(text: str, *, source: str = "pg_controldata") -> ControlData:
    """Parse ``pg_controldata`` output (run with LC_ALL=C: the labels are translated otherwise)."""
    found = {}
    for line in text.splitlines():
        label, sep, value = line.partition(":")
        if sep:
            found[label.strip()] = value.strip()
    values = {}
    for name, label in _CONTROL_FIELDS.items():
        if label not in found:
            raise WalFormatError(f"{source}: no {label!r} line in its output")
        values[name] = found[label]
    try:
        return ControlData(
            system_identifier=int(values["system_identifier"]), state=values["state"],
            checkpoint_lsn=parse_lsn(values["checkpoint_lsn"]), redo_lsn=parse_lsn(values["redo_lsn"]),
            timeline=int(values["timeline"]), min_recovery_lsn=parse_lsn(values["min_recovery_lsn"]),
            min_recovery_timeline=int(values["min_recovery_timeline"]))
    except ValueError as exc:
        raise WalFormatError(f"{source}: unreadable value: {exc}") from None


# --- pg_waldump -------------------------------------------------------------------------


_RECORD = re.compile(r"^rmgr: (?P<rmgr>\S+)\s+len \(rec/tot\):\s*(?P<rec>\d+)/\s*(?P<tot>\d+), tx:\s*(?P<xid>\d+), "
                     r"lsn: (?P<lsn>[0-9A-Fa-f]+/[0-9A-Fa-f]+), prev [0-9A-Fa-f]+/[0-9A-Fa-f]+, desc: (?P<desc>.*)$")
_XACT = re.compile(r"^(?P<kind>COMMIT|COMMIT_PREPARED|ABORT|ABORT_PREPARED)\b(?: \d+:)?\s*"
                   r"(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,6})?) UTC")
_END = re.compile(r"\bat (?P<lsn>[0-9A-Fa-f]+/[0-9A-Fa-f]+)")


@dataclass(frozen=True)
class TailSummary:
    """What a stretch of WAL holds, as pg_waldump saw it."""

    records: int = 0
    commits: int = 0
    aborts: int = 0
    first_lsn: int | None = None
    last_lsn: int | None = None  # start of the last valid record
    end_lsn: int | None = None  # where the valid WAL ends (pg_waldump's final error), if it said
    first_commit_time: datetime | None = None
    last_commit_time: datetime | None = None
    commit_xids: tuple[int, ...] = ()

    def merge(self, other: TailSummary) -> TailSummary:
        if not other.records:
            return self
        if not self.records:
            return other
        times = [t for t in (self.first_commit_time, other.first_commit_time) if t is not None]
        lasts = [t for t in (self.last_commit_time, other.last_commit_time) if t is not None]
        return TailSummary(
            records=self.records + other.records, commits=self.commits + other.commits,
            aborts=self.aborts + other.aborts, first_lsn=self.first_lsn, last_lsn=other.last_lsn,
            end_lsn=other.end_lsn, first_commit_time=min(times, default=None),
            last_commit_time=max(lasts, default=None), commit_xids=self.commit_xids + other.commit_xids)


def _utc(text: str) -> datetime:
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in text else "%Y-%m-%d %H:%M:%S"
    return datetime.strptime(text, fmt).replace(tzinfo=UTC)


def summarize_waldump(lines: Iterable[str], *, stderr: str = "") -> TailSummary:
    """Count the records, commits and aborts in pg_waldump's output (run with TZ=UTC).

    Lines that are not records are ignored; ``stderr`` holds pg_waldump's last
    words, whose "… at X/Y" names where the valid WAL ends.
    """
    records = commits = aborts = 0
    first = last = None
    first_time = last_time = None
    xids: list[int] = []
    for line in lines:
        m = _RECORD.match(line.rstrip("\n"))
        if m is None:
            continue
        records += 1
        lsn = parse_lsn(m["lsn"])
        first = lsn if first is None else first
        last = lsn
        if m["rmgr"] != "Transaction":
            continue
        x = _XACT.match(m["desc"])
        if x is None:
            continue
        if x["kind"].startswith("COMMIT"):
            commits += 1
            xids.append(int(m["xid"]))
            moment = _utc(x["time"])
            first_time = moment if first_time is None else min(first_time, moment)
            last_time = moment if last_time is None else max(last_time, moment)
        else:
            aborts += 1
    end = None
    ends = _END.findall(stderr.strip().splitlines()[-1]) if stderr.strip() else []
    if ends:
        end = parse_lsn(ends[-1])
    return TailSummary(records=records, commits=commits, aborts=aborts, first_lsn=first, last_lsn=last,
                       end_lsn=end, first_commit_time=first_time, last_commit_time=last_time,
                       commit_xids=tuple(xids))
