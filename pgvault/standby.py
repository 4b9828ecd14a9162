"""Talking to a primary and to the standby being built: replication commands, the standby's settings, its health.

The primary is reached over a replication connection (what a standby's
``primary_conninfo`` grants, so a replication-only role in pg_hba.conf is
enough): ``IDENTIFY_SYSTEM``, ``SHOW in_hot_standby``, ``TIMELINE_HISTORY``,
``READ_REPLICATION_SLOT`` / ``CREATE_REPLICATION_SLOT``. The standby is reached
over the socket its postmaster.pid names, as the data directory's owner (peer
authentication works as root too), and is healthy when ``pg_stat_wal_receiver``
streams from that primary, on its timeline, with the replay lag under a limit.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgvault import pg
from pgvault.errors import ReseedError, StreamingTimeoutError
from pgvault.restore import pid_alive, read_pidfile
from pgvault.targets import conf_quote
from pgvault.vault import VaultRecord
from pgvault.wal import (
    HistoryEntry,
    format_lsn,
    history_file_name,
    parse_history,
    parse_lsn,
)

POLL_SECONDS = 0.5
SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


# --- the primary ----------------------------------------------------------------------


@dataclass(frozen=True)
class PrimaryInfo:
    description: str  # conninfo without a password
    system_identifier: int
    timeline: int
    lsn: int
    history: tuple[HistoryEntry, ...]


class ReplicationConnection:
    """A replication-protocol connection (what primary_conninfo grants), for a handful of commands."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.description = pg.describe_conninfo(conninfo)
        self.conn = self._connect()

    def _connect(self):
        import psycopg
        from psycopg.conninfo import make_conninfo

        try:
            return psycopg.connect(make_conninfo(self.conninfo, replication="true", application_name="pgvault reseed"),
                                   autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise ReseedError(f"cannot connect to the primary ({self.description}): {' '.join(str(exc).split())}",
                              hint="--primary-conninfo must reach the primary as a role with REPLICATION, "
                                   "allowed by its pg_hba.conf for replication connections") from None
        except psycopg.ProgrammingError as exc:
            raise ReseedError(f"invalid --primary-conninfo: {exc}") from None

    def command(self, text: str) -> list[list[bytes | None]]:
        from psycopg import pq

        result = self.conn.pgconn.exec_(text.encode())
        if result.error_message and self.conn.pgconn.status != pq.ConnStatus.OK:
            self.conn.close()  # the connection dropped (say, during a long restore): once more on a new one
            self.conn = self._connect()
            result = self.conn.pgconn.exec_(text.encode())
        if result.error_message:
            raise ReseedError(f"the primary ({self.description}) refused {text.split()[0]}: "
                              f"{' '.join(result.error_message.decode(errors='replace').split())}")
        return [[result.get_value(i, j) for j in range(result.nfields)] for i in range(result.ntuples)]

    def identify(self) -> tuple[int, int, int]:
        row = self.command("IDENTIFY_SYSTEM")[0]
        return int(row[0]), int(row[1]), parse_lsn(row[2].decode())

    def close(self) -> None:
        self.conn.close()


def inspect_primary(conn: ReplicationConnection, *, record: VaultRecord) -> PrimaryInfo:
    sysid, tli, lsn = conn.identify()
    if sysid != record.system_identifier:
        raise ReseedError(f"the primary ({conn.description}) is the cluster with system identifier {sysid}, "
                          f"but the vault is for {record.system_identifier}",
                          hint="give the primary of the cluster this vault protects")
    try:
        standby = conn.command("SHOW in_hot_standby")  # PostgreSQL 14+
    except ReseedError:
        standby = []  # older: a standby would be caught by the streaming check (it has no timeline of its own)
    if standby and standby[0][0] == b"on":
        raise ReseedError(f"{conn.description} is a standby (in recovery), not the primary",
                          hint="give --primary-conninfo the current primary (the leader)")
    history: tuple[HistoryEntry, ...] = ()
    if tli > 1:
        row = conn.command(f"TIMELINE_HISTORY {tli}")[0]
        history = tuple(parse_history(bytes(row[1]).decode(), source=f"the primary's {history_file_name(tli)}"))
    return PrimaryInfo(conn.description, sysid, tli, lsn, history)


def ensure_slot(conn: ReplicationConnection, slot: str) -> bool:
    """Create physical slot ``slot`` on the primary, reserving WAL now; False when it already existed."""
    row = conn.command(f"READ_REPLICATION_SLOT {slot}")[0]
    if row[0] is not None:
        if row[0] != b"physical":
            raise ReseedError(f"replication slot {slot!r} on the primary is a {row[0].decode()} slot, not physical")
        return False
    conn.command(f"CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL")
    return True


# --- the standby -----------------------------------------------------------------------------


def standby_settings(*, restore_command: str, primary_conninfo: str, slot: str | None, port: int | None,
                     conf: dict) -> tuple[dict[str, str], list[str]]:
    """The pgvault block of a reseeded standby, already quoted, and notes on what it overrides."""
    from pgvault.restore import TARGET_SETTINGS

    settings = {"restore_command": conf_quote(restore_command),
                "primary_conninfo": conf_quote(primary_conninfo),
                "recovery_target_timeline": conf_quote("latest")}
    notes = []
    if slot:
        settings["primary_slot_name"] = conf_quote(slot)
    for name in TARGET_SETTINGS:  # a standby follows the primary: no recovery target
        if name in conf and conf[name].value != "":
            settings[name] = conf_quote("")
            notes.append(f"{name} = {conf_quote(conf[name].value)} ({conf[name].where}) is reset to ''")
    hot = conf.get("hot_standby")
    if hot is not None and hot.value.strip().lower() in ("off", "false", "no", "0"):
        settings["hot_standby"] = conf_quote("on")
        notes.append(f"hot_standby = off ({hot.where}) is set to on: reseed checks the standby over a connection")
    if port is not None:
        settings["port"] = str(port)
    return settings, notes


def configure_standby(data_dir: str, settings: dict[str, str], *, comment: str, user: pwd.struct_passwd | None) -> None:
    """The pgvault block (replacing restore's), standby.signal instead of recovery.signal."""
    from pgvault.restore import write_recovery_settings

    write_recovery_settings(data_dir, settings, comment=comment)
    os.unlink(os.path.join(data_dir, "recovery.signal"))
    path = os.path.join(data_dir, "standby.signal")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.close(fd)
    if user is not None:
        for name in ("standby.signal", "postgresql.auto.conf"):
            os.lchown(os.path.join(data_dir, name), user.pw_uid, user.pw_gid)


# --- talking to the node --------------------------------------------------------------------


def node_connect(data_dir: str, user: pwd.struct_passwd, *, as_root: bool):
    """A connection to the server running on ``data_dir`` (socket or address from postmaster.pid), as ``user``."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    lines = read_pidfile(data_dir)
    if len(lines) < 4:
        return None
    port = lines[3].strip()
    host = lines[4].strip() if len(lines) > 4 and lines[4].strip() else ""
    if not host:
        listen = lines[5].strip() if len(lines) > 5 else ""
        host = "127.0.0.1" if listen in ("", "*") else listen.split(",")[0].strip()
    conninfo = make_conninfo(host=host, port=port, dbname="postgres", user=user.pw_name, connect_timeout="5",
                             application_name="pgvault reseed")
    try:
        return pg.connect_as(conninfo, user, as_root=as_root)
    except psycopg.OperationalError:
        return None


@dataclass(frozen=True)
class StreamingState:
    in_recovery: bool
    status: str | None  # pg_stat_wal_receiver.status ("streaming", …), None without a receiver
    sender_host: str | None
    sender_port: int | None
    received_timeline: int | None
    slot_name: str | None
    system_identifier: int
    replay_lsn: int | None
    primary_lsn: int
    primary_timeline: int

    @property
    def lag_bytes(self) -> int | None:
        return None if self.replay_lsn is None else max(0, self.primary_lsn - self.replay_lsn)

    def to_dict(self) -> dict[str, Any]:
        return {"in_recovery": self.in_recovery, "status": self.status, "sender_host": self.sender_host,
                "sender_port": self.sender_port, "received_timeline": self.received_timeline,
                "slot_name": self.slot_name,
                "replay_lsn": format_lsn(self.replay_lsn) if self.replay_lsn is not None else None,
                "primary_lsn": format_lsn(self.primary_lsn), "primary_timeline": self.primary_timeline,
                "lag_bytes": self.lag_bytes}


def streaming_state(conn, primary: ReplicationConnection) -> StreamingState:
    row = conn.execute(
        "SELECT pg_is_in_recovery(), (SELECT system_identifier FROM pg_control_system()), "
        "pg_last_wal_replay_lsn()::text").fetchone()
    receiver = conn.execute("SELECT status, sender_host, sender_port, received_tli, slot_name "
                            "FROM pg_stat_wal_receiver").fetchone()
    _sysid, tli, lsn = primary.identify()
    return StreamingState(
        in_recovery=row[0], status=receiver[0] if receiver else None, sender_host=receiver[1] if receiver else None,
        sender_port=receiver[2] if receiver else None, received_timeline=receiver[3] if receiver else None,
        slot_name=receiver[4] if receiver else None, system_identifier=int(row[1]),
        replay_lsn=parse_lsn(row[2]) if row[2] else None, primary_lsn=lsn, primary_timeline=tli)


def _addresses(host: str) -> set[str]:
    if host.startswith("/"):
        return {host}
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return {host}


def unhealthy_because(state: StreamingState, *, primary: PrimaryInfo, primary_conninfo: str,
                      max_lag_bytes: int) -> str | None:
    """Why ``state`` is not a healthy streaming standby of that primary (None when it is)."""
    from psycopg.conninfo import conninfo_to_dict

    if state.system_identifier != primary.system_identifier:
        return f"it is the cluster {state.system_identifier}, the primary is {primary.system_identifier}"
    if not state.in_recovery:
        return "it is not in recovery (a primary)"
    if state.status != "streaming":
        return f"its WAL receiver is {state.status or 'not running'}"
    if state.received_timeline != state.primary_timeline:
        return f"it streams timeline {state.received_timeline}, the primary is on {state.primary_timeline}"
    params = conninfo_to_dict(primary_conninfo)
    want_port = str(params.get("port") or os.environ.get("PGPORT") or "5432").split(",")[0]
    if state.sender_port is not None and str(state.sender_port) != want_port:
        return f"it streams from port {state.sender_port}, not {want_port}"
    want_host = str(params.get("host") or params.get("hostaddr") or "").split(",")[0]
    if want_host and state.sender_host and not (_addresses(want_host) & _addresses(state.sender_host)):
        return f"it streams from {state.sender_host}, not {want_host}"
    if state.lag_bytes is None or state.lag_bytes > max_lag_bytes:
        return f"its replay lag is {state.lag_bytes} bytes (limit {max_lag_bytes})"
    return None


def start_node(data_dir: str, *, pg_ctl: str, user: pwd.struct_passwd, as_root: bool, timeout: float) -> tuple[int, str]:
    """pg_ctl start as ``user`` with the log beside the data directory; (pid, log file)."""
    parent = os.path.dirname(data_dir)
    log_file = os.path.join(parent, "pgvault-reseed.log")
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
    try:
        if as_root:
            os.fchown(fd, user.pw_uid, user.pw_gid)
    finally:
        os.close(fd)
    cmd = [pg_ctl, "-D", data_dir, "-l", log_file, "-w", "-t", str(max(1, int(timeout))), "start"]
    if as_root:
        cmd = ["runuser", "-u", user.pw_name, "--", *cmd]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=parent, timeout=timeout + 60)
    lines = read_pidfile(data_dir)
    if done.returncode != 0 or not lines:
        raise ReseedError(f"PostgreSQL did not start on {data_dir}: {_fatal_lines(log_file) or done.stderr.strip()} "
                          f"(log: {log_file})", hint="read the log; the data directory is restored and configured "
                                                     "as a standby: fix the cause and start it with pg_ctl")
    return int(lines[0]), log_file


def _fatal_lines(log_file: str) -> str:
    try:
        with open(log_file, errors="replace") as f:
            lines = f.read().splitlines()[-200:]
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines if "FATAL:" in line or "PANIC:" in line)[-600:]


def wait_streaming(data_dir: str, *, primary: PrimaryInfo, conn_primary: ReplicationConnection,
                   primary_conninfo: str, user: pwd.struct_passwd, as_root: bool, pid: int, log_file: str | None,
                   max_lag_bytes: int, timeout: float, notify: Callable[[str], None]) -> StreamingState:
    started = time.monotonic()
    conn = None
    last: StreamingState | None = None
    why = "no connection yet"
    said = None
    try:
        while True:
            if pid and not pid_alive(pid):
                raise ReseedError(f"PostgreSQL stopped on {data_dir}: {_fatal_lines(log_file or '')} (log: {log_file})")
            if conn is None:
                conn = node_connect(data_dir, user, as_root=as_root)
            if conn is not None:
                try:
                    last = streaming_state(conn, conn_primary)
                except Exception as exc:  # the server restarted or went away: reconnect
                    if isinstance(exc, ReseedError):
                        raise
                    conn.close()
                    conn = None
                if last is not None:
                    why = unhealthy_because(last, primary=primary, primary_conninfo=primary_conninfo,
                                            max_lag_bytes=max_lag_bytes) or ""
                    if not why:
                        return last
                    if why != said and last.status is not None:
                        notify(f"waiting: {why}")
                        said = why
            if time.monotonic() - started > timeout:
                raise StreamingTimeoutError(
                    f"the node on {data_dir} does not stream from the primary after {int(timeout)} s: {why}"
                    + (f"; log: {_fatal_lines(log_file)}" if log_file and _fatal_lines(log_file) else ""),
                    hint="it still runs and may catch up: check pg_stat_wal_receiver on it, and the primary's "
                         "pg_hba.conf, replication slots and max_wal_senders")
            time.sleep(POLL_SECONDS)
    finally:
        if conn is not None:
            conn.close()


    return True
