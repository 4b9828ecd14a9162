"""`pgvault dump`, `dumps` and `restore-dump`: logical dumps, thin commands over pgvault.dump."""

from __future__ import annotations

import json
import re

import click

from pgvault.cli import AppState, _archive_context, cli, emit_json, pass_state

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _show(name: str) -> str:
    """A database name for a terminal: as is when plain, else quoted (spaces, quotes, newlines…)."""
    return name if _PLAIN_NAME.match(name) else json.dumps(name, ensure_ascii=False)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _require_encryption(record) -> bool:
    return record.encryption_key_id is not None


@cli.command("dump")
@click.option("--db", "databases", multiple=True, metavar="NAME",
              help="A database to dump (repeatable; default: every database that accepts connections, "
                   "templates excepted).")
@click.option("--json", "as_json", is_flag=True, help="Print the dump record as JSON.")
@pass_state
def dump_cmd(state: AppState, databases: tuple[str, ...], as_json: bool) -> None:
    """Dump the globals and each database (pg_dump -Fc) straight into the vault.

    The dump's record is written last; the leftovers of an interrupted dump
    (never listed) are removed first.
    """
    from pgvault.dump import take_dump

    import os
    from datetime import datetime, timezone

    from pgvault.backup.lock import BackupLock

    settings = state.settings
    storage, record, _keyring, options = _archive_context(settings)
    # The backup lock: a dump removes interrupted dumps' leftovers first, which must never be
    # the objects of a dump still running elsewhere.
    lock = BackupLock(storage, label=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZD"),
                      lock_dir=os.path.join(settings.archive.spool_dir, settings.vault.cluster, "backup"))
    for notice in lock.acquire():
        click.echo(notice, err=True)
    try:
        result = take_dump(storage, vault_record=record, options=options, conninfo=settings.postgres.conninfo,
                           bin_dir=settings.postgres.bin_dir, databases=databases or None)
    finally:
        lock.release()
    if result.removed_leftovers:
        click.echo("removed the leftovers of interrupted dump(s): " + ", ".join(result.removed_leftovers), err=True)
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    dump = result.record
    if as_json:
        emit_json(dump.to_dict())
        return
    click.echo(f"dump {dump.label}: {len(dump.databases)} database(s) and the globals, "
               f"{_size(dump.size)} ({_size(dump.stored_size)} in the vault) in {dump.duration_seconds:.1f} s")
    click.echo(f"  {'globals':<30} {_size(dump.globals.size):>12}  {dump.globals.key}")
    for db in dump.databases:
        click.echo(f"  {_show(db.name):<30} {_size(db.size):>12}  {db.key}")


@cli.command("dumps")
@click.option("--json", "as_json", is_flag=True, help="Print the dump records as JSON.")
@pass_state
def dumps_cmd(state: AppState, as_json: bool) -> None:
    """List the logical dumps in the vault (only complete ones: those with a record)."""
    from pgvault.dump import list_dumps

    storage, record, keyring, _options = _archive_context(state.settings)
    dumps = list_dumps(storage, keyring, require_encryption=_require_encryption(record))
    if as_json:
        emit_json([d.to_dict() for d in dumps])
        return
    if not dumps:
        click.echo("no dumps yet")
        return
    for d in dumps:
        click.echo(f"{d.label}  started {d.started_at}  PostgreSQL {d.pg_version.split()[0]}  "
                   f"{_size(d.size)} ({_size(d.stored_size)} stored)  {d.duration_seconds:.1f} s")
        click.echo("    " + ", ".join(_show(db.name) for db in d.databases))


@cli.command("restore-dump")
@click.argument("label")
@click.option("--db", "database", metavar="NAME", help="The database to restore, as named in the dump.")
@click.option("--into", metavar="NEWNAME",
              help="Restore under this name (default: the dumped name). A renamed restore does not carry over "
                   "the database's own settings, grants and comment.")
@click.option("--jobs", type=click.IntRange(1, 64), default=1, show_default=True,
              help="pg_restore jobs. Above 1 the dump is first decoded into a temporary file (it needs room for "
                   "the whole uncompressed dump); 1 streams it into pg_restore.")
@click.option("--temp-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Directory for the temporary copy of --jobs > 1 and of --globals (default: $TMPDIR, else /tmp).")
@click.option("--globals", "globals_", is_flag=True,
              help="Restore the roles and tablespaces (the pg_dumpall --globals-only script) with psql; "
                   "with --db, before the database.")
@click.option("--print", "print_", is_flag=True, help="With --globals: print the globals script instead of running it.")
@click.option("--json", "as_json", is_flag=True, help="Print what was restored as JSON.")
@pass_state
def restore_dump_cmd(state: AppState, label: str, database: str | None, into: str | None, jobs: int,
                     temp_dir: str | None, globals_: bool, print_: bool, as_json: bool) -> None:
    """Restore database NAME of dump LABEL into a new database (refused if it exists), and/or its globals."""
    if not database and not globals_:
        raise click.UsageError("give --db NAME (a database), --globals (roles and tablespaces), or both")
    if print_ and (not globals_ or database):
        raise click.UsageError("--print goes with --globals alone")
    if into and not database:
        raise click.UsageError("--into needs --db")
    from pgvault.dump import read_dump_record, restore_database, restore_globals, write_globals

    settings = state.settings
    storage, record, keyring, _options = _archive_context(settings)
    required = _require_encryption(record)
    dump = read_dump_record(storage, label, keyring=keyring, require_encryption=required)
    conninfo, bin_dir = settings.postgres.conninfo, settings.postgres.bin_dir
    if print_:
        write_globals(storage, dump, click.get_binary_stream("stdout"), keyring=keyring,
                      require_encryption=required, temp_dir=temp_dir)
        return
    report: dict = {"label": dump.label}
    if globals_:
        g = restore_globals(storage, dump, conninfo=conninfo, bin_dir=bin_dir, keyring=keyring,
                            require_encryption=required, temp_dir=temp_dir)
        report["globals"] = {"failed_statements": list(g.errors), "seconds": g.seconds}
        if not as_json:
            click.echo(f"restored the globals of dump {dump.label}"
                       + (f"; {len(g.errors)} statement(s) failed (usually: the role or tablespace exists already):"
                          if g.errors else ""))
            for line in g.errors:
                click.echo(f"    {line}")
    if database:
        r = restore_database(storage, dump, database, into=into, jobs=jobs, conninfo=conninfo, bin_dir=bin_dir,
                             keyring=keyring, require_encryption=required, temp_dir=temp_dir)
        report["database"] = {"name": r.database, "into": r.into, "jobs": r.jobs, "size": r.size,
                              "seconds": r.seconds}
        if not as_json:
            renamed = f" into {_show(r.into)}" if r.into != r.database else ""
            click.echo(f"restored database {_show(r.database)} of dump {dump.label}{renamed} "
                       f"({_size(r.size)}, {r.jobs} job(s), {r.seconds:.1f} s)")
    if as_json:
        emit_json(report)
