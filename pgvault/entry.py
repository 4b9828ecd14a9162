"""The `pgvault` console script.

PostgreSQL runs archive_command once per WAL segment, one at a time, so its
start-up cost is archiving throughput. When another pgvault process pushed
the segment already (asynchronous archiving's worker, or a backup pushing its
last segment: see spool), this answers from the spool with the standard library
alone (no click, boto3, psycopg or cryptography) and exits 0; everything else
goes to the click CLI.
"""

from __future__ import annotations

import os
import sys


def split_global_options(argv: list[str]) -> tuple[str | None, bool, list[str]] | None:
    """(config, debug, the command and what follows) for `[--config F] [--debug] COMMAND ...`.

    None if another option comes before the command: click then parses it. Used
    before click is imported (the WAL commands, the backup's session process).
    """
    config, debug, i = None, False, 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            config, i = argv[i].split("=", 1)[1], i + 1
        elif argv[i] == "--debug":
            debug, i = True, i + 1
        else:
            return None
    return config, debug, argv[i:]


def _parse_fast_wal_push(argv: list[str]) -> tuple[str | None, str] | None:
    """(config path, WAL path) if argv is exactly `[--config F] wal-push PATH`, else None (--debug included)."""
    parsed = split_global_options(argv)
    if parsed is None or parsed[1] or len(parsed[2]) != 2 or parsed[2][0] != "wal-push":
        return None
    return parsed[0], parsed[2][1]


def _fast_wal_push(argv: list[str]) -> bool:
    parsed = _parse_fast_wal_push(argv)
    if parsed is None:
        return False
    try:
        from pgvault import configpath
        from pgvault.spool import Spool

        path = configpath.resolve_config_path(parsed[0], os.environ)
        found: dict = {}
        if path:
            with open(path, encoding="utf-8") as f:
                scanned = configpath.scan_config(f.read())
            if scanned is None:
                return False
            found = scanned

        def setting(section: str, key: str, default: object) -> object:
            env = os.environ.get(configpath.env_var_name(section, key), "")
            table = found.get(section)
            return env if env != "" else table.get(key, default) if isinstance(table, dict) else default

        # Unvalidated on purpose: a wrong value sends us to the full path, which validates.
        spool_dir = setting("archive", "spool_dir", configpath.DEFAULT_SPOOL_DIR)
        cluster = setting("vault", "cluster", "main")
        if not isinstance(spool_dir, str) or not isinstance(cluster, str) or "/" in cluster:
            return False
        return Spool(spool_dir, cluster).pushed_meanwhile(parsed[1])
    except Exception:
        return False  # any doubt: take the full path, which reports errors properly


def _is_backup_command(argv: list[str]) -> bool:
    """Whether argv runs `pgvault [--config F] [--debug] backup ...` (not its --help)."""
    parsed = split_global_options(argv)
    return parsed is not None and parsed[2][:1] == ["backup"] and not {"-h", "--help"} & set(argv)


def _exit_at_once(code: int) -> None:
    """End a WAL command or a backup without the interpreter's teardown (freeing every module and object).

    That teardown is ~5 ms of a ~50 ms sync wal-push, which PostgreSQL runs once
    per segment, and of a ~0.3 s incremental backup. Neither leaves anything to
    it: every file they write is closed (and fsynced) before they return, the
    workers a WAL command starts are processes of their own, and a backup has
    shut its threads down and reaped its session's process (also when it fails).
    Only what they printed is still buffered.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can be said on it
            pass
    os._exit(code)


def main() -> None:
    argv = sys.argv[1:]
    if _fast_wal_push(argv):
        _exit_at_once(0)
    from pgvault import walcmd

    wal = walcmd.parse_wal_argv(argv)
    if wal is not None:  # archive_command / restore_command: no click, fewer imports
        config, debug, command, args = wal
        if command == "wal-push":
            _exit_at_once(walcmd.run_wal_push(config, args[0], debug=debug))
        _exit_at_once(walcmd.run_wal_fetch(config, args[0], args[1], debug=debug))
    if _is_backup_command(argv):
        from pgvault.backup.pgsession import prestart

        prestart()  # before click and the rest are imported: see pgsession
        _exit_at_once(_run_cli())
    sys.exit(_run_cli())


def _run_cli() -> int:
    """Run the click CLI; its exit code (click ends with SystemExit)."""
    from pgvault.cli import main as cli_main

    try:
        cli_main()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    main()
