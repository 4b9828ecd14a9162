"""WAL archiving: push one WAL file into the vault, fetch one back.

push: check the file belongs to this cluster (its page header's system
identifier), hash it, refuse a different copy already archived under the same
name (split brain), then store it through the object format. The key carries
the checksum (see catalog), so an identical copy is recognised by listing and a
put that races with an identical one lands on the same key.

fetch: find the archived copy, decode it (checksums verified while streaming)
into a temporary file beside the destination, and rename it into place.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import time
from typing import NamedTuple

from pgvault import codec
from pgvault.catalog import ArchivedWal, find_archived, format_wal_key
from pgvault.errors import (
    ArchiveDivergenceError,
    ForeignWalError,
    ObjectExistsError,
    ObjectNotFoundError,
    PgvaultError,
)
from pgvault.storage import Storage
from pgvault.vault import VaultRecord
from pgvault.wal import check_segment_header, parse_wal_file_name, read_long_page_header

HASH_BLOCK = 1 << 20


class CodecOptions(NamedTuple):
    """How objects are encoded: the parts of settings the archive needs, explicitly."""

    compression: str = "zstd"
    level: int = 3
    threads: int = 2
    key: object | None = None  # the vault key new objects are encrypted with, or None


class PushResult(NamedTuple):
    name: str
    key: str
    sha256: str
    size: int
    already_archived: bool
    seconds: float


def file_sha256(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def check_wal_file_identity(path: str, *, name: str, record: VaultRecord) -> None:
    """Refuse a segment from another cluster, or one whose header contradicts its name."""
    wal_file = parse_wal_file_name(name, segment_size=record.wal_segment_size)
    if wal_file.kind not in ("segment", "partial"):
        return  # .history and .backup files are text without a page header
    with open(path, "rb") as f:
        header = read_long_page_header(f.read(64))
    if header.system_identifier != record.system_identifier:
        raise ForeignWalError(
            f"WAL file {name} belongs to the cluster with system identifier {header.system_identifier}, "
            f"but this vault is for {record.system_identifier}",
            hint="each cluster needs its own vault (or its own [vault] cluster name); check archive_command's --config",
        )
    check_segment_header(header, expected_name=wal_file.name, segment_size=record.wal_segment_size)


def divergence_error(name: str, *, theirs: str, ours: str) -> ArchiveDivergenceError:
    return ArchiveDivergenceError(
        f"archive divergence: {name} is already in the vault with sha256 {theirs}, "
        f"but this server's copy has sha256 {ours}; refusing to overwrite"
    )


#: WAL files up to this size are encoded in memory: mapped (no copy), hashed in a
#: helper thread while zstd compresses them, then framed under their key.
IN_MEMORY_LIMIT = 64 << 20


def _store(storage: Storage, key: str, source) -> bool:
    """Put ``source`` under ``key``; False if an identical object (same key: same checksum) won a race."""
    try:
        storage.put(key, source)
        return True
    except ObjectExistsError:
        return False


def _push_in_memory(path: str, name: str, *, storage: Storage, record: VaultRecord, options: CodecOptions,
                    completed_ms: int, started: float) -> PushResult:
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        size = before.st_size
        # A completed segment is not rewritten while it waits for archiving, so mapping it is
        # as good as reading it; that it did not change is checked below all the same.
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            # Already archived (PostgreSQL retrying after a crash, a push-ahead race): compare, don't compress.
            for existing in find_archived(storage, name, segment_size=record.wal_segment_size):
                sha = hashlib.sha256(data).hexdigest()
                if existing.sha256 == sha:
                    return PushResult(name, existing.key, sha, size, True, time.monotonic() - started)
                raise divergence_error(name, theirs=existing.sha256, ours=sha)
            prepared = codec.prepare_payload(data, compression=options.compression, level=options.level,
                                             threads=options.threads)
            sha = prepared.plaintext_sha256
            key = format_wal_key(name, sha256=sha, completed_ms=completed_ms, size=size)
            stored = b"".join(codec.frame_payload(prepared, name=key, key=options.key))
            del prepared  # the payload may be a view of the mapping, which closes below
            # Hashed and compressed at the same time from the mapping: had the file changed
            # meanwhile, the checksum could disagree with the bytes. Nothing is stored then.
            after = os.fstat(f.fileno())
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                raise changed_error(path)
            fresh = _store(storage, key, io.BytesIO(stored))
            return PushResult(name, key, sha, size, not fresh, time.monotonic() - started)
        finally:
            if isinstance(data, mmap.mmap):
                data.close()


def changed_error(path: str) -> PgvaultError:
    # PostgreSQL never rewrites a completed file; if it changed under us, say so loudly.
    return PgvaultError(f"WAL file {path} changed while it was being archived; not archived")


def push_wal_file(path: str, *, storage: Storage, record: VaultRecord, options: CodecOptions) -> PushResult:
    """Archive the WAL file at ``path``; returns once it is durably in the vault."""
    started = time.monotonic()
    name = os.path.basename(path)
    check_wal_file_identity(path, name=name, record=record)
    completed_ms = os.stat(path).st_mtime_ns // 1_000_000
    if os.path.getsize(path) <= IN_MEMORY_LIMIT:
        return _push_in_memory(path, name, storage=storage, record=record, options=options,
                               completed_ms=completed_ms, started=started)

    sha, size = file_sha256(path)
    for existing in find_archived(storage, name, segment_size=record.wal_segment_size):
        if existing.sha256 == sha:
            return PushResult(name, existing.key, sha, size, True, time.monotonic() - started)
        raise divergence_error(name, theirs=existing.sha256, ours=sha)
    key = format_wal_key(name, sha256=sha, completed_ms=completed_ms, size=size)
    with open(path, "rb") as f:
        encoder = codec.encode(f, name=key, compression=options.compression, level=options.level,
                               threads=options.threads, key=options.key)
        if not _store(storage, key, encoder):
            return PushResult(name, key, sha, size, True, time.monotonic() - started)
    if encoder.plaintext_sha256 != sha or encoder.plaintext_size != size:
        storage.delete(key)
        raise changed_error(path)
    return PushResult(name, key, sha, size, False, time.monotonic() - started)


class WalNotFoundError(ObjectNotFoundError):
    """restore_command's normal "no such file": recovery ends at the end of the archive."""


def select_archived(storage: Storage, name: str, *, record: VaultRecord) -> ArchivedWal:
    copies = find_archived(storage, name, segment_size=record.wal_segment_size)
    if not copies:
        raise WalNotFoundError(f"{name} is not in the vault {storage.description}")
    if len({c.sha256 for c in copies}) > 1:
        raise ArchiveDivergenceError(
            f"the vault holds {len(copies)} different copies of {name}: "
            + ", ".join(c.sha256 for c in copies),
            hint="resolve the divergence (keep one copy, move the other under orphans/) before restoring",
        )
    return copies[0]


def fetch_wal_file(name: str, dest: str, *, storage: Storage, record: VaultRecord, keyring) -> ArchivedWal:
    """Write WAL file ``name`` from the vault to ``dest``, verified; WalNotFoundError if absent."""
    entry = select_archived(storage, name, record=record)
    write_verified(storage, entry, dest, keyring=keyring, require_encryption=record.encryption_key_id is not None)
    return entry


def write_verified(storage: Storage, entry: ArchivedWal, dest: str, *, keyring, require_encryption: bool) -> None:
    """Decode ``entry`` into a temporary file beside ``dest`` and rename it into place."""
    directory = os.path.dirname(os.path.abspath(dest))
    tmp = os.path.join(directory, f".pgvault-{os.getpid()}-{os.path.basename(dest)}.tmp")
    try:
        with storage.open(entry.key) as src, open(tmp, "wb") as out:
            # In an encrypted vault an unencrypted object can only be a substitute: refuse it.
            decoder = codec.decode(src, name=entry.key, keyring=keyring, expected_sha256=entry.sha256,
                                   require_encryption=require_encryption)
            while block := decoder.read(HASH_BLOCK):
                out.write(block)
        os.rename(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
