"""Talking to PostgreSQL: connections, server facts, and the control file on disk.

psycopg is imported inside functions: the archive_command fast path imports
this module's callers without needing a connection.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

from pgvault.errors import PgvaultError, PostgresError


@dataclass(frozen=True)
class ServerFacts:
    """What pgvault needs to know about a running server."""

    system_identifier: int
    version_num: int  # e.g. 150018
    data_directory: str
    wal_level: str
    archive_mode: str
    archive_command: str
    in_recovery: bool
    timeline: int
    wal_segment_size: int

    @property
    def major_version(self) -> int:
        return self.version_num // 10000


def connect(conninfo: str, *, autocommit: bool = True, connect_timeout: int = 10) -> Any:
    """A psycopg connection; libpq's environment (PGHOST, PGPORT, …) fills what conninfo leaves out."""
    import psycopg

    try:
        return psycopg.connect(conninfo, autocommit=autocommit, connect_timeout=connect_timeout, application_name="pgvault")
    except psycopg.OperationalError as exc:
        detail = " ".join(str(exc).split())
        raise PostgresError(
            f"cannot connect to PostgreSQL ({describe_conninfo(conninfo)}): {detail}",
            hint="set [postgres] conninfo (or PGHOST/PGPORT/PGUSER) to reach the server pgvault protects",
        ) from None
    except psycopg.ProgrammingError as exc:
        raise PostgresError(f"invalid [postgres] conninfo: {exc}") from None


def connect_as(conninfo: str, user, *, as_root: bool) -> Any:
    """psycopg.connect as ``user`` (a pwd entry): as root, with that effective uid and gid while connecting,
    since peer authentication over a socket sees the effective user at connect time.
    psycopg's OperationalError passes through: callers tell a server still starting from a refusal."""
    import psycopg

    egid = os.getegid()
    if as_root:
        os.setegid(user.pw_gid)
        os.seteuid(user.pw_uid)
    try:
        return psycopg.connect(conninfo, autocommit=True)
    finally:
        if as_root:
            os.seteuid(0)
            os.setegid(egid)


def describe_conninfo(conninfo: str) -> str:
    """conninfo without the password, for messages."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        return "unparseable conninfo"
    params.pop("password", None)
    for env, key in (("PGHOST", "host"), ("PGPORT", "port"), ("PGUSER", "user")):
        if key not in params and os.environ.get(env):
            params[key] = os.environ[env]
    return " ".join(f"{k}={v}" for k, v in sorted(params.items())) or "libpq defaults"


def server_facts(conn: Any) -> ServerFacts:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT (SELECT system_identifier FROM pg_control_system()),
                   current_setting('server_version_num')::int,
                   current_setting('data_directory'),
                   current_setting('wal_level'),
                   current_setting('archive_mode'),
                   current_setting('archive_command'),
                   pg_is_in_recovery(),
                   (SELECT timeline_id FROM pg_control_checkpoint()),
                   (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')
            """
        )
        row = cur.fetchone()
    return ServerFacts(
        system_identifier=int(row[0]),
        version_num=row[1],
        data_directory=row[2],
        wal_level=row[3],
        archive_mode=row[4],
        archive_command=row[5],
        in_recovery=row[6],
        timeline=int(row[7]),
        wal_segment_size=int(row[8]),
    )


@dataclass(frozen=True)
class ControlFileFacts:
    system_identifier: int
    major_version: int
    wal_segment_size: int


def read_control_file(data_dir: str) -> ControlFileFacts:
    """System identifier, major version and WAL segment size from a data directory, without a server.

    pg_control starts with the 64-bit system identifier in native byte order
    (ControlFileData.system_identifier); PG_VERSION holds the major version; the
    segment size is read from the long header of any segment in pg_wal (each
    begins with one), falling back to the 16 MiB default.
    """
    try:
        with open(os.path.join(data_dir, "global", "pg_control"), "rb") as f:
            (sysid,) = struct.unpack("=Q", f.read(8))
        with open(os.path.join(data_dir, "PG_VERSION")) as f:
            major = int(f.read().strip().split(".")[0])
    except FileNotFoundError:
        raise PostgresError(
            f"{data_dir} is not a PostgreSQL data directory (no global/pg_control or PG_VERSION)",
            hint="set [postgres] data_dir to the cluster's data directory",
        ) from None
    except PermissionError:
        raise PostgresError(f"cannot read the control file in {data_dir}: permission denied") from None
    except (struct.error, ValueError):
        raise PostgresError(f"the control file in {data_dir} is unreadable or truncated") from None
    return ControlFileFacts(system_identifier=sysid, major_version=major,
                            wal_segment_size=_segment_size_from_pg_wal(data_dir))


def _segment_size_from_pg_wal(data_dir: str) -> int:
    from pgvault.wal import DEFAULT_SEGMENT_SIZE, read_long_page_header

    wal_dir = os.path.join(data_dir, "pg_wal")
    try:
        names = sorted(n for n in os.listdir(wal_dir) if len(n) == 24)
        for name in names[:1]:
            with open(os.path.join(wal_dir, name), "rb") as f:
                return read_long_page_header(f.read(64)).segment_size
    except (OSError, PgvaultError):
        pass
    return DEFAULT_SEGMENT_SIZE


@dataclass(frozen=True)
class ArchiverStatus:
    """pg_stat_archiver plus the segment being written now (None on a standby)."""

    archived_count: int
    last_archived_wal: str | None
    last_archived_time: Any
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: Any
    current_wal: str | None

    @property
    def failing(self) -> bool:
        return self.last_failed_time is not None and (
            self.last_archived_time is None or self.last_failed_time > self.last_archived_time)


def archiver_status(conn: Any) -> ArchiverStatus:
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT archived_count, last_archived_wal, last_archived_time,
                   failed_count, last_failed_wal, last_failed_time,
                   CASE WHEN pg_is_in_recovery() THEN NULL
                        ELSE pg_walfile_name(pg_current_wal_lsn()) END
            FROM pg_stat_archiver
            """
        )
        return ArchiverStatus(*cur.fetchone())


def pg_program_candidates(name: str, *, bin_dir: str | None, major: int | None = None) -> list[str]:
    """Executable paths where PostgreSQL program ``name`` may be, best first.

    With ``bin_dir`` only that directory counts (the user chose it). Otherwise:
    ``pg_config --bindir``, Debian's ``/usr/lib/postgresql/<major>/bin`` when the
    major version is known, then PATH.
    """
    import shutil
    import subprocess

    if bin_dir:
        paths = [os.path.join(bin_dir, name)]
    else:
        paths = []
        pg_config = shutil.which("pg_config")
        if pg_config:
            try:
                out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True)
                paths.append(os.path.join(out.stdout.strip(), name))
            except (OSError, subprocess.SubprocessError):
                pass
        if major is not None:
            paths.append(f"/usr/lib/postgresql/{major}/bin/{name}")
        found = shutil.which(name)
        if found:
            paths.append(found)
    unique = list(dict.fromkeys(paths))
    return [p for p in unique if os.path.isfile(p) and os.access(p, os.X_OK)]


def find_program(name: str, *, bin_dir: str | None, major: int) -> str | None:
    """The first of pg_program_candidates that belongs to PostgreSQL ``major``, or None."""
    for path in pg_program_candidates(name, bin_dir=bin_dir, major=major):
        if program_major(path) == major:
            return path
    return None


def program_major(path: str) -> int | None:
    """The PostgreSQL major version a program says it belongs to (``--version``), or None."""
    import re
    import subprocess

    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out.stdout)
    return int(m[1]) if m else None
