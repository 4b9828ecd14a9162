"""Carry out a restore :class:`~pgvault.planner.Plan`: data directory, recovery settings, and optionally prove it.

:func:`restore` does, in order, and stops at the first problem:

1. **Refuse** what must never be written into: a data directory a server is
   running on (``postmaster.pid`` naming a live postgres process, or a server
   answering on the socket it names), a non-empty directory unless ``delta``,
   a delta over another cluster's directory (a different system identifier),
   a tablespace location that holds something that is not this directory's.
   Nothing on disk has changed when these fail.
2. **Materialize** the plan's backup (incremental chains are reassembled by
   the materializer): every file fetched and verified, in parallel; with
   ``delta`` only the blocks that differ (see :mod:`pgvault.backup.materialize`).
3. **Recovery settings**: remove ``standby.signal``, any earlier pgvault block
   and stale ``recovery_target*`` lines from ``postgresql.auto.conf``, append a
   pgvault block (``restore_command`` calling this pgvault with the same config
   file, the plan's targets pinned to its timeline, ``recovery_target_action``,
   and ``port`` / ``archive_mode = off`` when asked), create ``recovery.signal``.
   The restored configuration is read (``postgresql.conf`` with its includes,
   then ``postgresql.auto.conf``) for what would surprise: archiving through
   pgvault into the vault once the node promotes, a recovery target or
   ``recovery_min_apply_delay`` set elsewhere (neutralised in the block).
4. **Ownership**: as root, everything is given to the owner of the data
   directory's parent (or ``postgres`` when root owns the parent).
5. **Start** (``start``): ``pg_ctl start`` as that owner, with the sockets in the
   parent directory and the log in ``<parent>/restore-<label>.log``; wait until
   recovery ends (promoted) or pauses at the target (``pause``), watching the
   log for a FATAL exit, and report the point reached: last replayed
   transaction time, LSN, timeline. A server that stops before the target (PG
   13+: "recovery ended before configured recovery target was reached") is a
   :class:`RecoveryError`.

No configuration is read here: every value comes in as an argument.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from pgvault import pg
from pgvault.backup.errors import BackupError
from pgvault.backup.manifest import Manifest
from pgvault.backup.materialize import (
    MaterializeProgress,
    MaterializeResult,
    check_tablespace_locations,
    materialize_backup,
    tablespace_locations,
)
from pgvault.errors import PgvaultError, RecoveryError, RestoreError  # noqa: F401 (re-exported)
from pgvault.planner import Plan
from pgvault.storage import Storage
from pgvault.targets import conf_quote, format_time
from pgvault.wal import format_lsn, parse_lsn

DEFAULT_OWNER = "postgres"
BLOCK_BEGIN = "# pgvault restore: begin"
BLOCK_END = "# pgvault restore: end"
#: recovery target settings PostgreSQL allows one of; any not in the plan is reset in the block if set elsewhere
TARGET_SETTINGS = ("recovery_target", "recovery_target_lsn", "recovery_target_name", "recovery_target_time",
                   "recovery_target_xid")
UNIX_SOCKET_PATH_MAX = 107
POLL_SECONDS = 0.25


# --- results ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReachedPoint:
    """Where the restored server's recovery ended (``promoted``) or waits (``paused``)."""

    state: str  # "promoted" | "paused"
    timeline: int
    lsn: int | None  # promoted: pg_current_wal_lsn() just after; paused: the replay LSN
    replay_lsn: int | None  # the end of the last WAL record replayed
    last_transaction_time: datetime | None  # pg_last_xact_replay_timestamp(): the last commit or abort replayed
    last_commit_xid: int | None = None  # pg_last_committed_xact(), with track_commit_timestamp
    last_commit_time: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "timeline": self.timeline,
            "lsn": format_lsn(self.lsn) if self.lsn is not None else None,
            "replay_lsn": format_lsn(self.replay_lsn) if self.replay_lsn is not None else None,
            "last_transaction_time": _time(self.last_transaction_time),
            "last_commit_xid": self.last_commit_xid,
            "last_commit_time": _time(self.last_commit_time),
        }


@dataclass(frozen=True)
class ServerInfo:
    """How to reach the server a restore started."""

    pid: int
    port: int
    socket_dir: str
    log_file: str
    owner: str


@dataclass(frozen=True)
class RestoreResult:
    plan: Plan
    data_dir: str
    materialized: MaterializeResult
    recovery_settings: dict[str, str]  # what the pgvault block of postgresql.auto.conf sets, in order
    warnings: tuple[str, ...]
    seconds: float
    owner: str | None = None  # who the data directory was given to (as root)
    server: ServerInfo | None = None
    reached: ReachedPoint | None = None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        p, m, b = self.plan, self.materialized, self.plan.backup
        return {
            "plan": {
                "target": str(p.target),
                "timeline": p.timeline,
                "backup": b.label,
                "chain": list(b.chain),
                "backup_stop_lsn": format_lsn(b.stop_lsn),
                "backup_stop_time": format_time(b.stop_time),
                "wal_first": p.wal[0].name if p.wal else None,
                "wal_last": p.wal[-1].name if p.wal else None,
                "wal_segments": len(p.wal),
                "bytes_to_fetch": p.bytes_to_fetch,
            },
            "data_dir": self.data_dir,
            "delta": m.delta,
            "files": m.files,
            "files_fetched": m.files_fetched,
            "files_kept": m.files_kept,
            "entries_removed": m.entries_removed,
            "bytes": m.bytes_total,
            "bytes_fetched": m.bytes_written,
            "bytes_checked": m.bytes_checked,
            "objects_read": m.objects_read,
            "materialize_seconds": m.seconds,
            "seconds": self.seconds,
            "recovery_settings": self.recovery_settings,
            "owner": self.owner,
            "started": self.server is not None,
            "server": None if self.server is None else {
                "pid": self.server.pid, "port": self.server.port, "socket_dir": self.server.socket_dir,
                "log_file": self.server.log_file, "owner": self.server.owner},
            "reached": None if self.reached is None else self.reached.to_dict(),
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(timezone.utc).isoformat()


# --- the data directory ---------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _looks_like_postgres(pid: int) -> bool:
    """Whether live process ``pid`` may be a postmaster (True when /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return True
    return comm in ("postgres", "postmaster") or comm.startswith("postgres")


def running_server(data_dir: str) -> str | None:
    """Why a server seems to run on ``data_dir`` (None if none does): postmaster.pid's live pid or its socket."""
    pidfile = os.path.join(data_dir, "postmaster.pid")
    try:
        with open(pidfile) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{pidfile} exists but cannot be read ({exc.strerror})"
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        pid = 0
    if pid > 0 and pid_alive(pid) and _looks_like_postgres(pid):
        return f"{pidfile} names process {pid}, which is running"
    if len(lines) >= 5 and lines[3].strip().isdigit() and lines[4].strip():
        path = os.path.join(lines[4].strip(), f".s.PGSQL.{lines[3].strip()}")
        if len(path) <= UNIX_SOCKET_PATH_MAX and os.path.exists(path):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                try:
                    s.connect(path)
                    return f"a server answers on {path}, the socket {pidfile} names"
                except OSError:
                    pass
    return None


def _system_identifier(data_dir: str) -> int | None:
    import struct

    try:
        with open(os.path.join(data_dir, "global", "pg_control"), "rb") as f:
            return struct.unpack("=Q", f.read(8))[0]
    except (OSError, struct.error):
        return None


def check_destination(manifest: Manifest, data_dir: str, *, delta: bool,
                      tablespace_map: dict[int, str] | None = None) -> bool:
    """Refuse a destination restore must not write into; True when it holds something (a delta restore)."""
    if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
        raise RestoreError(f"{data_dir} exists and is not a directory")
    if os.path.isdir(data_dir):
        why = running_server(data_dir)
        if why:
            raise RestoreError(f"refusing to restore into {data_dir}: a PostgreSQL server is running there ({why})",
                               hint="stop that server first; never restore over a running cluster")
    non_empty = os.path.isdir(data_dir) and bool(os.listdir(data_dir))
    if non_empty and not delta:
        raise RestoreError(f"refusing to restore into {data_dir}: the directory is not empty",
                           hint="give an empty or absent directory, or pass --delta to rebuild it in place "
                                "(files that already match are kept; everything else in it is replaced or removed)")
    if non_empty:
        found = _system_identifier(data_dir)
        if found is not None and found != manifest.system_identifier:
            raise RestoreError(
                f"refusing a delta restore into {data_dir}: it holds the cluster with system identifier {found}, "
                f"but backup {manifest.label} is of {manifest.system_identifier}",
                hint="a delta restore rebuilds a node of the same cluster; give an empty directory for another")
    try:
        check_tablespace_locations(manifest, data_dir, relocate=tablespace_map, delta=delta)
    except BackupError as exc:
        raise RestoreError(exc.message, hint=exc.hint) from None
    return non_empty


# --- postgresql.conf ------------------------------------------------------------------


@dataclass(frozen=True)
class ConfSetting:
    value: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file} line {self.line}"


_CONF_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.$-]*)\s*(=\s*)?")


def _conf_value(text: str) -> str:
    """The value of a postgresql.conf line after ``name =``: a quoted string or a bare word."""
    text = text.lstrip()
    if not text.startswith("'"):
        return re.split(r"\s|#", text, maxsplit=1)[0]
    out, i = [], 1
    while i < len(text):
        ch = text[i]
        if ch == "'" and text[i + 1:i + 2] == "'":
            out.append("'")
            i += 2
        elif ch == "'":
            break
        elif ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def conf_line_name(line: str) -> str | None:
    """The setting a postgresql.conf line assigns (lower case), None for a comment or blank line."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    m = _CONF_NAME.match(line)
    return m[1].lower() if m else None


def read_conf(path: str, settings: dict[str, ConfSetting] | None = None, *, depth: int = 0) -> dict[str, ConfSetting]:
    """The settings of a postgresql.conf-style file and its includes, the last assignment winning."""
    settings = {} if settings is None else settings
    if depth > 10:
        return settings
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return settings
    base = os.path.dirname(path)
    for number, line in enumerate(lines, start=1):
        name = conf_line_name(line)
        m = _CONF_NAME.match(line)
        if name is None or m is None:
            continue
        value = _conf_value(line[m.end():])
        if name in ("include", "include_if_exists", "include_dir") and not m[2]:
            target = value if os.path.isabs(value) else os.path.join(base, value)
            if name == "include_dir":
                try:
                    names = sorted(n for n in os.listdir(target) if n.endswith(".conf") and not n.startswith("."))
                except OSError:
                    names = []
                for n in names:
                    read_conf(os.path.join(target, n), settings, depth=depth + 1)
            else:
                read_conf(target, settings, depth=depth + 1)
            continue
        settings[name] = ConfSetting(value, path, number)
    return settings


def effective_conf(data_dir: str) -> dict[str, ConfSetting]:
    """What the data directory's own configuration sets: postgresql.conf (and includes), then postgresql.auto.conf."""
    settings = read_conf(os.path.join(data_dir, "postgresql.conf"))
    return read_conf(os.path.join(data_dir, "postgresql.auto.conf"), settings)


def _is_on(value: str) -> bool:
    return value.strip().lower() in ("on", "always", "true", "yes", "1")


def _command_config(command: str) -> str | None:
    """The --config FILE of a pgvault command line, if it names one."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word == "--config" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--config="):
            return word.split("=", 1)[1]
    return None


#: How archive_warnings' warning begins: reseed drops it (a standby's archiving is not a promotion's).
ARCHIVE_WARNING_PREFIX = "the restored configuration archives through pgvault"


def archive_warnings(conf: dict[str, ConfSetting], *, config_path: str | None) -> list[str]:
    """What in the restored configuration would archive into a pgvault vault once the node promotes."""
    mode = conf.get("archive_mode")
    command = conf.get("archive_command")
    library = conf.get("archive_library")
    if mode is None or not _is_on(mode.value) or command is None or (library is not None and library.value):
        return []
    if "wal-push" not in command.value:
        return []
    named = _command_config(command.value)
    same = named is not None and config_path is not None and os.path.realpath(named) == os.path.realpath(config_path)
    if named is None and config_path is None:
        same = True
    into = "into this vault" if same else f"into the vault of {named or 'its default config'}"
    return [
        f"{ARCHIVE_WARNING_PREFIX} {into}: archive_mode = {mode.value} "
        f"({mode.where}) and archive_command = {conf_quote(command.value)} ({command.where}); once promoted, "
        "this node pushes the WAL of a new timeline there, next to the original's. Pass --no-archive "
        "(archive_mode = off in the pgvault block), or change archive_command before it promotes"
    ]


def pgvault_restore_command(pgvault_executable: str, config_path: str | None) -> str:
    """``restore_command`` calling this pgvault, quoted for /bin/sh, ``%`` escaped for PostgreSQL."""
    words = [pgvault_executable] + (["--config", config_path] if config_path else [])
    quoted = " ".join(shlex.quote(w).replace("%", "%%") for w in words)
    return f"{quoted} wal-fetch %f %p"


def recovery_block_settings(plan: Plan, *, restore_command: str, pause: bool, port: int | None,
                            disable_archiving: bool, conf: dict[str, ConfSetting]) -> tuple[dict[str, str], list[str]]:
    """The settings of the pgvault block, in writing order (already quoted), and notes on what they override."""
    settings: dict[str, str] = {"restore_command": conf_quote(restore_command)}
    planned = plan.recovery_settings
    notes = []
    for name in TARGET_SETTINGS:
        if name not in planned and name in conf and conf[name].value != "":
            settings[name] = conf_quote("")
            notes.append(f"{name} = {conf_quote(conf[name].value)} ({conf[name].where}) is reset to ''")
    settings.update(planned)
    settings["recovery_target_action"] = conf_quote("pause" if pause else "promote")
    delay = conf.get("recovery_min_apply_delay")
    if delay is not None and delay.value.strip() not in ("", "0", "0ms", "0s", "0min"):
        settings["recovery_min_apply_delay"] = "0"
        notes.append(f"recovery_min_apply_delay = {conf_quote(delay.value)} ({delay.where}) is reset to 0")
    if port is not None:
        settings["port"] = str(port)
    if disable_archiving:
        settings["archive_mode"] = conf_quote("off")
    return settings, notes


def write_recovery_settings(data_dir: str, settings: dict[str, str], *, comment: str) -> None:
    """Replace the pgvault block of postgresql.auto.conf (dropping stale recovery_target* lines); create recovery.signal."""
    path = os.path.join(data_dir, "postgresql.auto.conf")
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        lines = ["# Do not edit this file manually!\n", "# It will be overwritten by the ALTER SYSTEM command.\n"]
    kept, inside = [], False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(BLOCK_BEGIN):
            inside = True
            continue
        if inside:
            inside = not stripped.startswith(BLOCK_END)
            continue
        name = conf_line_name(line)
        if name is not None and name.startswith("recovery_target"):
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    block = [f"{BLOCK_BEGIN} ({comment})\n"] + [f"{k} = {v}\n" for k, v in settings.items()] + [f"{BLOCK_END}\n"]
    _write_atomically(path, "".join(kept + block), mode=0o600)
    for name in ("standby.signal", "recovery.signal"):
        try:
            os.unlink(os.path.join(data_dir, name))
        except FileNotFoundError:
            pass
    _write_atomically(os.path.join(data_dir, "recovery.signal"), "", mode=0o600)


def _write_atomically(path: str, text: str, *, mode: int) -> None:
    tmp = f"{path}.pgvault-tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# --- ownership --------------------------------------------------------------------------


def choose_owner(data_dir: str, owner: str | None = None) -> pwd.struct_passwd:
    """The OS user the server runs as: ``owner``, else the owner of the parent directory, else ``postgres``."""
    try:
        if owner is not None:
            return pwd.getpwnam(owner)
        st = os.stat(os.path.dirname(os.path.abspath(data_dir)))
        if st.st_uid != 0:
            return pwd.getpwuid(st.st_uid)
        return pwd.getpwnam(DEFAULT_OWNER)
    except KeyError:
        raise RestoreError(f"cannot choose who owns {data_dir}: no OS user {owner or DEFAULT_OWNER!r}",
                           hint="create the user PostgreSQL runs as, or restore under a directory it owns") from None


def _chown_tree(path: str, uid: int, gid: int) -> None:
    """chown -R without following links (lchown for each entry)."""
    os.lchown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def give_to_owner(manifest: Manifest, data_dir: str, user: pwd.struct_passwd, *,
                  tablespace_map: dict[int, str] | None) -> None:
    """As root: the data directory and the tablespaces' version directories to ``user``."""
    uid, gid = user.pw_uid, user.pw_gid
    _chown_tree(data_dir, uid, gid)
    for location in tablespace_locations(manifest, tablespace_map).values():
        if not os.path.isdir(location):
            continue
        os.chown(location, uid, gid)
        for name in os.listdir(location):
            if name.startswith(f"PG_{manifest.pg_major_version}_"):
                _chown_tree(os.path.join(location, name), uid, gid)


def _owner_can_run(user: pwd.struct_passwd, executable: str, config_path: str | None) -> str | None:
    """As root: why ``user`` cannot run restore_command (None when it can)."""
    checks = [["test", "-x", executable]] + ([["test", "-r", config_path]] if config_path else [])
    for check in checks:
        try:
            done = subprocess.run(["runuser", "-u", user.pw_name, "--", *check], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None  # cannot tell; recovery will say
        if done.returncode != 0:
            what = "execute" if check[1] == "-x" else "read"
            return (f"the OS user {user.pw_name} cannot {what} {check[2]}, which restore_command needs; "
                    "recovery will fail until it can")
    return None


# --- the server ----------------------------------------------------------------------------


def find_pg_ctl(*, bin_dir: str | None, major: int) -> str:
    """pg_ctl of PostgreSQL ``major``: in ``bin_dir``, else `pg_config --bindir`, Debian's layout, PATH."""
    path = pg.find_program("pg_ctl", bin_dir=bin_dir, major=major)
    if path is not None:
        return path
    seen = [f"{p} is PostgreSQL {pg.program_major(p)}" for p in pg.pg_program_candidates("pg_ctl", bin_dir=bin_dir,
                                                                                        major=major)]
    where = f"[postgres] bin_dir {bin_dir}" if bin_dir else "`pg_config --bindir`, /usr/lib/postgresql/<major>/bin or PATH"
    raise RestoreError(f"no pg_ctl of PostgreSQL {major} (the backup's version) in {where}"
                       + (f": {'; '.join(seen)}" if seen else ""),
                       hint=f"install PostgreSQL {major}, or set [postgres] bin_dir to its bin directory")


def _socket_dir(data_dir: str, label: str, user: pwd.struct_passwd, *, as_root: bool) -> str:
    """Where the started server puts its socket: the data directory's parent, when its owner can write there."""
    parent = os.path.dirname(data_dir)
    longest = len(".s.PGSQL.65535.lock") + 1
    st = os.stat(parent)
    if st.st_uid == user.pw_uid and len(parent) + longest <= UNIX_SOCKET_PATH_MAX:
        return parent
    base = parent if len(parent) + 30 + longest <= UNIX_SOCKET_PATH_MAX else "/tmp"
    path = tempfile.mkdtemp(prefix=f".pgvault-socket-{label}-", dir=base)
    os.chmod(path, 0o755)
    if as_root:
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def read_pidfile(data_dir: str) -> list[str]:
    """The lines of the data directory's postmaster.pid ([] without one)."""
    try:
        with open(os.path.join(data_dir, "postmaster.pid")) as f:
            return f.read().splitlines()
    except OSError:
        return []


def _log_since(path: str, offset: int) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            return f.read().splitlines()
    except OSError:
        return []


def _failure_lines(lines: list[str]) -> list[str]:
    keys = ("FATAL:", "PANIC:", "pgvault: error:", "pgvault wal-fetch:")
    return [line.strip() for line in lines if any(k in line for k in keys)]


def _server_failed(plan: Plan, log_file: str, offset: int, *, what: str) -> RecoveryError:
    failures = _failure_lines(_log_since(log_file, offset))
    not_reached = [f for f in failures if "recovery ended before configured recovery target was reached" in f]
    if not_reached:
        return RecoveryError(
            f"PostgreSQL did not reach the target {plan.target}: recovery ended before the configured recovery "
            f"target was reached, and the server stopped (log: {log_file})",
            hint="the archived WAL ends before the target (or the xid / restore point is not in it); "
                 "`pgvault plan` shows the restorable window")
    detail = failures[-1] if failures else "no FATAL line in the log"
    hint = "read the log; fix the cause and start the server again to resume recovery"
    if any("could not create any TCP/IP sockets" in f or "could not create lock file" in f for f in failures):
        hint = "another server uses that port: pass --port with a free one (--delta reuses what is restored)"
    return RecoveryError(f"{what}: {detail} (log: {log_file})", hint=hint)


class _Connector:
    """Connections to the restored server over its socket, as its owner (peer authentication works as root)."""

    def __init__(self, socket_dir: str, port: int, user: pwd.struct_passwd, *, as_root: bool) -> None:
        self.socket_dir, self.port, self.user, self.as_root = socket_dir, port, user, as_root
        self.last_error: str | None = None

    def connect(self):
        import psycopg

        for dbname in ("postgres", "template1"):
            conninfo = psycopg.conninfo.make_conninfo(host=self.socket_dir, port=str(self.port), dbname=dbname,
                                                      user=self.user.pw_name, connect_timeout="5",
                                                      application_name="pgvault restore")
            try:
                return pg.connect_as(conninfo, self.user, as_root=self.as_root)
            except psycopg.OperationalError as exc:
                self.last_error = " ".join(str(exc).split())
                if "does not exist" in self.last_error and dbname == "postgres":
                    continue
                return None
        return None

    def refused(self) -> bool:
        """Whether the last failure was the server refusing us (not a server still starting)."""
        error = (self.last_error or "").lower()
        return any(k in error for k in ("authentication failed", "no password supplied", "pg_hba.conf",
                                        "permission denied for database", "role \"", "does not exist"))


def _control_state(pg_ctl: str, data_dir: str) -> tuple[str | None, int | None]:
    """(cluster state, latest checkpoint's timeline) from pg_controldata, next to pg_ctl."""
    tool = os.path.join(os.path.dirname(pg_ctl), "pg_controldata")
    try:
        out = subprocess.run([tool, "-D", data_dir], capture_output=True, text=True, timeout=30,
                             env={**os.environ, "LC_ALL": "C", "LANG": "C"})
    except (OSError, subprocess.SubprocessError):
        return None, None
    state = re.search(r"^Database cluster state:\s*(.+)$", out.stdout, re.M)
    tli = re.search(r"^Latest checkpoint's TimeLineID:\s*(\d+)$", out.stdout, re.M)
    return (state[1].strip() if state else None), (int(tli[1]) if tli else None)


def _ts(value) -> datetime | None:
    return value if value is None else value.astimezone(timezone.utc)


def _poll(conn) -> dict[str, Any]:
    row = conn.execute(
        "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int, "
        "pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()").fetchone()
    state: dict[str, Any] = {"in_recovery": row[0], "replay_lsn": row[2], "replay_time": _ts(row[3])}
    if row[0]:
        if row[1] >= 140000:
            state["paused"] = conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()[0] == "paused"
        else:
            state["paused"] = conn.execute("SELECT pg_is_wal_replay_paused()").fetchone()[0]
    else:
        lsn, name = conn.execute("SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn())").fetchone()
        state["lsn"], state["timeline"] = lsn, int(name[:8], 16)
    return state


def _last_commit(conn) -> tuple[int | None, datetime | None]:
    import psycopg

    try:
        row = conn.execute("SELECT xid::text, timestamp FROM pg_last_committed_xact()").fetchone()
    except psycopg.Error:  # track_commit_timestamp is off
        return None, None
    if row is None or row[0] is None:
        return None, None
    return int(row[0]), _ts(row[1])


def start_and_wait(plan: Plan, data_dir: str, *, pg_ctl: str, user: pwd.struct_passwd, as_root: bool,
                   label: str, pause: bool, timeout: float,
                   notify: Callable[[str], None]) -> tuple[ServerInfo, ReachedPoint, str | None]:
    """Start the restored server as ``user``, wait for recovery to end or pause at the target, report the point.

    Returns the server, the point reached and a warning: when the server cannot be
    connected to (authentication), the end of recovery is seen in pg_control
    (pg_controldata: "in production"), the point holds only the timeline, and
    the warning says why.
    """
    parent = os.path.dirname(data_dir)
    log_file = os.path.join(parent, f"restore-{label}.log")
    try:  # never through a link: root gives this file to the server's owner
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
    except OSError as exc:
        raise RestoreError(f"cannot open the server log {log_file}: {exc.strerror}") from None
    try:
        if as_root:
            os.fchown(fd, user.pw_uid, user.pw_gid)
        offset = os.fstat(fd).st_size
    finally:
        os.close(fd)
    socket_dir = _socket_dir(data_dir, label, user, as_root=as_root)
    options = ["-k", socket_dir, "-c", "logging_collector=off", "-c", "log_destination=stderr"]
    if pause:
        options += ["-c", "hot_standby=on"]  # to see the pause, the server must accept connections in recovery
    cmd = [pg_ctl, "-D", data_dir, "-l", log_file, "-o", " ".join(shlex.quote(o) for o in options),
           "-w", "-t", str(max(1, int(timeout))), "start"]
    if as_root:
        cmd = ["runuser", "-u", user.pw_name, "--", *cmd]
    notify(f"starting PostgreSQL on {data_dir} (log: {log_file})")
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=parent, timeout=timeout + 60)
    if done.returncode != 0:
        raise _server_failed(plan, log_file, offset, what="PostgreSQL failed to start or stopped during recovery")
    pidfile = read_pidfile(data_dir)
    try:
        pid, port = int(pidfile[0]), int(pidfile[3])
    except (IndexError, ValueError):
        raise _server_failed(plan, log_file, offset, what="PostgreSQL stopped right after it started") from None
    server = ServerInfo(pid=pid, port=port, socket_dir=socket_dir, log_file=log_file, owner=user.pw_name)
    notify(f"PostgreSQL runs (pid {pid}, port {port}, socket in {socket_dir}); waiting for recovery to "
           + ("pause at the target" if pause else "reach the target and promote"))
    connector = _Connector(socket_dir, port, user, as_root=as_root)
    conn = None
    replay_time = replay_lsn = None
    try:
        while True:
            if not pid_alive(pid):
                raise _server_failed(plan, log_file, offset, what="PostgreSQL stopped during recovery")
            if time.monotonic() - started > timeout:
                raise RecoveryError(
                    f"recovery did not end within {int(timeout)} s; the server still runs (pid {pid}, log: {log_file})",
                    hint="look at the log; stop the server with pg_ctl stop, or wait and check it yourself")
            if conn is None:
                conn = connector.connect()
                if conn is None and connector.refused():
                    # no way in (pg_hba wants a password): the files tell when recovery has ended, not where
                    why = f"cannot connect to the restored server to read the point it reached: {connector.last_error}"
                    if pause:
                        raise RecoveryError(f"{why}; it runs (pid {pid}, log: {log_file})",
                                            hint="connect as a superuser and check pg_get_wal_replay_pause_state()")
                    state_name, tli = _control_state(pg_ctl, data_dir)
                    if state_name == "in production":
                        reached = ReachedPoint(state="promoted", timeline=tli or 0, lsn=None, replay_lsn=None,
                                               last_transaction_time=None)
                        return server, reached, why
            state = None
            if conn is not None:
                try:
                    state = _poll(conn)
                except Exception:  # the server went away (promotion does not close sessions; a crash does)
                    conn.close()
                    conn = None
            if state is not None:
                replay_lsn = state["replay_lsn"] or replay_lsn
                replay_time = state["replay_time"] or replay_time
                if not state["in_recovery"]:
                    xid, commit_time = _last_commit(conn)
                    reached = ReachedPoint(
                        state="promoted", timeline=state["timeline"], lsn=parse_lsn(state["lsn"]),
                        replay_lsn=parse_lsn(replay_lsn) if replay_lsn else None,
                        last_transaction_time=replay_time, last_commit_xid=xid, last_commit_time=commit_time)
                    return server, reached, None
                if state["paused"]:
                    if not pause:
                        raise RecoveryError(
                            f"recovery paused before reaching the target (log: {log_file}); the server still runs "
                            f"(pid {pid})", hint="read the log: PostgreSQL pauses when a setting is lower than on "
                                                  "the original server; fix it and restart")
                    xid, commit_time = _last_commit(conn)
                    lsn = parse_lsn(replay_lsn) if replay_lsn else None
                    reached = ReachedPoint(state="paused", timeline=plan.timeline, lsn=lsn, replay_lsn=lsn,
                                           last_transaction_time=replay_time, last_commit_xid=xid,
                                           last_commit_time=commit_time)
                    return server, reached, None
            time.sleep(POLL_SECONDS)
    finally:
        if conn is not None:
            conn.close()


def check_reached(plan: Plan, reached: ReachedPoint) -> None:
    """A last check: recovery never replays a transaction after a time target."""
    target = plan.target
    if target.kind == "time" and reached.last_transaction_time is not None:
        assert target.time is not None
        if reached.last_transaction_time > target.time:
            raise RecoveryError(
                f"PostgreSQL replayed past the target {target}: its last replayed transaction is from "
                f"{format_time(reached.last_transaction_time)}")


# --- the executor ------------------------------------------------------------------------------


def restore(
    plan: Plan,
    manifest: Manifest,
    *,
    storage: Storage,
    keyring,
    data_dir: str,
    config_path: str | None,
    pgvault_executable: str,
    delta: bool = False,
    parallel: int = 2,
    port: int | None = None,
    start: bool = False,
    pause: bool = False,
    disable_archiving: bool = False,
    require_encryption: bool = False,
    tablespace_map: dict[int, str] | None = None,
    bin_dir: str | None = None,
    owner: str | None = None,
    tmp_dir: str | None = None,
    timeout: float = 86400,
    progress: Callable[[MaterializeProgress], None] | None = None,
    notify: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> RestoreResult:
    """Carry out ``plan`` into ``data_dir`` (see the module's description for each step).

    ``manifest`` is the plan's backup's manifest; ``config_path`` the absolute
    path of the config file restore_command must use (None: pgvault's default
    lookup) and ``pgvault_executable`` the absolute path of the pgvault program.
    ``owner`` overrides who the files are given to when run as root.
    ``notify`` hears of each step; ``warn`` of each warning as soon as it is
    known (before the server starts), and the result lists them all.
    """
    began = time.monotonic()
    notify = notify or (lambda _message: None)
    warn = warn or (lambda _message: None)
    if manifest.label != plan.backup.label:
        raise ValueError(f"the manifest is of backup {manifest.label}, the plan restores {plan.backup.label}")
    if not os.path.isabs(pgvault_executable):
        raise RestoreError(f"the pgvault executable {pgvault_executable!r} is not an absolute path")
    if config_path is not None and not os.path.isabs(config_path):
        raise RestoreError(f"the config file {config_path!r} is not an absolute path")
    if pause and plan.target.kind == "latest":
        raise RestoreError("--pause needs a recovery target: with --to latest PostgreSQL replays all archived WAL "
                           "and then promotes", hint="give --to a time, LSN, xid, restore point or 'immediate'")
    if port is not None and not 1 <= port <= 65535:
        raise RestoreError(f"invalid port {port}: expected 1 to 65535")
    data_dir = os.path.abspath(data_dir)
    relocate = {int(k): v for k, v in (tablespace_map or {}).items()}
    unknown = set(relocate) - {t.oid for t in manifest.tablespaces}
    if unknown:
        raise RestoreError(f"backup {manifest.label} has no tablespace {', '.join(map(str, sorted(unknown)))}; "
                           f"its tablespaces: {', '.join(str(t.oid) for t in manifest.tablespaces) or 'none'}")
    if not os.path.isdir(os.path.dirname(data_dir)):
        raise RestoreError(f"the parent directory of {data_dir} does not exist",
                           hint="create it (owned by the user PostgreSQL runs as), or choose another --data-dir")
    as_root = os.geteuid() == 0
    user = choose_owner(data_dir, owner) if as_root else pwd.getpwuid(os.geteuid())
    pg_ctl = find_pg_ctl(bin_dir=bin_dir, major=manifest.pg_major_version) if start else None
    check_destination(manifest, data_dir, delta=delta, tablespace_map=relocate)

    materialized = materialize_backup(storage, manifest, data_dir, keyring=keyring, parallel=parallel,
                                      progress=progress, tablespace_map=relocate, require_encryption=require_encryption,
                                      tmp_dir=tmp_dir, delta=delta)

    conf = effective_conf(data_dir)
    command = pgvault_restore_command(pgvault_executable, config_path)
    settings, notes = recovery_block_settings(plan, restore_command=command, pause=pause, port=port,
                                              disable_archiving=disable_archiving, conf=conf)
    comment = (f"written by pgvault restore at {format_time(datetime.now(timezone.utc).replace(microsecond=0))}: "
               f"backup {plan.backup.label}, target {plan.target}, timeline {plan.timeline}")
    write_recovery_settings(data_dir, settings, comment=comment)
    warnings: list[str] = []
    if not disable_archiving:
        warnings += archive_warnings(conf, config_path=config_path)
    if not os.path.exists(os.path.join(data_dir, "postgresql.conf")):
        warnings.append(f"backup {manifest.label} holds no postgresql.conf (kept outside the data directory, as on "
                        f"Debian): give the restored server its configuration before starting it")
    if as_root:
        give_to_owner(manifest, data_dir, user, tablespace_map=relocate)
        why = _owner_can_run(user, pgvault_executable, config_path)
        if why:
            warnings.append(why)

    for warning in warnings:
        warn(warning)

    server = reached = None
    if start:
        assert pg_ctl is not None
        if not os.path.exists(os.path.join(data_dir, "postgresql.conf")):
            raise RestoreError(f"restored into {data_dir}, but not started: there is no postgresql.conf",
                               hint="give the restored server its configuration, then start it with pg_ctl")
        server, reached, why = start_and_wait(plan, data_dir, pg_ctl=pg_ctl, user=user, as_root=as_root,
                                              label=manifest.label, pause=pause, timeout=timeout, notify=notify)
        if why is not None:
            warnings.append(why)
            warn(why)
        check_reached(plan, reached)
    return RestoreResult(plan=plan, data_dir=data_dir, materialized=materialized, recovery_settings=settings,
                         warnings=tuple(warnings), seconds=round(time.monotonic() - began, 3),
                         owner=user.pw_name if as_root else None, server=server, reached=reached, notes=tuple(notes))


__all__ = [
    "ReachedPoint", "RecoveryError", "RestoreError", "RestoreResult", "ServerInfo", "check_destination",
    "effective_conf", "restore", "running_server", "write_recovery_settings",
]

