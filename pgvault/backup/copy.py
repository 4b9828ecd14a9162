"""Copy a data directory into data objects, in parallel, and write files.jsonl as files complete.

A pipeline over the entries of the data directory, in path order:

1. plan: a directory or link is recorded as is; a file unchanged since the
   parent (same size and mtime, and that mtime older than the parent's start)
   reuses the parent's blocks without being read; any other file of an
   incremental is hashed block by block (in parallel tasks of up to one object's
   size) and compared with the parent's hashes, the bytes of the blocks that
   differ kept as they pass (up to KEEP_BYTES at a time); a full backup stores
   every block.
2. pack: the blocks to store are packed, in order, into objects of about
   ``object_size`` bytes: small files share one object (a bundle; each local put
   costs an fsync), large files are cut into several (so the workers share a
   1 GiB relation segment); an incremental's changed blocks go out in smaller
   objects at once (see ``Copier._burst_limit``). Each object is encoded and put
   by a worker, from the files or from the kept bytes.
3. write: once every object holding a file's blocks is stored, its files.jsonl
   line is written (to a temporary file, stored at the end).

Reading ends before storing does: ``read_all`` returns once every file has been
read (pg_control last), so the backup can be stopped on the server while
``finish`` encodes and puts the kept blocks and the archiver pushes the stop
segment. An incremental's changed blocks are all read by the comparison pass,
so most of its storing moves out of the time between pg_backup_start and
pg_backup_stop; a full backup reads as it stores, and changes nothing.

Memory is bounded whatever the database size: only the entries between the
oldest unfinished one and the scan position are held, and their number and
blocks are capped, as are the kept bytes; neither files.jsonl nor the parent's
is ever held whole.

pg_control is copied last, after every other file: a backup from a standby
ends where the copied pg_control's minimum recovery point says, which must
cover every page copied before it (pg_basebackup does the same).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable

from pgvault import codec
from pgvault.backup import layout
from pgvault.backup.blockmap import Location, block_locations, changed_blocks, contiguous_length, group_sources
from pgvault.backup.blocks import HashResult, Piece, PieceReader, hash_blocks, read_blocks
from pgvault.backup.manifest import FileEntry, FilesWriter, block_count
from pgvault.backup.scan import ScanEntry
from pgvault.storage import Storage

OBJECT_SIZE = 64 << 20
#: Files copied last, in their own object (see the module docstring).
COPY_LAST = frozenset({"global/pg_control"})
#: Caps on what waits between the scan and files.jsonl: entries, and their blocks.
MAX_QUEUED_ENTRIES = 20_000
MAX_QUEUED_BLOCKS = 200_000
#: Bytes of changed blocks held between the comparison pass and their object's put, at most.
#: Past it, a changed file is read again to be stored, before the backup stops.
KEEP_BYTES = 96 << 20
#: The smallest object an incremental sends before it is full (see Copier._burst_limit).
MIN_BURST_OBJECT = 8 << 20


@dataclass
class CopyProgress:
    bytes_done: int = 0
    files_done: int = 0


@dataclass
class CopyStats:
    files: int = 0  # regular files recorded
    bytes_read: int = 0  # sum of their sizes
    bytes_stored: int = 0  # sum of the stored sizes of the data objects written
    objects: int = 0
    reused_files: int = 0  # unchanged since the parent, not read


@dataclass(eq=False)
class _Job:
    """One data object: pieces of files, stored by one worker."""

    key: str
    pieces: list[Piece] = field(default_factory=list)
    planned: int = 0
    future: Future | None = None
    sha256: str = ""
    stored: int = 0
    counted: int = 0  # bytes this job adds to progress when done
    reads_files: bool = False  # some piece is read from its file (not held): done before the backup stops


@dataclass(eq=False)
class _Plan:
    """One entry moving through the pipeline."""

    scan: ScanEntry
    parent: FileEntry | None
    kind: str  # "entry" (dir/link), "reuse", "store" (every block), "diff" (hash, then store what changed)
    hash_tasks: list[Future] = field(default_factory=list)
    hashes: list[str | None] = field(default_factory=list)
    lengths: list[int | None] = field(default_factory=list)
    pieces: list[tuple[Piece, _Job]] = field(default_factory=list)
    kept: dict[int, bytes] = field(default_factory=dict)  # changed blocks' bytes from the comparison pass
    vanished: bool = False
    last: bool = False  # copied after every other file (COPY_LAST)
    todo: list[int] = field(default_factory=list)  # for files copied last: the blocks to store
    place: int | None = None  # for files copied last: their reserved line in files.jsonl

    weight: int = 1  # what it holds while queued, in blocks: see MAX_QUEUED_BLOCKS


class Copier:
    """Copies the entries of one backup; ``run`` returns what it stored."""

    def __init__(
        self, *, storage: Storage, data_dir: str, label: str, options, writer: FilesWriter, block_size: int,
        parallel: int, trust_mtime_before: float | None = None, object_size: int = OBJECT_SIZE,
        progress: Callable[[CopyProgress], None] | None = None,
    ) -> None:
        self.storage = storage
        self.data_dir = data_dir
        self.label = label
        self.options = options
        self.writer = writer
        self.bs = block_size
        self.parallel = parallel
        self.trust_mtime_before = trust_mtime_before
        self.object_size = max(object_size, block_size)
        self.progress_cb = progress
        self.progress = CopyProgress()
        self.stats = CopyStats()
        # Several objects are encoded at once: each compresses in its own worker
        # thread (zstd releases the GIL). Measured on pgbench data with 2 workers,
        # zstd's own threads (threads=1) cost 10% more CPU and twice the memory
        # (70 -> 137 MB RSS) for no gain; one object at a time keeps them.
        self.encoder_threads = 0 if parallel > 1 else options.threads
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="pgvault-backup")
        self._outstanding: set[Future] = set()
        self._to_pack: deque[_Plan] = deque()
        self._to_write: deque[_Plan] = deque()
        self._queued_weight = 0
        # The objects being filled: one reads its files when stored, the other holds kept bytes
        # (apart: the backup can stop before the second is stored, not before the first).
        self._filling: dict[bool, _Job] = {}  # reads_files -> job
        self._next_number = 0
        self._last: list[_Plan] = []
        self._last_job: _Job | None = None
        self._readers: set[Future] = set()  # hash tasks, and stores that read files, not known to be done
        # Objects of kept bytes wait here until the scan is done: see _release_deferred.
        self._deferred: deque[_Job] = deque()
        self._scanned = False  # every entry planned: what is deferred may go
        self._keep_left = KEEP_BYTES
        self._lock = threading.Lock()

    # --- the pipeline ---------------------------------------------------------

    def run(self, entries: Iterable[tuple[ScanEntry, FileEntry | None]]) -> CopyStats:
        """Copy every entry: ``read_all`` then ``finish``."""
        self.read_all(entries)
        return self.finish()

    def read_all(self, entries: Iterable[tuple[ScanEntry, FileEntry | None]]) -> None:
        """Return once every file has been read, pg_control last; objects may still be being stored."""
        try:
            for scan, parent in entries:
                plan = self._plan(scan, parent)
                plan.weight = 1 + block_count(scan.size, self.bs) + (len(parent.blocks) if parent else 0)
                self._to_pack.append(plan)
                self._queued_weight += plan.weight
                self._advance()
                while self._busy():
                    self._wait_one()
                    self._advance()
            self._scanned = True
            self._release_deferred()
            while self._to_pack or self._reading():
                if not self._to_pack:
                    self._submit_job()  # nothing more will join the object being filled
                self._wait_one()
                self._advance()
            self._submit_job()
            self._read_last()
        except BaseException:
            self.close()
            raise

    def finish(self) -> CopyStats:
        """After ``read_all``: wait until every object is stored and every files.jsonl line written."""
        try:
            while self._to_write:
                self._wait_one()
                self._advance()
            self._write_last()
        except BaseException:
            self.close()
            raise
        self._pool.shutdown(wait=True)
        return self.stats

    def close(self) -> None:
        """Stop: cancel the tasks not started, wait for those running (no put is left half done)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _reading(self) -> bool:
        """Whether some file is still to be read: by a hash task, a store, or the object being filled."""
        if True in self._filling:
            return True
        self._readers = {f for f in self._readers if not f.done()}
        return bool(self._readers)

    def _busy(self) -> bool:
        return (len(self._outstanding) >= 2 * self.parallel
                or len(self._to_pack) + len(self._to_write) > MAX_QUEUED_ENTRIES
                or self._queued_weight > MAX_QUEUED_BLOCKS)

    def _wait_one(self) -> None:
        """Wait for some task to finish; with none running, send the objects waiting or being filled."""
        self._outstanding = {f for f in self._outstanding if not f.done()}
        if not self._outstanding:
            self._release_deferred(everything=True)
            self._submit_job()
        if self._outstanding:
            wait(self._outstanding, return_when=FIRST_COMPLETED)

    def _advance(self) -> None:
        """Move every entry that can move: pack those hashed, write those stored."""
        for f in [f for f in self._outstanding if f.done()]:
            self._outstanding.discard(f)
            f.result()  # a failed task fails the backup now, not when its entry comes up
        self._release_deferred()
        while self._to_pack and all(f.done() for f in self._to_pack[0].hash_tasks):
            plan = self._to_pack.popleft()
            self._pack(plan)
            self._to_write.append(plan)
        while self._to_write and self._stored(self._to_write[0]):
            plan = self._to_write.popleft()
            self._queued_weight -= plan.weight
            self._write(plan)

    def _stored(self, plan: _Plan) -> bool:
        return all(job.future is not None and job.future.done() for _piece, job in plan.pieces)

    def _emit_progress(self) -> None:
        if self.progress_cb is not None:
            self.progress_cb(self.progress)

    # --- plan -------------------------------------------------------------------

    def _plan(self, scan: ScanEntry, parent: FileEntry | None) -> _Plan:
        if scan.type != "file":
            return _Plan(scan, None, "entry")
        if parent is not None and parent.type != "file":
            parent = None
        if scan.path in COPY_LAST or parent is None:
            return _Plan(scan, None, "store")
        if (self.trust_mtime_before is not None and parent.size == scan.size and parent.mtime == scan.mtime
                and scan.mtime < self.trust_mtime_before):
            self._count(scan.size)
            return _Plan(scan, parent, "reuse")
        plan = _Plan(scan, parent, "diff")
        path = os.path.join(self.data_dir, scan.path)
        per_task = max(1, self.object_size // self.bs)
        # One block more than the size seen: a file that grew a little is still compared whole.
        blocks = block_count(scan.size, self.bs) + 1
        for first in range(0, blocks, per_task):
            count = min(per_task, blocks - first)
            future = self._pool.submit(hash_blocks, path, first, count, self.bs, parent=parent.blocks,
                                       keep=self._take)
            nbytes = min(count * self.bs, max(0, scan.size - first * self.bs))
            future.add_done_callback(functools.partial(self._count, nbytes))
            plan.hash_tasks.append(future)
            self._outstanding.add(future)
            self._readers.add(future)
        return plan

    def _count(self, nbytes: int, _future: Future | None = None) -> None:
        with self._lock:  # called in worker threads
            self.progress.bytes_done += nbytes

    def _take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` of KEEP_BYTES for a changed block (in a worker); False once spent."""
        with self._lock:
            if nbytes > self._keep_left:
                return False
            self._keep_left -= nbytes
            return True

    def _give_back(self, held: Iterable[bytes]) -> None:
        with self._lock:
            self._keep_left += sum(len(b) for b in held)

    # --- pack -------------------------------------------------------------------

    def _pack(self, plan: _Plan) -> None:
        if plan.kind in ("entry", "reuse"):
            return
        path = os.path.join(self.data_dir, plan.scan.path)
        if plan.kind == "store":
            size = plan.scan.size
            todo = list(range(block_count(size, self.bs)))
            plan.hashes = [None] * len(todo)
            plan.lengths = [None] * len(todo)
        else:
            results: list[HashResult] = [f.result() for f in plan.hash_tasks]
            plan.hash_tasks = []
            missed = False
            for r in results:
                plan.vanished |= r.vanished
                plan.hashes.extend(r.hashes)
                plan.lengths.extend(r.lengths)
                plan.kept.update(r.kept)
                missed |= r.missed
            size, count = contiguous_length(plan.lengths, self.bs)
            del plan.hashes[count:], plan.lengths[count:]
            assert plan.parent is not None
            todo = changed_blocks(plan.hashes, plan.parent.blocks)
            if missed or any(b not in plan.kept for b in todo):
                self._give_back(plan.kept.values())  # all or nothing: the file is read again to be stored
                plan.kept = {}
            else:
                self._give_back(plan.kept.pop(b) for b in set(plan.kept) - set(todo))
        if plan.vanished:
            self._give_back(plan.kept.values())
            plan.kept = {}
            return
        if plan.scan.path in COPY_LAST:
            plan.todo, plan.last = todo, True
            self._last.append(plan)  # read by _read_last, after every other file
            return
        limit = self.object_size
        if plan.kind == "diff":
            limit = self._burst_limit(sum(min(self.bs, size - b * self.bs) for b in todo))
        reads_files = not plan.kept
        start = 0
        while start < len(todo):
            job = self._filling.get(reads_files) or self._new_job(reads_files)
            end, planned = start, 0
            while end < len(todo) and (end == start or job.planned + planned < limit):
                planned += min(self.bs, max(0, size - todo[end] * self.bs))
                end += 1
            blocks = todo[start:end]
            piece = Piece(path, blocks, data=None if reads_files else [plan.kept.pop(b) for b in blocks])
            job.pieces.append(piece)
            job.planned += planned
            if plan.kind == "store":
                job.counted += planned
            plan.pieces.append((piece, job))
            start = end
            if job.planned >= limit:
                self._submit_job(job)
        job = self._filling.get(reads_files)
        if plan.kind == "diff" and job is not None and job.planned >= MIN_BURST_OBJECT:
            self._submit_job(job)  # the workers may be idle: no need to wait for more blocks to join it

    def _burst_limit(self, changed: int) -> int:
        """The size of the objects holding one changed file's blocks, so that every worker shares them.

        An incremental's changed blocks come file by file, each once its hashes
        are in, while the workers wait for them (or still hash). Filling the
        usual object_size would leave a file that changed a little to one
        worker, compressing it alone after every other task is done: its blocks
        are cut into ``parallel`` objects instead (no smaller than
        MIN_BURST_OBJECT, so that small changes still share one) and sent at once.
        """
        return min(self.object_size, max(MIN_BURST_OBJECT, -(-changed // self.parallel)))

    def _new_job(self, reads_files: bool) -> _Job:
        job = self._filling[reads_files] = _Job(key=self._next_key(), reads_files=reads_files)
        return job

    def _next_key(self) -> str:
        key = layout.data_key(self.label, self._next_number)
        self._next_number += 1
        return key

    def _submit_job(self, job: _Job | None = None) -> None:
        """Send ``job`` to the workers; without one, the objects being filled."""
        if job is None:
            for filling in list(self._filling.values()):
                self._submit_job(filling)
            return
        if job.future is not None:
            return
        if self._filling.get(job.reads_files) is job:
            del self._filling[job.reads_files]
        if not job.reads_files:
            self._deferred.append(job)
            self._release_deferred()
            return
        self._start(job)

    def _release_deferred(self, *, everything: bool = False) -> None:
        """Send the objects of kept bytes that may go now: after the scan, or while memory for them runs short.

        The backup can stop only once every file is read, and storing kept bytes
        reads no file: sent as soon as filled, they would take the workers from
        the reads still to come (measured: ~30 ms of a 0.3 s incremental, the
        last small files waiting for two 20 MiB objects to compress). They wait
        until the scan is done, and then queue behind its reads (they are stored
        while the WAL is awaited), unless three quarters of the memory for kept
        bytes is held (past it, changed files would be read twice).
        """
        while self._deferred and (everything or self._scanned or self._keep_left < KEEP_BYTES // 4):
            self._start(self._deferred.popleft())

    def _start(self, job: _Job) -> None:
        job.future = self._pool.submit(self._store, job)
        self._outstanding.add(job.future)
        if job.reads_files:
            self._readers.add(job.future)

    def _store(self, job: _Job) -> None:
        """In a worker: encode the job's pieces as one object and put it."""
        reader = PieceReader(job.pieces, self.bs)
        try:
            encoder = codec.encode(reader, name=job.key, compression=self.options.compression,
                                   level=self.options.level, threads=self.encoder_threads, key=self.options.key)
            self.storage.put(job.key, encoder)
        finally:
            reader.close()
            for piece in job.pieces:
                if piece.data is not None:
                    self._give_back(piece.data)
                    piece.data = []  # stored: let the bytes go
        assert encoder.plaintext_sha256 is not None
        job.sha256 = encoder.plaintext_sha256
        job.stored = encoder.encoded_size
        with self._lock:
            self.stats.objects += 1
            self.stats.bytes_stored += job.stored
            self.progress.bytes_done += job.counted

    def _read_last(self) -> None:
        """Read the files that must be read after all others (pg_control), now; store them in one last object."""
        if not self._last:
            return
        job = _Job(key=self._next_key())
        for plan in self._last:
            path = os.path.join(self.data_dir, plan.scan.path)
            held = read_blocks(path, plan.todo, self.bs)
            piece = Piece(path, plan.todo, data=held if held is not None else [], vanished=held is None)
            plan.pieces = [(piece, job)]
            job.pieces.append(piece)
            job.counted += plan.scan.size
        self._submit_job(job)
        self._last_job = job

    def _write_last(self) -> None:
        """The files.jsonl lines of the files read last, in the places kept for them."""
        if self._last_job is None:
            return
        assert self._last_job.future is not None
        self._last_job.future.result()
        for plan in self._last:
            entry = self._entry(plan)
            if entry is not None and plan.place is not None:
                self.writer.fill(plan.place, entry)
                self._account(plan, entry)

    # --- write ------------------------------------------------------------------

    def _write(self, plan: _Plan) -> None:
        if plan.last:
            plan.place = self.writer.reserve()
            return
        for _piece, job in plan.pieces:
            assert job.future is not None
            job.future.result()  # re-raise a worker's error here if not seen before
        entry = self._entry(plan)
        if entry is not None:
            self.writer.write(entry)
            self._account(plan, entry)

    def _account(self, plan: _Plan, entry: FileEntry) -> None:
        if entry.type == "file":
            self.stats.files += 1
            self.stats.bytes_read += entry.size
            self.stats.reused_files += plan.kind == "reuse"
            self.progress.files_done += 1
            self._emit_progress()

    def _entry(self, plan: _Plan) -> FileEntry | None:
        """The files.jsonl line of a finished entry, or None for a file that vanished."""
        scan = plan.scan
        if plan.kind == "entry":
            return FileEntry(scan.path, scan.type, mode=scan.mode if scan.type == "dir" else None, target=scan.target)
        if plan.kind == "reuse":
            p = plan.parent
            assert p is not None
            return FileEntry(scan.path, "file", mode=scan.mode, size=p.size, mtime=scan.mtime,
                             blocks=p.blocks, sources=p.sources)
        if plan.vanished or any(piece.vanished for piece, _job in plan.pieces):
            return None  # dropped during the backup: WAL replay drops it too
        hashes = list(plan.hashes)
        lengths = list(plan.lengths)
        locations: dict[int, Location] = {}
        if plan.parent is not None:
            parent_locs = block_locations(plan.parent, self.bs)
            locations = {b: parent_locs[b] for b in range(len(hashes)) if b in parent_locs}
        for piece, job in plan.pieces:
            for b in piece.blocks:
                lengths[b] = None  # planned, not read: unless read below, the file ends before it
                locations.pop(b, None)
            for k, (h, n) in enumerate(zip(piece.hashes, piece.lengths, strict=True)):
                b = piece.blocks[k]
                hashes[b], lengths[b] = h, n
                locations[b] = Location(job.key, job.sha256, piece.offset + k * self.bs)
        size, count = contiguous_length(lengths, self.bs)
        locations = {b: loc for b, loc in locations.items() if b < count}
        if len(locations) != count:
            missing = sorted(set(range(count)) - set(locations))[:3]
            raise AssertionError(f"{scan.path}: blocks {missing} have no location")
        return FileEntry(scan.path, "file", mode=scan.mode, size=size, mtime=scan.mtime,
                         blocks=tuple(h for h in hashes[:count]), sources=group_sources(locations, self.bs))
