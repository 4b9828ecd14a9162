"""The `pgvault` command: parse, call one library function, print (text or --json).

Errors: every PgvaultError becomes one line on stderr (plus a HINT line) and its
exit code; a traceback only with --debug. Heavy imports stay inside commands so
that `pgvault wal-push` on its fast path starts quickly.
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import click

from pgvault import __version__
from pgvault.errors import CheckFailedError, PgvaultError

OK_MARK = "✓"
FAIL_MARK = "✗"


@dataclass
class AppState:
    config_path: str | None
    debug: bool
    _settings: Any = field(default=None, repr=False)

    @property
    def settings(self):
        if self._settings is None:
            from pgvault.config import load_settings

            self._settings = load_settings(self.config_path)
        return self._settings


def print_error(exc: PgvaultError) -> None:
    click.echo(f"pgvault: error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"HINT: {exc.hint}", err=True)


class PgvaultGroup(click.Group):
    """Maps PgvaultError to its exit code and a one-line message."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PgvaultError as exc:
            if _debug(ctx):
                traceback.print_exc()
            print_error(exc)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            # The reader went away (`pgvault config | head -1`): click's main exits
            # quietly, as other commands do, instead of reporting an internal error.
            raise
        except KeyboardInterrupt:
            click.echo("pgvault: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # the one broad except: the CLI boundary
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"pgvault: internal error: {exc.__class__.__name__}: {exc}", err=True)
            click.echo("HINT: rerun with --debug for a traceback, and report it", err=True)
            ctx.exit(1)


def _debug(ctx: click.Context) -> bool:
    obj = ctx.find_object(AppState)
    return bool(obj and obj.debug)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@click.group(cls=PgvaultGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", metavar="FILE", help="Config file (default: $PGVAULT_CONFIG, then /etc/pgvault/pgvault.toml, then built-in defaults).")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(__version__, prog_name="pgvault")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool) -> None:
    """pgvault: backups and point-in-time recovery for PostgreSQL."""
    ctx.obj = AppState(config_path=config_path, debug=debug)


pass_state = click.make_pass_decorator(AppState)


# --- init -----------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the vault record as JSON.")
@pass_state
def init(state: AppState, as_json: bool) -> None:
    """Create the vault record for this cluster (a no-op if it is already this cluster's)."""
    from pgvault import context
    from pgvault.vault import InitResult, check_same_cluster, init_vault, read_vault_record

    settings = state.settings
    storage = context.storage_for(settings)
    existing = read_vault_record(storage)
    if existing is not None:
        facts = _cluster_identity(settings)
        check_same_cluster(existing, facts[0], storage=storage)
        # The record says whether the vault is encrypted, and init never changes it: a
        # config that disagrees is refused (nothing is written), as every other command does.
        context.vault_keyring(settings, storage, existing)
        result = InitResult(record=existing, created=False)
    else:
        # The key file first: it is pgvault's own to check; then ask PostgreSQL who it is.
        master = context.master_key_for(settings)
        facts = _cluster_identity(settings)
        key_id = None
        if master is not None:
            from pgvault.keys import create_vault_key

            # A key left by an init that stopped before writing the record is reused.
            keyring = _keyring_or_none(storage, master)
            key_id = keyring.current.key_id if keyring is not None else create_vault_key(storage, master).key_id
        result = init_vault(
            storage,
            cluster=settings.vault.cluster,
            system_identifier=facts[0],
            pg_major_version=facts[1],
            wal_segment_size=facts[2],
            encryption_key_id=key_id,
        )
        if not result.created:  # another init won the race: its record is the truth
            context.vault_keyring(settings, storage, result.record)
    record = result.record
    if as_json:
        emit_json({"created": result.created, "vault": storage.description, "record": _record_dict(record)})
        return
    verb = "initialized" if result.created else "already initialized for this cluster; nothing changed"
    click.echo(f"vault {storage.description}: {verb}")
    click.echo(f"  cluster            {record.cluster}")
    click.echo(f"  system identifier  {record.system_identifier}")
    click.echo(f"  PostgreSQL         {record.pg_major_version}")
    click.echo(f"  encryption         {'AES-256-GCM, vault key ' + record.encryption_key_id if record.encryption_key_id else 'off'}")


def _keyring_or_none(storage, master):
    from pgvault.keys import load_keyring

    keyring = load_keyring(storage, master)
    return keyring if len(keyring) else None


def _record_dict(record) -> dict:
    return record._asdict() | {"system_identifier": str(record.system_identifier)}


def _cluster_identity(settings) -> tuple[int, int, int]:
    """(system identifier, major version, WAL segment size): from the server, else from [postgres] data_dir."""
    from pgvault import pg

    try:
        with pg.connect(settings.postgres.conninfo) as conn:
            facts = pg.server_facts(conn)
        return facts.system_identifier, facts.major_version, facts.wal_segment_size
    except PgvaultError:
        if not settings.postgres.data_dir:
            raise
        control = pg.read_control_file(settings.postgres.data_dir)
        return control.system_identifier, control.major_version, control.wal_segment_size


# --- check ----------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checklist as JSON.")
@pass_state
def check(state: AppState, as_json: bool) -> None:
    """Check config, vault, PostgreSQL and archiving settings; non-zero exit if any item fails."""
    from pgvault.checks import config_failed, run_checks

    try:
        settings = state.settings
    except PgvaultError as exc:  # the config itself is broken: nothing else can be checked
        items = config_failed(exc)
    else:
        items = run_checks(settings)
    failed = [i for i in items if not i.ok]
    if as_json:
        emit_json({"ok": not failed, "items": [i.to_dict() for i in items]})
    else:
        for item in items:
            click.echo(f"{OK_MARK if item.ok else FAIL_MARK} {item.name}: {item.detail}")
            if item.hint and not item.ok:
                click.echo(f"    hint: {item.hint}")
    if failed:
        if not as_json:
            click.echo(f"{len(failed)} of {len(items)} checks failed", err=True)
        raise SystemExit(CheckFailedError.exit_code)


# --- config ---------------------------------------------------------------

@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_state
def show_config(state: AppState, as_json: bool) -> None:
    """Show the effective settings (secrets hidden) and where they came from."""
    from pgvault.config import settings_as_dict

    settings = state.settings
    data = settings_as_dict(settings)
    if data["vault"].get("secret_access_key"):
        data["vault"]["secret_access_key"] = "********"
    if as_json:
        emit_json(data)
        return
    click.echo(f"# from {settings.source}")
    for section, values in data.items():
        if not isinstance(values, dict):
            continue
        click.echo(f"[{section}]")
        for key, value in values.items():
            click.echo(f"{key} = {json.dumps(value)}")


# --- key ------------------------------------------------------------------

@cli.group()
def key() -> None:
    """Encryption keys: generate a master key file, rotate the master key."""


@key.command("generate")
@click.argument("path", type=click.Path(dir_okay=False))
def key_generate(path: str) -> None:
    """Write a new master key file at PATH (mode 0600; refuses to overwrite)."""
    from pgvault.keys import generate_master_key_file

    master = generate_master_key_file(path)
    click.echo(f"wrote master key {master.key_id} to {path} (mode 0600)")
    click.echo("keep a copy somewhere safe: without it, encrypted backups cannot be read")


@key.command("rotate")
@click.option("--new-key-file", required=True, type=click.Path(dir_okay=False), help="The new master key file (from `pgvault key generate`).")
@pass_state
def key_rotate(state: AppState, new_key_file: str) -> None:
    """Re-wrap the vault's keys under a new master key; data objects are not rewritten."""
    from pgvault import context
    from pgvault.keys import load_master_key, rotate_master_key
    from pgvault.vault import require_vault_record

    settings = state.settings
    storage = context.storage_for(settings)
    old = context.master_key_for(settings)
    if old is None:
        raise PgvaultError("[encryption] key_file is not set: there is no master key to rotate")
    # Only an encrypted vault has keys to rotate. (Not vault_keyring's "unlocks the record's
    # key" check: a rotation that stopped while deleting old copies must be able to resume.)
    mismatch = context.encryption_mismatch(settings, require_vault_record(storage), where=storage.description)
    if mismatch is not None:
        raise mismatch
    new = load_master_key(new_key_file)
    count = rotate_master_key(storage, old, new)
    click.echo(f"re-wrapped {count} vault key(s) under master key {new.key_id}")
    click.echo(f"now set [encryption] key_file = {json.dumps(new_key_file)} on every node; the old key file no longer opens this vault")


# --- WAL archiving -------------------------------------------------------
# archive_command and restore_command normally bypass click (entry.py calls
# pgvault.walcmd directly); these commands are the same functions for --help
# and for option forms the direct path does not take.

from pgvault.walcmd import archive_context as _archive_context  # noqa: E402  (used by other cli modules)


@cli.command("wal-push")
@click.argument("path")
@pass_state
def wal_push(state: AppState, path: str) -> None:
    """archive_command: archive the WAL file PATH (%p); exit 0 only once it is durably in the vault."""
    from pgvault.walcmd import run_wal_push

    sys.exit(run_wal_push(state.config_path, path, debug=state.debug))


@cli.command("wal-fetch")
@click.argument("name")
@click.argument("dest")
@pass_state
def wal_fetch(state: AppState, name: str, dest: str) -> None:
    """restore_command: write WAL file NAME (%f) to DEST (%p); exit 1 if the vault has no such file, 255 on errors."""
    from pgvault.walcmd import run_wal_fetch

    sys.exit(run_wal_fetch(state.config_path, name, dest, debug=state.debug))


@cli.command("wal-push-ahead", hidden=True)
@click.argument("wal_dir")
@click.option("--skip", help="A file the starting call pushes itself (left alone for a moment).")
@click.option("--lock-fd", type=int, help="An inherited descriptor holding the worker lock.")
@pass_state
def wal_push_ahead(state: AppState, wal_dir: str, skip: str | None, lock_fd: int | None) -> None:
    """(internal) push the WAL files waiting in WAL_DIR/archive_status; started by wal-push in async mode."""
    from pgvault.pushahead import run_worker
    from pgvault.spool import Spool

    from pgvault.walcmd import wal_options

    settings = state.settings
    storage, record, _keyring, options = _archive_context(settings)
    options = wal_options(settings, options)
    run_worker(wal_dir, storage=storage, record=record, options=options,
               spool=Spool(settings.archive.spool_dir, settings.vault.cluster), parallel=settings.archive.parallel,
               skip=skip, lock_fd=lock_fd)


@cli.command("wal-prefetch", hidden=True)
@click.argument("name")
@click.option("--count", type=int, default=8)
@pass_state
def wal_prefetch(state: AppState, name: str, count: int) -> None:
    """(internal) fetch the segments after NAME into the spool; started by wal-fetch."""
    from pgvault.prefetch import run_prefetch
    from pgvault.spool import Spool

    settings = state.settings
    storage, record, keyring, _options = _archive_context(settings)
    run_prefetch(name, storage=storage, record=record, keyring=keyring,
                 spool=Spool(settings.archive.spool_dir, settings.vault.cluster),
                 count=count, parallel=settings.archive.parallel)


# --- list -----------------------------------------------------------------

@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_state
def list_cmd(state: AppState, as_json: bool) -> None:
    """What the vault holds: backups, dumps, archived WAL per timeline (with gaps), the restorable window."""
    from pgvault.catalog import summarize_wal
    from pgvault.dump import list_dumps
    from pgvault.planner import describe_window, restorable_window
    from pgvault.snapshot import load_catalog

    settings = state.settings
    storage, record, keyring, _options = _archive_context(settings)
    loaded = load_catalog(storage, record=record, keyring=keyring)
    snapshot = loaded.snapshot
    dumps = list_dumps(storage, keyring, require_encryption=record.encryption_key_id is not None)
    try:
        window = describe_window(restorable_window(snapshot))
    except PgvaultError as exc:  # e.g. the newest timeline's history file is missing
        window = {"error": exc.message}
    data = {
        "vault": storage.description,
        "cluster": record.cluster,
        "system_identifier": str(record.system_identifier),
        "backups": [_backup_row(m) for m in loaded.manifests.values()],
        "dumps": [{"label": d.label, "started_at": d.started_at, "stopped_at": d.stopped_at,
                   "databases": [db.name for db in d.databases], "database_bytes": d.size,
                   "vault_bytes": d.stored_size, "duration_seconds": d.duration_seconds} for d in dumps],
        "wal": _wal_rows(summarize_wal(snapshot.wal), record.wal_segment_size),
        "newest_archived_segment_at": _when(max((w.completed_ms for w in snapshot.wal
                                                 if w.file.kind == "segment"), default=0)),
        "restorable_window": window,
        "notes": list(loaded.notes),
    }
    if as_json:
        emit_json(data)
        return
    _print_listing(data)


def _when(ms: int) -> str | None:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds") if ms else None


def _backup_row(m) -> dict:
    from pgvault.wal import format_lsn

    return {
        "label": m.label, "type": m.type, "parent": m.parent, "timeline": m.timeline,
        "start_time": m.start_time.isoformat(timespec="seconds"), "stop_time": m.stop_time.isoformat(timespec="seconds"),
        "start_lsn": format_lsn(m.start_lsn), "stop_lsn": format_lsn(m.stop_lsn),
        "database_bytes": m.bytes_read, "vault_bytes": m.bytes_stored, "duration_seconds": m.duration_seconds,
        "backup_from": m.backup_from,
    }


def _wal_rows(timelines, segment_size: int) -> list[dict]:
    from pgvault.wal import segment_name

    def name(tli: int, segno: int) -> str:
        return segment_name(tli, segno, segment_size=segment_size)

    return [{
        "timeline": t.timeline,
        "first": name(t.timeline, t.first_segno) if t.segments else None,
        "last": name(t.timeline, t.last_segno) if t.segments else None,
        "segments": t.segments,
        "bytes": t.bytes,
        "gaps": [{"from": name(t.timeline, a), "to": name(t.timeline, b), "missing": b - a + 1} for a, b in t.gaps],
        "newest_completed_at": _when(t.newest_completed_ms),
        "partial": list(t.partial),
        "history_file": t.has_history,
    } for t in timelines]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_listing(data: dict) -> None:
    click.echo(f"vault {data['vault']} (cluster {data['cluster']}, system identifier {data['system_identifier']})")
    click.echo("backups:")
    if not data["backups"]:
        click.echo("  none yet (pgvault backup)")
    for b in data["backups"]:
        parent = f" <- {b['parent']}" if b["parent"] else ""
        click.echo(f"  {b['label']}  {b['type']:<4} tl {b['timeline']}  {b['start_time']} .. {b['stop_time']}  "
                   f"{b['start_lsn']} .. {b['stop_lsn']}  db {_mib(b['database_bytes'])}, vault {_mib(b['vault_bytes'])}, "
                   f"{b['duration_seconds']:.1f} s{parent}")
    click.echo("dumps:")
    if not data["dumps"]:
        click.echo("  none yet (pgvault dump)")
    for d in data["dumps"]:
        click.echo(f"  {d['label']}  {d['started_at']} .. {d['stopped_at']}  {', '.join(d['databases'])}  "
                   f"db {_mib(d['database_bytes'])}, vault {_mib(d['vault_bytes'])}")
    click.echo("archived WAL:")
    if not data["wal"]:
        click.echo("  none yet")
    for w in data["wal"]:
        span = f"{w['first']} .. {w['last']}" if w["segments"] else "no segments"
        click.echo(f"  timeline {w['timeline']}: {span}  ({w['segments']} segments, {_mib(w['bytes'])})")
        for g in w["gaps"]:
            click.echo(f"    GAP: {g['from']} .. {g['to']} ({g['missing']} missing)")
        for p in w["partial"]:
            click.echo(f"    partial: {p}")
    click.echo(f"newest archived segment completed at: {data['newest_archived_segment_at'] or '-'}")
    window = data["restorable_window"]
    if "error" in window:
        click.echo(f"restorable window: unknown ({window['error']})")
    elif not window.get("intervals"):
        click.echo("restorable window: nothing is restorable yet (take a backup)")
    else:
        spans = ", ".join(f"{i['start']['time']} .. {i['end']['time']}" for i in window["intervals"])
        click.echo(f"restorable window (timeline {window['timeline']}): {spans}")
    for note in data["notes"]:
        click.echo(f"note: {note}")


def main() -> None:
    cli(prog_name="pgvault")


# Commands of other modules register themselves on `cli` when imported.
import pgvault.cli_dump  # noqa: E402,F401
import pgvault.cli_backup  # noqa: E402,F401
import pgvault.cli_restore  # noqa: E402,F401
import pgvault.cli_reseed  # noqa: E402,F401
import pgvault.cli_daemon  # noqa: E402,F401
import pgvault.cli_maintain  # noqa: E402,F401

if __name__ == "__main__":
    main()
