"""Diverged WAL kept in the vault under ``orphans/``: stored, listed, fetched back — never replayed by a restore.

When a node wrote WAL its new primary never saw (see :mod:`pgvault.divergence`),
reseed copies the segments holding that tail here before it rebuilds the node:

    orphans/<id>/wal/<walname>.<sha256>.<size>    a segment of the node's pg_wal (or its archived copy)
    orphans/<id>/orphan.json                       the record: fork point, time range, commits; written last

``<id>`` is the capture time in UTC and the node's timeline at the fork, e.g.
``20261127T231502Z-tl1``. Objects go through the object format (compressed,
encrypted with a key) and are write-once like everything else; an orphan exists
once its record is written. Restores never look here: the WAL index is
``wal/`` only. An operator replays a tail on purpose (`pgvault orphans fetch`,
then a scratch node: see the README).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pgvault import codec
from pgvault.archive import file_sha256
from pgvault.errors import ObjectExistsError, ObjectNotFoundError, PgvaultError
from pgvault.storage import Storage
from pgvault.wal import format_lsn

ORPHANS_PREFIX = "orphans/"
RECORD_NAME = "orphan.json"
FORMAT_VERSION = 1
_ID = re.compile(r"^(?P<time>\d{8}T\d{6}Z)-tl(?P<tli>[1-9][0-9]{0,9})$")
_SEGMENT = re.compile(r"^(?P<name>[0-9A-F]{24})\.(?P<sha>[0-9a-f]{64})\.(?P<size>[0-9]{1,12})$")


# --- keys ---------------------------------------------------------------------------------


def format_orphan_id(captured_at: datetime, timeline: int) -> str:
    return f"{captured_at.astimezone(UTC).strftime('%Y%m%dT%H%M%SZ')}-tl{timeline}"


def parse_orphan_id(text: str) -> tuple[datetime, int] | None:
    m = _ID.match(text)
    if m is None:
        return None
    return datetime.strptime(m["time"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC), int(m["tli"])


def record_key(orphan_id: str) -> str:
    return f"{ORPHANS_PREFIX}{orphan_id}/{RECORD_NAME}"


def format_segment_key(orphan_id: str, name: str, *, sha256: str, size: int) -> str:
    key = f"{ORPHANS_PREFIX}{orphan_id}/wal/{name}.{sha256}.{size}"
    if parse_segment_key(key) is None:
        raise ValueError(f"not a valid orphan segment key: {key}")
    return key


def parse_segment_key(key: str) -> tuple[str, str, str, int] | None:
    """(orphan id, WAL file name, sha256, size) of an orphan segment key, or None."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] + "/" != ORPHANS_PREFIX or parts[2] != "wal" or parse_orphan_id(parts[1]) is None:
        return None
    m = _SEGMENT.match(parts[3])
    if m is None:
        return None
    return parts[1], m["name"], m["sha"], int(m["size"])


# --- the record -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeptSegment:
    name: str
    sha256: str
    size: int
    key: str
    source: str  # "pg_wal" (the node's own copy) or "vault" (the copy it had archived)


@dataclass(frozen=True)
class OrphanRecord:
    """One kept tail: where it forked, what it holds, where its segments are."""

    id: str
    captured_at: str  # ISO-8601 UTC
    host: str
    data_dir: str
    system_identifier: str
    node_timeline: int  # the node's timeline (its newest)
    fork_timeline: int  # the node's timeline at the fork point: the tail starts on it
    primary_timeline: int  # the timeline of the primary the node diverged from
    fork_lsn: str
    end_lsn: str | None  # where the node's valid WAL ends
    last_record_lsn: str | None
    records: int
    commits: int
    aborts: int
    first_commit_time: str | None
    last_commit_time: str | None
    segments: tuple[KeptSegment, ...]
    missing: tuple[str, ...] = ()  # segments of the tail found neither in pg_wal nor in the vault
    format: int = FORMAT_VERSION
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["segments"] = [asdict(s) for s in self.segments]
        data["missing"] = list(self.missing)
        data["notes"] = list(self.notes)
        data["bytes"] = sum(s.size for s in self.segments)
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, blob: bytes, *, where: str) -> OrphanRecord:
        from pgvault.errors import CorruptObjectError

        try:
            data = json.loads(blob)
            if data.get("format") != FORMAT_VERSION:
                raise ValueError(f"unknown format {data.get('format')!r}")
            data.pop("bytes", None)
            data["segments"] = tuple(KeptSegment(**s) for s in data["segments"])
            data["missing"] = tuple(data.get("missing", ()))
            data["notes"] = tuple(data.get("notes", ()))
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptObjectError(f"orphan record {where} is unreadable: {exc}") from None


# --- storing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentSource:
    """A segment of the tail and the file holding it now."""

    name: str
    path: str
    source: str  # "pg_wal" | "vault"


def store_segment(storage: Storage, orphan_id: str, segment: SegmentSource, *, options) -> KeptSegment:
    """Store one segment (write-once: an identical object already there counts as stored)."""
    sha, size = file_sha256(segment.path)
    key = format_segment_key(orphan_id, segment.name, sha256=sha, size=size)
    with open(segment.path, "rb") as f:
        encoder = codec.encode(f, name=key, compression=options.compression, level=options.level,
                               threads=options.threads, key=options.key)
        try:
            storage.put(key, encoder)
        except ObjectExistsError:  # the key names the checksum: the same bytes are already kept
            return KeptSegment(segment.name, sha, size, key, segment.source)
    if encoder.plaintext_sha256 != sha:
        storage.delete(key)
        raise PgvaultError(f"{segment.path} changed while it was being kept; not kept")
    return KeptSegment(segment.name, sha, size, key, segment.source)


def store_orphan(storage: Storage, record: OrphanRecord, segments: list[SegmentSource], *, options,
                 notify: Callable[[str], None] = lambda _m: None) -> OrphanRecord:
    """Store every segment, then the record (the commit marker). Returns the record as written."""
    kept = []
    for number, segment in enumerate(segments, start=1):
        notify(f"keeping {segment.name} ({number} of {len(segments)}, from {segment.source})")
        kept.append(store_segment(storage, record.id, segment, options=options))
    from pgvault.backup.manifest import write_record

    record = replace(record, segments=tuple(kept))
    write_record(storage, record_key(record.id), io.BytesIO(record.to_json()), options=options)
    return record


# --- reading --------------------------------------------------------------------------------


def read_orphan(storage: Storage, orphan_id: str, *, keyring, require_encryption: bool = False) -> OrphanRecord:
    key = record_key(orphan_id)
    try:
        with storage.open(key) as f:
            blob = f.read()
    except ObjectNotFoundError:
        raise ObjectNotFoundError(f"there is no orphaned tail {orphan_id} in {storage.description}",
                                  hint="`pgvault orphans` lists what is kept") from None
    plain = codec.decode_bytes(blob, name=key, keyring=keyring, require_encryption=require_encryption)
    return OrphanRecord.from_json(plain, where=f"{storage.description}/{key}")


def list_orphans(storage: Storage, *, keyring, require_encryption: bool = False) -> list[OrphanRecord]:
    """Every kept tail whose record is written, oldest first."""
    ids = []
    for info in storage.list(ORPHANS_PREFIX):
        parts = info.key.split("/")
        if len(parts) == 3 and parts[2] == RECORD_NAME and parse_orphan_id(parts[1]) is not None:
            ids.append(parts[1])
    return [read_orphan(storage, i, keyring=keyring, require_encryption=require_encryption) for i in sorted(ids)]


def find_same_tail(orphans: list[OrphanRecord], *, system_identifier: int, fork_timeline: int, fork_lsn: int,
                   segments: dict[str, str]) -> OrphanRecord | None:
    """An orphan already holding exactly this tail (same fork, same segment contents): reseed ran before."""
    for o in orphans:
        if (o.system_identifier == str(system_identifier) and o.fork_timeline == fork_timeline
                and o.fork_lsn == format_lsn(fork_lsn) and {s.name: s.sha256 for s in o.segments} == segments):
            return o
    return None


def fetch_orphan(storage: Storage, orphan_id: str, dest_dir: str, *, keyring,
                 require_encryption: bool = False) -> list[str]:
    """Write a tail's segments, verified, into ``dest_dir`` (e.g. a scratch node's pg_wal); returns their paths.

    A file of the same name already there is left alone when identical and is
    an error otherwise: nothing is overwritten.
    """
    record = read_orphan(storage, orphan_id, keyring=keyring, require_encryption=require_encryption)
    if not os.path.isdir(dest_dir):
        raise PgvaultError(f"{dest_dir} is not a directory")
    written = []
    for seg in record.segments:
        dest = os.path.join(dest_dir, seg.name)
        if os.path.lexists(dest):
            if os.path.isfile(dest) and file_sha256(dest) == (seg.sha256, seg.size):
                written.append(dest)
                continue
            raise PgvaultError(f"{dest} exists with other content; not overwritten",
                               hint="fetch into an empty directory")
        tmp = os.path.join(dest_dir, f".pgvault-{os.getpid()}-{seg.name}.tmp")
        try:
            with storage.open(seg.key) as src, open(tmp, "wb") as out:
                decoder = codec.decode(src, name=seg.key, keyring=keyring, expected_sha256=seg.sha256,
                                       require_encryption=require_encryption)
                while block := decoder.read(1 << 20):
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(dest)
    return written


def describe(record: OrphanRecord) -> str:
    """One line for `pgvault orphans` and reseed's output."""
    span = (f"{record.first_commit_time} .. {record.last_commit_time}" if record.first_commit_time
            else "no commits")
    size = sum(s.size for s in record.segments)
    return (f"{record.id}: WAL of timeline {record.fork_timeline} from {record.fork_lsn} to {record.end_lsn or '?'}, "
            f"past the point where timeline {record.primary_timeline} forked off; {record.commits} committed transactions "
            f"({span}), {len(record.segments)} segments, {size / (1 << 20):.1f} MiB; from {record.host}:{record.data_dir}")


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
