"""Restore drills: prove the newest backup restores, and measure how long it takes and how much it loses.

:func:`run_drill`, in order:

1. plan a restore of the newest backup to the end of the archive (``latest``);
2. restore it into a scratch directory with :func:`pgvault.restore.restore`
   (``archive_mode = off``: a drill never archives into the vault);
3. make the copy safe to start next to production: TCP off (``listen_addresses
   = ''``, the socket lives in the scratch directory), local connections trusted
   (the socket directory is private to the server's owner), and the
   ``postgresql.conf`` / ``pg_hba.conf`` a Debian-style backup lacks written;
4. start it on a free port and wait until recovery has replayed the archive and
   the server is open: the time from step 1 to here is the **RTO**;
5. sanity checks: every database that accepts connections connects, each user
   table is counted (every heap page read), and ``amcheck``'s ``bt_index_check``
   runs on every B-tree index where the extension is installed (else: skipped);
6. **RPO**: the newest transaction in the archived WAL (found with
   ``pg_waldump`` in the newest segments) minus the last one the server replayed;
7. stop the server and remove the scratch directory — also when a step failed.

A failed step is a :class:`~pgvault.errors.DrillError` naming the step and its
reason; the caller records the outcome (``drill.json``) either way.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pgvault.errors import DrillError, PgvaultError, PlanError
from pgvault.status import DrillRecord

#: How many of the newest archived segments are searched for the newest transaction.
RPO_SCAN_SEGMENTS = 16
_XACT = re.compile(r"lsn: ([0-9A-F]+/[0-9A-F]+), prev [0-9A-F]+/[0-9A-F]+, desc: (?:COMMIT|ABORT)(?:_PREPARED)? "
                   r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


@dataclass(frozen=True)
class DatabaseCheck:
    name: str
    tables: int
    rows: int


@dataclass(frozen=True)
class Transaction:
    """A COMMIT or ABORT record: where it is in the WAL and its timestamp."""

    lsn: int
    time: datetime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest_transaction(waldump_output: str) -> Transaction | None:
    """The last COMMIT/ABORT record in ``pg_waldump`` output (run with TZ=UTC)."""
    from pgvault.wal import parse_lsn

    found = _XACT.findall(waldump_output)
    if not found:
        return None
    lsn, moment = found[-1]
    return Transaction(parse_lsn(lsn), datetime.fromisoformat(moment).replace(tzinfo=UTC))


def rpo_seconds(scan: WalScan, *, replayed_to: int | None, reached_time: datetime | None) -> float | None:
    """How far behind the newest archived transaction the restore ended: 0 when it replayed past it.

    ``replayed_to`` is the end of the WAL the server replayed (or the backup's
    consistency point when it replayed nothing more); None: unknown. When the
    search found no transaction, every transaction is older than the WAL it
    searched: a restore that got past the start of that WAL has them all.
    """
    newest = scan.newest
    if newest is None:
        if scan.scanned_from is not None and replayed_to is not None and replayed_to >= scan.scanned_from:
            return 0.0
        return None
    if replayed_to is not None and replayed_to > newest.lsn:
        return 0.0
    if reached_time is None:
        return None
    return max(0.0, (newest.time - reached_time).total_seconds())


def _owner_for(scratch_base: str) -> pwd.struct_passwd:
    """Who the drill's server runs as: the scratch base's owner (postgres when root owns it), or ourselves."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    st = os.stat(scratch_base)
    return pwd.getpwuid(st.st_uid) if st.st_uid != 0 else pwd.getpwnam("postgres")


def _as(user: pwd.struct_passwd, cmd: list[str]) -> list[str]:
    return ["runuser", "-u", user.pw_name, "--", *cmd] if os.geteuid() == 0 else cmd


def _prepare_scratch(scratch_base: str) -> tuple[str, pwd.struct_passwd]:
    try:
        os.makedirs(scratch_base, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="drill-", dir=scratch_base)
    except OSError as exc:
        raise DrillError(f"cannot create a scratch directory in {scratch_base}: {exc.strerror}",
                         hint="give `pgvault drill --scratch-dir` a directory with room for the whole database") from None
    user = _owner_for(scratch_base)
    if os.geteuid() == 0:
        os.chown(scratch, user.pw_uid, user.pw_gid)
    return scratch, user


def _make_safe_to_start(data_dir: str, user: pwd.struct_passwd) -> list[str]:
    """Settings and files that keep the drill's server away from production; returns what was written."""
    written = []
    conf = os.path.join(data_dir, "postgresql.conf")
    if not os.path.exists(conf):  # Debian keeps it in /etc/postgresql: the defaults will do for a drill
        with open(conf, "w") as f:
            f.write("# written by pgvault drill: the backup holds no postgresql.conf\n")
        written.append("postgresql.conf")
    hba = os.path.join(data_dir, "pg_hba.conf")
    try:
        with open(hba) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    # First match wins: the drill connects over its private socket whatever production's rules say.
    with open(hba, "w") as f:
        f.write("# pgvault drill: the socket directory is private to the server's owner\nlocal all all trust\n" + old)
    written.append("pg_hba.conf (local trust first)")
    with open(os.path.join(data_dir, "postgresql.auto.conf"), "a") as f:
        # after restore's block, so it wins: no TCP listener next to production's server
        f.write("# pgvault drill\nlisten_addresses = ''\n")
    written.append("listen_addresses = ''")
    if os.geteuid() == 0:
        for name in ("postgresql.conf", "pg_hba.conf", "postgresql.auto.conf"):
            os.chown(os.path.join(data_dir, name), user.pw_uid, user.pw_gid)
    return written


def _connect(server, user: pwd.struct_passwd, dbname: str):
    import psycopg

    try:
        return psycopg.connect(host=server.socket_dir, port=server.port, user=user.pw_name, dbname=dbname,
                               autocommit=True, connect_timeout=10, application_name="pgvault drill")
    except psycopg.Error as exc:
        raise DrillError(f"database {dbname!r} of the restored server does not accept connections: "
                         f"{' '.join(str(exc).split())}") from None


def sanity_checks(server, user: pwd.struct_passwd) -> tuple[list[DatabaseCheck], str]:
    """Connect to every database, count every user table's rows, run amcheck where installed."""
    import psycopg

    try:
        with _connect(server, user, "postgres") as conn:
            names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname")]
            has_amcheck = conn.execute(
                "SELECT count(*) FROM pg_available_extensions WHERE name = 'amcheck'").fetchone()[0] > 0
        checks, indexes = [], 0
        for name in names:
            with _connect(server, user, name) as conn:
                tables, rows = _count_tables(conn, name)
                if has_amcheck:
                    indexes += _amcheck(conn, name)
                checks.append(DatabaseCheck(name, tables, rows))
    except psycopg.Error as exc:  # a catalog query failed: the restored server is not sound
        raise DrillError(f"checking the restored server failed: {' '.join(str(exc).split())}") from None
    amcheck = (f"ok: {indexes} B-tree indexes checked" if has_amcheck
               else "skipped: the amcheck extension is not installed (postgresql-contrib)")
    return checks, amcheck


def _count_tables(conn, dbname: str) -> tuple[int, int]:
    """(tables, rows) of the database's permanent tables and populated materialized views, every row read."""
    import psycopg
    from psycopg import sql

    tables = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE (c.relkind = 'r' OR (c.relkind = 'm' AND c.relispopulated)) AND c.relpersistence = 'p' "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' "
        "ORDER BY 1, 2").fetchall()
    rows = 0
    for schema, table in tables:
        try:
            rows += conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
                sql.Identifier(schema), sql.Identifier(table))).fetchone()[0]
        except psycopg.Error as exc:
            raise DrillError(f"reading table {schema}.{table} of database {dbname!r} failed: "
                             f"{' '.join(str(exc).split())}") from None
    return len(tables), rows


def _amcheck(conn, dbname: str) -> int:
    import psycopg

    # The scratch copy is thrown away: creating the extension there changes nothing that stays.
    conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    rows = conn.execute(
        "SELECT c.oid, n.nspname || '.' || c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_am a ON a.oid = c.relam "
        "WHERE a.amname = 'btree' AND c.relpersistence = 'p' AND i.indisvalid AND i.indisready").fetchall()
    for oid, name in rows:
        try:
            conn.execute("SELECT bt_index_check(%s)", (oid,))
        except psycopg.Error as exc:
            raise DrillError(f"amcheck found index {name} of database {dbname!r} corrupt: "
                             f"{' '.join(str(exc).split())}") from None
    return len(rows)


@dataclass(frozen=True)
class WalScan:
    """What the search for the newest archived transaction found, and from which LSN it searched."""

    newest: Transaction | None
    scanned_from: int | None  # None: pg_waldump is missing, nothing was searched


def newest_archived_transaction(storage, plan, *, keyring, require_encryption: bool, bin_dir: str | None,
                                major: int, tmp_dir: str) -> WalScan:
    """The newest COMMIT/ABORT in the plan's WAL, searched with pg_waldump from its newest segment backwards."""
    from pgvault import pg
    from pgvault.archive import write_verified
    from pgvault.wal import segno_start_lsn

    waldump = pg.find_program("pg_waldump", bin_dir=bin_dir, major=major)
    if waldump is None:
        return WalScan(None, None)
    segments = [w for w in plan.wal if w.file.kind == "segment"][-RPO_SCAN_SEGMENTS:]
    for entry in reversed(segments):
        path = os.path.join(tmp_dir, entry.name)
        write_verified(storage, entry, path, keyring=keyring, require_encryption=require_encryption)
        try:
            # pg_waldump stops with an error at the end of the records in a switched segment: the output counts
            out = subprocess.run([waldump, path], check=False, capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "TZ": "UTC", "LC_ALL": "C"}).stdout
        finally:
            os.unlink(path)
        found = newest_transaction(out)
        if found is not None:
            return WalScan(found, None)
    if not segments:
        return WalScan(None, None)
    return WalScan(None, segno_start_lsn(segments[0].file.segno, segment_size=plan_segment_size(plan)))


def plan_segment_size(plan) -> int:
    from pgvault.wal import DEFAULT_SEGMENT_SIZE

    sizes = {w.size for w in plan.wal if w.file.kind == "segment"}
    return sizes.pop() if len(sizes) == 1 else DEFAULT_SEGMENT_SIZE


def _stop(pg_ctl: str, data_dir: str, user: pwd.struct_passwd) -> None:
    if not os.path.exists(os.path.join(data_dir, "postmaster.pid")):
        return
    for mode in ("fast", "immediate"):
        done = subprocess.run(_as(user, [pg_ctl, "-D", data_dir, "-m", mode, "-w", "-t", "60", "stop"]),
                              check=False, capture_output=True, text=True, cwd="/")
        if done.returncode == 0:
            return


def run_drill(*, storage, record, keyring, scratch_base: str, config_path: str | None, pgvault_executable: str,
              bin_dir: str | None, parallel: int = 2, timeout: float = 86400,
              notify: Callable[[str], None] | None = None) -> DrillRecord:
    """One drill (see the module's description); a passing drill's record, or DrillError with the reason.

    The DrillError carries the failed drill's record as ``record`` for the caller to store.
    """
    from pgvault.planner import plan_restore
    from pgvault.restore import find_pg_ctl, restore, start_and_wait
    from pgvault.snapshot import load_catalog
    from pgvault.targets import Target
    from pgvault.wal import format_lsn

    notify = notify or (lambda _m: None)
    started_at = datetime.now(UTC)
    began = time.monotonic()
    require_encryption = record.encryption_key_id is not None
    facts: dict[str, Any] = {}
    scratch = user = pg_ctl = data_dir = None
    try:
        try:
            loaded = load_catalog(storage, record=record, keyring=keyring)
            plan = plan_restore(loaded.snapshot, Target(kind="latest"), timeline="latest")
            manifest = loaded.manifests[plan.backup.label]
            facts["backup"] = plan.backup.label
            facts["wal_end_lsn"] = format_lsn(plan.window.latest.lsn) if plan.window.latest else None
            scratch, user = _prepare_scratch(scratch_base)
            data_dir = os.path.join(scratch, "data")
            pg_ctl = find_pg_ctl(bin_dir=bin_dir, major=manifest.pg_major_version)
            notify(f"restoring backup {plan.backup.label} to the end of the archive into {data_dir}")
            result = restore(plan, manifest, storage=storage, keyring=keyring, data_dir=data_dir,
                             config_path=config_path, pgvault_executable=pgvault_executable, parallel=parallel,
                             port=free_port(), start=False, disable_archiving=True,
                             require_encryption=require_encryption, bin_dir=bin_dir,
                             owner=user.pw_name if os.geteuid() == 0 else None)
            facts["bytes_restored"] = result.materialized.bytes_total
            _make_safe_to_start(data_dir, user)
            server, reached, _why = start_and_wait(plan, data_dir, pg_ctl=pg_ctl, user=user,
                                                   as_root=os.geteuid() == 0, label=manifest.label, pause=False,
                                                   timeout=timeout, notify=notify)
            rto = time.monotonic() - began
            facts["rto_seconds"] = round(rto, 3)
            facts["reached_lsn"] = format_lsn(reached.replay_lsn) if reached.replay_lsn is not None else None
            facts["reached_transaction_time"] = _iso(reached.last_transaction_time)
            notify(f"the restored server is open after {rto:.1f} s; checking every database")
            databases, amcheck = sanity_checks(server, user)
            facts["databases"] = tuple({"name": d.name, "tables": d.tables, "rows": d.rows} for d in databases)
            facts["amcheck"] = amcheck
            scan = newest_archived_transaction(storage, plan, keyring=keyring, require_encryption=require_encryption,
                                               bin_dir=bin_dir, major=manifest.pg_major_version, tmp_dir=scratch)
            facts["newest_archived_commit"] = _iso(scan.newest.time) if scan.newest else None
            replayed_to = max(reached.replay_lsn or 0, plan.backup.stop_lsn)
            facts["rpo_seconds"] = rpo_seconds(scan, replayed_to=replayed_to, reached_time=reached.last_transaction_time)
        except DrillError:
            raise
        except PlanError as exc:
            raise DrillError(f"drill failed: {exc.message}",
                             hint="a drill restores the newest backup and the WAL after it; `pgvault list` shows "
                                  "what the vault holds") from None
        except PgvaultError as exc:
            raise DrillError(f"drill failed: {exc.message}", hint=exc.hint) from None
        finally:
            if data_dir is not None and pg_ctl is not None and user is not None:
                _stop(pg_ctl, data_dir, user)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    except DrillError as exc:
        exc.record = DrillRecord(ok=False, started_at=_iso(started_at), finished_at=_iso(datetime.now(UTC)),
                                 error=exc.message, **facts)
        raise
    return DrillRecord(ok=True, started_at=_iso(started_at), finished_at=_iso(datetime.now(UTC)), **facts)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()
