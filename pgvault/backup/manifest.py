"""A backup's records: ``manifest.json`` (the commit marker) and ``files.jsonl`` (what to restore).

manifest.json is small and written last: a backup exists only once it is there,
so listings come from manifests alone. files.jsonl has one JSON object per line,
sorted by path (component by component: a directory's entries follow it), and is
read as a stream, so no reader ever holds every block hash of a database::

    {"path": "base/5/1259", "type": "file", "size": N, "mode": 384, "mtime": 1.7e9,
     "blocks": ["<32 hex: the hash of each block, by the manifest's block_hash>", ...],
     "sources": [{"object": "backups/<label>/data/000012", "sha256": "<object plaintext sha256>",
                  "offset": <where the listed blocks start in the object's plaintext>,
                  "blocks": [<block indexes stored there back to back, ascending>]}]}
    {"path": "base", "type": "dir", "mode": 448}
    {"path": "pg_tblspc/16390", "type": "link", "target": "/srv/tblspc"}

Block ``i`` of a file holds bytes ``[i * block_size, min(size, (i + 1) * block_size))``;
the sources of a file cover each of its blocks exactly once. Both records go
through the object format (checksummed, encrypted when a key is configured).

Block hashes find the blocks an incremental must store and check each block on
restore. manifest.json names their algorithm, ``block_hash``: "xxh3-128" (XXH3,
128 bits) in new backups, "sha256-128" (the first 128 bits of SHA-256) in
manifests without the key; a name this version does not know is refused. The
integrity of every object rests on its plaintext SHA-256 either way.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, Iterable, Iterator

from pgvault import codec
from pgvault.backup import layout
from pgvault.backup.errors import BackupError, BackupNotFoundError
from pgvault.errors import CorruptObjectError, ObjectNotFoundError
from pgvault.storage import Storage
from pgvault.wal import format_lsn, parse_lsn

FORMAT_VERSION = 1
HASH_HEX = 32  # block hashes are 128 bits, in hex
#: The block hash algorithm of new backups, and every one this version reads.
BLOCK_HASH = "xxh3-128"
BLOCK_HASH_SHA256 = "sha256-128"  # the first 128 bits of SHA-256: manifests without "block_hash"
BLOCK_HASHES = (BLOCK_HASH, BLOCK_HASH_SHA256)
ENTRY_TYPES = ("file", "dir", "link")


def path_key(path: str) -> list[str]:
    """The order of files.jsonl: by path component, so a directory's entries follow it."""
    return path.split("/")


@dataclass(frozen=True)
class Tablespace:
    oid: int
    location: str


@dataclass(frozen=True)
class Manifest:
    """Everything restore needs to rebuild the data directory and know where recovery starts and ends."""

    format_version: int
    label: str
    type: str  # "full" | "incr"
    requested_type: str
    parent: str | None
    system_identifier: int
    pg_major_version: int
    wal_segment_size: int
    timeline: int
    start_lsn: int
    stop_lsn: int
    start_wal: str
    stop_wal: str
    start_time: datetime
    stop_time: datetime
    backup_from: str  # "primary" | "standby"
    backup_label: str
    tablespace_map: str | None
    tablespaces: tuple[Tablespace, ...]
    block_size: int
    files_object: str
    files_sha256: str
    file_count: int
    bytes_read: int
    bytes_stored: int
    duration_seconds: float
    pgvault_version: str
    block_hash: str = BLOCK_HASH  # how the block hashes of files.jsonl were computed: one of BLOCK_HASHES

    @property
    def key(self) -> str:
        return layout.manifest_key(self.label)

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "label": self.label,
            "type": self.type,
            "requested_type": self.requested_type,
            "parent": self.parent,
            # a string: 64-bit identifiers do not fit a JSON double exactly
            "system_identifier": str(self.system_identifier),
            "pg_major_version": self.pg_major_version,
            "wal_segment_size": self.wal_segment_size,
            "timeline": self.timeline,
            "start_lsn": format_lsn(self.start_lsn),
            "stop_lsn": format_lsn(self.stop_lsn),
            "start_wal": self.start_wal,
            "stop_wal": self.stop_wal,
            "start_time": self.start_time.isoformat(),
            "stop_time": self.stop_time.isoformat(),
            "backup_from": self.backup_from,
            "backup_label": self.backup_label,
            "tablespace_map": self.tablespace_map,
            "tablespaces": [{"oid": t.oid, "location": t.location} for t in self.tablespaces],
            "block_size": self.block_size,
            "files_object": self.files_object,
            "files_sha256": self.files_sha256,
            "file_count": self.file_count,
            "bytes_read": self.bytes_read,
            "bytes_stored": self.bytes_stored,
            "duration_seconds": self.duration_seconds,
            "pgvault_version": self.pgvault_version,
            "block_hash": self.block_hash,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, blob: bytes, *, where: str) -> "Manifest":
        try:
            d = json.loads(blob)
            version = int(d["format_version"])
            if version > FORMAT_VERSION:
                raise BackupError(f"{where} has format version {version}; this pgvault reads up to {FORMAT_VERSION}",
                                  hint="upgrade pgvault")
            block_hash = d.get("block_hash", BLOCK_HASH_SHA256)
            if block_hash not in BLOCK_HASHES:
                raise BackupError(f"{where} has block hashes of algorithm {block_hash!r}; this pgvault knows "
                                  f"{', '.join(BLOCK_HASHES)}", hint="upgrade pgvault")
            manifest = cls(
                format_version=version,
                label=layout.check_label(d["label"]),
                type=_choice(d["type"], ("full", "incr")),
                requested_type=_choice(d["requested_type"], ("full", "incr")),
                parent=layout.check_label(d["parent"]) if d["parent"] is not None else None,
                system_identifier=int(d["system_identifier"]),
                pg_major_version=int(d["pg_major_version"]),
                wal_segment_size=int(d["wal_segment_size"]),
                timeline=int(d["timeline"]),
                start_lsn=parse_lsn(d["start_lsn"]),
                stop_lsn=parse_lsn(d["stop_lsn"]),
                start_wal=str(d["start_wal"]),
                stop_wal=str(d["stop_wal"]),
                start_time=_aware(d["start_time"]),
                stop_time=_aware(d["stop_time"]),
                backup_from=_choice(d["backup_from"], ("primary", "standby")),
                backup_label=str(d["backup_label"]),
                tablespace_map=None if d["tablespace_map"] is None else str(d["tablespace_map"]),
                tablespaces=tuple(Tablespace(int(t["oid"]), str(t["location"])) for t in d["tablespaces"]),
                block_size=int(d["block_size"]),
                files_object=str(d["files_object"]),
                files_sha256=str(d["files_sha256"]),
                file_count=int(d["file_count"]),
                bytes_read=int(d["bytes_read"]),
                bytes_stored=int(d["bytes_stored"]),
                duration_seconds=float(d["duration_seconds"]),
                pgvault_version=str(d["pgvault_version"]),
                block_hash=block_hash,
            )
        except BackupError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackupError(f"{where} is not a valid backup manifest ({exc.__class__.__name__}: {exc})") from None
        if manifest.files_object != layout.files_key(manifest.label) or manifest.block_size <= 0:
            raise BackupError(f"{where} is not a valid backup manifest (files object or block size)")
        return manifest


def _choice(value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _aware(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return when


@dataclass(frozen=True)
class Source:
    """Blocks of one file stored back to back in one object, from ``offset`` of its plaintext."""

    object: str
    sha256: str
    offset: int
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class FileEntry:
    """One line of files.jsonl."""

    path: str
    type: str  # "file" | "dir" | "link"
    mode: int | None = None
    size: int = 0
    mtime: float | None = None
    blocks: tuple[str, ...] = ()
    sources: tuple[Source, ...] = field(default=())
    target: str | None = None

    def to_line(self) -> str:
        if self.type == "dir":
            data: dict = {"path": self.path, "type": "dir", "mode": self.mode}
        elif self.type == "link":
            data = {"path": self.path, "type": "link", "target": self.target}
        else:
            data = {
                "path": self.path, "type": "file", "size": self.size, "mode": self.mode, "mtime": self.mtime,
                "blocks": list(self.blocks),
                "sources": [{"object": s.object, "sha256": s.sha256, "offset": s.offset, "blocks": list(s.blocks)}
                            for s in self.sources],
            }
        return json.dumps(data, separators=(",", ":")) + "\n"

    @classmethod
    def from_line(cls, line: str | bytes, *, where: str) -> "FileEntry":
        try:
            d = json.loads(line)
            path = check_path(d["path"])
            kind = _choice(d["type"], ENTRY_TYPES)
            if kind == "dir":
                return cls(path=path, type=kind, mode=int(d["mode"]))
            if kind == "link":
                target = str(d["target"])
                if not target:
                    raise ValueError("empty link target")
                return cls(path=path, type=kind, target=target)
            return cls(
                path=path, type=kind, mode=int(d["mode"]), size=int(d["size"]),
                mtime=float(d["mtime"]) if d.get("mtime") is not None else None,
                blocks=tuple(_hash(h) for h in d["blocks"]),
                sources=tuple(
                    Source(object=str(s["object"]), sha256=str(s["sha256"]), offset=int(s["offset"]),
                           blocks=tuple(int(b) for b in s["blocks"]))
                    for s in d["sources"]
                ),
            )
        except BackupError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackupError(f"{where}: not a valid files.jsonl entry ({exc.__class__.__name__}: {exc})") from None


def _hash(value: object) -> str:
    if not isinstance(value, str) or len(value) != HASH_HEX:
        raise ValueError(f"block hash {value!r} is not {HASH_HEX} hex digits")
    return value


def check_path(path: object) -> str:
    """A relative path inside the data directory: no absolute path, no '..', no empty part."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\0" in path:
        raise BackupError(f"invalid path {path!r} in a backup")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise BackupError(f"invalid path {path!r} in a backup: '.', '..' or empty parts")
    return path


def block_count(size: int, block_size: int) -> int:
    return -(-size // block_size)


def check_coverage(entry: FileEntry, block_size: int, *, where: str) -> None:
    """Refuse a file entry whose blocks and sources do not describe it exactly once."""
    n = block_count(entry.size, block_size)
    if len(entry.blocks) != n:
        raise BackupError(f"{where}: {entry.path} has {len(entry.blocks)} block hashes for {n} blocks")
    seen = 0
    covered: set[int] = set()
    for s in entry.sources:
        if s.offset < 0 or list(s.blocks) != sorted(set(s.blocks)) or not s.blocks:
            raise BackupError(f"{where}: {entry.path} has a malformed source in {s.object}")
        covered.update(s.blocks)
        seen += len(s.blocks)
    if seen != n or covered != set(range(n)):
        raise BackupError(f"{where}: the sources of {entry.path} do not cover its {n} blocks exactly once")


# --- reading and writing through the vault -----------------------------------


def write_record(storage: Storage, key: str, source: BinaryIO, *, options) -> tuple[str, int, int]:
    """Store ``source`` through the object format: (plaintext sha256, plaintext size, stored size)."""
    reader = codec.encode(source, name=key, compression=options.compression, level=options.level,
                          threads=0, key=options.key)
    storage.put(key, reader)
    assert reader.plaintext_sha256 is not None and reader.plaintext_size is not None
    return reader.plaintext_sha256, reader.plaintext_size, reader.encoded_size


def write_manifest(storage: Storage, manifest: Manifest, *, options) -> int:
    """The commit: store manifest.json; returns its stored size."""
    _sha, _size, stored = write_record(storage, manifest.key, io.BytesIO(manifest.to_json()), options=options)
    return stored


def read_manifest(storage: Storage, label: str, keyring, *, require_encryption: bool = False) -> Manifest:
    key = layout.manifest_key(label)
    try:
        with storage.open(key) as f:
            blob = f.read()
    except ObjectNotFoundError:
        raise BackupNotFoundError(f"there is no backup {label} in {storage.description}",
                                  hint="`pgvault list` shows the backups") from None
    plain = codec.decode_bytes(blob, name=key, keyring=keyring, require_encryption=require_encryption)
    manifest = Manifest.from_json(plain, where=f"{storage.description}/{key}")
    if manifest.label != label:
        raise CorruptObjectError(f"object {key} is corrupt: it holds the manifest of {manifest.label}")
    return manifest


def committed_labels(storage: Storage) -> list[str]:
    """Labels of the committed backups (those with a manifest), oldest first; one listing, no reads."""
    labels = []
    for info in storage.list(layout.BACKUPS_PREFIX):
        parsed = layout.parse_backup_key(info.key)
        if parsed is not None and parsed.kind == "manifest":
            labels.append(parsed.label)
    return sorted(labels)


def list_backups(storage: Storage, keyring, *, require_encryption: bool = False) -> list[Manifest]:
    """Every committed backup, oldest first: a backup is listed only once its manifest exists."""
    return [read_manifest(storage, label, keyring=keyring, require_encryption=require_encryption)
            for label in committed_labels(storage)]


def iter_files(storage: Storage, manifest: Manifest, keyring, *,
               require_encryption: bool = False) -> Iterator[FileEntry]:
    """The entries of a backup's files.jsonl, streamed in path order and verified as they come.

    The object's checksum is checked when the last line has been read: a
    consumer that must not act on a damaged list should finish iterating first.
    """
    with storage.open(manifest.files_object) as raw:
        decoder = codec.decode(raw, name=manifest.files_object, keyring=keyring,
                               expected_sha256=manifest.files_sha256, require_encryption=require_encryption)
        yield from _entries(io.BufferedReader(decoder, buffer_size=1 << 20), manifest,
                            where=f"{storage.description}/{manifest.files_object}")


def _entries(lines: Iterable[bytes], manifest: Manifest, *, where: str) -> Iterator[FileEntry]:
    previous: list[str] | None = None
    for number, line in enumerate(lines, start=1):
        entry = FileEntry.from_line(line, where=f"{where} line {number}")
        key = path_key(entry.path)
        if previous is not None and key <= previous:
            raise CorruptObjectError(f"object {manifest.files_object} is corrupt: line {number} "
                                     f"({entry.path}) is out of path order")
        previous = key
        yield entry


class SpooledFiles:
    """A backup's files.jsonl fetched, decoded and verified into a local temporary file, then read from there.

    For a reader that takes its time (an incremental reads its parent's list
    while it copies a whole database): an S3 download held open for that long
    would time out, and nothing is used before the whole list is verified.
    """

    def __init__(self, storage: Storage, manifest: Manifest, *, keyring, require_encryption: bool, tmp_dir: str):
        import tempfile

        os.makedirs(tmp_dir, exist_ok=True)
        self.manifest = manifest
        self._where = f"{storage.description}/{manifest.files_object}"
        self._file = tempfile.TemporaryFile("w+b", dir=tmp_dir, prefix=".parent-files-")
        try:
            with storage.open(manifest.files_object) as raw:
                decoder = codec.decode(raw, name=manifest.files_object, keyring=keyring,
                                       expected_sha256=manifest.files_sha256, require_encryption=require_encryption)
                while block := decoder.read(1 << 20):
                    self._file.write(block)
            self._file.flush()
        except BaseException:
            self._file.close()  # no caller holds it to close
            raise

    def __iter__(self) -> Iterator[FileEntry]:
        self._file.seek(0)
        return _entries(self._file, self.manifest, where=self._where)

    def close(self) -> None:
        self._file.close()


class FilesWriter:
    """files.jsonl written line by line to a temporary file as files complete, then stored in one put.

    ``reserve`` keeps the place of an entry known only later (pg_control is
    copied last, after every other file) so the stored list stays in path order.
    """

    def __init__(self, tmp_dir: str) -> None:
        import tempfile

        os.makedirs(tmp_dir, exist_ok=True)
        self._file = tempfile.TemporaryFile("w+b", dir=tmp_dir, prefix=".files-")
        self._late: dict[int, bytes] = {}
        self.count = 0

    def write(self, entry: FileEntry) -> None:
        self._file.write(entry.to_line().encode())
        self.count += 1

    def reserve(self) -> int:
        return self._file.tell()

    def fill(self, place: int, entry: FileEntry) -> None:
        self._late[place] = entry.to_line().encode()
        self.count += 1

    def _chunks(self) -> Iterator[bytes]:
        self._file.flush()
        self._file.seek(0)
        position = 0
        for place in sorted(self._late):
            yield self._file.read(place - position)
            yield self._late[place]
            position = place
        while chunk := self._file.read(1 << 20):
            yield chunk

    def store(self, storage: Storage, key: str, *, options) -> tuple[str, int, int]:
        """Put the list as ``key``: (plaintext sha256, plaintext size, stored size)."""
        return write_record(storage, key, _IterReader(self._chunks()), options=options)

    def close(self) -> None:
        self._file.close()


class _IterReader(io.RawIOBase):
    """A readable stream over an iterator of byte strings."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
