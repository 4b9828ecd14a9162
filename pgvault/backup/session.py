"""The PostgreSQL side of a base backup: checks, the non-exclusive backup API, and the WAL wait.

A non-exclusive backup lives in one session: the connection opened for
pg_backup_start must stay open until pg_backup_stop (closing it aborts the
backup on the server, which is what we want when pgvault dies). pg_backup_stop
is called without waiting for archiving: PostgreSQL would wait forever if
archiving is broken; ``wait_for_wal`` waits instead, with a timeout and an
error that names the missing segment.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from pgvault import pg
from pgvault.backup.errors import BackupError, WalArchiveTimeoutError
from pgvault.catalog import find_archived
from pgvault.errors import PostgresError
from pgvault.storage import Storage
from pgvault.wal import lsn_to_prev_segno, lsn_to_segno, parse_lsn, segment_name

BACKUP_FROM = ("primary", "standby", "any")
MIN_VERSION = 12


@dataclass(frozen=True)
class NodeFacts:
    facts: pg.ServerFacts
    role: str  # "primary" | "standby"


def check_node(conn: Any, *, conninfo: str, data_dir: str, backup_from: str, system_identifier: int) -> NodeFacts:
    """Refuse a server this backup cannot be taken from, with one clear error per cause."""
    if backup_from not in BACKUP_FROM:
        raise ValueError(f"backup_from must be one of {BACKUP_FROM}")
    facts = pg.server_facts(conn)
    where = pg.describe_conninfo(conninfo)
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
    _check_same_server(conn, data_dir, facts, where)
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


def _check_same_server(conn: Any, data_dir: str, facts: pg.ServerFacts, where: str) -> None:
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
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('port')")
        port = str(cur.fetchone()[0])
    if len(lines) < 4 or lines[1] != facts.data_directory or lines[3].strip() != port:
        running = f"{lines[1]} on port {lines[3].strip()}" if len(lines) >= 4 else "an unreadable postmaster.pid"
        raise BackupError(
            f"[postgres] data_dir {data_dir} is the data directory of the server of {running}, "
            f"but the server at {where} runs on {facts.data_directory} (port {port})",
            hint="set [postgres] data_dir to the data directory of the server [postgres] conninfo reaches",
        )


@dataclass(frozen=True)
class StopResult:
    stop_lsn: int
    stop_time: datetime
    backup_label: str
    tablespace_map: str | None


class BackupSession:
    """pg_backup_start / pg_backup_stop (pg_start_backup / pg_stop_backup before 15) on one connection."""

    def __init__(self, conn: Any, facts: pg.ServerFacts) -> None:
        self.conn = conn
        self.version = facts.major_version
        with conn.cursor() as cur:
            # The session sits idle while files are copied: no timeout may end it.
            cur.execute("SET statement_timeout = 0")
            if self.version >= 14:
                cur.execute("SET idle_session_timeout = 0")

    def start(self, label: str) -> tuple[int, datetime]:
        """Start the backup with an immediate checkpoint: (start LSN, server time)."""
        sql = ("SELECT pg_backup_start(%s, true)::text, clock_timestamp()" if self.version >= 15
               else "SELECT pg_start_backup(%s, true, false)::text, clock_timestamp()")
        row = self._one(sql, (label,))
        return parse_lsn(row[0]), _utc(row[1])

    def stop(self) -> StopResult:
        sql = ("SELECT lsn::text, labelfile, spcmapfile, clock_timestamp() FROM pg_backup_stop(false)"
               if self.version >= 15 else
               "SELECT lsn::text, labelfile, spcmapfile, clock_timestamp() FROM pg_stop_backup(false, false)")
        row = self._one(sql, None)
        return StopResult(parse_lsn(row[0]), _utc(row[3]), row[1], row[2] or None)

    def _one(self, sql: str, params) -> tuple:
        import psycopg

        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchone()
        except psycopg.Error as exc:
            raise PostgresError(f"PostgreSQL refused the backup: {' '.join(str(exc).split())}") from None


def _utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


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
                 on_wait: Callable[[str], None] | None = None) -> None:
    """Return once every segment is archived in the vault; WalArchiveTimeoutError after ``timeout`` s.

    Polls every 10 ms for the first second (the stop segment usually arrives
    75-100 ms after pg_backup_stop, and every poll interval adds to each backup's
    time), then less and less: each poll of an S3 vault is a LIST request.
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
            if on_wait is not None:
                on_wait(name)
            if time.monotonic() - started < 1.0:
                time.sleep(0.01)
                continue
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
            poll = min(max_poll, poll * 1.5)


def archiver_hint(conn: Any, role: str, name: str) -> str:
    """What to look at when ``name`` does not arrive, from pg_stat_archiver when we can."""
    if role == "standby":
        return (f"the primary archives the WAL of a backup taken on a standby: check its archive_command, "
                f"and that it has completed {name} (SELECT pg_switch_wal() on the primary, or set archive_timeout)")
    import psycopg

    try:
        status = pg.archiver_status(conn)
    except psycopg.Error:
        status = None
    if status is not None and status.failing:
        return (f"archiving fails on the server (last failure: {status.last_failed_wal} at "
                f"{status.last_failed_time}); check archive_command and the server log, and `pgvault check`")
    return "check archive_command (it must be pgvault wal-push into this vault) and `pgvault check`"

