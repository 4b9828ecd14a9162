"""The local spool: markers of WAL pushed ahead, and WAL fetched ahead.

Imported by the archive_command fast path, so it uses only the standard
library's lightest modules. Layout, per cluster:

    <spool_dir>/<cluster>/archive/<walname>.done   "size mtime_ns" of the pushed file
    <spool_dir>/<cluster>/restore/<walname>        a verified, decoded prefetched file
"""

from __future__ import annotations

import os

from pgvault.errors import PgvaultError


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
