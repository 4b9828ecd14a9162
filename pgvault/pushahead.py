"""Asynchronous archiving: a background worker pushes the `.ready` queue ahead of PostgreSQL.

PostgreSQL calls archive_command for the oldest `.ready` file, one at a time.
With ``[archive] async = true`` a call pushes its own file, starts (unless one
runs) a detached worker that pushes the other waiting files in parallel and
records each in the spool, and returns as soon as its own file is in the vault.
The calls that follow find their marker and return at once (entry.py's fast
path). A call whose file the worker is pushing right now waits for the
worker's marker instead of pushing it twice. A call still exits 0 only once its
own file is in the vault; when the vault is down, calls keep failing and
PostgreSQL keeps every segment.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from typing import NamedTuple

from pgvault.archive import CodecOptions, PushResult, push_wal_file
from pgvault.spool import Spool
from pgvault.storage import Storage
from pgvault.vault import VaultRecord

WORKER_LOCK = ".push-ahead.lock"
#: How long a call waits for the worker to push its file before pushing it itself.
WAIT_FOR_WORKER = 60.0
#: Files one worker round takes; it loops while more arrive.
BATCH = 64
#: How long an idle worker keeps watching for new `.ready` files before it exits, and how
#: often it looks: under a steady load the next segment is then pushed the moment it is
#: complete, and PostgreSQL's call for it finds its marker (the fast path).
LINGER = 5.0
LINGER_POLL = 0.02
#: How long a worker leaves alone the file its starter is pushing itself (should that push
#: fail, PostgreSQL's retry then finds the worker pushing it).
SKIP_GRACE = 2.0


def ready_wal_files(wal_dir: str) -> list[str]:
    """Names waiting for archiving, in the order PostgreSQL would ask: history files first, then by name."""
    try:
        entries = os.listdir(os.path.join(wal_dir, "archive_status"))
    except FileNotFoundError:
        return []
    names = [e[:-6] for e in entries if e.endswith(".ready")]
    return sorted(names, key=lambda n: (not n.endswith(".history"), n))


class PushAheadResult(NamedTuple):
    own: PushResult | None  # None: the worker pushed it while this call waited
    still_waiting: int


def _worker_running(spool: Spool) -> bool:
    try:
        fd = os.open(os.path.join(spool.archive_dir, WORKER_LOCK), os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock, if it got it


def _take_worker_lock(spool: Spool) -> int | None:
    """A descriptor holding the worker lock, or None if a worker holds it."""
    fd = os.open(os.path.join(spool.archive_dir, WORKER_LOCK), os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def start_worker(wal_dir: str, *, spool: Spool, config_path: str | None, skip: str | None = None) -> bool:
    """Start a detached worker unless one runs; ``skip``: a file the caller is pushing itself right now.

    The lock is taken here and handed to the worker as an open descriptor (a flock belongs to
    the open file, which the child shares): from this moment every call sees a worker running,
    without waiting for the worker's own start-up, and two calls can never start two workers.
    """
    lock = _take_worker_lock(spool)
    if lock is None:
        return False
    try:
        cmd = [sys.executable, "-m", "pgvault.entry"]
        if config_path:
            cmd += ["--config", config_path]
        cmd += ["wal-push-ahead", wal_dir, "--lock-fd", str(lock)]
        if skip:
            cmd += ["--skip", skip]
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True, pass_fds=(lock,))
    finally:
        os.close(lock)  # the worker's copy keeps the lock
    return True


def push_with_push_ahead(
    path: str,
    *,
    storage: Storage,
    record: VaultRecord,
    options: CodecOptions,
    spool: Spool,
    config_path: str | None,
) -> PushAheadResult:
    spool.ensure_archive_dir()
    wal_dir = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    own = None
    if _worker_running(spool):
        # The worker pushes oldest first, and PostgreSQL asks for the oldest: it is likely on ours.
        deadline = time.monotonic() + WAIT_FOR_WORKER
        while time.monotonic() < deadline and _worker_running(spool):
            if spool.consume_marker(path):
                break
            time.sleep(0.005)
        else:
            own = None if spool.consume_marker(path) else push_wal_file(
                path, storage=storage, record=record, options=options)
    else:
        # Start the worker first, so that its start-up overlaps this push (it skips this file).
        if any(n != name and not spool.has_marker(n) for n in ready_wal_files(wal_dir)):
            start_worker(wal_dir, spool=spool, config_path=config_path, skip=name)
        own = push_wal_file(path, storage=storage, record=record, options=options)
    spool.prune_markers(wal_dir)
    waiting = [n for n in ready_wal_files(wal_dir) if n != name and not spool.has_marker(n)]
    if waiting:
        start_worker(wal_dir, spool=spool, config_path=config_path)  # a no-op if one runs
    return PushAheadResult(own=own, still_waiting=len(waiting))


def run_worker(wal_dir: str, *, storage: Storage, record: VaultRecord, options: CodecOptions, spool: Spool,
               parallel: int, skip: str | None = None, linger: float = LINGER, skip_grace: float = SKIP_GRACE,
               lock_fd: int | None = None) -> int:
    """Push waiting files until none is left for ``linger`` seconds; returns how many were pushed.

    One worker per spool: ``lock_fd`` is the lock its starter took for it, else it takes the lock
    (and returns 0 at once if another worker holds it). ``skip``: a file its starter pushes itself,
    left alone for ``skip_grace`` s.
    """
    # Here, not at the top: concurrent.futures brings logging and traceback (~4 ms), and
    # every asynchronous wal-push imports this module, the worker only once.
    from concurrent.futures import ThreadPoolExecutor

    spool.ensure_archive_dir()
    lock = lock_fd if lock_fd is not None else _take_worker_lock(spool)
    if lock is None:
        return 0
    # Several files at once: one zstd thread each keeps the cores busy without oversubscribing.
    each = options._replace(threads=0) if parallel > 1 else options
    pushed = 0
    failed: set[str] = set()
    try:
        idle_since = time.monotonic()
        skip_until = idle_since + skip_grace
        while True:
            if skip is not None and time.monotonic() >= skip_until:
                skip = None
            batch = [n for n in ready_wal_files(wal_dir)
                     if not spool.has_marker(n) and n not in failed and n != skip][:BATCH]
            if not batch:
                if time.monotonic() - idle_since >= linger or not os.path.isdir(wal_dir):
                    break
                time.sleep(LINGER_POLL)
                continue

            def push_one(n: str) -> bool:
                p = os.path.join(wal_dir, n)
                try:
                    push_wal_file(p, storage=storage, record=record, options=each)
                    # One left by a race all the same is harmless (fingerprinted) and pruned by the next call.
                    spool.mark_pushed_if_waiting(p)
                    return True
                except FileNotFoundError:
                    return False  # PostgreSQL archived it meanwhile (its own call) and removed it
                except Exception as exc:
                    failed.add(n)  # its own archive_command call will retry it and report the error
                    print(f"pgvault push-ahead: could not push {n}: {exc}", file=sys.stderr)
                    return False

            with ThreadPoolExecutor(max_workers=parallel) as pool:
                pushed += sum(pool.map(push_one, batch))
            idle_since = time.monotonic()
        spool.prune_markers(wal_dir)
    finally:
        os.close(lock)
    return pushed
