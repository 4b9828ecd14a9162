"""`pgvault expire` and `pgvault verify`: keeping the vault trim and proving what it holds (one library call each)."""

from __future__ import annotations

import os
import sys

import click

from pgvault.cli import AppState, _archive_context, cli, emit_json, pass_state
from pgvault.errors import VerifyFailedError


def lock_dir_for(settings) -> str:
    """The local lock directory `pgvault backup` and `pgvault dump` use: expire must meet them there."""
    return os.path.join(settings.archive.spool_dir, settings.vault.cluster, "backup")


@cli.command("expire")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed, and why; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print what was (or would be) removed and kept as JSON.")
@pass_state
def expire_cmd(state: AppState, dry_run: bool, as_json: bool) -> None:
    """Remove what [retention] no longer keeps: backups, dumps, WAL, and leftovers of interrupted backups.

    With no [retention] settings nothing is removed. Runs under the backup lock:
    never while a backup or dump runs.
    """
    from pgvault.expire import format_expire, run_expire
    from pgvault.retention import policy_from_settings

    settings = state.settings
    storage, record, keyring, _options = _archive_context(settings)

    def notify(message: str) -> None:
        click.echo(f"pgvault expire: {message}", err=True)

    result = run_expire(storage, record=record, keyring=keyring, policy=policy_from_settings(settings.retention),
                        lock_dir=lock_dir_for(settings), dry_run=dry_run,
                        notify=notify if sys.stderr.isatty() else None)
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(format_expire(result))


@cli.command("verify")
@click.option("--backup", "labels", multiple=True, metavar="LABEL",
              help="A backup or dump to verify (repeatable; default: every backup and dump).")
@click.option("--read-wal", is_flag=True, help="Also read every WAL segment of the checked chains.")
@click.option("--parallel", type=click.IntRange(1, 64), default=None,
              help="Objects read at once (default: [backup] parallel).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_state
def verify_cmd(state: AppState, labels: tuple[str, ...], read_wal: bool, parallel: int | None, as_json: bool) -> None:
    """Read backups and dumps back from the vault, check every object and the WAL chain; exit 105 on any problem."""
    from pgvault.progressbar import ProgressBar
    from pgvault.verify import format_report, verify_backups

    settings = state.settings
    storage, record, keyring, _options = _archive_context(settings)
    bar = ProgressBar() if sys.stderr.isatty() else None

    def progress(p) -> None:
        assert bar is not None
        bar.update(bytes_done=p.bytes_done, bytes_total=p.bytes_total, files_done=p.objects_done,
                   files_total=p.objects_total, note="objects")

    try:
        report = verify_backups(storage, record=record, keyring=keyring, labels=list(labels) or None,
                                parallel=parallel or settings.backup.parallel, read_wal=read_wal,
                                progress=progress if bar is not None else None,
                                tmp_dir=os.path.join(settings.archive.spool_dir, settings.vault.cluster, "verify"))
    finally:
        if bar is not None:
            bar.finish()
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(format_report(report))
    if not report.ok:
        first = report.problems[0]
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise VerifyFailedError(f"verify found {len(report.problems)} problem"
                                f"{'s' if len(report.problems) != 1 else ''}: {first}{more}",
                                hint="restore from another copy, or take a new backup; "
                                     "`pgvault verify --json` lists every problem")
