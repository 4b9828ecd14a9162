"""wal-push and wal-fetch without click: what archive_command and restore_command run.

PostgreSQL starts one process per WAL file, so every import is paid per
segment. entry.py sends these two commands here directly; the click commands
of the same names call the same functions, so both paths behave alike.
"""

from __future__ import annotations

import os
import sys

from pgvault.entry import split_global_options
from pgvault.errors import PgvaultError

#: restore_command contract: 1..125 means "not available" (recovery ends there
#: normally); above 125 PostgreSQL treats as fatal and stops recovery, so a real
#: error can never pass for the end of the archive.
FETCH_NOT_FOUND_EXIT = 1
FETCH_FATAL_EXIT = 255


def parse_wal_argv(argv: list[str]) -> tuple[str | None, bool, str, list[str]] | None:
    """(config, debug, command, args) for `[--config F] [--debug] wal-push PATH` or `… wal-fetch NAME DEST`."""
    parsed = split_global_options(argv)
    if parsed is None:
        return None
    config, debug, rest = parsed
    if len(rest) == 2 and rest[0] == "wal-push" and not rest[1].startswith("-"):
        return config, debug, "wal-push", rest[1:]
    if len(rest) == 3 and rest[0] == "wal-fetch" and not any(a.startswith("-") for a in rest[1:]):
        return config, debug, "wal-fetch", rest[1:]
    return None


def _print_traceback() -> None:
    import traceback  # with --debug only: it costs every WAL command ~5 ms to import

    traceback.print_exc()


def print_error(exc: PgvaultError) -> None:
    print(f"pgvault: error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"HINT: {exc.hint}", file=sys.stderr)


def load_wal_settings(config_path: str | None):
    """Settings as the WAL commands need them: the daemon's sections are not checked (see load_settings)."""
    from pgvault.config import load_settings

    return load_settings(config_path, check_daemon_sections=False)


def archive_context(settings):
    """Storage, vault record, keyring and codec options: what every command reading or writing objects needs.

    Refuses a config whose [encryption] disagrees with the vault record
    (context.vault_keyring), so that no writer stores plaintext in an encrypted vault.
    """
    from pgvault import context
    from pgvault.archive import CodecOptions
    from pgvault.vault import require_vault_record

    storage = context.storage_for(settings)
    record = require_vault_record(storage)
    keyring = context.vault_keyring(settings, storage, record)
    c = settings.compression
    options = CodecOptions(compression=c.algorithm, level=c.level, threads=c.threads,
                           key=keyring.current if keyring is not None else None)
    return storage, record, keyring, options


def wal_options(settings, options):
    """WAL's codec options: [archive] compression_level instead of the backups' level."""
    return options._replace(level=settings.archive.compression_level)


def wal_push(settings, path: str, *, config_path: str | None) -> None:
    storage, record, _keyring, options = archive_context(settings)
    options = wal_options(settings, options)
    if settings.archive.async_:
        from pgvault.pushahead import push_with_push_ahead
        from pgvault.spool import Spool

        result = push_with_push_ahead(
            path, storage=storage, record=record, options=options,
            spool=Spool(settings.archive.spool_dir, settings.vault.cluster), config_path=config_path,
        )
        if result.still_waiting >= 2 * settings.archive.parallel:
            print(f"pgvault wal-push: archiving is behind: {result.still_waiting} more WAL files waiting "
                  f"after {os.path.basename(path)}", file=sys.stderr)
    else:
        from pgvault.archive import push_wal_file

        push_wal_file(path, storage=storage, record=record, options=options)


def wal_fetch(settings, name: str, dest: str, *, config_path: str | None) -> None:
    from pgvault.archive import fetch_wal_file
    from pgvault.prefetch import start_prefetch_worker, take_prefetched
    from pgvault.spool import Spool

    count = settings.archive.prefetch
    spool = Spool(settings.archive.spool_dir, settings.vault.cluster)
    is_segment = len(name) == 24
    if is_segment and count and take_prefetched(spool, name, dest):
        start_prefetch_worker(name, config_path=config_path, count=count)
        return
    storage, record, keyring, _options = archive_context(settings)
    fetch_wal_file(name, dest, storage=storage, record=record, keyring=keyring)
    if is_segment and count:
        start_prefetch_worker(name, config_path=config_path, count=count)


def run_wal_push(config_path: str | None, path: str, *, debug: bool = False, settings=None) -> int:
    try:
        if settings is None:
            settings = load_wal_settings(config_path)
        wal_push(settings, path, config_path=config_path)
        return 0
    except PgvaultError as exc:
        if debug:
            _print_traceback()
        print_error(exc)
        return exc.exit_code
    except Exception as exc:  # the process boundary: one line, never a bare traceback
        if debug:
            _print_traceback()
        print(f"pgvault: internal error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1


def run_wal_fetch(config_path: str | None, name: str, dest: str, *, debug: bool = False, settings=None) -> int:
    from pgvault.archive import WalNotFoundError

    try:
        if settings is None:
            settings = load_wal_settings(config_path)
        wal_fetch(settings, name, dest, config_path=config_path)
        return 0
    except WalNotFoundError:
        return FETCH_NOT_FOUND_EXIT
    except PgvaultError as exc:
        if debug:
            _print_traceback()
        print_error(exc)
        print("pgvault wal-fetch: stopping recovery (exit 255): fix the error and start the server again to resume",
              file=sys.stderr)
        return FETCH_FATAL_EXIT
    except BaseException as exc:  # anything unexpected must stop recovery too, never look like "no more WAL"
        if debug:
            _print_traceback()
        print(f"pgvault wal-fetch: error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return FETCH_FATAL_EXIT
