"""pgvault.wal: LSNs, segment names, archive file names, timeline histories, page headers."""

import struct
from pathlib import Path

import pytest

from pgvault import wal
from pgvault.errors import EXIT_CODES, ForeignWalError, WalFormatError
from pgvault.wal import HistoryEntry, LongPageHeader, WalFileName
from tests.asserts import raises_exactly

MIB = 1024 * 1024
GIB = 1024 * MIB
SEG16 = 16 * MIB
DATA = Path(__file__).parent / "data"



def test_wal_format_error_has_its_exit_code():
    assert WalFormatError.exit_code == 42
    assert EXIT_CODES[WalFormatError] == 42


# --------------------------------------------------------------------- LSNs

LSNS = [
    ("0/0", 0),
    ("0/3000060", 0x3000060),
    ("0/1526268", 0x1526268),
    ("0/FFFFFFFF", 0xFFFFFFFF),
    ("1/0", 1 << 32),
    ("16/B374D848", 0x16B374D848),
    ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
]


@pytest.mark.parametrize("text, value", LSNS)
def test_lsn_round_trip(text, value):
    assert wal.parse_lsn(text) == value
    assert wal.format_lsn(value) == text


@pytest.mark.parametrize(
    "text, value",
    [("a/b", 0xA0000000B), ("00000000/03000060", 0x3000060), ("0/00030000", 0x30000)],
)
def test_parse_lsn_accepts_lowercase_and_zero_padding(text, value):
    assert wal.parse_lsn(text) == value


LSN_SYNTAX = "expected two hexadecimal parts of 1 to 8 digits, like '0/3000060'"


@pytest.mark.parametrize(
    "text",
    ["", "0", "0/", "/1", "1/2/3", "G/0", "123456789/0", "0/123456789", " 0/1", "0/1\n", "0x1/0", "-1/0", "0 /1"],
)
def test_parse_lsn_rejects(text):
    with raises_exactly(WalFormatError, f"invalid LSN {text!r}: {LSN_SYNTAX}"):
        wal.parse_lsn(text)


@pytest.mark.parametrize("value", [None, 0x5])
def test_parse_lsn_rejects_non_strings(value):
    with raises_exactly(WalFormatError, f"invalid LSN {value!r}: {LSN_SYNTAX}"):
        wal.parse_lsn(value)


@pytest.mark.parametrize("value", [-1, 2**64, True, "0/1", 1.0])
def test_format_lsn_rejects(value):
    with raises_exactly(
        WalFormatError, f"invalid LSN {value!r}: expected an integer from 0 to 0xffffffffffffffff"
    ):
        wal.format_lsn(value)


# --------------------------------------------------------------- segment sizes


@pytest.mark.parametrize("size, per", [(MIB, 4096), (2 * MIB, 2048), (SEG16, 256), (64 * MIB, 64), (GIB, 4)])
def test_segments_per_xlogid(size, per):
    assert wal.segments_per_xlogid(size) == per
    assert wal.check_segment_size(size) == size


def test_default_segment_size_is_16_mib():
    assert wal.DEFAULT_SEGMENT_SIZE == SEG16
    assert wal.segments_per_xlogid() == 256


@pytest.mark.parametrize("size", [0, -SEG16, MIB // 2, 3 * MIB, SEG16 + 1, 2 * GIB, True, "16MB", 16.0 * MIB])
def test_bad_segment_size(size):
    message = f"invalid WAL segment size {size!r}: expected a power of two from 1 MiB to 1 GiB"
    with raises_exactly(WalFormatError, message):
        wal.segments_per_xlogid(size)
    with raises_exactly(WalFormatError, message):
        wal.segment_name(1, 1, segment_size=size)
    with raises_exactly(WalFormatError, message):
        wal.lsn_to_segno(0, segment_size=size)


# ------------------------------------------------------------------ segments

SEGMENTS = [  # timeline, segno, segment size, name
    (1, 0, SEG16, "000000010000000000000000"),
    (1, 1, SEG16, "000000010000000000000001"),
    (1, 255, SEG16, "0000000100000000000000FF"),
    (1, 256, SEG16, "000000010000000100000000"),  # crosses the xlogid boundary
    (2, 0x1FF, SEG16, "0000000200000001000000FF"),
    (0x1A, 0x2B03, SEG16, "0000001A0000002B00000003"),
    (0xFFFFFFFF, 2**40 - 1, SEG16, "FFFFFFFFFFFFFFFF000000FF"),
    (1, 4095, MIB, "000000010000000000000FFF"),
    (1, 4096, MIB, "000000010000000100000000"),
    (3, 63, 64 * MIB, "00000003000000000000003F"),
    (3, 64, 64 * MIB, "000000030000000100000000"),
    (1, 5, GIB, "000000010000000100000001"),
    (1, 2**34 - 1, GIB, "00000001FFFFFFFF00000003"),
]


@pytest.mark.parametrize("timeline, segno, size, name", SEGMENTS)
def test_segment_name_round_trip(timeline, segno, size, name):
    assert wal.segment_name(timeline, segno, segment_size=size) == name
    assert wal.parse_segment_name(name, segment_size=size) == (timeline, segno)
    assert wal.parse_wal_file_name(name, segment_size=size) == WalFileName("segment", timeline, segno, name)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: wal.segment_name(0, 1), "invalid timeline 0: expected an integer from 1 to 0xffffffff"),
        (lambda: wal.segment_name(2**32, 1), "invalid timeline 4294967296: expected an integer from 1 to 0xffffffff"),
        (lambda: wal.segment_name(1, -1), "invalid segment number -1: expected an integer from 0 to 0xffffffffff"),
        (lambda: wal.segment_name(1, 2**40), f"invalid segment number {2**40}: expected an integer from 0 to 0xffffffffff"),
        (lambda: wal.segment_name(1, 2**34, segment_size=GIB), f"invalid segment number {2**34}: expected an integer from 0 to 0x3ffffffff"),
        (lambda: wal.segno_start_lsn(2**40), f"invalid segment number {2**40}: expected an integer from 0 to 0xffffffffff"),
        (lambda: wal.lsn_to_segno(2**64), f"invalid LSN {2**64}: expected an integer from 0 to 0xffffffffffffffff"),
    ],
)
def test_segment_functions_reject(call, message):
    with raises_exactly(WalFormatError, message):
        call()


LSN_SEGNOS = [  # lsn, segment size, segno of that byte
    (0, SEG16, 0),
    (0x3000060, SEG16, 3),
    (0x2FFFFFF, SEG16, 2),
    (0x3000000, SEG16, 3),
    (0xFFFFFFFF, SEG16, 255),
    (0x100000000, SEG16, 256),
    (2**64 - 1, SEG16, 2**40 - 1),
    (0x3000060, MIB, 48),
    (0x3000060, 64 * MIB, 0),
    (0x104000000, 64 * MIB, 65),
    (0x140000000, GIB, 5),
]


@pytest.mark.parametrize("lsn, size, segno", LSN_SEGNOS)
def test_lsn_to_segno(lsn, size, segno):
    assert wal.lsn_to_segno(lsn, segment_size=size) == segno
    start = wal.segno_start_lsn(segno, segment_size=size)
    assert start <= lsn < start + size


@pytest.mark.parametrize(
    "segno, size, start",
    [(0, SEG16, "0/0"), (3, SEG16, "0/3000000"), (255, SEG16, "0/FF000000"), (256, SEG16, "1/0"),
     (4097, MIB, "1/100000"), (65, 64 * MIB, "1/4000000"), (2**40 - 1, SEG16, "FFFFFFFF/FF000000")],
)
def test_segno_start_lsn(segno, size, start):
    assert wal.format_lsn(wal.segno_start_lsn(segno, segment_size=size)) == start
    assert wal.lsn_to_segno(wal.parse_lsn(start), segment_size=size) == segno


@pytest.mark.parametrize(
    "lsn, size, segno",
    [(1, SEG16, 0), (0x3000000, SEG16, 2), (0x3000001, SEG16, 3), (0x100000000, SEG16, 255), (0x100000, MIB, 0)],
)
def test_lsn_to_prev_segno(lsn, size, segno):
    assert wal.lsn_to_prev_segno(lsn, segment_size=size) == segno


def test_lsn_to_prev_segno_rejects_zero():
    with raises_exactly(WalFormatError, "invalid LSN 0: expected an integer from 1 to 0xffffffffffffffff"):
        wal.lsn_to_prev_segno(0)


@pytest.mark.parametrize(
    "name, size, message",
    [
        ("00000001000000000000000", SEG16, None),
        ("0000000100000000000000ff", SEG16, None),
        ("0000000100000000000000001", SEG16, None),
        ("000000000000000000000001", SEG16, "invalid WAL file name '000000000000000000000001': timeline 0 does not exist"),
        ("000000010000000000000100", SEG16, "invalid WAL file name '000000010000000000000100': segment part 00000100 is above 000000FF, the last one for 16 MiB segments"),
        ("000000010000000000001000", MIB, "invalid WAL file name '000000010000000000001000': segment part 00001000 is above 00000FFF, the last one for 1 MiB segments"),
        ("000000010000000000000004", GIB, "invalid WAL file name '000000010000000000000004': segment part 00000004 is above 00000003, the last one for 1 GiB segments"),
        ("00000002.history", SEG16, "not a WAL segment name: '00000002.history' is a history file"),
        ("000000010000000000000003.partial", SEG16, "not a WAL segment name: '000000010000000000000003.partial' is a partial file"),
    ],
)
def test_parse_segment_name_rejects(name, size, message):
    if message is None:
        message = (
            f"not a WAL file name: {name!r}: expected a segment (24 uppercase hex digits), "
            "a .partial segment, a .history or a .backup file"
        )
    with raises_exactly(WalFormatError, message):
        wal.parse_segment_name(name, segment_size=size)


def test_same_name_is_a_different_position_for_another_segment_size():
    assert wal.parse_segment_name("000000010000000000000100", segment_size=MIB) == (1, 256)
    assert wal.parse_segment_name("000000010000000100000000", segment_size=MIB) == (1, 4096)


# ---------------------------------------------------------- archive file names

WAL_FILES = [  # name, segment size, parsed
    ("000000010000000000000003", SEG16, WalFileName("segment", 1, 3, "000000010000000000000003")),
    ("000000010000000000000003.partial", SEG16, WalFileName("partial", 1, 3, "000000010000000000000003.partial")),
    ("00000002.history", SEG16, WalFileName("history", 2, None, "00000002.history")),
    ("0000000A.history", SEG16, WalFileName("history", 10, None, "0000000A.history")),
    ("000000010000000000000002.00000028.backup", SEG16,
     WalFileName("backup", 1, 2, "000000010000000000000002.00000028.backup", 0x28)),
    ("000000030000000100000002.00FFFFF8.backup", SEG16,
     WalFileName("backup", 3, 258, "000000030000000100000002.00FFFFF8.backup", 0xFFFFF8)),
    ("000000010000000000000FFF.partial", MIB, WalFileName("partial", 1, 4095, "000000010000000000000FFF.partial")),
]


@pytest.mark.parametrize("name, size, parsed", WAL_FILES)
def test_parse_wal_file_name(name, size, parsed):
    assert wal.parse_wal_file_name(name, segment_size=size) == parsed
    assert wal.is_wal_file_name(name, segment_size=size)


@pytest.mark.parametrize(
    "name",
    ["", "00000002.History", "00000002.history.tmp", "0000002.history", "000000010000000000000003.partial.tmp",
     "000000010000000000000003.PARTIAL", "archive_status", "RECOVERYXLOG", "000000010000000000000002.28.backup",
     "000000010000000000000003\n", "000000010000000000000003/", "x00000010000000000000003"],
)
def test_parse_wal_file_name_rejects(name):
    message = (
        f"not a WAL file name: {name!r}: expected a segment (24 uppercase hex digits), "
        "a .partial segment, a .history or a .backup file"
    )
    with raises_exactly(WalFormatError, message):
        wal.parse_wal_file_name(name)
    assert not wal.is_wal_file_name(name)


@pytest.mark.parametrize(
    "name, size, message",
    [
        ("00000000.history", SEG16, "invalid WAL file name '00000000.history': timeline 0 does not exist"),
        ("000000010000000000000002.01000000.backup", SEG16,
         "invalid WAL file name '000000010000000000000002.01000000.backup': backup offset 01000000 is beyond a 16 MiB segment"),
        ("000000010000000000000002.00100000.backup", MIB,
         "invalid WAL file name '000000010000000000000002.00100000.backup': backup offset 00100000 is beyond a 1 MiB segment"),
        ("000000010000000000000100.partial", SEG16,
         "invalid WAL file name '000000010000000000000100.partial': segment part 00000100 is above 000000FF, the last one for 16 MiB segments"),
    ],
)
def test_parse_wal_file_name_rejects_out_of_range(name, size, message):
    with raises_exactly(WalFormatError, message):
        wal.parse_wal_file_name(name, segment_size=size)
    assert not wal.is_wal_file_name(name, segment_size=size)


def test_format_names_parse_back():
    assert wal.history_file_name(2) == "00000002.history"
    assert wal.history_file_name(0x1F) == "0000001F.history"
    assert wal.partial_file_name(1, 3) == "000000010000000000000003.partial"
    assert wal.backup_file_name(1, 0x2000028) == "000000010000000000000002.00000028.backup"
    assert wal.backup_file_name(1, 0x2000028, segment_size=MIB) == "000000010000000000000020.00000028.backup"
    parsed = wal.parse_wal_file_name(wal.backup_file_name(3, 0x102FFFFF8))
    assert wal.segno_start_lsn(parsed.segno) + parsed.offset == 0x102FFFFF8
    with raises_exactly(WalFormatError, "invalid timeline 0: expected an integer from 1 to 0xffffffff"):
        wal.history_file_name(0)


# ------------------------------------------------------------------- history

# The history file of timeline 3: timeline 1 was left at 0/3000158 (a promotion),
# timeline 2 at 0/50000A0 (a point-in-time restore). Written as PostgreSQL does.
HISTORY_TLI3 = (
    "1\t0/3000158\tno recovery target specified\n"
    "\n"
    "2\t0/50000A0\tbefore 2024-05-01 12:00:00.000000+00\n"
)
ENTRIES_TLI3 = [
    HistoryEntry(1, 0x3000158, "no recovery target specified"),
    HistoryEntry(2, 0x50000A0, "before 2024-05-01 12:00:00.000000+00"),
]


def test_parse_real_looking_history():
    assert wal.parse_history(HISTORY_TLI3) == ENTRIES_TLI3
    assert wal.ancestors(ENTRIES_TLI3) == [(1, 0x3000158), (2, 0x50000A0)]


@pytest.mark.parametrize(
    "text, entries",
    [
        ("", []),
        ("\n\n", []),
        ("# written by hand\n  \n1\t0/1526268\tno recovery target specified\n",
         [HistoryEntry(1, 0x1526268, "no recovery target specified")]),
        ("1 0/3000000", [HistoryEntry(1, 0x3000000, "")]),  # no reason, spaces
        ("1\t0/3000000\r\n3\t1/0\tafter  two   spaces \r\n",
         [HistoryEntry(1, 0x3000000, ""), HistoryEntry(3, 1 << 32, "after  two   spaces")]),  # TLI 2 abandoned
        ("1\t0/3000100\ta\n2\t0/3000100\tb\n", [HistoryEntry(1, 0x3000100, "a"), HistoryEntry(2, 0x3000100, "b")]),
    ],
)
def test_parse_history_forms(text, entries):
    assert wal.parse_history(text) == entries


SYNTAX = "expected '<parent timeline> <switch LSN> <reason>', got"


@pytest.mark.parametrize(
    "text, message",
    [
        ("1\t0/3000158\tok\nfoo\n", f"00000003.history line 2: {SYNTAX} 'foo'"),
        ("1\n", f"00000003.history line 1: {SYNTAX} '1'"),
        ("\n# c\nx\t0/1\treason", f"00000003.history line 3: {SYNTAX} 'x\\t0/1\\treason'"),
        ("-1\t0/1\tr", f"00000003.history line 1: {SYNTAX} '-1\\t0/1\\tr'"),
        ("1\t0/XYZ\tr", f"00000003.history line 1: invalid LSN '0/XYZ': {LSN_SYNTAX}"),
        ("1\t3000158\tr", f"00000003.history line 1: invalid LSN '3000158': {LSN_SYNTAX}"),
        ("0\t0/1\tr", "00000003.history line 1: invalid timeline 0"),
        ("4294967296\t0/1\tr", "00000003.history line 1: invalid timeline 4294967296"),
        ("2\t0/1\ta\n1\t0/2\tb", "00000003.history line 2: timeline 1 after timeline 2: timelines must increase"),
        ("2\t0/1\ta\n2\t0/2\tb", "00000003.history line 2: timeline 2 after timeline 2: timelines must increase"),
        ("1\t0/5000000\ta\n2\t0/3000000\tb",
         "00000003.history line 2: switch point 0/3000000 is before the previous one 0/5000000"),
    ],
)
def test_parse_history_rejects(text, message):
    with raises_exactly(WalFormatError, message):
        wal.parse_history(text, source="00000003.history")


def test_parse_history_default_source():
    with raises_exactly(WalFormatError, f"timeline history line 1: {SYNTAX} 'junk'"):
        wal.parse_history("junk")


# The switch point is the first LSN of the new timeline.
@pytest.mark.parametrize(
    "lsn, timeline",
    [
        (0, 1),
        (0x3000157, 1),
        (0x3000158, 2),  # exactly at the switch point: the new timeline
        (0x3000159, 2),
        (0x500009F, 2),
        (0x50000A0, 3),
        (2**64 - 1, 3),
    ],
)
def test_timeline_of_lsn(lsn, timeline):
    assert wal.timeline_of_lsn(lsn, 3, ENTRIES_TLI3) == timeline


# Per file: the segment holding a switch point is read from the new timeline's copy.
@pytest.mark.parametrize("segno, timeline", [(0, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3), (1000, 3)])
def test_timeline_of_segment(segno, timeline):
    assert wal.timeline_of_segment(segno, 3, ENTRIES_TLI3) == timeline


@pytest.mark.parametrize(
    "history, target, lsn, lsn_tli, segno, seg_tli",
    [
        ([], 1, 0x3000000, 1, 3, 1),  # timeline 1 has no history
        # two switches in one segment: that segment comes from the newest timeline
        ([HistoryEntry(1, 0x3000100), HistoryEntry(2, 0x3000200)], 3, 0x3000150, 2, 3, 3),
        ([HistoryEntry(1, 0x3000100), HistoryEntry(2, 0x3000200)], 3, 0x3000200, 3, 2, 1),
        # a switch exactly at a segment boundary: the previous segment stays on the parent
        ([HistoryEntry(1, 0x3000000)], 2, 0x2FFFFFF, 1, 2, 1),
        ([HistoryEntry(1, 0x3000000)], 2, 0x3000000, 2, 3, 2),
        # timeline 2 abandoned: timeline 4 descends from 3, which descends from 1
        ([HistoryEntry(1, 0x3000158), HistoryEntry(3, 0x7000000)], 4, 0x6FFFFFF, 3, 7, 4),
    ],
)
def test_timeline_edge_cases(history, target, lsn, lsn_tli, segno, seg_tli):
    assert wal.timeline_of_lsn(lsn, target, history) == lsn_tli
    assert wal.timeline_of_segment(segno, target, history) == seg_tli


def test_timeline_of_segment_uses_segment_size():
    # 0/3000158 is in segment 48 of 1 MiB segments
    assert wal.timeline_of_segment(47, 3, ENTRIES_TLI3, segment_size=MIB) == 1
    assert wal.timeline_of_segment(48, 3, ENTRIES_TLI3, segment_size=MIB) == 2
    # with 64 MiB segments timeline 1 never owns a whole file: both switch points are past segment 0's start
    assert wal.timeline_of_segment(0, 3, ENTRIES_TLI3, segment_size=64 * MIB) == 2
    assert wal.timeline_of_segment(1, 3, ENTRIES_TLI3, segment_size=64 * MIB) == 3


@pytest.mark.parametrize(
    "target, message",
    [
        (2, "timeline 2 cannot descend from timeline 2: pass the history file of the target timeline"),
        (1, "timeline 1 cannot descend from timeline 2: pass the history file of the target timeline"),
        (0, "invalid timeline 0: expected an integer from 1 to 0xffffffff"),
    ],
)
def test_timeline_lookups_reject_a_history_of_another_timeline(target, message):
    with raises_exactly(WalFormatError, message):
        wal.timeline_of_lsn(0, target, ENTRIES_TLI3)
    with raises_exactly(WalFormatError, message):
        wal.timeline_of_segment(0, target, ENTRIES_TLI3)


# --------------------------------------------------------------- page header

SYSID = 7712952132802306353


def header_bytes(*, magic=0xD110, info=0x0002, tli=1, pageaddr=0x3000000, rem_len=0, sysid=SYSID,
                 seg_size=SEG16, blcksz=8192, tail=b""):
    return struct.pack("<HHIQI4xQII", magic, info, tli, pageaddr, rem_len, sysid, seg_size, blcksz) + tail


def test_header_layout_is_40_bytes():
    assert wal.LONG_PAGE_HEADER_SIZE == 40 == len(header_bytes())


@pytest.mark.parametrize("version, magic", sorted(wal.PAGE_MAGIC_BY_VERSION.items()))
def test_read_synthetic_header(version, magic):
    data = header_bytes(magic=magic, info=0x0003, tli=7, pageaddr=0x1FF000000, rem_len=123,
                        seg_size=64 * MIB, blcksz=16384, tail=b"\xff" * 100)
    assert wal.read_long_page_header(data) == LongPageHeader(
        magic=magic, info=3, timeline=7, pageaddr=0x1FF000000, rem_len=123,
        system_identifier=SYSID, segment_size=64 * MIB, block_size=16384, pg_version=version,
    )


def test_known_page_magics():
    assert wal.PAGE_MAGIC_BY_VERSION == {12: 0xD101, 13: 0xD106, 14: 0xD10D, 15: 0xD110, 16: 0xD113, 17: 0xD116}


NAME = "000000010000000000000003"


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", f"{NAME}: not a WAL segment: 0 bytes, a segment header needs 40"),
        (header_bytes()[:39], f"{NAME}: not a WAL segment: 39 bytes, a segment header needs 40"),
        (bytes(8192), f"{NAME}: not a WAL segment of PostgreSQL 12 to 17: unknown page magic 0x0000"),
        (header_bytes(magic=0xD098), f"{NAME}: not a WAL segment of PostgreSQL 12 to 17: unknown page magic 0xD098"),
        (header_bytes(magic=0xD118), f"{NAME}: not a WAL segment of PostgreSQL 12 to 17: unknown page magic 0xD118"),
        (struct.pack(">HHIQI4xQII", 0xD110, 2, 1, 0x3000000, 0, SYSID, SEG16, 8192),  # big-endian server
         f"{NAME}: not a WAL segment of PostgreSQL 12 to 17: unknown page magic 0x10D1"),
        (header_bytes(info=0x0000), f"{NAME}: not a WAL segment: first page has no long header (xlp_info 0x0000)"),
        (header_bytes(info=0x0005), f"{NAME}: not a WAL segment: first page has no long header (xlp_info 0x0005)"),
        (header_bytes(info=0x000A), f"{NAME}: not a WAL segment: first page has no long header (xlp_info 0x000A)"),
        (b"-- PostgreSQL database dump --\n" * 3, None),
    ],
)
def test_read_header_rejects(data, message):
    if message is None:
        message = f"{NAME}: not a WAL segment of PostgreSQL 12 to 17: unknown page magic 0x2D2D"
    with raises_exactly(WalFormatError, message):
        wal.read_long_page_header(data, name=NAME)


def test_read_header_default_name():
    with raises_exactly(WalFormatError, "WAL file: not a WAL segment: 3 bytes, a segment header needs 40"):
        wal.read_long_page_header(b"abc")


def header(**fields):
    return wal.read_long_page_header(header_bytes(**fields))


@pytest.mark.parametrize(
    "hdr, name, kwargs",
    [
        (header(), NAME, {}),
        (header(), NAME + ".partial", {}),
        (header(), NAME, {"system_identifier": SYSID}),
        (header(tli=2, pageaddr=0x100000000), "000000020000000100000000", {}),
        # a new timeline's first segment is a copy of the parent's and keeps its timeline
        (header(tli=1), "000000020000000000000003", {}),
        (header(tli=1), "000000020000000000000003", {"history": [HistoryEntry(1, 0x3000158)]}),
        (header(tli=2, pageaddr=0x4000000), "000000020000000000000004", {"history": [HistoryEntry(1, 0x3000158)]}),
        (header(tli=2), "000000020000000000000003", {"history": [HistoryEntry(1, 0x3000000)]}),  # switch at the boundary
        (header(pageaddr=0x3000000, seg_size=MIB), "000000010000000000000030", {"segment_size": MIB}),
    ],
)
def test_check_segment_header_accepts(hdr, name, kwargs):
    wal.check_segment_header(hdr, expected_name=name, **kwargs)


@pytest.mark.parametrize(
    "hdr, name, kwargs, cls, message",
    [
        (header(pageaddr=0x4000000), NAME, {}, WalFormatError,
         f"{NAME}: page address 0/4000000 does not match the file name, which starts at 0/3000000"),
        (header(pageaddr=0x103000000), NAME, {}, WalFormatError,
         f"{NAME}: page address 1/3000000 does not match the file name, which starts at 0/3000000"),
        (header(seg_size=64 * MIB), NAME, {}, WalFormatError,
         f"{NAME}: header says 64 MiB segments, expected 16 MiB"),
        (header(), NAME, {"segment_size": MIB}, WalFormatError,
         f"{NAME}: header says 16 MiB segments, expected 1 MiB"),
        (header(tli=2), NAME, {}, WalFormatError,
         f"{NAME}: header timeline 2 does not match the file name (expected at most 1)"),
        (header(tli=0), NAME, {}, WalFormatError,
         f"{NAME}: header timeline 0 does not match the file name (expected at most 1)"),
        (header(tli=2), "000000020000000000000003", {"history": [HistoryEntry(1, 0x3000158)]}, WalFormatError,
         "000000020000000000000003: header timeline 2 does not match the file name (expected 1)"),
        (header(tli=1, pageaddr=0x4000000), "000000020000000000000004", {"history": [HistoryEntry(1, 0x3000158)]},
         WalFormatError, "000000020000000000000004: header timeline 1 does not match the file name (expected 2)"),
        (header(sysid=42), NAME, {"system_identifier": SYSID}, ForeignWalError,
         f"{NAME}: system identifier 42 is not this cluster's {SYSID}"),
        (header(), "00000001.history", {}, WalFormatError, "00000001.history: a history file has no WAL page header"),
        (header(), "000000010000000000000002.00000028.backup", {}, WalFormatError,
         "000000010000000000000002.00000028.backup: a backup file has no WAL page header"),
    ],
)
def test_check_segment_header_rejects(hdr, name, kwargs, cls, message):
    with raises_exactly(cls, message):
        wal.check_segment_header(hdr, expected_name=name, **kwargs)


def test_renamed_segment_error_has_a_hint():
    with pytest.raises(WalFormatError) as info:
        wal.check_segment_header(header(pageaddr=0x4000000), expected_name=NAME)
    assert info.value.hint == "the file was renamed or copied from another position; do not archive it under this name"


def test_real_pg15_segment_header():
    """First page of 000000010000000000000001 from a fresh PostgreSQL 15 initdb (x86-64)."""
    data = (DATA / "wal_header_pg15.bin").read_bytes()
    assert len(data) == 8192
    hdr = wal.read_long_page_header(data, name="000000010000000000000001")
    assert hdr == LongPageHeader(
        magic=0xD110, info=wal.XLP_LONG_HEADER, timeline=1, pageaddr=0x1000000, rem_len=0,
        system_identifier=7712952132802306353, segment_size=SEG16, block_size=8192, pg_version=15,
    )
    wal.check_segment_header(hdr, expected_name="000000010000000000000001", system_identifier=7712952132802306353)
    with raises_exactly(
        WalFormatError,
        "000000010000000000000002: page address 0/1000000 does not match the file name, which starts at 0/2000000",
    ):
        wal.check_segment_header(hdr, expected_name="000000010000000000000002")
