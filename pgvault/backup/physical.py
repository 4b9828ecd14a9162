"""take_backup: one physical base backup, full or incremental, from start to commit.

Order matters, and is what makes a backup trustworthy:

1. take the backup lock (while the session connects: see ``pgsession``); check
   the server, its role and the data directory; delete leftovers of
   interrupted backups (meanwhile the parent's file list is fetched and its
   first entries read);
2. pg_backup_start (immediate checkpoint), in a session held open throughout;
3. read the data directory into data objects (see ``copy``), pg_control last;
4. pg_backup_stop: the stop LSN, and the backup_label / tablespace_map to restore;
5. wait until the WAL from the start to the stop LSN is in the vault (from a
   primary whose archiver is shown to work, the last segment is pushed here:
   see ``session.StopSegmentPush``), while
   the objects whose blocks were read already (an incremental's changed
   blocks) are stored, then files.jsonl;
6. write manifest.json — the commit: before it, no listing shows the backup.

A failure anywhere leaves no manifest; this run deletes what it wrote when it
can, and the next backup deletes whatever is left.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

from pgvault import __version__
from pgvault.backup import layout
from pgvault.backup.blockmap import merge_join
from pgvault.backup.copy import MAX_QUEUED_BLOCKS, MAX_QUEUED_ENTRIES, OBJECT_SIZE, Copier, CopyProgress, CopyStats
from pgvault.backup.errors import BackupError
from pgvault.backup.leftovers import find_leftovers, remove_leftovers
from pgvault.backup.lock import BackupLock
from pgvault.backup.manifest import (
    BLOCK_HASH,
    FORMAT_VERSION,
    FileEntry,
    FilesWriter,
    Manifest,
    SpooledFiles,
    Tablespace,
    check_coverage,
    committed_labels,
    read_manifest,
    write_manifest,
)
from pgvault.backup.scan import ScanEntry, scan_data_dir
from pgvault.backup.pgsession import open_session
from pgvault.backup.session import (
    StopSegmentPush,
    archiver_hint,
    check_node,
    label_timeline,
    wait_for_wal,
    wal_segments,
)
from pgvault.errors import PgvaultError
from pgvault.storage import Storage
from pgvault.vault import VaultRecord

DEFAULT_BLOCK_SIZE = 256 * 1024


@dataclass(frozen=True)
class BackupProgress:
    phase: str  # "copy", then "wal" while waiting for the archive
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    waiting_for: str | None = None  # the WAL segment awaited


@dataclass(frozen=True)
class BackupResult:
    manifest: Manifest
    notices: tuple[str, ...]
    objects: int  # data objects written
    reused_files: int  # files of an incremental not read at all (unchanged since the parent)

    def to_dict(self) -> dict:
        m = self.manifest
        d = m.to_dict()
        return {
            "label": m.label,
            "type": m.type,
            "requested": m.requested_type,
            "parent": m.parent,
            "start_time": d["start_time"],
            "stop_time": d["stop_time"],
            "start_lsn": d["start_lsn"],
            "stop_lsn": d["stop_lsn"],
            "start_wal": m.start_wal,
            "stop_wal": m.stop_wal,
            "timeline": m.timeline,
            "backup_from": m.backup_from,
            "bytes_read": m.bytes_read,
            "bytes_stored": m.bytes_stored,
            "duration_seconds": m.duration_seconds,
            "file_count": m.file_count,
            "objects": self.objects,
            "reused_files": self.reused_files,
            "notices": list(self.notices),
        }


def take_backup(
    *,
    storage: Storage,
    record: VaultRecord,
    options,
    conninfo: str,
    data_dir: str,
    tmp_dir: str,
    lock_dir: str,
    backup_type: str = "full",
    parallel: int = 2,
    backup_from: str = "any",
    block_size: int = DEFAULT_BLOCK_SIZE,
    wal_timeout: float = 120.0,
    keyring=None,
    require_encryption: bool = False,
    progress: Callable[[BackupProgress], None] | None = None,
    notify: Callable[[str], None] | None = None,
    object_size: int = OBJECT_SIZE,
    wal_options=None,
    spool=None,
) -> BackupResult:
    """Take one backup of the cluster at ``conninfo`` whose files are in ``data_dir``; commit it to ``storage``.

    ``options`` is the archive's CodecOptions (``wal_options`` those of WAL, if
    different: the backup may push its last segment, see ``StopSegmentPush``); ``tmp_dir`` holds files.jsonl while
    it is written; ``lock_dir`` the local lock file. ``notify`` receives what the
    operator should be told as it happens (also returned in ``notices``). ``spool``
    (archive_command's Spool) lets the archiver's call for that segment wait for
    the backup's push instead of pushing it a second time.
    """
    if backup_type not in layout.TYPE_LETTERS:
        raise ValueError(f"backup_type must be one of {', '.join(layout.TYPE_LETTERS)}")
    started = time.monotonic()
    data_dir = os.path.abspath(data_dir)
    notices: list[str] = []
    for directory in {tmp_dir, lock_dir}:
        try:
            os.makedirs(directory, exist_ok=True)
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(13, "permission denied")
        except OSError as exc:
            raise BackupError(f"cannot use the work directory {directory}: {exc.strerror}",
                              hint="[archive] spool_dir must be writable by the user running the backup") from None

    def say(message: str) -> None:
        notices.append(message)
        if notify is not None:
            notify(message)

    # The backup lock is taken while the session connects (in the child process pgvault backup starts
    # first, see pgsession); the server is checked once both are done.
    session = open_session(conninfo)
    try:
        lock, parent, label = _lock_and_label(storage, backup_type=backup_type, block_size=block_size,
                                              lock_dir=lock_dir, keyring=keyring,
                                              require_encryption=require_encryption, say=say)
        committed = False
        parent_files = _ParentFiles(storage, parent, keyring=keyring, require_encryption=require_encryption,
                                    tmp_dir=tmp_dir)
        try:
            node = check_node(session, data_dir=data_dir, backup_from=backup_from,
                              system_identifier=record.system_identifier)
            for notice in remove_leftovers(storage, find_leftovers(storage)):
                say(notice)

            def prepare() -> _Copy:
                return _Copy(storage, label=label, data_dir=data_dir, major=node.facts.major_version, parent=parent,
                             parent_files=parent_files, options=options, tmp_dir=tmp_dir, block_size=block_size,
                             parallel=parallel, object_size=object_size, progress=progress)

            (start_lsn, start_time), copy = _while_starting(lambda: session.start(label), prepare)
            try:
                copy.read_all()
                stop = session.stop()
                timeline = label_timeline(stop.backup_label)
                segments = wal_segments(timeline=timeline, start_lsn=start_lsn, stop_lsn=stop.stop_lsn,
                                        segment_size=record.wal_segment_size)
                # From a primary, the last segment is complete once pg_backup_stop returns (it switches WAL):
                # the backup pushes it itself once the archiver is shown to work (see StopSegmentPush).
                # Tried at every poll of the WAL wait: the proof is the poll's own kind of request (the vault
                # is looked at first), and each poll missed costs its interval (10 ms) of the backup's time.
                own_push = StopSegmentPush(session, storage, record=record, options=wal_options or options,
                                           data_dir=data_dir, spool=spool,
                                           segment=segments[-1] if node.role == "primary" else None)

                def wait_wal(check: Callable[[], None]) -> None:
                    def waiting(name: str) -> bool:
                        check()
                        if progress is not None:
                            s = copy.copier.stats
                            progress(BackupProgress("wal", s.bytes_read, s.bytes_read, s.files, s.files, name))
                        return own_push.attempt(name)

                    wait_for_wal(storage, segments, segment_size=record.wal_segment_size, timeout=wal_timeout,
                                 hint=lambda name: archiver_hint(session, node.role, name), on_wait=waiting)
                    own_push.release()  # if never attempted (the segment was there): archive_command may go on
                    session.end()  # stopped, and its WAL archived: the session has nothing left to do

                try:
                    copied = _while_finishing(copy.finish, wait_wal, abort=copy.copier.close)
                finally:
                    own_push.release()
            finally:
                copy.close()
            stats = copied.stats
            manifest = Manifest(
                format_version=FORMAT_VERSION, label=label, type="incr" if parent else "full",
                requested_type=backup_type, parent=parent.label if parent else None,
                system_identifier=record.system_identifier, pg_major_version=node.facts.major_version,
                wal_segment_size=record.wal_segment_size, timeline=timeline, start_lsn=start_lsn,
                stop_lsn=stop.stop_lsn, start_wal=segments[0], stop_wal=segments[-1], start_time=start_time,
                stop_time=stop.stop_time, backup_from=node.role, backup_label=stop.backup_label,
                tablespace_map=stop.tablespace_map, tablespaces=copied.tablespaces, block_size=block_size,
                files_object=layout.files_key(label), files_sha256=copied.files_sha256, file_count=stats.files,
                bytes_read=stats.bytes_read, bytes_stored=stats.bytes_stored + copied.files_stored,
                duration_seconds=round(time.monotonic() - started, 3), pgvault_version=__version__,
            )
            write_manifest(storage, manifest, options=options)
            committed = True
        finally:
            parent_files.close()  # if the copy never took them
            if not committed:
                _discard(storage, label)
                try:
                    lock.release()
                except PgvaultError:
                    pass  # the error on its way out matters more; a stale lock is reclaimed next time
    finally:
        session.close()
    try:
        lock.release()
    except PgvaultError as exc:  # committed: the backup is good; a stale lock is reclaimed next time
        say(f"the backup is committed, but its lock could not be removed: {exc.message}")
    return BackupResult(manifest=manifest, notices=tuple(notices), objects=stats.objects,
                        reused_files=stats.reused_files)


@dataclass(frozen=True)
class _Copied:
    stats: CopyStats
    files_sha256: str
    files_stored: int
    tablespaces: tuple[Tablespace, ...]


class _Copy:
    """The files of one backup: ``read_all`` between pg_backup_start and pg_backup_stop, then ``finish``.

    ``finish`` stores what is left (the objects whose blocks were read already,
    then files.jsonl) and needs the server no more: it runs while the WAL is
    awaited. ``close`` in any case.
    """

    def __init__(self, storage: Storage, *, label: str, data_dir: str, major: int, parent: Manifest | None,
                 parent_files: _ParentFiles, options, tmp_dir: str, block_size: int, parallel: int,
                 object_size: int, progress: Callable[[BackupProgress], None] | None) -> None:
        self.storage, self.label, self.options = storage, label, options
        self.tablespaces: list[Tablespace] = []
        scan = _noting_tablespaces(scan_data_dir(data_dir, pg_major_version=major), self.tablespaces)
        files_total, bytes_total = _totals(data_dir, major) if progress else (0, 0)

        def copy_progress(p: CopyProgress) -> None:
            if progress is not None:
                progress(BackupProgress("copy", min(p.bytes_done, bytes_total), bytes_total, p.files_done,
                                        files_total))

        self.spooled: SpooledFiles | None = None
        self.writer = FilesWriter(tmp_dir)
        self.copier = Copier(storage=storage, data_dir=data_dir, label=label, options=options, writer=self.writer,
                             block_size=block_size, parallel=parallel, object_size=object_size,
                             trust_mtime_before=parent.start_time.timestamp() - 1 if parent else None,
                             progress=copy_progress)
        try:
            self.spooled, parents = parent_files.take()
        except BaseException:
            self.close()
            raise
        self.entries = merge_join(scan, parents)

    def read_all(self) -> None:
        self.copier.read_all(self.entries)

    def finish(self) -> _Copied:
        stats = self.copier.finish()
        files_sha, _size, files_stored = self.writer.store(self.storage, layout.files_key(self.label),
                                                           options=self.options)
        return _Copied(stats, files_sha, files_stored, tuple(self.tablespaces))

    def close(self) -> None:
        """Stop storing (cancel what has not started, wait for what has) and drop the temporary files."""
        self.copier.close()
        self.writer.close()
        if self.spooled is not None:
            self.spooled.close()


class _ParentFiles:
    """The parent's file list (fetched into a temporary file) and its first entries, read in a thread.

    Started as soon as the parent is known: the session's process is still
    importing psycopg and connecting then (~30 ms measured), and this one has
    nothing else to do. ``take`` hands them to the copy; ``close`` drops them
    if they were never taken.
    """

    def __init__(self, storage: Storage, parent: Manifest | None, *, keyring, require_encryption: bool,
                 tmp_dir: str) -> None:
        self._future: Future | None = None
        if parent is not None:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgvault-parent")
            self._future = pool.submit(_fetch_parent_files, storage, parent, keyring=keyring,
                                       require_encryption=require_encryption, tmp_dir=tmp_dir)
            pool.shutdown(wait=False)  # its one thread ends with the task

    def take(self) -> tuple[SpooledFiles | None, Iterator[FileEntry]]:
        """(the spooled list to close after the copy, its entries); None and no entries without a parent."""
        future, self._future = self._future, None
        return future.result() if future is not None else (None, iter(()))

    def close(self) -> None:
        future, self._future = self._future, None
        if future is None:
            return
        try:
            spooled, _entries = future.result()
        except Exception:  # noqa: BLE001 - nothing was left open (see _fetch_parent_files); the backup's error counts
            return
        spooled.close()


def _fetch_parent_files(storage: Storage, parent: Manifest, *, keyring, require_encryption: bool,
                        tmp_dir: str) -> tuple[SpooledFiles, Iterator[FileEntry]]:
    spooled = SpooledFiles(storage, parent, keyring=keyring, require_encryption=require_encryption, tmp_dir=tmp_dir)
    try:
        return spooled, _ReadAhead(_checked(iter(spooled), parent))
    except BaseException:
        spooled.close()
        raise


def _while_starting(start: Callable[[], tuple[int, datetime]],
                    prepare: Callable[[], _Copy]) -> tuple[tuple[int, datetime], _Copy]:
    """``start()`` (pg_backup_start) here, and ``prepare()`` in a thread meanwhile: (start's result, the copy).

    pg_backup_start waits for a checkpoint, the session idle on its socket
    (without the GIL): time enough to set the copy up (its temporary files, the
    parent's entries: see _ParentFiles), off the reading's way. Nothing is read
    from the data directory before the backup has started: the scan begins in
    ``read_all``.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgvault-prepare") as pool:
        preparing = pool.submit(prepare)
        try:
            started = start()
        except BaseException:
            try:
                preparing.result().close()
            except BaseException:  # noqa: BLE001 - the start's error is the one to report
                pass
            raise
        return started, preparing.result()


class _ReadAhead:
    """An iterator over ``entries`` whose first ones (up to the copier's caps) are read at once."""

    def __init__(self, entries: Iterator[FileEntry]) -> None:
        self._entries = entries
        self._ready: deque[FileEntry] = deque()
        blocks = 0
        while len(self._ready) < MAX_QUEUED_ENTRIES and blocks < MAX_QUEUED_BLOCKS:
            entry = next(self._entries, None)
            if entry is None:
                break
            self._ready.append(entry)
            blocks += len(entry.blocks)

    def __iter__(self) -> Iterator[FileEntry]:
        return self

    def __next__(self) -> FileEntry:
        if self._ready:
            return self._ready.popleft()
        return next(self._entries)


def _while_finishing(finish: Callable[[], _Copied], wait: Callable[[Callable[[], None]], None],
                     abort: Callable[[], None]) -> _Copied:
    """Run ``finish`` in a thread while ``wait(check)`` runs here; ``finish``'s result once both are done.

    ``check`` raises the error ``finish`` failed with, if it has: a wait that
    calls it between polls ends then. If ``wait`` fails, ``abort`` stops
    ``finish`` and this returns only once it has: nothing may still be writing
    objects when the backup's objects are deleted.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgvault-finish") as pool:
        finishing = pool.submit(finish)

        def check() -> None:
            if finishing.done():
                finishing.result()

        try:
            wait(check)
        except BaseException:
            abort()
            raise
        return finishing.result()


def _lock_and_label(storage: Storage, *, backup_type: str, block_size: int, lock_dir: str, keyring,
                    require_encryption: bool, say: Callable[[str], None]):
    """Take the lock under a fresh label; (lock, parent manifest or None, label).

    The label must sort after every committed backup, which only the lock
    holder can know for sure: if a backup committed between our listing and
    our lock, list again under a new label.
    """
    for _attempt in range(3):
        labels = committed_labels(storage)
        parent, fallback = _choose_parent(storage, labels, backup_type=backup_type, block_size=block_size,
                                          keyring=keyring, require_encryption=require_encryption)
        kind = "incr" if parent is not None else "full"
        label = layout.next_label(datetime.now(timezone.utc), kind, labels)
        lock = BackupLock(storage, label=label, lock_dir=lock_dir)
        for notice in lock.acquire():
            say(notice)
        if committed_labels(storage) == labels:
            if fallback:
                say(fallback)
            return lock, parent, label
        lock.release()
    raise PgvaultError("backups keep committing while this one starts; try again")


def _choose_parent(storage: Storage, labels: list[str], *, backup_type: str, block_size: int, keyring,
                   require_encryption: bool) -> tuple[Manifest | None, str | None]:
    """The backup an incremental builds on (the newest), or None and why a full backup is taken instead."""
    if backup_type == "full":
        return None, None
    if not labels:
        return None, "no backup to build an incremental on yet: taking a full backup"
    newest = read_manifest(storage, labels[-1], keyring=keyring, require_encryption=require_encryption)
    if newest.block_size != block_size:
        return None, (f"the newest backup {newest.label} uses {newest.block_size // 1024} KiB blocks, this one "
                      f"{block_size // 1024} KiB: taking a full backup")
    if newest.block_hash != BLOCK_HASH:
        # Its unchanged blocks' hashes would be copied into a manifest that names another algorithm.
        return None, (f"the newest backup {newest.label} hashes its blocks with {newest.block_hash}, this pgvault "
                      f"with {BLOCK_HASH}: taking a full backup")
    return newest, None


def _checked(entries: Iterator[FileEntry], parent: Manifest) -> Iterator[FileEntry]:
    where = f"backup {parent.label}"
    for entry in entries:
        if entry.type == "file":
            check_coverage(entry, parent.block_size, where=where)
        yield entry


def _noting_tablespaces(entries: Iterator[ScanEntry], out: list[Tablespace]) -> Iterator[ScanEntry]:
    for entry in entries:
        parts = entry.path.split("/")
        if entry.type == "link" and len(parts) == 2 and parts[0] == "pg_tblspc" and parts[1].isdigit():
            out.append(Tablespace(int(parts[1]), entry.target or ""))
        yield entry


def _totals(data_dir: str, major: int) -> tuple[int, int]:
    """Files and bytes to back up, for the progress bar: a walk of the directory without reading."""
    files = size = 0
    for entry in scan_data_dir(data_dir, pg_major_version=major):
        if entry.type == "file":
            files += 1
            size += entry.size
    return files, size


def _discard(storage: Storage, label: str) -> None:
    """Best effort: delete what an uncommitted backup wrote; the next backup deletes what remains."""
    try:
        if storage.stat(layout.manifest_key(label)) is not None:
            return  # the commit went through after all (an error on the way back): keep it
        for info in list(storage.list(layout.backup_prefix(label))):
            storage.delete(info.key)
    except PgvaultError:
        pass
