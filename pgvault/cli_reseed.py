"""`pgvault reseed` and `pgvault orphans`: rebuild a lost node as a standby; list and fetch kept diverged WAL."""

from __future__ import annotations

import os
import sys

import click

from pgvault.cli import AppState, _archive_context, cli, emit_json, pass_state
from pgvault.cli_restore import restore_reporters


@cli.command("reseed")
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="The node's data directory (absent or empty, or with --delta the old node's).")
@click.option("--primary-conninfo", required=True, metavar="CONNINFO",
              help="How the node reaches the current primary (written as primary_conninfo; a role with REPLICATION).")
@click.option("--slot", metavar="NAME", help="Stream through this physical replication slot, created on the primary if missing.")
@click.option("--delta", is_flag=True,
              help="Rebuild a non-empty DIR in place: files that match the backup are kept; WAL the node wrote "
                   "beyond the primary's history is kept in the vault under orphans/ first.")
@click.option("--port", type=click.IntRange(1, 65535), default=None, metavar="N",
              help="Port for the node (default: its own configuration's).")
@click.option("--no-start", "no_start", is_flag=True,
              help="Restore and configure only; do not start the server (a failover manager such as Patroni starts it).")
@click.option("--max-lag-bytes", type=click.IntRange(0), default=16 << 20, show_default=True, metavar="BYTES",
              help="The node counts as streaming once its replay lag behind the primary is at most this.")
@click.option("--timeout", type=click.IntRange(1), default=600, show_default=True, metavar="SECONDS",
              help="How long to wait for the node to stream (and for the primary's timeline history to reach the vault).")
@click.option("--parallel", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Objects fetched at once (default: [backup] parallel).")
@click.option("--json", "as_json", is_flag=True, help="Print the result record as JSON.")
@pass_state
def reseed_cmd(state: AppState, data_dir: str, primary_conninfo: str, slot: str | None, delta: bool,
               port: int | None, no_start: bool, max_lag_bytes: int, timeout: int, parallel: int | None,
               as_json: bool) -> None:
    """Rebuild the node in DIR from the vault as a streaming standby of the primary at CONNINFO.

    A node already streaming from that primary is left alone (exit 0). WAL the
    node wrote that the primary never saw (an old primary after a failover) is
    kept in the vault under orphans/ before anything changes; then the newest
    backup is restored, the node is configured as a standby (restore_command
    through pgvault, recovery_target_timeline = latest) and started, and reseed
    waits until it streams with its lag under --max-lag-bytes.
    """
    from pgvault.cli_restore import _config_path, _env_warnings, _pgvault_executable
    from pgvault.progressbar import ProgressBar
    from pgvault.reseed import reseed
    from pgvault.snapshot import load_catalog
    from pgvault.walcmd import wal_options

    settings = state.settings
    storage, record, keyring, options = _archive_context(settings)
    for warning in _env_warnings():
        click.echo(f"WARNING: {warning}", err=True)
    bar = ProgressBar() if sys.stderr.isatty() else None
    notify, warn, progress = restore_reporters(bar, "pgvault reseed")
    try:
        result = reseed(
            data_dir=data_dir, primary_conninfo=primary_conninfo, storage=storage, record=record, keyring=keyring,
            options=wal_options(settings, options),
            load_catalog=lambda: load_catalog(storage, record=record, keyring=keyring),
            config_path=_config_path(settings), pgvault_executable=_pgvault_executable(), slot=slot, delta=delta,
            port=port, start=not no_start, max_lag_bytes=max_lag_bytes, timeout=timeout,
            history_wait=min(timeout, 120), parallel=parallel if parallel is not None else settings.backup.parallel,
            bin_dir=settings.postgres.bin_dir, progress=progress if bar is not None else None, notify=notify,
            warn=warn)
    finally:
        if bar is not None:
            bar.finish()
    if as_json:
        emit_json(result.to_dict())
        return
    _print_reseed(result)


def _print_reseed(result) -> None:
    from pgvault.orphans import describe
    from pgvault.wal import format_lsn

    p = result.primary
    if result.action == "left-alone":
        s = result.streaming
        click.echo(f"{result.data_dir} is already a healthy standby of {p.description}: it streams timeline "
                   f"{s.received_timeline}, replay lag {s.lag_bytes} bytes; left alone")
        return
    d = result.divergence
    if d is not None and d.diverged:
        state = "kept" if result.orphan_new else "already kept"
        click.echo(f"diverged: the node wrote past the fork point {format_lsn(d.fork_lsn)} on timeline "
                   f"{d.fork_timeline}; that WAL is {state} in the vault, never replayed:")
        click.echo(f"  orphan {describe(result.orphan)}")
        click.echo(f"  inspect it: pgvault orphans; replay it into a scratch node: pgvault orphans fetch {result.orphan.id} DIR")
    elif d is not None and d.fork_lsn is not None:
        click.echo(f"not diverged: the node holds no WAL past the fork point {format_lsn(d.fork_lsn)}")
    elif result.node is not None:
        click.echo(f"not diverged: the node is on the primary's timeline path (timeline {result.node.timeline})")
    r = result.restore
    m = r.materialized
    click.echo(f"restored backup {r.plan.backup.label} into {result.data_dir}: {m.files} files"
               + (f", {m.files_kept} kept, {m.files_fetched} fetched" if m.delta else "") + f", {m.seconds:.1f} s")
    click.echo("standby settings (postgresql.auto.conf, with standby.signal):")
    for key, value in result.settings.items():
        click.echo(f"  {key} = {value}")
    if result.slot:
        click.echo(f"replication slot {result.slot} on the primary: {'created' if result.slot_created else 'exists'}")
    for note in result.notes:
        click.echo(f"  note: {note}")
    if not result.started:
        click.echo("not started (--no-start); start it as the data directory's owner: "
                   f"pg_ctl -D {result.data_dir} start")
        return
    s = result.streaming
    click.echo(f"streaming from {p.description} (pid {result.pid}, log {result.log_file}): timeline "
               f"{s.received_timeline}, replay {format_lsn(s.replay_lsn) if s.replay_lsn is not None else '-'}, "
               f"primary at {format_lsn(s.primary_lsn)}, lag {s.lag_bytes} bytes; took {result.seconds:.1f} s")


@cli.group("orphans", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_context
def orphans_group(ctx: click.Context, as_json: bool) -> None:
    """List the diverged WAL kept in the vault (orphans/): never replayed by any restore.

    Each entry is the WAL a node wrote past the point where the primary it
    rejoined had forked: fork LSN, time range and number of committed
    transactions. `pgvault orphans fetch ID DIR` writes its segments out.
    """
    if ctx.invoked_subcommand is not None:
        return
    from pgvault.orphans import describe, list_orphans

    state = ctx.find_object(AppState)
    storage, record, keyring, _options = _archive_context(state.settings)
    kept = list_orphans(storage, keyring=keyring, require_encryption=record.encryption_key_id is not None)
    if as_json:
        emit_json({"orphans": [o.to_dict() for o in kept]})
        return
    if not kept:
        click.echo("no orphaned WAL is kept")
        return
    for o in kept:
        click.echo(describe(o))


@orphans_group.command("fetch")
@click.argument("orphan_id", metavar="ID")
@click.argument("dest", type=click.Path(file_okay=False, exists=True), metavar="DIR")
@click.option("--json", "as_json", is_flag=True, help="Print the files written as JSON.")
@pass_state
def orphans_fetch(state: AppState, orphan_id: str, dest: str, as_json: bool) -> None:
    """Write the segments of orphan ID, verified, into DIR (e.g. a scratch node's pg_wal); nothing is overwritten."""
    from pgvault.orphans import fetch_orphan

    storage, record, keyring, _options = _archive_context(state.settings)
    paths = fetch_orphan(storage, orphan_id, os.path.abspath(dest), keyring=keyring,
                         require_encryption=record.encryption_key_id is not None)
    if as_json:
        emit_json({"id": orphan_id, "files": paths})
        return
    for path in paths:
        click.echo(path)
