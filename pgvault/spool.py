"""The local spool: markers of WAL pushed ahead, and WAL fetched ahead.

Imported by the archive_command fast path, so it uses only the standard
library's lightest modules. Layout, per cluster:

    <spool_dir>/<cluster>/archive/<walname>.done   "size mtime_ns" of the pushed file
    <spool_dir>/<cluster>/archive/.claim           flocked while a backup pushes its last segment, naming it
    <spool_dir>/<cluster>/restore/<walname>        a verified, decoded prefetched file

The claim: a backup from a primary pushes its last segment itself once
pg_backup_stop returns, and PostgreSQL's archive_command is started for the same
segment at the same moment. The call that finds the claim naming its file waits
for the backup's push and answers from the backup's marker, instead of hashing
and compressing the segment a second time beside the backup (~20 ms of CPU at
the backup's busiest moment, measured).
"""

from __future__ import annotations

import os

from pgvault.errors import PgvaultError

CLAIM = ".claim"
#: How long archive_command waits for a backup's push of its file before pushing it itself.
CLAIM_WAIT = 30.0


class Spool:
    def __init__(self, spool_dir: str, cluster: str) -> None:
        self.root = os.path.join(spool_dir, cluster)
        self.archive_dir = os.path.join(self.root, "archive")
        self.restore_dir = os.path.join(self.root, "restore")

    # --- push-ahead markers ---------------------------------------------------

    def marker_path(self, name: str) -> str:
        return os.path.join(self.archive_dir, name + ".done")

    @staticmethod
    def _fingerprint(st: os.stat_result) -> str:
        return f"{st.st_size} {st.st_mtime_ns}"

    def ensure_archive_dir(self) -> None:
        try:
            os.makedirs(self.archive_dir, exist_ok=True)
        except OSError as exc:
            raise PgvaultError(
                f"cannot create the spool directory {self.archive_dir}: {exc.strerror}",
                hint="[archive] spool_dir must be writable by the postgres user",
            ) from None

    def mark_pushed(self, path: str) -> None:
        """Record that the file at ``path`` (as it is now) is durably in the vault."""
        marker = self.marker_path(os.path.basename(path))
        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            f.write(self._fingerprint(os.stat(path)))
        os.replace(tmp, marker)

    def mark_pushed_if_waiting(self, path: str) -> None:
        """``mark_pushed``, if PostgreSQL still waits to archive the file (a `.ready` beside it in pg_wal).

        A marker its call would never consume stays otherwise: should PostgreSQL's own
        call archive it meanwhile, the marker is dropped again.
        """
        ready = os.path.join(os.path.dirname(path), "archive_status", os.path.basename(path) + ".ready")
        if os.path.exists(ready):
            self.mark_pushed(path)
            if not os.path.exists(ready):
                self.drop_marker(os.path.basename(path))

    def consume_marker(self, path: str) -> bool:
        """True (and the marker is removed) if ``path`` was pushed ahead and has not changed since."""
        marker = self.marker_path(os.path.basename(path))
        try:
            with open(marker) as f:
                recorded = f.read()
            current = self._fingerprint(os.stat(path))
        except OSError:
            return False
        if recorded != current:
            return False  # a stale marker (e.g. a restored node reusing the name): check the vault instead
        self.drop_marker(os.path.basename(path))
        return True

    def drop_marker(self, name: str) -> None:
        try:
            os.unlink(self.marker_path(name))
        except OSError:
            pass

    def has_marker(self, name: str) -> bool:
        return os.path.exists(self.marker_path(name))

    def pushed_meanwhile(self, path: str) -> bool:
        """True if another pgvault process pushed the file at ``path``, now or after waiting for its claim."""
        if self.consume_marker(path):
            return True
        return self.await_claimed_push(os.path.basename(path)) and self.consume_marker(path)

    def claim_push(self, name: str) -> int | None:
        """Claim the push of ``name`` (see the module docstring): a descriptor holding it, or None if that failed.

        Best effort: without a claim, archive_command pushes the file as well, which is only slower.
        """
        import fcntl

        try:
            os.makedirs(self.archive_dir, exist_ok=True)
            fd = os.open(os.path.join(self.archive_dir, CLAIM), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, name.encode(), 0)
        except OSError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def release_claim(fd: int) -> None:
        """End a claim (after the pushed file's marker is written: a waiting call looks for it then)."""
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # releases the flock

    def await_claimed_push(self, name: str, timeout: float = CLAIM_WAIT) -> bool:
        """If a claim on ``name`` is held, wait (up to ``timeout`` s) until it ends: whether it ended in time."""
        import fcntl
        import time

        try:
            fd = os.open(os.path.join(self.archive_dir, CLAIM), os.O_RDONLY)
        except OSError:
            return False
        try:
            if _lock_shared(fd, fcntl) or os.pread(fd, 256, 0) != name.encode():
                return False  # no claim, or one on another file
            deadline = time.monotonic() + timeout
            while not _lock_shared(fd, fcntl):
                if time.monotonic() > deadline:
                    return False  # the backup's push is stuck: archive the file the usual way
                time.sleep(0.002)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def prune_markers(self, wal_dir: str) -> None:
        """Drop markers of files PostgreSQL no longer waits to archive (no `.ready` left)."""
        try:
            names = os.listdir(self.archive_dir)
        except OSError:
            return
        status = os.path.join(wal_dir, "archive_status")
        for marker in names:
            if marker.endswith(".done") and not os.path.exists(os.path.join(status, marker[:-5] + ".ready")):
                self.drop_marker(marker[:-5])


def _lock_shared(fd: int, fcntl) -> bool:
    """Whether a shared lock on ``fd`` was had at once (no claim is held); it is released with ``fd``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
