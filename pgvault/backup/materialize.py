"""Rebuild a data directory from a backup's manifest: the part of restore that writes files.

Into an absent or empty directory:

1. Stream files.jsonl once: create directories (with their modes) and tablespace
   symlinks (to their recorded or relocated target, which must be empty or
   absent); note every file and each of its sources (object, offset, blocks)
   in a small on-disk index (SQLite, in ``tmp_dir``), so memory stays bounded
   however many blocks the database has.
2. Create the files, pre-sized to their length, on a thread of their own that
   runs ahead of the workers, in the order the workers fill them: creating a
   file is a journal operation that can take a millisecond on a busy disk, and
   a thousand of them in a row were up to a quarter of a restore.
   Read each object once, sequentially, in parallel across objects: decode it
   (checksum verified at its end) a run of consecutive blocks at a time into
   an aligned buffer, check each block's hash against the manifest, and write
   the run at ``block_index * block_size`` of its file in one write, with
   direct I/O (see directio: the page cache was most of a restore's cost),
   on a writer thread while the next run is decoded.
3. Write backup_label (and tablespace_map) from the manifest, so PostgreSQL
   starts recovery at the backup's checkpoint; leave pg_wal empty (with
   archive_status/); make every file and directory durable before returning
   (one syncfs of the data directory's filesystem; see _sync).

With ``delta=True`` into a directory that holds an older copy of the cluster
(a damaged node), only what differs is fetched:

1. files.jsonl is read whole into the index and verified *before* anything on
   disk changes.
2. Whatever the backup does not hold is removed: files and directories of the
   data directory, the contents of pg_wal, and inside a tablespace only the
   backup's own version directory (``PG_<major>_<catversion>``), reached only
   through a link that already points at the planned location. Nothing is
   ever followed through any other link, so nothing outside is deleted.
3. Every directory, link and file of the backup is put in place: a wrong type
   is replaced, modes are set, an existing file is cut or extended to its
   size and every block is re-hashed (the manifest's algorithm) in parallel,
   read from the page cache where it holds them and directly from the disk
   where not; a file whose blocks all match is kept untouched.
4. Only the objects holding mismatching blocks are read (up to their last
   such block; what lies before them is decoded, not hashed), and only those blocks
   are written, each checked against its hash as in a full restore.

A tablespace location may be non-empty only when the data directory's own
``pg_tblspc/<oid>`` link already points to it; any other location must be
empty or absent, as in a full restore.

Files are written only under ``dest_dir`` or through the tablespace links the
manifest names; a path that would pass through any other link is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from pgvault import codec
from pgvault.backup import blocks, directio
from pgvault.backup.errors import BackupError
from pgvault.backup.manifest import FileEntry, Manifest, check_coverage, iter_files
from pgvault.errors import CorruptObjectError
from pgvault.storage import Storage


@dataclass(frozen=True)
class MaterializeProgress:
    bytes_done: int
    bytes_total: int
    objects_done: int
    objects_total: int
    #: "fetch" while objects are read; "compare" while a delta restore re-hashes existing files
    phase: str = "fetch"


@dataclass(frozen=True)
class MaterializeResult:
    files: int  # regular files in the backup
    bytes_written: int  # bytes of blocks fetched and written (every byte of the backup, unless delta)
    objects_read: int
    seconds: float
    delta: bool = False
    files_kept: int = 0  # delta: files whose every block already matched
    files_fetched: int = 0  # files written (whole or in part)
    entries_removed: int = 0  # delta: files, links and directory trees removed (not in the backup)
    bytes_total: int = 0  # the size of every file in the backup
    bytes_checked: int = 0  # delta: bytes re-hashed in existing files


def _hasher(manifest: Manifest) -> Callable[[bytes | memoryview], str]:
    """The block hash of ``manifest``'s files.jsonl: always the algorithm the manifest records."""
    algorithm = getattr(manifest, "block_hash", None)
    if algorithm is None:
        return blocks.block_hash
    return lambda data: blocks.block_hash(data, algorithm)


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
    delta: bool = False,
) -> MaterializeResult:
    """Recreate the data directory of ``manifest`` in ``dest_dir`` (absent or empty, unless ``delta``).

    ``tablespace_map`` relocates tablespaces: {oid: new location}. Raises
    BackupError for a non-empty destination or tablespace location, and
    CorruptObjectError if any object or block fails its checks (the destination
    is then incomplete and must not be started). With ``delta``, a non-empty
    ``dest_dir`` is brought to the backup's state fetching only what differs
    (see the module's description); an empty one is restored in full.
    """
    started = time.monotonic()
    dest_dir = os.path.abspath(dest_dir)
    relocate = {int(k): v for k, v in (tablespace_map or {}).items()}
    unknown = set(relocate) - {t.oid for t in manifest.tablespaces}
    if unknown:
        raise BackupError(f"tablespace_map names tablespace(s) {sorted(unknown)} that backup {manifest.label} does not have")
    if delta and _is_non_empty_dir(dest_dir):
        return _materialize_delta(storage, manifest, dest_dir, keyring=keyring, parallel=parallel, progress=progress,
                                  relocate=relocate, require_encryption=require_encryption, tmp_dir=tmp_dir,
                                  started=started)
    _prepare_empty(dest_dir, what="destination directory")
    with tempfile.TemporaryDirectory(prefix="pgvault-materialize-", dir=tmp_dir) as work:
        index = sqlite3.connect(os.path.join(work, "index.sqlite"))
        try:
            files, total = _lay_out(storage, manifest, dest_dir, index, keyring=keyring,
                                    require_encryption=require_encryption, relocate=relocate)
            objects = _fill(storage, manifest, dest_dir, index, keyring=keyring, parallel=parallel,
                            require_encryption=require_encryption, progress=progress, total=total,
                            create_files=True)
            _write_recovery_files(manifest, dest_dir, relocate)
            _sync(dest_dir, index, tablespace_locations(manifest, relocate))
        finally:
            index.close()
    return MaterializeResult(files=files, bytes_written=total, objects_read=objects,
                             seconds=round(time.monotonic() - started, 3), files_fetched=files, bytes_total=total)


def _is_non_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def _prepare_empty(path: str, *, what: str, mode: int = 0o700) -> None:
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise BackupError(f"the {what} {path} exists and is not a directory")
        if os.listdir(path):
            raise BackupError(f"the {what} {path} is not empty; refusing to write into it",
                              hint="give an empty or absent directory")
    else:
        os.makedirs(path, mode=mode)


def _create_index(index) -> None:
    # mode: the file's mode in the backup; it is written owner-readable and -writable, and gets
    # exactly this mode once written (a 0400 server.key could not be written as its owner otherwise)
    index.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT NOT NULL, size INTEGER NOT NULL,"
                  " mode INTEGER NOT NULL)")
    # wanted: the blocks of this source to write (JSON list); NULL: all of them
    index.execute("CREATE TABLE sources (object TEXT NOT NULL, sha256 TEXT NOT NULL, offset INTEGER NOT NULL,"
                  " file_id INTEGER NOT NULL, blocks TEXT NOT NULL, hashes TEXT NOT NULL, wanted TEXT)")


def _add_file(index, entry: FileEntry) -> int:
    cur = index.execute("INSERT INTO files (path, size, mode) VALUES (?, ?, ?)", (entry.path, entry.size, entry.mode))
    file_id = cur.lastrowid
    for s in entry.sources:
        index.execute("INSERT INTO sources (object, sha256, offset, file_id, blocks, hashes) VALUES (?, ?, ?, ?, ?, ?)",
                      (s.object, s.sha256, s.offset, file_id, json.dumps(s.blocks),
                       json.dumps([entry.blocks[b] for b in s.blocks])))
    return file_id


def _finish_index(index, where: str) -> None:
    index.execute("CREATE INDEX sources_by_object ON sources (object, offset)")
    index.execute("CREATE INDEX sources_by_file ON sources (file_id)")
    bad = index.execute("SELECT object FROM sources GROUP BY object HAVING COUNT(DISTINCT sha256) > 1").fetchone()
    if bad:
        raise BackupError(f"{where}: files.jsonl gives object {bad[0]} two different checksums")
    index.commit()


def _check_links(entry: FileEntry, other_links: list[str], where: str) -> None:
    parts = entry.path.split("/")
    for i in range(1, len(parts)):
        prefix = "/".join(parts[:i])
        if prefix in other_links:
            raise BackupError(f"{where}: {entry.path} lies under the link {prefix}; refusing to write through it")


def _is_tablespace_link(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and parts[0] == "pg_tblspc" and parts[1].isdigit()


def _lay_out(storage, manifest, dest_dir, index, *, keyring, require_encryption, relocate) -> tuple[int, int]:
    """Pass 1: directories, links, and the index of files and sources. Returns (files, bytes)."""
    _create_index(index)
    bs = manifest.block_size
    where = f"backup {manifest.label}"
    other_links: list[str] = []
    files = total = 0
    root_mode = None
    for entry in iter_files(storage, manifest, keyring=keyring, require_encryption=require_encryption):
        _check_links(entry, other_links, where)
        parts = entry.path.split("/")
        target = os.path.join(dest_dir, entry.path)
        if entry.type == "dir":
            os.mkdir(target, entry.mode)
            os.chmod(target, entry.mode)  # mkdir's mode is masked by the umask
            if entry.path == "global":
                root_mode = entry.mode
        elif entry.type == "link":
            if _is_tablespace_link(entry.path):
                location = relocate.get(int(parts[1]), entry.target)
                _prepare_empty(location, what=f"tablespace {parts[1]} location")
                os.symlink(location, target)
            else:
                os.symlink(entry.target, target)
                other_links.append(entry.path)
        else:
            check_coverage(entry, bs, where=where)
            _add_file(index, entry)  # created by _fill's FileCreator
            files += 1
            total += entry.size
    if root_mode is not None:
        os.chmod(dest_dir, root_mode & 0o750)  # 0700, or 0750 for a cluster with group access
    _finish_index(index, where)
    return files, total


def _fill(storage, manifest, dest_dir, index, *, keyring, parallel, require_encryption, progress, total,
          stop_early: bool = False, create_files: bool = False) -> int:
    """Pass 2: every object holding wanted blocks read once, those blocks written into place; parallel by object.

    ``stop_early``: stop decoding an object after its last wanted block (a delta
    restore wants a few blocks of large objects; each block is still checked
    against its hash). Otherwise every object is read to its end, where its own
    length and checksum are checked. ``create_files``: every file of the index
    is created here (see FileCreator); otherwise they all exist already.
    """
    objects = [row for row in index.execute(
        "SELECT DISTINCT object, sha256 FROM sources WHERE wanted IS NULL OR wanted != '[]' ORDER BY object")]
    state = {"bytes": 0, "objects": 0}
    lock = threading.Lock()
    hash_fn = _hasher(manifest)

    def done(nbytes: int) -> None:
        with lock:
            state["bytes"] += nbytes
            state["objects"] += 1
            snapshot = MaterializeProgress(state["bytes"], total, state["objects"], len(objects))
        if progress is not None:
            progress(snapshot)

    # Writes go to their own threads, so a worker decodes its next run while the last one is written.
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="pgvault-materialize") as pool, \
            ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="pgvault-write") as writers:
        # The index is read here, in this thread (its connection's), one object ahead of the workers.
        jobs = ((key, sha, index.execute(
            "SELECT s.offset, f.path, f.size, s.blocks, s.hashes, s.wanted FROM sources s JOIN files f "
            "ON f.id = s.file_id WHERE s.object = ? AND (s.wanted IS NULL OR s.wanted != '[]') "
            "ORDER BY s.offset", (key,)).fetchall()) for key, sha in objects)

        creator = FileCreator.start(dest_dir, index) if create_files else None

        def restore_one(job) -> None:
            key, sha, rows = job
            if creator is not None:
                creator.wait_for(key)
            _restore_object(storage, key, sha, rows, dest_dir, manifest.block_size, keyring, require_encryption,
                            done, hash_fn, stop_early, writers)

        try:
            _submit_bounded(pool, restore_one, jobs, limit=2 * parallel)
        except BaseException:
            if creator is not None:
                creator.stop()  # the worker's error is the one reported
            raise
        if creator is not None:
            creator.finish()
    return len(objects)


class FileCreator:
    """Creates the files of a restore, pre-sized, on its own thread, in the order the workers fill them.

    Creating a file is a journal operation: a millisecond each on a busy disk,
    which a thousand files in a row turn into a second before the first byte is
    written. Here it overlaps decoding. Each file is created once (O_EXCL: never
    into something already there), owner-readable and -writable (its own mode is
    applied by _sync, once written). Files no object holds (empty ones) come last.
    """

    def __init__(self, dest_dir: str, by_object: list[tuple[str, list[tuple[str, int, int]]]],
                 rest: list[tuple[str, int, int]]) -> None:
        self._dest_dir = dest_dir
        self._by_object = by_object
        self._rest = rest
        self._ready = {key: threading.Event() for key, _files in by_object}
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="pgvault-create", daemon=True)

    @classmethod
    def start(cls, dest_dir: str, index) -> FileCreator:
        """Read what to create from ``index`` (in this thread: its connection's) and start creating."""
        by_object: list[tuple[str, list[tuple[str, int, int]]]] = []
        for key, path, size, mode in index.execute(
                "SELECT s.object, f.path, f.size, f.mode FROM sources s JOIN files f ON f.id = s.file_id "
                "ORDER BY s.object, s.offset"):
            if not by_object or by_object[-1][0] != key:
                by_object.append((key, []))
            by_object[-1][1].append((path, size, mode))
        rest = index.execute("SELECT path, size, mode FROM files WHERE id NOT IN (SELECT file_id FROM sources) "
                             "ORDER BY id").fetchall()
        creator = cls(dest_dir, by_object, rest)
        creator._thread.start()
        return creator

    def _run(self) -> None:
        created: set[str] = set()

        def create(files) -> None:
            for path, size, mode in files:
                if path not in created:
                    create_presized(os.path.join(self._dest_dir, path), size, mode | OWNER_RW)
                    created.add(path)

        try:
            for key, files in self._by_object:
                if self._stopped:
                    return
                create(files)
                self._ready[key].set()
            create(self._rest)
        except BaseException as exc:  # noqa: BLE001 - handed to the workers and to finish()
            self._error = exc
        finally:
            for event in self._ready.values():
                event.set()

    def wait_for(self, key: str) -> None:
        """Return once every file object ``key`` holds blocks of exists; raise the creator's error if it failed."""
        self._ready[key].wait()
        if self._error is not None:
            raise BackupError(f"cannot create the files of object {key}: {self._error}") from self._error

    def finish(self) -> None:
        """Wait until every file exists; raise the creator's error if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """After a worker failed: stop creating, and wait for the thread."""
        self._stopped = True
        self._thread.join()


def create_presized(path: str, size: int, mode: int) -> None:
    """Create ``path`` (never an existing one) with ``size`` bytes (a hole, until written) and ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.ftruncate(fd, size)
        os.fchmod(fd, mode)  # open's mode is masked by the umask
    finally:
        os.close(fd)


#: Bytes decoded, checked and written at a time: a run of consecutive blocks of one file (large writes,
#: few system calls), in a buffer per worker.
RUN_BYTES = 4 << 20

_run_buffers = threading.local()


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _run_buffer(bs: int, which: int = 0) -> memoryview:
    """One of this worker's two aligned buffers for runs: RUN_BYTES, or one block if blocks are larger.

    Two, so that one is decoded into while the other is being written.
    """
    size = _round_up(max(RUN_BYTES, bs), directio.ALIGN)
    pair = getattr(_run_buffers, "pair", None)
    if pair is None or len(pair[0]) != size:
        pair = _run_buffers.pair = (directio.aligned_buffer(size), directio.aligned_buffer(size))
    return pair[which]


@dataclass(frozen=True)
class BlockRun:
    """Blocks of one source that are consecutive both in the object and in the file, all wanted or all not."""

    first: int  # index of the first block in the source's list
    count: int
    offset: int  # where the run starts in the file
    length: int  # bytes
    wanted: bool


def block_runs(blocks: list[int], size: int, bs: int, wanted: set[int] | None, limit: int) -> list[BlockRun]:
    """The blocks of one source (stored back to back) cut into runs of at most ``limit`` bytes (one block at least).

    A run ends where the next block is not the file's next one, where
    wantedness changes (``wanted`` None: every block is wanted), or at ``limit``.
    """
    runs: list[BlockRun] = []
    run: BlockRun | None = None
    for i, block in enumerate(blocks):
        length = min(bs, size - block * bs)
        want = wanted is None or block in wanted
        if (run is not None and block == blocks[i - 1] + 1 and want == run.wanted
                and run.length + length <= limit):
            run = BlockRun(run.first, run.count + 1, run.offset, run.length + length, want)
            continue
        if run is not None:
            runs.append(run)
        run = BlockRun(i, 1, block * bs, length, want)
    if run is not None:
        runs.append(run)
    return runs


def _restore_object(storage, key, sha, rows, dest_dir, bs, keyring, require_encryption, done, hash_fn,
                    stop_early=False, writers=None) -> None:
    """In a worker: stream one object and write each wanted block it holds; verify everything on the way.

    Wanted blocks are decoded straight into one of this worker's two aligned
    buffers a run at a time, each block checked against its hash in the
    manifest before the run is written with one write (direct, when aligned:
    see directio) by ``writers`` while the next run is decoded into the other
    buffer. The object's own length and SHA-256 are checked at its end (unless
    ``stop_early``).
    """
    written = 0
    bufs = (_run_buffer(bs, 0), _run_buffer(bs, 1))
    with storage.open(key) as raw, contextlib.closing(
            codec.decode(raw, name=key, keyring=keyring, expected_sha256=sha,
                         require_encryption=require_encryption)) as decoder:
        position = 0
        for offset, path, size, blocks_json, hashes_json, wanted_json in rows:
            if offset < position:
                raise BackupError(f"object {key}: sources overlap at offset {offset} (files.jsonl is inconsistent)")
            _skip(decoder, offset - position, key=key, buf=bufs[0], unhashed=stop_early)
            position = offset
            blocks, hashes = json.loads(blocks_json), json.loads(hashes_json)
            if len(blocks) != len(hashes):
                raise BackupError(f"object {key}: {path} lists {len(blocks)} blocks and {len(hashes)} hashes")
            wanted = None if wanted_json is None else set(json.loads(wanted_json))
            with directio.FileWriter(os.path.join(dest_dir, path)) as out:
                inflight: list[Future | None] = [None, None]  # the write of each buffer
                turn = 0
                try:
                    for run in block_runs(blocks, size, bs, wanted, len(bufs[0])):
                        if not run.wanted:
                            _finish_writes(inflight)  # a hashed skip decodes into bufs[0]
                            _skip(decoder, run.length, key=key, buf=bufs[0], unhashed=stop_early)
                            position += run.length
                            continue
                        _finish_writes(inflight, turn)  # this buffer's last write is done before it is reused
                        view = bufs[turn][:run.length]
                        if decoder.read_into(view) != run.length:
                            raise CorruptObjectError(
                                f"object {key} is corrupt: it ends before the blocks the manifest places in it")
                        for i in range(run.count):
                            if hash_fn(view[i * bs:(i + 1) * bs]) != hashes[run.first + i]:
                                raise CorruptObjectError(f"object {key} is corrupt: block {blocks[run.first + i]} "
                                                         f"of {path} does not match its hash in the manifest")
                        if writers is None:
                            out.write_at(view, run.offset)
                        else:
                            inflight[turn] = writers.submit(out.write_at, view, run.offset)
                            turn ^= 1
                        position += run.length
                        written += run.length
                    _finish_writes(inflight)
                finally:
                    _wait_quietly(inflight)  # never close the file or reuse a buffer under a write
        if not stop_early:
            # Read to the end: the object's own length and checksum are checked there.
            while decoder.read_into(bufs[0]):
                pass
    done(written)


def _finish_writes(inflight: list, which: int | None = None) -> None:
    """Wait for the write of buffer ``which`` (None: of both); its error, if any, is raised here."""
    for i in (range(len(inflight)) if which is None else (which,)):
        f, inflight[i] = inflight[i], None
        if f is not None:
            f.result()


def _wait_quietly(inflight: list) -> None:
    """Wait for any write still running (after an error: the first error is the one reported)."""
    for f in inflight:
        if f is not None:
            wait([f])


def _skip(decoder, n: int, *, key: str, buf: memoryview, unhashed: bool) -> None:
    """Pass over ``n`` plaintext bytes: hashed into the object's checksum, unless ``unhashed``
    (a reader that stops early never checks that checksum; see codec's discard)."""
    while n > 0:
        got = decoder.discard(n) if unhashed else decoder.read_into(buf[:min(n, len(buf))])
        if not got:
            raise CorruptObjectError(f"object {key} is corrupt: it ends before the blocks the manifest places in it")
        n -= got


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


#: Threads that fsync at the end: each fsync mostly waits (journal commit, device flush), and
#: concurrent ones share commits.
SYNC_THREADS = 8


#: Files are written with at least these permission bits, and get their own mode once written.
OWNER_RW = stat.S_IRUSR | stat.S_IWUSR


def _sync(dest_dir: str, index, locations: dict[int, str]) -> None:
    """Every file and directory written, on disk: a restore is not done while it could still be lost.

    One syncfs(2) makes the data directory's whole filesystem durable: one
    journal commit and one device flush, where an fsync per file cost a flush
    each (a thousand files: ~0.1 s, most of a --delta run that keeps them all).
    It also covers files a delta restore kept, which may hold pages written
    before it ran. Tablespaces on other filesystems, and systems without
    syncfs, are fsynced file by file and directory by directory.
    """
    for path, mode in _iter(index.execute(f"SELECT path, mode FROM files WHERE mode & {OWNER_RW} != {OWNER_RW}")):
        os.chmod(os.path.join(dest_dir, path), mode)
    fd = os.open(dest_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        device = os.fstat(fd).st_dev
        elsewhere = {oid: loc for oid, loc in locations.items() if os.stat(loc).st_dev != device}
        whole = not directio.syncfs(fd)
    finally:
        os.close(fd)
    if whole:
        prefixes: tuple[str, ...] = ("",)
        roots = [dest_dir]
    else:
        prefixes = tuple(f"pg_tblspc/{oid}/" for oid in elsewhere)
        roots = [os.path.join(dest_dir, "pg_tblspc", str(oid)) for oid in elsewhere]
    if prefixes:
        paths = (os.path.join(dest_dir, path) for (path,) in _iter(index.execute("SELECT path FROM files"))
                 if path.startswith(prefixes))
        _run_bounded(_fsync, paths, threads=SYNC_THREADS)
        if whole:
            for name in ("backup_label", "tablespace_map"):
                if os.path.exists(os.path.join(dest_dir, name)):
                    _fsync(os.path.join(dest_dir, name))
        # Directories after their files: their entries (names) are what makes the files findable.
        _run_bounded(_fsync, (d for root in roots for d, _dirs, _files in os.walk(root, followlinks=True)),
                     threads=SYNC_THREADS)
        for location in ([] if whole else elsewhere.values()):
            _fsync(os.path.dirname(os.path.abspath(location)))  # the location itself may be new
    _fsync(os.path.dirname(dest_dir))  # dest_dir's own entry (syncfs covers it, unless it is a mount point)


def _run_bounded(fn, items, *, threads: int) -> None:
    """fn(item) for every item, ``threads`` at a time, with a bounded number waiting; the first error is raised."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pgvault-sync") as pool:
        _submit_bounded(pool, fn, items, limit=4 * threads)


def _submit_bounded(pool: ThreadPoolExecutor, fn, items, *, limit: int, done: Callable | None = None) -> None:
    """fn(item) on ``pool`` for every item, at most ``limit`` submitted and unfinished; the first error is raised.

    ``done(result)`` is called here, in the caller's thread, for each finished one.
    """
    running: set[Future] = set()
    try:
        for item in items:
            running.add(pool.submit(fn, item))
            while len(running) >= limit:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    result = f.result()
                    if done is not None:
                        done(result)
        for f in running:
            result = f.result()
            if done is not None:
                done(result)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise


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


# --- delta ------------------------------------------------------------------------


def tablespace_locations(manifest: Manifest, relocate: dict[int, str] | None = None) -> dict[int, str]:
    """{oid: the location a restore puts each tablespace at} (relocated, else as backed up)."""
    relocate = relocate or {}
    return {t.oid: relocate.get(t.oid, t.location) for t in manifest.tablespaces}


def check_tablespace_locations(manifest: Manifest, dest_dir: str, *, relocate: dict[int, str] | None = None,
                               delta: bool = False) -> None:
    """Refuse a tablespace location that holds something, unless (delta) ``dest_dir``'s own link points at it."""
    for oid, location in tablespace_locations(manifest, relocate).items():
        if not os.path.lexists(location):
            continue
        if not os.path.isdir(location):
            raise BackupError(f"the tablespace {oid} location {location} exists and is not a directory")
        if not os.listdir(location):
            continue
        link = os.path.join(dest_dir, "pg_tblspc", str(oid))
        if delta and os.path.islink(link) and os.readlink(link) == location:
            continue  # this data directory's own tablespace: delta brings it up to date
        raise BackupError(
            f"the tablespace {oid} location {location} is not empty; refusing to write into it"
            + (f" ({link} does not point to it, so it is not this data directory's)" if delta else ""),
            hint="give an empty location (relocate the tablespace), or remove what is there if it is not in use")


def _materialize_delta(storage, manifest, dest_dir, *, keyring, parallel, progress, relocate, require_encryption,
                       tmp_dir, started) -> MaterializeResult:
    check_tablespace_locations(manifest, dest_dir, relocate=relocate, delta=True)
    with tempfile.TemporaryDirectory(prefix="pgvault-materialize-", dir=tmp_dir) as work:
        index = sqlite3.connect(os.path.join(work, "index.sqlite"))
        try:
            files, total, root_mode = _load_index(storage, manifest, index, keyring=keyring,
                                                  require_encryption=require_encryption)
            locations = tablespace_locations(manifest, relocate)
            removed = _remove_extras(dest_dir, index, locations)
            kept, fetched, checked, wanted_bytes = _reconcile(manifest, dest_dir, index, locations,
                                                              parallel=parallel, progress=progress, total=total)
            if root_mode is not None:
                os.chmod(dest_dir, root_mode & 0o750)
            objects = _fill(storage, manifest, dest_dir, index, keyring=keyring, parallel=parallel,
                            require_encryption=require_encryption, progress=progress, total=wanted_bytes,
                            stop_early=True)
            _write_recovery_files(manifest, dest_dir, relocate)
            _sync(dest_dir, index, locations)
        finally:
            index.close()
    return MaterializeResult(files=files, bytes_written=wanted_bytes, objects_read=objects,
                             seconds=round(time.monotonic() - started, 3), delta=True, files_kept=kept,
                             files_fetched=fetched, entries_removed=removed, bytes_total=total,
                             bytes_checked=checked)


def _load_index(storage, manifest, index, *, keyring, require_encryption) -> tuple[int, int, int | None]:
    """The whole list into the index, verified to its end, before anything changes. (files, bytes, root mode)."""
    _create_index(index)
    index.execute("CREATE TABLE entries (seq INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, type TEXT NOT NULL,"
                  " mode INTEGER, size INTEGER, target TEXT, file_id INTEGER, blocks TEXT)")
    where = f"backup {manifest.label}"
    other_links: list[str] = []
    files = total = 0
    root_mode = None
    for entry in iter_files(storage, manifest, keyring=keyring, require_encryption=require_encryption):
        _check_links(entry, other_links, where)
        file_id = hashes = None
        if entry.type == "file":
            check_coverage(entry, manifest.block_size, where=where)
            file_id = _add_file(index, entry)
            hashes = json.dumps(entry.blocks)
            files += 1
            total += entry.size
        elif entry.type == "link" and not _is_tablespace_link(entry.path):
            other_links.append(entry.path)
        elif entry.type == "dir" and entry.path == "global":
            root_mode = entry.mode
        index.execute("INSERT INTO entries (path, type, mode, size, target, file_id, blocks) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (entry.path, entry.type, entry.mode, entry.size, entry.target, file_id, hashes))
    _finish_index(index, where)
    return files, total, root_mode


def _remove(path: str, st: os.stat_result) -> None:
    """Remove ``path`` itself: a link is unlinked (never followed), a directory removed with what it holds."""
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # does not follow links inside (the fd-based walk)
    else:
        os.unlink(path)


def _remove_extras(dest_dir: str, index, locations: dict[int, str]) -> int:
    """Remove what the backup does not hold, under ``dest_dir`` and in the tablespaces' own version directories."""
    removed = 0

    def kind_of(rel: str) -> str | None:
        row = index.execute("SELECT type FROM entries WHERE path = ?", (rel,)).fetchone()
        return row[0] if row else None

    def walk(rel_dir: str, abs_dir: str, *, keep_unknown: bool = False) -> None:
        nonlocal removed
        for name in sorted(os.listdir(abs_dir)):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = os.path.join(abs_dir, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            kind = kind_of(rel)
            if kind is None:
                if not keep_unknown:
                    _remove(path, st)
                    removed += 1
                continue
            if stat.S_ISLNK(st.st_mode):
                if kind == "link" and _is_tablespace_link(rel):
                    oid = int(rel.split("/")[1])
                    if os.readlink(path) == locations.get(oid) and os.path.isdir(path):
                        # the tablespace's top level may hold other versions' directories: keep what is not ours
                        walk(rel, path, keep_unknown=True)
                elif kind == "dir" and rel == "pg_wal" and os.path.isdir(path):
                    walk(rel, path)  # pg_wal on another disk: keep the link, clear the WAL
                # any other link is replaced (never followed) when the backup's entries are put in place
            elif stat.S_ISDIR(st.st_mode) and kind == "dir":
                walk(rel, path)

    walk("", dest_dir)
    return removed


def _reconcile(manifest, dest_dir, index, locations, *, parallel, progress, total) -> tuple[int, int, int, int]:
    """Put every entry in place, in path order; then compare the files already there block by block.

    Returns (files kept, files to fetch, bytes re-hashed, bytes to fetch); marks
    each source's wanted blocks in the index.
    """
    bs = manifest.block_size
    hash_fn = _hasher(manifest)
    kept = fetched = checked = wanted_bytes = 0
    lock = threading.Lock()
    state = {"bytes": 0}

    def compared(file_id: int, size: int, needed: list[int], nbytes: int) -> None:
        nonlocal kept, fetched, checked, wanted_bytes
        checked += nbytes
        if not needed:
            kept += 1
            index.execute("UPDATE sources SET wanted = '[]' WHERE file_id = ?", (file_id,))
            return
        fetched += 1
        wanted_bytes += sum(min(bs, size - b * bs) for b in needed)
        needed_set = set(needed)
        for rowid, blocks_json in index.execute("SELECT rowid, blocks FROM sources WHERE file_id = ?",
                                                (file_id,)).fetchall():
            wanted = [b for b in json.loads(blocks_json) if b in needed_set]
            index.execute("UPDATE sources SET wanted = ? WHERE rowid = ?", (json.dumps(wanted), rowid))

    def report(nbytes: int) -> None:
        if progress is None:
            return
        with lock:
            state["bytes"] += nbytes
            done = state["bytes"]
        progress(MaterializeProgress(done, total, 0, 0, phase="compare"))

    # Pass 1, in path order (a directory before what it holds): directories, links, and files
    # missing or of the wrong type, created empty (every block wanted).
    created: set[int] = set()
    rows = index.execute("SELECT path, type, mode, size, target, file_id FROM entries ORDER BY seq")
    for path, kind, mode, size, target, file_id in _iter(rows):
        where = os.path.join(dest_dir, path)
        try:
            st = os.lstat(where)
        except FileNotFoundError:
            st = None
        if kind == "dir":
            if st is not None and stat.S_ISDIR(st.st_mode):
                if stat.S_IMODE(st.st_mode) != mode:
                    os.chmod(where, mode)  # only then: a chmod dirties the inode, which the sync then writes
            elif st is not None and stat.S_ISLNK(st.st_mode) and path == "pg_wal" and os.path.isdir(where):
                pass  # pg_wal on another disk stays there
            else:
                if st is not None:
                    _remove(where, st)
                os.mkdir(where, mode)
                os.chmod(where, mode)
        elif kind == "link":
            want = locations[int(path.split("/")[1])] if _is_tablespace_link(path) else target
            if st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(where) == want:
                if _is_tablespace_link(path) and not os.path.lexists(want):
                    os.makedirs(want, mode=0o700)  # the link is ours, its location is gone: recreate it
                continue
            if st is not None:
                _remove(where, st)
            if _is_tablespace_link(path):
                _prepare_empty(want, what=f"tablespace {path.split('/')[1]} location")
            os.symlink(want, where)
        elif st is None or not stat.S_ISREG(st.st_mode):
            if st is not None:
                _remove(where, st)
            create_presized(where, size, mode | OWNER_RW)
            created.add(file_id)
            fetched += 1
            wanted_bytes += size  # its sources keep wanted = NULL: every block

    # Pass 2: the files already there, compared block by block, largest first: the workers then
    # finish together instead of one hashing the biggest file alone at the end.
    rows = index.execute("SELECT path, mode, size, file_id, blocks FROM entries WHERE type = 'file' "
                         "ORDER BY size DESC, seq")

    def compare(row) -> tuple[int, int, list[int], int]:
        path, mode, size, file_id, hashes_json = row
        return _compare_file(os.path.join(dest_dir, path), file_id, size, mode, json.loads(hashes_json), bs,
                             hash_fn, report)

    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="pgvault-compare") as pool:
        _submit_bounded(pool, compare, (row for row in _iter(rows) if row[3] not in created), limit=2 * parallel,
                        done=lambda result: compared(*result))
    index.commit()
    return kept, fetched, checked, wanted_bytes


def _iter(cursor):
    """Rows of a cursor one at a time (the index is on disk; the entries need not fit in memory)."""
    while True:
        batch = cursor.fetchmany(1000)
        if not batch:
            return
        yield from batch


def _compare_file(path: str, file_id: int, size: int, mode: int, expected: list[str], bs: int,
                  hash_fn, report) -> tuple[int, int, list[int], int]:
    """In a worker: cut or extend ``path`` to ``size``, then hash each block.

    Reads whole blocks a buffer at a time, from the page cache when it holds
    them and directly from the disk when not (see directio.FileReader).
    A file whose blocks all match is left as it is (_sync makes it durable).
    Returns (file_id, size, the blocks that do not match, bytes read).
    """
    buf = _run_buffer(bs)
    per_read = len(buf) // bs * bs  # whole blocks (the buffer holds one at least)
    needed: list[int] = []
    read = unreported = 0
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)  # checked as a regular file; never follow a link put since
    except PermissionError:  # e.g. a 0400 file, and we are its owner, not root: make it writable first
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | OWNER_RW)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    reader = None
    try:
        st = os.fstat(fd)
        if st.st_size != size:
            os.ftruncate(fd, size)
        if stat.S_IMODE(st.st_mode) != mode | OWNER_RW and stat.S_IMODE(st.st_mode) != mode:
            # only then: an intact file's inode stays clean, with nothing to write back
            os.fchmod(fd, mode | OWNER_RW)
        reader = directio.FileReader(fd, size)
        for start in range(0, size, per_read):
            length = min(per_read, size - start)
            got = reader.read_at(buf[:_round_up(length, directio.ALIGN)], start)
            read += got
            unreported += got
            first = start // bs
            for i in range(-(-length // bs)):
                begin = i * bs
                end = min(begin + bs, length)
                if got < end or hash_fn(buf[begin:end]) != expected[first + i]:
                    needed.append(first + i)
            if unreported >= 16 << 20:
                report(unreported)
                unreported = 0
    finally:
        if reader is not None:
            reader.close()
        os.close(fd)
    report(unreported)
    return file_id, size, needed, read
