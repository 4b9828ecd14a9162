"""Where physical backups live in the vault: every key has a format/parse pair here.

    backups/<label>/manifest.json   the commit marker, written last
    backups/<label>/files.jsonl     one JSON line per file, directory or link, sorted by path
    backups/<label>/data/<NNNNNN>   data objects: bundles of small files, parts of large ones
    locks/backup.json               held while a backup runs

A label is the UTC start time and the type, ``20261127T203000ZF`` (full) or
``…I`` (incremental): labels sort by time, and a label names exactly one backup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable

from pgvault.backup.errors import BackupError

BACKUPS_PREFIX = "backups/"
LOCK_KEY = "locks/backup.json"
MANIFEST_NAME = "manifest.json"
FILES_NAME = "files.jsonl"
DATA_DIR = "data"

TYPE_LETTERS = {"full": "F", "incr": "I"}
_TYPES_BY_LETTER = {v: k for k, v in TYPE_LETTERS.items()}
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
_LABEL = re.compile(r"^(\d{8}T\d{6}Z)([FI])$")
_KEY = re.compile(r"^backups/(?P<label>[^/]+)/(?:(?P<file>manifest\.json|files\.jsonl)|data/(?P<number>\d{6,}))$")


@dataclass(frozen=True)
class BackupKey:
    """What a key under ``backups/`` is: the label, the kind, the data object's number."""

    label: str
    kind: str  # "manifest", "files" or "data"
    number: int | None = None


def format_label(when: datetime, backup_type: str) -> str:
    if backup_type not in TYPE_LETTERS:
        raise ValueError(f"unknown backup type {backup_type!r}; expected one of {', '.join(TYPE_LETTERS)}")
    return when.astimezone(timezone.utc).strftime(_TIME_FORMAT) + TYPE_LETTERS[backup_type]


def parse_label(label: str) -> tuple[datetime, str] | None:
    """(UTC start time, "full" | "incr"), or None if ``label`` is not a backup label."""
    match = _LABEL.match(label) if isinstance(label, str) else None
    if match is None:
        return None
    try:
        when = datetime.strptime(match[1], _TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return when, _TYPES_BY_LETTER[match[2]]


def check_label(label: str) -> str:
    """``label`` if it is one, else a BackupError saying what a label looks like."""
    if parse_label(label) is None:
        raise BackupError(f"invalid backup label {label!r}: expected e.g. 20261127T203000ZF (UTC time, then F or I)")
    return label


def next_label(now: datetime, backup_type: str, existing: Iterable[str]) -> str:
    """A label for a backup starting ``now``, later than every existing one.

    Two backups within one second would share a label; the later one takes the
    next free second instead, so labels stay unique and in start order.
    """
    latest = max((parsed[0] for parsed in map(parse_label, existing) if parsed), default=None)
    when = now.astimezone(timezone.utc).replace(microsecond=0)
    if latest is not None and when <= latest:
        when = latest + timedelta(seconds=1)
    return format_label(when, backup_type)


def backup_prefix(label: str) -> str:
    return f"{BACKUPS_PREFIX}{check_label(label)}/"


def manifest_key(label: str) -> str:
    return backup_prefix(label) + MANIFEST_NAME


def files_key(label: str) -> str:
    return backup_prefix(label) + FILES_NAME


def data_key(label: str, number: int) -> str:
    if not isinstance(number, int) or number < 0:
        raise ValueError(f"invalid data object number {number!r}")
    return f"{backup_prefix(label)}{DATA_DIR}/{number:06d}"


def parse_backup_key(key: str) -> BackupKey | None:
    """What ``key`` is, or None for a key that is not part of a backup's layout."""
    match = _KEY.match(key)
    if match is None or parse_label(match["label"]) is None:
        return None
    if match["number"] is not None:
        return BackupKey(match["label"], "data", int(match["number"]))
    return BackupKey(match["label"], "manifest" if match["file"] == MANIFEST_NAME else "files")
