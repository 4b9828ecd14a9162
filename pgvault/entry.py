"""The `pgvault` console script.

PostgreSQL runs archive_command once per WAL segment, one at a time, so its
start-up cost is archiving throughput. When asynchronous archiving already
pushed the segment, this answers from the spool with the standard library
alone (no click, boto3, psycopg or cryptography) and exits 0; everything else
goes to the click CLI.
"""

from __future__ import annotations

import sys


def _parse_fast_wal_push(argv: list[str]) -> tuple[str | None, str] | None:
    """(config path, WAL path) if argv is exactly `[--config F] wal-push PATH`, else None."""
    config = None
    i = 0
    while i < len(argv) and argv[i].startswith("--config"):
        if argv[i] == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            config, i = argv[i].split("=", 1)[1], i + 1
        else:
            return None
    if argv[i:i + 1] != ["wal-push"] or len(argv) != i + 2:
        return None
    return config, argv[i + 1]


def _fast_wal_push(argv: list[str]) -> bool:
    parsed = _parse_fast_wal_push(argv)
    if parsed is None:
        return False
    try:
        import os
        import tomllib

        from pgvault import configpath
        from pgvault.spool import Spool

        path = configpath.resolve_config_path(parsed[0], os.environ)
        raw = {}
        if path:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        # Only three keys, unvalidated: a wrong value sends us to the full path, which validates.
        async_ = configpath.raw_value(raw, os.environ, "archive", "async", False)
        if async_ is not True and str(async_).lower() not in ("true", "1", "yes", "on"):
            return False
        spool_dir = configpath.raw_value(raw, os.environ, "archive", "spool_dir", configpath.DEFAULT_SPOOL_DIR)
        cluster = configpath.raw_value(raw, os.environ, "vault", "cluster", "main")
        if not isinstance(spool_dir, str) or not isinstance(cluster, str) or "/" in cluster:
            return False
        return Spool(spool_dir, cluster).consume_marker(parsed[1])
    except Exception:
        return False  # any doubt: take the full path, which reports errors properly


def main() -> None:
    if _fast_wal_push(sys.argv[1:]):
        sys.exit(0)
    from pgvault.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
