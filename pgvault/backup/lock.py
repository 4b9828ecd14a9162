"""One backup at a time per cluster: a write-once lock object in the vault, and a local flock.

The vault lock (``locks/backup.json``: label, host, pid, start time) is created
with a write-once put, so of two backups on different hosts exactly one wins.
A lock whose holder is provably dead — same host, and its process gone (or
another process now has its pid, or the host rebooted) — is stale: it is
removed, and the caller says so. A lock held from another host cannot be
proven dead and is never removed automatically.

The local flock makes the check-then-remove of a stale lock safe: two
processes on one host never get past it together.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import socket
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from pgvault import codec
from pgvault.backup.errors import BackupInProgressError
from pgvault.backup.layout import LOCK_KEY
from pgvault.errors import CorruptObjectError, ObjectExistsError, ObjectNotFoundError, PgvaultError
from pgvault.storage import Storage


@dataclass(frozen=True)
class LockHolder:
    label: str
    host: str
    pid: int
    started_at: str
    boot_id: str = ""
    pid_start: str = ""  # the process's start time in clock ticks since boot (/proc/<pid>/stat field 22)

    def describe(self) -> str:
        # Dumps (labels ending in D) and expire ("expire-…") hold the same lock: one heavy job per vault at a time.
        if self.label.startswith("expire-"):
            job = "expire"
        else:
            job = f"{'dump' if self.label.endswith('D') else 'backup'} {self.label}"
        return f"{job} (pid {self.pid} on {self.host}, started {self.started_at})"


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def boot_id() -> str:
    return _read_text("/proc/sys/kernel/random/boot_id").strip()


def process_start(pid: int) -> str:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat), or "" if unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    # the command name (field 2) may hold spaces and parentheses: split after its closing one
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def is_zombie(pid: int) -> bool:
    """A killed process its parent has not reaped yet: it holds nothing any more."""
    fields = _read_text(f"/proc/{pid}/stat").rpartition(")")[2].split()
    return bool(fields) and fields[0] in ("Z", "X")


def holder_is_dead(holder: LockHolder, *, host: str) -> bool:
    """True only when the holder provably no longer runs: on this host, and its process is gone."""
    if holder.host != host:
        return False
    if holder.boot_id and boot_id() and holder.boot_id != boot_id():
        return True  # the host rebooted since
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    if is_zombie(holder.pid):
        return True
    return bool(holder.pid_start) and process_start(holder.pid) not in ("", holder.pid_start)


def current_holder(label: str) -> LockHolder:
    pid = os.getpid()
    return LockHolder(label=label, host=socket.gethostname(), pid=pid,
                      started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      boot_id=boot_id(), pid_start=process_start(pid))


def read_holder(storage: Storage) -> LockHolder | None:
    try:
        with storage.open(LOCK_KEY) as f:
            data = json.loads(codec.decode_bytes(f.read(), name=LOCK_KEY))
        return LockHolder(**{k: data[k] for k in LockHolder.__dataclass_fields__ if k in data})
    except ObjectNotFoundError:
        return None
    except (ValueError, TypeError, CorruptObjectError):
        return LockHolder(label="(unreadable lock)", host="?", pid=0, started_at="?")


class BackupLock:
    """Held for the whole backup: ``acquire`` (returns notices to show) then ``release``."""

    def __init__(self, storage: Storage, *, label: str, lock_dir: str) -> None:
        self.storage = storage
        self.holder = current_holder(label)
        try:
            os.makedirs(lock_dir, exist_ok=True)
        except OSError as exc:
            raise PgvaultError(
                f"cannot create the local lock directory {lock_dir}: {exc.strerror}",
                hint="[archive] spool_dir must be writable by the user running pgvault (postgres)",
            ) from None
        # One local lock file per vault location: two vaults never block each other.
        name = hashlib.sha256(storage.description.encode()).hexdigest()[:16]
        self._path = os.path.join(lock_dir, f"backup-{name}.lock")
        self._fd: int | None = None
        self._held = False

    def acquire(self) -> list[str]:
        notices: list[str] = []
        self._flock()
        try:
            for _attempt in range(2):
                try:
                    # Through the object format (checksummed), never encrypted: it holds no secret.
                    body, _sha = codec.encode_bytes(json.dumps(asdict(self.holder), indent=2).encode(),
                                                    name=LOCK_KEY, compression="none", key=None)
                    self.storage.put(LOCK_KEY, io.BytesIO(body))
                    self._held = True
                    return notices
                except ObjectExistsError:
                    other = read_holder(self.storage)
                    if other is None:
                        continue  # released between our put and our read: try again
                    if not holder_is_dead(other, host=self.holder.host):
                        raise _in_progress(other) from None
                    self.storage.delete(LOCK_KEY)
                    notices.append(f"removed the stale lock of {other.describe()}: that process no longer runs")
            raise _in_progress(read_holder(self.storage))
        except BaseException:
            self._unflock()
            raise

    def release(self) -> None:
        try:
            if self._held:
                self.storage.delete(LOCK_KEY)
                self._held = False
        finally:
            self._unflock()

    def _flock(self) -> None:
        # Read-only is enough for flock, and lets another user open a file root created.
        self._fd = os.open(self._path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._unflock()
            raise _in_progress(read_holder(self.storage), local=self._path) from None

    def _unflock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _in_progress(holder: LockHolder | None, *, local: str | None = None) -> BackupInProgressError:
    running = holder.describe() if holder is not None else "another backup"
    where = f" on this host (it holds {local})" if local else ""
    return BackupInProgressError(
        f"another backup or dump of this cluster is running{where}: {running}; one at a time",
        hint=f"wait for it to finish; if its host is gone for good, delete the vault object {LOCK_KEY}",
    )
