"""The vault's layout and its records: every key pgvault stores has a format/parse pair here.

WAL index: an archived WAL file's key carries what the restore planner needs,
so one listing is the whole index and no record is ever rewritten:

    wal/<TLI><LOG>/<walname>.<sha256>.<completed_ms>.<size>      segments, .partial, .backup
    wal/history/<TLI>.history.<sha256>.<completed_ms>.<size>     timeline history files

``sha256`` is the plaintext checksum (also verified on every read),
``completed_ms`` the segment's completion time in Unix milliseconds (its
file's mtime when pushed: an upper bound on any commit time it contains; never
the store's LastModified) and ``size`` the plaintext size in bytes.
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple

from pgvault.storage import Storage
from pgvault.wal import WalFileName, parse_wal_file_name

WAL_PREFIX = "wal/"
HISTORY_DIR = "wal/history/"

_WAL_KEY = re.compile(r"^(?P<name>[0-9A-F]{8}(?:[0-9A-F]{16}(?:\.partial|\.[0-9A-F]{8}\.backup)?|\.history))"
                      r"\.(?P<sha>[0-9a-f]{64})\.(?P<ms>[0-9]{1,15})\.(?P<size>[0-9]{1,12})$")


class ArchivedWal(NamedTuple):
    """One WAL file in the vault, as its key describes it."""

    name: str  # the file name PostgreSQL knows (%f)
    sha256: str
    completed_ms: int
    size: int
    file: WalFileName

    @property
    def key(self) -> str:
        return format_wal_key(self.name, sha256=self.sha256, completed_ms=self.completed_ms, size=self.size)

    @property
    def timeline(self) -> int:
        return self.file.timeline


def wal_dir(name: str) -> str:
    """The directory (key prefix) holding WAL file ``name``."""
    if name.endswith(".history"):
        return HISTORY_DIR
    return f"{WAL_PREFIX}{name[:16]}/"


def format_wal_key(name: str, *, sha256: str, completed_ms: int, size: int) -> str:
    key = f"{wal_dir(name)}{name}.{sha256}.{completed_ms}.{size}"
    if parse_wal_key(key) is None:
        raise ValueError(f"not a valid WAL key: {key}")
    return key


def parse_wal_key(key: str, *, segment_size: int | None = None) -> ArchivedWal | None:
    """The ArchivedWal a key describes, or None if the key is not a WAL index key."""
    base = key.rsplit("/", 1)[-1]
    m = _WAL_KEY.match(base)
    if not m or not key.startswith(wal_dir(m["name"])):
        return None
    kwargs = {"segment_size": segment_size} if segment_size else {}
    return ArchivedWal(
        name=m["name"],
        sha256=m["sha"],
        completed_ms=int(m["ms"]),
        size=int(m["size"]),
        file=parse_wal_file_name(m["name"], **kwargs),
    )


def find_archived(storage: Storage, name: str, *, segment_size: int | None = None) -> list[ArchivedWal]:
    """Every archived copy of WAL file ``name`` (more than one only after a divergence was forced)."""
    found = []
    for info in storage.list(f"{wal_dir(name)}{name}."):
        entry = parse_wal_key(info.key, segment_size=segment_size)
        if entry is not None and entry.name == name:
            found.append(entry)
    return found


def list_archived_wal(storage: Storage, *, segment_size: int | None = None) -> list[ArchivedWal]:
    entries = []
    for info in storage.list(WAL_PREFIX):
        entry = parse_wal_key(info.key, segment_size=segment_size)
        if entry is not None:
            entries.append(entry)
    return entries


class TimelineWal(NamedTuple):
    """The archived segments of one timeline: range, gaps and newest completion time."""

    timeline: int
    first_segno: int
    last_segno: int
    segments: int
    gaps: tuple[tuple[int, int], ...]  # inclusive ranges of missing segment numbers
    newest_completed_ms: int
    bytes: int
    partial: tuple[str, ...]  # .partial files (the end of a timeline left by a promotion)
    has_history: bool


def summarize_wal(entries: Iterable[ArchivedWal]) -> list[TimelineWal]:
    """Group archived WAL per timeline and find the gaps; pure."""
    by_tli: dict[int, list[ArchivedWal]] = {}
    histories: set[int] = set()
    partials: dict[int, list[str]] = {}
    for e in entries:
        if e.file.kind == "history":
            histories.add(e.timeline)
        elif e.file.kind == "partial":
            partials.setdefault(e.timeline, []).append(e.name)
        elif e.file.kind == "segment":
            by_tli.setdefault(e.timeline, []).append(e)
    out = []
    for tli in sorted(set(by_tli) | histories | set(partials)):
        segs = sorted({e.file.segno: e for e in by_tli.get(tli, [])}.values(), key=lambda e: e.file.segno)
        gaps = []
        for prev, cur in zip(segs, segs[1:]):
            if cur.file.segno != prev.file.segno + 1:
                gaps.append((prev.file.segno + 1, cur.file.segno - 1))
        out.append(TimelineWal(
            timeline=tli,
            first_segno=segs[0].file.segno if segs else -1,
            last_segno=segs[-1].file.segno if segs else -1,
            segments=len(segs),
            gaps=tuple(gaps),
            newest_completed_ms=max((e.completed_ms for e in segs), default=0),
            bytes=sum(e.size for e in segs),
            partial=tuple(sorted(partials.get(tli, []))),
            has_history=tli in histories,
        ))
    return out
