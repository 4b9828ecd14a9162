"""Rebuild a node as a streaming standby of the current primary, from the vault — keeping any diverged WAL first.

:func:`reseed` does, in order, and stops at the first problem:

1. **Ask the primary** who it is, over a replication connection (what a
   standby's ``primary_conninfo`` allows): ``IDENTIFY_SYSTEM`` (system
   identifier, timeline, WAL position), ``SHOW in_hot_standby`` (a standby is
   refused), ``TIMELINE_HISTORY`` (its timeline's history).
2. **Leave a healthy standby alone**: a server running on the data directory
   that streams from that primary, on its timeline, with its lag under the
   limit, is not touched. Any other running server is refused.
3. **Keep the diverged tail**: the node's pg_control (``pg_controldata``) and
   its own history files give its timeline path; where it parts from the
   primary's is the fork point. WAL the node holds from there on (read with
   ``pg_waldump``, from pg_wal or the copies it archived) is stored under
   ``orphans/`` with the fork LSN, the commits and their time range — before
   anything in the data directory changes. If that cannot be done, nothing is.
4. **Restore** the newest backup on the primary's timeline (target ``latest``,
   with ``delta`` reusing the files that match), through :func:`pgvault.restore.restore`.
   The node's own configuration files are put back (its port and addresses are
   its own, not the backed-up node's).
5. **Configure a standby**: ``standby.signal``, and in postgresql.auto.conf's
   pgvault block ``restore_command`` through this pgvault (it first catches up
   from the vault), ``primary_conninfo``, ``primary_slot_name`` (the slot is
   created on the primary when asked), ``recovery_target_timeline = 'latest'``.
6. **Start** it as the data directory's owner (unless ``start`` is off: a
   failover manager such as Patroni starts it) and wait until
   ``pg_stat_wal_receiver`` streams from the primary with the replay lag under
   ``max_lag_bytes``.

The primary and the standby are talked to in :mod:`pgvault.standby`, the
node's diverged WAL is found and kept by :mod:`pgvault.nodewal`, the restore is
:mod:`pgvault.restore`'s. No configuration is read here: every value comes in
as an argument.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from pgvault import pg
from pgvault.errors import ReseedError
from pgvault.nodewal import (
    Divergence,
    NodeState,
    find_tail,
    inspect_node,
    keep_tail,
    pg_tool,
    read_control,
)
from pgvault.orphans import OrphanRecord, now_utc
from pgvault.standby import (
    SLOT_NAME,
    PrimaryInfo,
    ReplicationConnection,
    StreamingState,
    configure_standby,
    ensure_slot,
    inspect_primary,
    node_connect,
    standby_settings,
    start_node,
    streaming_state,
    unhealthy_because,
    wait_streaming,
)
from pgvault.storage import Storage
from pgvault.targets import conf_quote
from pgvault.vault import VaultRecord
from pgvault.wal import format_lsn, history_file_name

DEFAULT_MAX_LAG_BYTES = 16 << 20
DEFAULT_TIMEOUT = 600
HISTORY_WAIT = 120  # seconds to wait for the primary's .history to reach the vault
#: the node's own configuration: put back after the restore (the backup holds the backed-up node's)
NODE_CONFIG_FILES = ("postgresql.conf", "postgresql.auto.conf", "postgresql.base.conf", "pg_hba.conf",
                     "pg_ident.conf", "patroni.dynamic.json")


# --- the node's own configuration ---------------------------------------------------------

def save_node_config(data_dir: str) -> dict[str, tuple[bytes, int]]:
    saved = {}
    for name in NODE_CONFIG_FILES:
        path = os.path.join(data_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, "rb") as f:
                saved[name] = (f.read(), os.stat(path).st_mode & 0o777)
    return saved


def put_back_node_config(data_dir: str, saved: dict[str, tuple[bytes, int]], user: pwd.struct_passwd | None) -> None:
    for name, (content, mode) in saved.items():
        path = os.path.join(data_dir, name)
        tmp = f"{path}.pgvault-tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        if user is not None:
            os.lchown(tmp, user.pw_uid, user.pw_gid)
        os.rename(tmp, path)


# --- the whole story -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReseedResult:
    action: str  # "reseeded" | "left-alone"
    data_dir: str
    primary: PrimaryInfo
    seconds: float
    node: NodeState | None = None
    divergence: Divergence | None = None
    orphan: OrphanRecord | None = None
    orphan_new: bool = False
    restore: Any = None  # RestoreResult
    settings: dict[str, str] = field(default_factory=dict)
    slot: str | None = None
    slot_created: bool = False
    started: bool = False
    pid: int | None = None
    log_file: str | None = None
    streaming: StreamingState | None = None
    reason: str | None = None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = self.divergence
        return {
            "action": self.action,
            "data_dir": self.data_dir,
            "reason": self.reason,
            "primary": {"conninfo": self.primary.description, "timeline": self.primary.timeline,
                        "lsn": format_lsn(self.primary.lsn), "system_identifier": str(self.primary.system_identifier)},
            "node": None if self.node is None else {"timeline": self.node.timeline, **self.node.control.to_dict()},
            "divergence": None if d is None else {
                "diverged": d.diverged, "fork_lsn": format_lsn(d.fork_lsn) if d.fork_lsn is not None else None,
                "fork_timeline": d.fork_timeline},
            "orphan": None if self.orphan is None else self.orphan.to_dict() | {"newly_kept": self.orphan_new},
            "restore": None if self.restore is None else self.restore.to_dict(),
            "standby_settings": self.settings,
            "slot": self.slot, "slot_created": self.slot_created,
            "started": self.started, "pid": self.pid, "log_file": self.log_file,
            "streaming": None if self.streaming is None else self.streaming.to_dict(),
            "seconds": self.seconds,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


def _owner(data_dir: str, owner: str | None) -> pwd.struct_passwd:
    from pgvault.restore import choose_owner

    if owner is None and os.path.isdir(data_dir):
        uid = os.stat(data_dir).st_uid
        if uid != 0:
            try:
                return pwd.getpwuid(uid)
            except KeyError:
                pass
    return choose_owner(data_dir, owner)


@contextmanager
def _effective_user(user: pwd.struct_passwd | None):
    """As root: write as ``user`` meanwhile, so that what lands in a local vault is the user's (archive_command's)."""
    if user is None:
        yield
        return
    egid = os.getegid()
    os.setegid(user.pw_gid)
    os.seteuid(user.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(egid)


def _wait_for_history(load: Callable[[], Any], timeline: int, *, wait: float, notify: Callable[[str], None]):
    deadline = time.monotonic() + wait
    loaded = load()
    while timeline > 1 and timeline not in loaded.snapshot.histories:
        if time.monotonic() > deadline:
            raise ReseedError(f"the vault has no {history_file_name(timeline)} yet: the primary's timeline is "
                              f"unknown to it, so no restore can follow it",
                              hint="the new primary's archiving is behind or broken: `pgvault check` on it")
        notify(f"waiting for the primary's {history_file_name(timeline)} to reach the vault")
        time.sleep(2)
        loaded = load()
    return loaded


def reseed(
    *,
    data_dir: str,
    primary_conninfo: str,
    storage: Storage,
    record: VaultRecord,
    keyring,
    options,
    load_catalog: Callable[[], Any],
    config_path: str | None,
    pgvault_executable: str,
    slot: str | None = None,
    delta: bool = False,
    port: int | None = None,
    start: bool = True,
    max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES,
    timeout: float = DEFAULT_TIMEOUT,
    history_wait: float = HISTORY_WAIT,
    parallel: int = 2,
    bin_dir: str | None = None,
    owner: str | None = None,
    progress: Callable[[Any], None] | None = None,
    notify: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> ReseedResult:
    """Rebuild ``data_dir`` as a standby of the primary at ``primary_conninfo`` (see the module's description).

    ``load_catalog`` reads the vault into a LoadedCatalog (called again while
    waiting for the primary's history); ``options`` are the codec options new
    objects (orphans) are written with.
    """
    from pgvault.planner import plan_restore
    from pgvault.restore import (
        ARCHIVE_WARNING_PREFIX,
        effective_conf,
        find_pg_ctl,
        pgvault_restore_command,
        restore,
        running_server,
    )
    from pgvault.targets import parse_target

    began = time.monotonic()
    notify = notify or (lambda _m: None)
    warn = warn or (lambda _m: None)
    if slot is not None and not SLOT_NAME.match(slot):
        raise ReseedError(f"invalid slot name {slot!r}: lower-case letters, digits and underscores, at most 63")
    if max_lag_bytes < 0:
        raise ReseedError("--max-lag-bytes must not be negative")
    data_dir = os.path.abspath(data_dir)
    if not os.path.isdir(os.path.dirname(data_dir)):
        raise ReseedError(f"the parent directory of {data_dir} does not exist")
    as_root = os.geteuid() == 0
    user = _owner(data_dir, owner) if as_root else pwd.getpwuid(os.geteuid())
    require_encryption = record.encryption_key_id is not None

    conn_primary = ReplicationConnection(primary_conninfo)
    try:
        primary = inspect_primary(conn_primary, record=record)
        notify(f"primary {primary.description}: timeline {primary.timeline}, at {format_lsn(primary.lsn)}")

        # a server runs there: a healthy standby of that primary is left alone; anything else is refused
        why_running = running_server(data_dir) if os.path.isdir(data_dir) else None
        if why_running:
            conn = node_connect(data_dir, user, as_root=as_root)
            if conn is None:
                raise ReseedError(f"a PostgreSQL server runs on {data_dir} ({why_running}) and cannot be checked",
                                  hint="stop it (pg_ctl stop) to reseed it")
            try:
                state = streaming_state(conn, conn_primary)
            finally:
                conn.close()
            why = unhealthy_because(state, primary=primary, primary_conninfo=primary_conninfo,
                                    max_lag_bytes=max_lag_bytes)
            if why is None:
                return ReseedResult(action="left-alone", data_dir=data_dir, primary=primary, streaming=state,
                                    reason="already a healthy streaming standby of that primary",
                                    seconds=round(time.monotonic() - began, 3))
            raise ReseedError(f"a PostgreSQL server runs on {data_dir} and is not a healthy standby of the primary: "
                              f"{why}", hint="stop it (pg_ctl stop -m fast), then run reseed again to rebuild it")
        non_empty = os.path.isdir(data_dir) and bool(os.listdir(data_dir))
        if non_empty and not delta:
            raise ReseedError(f"refusing to reseed {data_dir}: the directory is not empty",
                              hint="pass --delta to rebuild it in place (files that match are kept; any WAL it "
                                   "holds beyond the primary's history is kept in the vault first)")

        loaded = _wait_for_history(load_catalog, primary.timeline, wait=history_wait, notify=notify)
        # planned (and pg_ctl found) first: a reseed that cannot finish stops before it does anything
        plan = plan_restore(loaded.snapshot, parse_target("latest"), timeline=primary.timeline)
        manifest = loaded.manifests[plan.backup.label]
        pg_ctl = find_pg_ctl(bin_dir=bin_dir, major=manifest.pg_major_version) if start else None

        # the node's diverged WAL, kept before anything changes
        node = divergence = orphan = None
        orphan_new = False
        has_control = non_empty and os.path.isfile(os.path.join(data_dir, "global", "pg_control"))
        if has_control:
            major = pg.read_control_file(data_dir).major_version
            control = read_control(data_dir, controldata=pg_tool("pg_controldata", bin_dir=bin_dir, major=major))
            if control.system_identifier != record.system_identifier:
                raise ReseedError(f"{data_dir} holds the cluster {control.system_identifier}, but the vault is for "
                                  f"{record.system_identifier}", hint="reseed rebuilds a node of the vault's cluster")
            node = inspect_node(data_dir, control, vault_histories=dict(loaded.snapshot.histories))
            waldump = pg_tool("pg_waldump", bin_dir=bin_dir, major=major)
            workdir = tempfile.mkdtemp(prefix=".pgvault-reseed-", dir=os.path.dirname(data_dir))
            if as_root:
                os.chown(workdir, user.pw_uid, user.pw_gid)
            try:
                divergence = find_tail(data_dir, node, primary=primary, waldump=waldump, workdir=workdir,
                                       storage=storage, archived_wal=loaded.snapshot.wal, record=record,
                                       keyring=keyring)
                if divergence.diverged:
                    s = divergence.summary
                    assert s is not None and divergence.fork_lsn is not None
                    notify(f"the node wrote past the fork point {format_lsn(divergence.fork_lsn)} on timeline "
                           f"{divergence.fork_timeline}: {s.records} WAL records, {s.commits} committed transactions; "
                           "keeping them in the vault under orphans/")
                    with _effective_user(user if as_root else None):  # a local vault stays the owner's
                        orphan, orphan_new = keep_tail(divergence, data_dir=data_dir, node=node, primary=primary,
                                                       storage=storage, options=options, keyring=keyring,
                                                       require_encryption=require_encryption, notify=notify)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

        # restore the newest backup on the primary's timeline
        saved = save_node_config(data_dir) if non_empty else {}
        notify(f"restoring backup {plan.backup.label} into {data_dir}" + (" (delta)" if delta else ""))
        restored = restore(plan, manifest, storage=storage, keyring=keyring, data_dir=data_dir,
                           config_path=config_path, pgvault_executable=pgvault_executable, delta=delta,
                           parallel=parallel, start=False, require_encryption=require_encryption, bin_dir=bin_dir,
                           owner=user.pw_name if as_root else None, progress=progress, notify=notify)
        warnings = [w for w in restored.warnings
                    if not w.startswith(ARCHIVE_WARNING_PREFIX)  # archiving is a standby's job too
                    and not (saved and "holds no postgresql.conf" in w)]
        notes = list(restored.notes)
        if saved:
            put_back_node_config(data_dir, saved, user if as_root else None)
            notes.append(f"kept the node's own {', '.join(sorted(saved))}")

        # configure it as a standby of the primary
        conf = effective_conf(data_dir)
        command = pgvault_restore_command(pgvault_executable, config_path)
        settings, more = standby_settings(restore_command=command, primary_conninfo=primary_conninfo, slot=slot,
                                          port=port, conf=conf)
        notes += more
        comment = (f"written by pgvault reseed at {now_utc().isoformat()}: backup {plan.backup.label}, standby of "
                   f"{primary.description}")
        configure_standby(data_dir, settings, comment=comment, user=user if as_root else None)
        slot_created = ensure_slot(conn_primary, slot) if slot else False
        for w in warnings:
            warn(w)

        result = ReseedResult(action="reseeded", data_dir=data_dir, primary=primary, node=node,
                              divergence=divergence, orphan=orphan, orphan_new=orphan_new, restore=restored,
                              settings={k: v if k != "primary_conninfo" else conf_quote(primary.description)
                                        for k, v in settings.items()},
                              slot=slot, slot_created=slot_created, warnings=tuple(warnings), notes=tuple(notes),
                              seconds=0.0)
        if not start:
            return replace(result, seconds=round(time.monotonic() - began, 3))
        if not os.path.exists(os.path.join(data_dir, "postgresql.conf")):
            raise ReseedError(f"reseeded {data_dir}, but not started: there is no postgresql.conf",
                              hint="give the node its configuration, then start it with pg_ctl")
        assert pg_ctl is not None
        notify(f"starting PostgreSQL on {data_dir} as {user.pw_name}")
        pid, log_file = start_node(data_dir, pg_ctl=pg_ctl, user=user, as_root=as_root, timeout=timeout)
        notify(f"PostgreSQL runs (pid {pid}); waiting until it streams from the primary with a lag under "
               f"{max_lag_bytes} bytes")
        state = wait_streaming(data_dir, primary=primary, conn_primary=conn_primary,
                               primary_conninfo=primary_conninfo, user=user, as_root=as_root, pid=pid,
                               log_file=log_file, max_lag_bytes=max_lag_bytes, timeout=timeout, notify=notify)
        return replace(result, started=True, pid=pid, log_file=log_file, streaming=state,
                       seconds=round(time.monotonic() - began, 3))
    finally:
        conn_primary.close()


__all__ = ["ReseedResult", "reseed"]
