"""Recovery targets: what `--to` and `--timeline` accept, and the settings they become — pure.

``--to`` takes one of::

    2026-11-27T03:15:00+00:00   an ISO-8601 timestamp with a UTC offset (Z, +02:00, … ; normalised to UTC)
    latest                      the end of the archived WAL
    immediate                   the chosen backup's consistency point
    lsn:0/3000060               a WAL position
    xid:12345                   a transaction ID (its commit is included)
    name:before-migration       a restore point made with pg_create_restore_point()

and ``--timeline`` takes ``latest`` (the default) or a timeline number.
:func:`recovery_settings` turns a target into PostgreSQL's ``recovery_target_*``
settings; ``restore_command`` and ``recovery_target_action`` are the executor's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from pgvault.errors import TargetError, WalFormatError
from pgvault.wal import MAX_TIMELINE, format_lsn, parse_lsn

KINDS = ("time", "lsn", "xid", "name", "latest", "immediate")

#: A restore point name is at most 63 bytes (PostgreSQL's MAXFNAMELEN - 1).
MAX_NAME_BYTES = 63
#: Transaction IDs below 3 are reserved (FirstNormalTransactionId); PostgreSQL also
#: accepts a 64-bit, epoch-qualified xid as pg_current_xact_id() prints it.
MIN_XID = 3
MAX_XID = 2**64 - 1

_SYNTAX = (
    "expected an ISO-8601 timestamp with a UTC offset (e.g. 2026-11-27T03:15:00+00:00), "
    "'latest', 'immediate', 'lsn:<X/X>', 'xid:<number>' or 'name:<restore point>'"
)


@dataclass(frozen=True)
class Target:
    """A recovery target. Exactly the field of its ``kind`` is set.

    ``time`` is timezone-aware and normalised to UTC (``+00:00``); ``str()`` gives
    the form :func:`parse_target` reads back.
    """

    kind: str
    time: datetime | None = None
    lsn: int | None = None
    xid: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown target kind {self.kind!r}")
        given = {f for f in ("time", "lsn", "xid", "name") if getattr(self, f) is not None}
        wanted = {self.kind} & {"time", "lsn", "xid", "name"}
        if given != wanted:
            raise ValueError(f"a {self.kind} target takes {sorted(wanted) or 'no value'}, got {sorted(given)}")
        if self.time is not None:
            if self.time.tzinfo is None or self.time.utcoffset() is None:
                raise ValueError("a time target needs a timezone-aware datetime")
            object.__setattr__(self, "time", self.time.astimezone(timezone.utc))

    def __str__(self) -> str:
        if self.kind == "time":
            assert self.time is not None
            return format_time(self.time)
        if self.kind == "lsn":
            assert self.lsn is not None
            return f"lsn:{format_lsn(self.lsn)}"
        if self.kind == "xid":
            return f"xid:{self.xid}"
        if self.kind == "name":
            return f"name:{self.name}"
        return self.kind


def format_time(moment: datetime) -> str:
    """ISO-8601 in UTC, whole seconds unless the value has a fraction (then ms or µs)."""
    moment = moment.astimezone(timezone.utc)
    if moment.microsecond == 0:
        spec = "seconds"
    elif moment.microsecond % 1000 == 0:
        spec = "milliseconds"
    else:
        spec = "microseconds"
    return moment.isoformat(timespec=spec)


def parse_target(text: str) -> Target:
    """Parse a `--to` value; a :class:`TargetError` says exactly what is wrong and what is expected."""
    if not isinstance(text, str) or not text.strip():
        raise TargetError(f"empty recovery target: {_SYNTAX}")
    value = text.strip()
    lowered = value.lower()
    if lowered in ("latest", "immediate"):
        return Target(lowered)
    prefix, sep, rest = value.partition(":")
    kind = prefix.lower()
    if sep and kind == "lsn":
        try:
            return Target("lsn", lsn=parse_lsn(rest))
        except WalFormatError:
            raise TargetError(
                f"invalid LSN target {value!r}: expected two hexadecimal parts of 1 to 8 digits, "
                "like 'lsn:0/3000060'"
            ) from None
    if sep and kind == "xid":
        if not rest.isascii() or not rest.isdigit() or not MIN_XID <= int(rest) <= MAX_XID:
            raise TargetError(
                f"invalid transaction ID target {value!r}: expected a decimal number from "
                f"{MIN_XID} to {MAX_XID}, like 'xid:12345'"
            )
        return Target("xid", xid=int(rest))
    if sep and kind == "name":
        return Target("name", name=_check_name(rest, value))
    return Target("time", time=_parse_time(value))


def _check_name(name: str, given: str) -> str:
    if not name:
        raise TargetError(f"invalid restore point target {given!r}: the name is empty, like 'name:before-migration'")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise TargetError(
            f"invalid restore point target {given!r}: the name is {len(name.encode('utf-8'))} bytes, "
            f"PostgreSQL's limit is {MAX_NAME_BYTES}"
        )
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise TargetError(f"invalid restore point target {given!r}: the name contains a control character")
    return name


def _parse_time(value: str) -> datetime:
    # A timestamp starts with a four-digit year; anything else is an unknown form.
    if not (len(value) >= 10 and value[:4].isdigit() and value[4] == "-"):
        if value.isascii() and value.isdigit():
            raise TargetError(
                f"invalid recovery target {value!r}: a transaction ID needs the 'xid:' prefix, like 'xid:{value}'"
            )
        try:
            parse_lsn(value)
        except WalFormatError:
            raise TargetError(f"invalid recovery target {value!r}: {_SYNTAX}") from None
        raise TargetError(f"invalid recovery target {value!r}: an LSN needs the 'lsn:' prefix, like 'lsn:{value}'")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise TargetError(
            f"invalid timestamp {value!r}: expected ISO-8601 with a UTC offset, e.g. 2026-11-27T03:15:00+00:00"
        ) from None
    if moment.tzinfo is None:
        example = moment.isoformat(timespec="seconds" if moment.microsecond == 0 else "microseconds")
        raise TargetError(
            f"timestamp {value!r} has no UTC offset; add one, e.g. {example}+00:00"
        )
    return moment.astimezone(timezone.utc)


def parse_timeline(text: str) -> int | str:
    """Parse a `--timeline` value: ``"latest"`` or a timeline number (decimal, 1 or more)."""
    value = text.strip() if isinstance(text, str) else ""
    if value.lower() == "latest":
        return "latest"
    if value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_TIMELINE:
        return int(value)
    raise TargetError(
        f"invalid timeline {text!r}: expected 'latest' or a timeline number from 1 to {MAX_TIMELINE}"
    )


def conf_quote(value: str) -> str:
    """``value`` as a single-quoted postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def recovery_settings(target: Target, timeline: int | str) -> dict[str, str]:
    """The ``recovery_target_*`` settings for ``target`` on ``timeline``, in writing order.

    Each value is already a postgresql.conf literal (quoted and escaped): write
    ``f"{key} = {value}"``. ``timeline`` is ``"latest"`` or a number; pass the
    plan's resolved timeline so recovery follows exactly the planned history.
    Time, LSN and xid targets are inclusive: a commit at exactly the target time
    (or the record at the LSN, the transaction's commit) is replayed. ``latest``
    sets no target: recovery replays all WAL it can fetch.
    """
    if timeline != "latest" and not (
        isinstance(timeline, int) and not isinstance(timeline, bool) and 1 <= timeline <= MAX_TIMELINE
    ):
        raise ValueError(f"invalid timeline {timeline!r}")
    settings: dict[str, str] = {}
    if target.kind == "time":
        assert target.time is not None
        settings["recovery_target_time"] = conf_quote(format_time(target.time))
    elif target.kind == "lsn":
        assert target.lsn is not None
        settings["recovery_target_lsn"] = conf_quote(format_lsn(target.lsn))
    elif target.kind == "xid":
        settings["recovery_target_xid"] = conf_quote(str(target.xid))
    elif target.kind == "name":
        assert target.name is not None
        settings["recovery_target_name"] = conf_quote(target.name)
    elif target.kind == "immediate":
        settings["recovery_target"] = conf_quote("immediate")
    if target.kind in ("time", "lsn", "xid"):
        settings["recovery_target_inclusive"] = conf_quote("true")
    settings["recovery_target_timeline"] = conf_quote(str(timeline))
    return settings
