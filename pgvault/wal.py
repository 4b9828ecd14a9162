"""WAL file names, LSNs, timelines and segment headers — pure functions, no I/O.

Vocabulary, as in PostgreSQL's ``xlog_internal.h``:

* an **LSN** is a 64-bit byte position in the WAL stream, written ``%X/%X``
  (high and low 32 bits, uppercase hex, unpadded), e.g. ``0/3000060``;
* a **segment** is one WAL file of ``segment_size`` bytes (16 MiB by default, a
  power of two from 1 MiB to 1 GiB chosen at initdb); ``segno = lsn // segment_size``;
* a segment's **name** is ``TTTTTTTTLLLLLLLLSSSSSSSS``: timeline, then ``segno``
  split into the "xlogid" (``segno // segments_per_xlogid``) and the segment
  within it (``segno % segments_per_xlogid``), each eight uppercase hex digits;
* a **timeline history** file (``<TLI>.history``) lists, for a timeline, every
  ancestor timeline and the LSN where it was left (the switch point).

Every function taking a segment number or name takes ``segment_size`` as a
keyword: the same name means a different position for another segment size.
Malformed input raises :class:`~pgvault.errors.WalFormatError` naming what was
given. The page-header reader assumes a little-endian server (x86-64, arm64).
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple, Sequence

from pgvault.errors import ForeignWalError, WalFormatError

MIB = 1024 * 1024
GIB = 1024 * MIB
DEFAULT_SEGMENT_SIZE = 16 * MIB
MIN_SEGMENT_SIZE = MIB
MAX_SEGMENT_SIZE = GIB

MAX_LSN = 2**64 - 1
MAX_TIMELINE = 2**32 - 1

#: ``XLOG_PAGE_MAGIC`` by PostgreSQL major version (``src/include/access/xlog_internal.h``);
#: PostgreSQL 15's value is also checked against a real segment in the tests.
PAGE_MAGIC_BY_VERSION: dict[int, int] = {
    12: 0xD101,
    13: 0xD106,
    14: 0xD10D,
    15: 0xD110,
    16: 0xD113,
    17: 0xD116,
}
_VERSION_BY_PAGE_MAGIC = {magic: version for version, magic in PAGE_MAGIC_BY_VERSION.items()}

XLP_LONG_HEADER = 0x0002
XLP_ALL_FLAGS = 0x0007
#: XLogLongPageHeaderData: magic u16, info u16, tli u32, pageaddr u64, rem_len u32,
#: 4 bytes of alignment padding, sysid u64, seg_size u32, xlog_blcksz u32.
_LONG_PAGE_HEADER = struct.Struct("<HHIQI4xQII")
LONG_PAGE_HEADER_SIZE = _LONG_PAGE_HEADER.size  # 40

_LSN_RE = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_HEX8 = "[0-9A-F]{8}"
#: kind → pattern of a file name in the WAL archive; groups: timeline, xlogid, segment, backup offset.
_WAL_FILE_PATTERNS: dict[str, re.Pattern[str]] = {
    "segment": re.compile(f"({_HEX8})({_HEX8})({_HEX8})"),
    "partial": re.compile(f"({_HEX8})({_HEX8})({_HEX8})\\.partial"),
    "history": re.compile(f"({_HEX8})\\.history"),
    "backup": re.compile(f"({_HEX8})({_HEX8})({_HEX8})\\.({_HEX8})\\.backup"),
}


# ---------------------------------------------------------------- sizes, LSNs


def _format_size(size: int) -> str:
    if size >= GIB and size % GIB == 0:
        return f"{size // GIB} GiB"
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    return f"{size} bytes"


def _check_int(value: object, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise WalFormatError(f"invalid {what} {value!r}: expected an integer from {low} to {high:#x}")
    return value


def check_segment_size(segment_size: int) -> int:
    """Return ``segment_size`` if it is a power of two from 1 MiB to 1 GiB, else raise."""
    if (
        not isinstance(segment_size, int)
        or isinstance(segment_size, bool)
        or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE
        or segment_size & (segment_size - 1)
    ):
        raise WalFormatError(
            f"invalid WAL segment size {segment_size!r}: expected a power of two from 1 MiB to 1 GiB"
        )
    return segment_size


def parse_lsn(text: str) -> int:
    """``"0/3000060"`` → ``0x3000060``. Two hex parts of 1-8 digits, either case, nothing else."""
    match = _LSN_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise WalFormatError(
            f"invalid LSN {text!r}: expected two hexadecimal parts of 1 to 8 digits, like '0/3000060'"
        )
    return (int(match[1], 16) << 32) | int(match[2], 16)


def format_lsn(lsn: int) -> str:
    """``0x3000060`` → ``"0/3000060"``, as PostgreSQL prints it (``%X/%X``)."""
    _check_int(lsn, "LSN", 0, MAX_LSN)
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# ------------------------------------------------------------------ segments


def segments_per_xlogid(segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """How many segments share one middle ``LLLLLLLL`` part of a name (256 for 16 MiB)."""
    return 0x100000000 // check_segment_size(segment_size)


def lsn_to_segno(lsn: int, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The segment holding the byte at ``lsn`` (PostgreSQL's ``XLByteToSeg``)."""
    return _check_int(lsn, "LSN", 0, MAX_LSN) // check_segment_size(segment_size)


def lsn_to_prev_segno(lsn: int, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The segment holding the byte just before ``lsn`` (PostgreSQL's ``XLByteToPrevSeg``).

    Use it for end positions (a backup's stop LSN, a switch point): WAL *up to*
    ``lsn`` is complete once this segment is, even when ``lsn`` is a segment start.
    """
    return (_check_int(lsn, "LSN", 1, MAX_LSN) - 1) // check_segment_size(segment_size)


def segno_start_lsn(segno: int, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The LSN of a segment's first byte, which is also its first page's ``xlp_pageaddr``."""
    size = check_segment_size(segment_size)
    return _check_int(segno, "segment number", 0, MAX_LSN // size) * size


def segment_name(timeline: int, segno: int, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """``(1, 3)`` → ``"000000010000000000000003"`` (PostgreSQL's ``XLogFileName``)."""
    per = segments_per_xlogid(segment_size)
    _check_int(timeline, "timeline", 1, MAX_TIMELINE)
    _check_int(segno, "segment number", 0, MAX_LSN // segment_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def parse_segment_name(name: str, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[int, int]:
    """``"000000010000000100000002"`` → ``(timeline, segno)``; a plain segment name only."""
    wal_file = parse_wal_file_name(name, segment_size=segment_size)
    if wal_file.kind != "segment":
        raise WalFormatError(f"not a WAL segment name: {name!r} is a {wal_file.kind} file")
    assert wal_file.segno is not None
    return wal_file.timeline, wal_file.segno


def partial_file_name(timeline: int, segno: int, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """The name PostgreSQL archives the last, incomplete segment of a timeline under."""
    return segment_name(timeline, segno, segment_size=segment_size) + ".partial"


def history_file_name(timeline: int) -> str:
    """``2`` → ``"00000002.history"``."""
    return f"{_check_int(timeline, 'timeline', 1, MAX_TIMELINE):08X}.history"


def backup_file_name(timeline: int, start_lsn: int, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """The backup history file PostgreSQL archives at a backup's end, named after its start LSN."""
    segno = lsn_to_segno(start_lsn, segment_size=segment_size)
    offset = start_lsn % segment_size
    return f"{segment_name(timeline, segno, segment_size=segment_size)}.{offset:08X}.backup"


# ----------------------------------------------------------- archive names


class WalFileName(NamedTuple):
    """A parsed name of a file PostgreSQL hands to ``archive_command`` or asks ``restore_command`` for.

    ``kind`` is ``"segment"``, ``"partial"``, ``"history"`` or ``"backup"``;
    ``segno`` is ``None`` for history files; ``offset`` (the backup's start
    position within its segment) is set for backup files only.
    """

    kind: str
    timeline: int
    segno: int | None
    name: str
    offset: int | None = None


def parse_wal_file_name(name: str, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> WalFileName:
    """Parse ``000000010000000000000003``, ``….partial``, ``00000002.history`` or ``….00000028.backup``.

    Hex must be uppercase, as PostgreSQL writes it. Timeline 0 does not exist;
    the segment part must be below :func:`segments_per_xlogid` and a backup
    offset below ``segment_size``.
    """
    per = segments_per_xlogid(segment_size)
    for kind, pattern in _WAL_FILE_PATTERNS.items():
        match = pattern.fullmatch(name) if isinstance(name, str) else None
        if match is not None:
            break
    else:
        raise WalFormatError(
            f"not a WAL file name: {name!r}: expected a segment (24 uppercase hex digits), "
            "a .partial segment, a .history or a .backup file"
        )
    timeline = int(match[1], 16)
    if timeline == 0:
        raise WalFormatError(f"invalid WAL file name {name!r}: timeline 0 does not exist")
    if kind == "history":
        return WalFileName(kind, timeline, None, name)
    xlogid, seg = int(match[2], 16), int(match[3], 16)
    if seg >= per:
        raise WalFormatError(
            f"invalid WAL file name {name!r}: segment part {seg:08X} is above {per - 1:08X}, "
            f"the last one for {_format_size(segment_size)} segments"
        )
    offset = None
    if kind == "backup":
        offset = int(match[4], 16)
        if offset >= segment_size:
            raise WalFormatError(
                f"invalid WAL file name {name!r}: backup offset {offset:08X} is beyond a "
                f"{_format_size(segment_size)} segment"
            )
    return WalFileName(kind, timeline, xlogid * per + seg, name, offset)


def is_wal_file_name(name: str, *, segment_size: int = DEFAULT_SEGMENT_SIZE) -> bool:
    """True when :func:`parse_wal_file_name` accepts ``name``."""
    try:
        parse_wal_file_name(name, segment_size=segment_size)
    except WalFormatError:
        return False
    return True


# ----------------------------------------------------------------- timelines


class HistoryEntry(NamedTuple):
    """One line of a ``.history`` file: ``parent_timeline`` ended at ``switch_lsn``.

    ``switch_lsn`` is the first LSN of the *next* timeline in the history (the
    following entry's timeline, or the file's own timeline for the last entry):
    WAL before it is read from ``parent_timeline``, WAL from it on from the child.
    """

    parent_timeline: int
    switch_lsn: int
    reason: str = ""


_HISTORY_LINE_RE = re.compile(r"([0-9]+)\s+(\S+)(?:\s+(.*))?")


def parse_history(text: str, *, source: str = "timeline history") -> list[HistoryEntry]:
    """Parse the contents of a ``<TLI>.history`` file into its entries, oldest first.

    Lines read ``<parent TLI>\\t<switch point X/X>\\t<reason>`` (any whitespace
    separates; the reason may be empty). Blank lines and ``#`` comments are
    skipped, as PostgreSQL does. Parent timelines must increase strictly (they
    may skip numbers: abandoned timelines are not listed) and switch points may
    not go backwards. Errors name ``source`` (pass the file name) and the line.
    The file's own timeline is not in it: timeline 1 has no history file, and
    the history of timeline N ends with N's parent.
    """
    entries: list[HistoryEntry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        match = _HISTORY_LINE_RE.fullmatch(line)
        if match is None:
            raise WalFormatError(
                f"{where}: expected '<parent timeline> <switch LSN> <reason>', got {raw!r}"
            )
        parent = int(match[1])
        if not 1 <= parent <= MAX_TIMELINE:
            raise WalFormatError(f"{where}: invalid timeline {parent}")
        try:
            switch_lsn = parse_lsn(match[2])
        except WalFormatError as exc:
            raise WalFormatError(f"{where}: {exc.message}") from None
        if entries and parent <= entries[-1].parent_timeline:
            raise WalFormatError(
                f"{where}: timeline {parent} after timeline {entries[-1].parent_timeline}: "
                "timelines must increase"
            )
        if entries and switch_lsn < entries[-1].switch_lsn:
            raise WalFormatError(
                f"{where}: switch point {format_lsn(switch_lsn)} is before the previous one "
                f"{format_lsn(entries[-1].switch_lsn)}"
            )
        entries.append(HistoryEntry(parent, switch_lsn, match[3] or ""))
    return entries


def ancestors(history: Sequence[HistoryEntry]) -> list[tuple[int, int]]:
    """``[(timeline, end_lsn), …]`` oldest first: each ancestor and the LSN where it was left.

    ``end_lsn`` is exclusive: the ancestor's WAL is used for LSNs below it, and
    it is the first LSN of the next timeline.
    """
    return [(entry.parent_timeline, entry.switch_lsn) for entry in history]


def _check_target(target_timeline: int, history: Sequence[HistoryEntry]) -> None:
    _check_int(target_timeline, "timeline", 1, MAX_TIMELINE)
    if history and history[-1].parent_timeline >= target_timeline:
        raise WalFormatError(
            f"timeline {target_timeline} cannot descend from timeline {history[-1].parent_timeline}: "
            "pass the history file of the target timeline"
        )


def timeline_of_lsn(lsn: int, target_timeline: int, history: Sequence[HistoryEntry]) -> int:
    """The timeline whose WAL holds ``lsn`` when recovering onto ``target_timeline``.

    ``history`` is the target timeline's history. The answer is the first
    (oldest) ancestor whose switch point is greater than ``lsn``, else the
    target timeline itself: a switch point is the first LSN of the new
    timeline, so at exactly the switch point the new timeline is the answer.
    Use it to tell whether a backup started on timeline T lies on the way to the
    target: ``timeline_of_lsn(backup_start, target, history) == T``.
    """
    _check_int(lsn, "LSN", 0, MAX_LSN)
    _check_target(target_timeline, history)
    for entry in history:
        if lsn < entry.switch_lsn:
            return entry.parent_timeline
    return target_timeline


def timeline_of_segment(
    segno: int,
    target_timeline: int,
    history: Sequence[HistoryEntry],
    *,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
) -> int:
    """The timeline whose segment file ``segno`` recovery onto ``target_timeline`` reads.

    This is per file, not per LSN, and differs from :func:`timeline_of_lsn` for
    the segment holding a switch point: PostgreSQL starts a new timeline by
    copying the parent's segment up to the switch point into a file named after
    the new timeline, and recovery reads that file — the newest timeline whose
    first segment is at or before ``segno`` (``XLogFileReadAnyTLI``). The
    parent's own copy of that segment is usually archived as ``.partial`` and
    is not needed.
    """
    _check_int(segno, "segment number", 0, MAX_LSN // check_segment_size(segment_size))
    _check_target(target_timeline, history)
    for entry in history:
        if segno < lsn_to_segno(entry.switch_lsn, segment_size=segment_size):
            return entry.parent_timeline
    return target_timeline


# -------------------------------------------------------------- page header


class LongPageHeader(NamedTuple):
    """The header of a segment's first page (``XLogLongPageHeaderData``)."""

    magic: int
    info: int
    timeline: int
    pageaddr: int
    rem_len: int
    system_identifier: int
    segment_size: int
    block_size: int
    pg_version: int


def read_long_page_header(data: bytes, *, name: str = "WAL file") -> LongPageHeader:
    """Parse the first 40 bytes of a WAL segment (more may be passed and are ignored).

    Raises when ``data`` is too short, its page magic is not one of PostgreSQL
    12-17 (:data:`PAGE_MAGIC_BY_VERSION`), or the page has no long header or
    unknown flag bits. ``name`` is used in error messages.
    """
    if len(data) < LONG_PAGE_HEADER_SIZE:
        raise WalFormatError(
            f"{name}: not a WAL segment: {len(data)} bytes, a segment header needs {LONG_PAGE_HEADER_SIZE}"
        )
    magic, info, tli, pageaddr, rem_len, sysid, seg_size, blcksz = _LONG_PAGE_HEADER.unpack_from(data)
    pg_version = _VERSION_BY_PAGE_MAGIC.get(magic)
    if pg_version is None:
        raise WalFormatError(
            f"{name}: not a WAL segment of PostgreSQL 12 to 17: unknown page magic 0x{magic:04X}"
        )
    if info & ~XLP_ALL_FLAGS or not info & XLP_LONG_HEADER:
        raise WalFormatError(
            f"{name}: not a WAL segment: first page has no long header (xlp_info 0x{info:04X})"
        )
    return LongPageHeader(magic, info, tli, pageaddr, rem_len, sysid, seg_size, blcksz, pg_version)


def check_segment_header(
    header: LongPageHeader,
    *,
    expected_name: str,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    history: Sequence[HistoryEntry] | None = None,
    system_identifier: int | None = None,
) -> None:
    """Raise unless ``header`` belongs in a segment (or ``.partial``) called ``expected_name``.

    Checked: the segment size; ``pageaddr`` is the first LSN of the named
    segment; the system identifier, when given (:class:`ForeignWalError`); and
    the timeline. The header's timeline is that of the page's first record, so
    it equals the name's timeline except in a timeline's first segment, which
    PostgreSQL copies from the parent and which keeps the parent's (or an older
    ancestor's) timeline. Without ``history`` the header's timeline must be at
    most the name's; with the named timeline's ``history`` it must be exactly
    ``timeline_of_lsn(segment start, named timeline, history)``.
    """
    wal_file = parse_wal_file_name(expected_name, segment_size=segment_size)
    if wal_file.kind not in ("segment", "partial"):
        raise WalFormatError(f"{expected_name}: a {wal_file.kind} file has no WAL page header")
    assert wal_file.segno is not None
    if header.segment_size != segment_size:
        raise WalFormatError(
            f"{expected_name}: header says {_format_size(header.segment_size)} segments, "
            f"expected {_format_size(segment_size)}"
        )
    start = segno_start_lsn(wal_file.segno, segment_size=segment_size)
    if header.pageaddr != start:
        raise WalFormatError(
            f"{expected_name}: page address {format_lsn(header.pageaddr)} does not match the "
            f"file name, which starts at {format_lsn(start)}",
            hint="the file was renamed or copied from another position; do not archive it under this name",
        )
    if system_identifier is not None and header.system_identifier != system_identifier:
        raise ForeignWalError(
            f"{expected_name}: system identifier {header.system_identifier} is not "
            f"this cluster's {system_identifier}"
        )
    if history is None:
        ok = 1 <= header.timeline <= wal_file.timeline
        expected = f"at most {wal_file.timeline}"
    else:
        want = timeline_of_lsn(start, wal_file.timeline, history)
        ok = header.timeline == want
        expected = str(want)
    if not ok:
        raise WalFormatError(
            f"{expected_name}: header timeline {header.timeline} does not match the file name "
            f"(expected {expected})"
        )
