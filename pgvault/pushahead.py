"""Asynchronous archiving: one archive_command call pushes the whole `.ready` queue.

PostgreSQL calls archive_command for the oldest `.ready` file, one at a time.
This call pushes that file and the next ones waiting in
``pg_wal/archive_status`` in parallel, and records each one pushed in the
spool, so the calls that follow return at once from the fast path. The call
still exits 0 only once its own file is in the vault; when the vault is down,
calls keep failing and PostgreSQL keeps every segment.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from pgvault.archive import CodecOptions, PushResult, push_wal_file
from pgvault.spool import Spool
from pgvault.storage import Storage
from pgvault.vault import VaultRecord


def ready_wal_files(wal_dir: str) -> list[str]:
    """Names waiting for archiving, in the order PostgreSQL would ask: history files first, then by name."""
    try:
        entries = os.listdir(os.path.join(wal_dir, "archive_status"))
    except FileNotFoundError:
        return []
    names = [e[:-6] for e in entries if e.endswith(".ready")]
    return sorted(names, key=lambda n: (not n.endswith(".history"), n))


@dataclass(frozen=True)
class PushAheadResult:
    own: PushResult
    pushed_ahead: int
    failed_ahead: int
    still_waiting: int


def push_with_push_ahead(
    path: str,
    *,
    storage: Storage,
    record: VaultRecord,
    options: CodecOptions,
    spool: Spool,
    parallel: int,
    max_batch: int = 64,
) -> PushAheadResult:
    spool.ensure_archive_dir()
    wal_dir = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    waiting = [n for n in ready_wal_files(wal_dir) if n != name]
    batch = [n for n in waiting if not spool.has_marker(n)][: max_batch - 1]
    # Several segments at once: one zstd thread each keeps both cores busy without oversubscribing.
    each = replace(options, threads=1) if parallel > 1 and batch else options

    def push_one(n: str) -> PushResult:
        result = push_wal_file(os.path.join(wal_dir, n), storage=storage, record=record, options=each)
        spool.mark_pushed(os.path.join(wal_dir, n))
        return result

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        own_future = pool.submit(push_wal_file, path, storage=storage, record=record, options=each)
        ahead = [(n, pool.submit(push_one, n)) for n in batch]
        own = own_future.result()  # raises: this call fails, PostgreSQL keeps the file and retries
        failed = 0
        for n, fut in ahead:
            exc = fut.exception()
            if exc is not None:
                failed += 1
                print(f"pgvault wal-push: could not push {n} ahead: {exc}", file=sys.stderr)
    spool.prune_markers(wal_dir)
    return PushAheadResult(own=own, pushed_ahead=len(batch) - failed, failed_ahead=failed,
                           still_waiting=max(0, len(waiting) - len(batch)))
