"""`pgvault daemon`, `pgvault status` and `pgvault drill`: thin commands over daemon, status and drill."""

from __future__ import annotations

import os
import sys

import click

from pgvault.cli import AppState, _archive_context, cli, emit_json, pass_state


@cli.command("daemon")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="One line per event on stderr: text, or JSON for log shippers.")
@pass_state
def daemon_cmd(state: AppState, log_format: str) -> None:
    """Run the [schedule] jobs on this node (if its role matches [backup] from) and serve [metrics].

    One per cluster and vault on a host. SIGTERM/SIGINT: stop, interrupting a
    running job cleanly (nothing is half-committed), exit 0. SIGHUP: reload the
    configuration.
    """
    from pgvault.cli_restore import _pgvault_executable
    from pgvault.config import load_settings
    from pgvault.daemon import Daemon, EventLog

    base_cmd = [_pgvault_executable()] + (["--config", os.path.abspath(state.config_path)] if state.config_path else [])
    daemon = Daemon(load_settings=lambda: load_settings(state.config_path), base_cmd=base_cmd,
                    log=EventLog(log_format, sys.stderr))
    sys.exit(daemon.run())


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--metrics", "as_metrics", is_flag=True, help="Print what /metrics would serve (Prometheus text format).")
@pass_state
def status_cmd(state: AppState, as_json: bool, as_metrics: bool) -> None:
    """How things stand: jobs, last drill, backups, WAL archiving and the restorable window.

    Works without a running daemon: the jobs' and drills' results are read from
    the state directory, the rest from the vault and the server, now.
    """
    from pgvault.status import collect_status, format_status

    report = collect_status(state.settings)
    if as_metrics:
        from pgvault.metrics import render

        click.echo(render(report), nl=False)
    elif as_json:
        emit_json(report.to_dict())
    else:
        click.echo(format_status(report))


@cli.command("drill")
@click.option("--scratch-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Where the drill restores (needs room for the whole database; removed afterwards). "
                   "Default: <[archive] spool_dir>/<cluster>/drill.")
@click.option("--timeout", type=click.IntRange(1), default=86400, show_default=True, metavar="SECONDS",
              help="How long recovery may take.")
@click.option("--json", "as_json", is_flag=True, help="Print the drill's record as JSON.")
@pass_state
def drill_cmd(state: AppState, scratch_dir: str | None, timeout: int, as_json: bool) -> None:
    """Restore the newest backup to the end of the archive in a scratch directory, start it, check it, remove it.

    Records the restore time (RTO) and how far behind the newest archived
    transaction it ended (RPO) for `pgvault status` and the daemon's metrics.
    A failed drill exits 112 with its reason.
    """
    from pgvault.cli_restore import _config_path, _pgvault_executable
    from pgvault.drill import run_drill
    from pgvault.errors import DrillError
    from pgvault.status import StateStore, state_dir

    settings = state.settings
    storage, record, keyring, _options = _archive_context(settings)
    base = scratch_dir or os.path.join(settings.archive.spool_dir, settings.vault.cluster, "drill")
    store = StateStore(state_dir(settings.archive.spool_dir, settings.vault.cluster))

    def notify(message: str) -> None:
        click.echo(f"pgvault drill: {message}", err=True)

    try:
        result = run_drill(storage=storage, record=record, keyring=keyring, scratch_base=os.path.abspath(base),
                           config_path=_config_path(settings), pgvault_executable=_pgvault_executable(),
                           bin_dir=settings.postgres.bin_dir, parallel=settings.backup.parallel, timeout=timeout,
                           notify=notify)
    except DrillError as exc:
        failed = getattr(exc, "record", None)
        if failed is not None:
            store.write_drill(failed)
        raise
    store.write_drill(result)
    if as_json:
        emit_json(result.to_dict())
        return
    rpo = "unknown (no transaction in the newest archived WAL)" if result.rpo_seconds is None \
        else f"{result.rpo_seconds:.3f} s"
    click.echo(f"drill passed: backup {result.backup} restored to the end of the archive and opened in "
               f"{result.rto_seconds:.1f} s (RTO); RPO {rpo}")
    for db in result.databases:
        click.echo(f"  database {db['name']}: {db['tables']} tables, {db['rows']} rows")
    click.echo(f"  amcheck: {result.amcheck}")
