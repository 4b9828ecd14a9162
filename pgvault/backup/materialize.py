"""Rebuild a data directory from a backup's manifest: the part of restore that writes files.

1. Stream files.jsonl once: create directories (with their modes), tablespace
   symlinks (to their recorded or relocated target, which must be empty or
   absent) and every file, pre-sized to its length; note each source (object,
   offset, file, blocks) in a small on-disk index (SQLite, in ``tmp_dir``), so
   memory stays bounded however many blocks the database has.
2. Read each object once, sequentially, in parallel across objects: decode it
   (checksum verified at its end), and write each block at
   ``block_index * block_size`` of its file with os.pwrite, checking the
   block's hash against the manifest first.
3. Write backup_label (and tablespace_map) from the manifest, so PostgreSQL
   starts recovery at the backup's checkpoint; leave pg_wal empty (with
   archive_status/); sync everything to disk.

Files are written only under ``dest_dir`` or through the tablespace links the
manifest names; a path that would pass through any other link is refused.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from pgvault import codec
from pgvault.backup.blocks import block_hash
from pgvault.backup.errors import BackupError
from pgvault.backup.manifest import Manifest, check_coverage, iter_files
from pgvault.errors import CorruptObjectError
from pgvault.storage import Storage

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class MaterializeProgress:
    bytes_done: int
    bytes_total: int
    objects_done: int
    objects_total: int


@dataclass(frozen=True)
class MaterializeResult:
    files: int
    bytes_written: int
    objects_read: int
    seconds: float


def materialize_backup(
    storage: Storage,
    manifest: Manifest,
    dest_dir: str,
    *,
    keyring,
    parallel: int = 2,
    progress: Callable[[MaterializeProgress], None] | None = None,
    tablespace_map: dict[int, str] | None = None,
    require_encryption: bool = False,
    tmp_dir: str | None = None,
) -> MaterializeResult:
    """Recreate the data directory of ``manifest`` in ``dest_dir`` (absent or empty).

    ``tablespace_map`` relocates tablespaces: {oid: new location}. Raises
    BackupError for a non-empty destination or tablespace location, and
    CorruptObjectError if any object or block fails its checks (the destination
    is then incomplete and must not be started).
    """
    started = time.monotonic()
    dest_dir = os.path.abspath(dest_dir)
    relocate = {int(k): v for k, v in (tablespace_map or {}).items()}
    unknown = set(relocate) - {t.oid for t in manifest.tablespaces}
    if unknown:
        raise BackupError(f"tablespace_map names tablespace(s) {sorted(unknown)} that backup {manifest.label} does not have")
    _prepare_empty(dest_dir, what="destination directory")
    with tempfile.TemporaryDirectory(prefix="pgvault-materialize-", dir=tmp_dir) as work:
        index = sqlite3.connect(os.path.join(work, "index.sqlite"))
        try:
            files, total = _lay_out(storage, manifest, dest_dir, index, keyring=keyring,
                                    require_encryption=require_encryption, relocate=relocate)
            objects = _fill(storage, manifest, dest_dir, index, keyring=keyring, parallel=parallel,
                            require_encryption=require_encryption, progress=progress, total=total)
            _write_recovery_files(manifest, dest_dir, relocate)
            _sync(dest_dir, index)
        finally:
            index.close()
    return MaterializeResult(files=files, bytes_written=total, objects_read=objects,
                             seconds=round(time.monotonic() - started, 3))


def _prepare_empty(path: str, *, what: str, mode: int = 0o700) -> None:
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise BackupError(f"the {what} {path} exists and is not a directory")
        if os.listdir(path):
            raise BackupError(f"the {what} {path} is not empty; refusing to write into it",
                              hint="give an empty or absent directory")
    else:
        os.makedirs(path, mode=mode)


def _lay_out(storage, manifest, dest_dir, index, *, keyring, require_encryption, relocate) -> tuple[int, int]:
    """Pass 1: directories, links, pre-sized files, and the index of sources. Returns (files, bytes)."""
    index.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT NOT NULL, size INTEGER NOT NULL)")
    index.execute("CREATE TABLE sources (object TEXT NOT NULL, sha256 TEXT NOT NULL, offset INTEGER NOT NULL,"
                  " file_id INTEGER NOT NULL, blocks TEXT NOT NULL, hashes TEXT NOT NULL)")
    bs = manifest.block_size
    where = f"backup {manifest.label}"
    tablespace_links: set[str] = set()
    other_links: list[str] = []
    files = total = 0
    root_mode = None
    for entry in iter_files(storage, manifest, keyring=keyring, require_encryption=require_encryption):
        parts = entry.path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in other_links:
                raise BackupError(f"{where}: {entry.path} lies under the link {prefix}; refusing to write through it")
        target = os.path.join(dest_dir, entry.path)
        if entry.type == "dir":
            os.mkdir(target, entry.mode)
            os.chmod(target, entry.mode)  # mkdir's mode is masked by the umask
            if entry.path == "global":
                root_mode = entry.mode
        elif entry.type == "link":
            if len(parts) == 2 and parts[0] == "pg_tblspc" and parts[1].isdigit():
                location = relocate.get(int(parts[1]), entry.target)
                _prepare_empty(location, what=f"tablespace {parts[1]} location")
                os.symlink(location, target)
                tablespace_links.add(entry.path)
            else:
                os.symlink(entry.target, target)
                other_links.append(entry.path)
        else:
            check_coverage(entry, bs, where=where)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, entry.mode)
            try:
                os.ftruncate(fd, entry.size)
                os.fchmod(fd, entry.mode)
            finally:
                os.close(fd)
            cur = index.execute("INSERT INTO files (path, size) VALUES (?, ?)", (entry.path, entry.size))
            file_id = cur.lastrowid
            for s in entry.sources:
                index.execute("INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?)", (
                    s.object, s.sha256, s.offset, file_id, json.dumps(s.blocks),
                    json.dumps([entry.blocks[b] for b in s.blocks])))
            files += 1
            total += entry.size
    if root_mode is not None:
        os.chmod(dest_dir, root_mode & 0o750)  # 0700, or 0750 for a cluster with group access
    index.execute("CREATE INDEX sources_by_object ON sources (object, offset)")
    bad = index.execute("SELECT object FROM sources GROUP BY object HAVING COUNT(DISTINCT sha256) > 1").fetchone()
    if bad:
        raise BackupError(f"{where}: files.jsonl gives object {bad[0]} two different checksums")
    index.commit()
    return files, total


def _fill(storage, manifest, dest_dir, index, *, keyring, parallel, require_encryption, progress, total) -> int:
    """Pass 2: every object read once, its blocks written into place; parallel by object."""
    objects = [row for row in index.execute("SELECT DISTINCT object, sha256 FROM sources ORDER BY object")]
    state = {"bytes": 0, "objects": 0}
    lock = threading.Lock()

    def done(nbytes: int) -> None:
        with lock:
            state["bytes"] += nbytes
            state["objects"] += 1
        if progress is not None:
            progress(MaterializeProgress(state["bytes"], total, state["objects"], len(objects)))

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="pgvault-materialize") as pool:
        running: set[Future] = set()
        try:
            for key, sha in objects:
                rows = index.execute(
                    "SELECT s.offset, f.path, f.size, s.blocks, s.hashes FROM sources s JOIN files f "
                    "ON f.id = s.file_id WHERE s.object = ? ORDER BY s.offset", (key,)).fetchall()
                running.add(pool.submit(_restore_object, storage, key, sha, rows, dest_dir, manifest.block_size,
                                        keyring, require_encryption, done))
                while len(running) >= 2 * parallel:
                    finished, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        f.result()
            for f in running:
                f.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return len(objects)


def _restore_object(storage, key, sha, rows, dest_dir, bs, keyring, require_encryption, done) -> None:
    """In a worker: stream one object and write each block it holds; verify everything on the way."""
    written = 0
    with storage.open(key) as raw:
        decoder = codec.decode(raw, name=key, keyring=keyring, expected_sha256=sha,
                               require_encryption=require_encryption)
        position = 0
        for offset, path, size, blocks_json, hashes_json in rows:
            if offset < position:
                raise BackupError(f"object {key}: sources overlap at offset {offset} (files.jsonl is inconsistent)")
            _skip(decoder, offset - position, key=key)
            position = offset
            fd = os.open(os.path.join(dest_dir, path), os.O_WRONLY)
            try:
                for block, expected in zip(json.loads(blocks_json), json.loads(hashes_json), strict=True):
                    length = min(bs, size - block * bs)
                    data = _read_exact(decoder, length, key=key)
                    if block_hash(data) != expected:
                        raise CorruptObjectError(
                            f"object {key} is corrupt: block {block} of {path} does not match its hash in the manifest")
                    os.pwrite(fd, data, block * bs)
                    position += length
                    written += length
            finally:
                os.close(fd)
        # Read to the end: the object's own length and checksum are checked there.
        while decoder.read(READ_CHUNK):
            pass
    done(written)


def _read_exact(decoder, n: int, *, key: str) -> bytes:
    data = decoder.read(n)
    if len(data) == n:
        return data
    parts, got = [data], len(data)
    while got < n:
        more = decoder.read(n - got)
        if not more:
            raise CorruptObjectError(f"object {key} is corrupt: it ends before the blocks the manifest places in it")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _skip(decoder, n: int, *, key: str) -> None:
    while n > 0:
        chunk = decoder.read(min(n, READ_CHUNK))
        if not chunk:
            raise CorruptObjectError(f"object {key} is corrupt: it ends before the blocks the manifest places in it")
        n -= len(chunk)


def _write_recovery_files(manifest: Manifest, dest_dir: str, relocate: dict[int, str]) -> None:
    """backup_label and tablespace_map as pg_backup_stop returned them; pg_wal empty."""
    _write_text(os.path.join(dest_dir, "backup_label"), manifest.backup_label)
    if relocate:
        # PostgreSQL recreates pg_tblspc/<oid> from this file at start: it must name the new locations.
        lines = [f"{t.oid} {relocate.get(t.oid, t.location)}\n" for t in manifest.tablespaces]
        _write_text(os.path.join(dest_dir, "tablespace_map"), "".join(lines))
    elif manifest.tablespace_map:
        _write_text(os.path.join(dest_dir, "tablespace_map"), manifest.tablespace_map)
    os.makedirs(os.path.join(dest_dir, "pg_wal", "archive_status"), mode=0o700, exist_ok=True)


def _sync(dest_dir: str, index) -> None:
    """Every file and directory written, on disk: a restore is not done while it could still be lost."""
    for (path,) in index.execute("SELECT path FROM files"):
        _fsync(os.path.join(dest_dir, path))
    for name in ("backup_label", "tablespace_map"):
        if os.path.exists(os.path.join(dest_dir, name)):
            _fsync(os.path.join(dest_dir, name))
    for root, _dirs, _files in os.walk(dest_dir, followlinks=True):  # into the tablespaces too
        _fsync(root)
    _fsync(os.path.dirname(dest_dir))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)

