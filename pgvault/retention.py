"""Retention: (catalog, policy, now) → :class:`ExpiryPlan` — pure, no storage, no clock.

The rules (``[retention]``; a backup or dump is kept when any rule keeps it):

* ``full = N``: the N newest full backups are kept, each with every incremental
  built on it.
* ``window = "14d"``: every point of the last 14 days stays restorable. Every
  backup that became consistent inside the window is kept, and so is the
  newest one that became consistent at or before the window start (the
  *anchor*): a restore to the window start begins there.
* Whatever a kept backup is built on (its incremental chain) is kept with it,
  so the backups removed are closed under "built on": no kept backup ever
  reads an object of a removed one.
* An incremental whose chain is broken (a backup of it is missing) cannot be
  restored: it goes, once backup retention is configured.
* The newest restorable backup is always kept.
* WAL: segments (and ``.partial``/``.backup`` files) below the segment where
  the oldest kept backup starts go — no kept backup and no point of the window
  needs them. ``.history`` files never go (nor ``orphans/``: not WAL index keys).
* ``dumps = N``: the N newest logical dumps are kept.

With a rule unset, what it governs is kept: no ``full`` and no ``window`` keeps
every backup and all WAL; no ``dumps`` keeps every dump. No ``[retention]`` at
all removes nothing.

This module imports nothing heavier than the standard library at import time:
the config loader uses :func:`parse_window` to validate ``[retention] window``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    from pgvault.catalog import ArchivedWal

WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_WINDOW = re.compile(r"^([0-9]{1,7})([smhdw])$")
WINDOW_EXPECTED = 'a positive duration: a number and a unit s, m, h, d or w, e.g. "14d" or "36h"'


def parse_window(text: object) -> timedelta:
    """``"14d"`` → 14 days; units s, m, h, d, w. ValueError (naming what is expected) otherwise."""
    match = _WINDOW.match(text) if isinstance(text, str) else None
    if match is None or int(match[1]) == 0:
        raise ValueError(f"{text!r} is not {WINDOW_EXPECTED}")
    return timedelta(seconds=int(match[1]) * WINDOW_UNITS[match[2]])


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class RetentionPolicy:
    """What ``[retention]`` asks for; None: that rule is not configured (it keeps everything it governs)."""

    full: int | None = None
    window: str | None = None  # as configured, e.g. "14d"
    dumps: int | None = None

    def __post_init__(self) -> None:
        for name in ("full", "dumps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"[retention] {name} must be an integer of at least 1, got {value!r}")
        if self.window is not None:
            parse_window(self.window)

    @property
    def window_delta(self) -> timedelta | None:
        return None if self.window is None else parse_window(self.window)

    @property
    def governs_backups(self) -> bool:
        return self.full is not None or self.window is not None

    @property
    def empty(self) -> bool:
        return not self.governs_backups and self.dumps is None

    def describe(self) -> str:
        parts = [f"full = {self.full}" if self.full is not None else None,
                 f'window = "{self.window}"' if self.window is not None else None,
                 f"dumps = {self.dumps}" if self.dumps is not None else None]
        return ", ".join(p for p in parts if p) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {"full": self.full, "window": self.window, "dumps": self.dumps}


def policy_from_settings(section: Any) -> RetentionPolicy:
    """The policy of a ``[retention]`` settings section (anything with ``full``, ``window``, ``dumps``)."""
    return RetentionPolicy(full=section.full, window=section.window, dumps=section.dumps)


@dataclass(frozen=True)
class BackupInfo:
    """What retention needs of one committed backup."""

    label: str  # labels sort by start time
    parent: str | None  # None: a full backup
    timeline: int
    start_lsn: int
    stop_time: datetime  # when it became consistent

    @property
    def kind(self) -> str:
        return "full" if self.parent is None else "incr"


@dataclass(frozen=True)
class RetentionCatalog:
    """The vault's committed backups, committed dumps (labels) and archived WAL at one moment."""

    backups: tuple[BackupInfo, ...] = ()
    dumps: tuple[str, ...] = ()
    wal: tuple[ArchivedWal, ...] = ()
    segment_size: int = 16 * 1024 * 1024


# ------------------------------------------------------------------ outputs


@dataclass(frozen=True)
class Decision:
    """One backup or dump, kept or expired, and why."""

    label: str
    kind: str  # "full", "incr" or "dump"
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class ExpiryPlan:
    """What expiry removes and keeps, decided before anything is touched.

    ``expire_backups`` is in removal order: newest first, so an incremental
    always goes before what it is built on. ``expire_wal`` is oldest first, so
    what remains after an interruption is still one unbroken stretch.
    ``wal_keep_from`` is the segment the oldest kept backup starts in (WAL
    before it goes), None when no backup is kept or backup retention is unset.
    """

    policy: RetentionPolicy
    now: datetime
    window_start: datetime | None
    keep_backups: tuple[Decision, ...]
    expire_backups: tuple[Decision, ...]
    keep_dumps: tuple[Decision, ...]
    expire_dumps: tuple[Decision, ...]
    expire_wal: tuple[ArchivedWal, ...]
    wal_keep_from: str | None
    wal_reason: str
    notes: tuple[str, ...] = ()

    @property
    def removes_nothing(self) -> bool:
        return not (self.expire_backups or self.expire_dumps or self.expire_wal)

    @property
    def expire_wal_bytes(self) -> int:
        return sum(w.size for w in self.expire_wal)


# ------------------------------------------------------------------ the plan


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def _chains(backups: Iterable[BackupInfo]) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """(label → its chain from the full backup, label → the missing backup that breaks its chain)."""
    by_label = {b.label: b for b in backups}
    chains: dict[str, tuple[str, ...]] = {}
    broken: dict[str, str] = {}
    for label in by_label:
        chain: list[str] = []
        current: str | None = label
        while current is not None:
            if current not in by_label or current in chain:
                broken[label] = current
                break
            chain.append(current)
            current = by_label[current].parent
        else:
            chains[label] = tuple(reversed(chain))
    return chains, broken


def plan_expiry(catalog: RetentionCatalog, policy: RetentionPolicy, now: datetime) -> ExpiryPlan:
    """Decide what ``policy`` removes from ``catalog`` at ``now`` (timezone-aware)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    notes: list[str] = []
    if policy.empty:
        notes.append("no [retention] policy is configured: nothing is removed "
                     "(set [retention] full, window or dumps)")
    window_start = now - policy.window_delta if policy.window is not None else None
    keep_backups, expire_backups, keep_from = _backups(catalog, policy, window_start, notes)
    expire_wal, wal_name, wal_reason = _wal(catalog, policy, keep_from)
    keep_dumps, expire_dumps = _dumps(catalog, policy)
    return ExpiryPlan(
        policy=policy, now=now, window_start=window_start,
        keep_backups=keep_backups, expire_backups=expire_backups,
        keep_dumps=keep_dumps, expire_dumps=expire_dumps,
        expire_wal=expire_wal, wal_keep_from=wal_name, wal_reason=wal_reason, notes=tuple(notes),
    )


def _backups(catalog: RetentionCatalog, policy: RetentionPolicy, window_start: datetime | None,
             notes: list[str]) -> tuple[tuple[Decision, ...], tuple[Decision, ...], BackupInfo | None]:
    """(kept, expired newest first, the kept backup that starts first — None if nothing is kept)."""
    by_label = {b.label: b for b in catalog.backups}
    labels = sorted(by_label)
    if not policy.governs_backups:
        kept = tuple(Decision(lbl, by_label[lbl].kind,
                              ("no backup retention is configured ([retention] full, window)",)) for lbl in labels)
        return kept, (), None
    chains, broken = _chains(catalog.backups)
    why_kept: dict[str, list[str]] = {}

    def keep(label: str, reason: str) -> None:
        why_kept.setdefault(label, []).append(reason)
        for ancestor in chains[label][:-1]:
            why_kept.setdefault(ancestor, []).append(f"backup {label} is built on it")

    restorable = [lbl for lbl in labels if lbl in chains]
    fulls = [lbl for lbl in restorable if by_label[lbl].parent is None]
    newest_fulls: list[str] = []
    if policy.full is not None:
        newest_fulls = fulls[-policy.full:]
        for lbl in restorable:
            root = chains[lbl][0]
            if root in newest_fulls:
                keep(lbl, f"full = {policy.full}: one of the {policy.full} newest full backups" if root == lbl
                     else f"full = {policy.full}: built on full backup {root}, one of the {policy.full} newest")
    anchor: str | None = None
    if window_start is not None:
        ws = _time(window_start)
        before = [lbl for lbl in restorable if by_label[lbl].stop_time <= window_start]
        anchor = max(before, key=lambda lbl: (by_label[lbl].stop_time, lbl), default=None)
        for lbl in restorable:
            stop = by_label[lbl].stop_time
            if stop > window_start:
                keep(lbl, f'window = "{policy.window}": consistent at {_time(stop)}, inside the window (since {ws})')
            elif lbl == anchor:
                keep(lbl, f'window = "{policy.window}": the newest backup consistent before the window start '
                          f"{ws}: restores to the start of the window begin here")
    if restorable:
        newest = max(restorable, key=lambda lbl: (by_label[lbl].stop_time, lbl))
        if newest not in why_kept:
            keep(newest, "the newest backup is always kept")

    kept = tuple(Decision(lbl, by_label[lbl].kind, tuple(why_kept[lbl])) for lbl in labels if lbl in why_kept)
    expired = []
    for lbl in reversed(labels):
        if lbl in why_kept:
            continue
        b = by_label[lbl]
        if lbl in broken:
            reasons = [f"its incremental chain is broken (backup {broken[lbl]} is missing): it cannot be restored"]
        else:
            reasons = []
            if policy.full is not None:
                root = chains[lbl][0]
                reasons.append(f"full = {policy.full}: not one of the {policy.full} newest full backups" if root == lbl
                               else f"full = {policy.full}: built on full backup {root}, which is not one of the "
                                    f"{policy.full} newest")
            if window_start is not None:
                reasons.append(f'window = "{policy.window}": consistent at {_time(b.stop_time)}, before the window '
                               f"start {_time(window_start)}, and the newer backup {anchor} covers the window start")
        expired.append(Decision(lbl, b.kind, tuple(reasons)))
    oldest = min((by_label[d.label] for d in kept), key=lambda b: b.start_lsn, default=None)
    if not kept:
        notes.append("the vault has no restorable backup: no WAL is removed")
    return kept, tuple(expired), oldest


def _wal(catalog: RetentionCatalog, policy: RetentionPolicy,
         oldest_kept: BackupInfo | None) -> tuple[tuple[ArchivedWal, ...], str | None, str]:
    if not policy.governs_backups:
        return (), None, "no backup retention is configured: all WAL is kept"
    if oldest_kept is None:
        return (), None, "no backup is kept: all WAL is kept"
    from pgvault.wal import lsn_to_segno, segment_name

    cutoff = lsn_to_segno(oldest_kept.start_lsn, segment_size=catalog.segment_size)
    first_kept = segment_name(oldest_kept.timeline, cutoff, segment_size=catalog.segment_size)
    expired = sorted((w for w in catalog.wal if w.file.kind != "history" and w.file.segno is not None
                      and w.file.segno < cutoff),
                     key=lambda w: (w.file.segno, w.timeline, w.name, w.sha256))
    reason = (f"older than {first_kept}, the segment where the oldest kept backup {oldest_kept.label} starts: "
              "no kept backup and no point of the window needs them")
    return tuple(expired), first_kept, reason


def _dumps(catalog: RetentionCatalog, policy: RetentionPolicy) -> tuple[tuple[Decision, ...], tuple[Decision, ...]]:
    labels = sorted(catalog.dumps)
    if policy.dumps is None:
        return tuple(Decision(lbl, "dump", ("no dump retention is configured ([retention] dumps)",))
                     for lbl in labels), ()
    n = policy.dumps
    kept = tuple(Decision(lbl, "dump", (f"dumps = {n}: one of the {n} newest dumps",)) for lbl in labels[-n:])
    expired = tuple(Decision(lbl, "dump", (f"dumps = {n}: older than the {n} newest dumps",))
                    for lbl in reversed(labels[:-n]))
    return kept, expired


# ------------------------------------------------------------------ output


def describe_plan(plan: ExpiryPlan) -> dict[str, Any]:
    """The plan as JSON-ready data."""
    wal = plan.expire_wal
    return {
        "policy": plan.policy.to_dict(),
        "now": _time(plan.now),
        "window_start": _time(plan.window_start) if plan.window_start else None,
        "backups": {"expire": [d.to_dict() for d in plan.expire_backups],
                    "keep": [d.to_dict() for d in plan.keep_backups]},
        "dumps": {"expire": [d.to_dict() for d in plan.expire_dumps],
                  "keep": [d.to_dict() for d in plan.keep_dumps]},
        "wal": {"expire": len(wal), "bytes": plan.expire_wal_bytes,
                "first": wal[0].name if wal else None, "last": wal[-1].name if wal else None,
                "keep_from": plan.wal_keep_from, "reason": plan.wal_reason},
        "notes": list(plan.notes),
    }
