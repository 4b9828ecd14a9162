"""The PostgreSQL side of a base backup: checks, and the WAL the backup needs.

The statements run in the backup's session (``pgsession``). pg_backup_stop is
called without waiting for archiving: PostgreSQL would wait forever if
archiving is broken; ``wait_for_wal`` waits instead, with a timeout and an
error that names the missing segment.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from pgvault import pg
from pgvault.backup.errors import BackupError, WalArchiveTimeoutError
from pgvault.catalog import find_archived
from pgvault.errors import ArchiveDivergenceError, PgvaultError
from pgvault.storage import Storage
from pgvault.wal import WalFileName, lsn_to_prev_segno, lsn_to_segno, parse_wal_file_name, segment_name

BACKUP_FROM = ("primary", "standby", "any")
MIN_VERSION = 12


@dataclass(frozen=True)
class NodeFacts:
    facts: pg.ServerFacts
    role: str  # "primary" | "standby"


def check_node(session: Any, *, data_dir: str, backup_from: str, system_identifier: int) -> NodeFacts:
    """Refuse a server this backup cannot be taken from, with one clear error per cause.

    ``session`` is a pgsession session (LocalSession or ChildSession).
    """
    if backup_from not in BACKUP_FROM:
        raise ValueError(f"backup_from must be one of {BACKUP_FROM}")
    facts = session.facts()
    where = session.describe()
    role = "standby" if facts.in_recovery else "primary"
    if facts.major_version < MIN_VERSION:
        raise BackupError(f"PostgreSQL {facts.major_version} at {where} is too old: backups need PostgreSQL {MIN_VERSION} or later")
    if backup_from != "any" and role != backup_from:
        raise BackupError(
            f'[backup] from = "{backup_from}", but the server at {where} is a {role}',
            hint=f'connect to a {backup_from}, or set [backup] from = "{role}" or "any"',
        )
    if facts.system_identifier != system_identifier:
        raise BackupError(
            f"the server at {where} has system identifier {facts.system_identifier}, "
            f"but this vault belongs to {system_identifier}",
            hint="point [postgres] conninfo at the cluster this vault protects",
        )
    control = pg.read_control_file(data_dir)
    if control.system_identifier != facts.system_identifier:
        raise BackupError(
            f"[postgres] data_dir {data_dir} holds the cluster with system identifier {control.system_identifier}, "
            f"but the server at {where} has {facts.system_identifier}",
            hint="set [postgres] data_dir to the data directory of the server [postgres] conninfo reaches",
        )
    _check_same_server(session, data_dir, facts, where)
    if facts.wal_level not in ("replica", "logical"):
        raise BackupError(f"wal_level is {facts.wal_level!r} on the server at {where}: a base backup needs WAL",
                          hint="set wal_level = replica and restart PostgreSQL")
    if role == "primary" and facts.archive_mode not in ("on", "always"):
        raise BackupError(
            f"archive_mode is {facts.archive_mode!r} on the server at {where}: without archived WAL "
            "the backup could never be made consistent",
            hint="set archive_mode = on and archive_command = 'pgvault wal-push %p' (see `pgvault check`), "
            "then restart PostgreSQL",
        )
    return NodeFacts(facts, role)


def _check_same_server(session: Any, data_dir: str, facts: pg.ServerFacts, where: str) -> None:
    """The server we talk to must run on ``data_dir``: its postmaster.pid says so.

    A primary and its standby share a system identifier, so that check alone
    cannot tell their data directories apart. postmaster.pid holds the data
    directory and port as the running server sees them (also inside a
    container), so they are compared with what the server reports.
    """
    path = os.path.join(data_dir, "postmaster.pid")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise BackupError(f"no PostgreSQL server runs on [postgres] data_dir {data_dir} (no postmaster.pid), "
                          f"but the server at {where} does",
                          hint="set [postgres] data_dir to the data directory of the server [postgres] conninfo reaches") from None
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}",
                          hint="run the backup as the user that owns the data directory (postgres)") from None
    port = session.port()
    if len(lines) < 4 or lines[1] != facts.data_directory or lines[3].strip() != port:
        running = f"{lines[1]} on port {lines[3].strip()}" if len(lines) >= 4 else "an unreadable postmaster.pid"
        raise BackupError(
            f"[postgres] data_dir {data_dir} is the data directory of the server of {running}, "
            f"but the server at {where} runs on {facts.data_directory} (port {port})",
            hint="set [postgres] data_dir to the data directory of the server [postgres] conninfo reaches",
        )


_LABEL_LINE = re.compile(r"^([A-Z ]+): (.*)$")


def parse_backup_label(text: str) -> dict[str, str]:
    """The ``KEY: value`` lines of a backup_label, e.g. ``{"START TIMELINE": "1", ...}``."""
    out = {}
    for line in text.splitlines():
        m = _LABEL_LINE.match(line)
        if m:
            out[m[1]] = m[2]
    return out


def label_timeline(text: str) -> int:
    fields = parse_backup_label(text)
    try:
        return int(fields["START TIMELINE"])
    except (KeyError, ValueError):
        raise BackupError("the backup_label PostgreSQL returned has no START TIMELINE line") from None


def parse_tablespace_map(text: str | None) -> list[tuple[int, str]]:
    """(oid, location) per line of a tablespace_map (``<oid> <path>``; the path may hold spaces)."""
    out = []
    for line in (text or "").splitlines():
        if line.strip():
            oid, _, location = line.partition(" ")
            out.append((int(oid), location))
    return out


def wal_segments(*, timeline: int, start_lsn: int, stop_lsn: int, segment_size: int) -> list[str]:
    """The segments holding the WAL from ``start_lsn`` up to ``stop_lsn``: what the backup needs."""
    first = lsn_to_segno(start_lsn, segment_size=segment_size)
    last = max(first, lsn_to_prev_segno(stop_lsn, segment_size=segment_size))
    return [segment_name(timeline, n, segment_size=segment_size) for n in range(first, last + 1)]


def wait_for_wal(storage: Storage, segments: list[str], *, segment_size: int, timeout: float,
                 hint: Callable[[str], str | None] = lambda name: None, max_poll: float = 1.0,
                 on_wait: Callable[[str], bool] | None = None) -> None:
    """Return once every segment is archived in the vault; WalArchiveTimeoutError after ``timeout`` s.

    Polls every 10 ms for the first second (the stop segment usually arrives
    75-100 ms after pg_backup_stop, and every poll interval adds to each backup's
    time), then less and less: each poll of an S3 vault is a LIST request.
    ``on_wait(name)`` runs before each pause; when it returns True (it archived
    ``name`` itself) the vault is looked at again at once.
    """
    started = time.monotonic()
    deadline = started + timeout
    poll = 0.05
    for name in segments:
        while not find_archived(storage, name, segment_size=segment_size):
            if time.monotonic() >= deadline:
                raise WalArchiveTimeoutError(
                    f"WAL segment {name}, needed to make the backup consistent, did not reach the vault "
                    f"{storage.description} within {timeout:g} s; the backup was not committed",
                    hint=hint(name),
                )
            if on_wait is not None and on_wait(name):
                continue
            if time.monotonic() - started < 1.0:
                time.sleep(0.01)
                continue
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
            poll = min(max_poll, poll * 1.5)


def archiver_has_reached(status: pg.ArchiverStatus, segment: WalFileName, *, segment_size: int) -> bool:
    """Whether PostgreSQL's archiver is not failing and has archived every segment before ``segment``.

    pg_stat_archiver's last archived file (a segment, or a segment's .backup
    file) must be on ``segment``'s timeline and not before the one preceding it.
    A .history or .partial file as the last one proves nothing here.
    """
    if status.failing or not status.last_archived_wal or segment.segno is None:
        return False
    try:
        last = parse_wal_file_name(status.last_archived_wal, segment_size=segment_size)
    except ValueError:
        return False
    return (last.kind in ("segment", "backup") and last.timeline == segment.timeline
            and last.segno is not None and last.segno >= segment.segno - 1)


def archiver_proven(session: Any, storage: Storage, segment: str, *, segment_size: int) -> bool:
    """Whether archive_command demonstrably archives into ``storage``, up to the segment before ``segment``.

    That segment must be in this vault (an archive_command storing elsewhere
    proves nothing), and PostgreSQL's archiver must not be failing and must
    have archived it (or a later one): the vault alone could hold it from an
    earlier backup's own push. The vault is looked at first: while the
    archiver is still busy with that segment, no query is sent.
    """
    wanted = parse_wal_file_name(segment, segment_size=segment_size)
    if not wanted.segno:
        return False
    before = segment_name(wanted.timeline, wanted.segno - 1, segment_size=segment_size)
    if not find_archived(storage, before, segment_size=segment_size):
        return False
    status = session.archiver_status()
    return status is not None and archiver_has_reached(status, wanted, segment_size=segment_size)


class StopSegmentPush:
    """The backup's own push of its last segment from pg_wal, as archive_command would do it.

    A backup from a primary ends with a WAL switch, so its last segment is
    complete once pg_backup_stop returns, and archive_command runs for it next.
    Pushing it here spares the backup that run's start-up (~40 ms measured of
    a 0.3 s incremental); the archiver's own push then finds it archived, with
    the same key. Only done once ``archiver_proven``: a broken archive_command
    still fails the backup with the WAL wait's error. If the push fails (the
    file is gone or changed: recycled after the archiver's push; the vault
    refused it) the archiver's push is awaited as usual. Two different copies
    of the segment are a split brain, reported as archive_command would.

    With ``spool`` (archive_command's Spool), the segment is claimed from the
    start (see spool): the archiver's call for it, started at the same moment,
    waits for this push and answers from the marker it leaves, instead of
    compressing the segment a second time. The claim ends at the first attempt,
    pushed or not, and at ``release`` in any case.
    """

    def __init__(self, session: Any, storage: Storage, *, record, options, data_dir: str, segment: str | None,
                 spool=None) -> None:
        self.session, self.storage, self.record, self.options = session, storage, record, options
        self.data_dir = data_dir
        self.segment = segment  # None: nothing to push (from a standby, the primary archives)
        self.spool = spool
        self._claim = spool.claim_push(segment) if spool is not None and segment is not None else None

    def attempt(self, name: str) -> bool:
        """Whether ``name`` was pushed here now (the WAL wait then looks at the vault again at once)."""
        if name != self.segment:
            return False
        try:
            if not archiver_proven(self.session, self.storage, name, segment_size=self.record.wal_segment_size):
                return False
            self.segment = None  # once: if it fails, the archiver's push is awaited
            return self._push(os.path.join(self.data_dir, "pg_wal", name), marker=self._claim is not None)
        finally:
            self.release()  # not proven at once: the archiver pushes it, unhindered

    def release(self) -> None:
        if self._claim is not None:
            self.spool.release_claim(self._claim)
            self._claim = None

    def _push(self, path: str, *, marker: bool) -> bool:
        from pgvault.archive import push_wal_file

        try:
            push_wal_file(path, storage=self.storage, record=self.record, options=self.options)
        except ArchiveDivergenceError:
            raise
        except (PgvaultError, OSError):
            return False
        if marker:
            _leave_marker(self.spool, path)
        return True


def _leave_marker(spool, path: str) -> None:
    """Best effort: mark ``path`` pushed while PostgreSQL still waits to archive it.

    A marker nobody consumes (the archiver's call came before the claim and
    pushed the file itself) would stay, since a synchronous archive_command
    prunes none: the next backup's push drops it.
    """
    try:
        spool.prune_markers(os.path.dirname(path))
        spool.mark_pushed_if_waiting(path)
    except OSError:
        pass


def archiver_hint(session: Any, role: str, name: str) -> str:
    """What to look at when ``name`` does not arrive, from pg_stat_archiver when we can."""
    if role == "standby":
        return (f"the primary archives the WAL of a backup taken on a standby: check its archive_command, "
                f"and that it has completed {name} (SELECT pg_switch_wal() on the primary, or set archive_timeout)")
    status = session.archiver_status()
    if status is not None and status.failing:
        return (f"archiving fails on the server (last failure: {status.last_failed_wal} at "
                f"{status.last_failed_time}); check archive_command and the server log, and `pgvault check`")
    return "check archive_command (it must be pgvault wal-push into this vault) and `pgvault check`"

