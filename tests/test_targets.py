"""pgvault.targets: parsing --to / --timeline and the recovery settings they become."""

from datetime import datetime, timedelta, timezone

import pytest

from pgvault.errors import EXIT_CODES, TargetError
from pgvault.targets import (
    Target,
    conf_quote,
    format_time,
    parse_target,
    parse_timeline,
    recovery_settings,
)
from tests.asserts import raises_exactly

UTC = timezone.utc
SYNTAX = (
    "expected an ISO-8601 timestamp with a UTC offset (e.g. 2026-11-27T03:15:00+00:00), "
    "'latest', 'immediate', 'lsn:<X/X>', 'xid:<number>' or 'name:<restore point>'"
)



def test_target_error_has_its_exit_code():
    assert TargetError.exit_code == 70
    assert EXIT_CODES[TargetError] == 70


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2026-11-27T03:15:00+00:00", datetime(2026, 11, 27, 3, 15, tzinfo=UTC)),
        ("2026-11-27T03:15:00Z", datetime(2026, 11, 27, 3, 15, tzinfo=UTC)),
        ("2026-11-27T03:15:00+02:00", datetime(2026, 11, 27, 1, 15, tzinfo=UTC)),
        ("2026-11-27T01:15:00-05:30", datetime(2026, 11, 27, 6, 45, tzinfo=UTC)),
        ("2026-11-27 03:15:00+00:00", datetime(2026, 11, 27, 3, 15, tzinfo=UTC)),
        ("2026-11-27T00:30:00+01:00", datetime(2026, 11, 26, 23, 30, tzinfo=UTC)),
        ("2026-11-27T03:15:00.250+00:00", datetime(2026, 11, 27, 3, 15, 0, 250000, tzinfo=UTC)),
        ("  2026-11-27T03:15:00Z ", datetime(2026, 11, 27, 3, 15, tzinfo=UTC)),
    ],
)
def test_time_targets_are_normalised_to_utc(text, expected):
    target = parse_target(text)
    assert target == Target("time", time=expected)
    assert target.time.utcoffset() == timedelta(0)
    assert target.time.tzinfo is UTC
    assert parse_target(str(target)) == target


@pytest.mark.parametrize(
    "text, example",
    [
        ("2026-11-27T03:15:00", "2026-11-27T03:15:00+00:00"),
        ("2026-11-27 03:15", "2026-11-27T03:15:00+00:00"),
        ("2026-11-27", "2026-11-27T00:00:00+00:00"),
        ("2026-11-27T03:15:00.5", "2026-11-27T03:15:00.500000+00:00"),
    ],
)
def test_time_without_offset_is_refused(text, example):
    with raises_exactly(TargetError, f"timestamp {text!r} has no UTC offset; add one, e.g. {example}"):
        parse_target(text)


def test_the_issue_example_message():
    with raises_exactly(
        TargetError,
        "timestamp '2026-11-27T03:15:00' has no UTC offset; add one, e.g. 2026-11-27T03:15:00+00:00",
    ):
        parse_target("2026-11-27T03:15:00")


@pytest.mark.parametrize("text", ["2026-13-27T03:15:00+00:00", "2026-11-27T25:00:00Z", "2026-11-27T03:15:00+99:00"])
def test_invalid_timestamps(text):
    with raises_exactly(
        TargetError,
        f"invalid timestamp {text!r}: expected ISO-8601 with a UTC offset, e.g. 2026-11-27T03:15:00+00:00",
    ):
        parse_target(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("latest", Target("latest")),
        ("LATEST", Target("latest")),
        ("immediate", Target("immediate")),
        ("lsn:0/3000060", Target("lsn", lsn=0x3000060)),
        ("LSN:16/b374d848", Target("lsn", lsn=0x16B374D848)),
        ("xid:12345", Target("xid", xid=12345)),
        ("xid:3", Target("xid", xid=3)),
        ("xid:4294967296123", Target("xid", xid=4294967296123)),
        ("name:before-migration", Target("name", name="before-migration")),
        ("name:a:b c", Target("name", name="a:b c")),
        ("name:" + "x" * 63, Target("name", name="x" * 63)),
    ],
)
def test_other_targets(text, expected):
    assert parse_target(text) == expected


@pytest.mark.parametrize(
    "target, text",
    [
        (Target("latest"), "latest"),
        (Target("immediate"), "immediate"),
        (Target("lsn", lsn=0x3000060), "lsn:0/3000060"),
        (Target("xid", xid=12345), "xid:12345"),
        (Target("name", name="nightly"), "name:nightly"),
        (Target("time", time=datetime(2026, 11, 27, 4, 15, tzinfo=timezone(timedelta(hours=1)))),
         "2026-11-27T03:15:00+00:00"),
    ],
)
def test_str_round_trips(target, text):
    assert str(target) == text
    assert parse_target(text) == target


@pytest.mark.parametrize(
    "text, message",
    [
        ("", f"empty recovery target: {SYNTAX}"),
        ("   ", f"empty recovery target: {SYNTAX}"),
        ("yesterday", f"invalid recovery target 'yesterday': {SYNTAX}"),
        ("earliest", f"invalid recovery target 'earliest': {SYNTAX}"),
        ("lsn:", "invalid LSN target 'lsn:': expected two hexadecimal parts of 1 to 8 digits, like 'lsn:0/3000060'"),
        ("lsn:0/G", "invalid LSN target 'lsn:0/G': expected two hexadecimal parts of 1 to 8 digits, like 'lsn:0/3000060'"),
        ("lsn:3000060", "invalid LSN target 'lsn:3000060': expected two hexadecimal parts of 1 to 8 digits, "
                        "like 'lsn:0/3000060'"),
        ("0/3000060", "invalid recovery target '0/3000060': an LSN needs the 'lsn:' prefix, like 'lsn:0/3000060'"),
        ("12345", "invalid recovery target '12345': a transaction ID needs the 'xid:' prefix, like 'xid:12345'"),
        ("xid:", "invalid transaction ID target 'xid:': expected a decimal number from 3 to "
                 "18446744073709551615, like 'xid:12345'"),
        ("xid:abc", "invalid transaction ID target 'xid:abc': expected a decimal number from 3 to "
                    "18446744073709551615, like 'xid:12345'"),
        ("xid:-5", "invalid transaction ID target 'xid:-5': expected a decimal number from 3 to "
                   "18446744073709551615, like 'xid:12345'"),
        ("xid:2", "invalid transaction ID target 'xid:2': expected a decimal number from 3 to "
                  "18446744073709551615, like 'xid:12345'"),
        ("xid:18446744073709551616", "invalid transaction ID target 'xid:18446744073709551616': expected a "
                                     "decimal number from 3 to 18446744073709551615, like 'xid:12345'"),
        ("xid:0x10", "invalid transaction ID target 'xid:0x10': expected a decimal number from 3 to "
                     "18446744073709551615, like 'xid:12345'"),
        ("name:", "invalid restore point target 'name:': the name is empty, like 'name:before-migration'"),
        ("name:" + "x" * 64, f"invalid restore point target {'name:' + 'x' * 64!r}: the name is 64 bytes, "
                             "PostgreSQL's limit is 63"),
        ("name:a\tb", "invalid restore point target 'name:a\\tb': the name contains a control character"),
    ],
)
def test_bad_targets(text, message):
    with raises_exactly(TargetError, message):
        parse_target(text)


@pytest.mark.parametrize("text, expected", [("latest", "latest"), ("Latest", "latest"), ("1", 1), ("2", 2), (" 12 ", 12)])
def test_parse_timeline(text, expected):
    assert parse_timeline(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-1", "current", "0x2", "4294967296", "1.0", "²"])
def test_parse_timeline_refuses(text):
    with raises_exactly(
        TargetError, f"invalid timeline {text!r}: expected 'latest' or a timeline number from 1 to 4294967295"
    ):
        parse_timeline(text)


def test_target_checks_its_fields():
    with pytest.raises(ValueError):
        Target("time")
    with pytest.raises(ValueError):
        Target("time", time=datetime(2026, 11, 27))
    with pytest.raises(ValueError):
        Target("latest", lsn=5)
    with pytest.raises(ValueError):
        Target("lsn", xid=5)
    with pytest.raises(ValueError):
        Target("tomorrow")


@pytest.mark.parametrize(
    "moment, text",
    [
        (datetime(2026, 11, 27, 3, 15, tzinfo=UTC), "2026-11-27T03:15:00+00:00"),
        (datetime(2026, 11, 27, 3, 15, 0, 120000, tzinfo=UTC), "2026-11-27T03:15:00.120+00:00"),
        (datetime(2026, 11, 27, 3, 15, 0, 7, tzinfo=UTC), "2026-11-27T03:15:00.000007+00:00"),
        (datetime(2026, 11, 27, 5, 15, tzinfo=timezone(timedelta(hours=2))), "2026-11-27T03:15:00+00:00"),
    ],
)
def test_format_time(moment, text):
    assert format_time(moment) == text


T = datetime(2026, 11, 27, 3, 15, tzinfo=UTC)


@pytest.mark.parametrize(
    "target, timeline, expected",
    [
        (Target("time", time=T), 2, {
            "recovery_target_time": "'2026-11-27T03:15:00+00:00'",
            "recovery_target_inclusive": "'true'",
            "recovery_target_timeline": "'2'",
        }),
        (Target("lsn", lsn=0x3000060), "latest", {
            "recovery_target_lsn": "'0/3000060'",
            "recovery_target_inclusive": "'true'",
            "recovery_target_timeline": "'latest'",
        }),
        (Target("xid", xid=12345), 1, {
            "recovery_target_xid": "'12345'",
            "recovery_target_inclusive": "'true'",
            "recovery_target_timeline": "'1'",
        }),
        (Target("name", name="it's \\here"), 3, {
            "recovery_target_name": "'it''s \\\\here'",
            "recovery_target_timeline": "'3'",
        }),
        (Target("immediate"), 1, {"recovery_target": "'immediate'", "recovery_target_timeline": "'1'"}),
        (Target("latest"), 4, {"recovery_target_timeline": "'4'"}),
    ],
)
def test_recovery_settings(target, timeline, expected):
    settings = recovery_settings(target, timeline)
    assert settings == expected
    assert list(settings) == list(expected)  # order: the target, inclusive, timeline


@pytest.mark.parametrize("timeline", [0, -1, "2", True, None])
def test_recovery_settings_refuses_bad_timelines(timeline):
    with pytest.raises(ValueError):
        recovery_settings(Target("latest"), timeline)


def test_conf_quote():
    assert conf_quote("plain") == "'plain'"
    assert conf_quote("a'b") == "'a''b'"
    assert conf_quote("c:\\dir") == "'c:\\\\dir'"
