"""archive_command pays every import once per WAL segment: keep the sync push path light.

Measured (scripts/bench_archive.py): dataclasses alone (with inspect, ast, dis,
tokenize) plus building the path's record classes were ~13 ms of a ~66 ms push;
urllib.parse with ipaddress ~1.5 ms. This checks, in a fresh interpreter, that
loading the config and opening a local vault the way wal-push does brings in
none of the modules the push does not need.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Modules a sync wal-push of an unencrypted segment to a local vault must not import.
NOT_ON_THE_WAL_PATH = ("dataclasses", "inspect", "urllib.parse", "tomllib", "click", "psycopg", "boto3",
                       "botocore", "cryptography", "croniter", "zoneinfo", "prometheus_client", "traceback",
                       "datetime", "pgvault.schedule", "pgvault.retention")

# The config a daemon host has (deploy/pgvault.toml): archive_command reads the same file.
DAEMON_CONFIG = """
[schedule]
full = "0 2 * * 0"
incremental = "0 2 * * 1-6"
timezone = "Europe/Berlin"
catch_up = "1h"

[retention]
full = 2
window = "14d"
"""

# Only what the path itself adds: an editable install's import hook (a .pth file run at
# start-up) loads urllib.parse and traceback before any pgvault code; pip's regular
# install does not.
PROBE = """
import sys
at_start = set(sys.modules)
from pgvault import walcmd
import pgvault.archive, pgvault.pushahead, pgvault.spool
settings = walcmd.load_wal_settings(sys.argv[1])
from pgvault import context
storage = context.storage_for(settings)
assert type(storage).__name__ == "LocalStorage", storage
print(" ".join(m for m in sys.argv[2:] if m in sys.modules and m not in at_start))
"""


def test_sync_wal_push_path_imports_nothing_it_does_not_need(tmp_path):
    config = tmp_path / "pgvault.toml"
    config.write_text(f'[vault]\nurl = "file://{tmp_path}/vault"\n\n[archive]\nasync = false\n' + DAEMON_CONFIG)
    out = subprocess.run([sys.executable, "-c", PROBE, str(config), *NOT_ON_THE_WAL_PATH],
                         capture_output=True, text=True, check=True, env=_env()).stdout.strip()
    assert out == "", f"imported on the WAL path: {out}"


def test_the_probe_sees_a_module_that_is_imported(tmp_path):
    # The check above would pass vacuously if the probe could not see imports at all.
    config = tmp_path / "pgvault.toml"
    config.write_text(f'[vault]\nurl = "file://{tmp_path}/vault"\n')
    out = subprocess.run([sys.executable, "-c", PROBE.replace("from pgvault", "import dataclasses\nfrom pgvault", 1), str(config), "dataclasses"],
                         capture_output=True, text=True, check=True, env=_env()).stdout.strip()
    assert out == "dataclasses"


def test_a_broken_schedule_does_not_stop_archiving_but_is_still_refused_elsewhere(tmp_path):
    from pgvault.config import load_settings
    from pgvault.errors import ConfigError
    from pgvault.walcmd import load_wal_settings

    config = tmp_path / "pgvault.toml"
    config.write_text(f'[vault]\nurl = "file://{tmp_path}/vault"\n\n[schedule]\nfull = "at two"\n')
    with pytest.raises(ConfigError, match=r"\[schedule\] full = 'at two'"):
        load_settings(str(config), environ={})
    settings = load_wal_settings(str(config))  # wal-push and wal-fetch never read [schedule]
    assert settings.vault.url == f"file://{tmp_path}/vault"
    config.write_text(f'[vault]\nurl = "file://{tmp_path}/vault"\n\n[schedule]\nfull = 5\n')
    with pytest.raises(ConfigError, match="expected a string"):
        load_wal_settings(str(config))  # the type is still checked


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
