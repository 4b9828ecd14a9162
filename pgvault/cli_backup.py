"""`pgvault backup`: take a physical base backup and commit it to the vault (one library call)."""

from __future__ import annotations

import os
import sys

import click

from pgvault.cli import AppState, _archive_context, cli, emit_json, pass_state
from pgvault.errors import ConfigError


@cli.command("backup")
@click.option("--type", "backup_type", type=click.Choice(["full", "incr"]), default="full", show_default=True,
              help="incr stores only the blocks changed since the newest backup (a full one if there is none).")
@click.option("--json", "as_json", is_flag=True, help="Print the result record as JSON.")
@pass_state
def backup(state: AppState, backup_type: str, as_json: bool) -> None:
    """Take a base backup of the cluster; it is listed once it is complete and its WAL is archived."""
    from pgvault.backup.physical import take_backup
    from pgvault.progressbar import ProgressBar, format_bytes
    from pgvault.spool import Spool
    from pgvault.walcmd import wal_options

    settings = state.settings
    if not settings.postgres.data_dir:
        raise ConfigError("[postgres] data_dir is not set: a backup reads the data directory directly",
                          hint="set [postgres] data_dir (or PGVAULT_POSTGRES_DATA_DIR) to the cluster's data directory")
    storage, record, keyring, options = _archive_context(settings)
    work_dir = os.path.join(settings.archive.spool_dir, settings.vault.cluster, "backup")
    bar = ProgressBar() if sys.stderr.isatty() else None

    def notify(message: str) -> None:
        if bar is not None:
            bar.message(f"pgvault backup: {message}")
        else:
            click.echo(f"pgvault backup: {message}", err=True)

    def progress(p) -> None:
        if bar is not None:
            note = f"waiting for WAL {p.waiting_for}" if p.waiting_for else None
            bar.update(bytes_done=p.bytes_done, bytes_total=p.bytes_total, files_done=p.files_done,
                       files_total=p.files_total, note=note)

    b = settings.backup
    try:
        result = take_backup(
            storage=storage, record=record, options=options, keyring=keyring,
            require_encryption=record.encryption_key_id is not None,
            conninfo=settings.postgres.conninfo, data_dir=settings.postgres.data_dir,
            tmp_dir=work_dir, lock_dir=work_dir, backup_type=backup_type, parallel=b.parallel,
            backup_from=b.from_, block_size=b.block_size_kib * 1024, wal_timeout=b.wal_timeout,
            progress=progress if bar is not None else None, notify=notify,
            wal_options=wal_options(settings, options),
            spool=Spool(settings.archive.spool_dir, settings.vault.cluster),
        )
    finally:
        if bar is not None:
            bar.finish()
    if as_json:
        emit_json(result.to_dict())
        return
    m = result.manifest
    share = f" ({m.bytes_stored / m.bytes_read:.0%})" if m.bytes_read else ""
    click.echo(f"backup {m.label} committed: {m.type}"
               + (f" on {m.parent}" if m.parent else "")
               + f", {m.file_count} files, {format_bytes(m.bytes_read)} read, "
               f"{format_bytes(m.bytes_stored)} stored{share}, {m.duration_seconds:.1f} s")
    click.echo(f"  from the {m.backup_from}, timeline {m.timeline}, LSN {result.to_dict()['start_lsn']} .. "
               f"{result.to_dict()['stop_lsn']}, WAL {m.start_wal} .. {m.stop_wal}")
