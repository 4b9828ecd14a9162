"""Prefetch for restore_command: fetch the next segments while recovery replays.

When wal-fetch is asked for segment N, it serves N from the spool if a
prefetch already brought it (one rename), else fetches it directly, and starts
a detached `pgvault wal-prefetch N` worker (unless one runs) that fetches the
segments after N in parallel into the spool. Prefetched files are decoded and
verified before they are renamed into the spool, so the spool holds only
complete, checked files. A spool that cannot be used never fails a fetch.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from pgvault.archive import write_verified
from pgvault.catalog import ArchivedWal, parse_wal_key, wal_dir
from pgvault.spool import Spool
from pgvault.storage import Storage
from pgvault.vault import VaultRecord
from pgvault.wal import parse_wal_file_name, segment_name


def take_prefetched(spool: Spool, name: str, dest: str) -> bool:
    """Move a prefetched ``name`` to ``dest``; False if the spool does not have it."""
    src = os.path.join(spool.restore_dir, name)
    if not os.path.exists(src):
        return False
    try:
        os.replace(src, dest)
    except OSError:
        try:  # the spool is on another file system than pg_wal
            tmp = dest + ".pgvault.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
            os.unlink(src)
        except OSError:
            return False
    return True


def start_prefetch_worker(name: str, *, config_path: str | None, count: int) -> None:
    """Start `pgvault wal-prefetch NAME` detached; it exits by itself when done."""
    cmd = [sys.executable, "-m", "pgvault.entry"]
    if config_path:
        cmd += ["--config", config_path]
    cmd += ["wal-prefetch", name, "--count", str(count)]
    try:
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError:
        pass  # prefetch is an optimisation; the fetch itself already succeeded


def next_segment_names(name: str, *, count: int, segment_size: int) -> list[str]:
    f = parse_wal_file_name(name, segment_size=segment_size)
    if f.kind != "segment":
        return []
    return [segment_name(f.timeline, f.segno + i, segment_size=segment_size) for i in range(1, count + 1)]


def run_prefetch(name: str, *, storage: Storage, record: VaultRecord, keyring, spool: Spool,
                 count: int, parallel: int) -> int:
    """Fetch up to ``count`` segments after ``name`` into the spool; returns how many were fetched."""
    os.makedirs(spool.restore_dir, exist_ok=True)
    lock = open(os.path.join(spool.restore_dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another prefetch is running; it will serve these
    try:
        wanted = next_segment_names(name, count=count, segment_size=record.wal_segment_size)
        _drop_older(spool, name)
        todo = [n for n in wanted if not os.path.exists(os.path.join(spool.restore_dir, n))]
        entries = _archived_by_name(storage, todo, segment_size=record.wal_segment_size)
        todo = [entries[n] for n in todo if n in entries]
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
            results = list(pool.map(
                lambda e: _fetch_quietly(storage, e, os.path.join(spool.restore_dir, e.name), keyring,
                                         record.encryption_key_id is not None), todo))
        return sum(results)
    finally:
        lock.close()


def _archived_by_name(storage: Storage, names: list[str], *, segment_size: int) -> dict[str, ArchivedWal]:
    found: dict[str, list[ArchivedWal]] = {}
    for prefix in sorted({wal_dir(n) for n in names}):
        for info in storage.list(prefix):
            entry = parse_wal_key(info.key, segment_size=segment_size)
            if entry is not None and entry.name in names:
                found.setdefault(entry.name, []).append(entry)
    # A name with diverging copies is left to wal-fetch, which refuses it loudly.
    return {n: copies[0] for n, copies in found.items() if len({c.sha256 for c in copies}) == 1}


def _fetch_quietly(storage: Storage, entry: ArchivedWal, dest: str, keyring, require_encryption: bool) -> bool:
    try:
        write_verified(storage, entry, dest, keyring=keyring, require_encryption=require_encryption)
        return True
    except Exception:
        return False  # wal-fetch will fetch it directly and report any error properly


def _drop_older(spool: Spool, name: str) -> None:
    """Prefetched files at or before ``name`` on its timeline will not be asked for again."""
    try:
        for n in os.listdir(spool.restore_dir):
            if len(n) == 24 and n[:8] == name[:8] and n <= name:
                os.unlink(os.path.join(spool.restore_dir, n))
    except OSError:
        pass
