"""`pgvault plan` and `pgvault restore`: plan a point-in-time restore, then carry it out (thin commands)."""

from __future__ import annotations

import os
import shutil
import sys

import click

from pgvault.cli import AppState, _archive_context, cli, emit_json, pass_state

TARGET_HELP = ("Where to restore to: an ISO-8601 time with a UTC offset (2026-11-27T03:15:00+00:00), 'latest', "
               "'immediate' (the backup's consistency point), 'lsn:0/3000060', 'xid:12345' or 'name:<restore point>'.")
TIMELINE_HELP = "The timeline to recover onto: 'latest' (the newest the vault knows) or its number."


def _plan(state: AppState, to: str, timeline: str, backup_label: str | None):
    """Parse, read the vault (nothing is written), plan. Returns (storage, record, keyring, loaded, plan)."""
    from pgvault.planner import plan_restore
    from pgvault.snapshot import load_catalog
    from pgvault.targets import parse_target, parse_timeline

    target, tli = parse_target(to), parse_timeline(timeline)  # malformed input fails before the vault is read
    storage, record, keyring, _options = _archive_context(state.settings)
    loaded = load_catalog(storage, record=record, keyring=keyring)
    return storage, record, keyring, loaded, plan_restore(loaded.snapshot, target, timeline=tli, backup=backup_label)


def restore_reporters(bar, prefix: str):
    """notify, warn and progress callbacks of a restore: on the progress bar if there is one, else stderr lines."""
    def notify(message: str) -> None:
        if bar is not None:
            bar.message(f"{prefix}: {message}")
        else:
            click.echo(f"{prefix}: {message}", err=True)

    def warn(message: str) -> None:
        if bar is not None:
            bar.message(f"WARNING: {message}")
        else:
            click.echo(f"WARNING: {message}", err=True)

    def progress(p) -> None:
        if bar is None:
            return
        if p.phase == "compare":
            bar.update(bytes_done=p.bytes_done, bytes_total=p.bytes_total, files_done=0, files_total=0,
                       note="comparing the files already there")
        else:
            bar.update(bytes_done=p.bytes_done, bytes_total=p.bytes_total, files_done=p.objects_done,
                       files_total=p.objects_total, note="(data objects)")

    return notify, warn, progress


@cli.command("plan")
@click.option("--to", "to", required=True, metavar="TARGET", help=TARGET_HELP)
@click.option("--timeline", default="latest", show_default=True, metavar="N|latest", help=TIMELINE_HELP)
@click.option("--backup", "backup_label", metavar="LABEL", help="Restore from this backup (default: the newest that reaches the target).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@pass_state
def plan_cmd(state: AppState, to: str, timeline: str, backup_label: str | None, as_json: bool) -> None:
    """Show what `pgvault restore --to TARGET` would do: backup, timelines, WAL, bytes, recovery settings.

    Reads the vault and changes nothing. A target that cannot be reached exits 71
    and names the restorable window.
    """
    from pgvault.planner import describe_plan, format_plan
    from pgvault.restore import RestoreError, pgvault_restore_command
    from pgvault.targets import conf_quote

    _storage, _record, _keyring, loaded, plan = _plan(state, to, timeline, backup_label)
    # what `pgvault restore` writes besides the targets (without its --port / --no-archive / --pause)
    try:
        command = conf_quote(pgvault_restore_command(_pgvault_executable(), _config_path(state.settings)))
    except RestoreError as exc:
        command = f"(unknown: {exc.message})"
    if as_json:
        emit_json(describe_plan(plan) | {"catalog_notes": list(loaded.notes), "restore_command": command,
                                         "recovery_target_action": conf_quote("promote")})
        return
    click.echo(format_plan(plan))
    click.echo(f"  restore   restore_command = {command}")
    click.echo("            recovery_target_action = 'promote' (restore --pause: 'pause')")
    for note in loaded.notes:
        click.echo(f"  note: {note}")


def _config_path(settings) -> str | None:
    """The config file in effect, absolute (restore_command must read the same one), or None for the defaults."""
    return os.path.abspath(settings.source) if os.path.isfile(settings.source) else None


def _pgvault_executable() -> str:
    """The absolute path of the running pgvault program (sys.argv[0] resolved), else `pgvault` on PATH."""
    from pgvault.restore import RestoreError

    argv0 = sys.argv[0] if sys.argv else ""
    candidates = []
    if os.path.basename(argv0).startswith("pgvault"):
        candidates.append(os.path.abspath(argv0) if os.sep in argv0 else shutil.which(argv0))
    candidates.append(shutil.which("pgvault"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    raise RestoreError("cannot find the pgvault program for restore_command",
                       hint="run pgvault through its console script, or put it on PATH")


def _tablespace_map(values: tuple[str, ...]) -> dict[int, str]:
    out = {}
    for value in values:
        oid, sep, path = value.partition("=")
        if not sep or not oid.isdigit() or not path or not os.path.isabs(path):
            raise click.BadParameter(f"{value!r}: expected OID=/absolute/path", param_hint="--tablespace")
        out[int(oid)] = path
    return out


def _env_warnings() -> list[str]:
    from pgvault.config import describe_env_overrides

    known = {env for env, _key, _default in describe_env_overrides()}  # settings, not e.g. PGVAULT_VENV
    names = sorted(k for k in os.environ if k in known and os.environ[k])
    if not names:
        return []
    return [f"environment overrides {', '.join(names)} are in effect here, but restore_command runs under "
            "PostgreSQL without them: put those settings in the config file"]


@cli.command("restore")
@click.option("--to", "to", required=True, metavar="TARGET", help=TARGET_HELP)
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="The data directory to create (absent or empty, unless --delta).")
@click.option("--timeline", default="latest", show_default=True, metavar="N|latest", help=TIMELINE_HELP)
@click.option("--backup", "backup_label", metavar="LABEL", help="Restore from this backup (default: the newest that reaches the target).")
@click.option("--delta", is_flag=True,
              help="Rebuild a non-empty DIR in place: files whose blocks all match are kept, only differing blocks "
                   "are fetched, everything not in the backup is removed.")
@click.option("--parallel", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Objects fetched at once (default: [backup] parallel).")
@click.option("--tablespace", "tablespaces", multiple=True, metavar="OID=DIR",
              help="Restore tablespace OID into DIR instead of its original location (repeatable).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, metavar="N",
              help="Port of the restored server, written to postgresql.auto.conf (so it does not clash with the original).")
@click.option("--no-archive", "no_archive", is_flag=True,
              help="Write archive_mode = off: the restored node never archives (into this vault or any other).")
@click.option("--start", is_flag=True, help="Start the server, wait for recovery to end and report the point reached.")
@click.option("--pause", is_flag=True,
              help="recovery_target_action = 'pause': the server stays in recovery at the target (with --start: reported).")
@click.option("--timeout", type=click.IntRange(1), default=86400, show_default=True, metavar="SECONDS",
              help="With --start: how long to wait for recovery to end.")
@click.option("--json", "as_json", is_flag=True, help="Print the result record as JSON.")
@pass_state
def restore_cmd(state: AppState, to: str, data_dir: str, timeline: str, backup_label: str | None, delta: bool,
                parallel: int | None, tablespaces: tuple[str, ...], port: int | None, no_archive: bool, start: bool,
                pause: bool, timeout: int, as_json: bool) -> None:
    """Restore the cluster to TARGET into DIR: fetch and verify the backup, write the recovery settings.

    Refuses a directory a server runs on, and a non-empty one without --delta.
    With --start, PostgreSQL replays the archived WAL (restore_command calls
    this pgvault with the same config file) and the point it reached is
    printed; a target it did not reach is an error.
    """
    from pgvault.progressbar import ProgressBar
    from pgvault.restore import restore

    settings = state.settings
    relocate = _tablespace_map(tablespaces)
    storage, record, keyring, loaded, plan = _plan(state, to, timeline, backup_label)
    manifest = loaded.manifests[plan.backup.label]
    config_path = _config_path(settings)
    executable = _pgvault_executable()
    early_warnings = _env_warnings()
    for warning in early_warnings:
        click.echo(f"WARNING: {warning}", err=True)

    bar = ProgressBar() if sys.stderr.isatty() else None

    notify, warn, progress = restore_reporters(bar, "pgvault restore")

    notify(f"restoring backup {plan.backup.label} to {plan.target} on timeline {plan.timeline} into "
           f"{os.path.abspath(data_dir)}" + (" (delta)" if delta else ""))
    try:
        result = restore(
            plan, manifest, storage=storage, keyring=keyring, data_dir=data_dir, config_path=config_path,
            pgvault_executable=executable, delta=delta,
            parallel=parallel if parallel is not None else settings.backup.parallel,
            port=port, start=start, pause=pause, disable_archiving=no_archive,
            require_encryption=record.encryption_key_id is not None, tablespace_map=relocate,
            bin_dir=settings.postgres.bin_dir, timeout=timeout,
            progress=progress if bar is not None else None, notify=notify, warn=warn,
        )
    finally:
        if bar is not None:
            bar.finish()
    warnings = early_warnings + list(result.warnings)
    if as_json:
        emit_json(result.to_dict() | {"warnings": warnings})
        return
    _print_result(result)


def _print_result(result) -> None:
    from pgvault.progressbar import format_bytes
    from pgvault.targets import format_time
    from pgvault.wal import format_lsn

    m, plan = result.materialized, result.plan
    chain = f" (chain {' → '.join(plan.backup.chain)})" if len(plan.backup.chain) > 1 else ""
    click.echo(f"restored backup {plan.backup.label}{chain} into {result.data_dir}: {m.files} files, "
               f"{format_bytes(m.bytes_total)}, {m.seconds:.1f} s")
    if m.delta:
        click.echo(f"  delta: {m.files_kept} files kept, {m.files_fetched} fetched ({format_bytes(m.bytes_written)} "
                   f"of blocks), {m.entries_removed} entries not in the backup removed, "
                   f"{format_bytes(m.bytes_checked)} compared")
    click.echo(f"recovery settings (postgresql.auto.conf, with recovery.signal), to {plan.target} "
               f"on timeline {plan.timeline}:")
    for key, value in result.recovery_settings.items():
        click.echo(f"  {key} = {value}")
    for note in result.notes:
        click.echo(f"  note: {note}")
    if result.owner:
        click.echo(f"owner: {result.owner}")
    if result.server is None:
        click.echo("not started; start it with pg_ctl (as the data directory's owner):")
        click.echo(f"  pg_ctl -D {result.data_dir} start")
        return
    s, r = result.server, result.reached
    click.echo(f"PostgreSQL runs: pid {s.pid}, port {s.port}, socket directory {s.socket_dir}, log {s.log_file}")
    last = (format_time(r.last_transaction_time) if r.last_transaction_time
            else "none replayed" if r.replay_lsn is not None else "unknown")
    commit = ""
    if r.last_commit_xid is not None and r.last_commit_time is not None:
        commit = f"; last commit: xid {r.last_commit_xid} at {format_time(r.last_commit_time)}"
    lsn = format_lsn(r.lsn) if r.lsn is not None else "-"
    if r.state == "paused":
        click.echo(f"reached: recovery paused at the target on timeline {r.timeline}, replay LSN {lsn}; "
                   f"last replayed transaction: {last}{commit}")
        click.echo("  resume with SELECT pg_wal_replay_resume() (promotes), or stop the server to choose another target")
    else:
        replay = format_lsn(r.replay_lsn) if r.replay_lsn is not None else "-"
        click.echo(f"reached: promoted onto timeline {r.timeline} at LSN {lsn} (recovery replayed up to {replay}); "
                   f"last replayed transaction: {last}{commit}")
