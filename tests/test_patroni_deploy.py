"""deploy/patroni: the example configuration is valid for Patroni and wires pgvault in; the replica-method script
turns Patroni's arguments into `pgvault reseed` and keeps the node's WAL when reseed fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures.patroni import REPLICA_SCRIPT, patroni_executable

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "deploy" / "patroni" / "patroni.yml"


def test_the_example_patroni_config_uses_pgvault_for_replicas_archiving_and_recovery():
    config = yaml.safe_load(CONFIG.read_text())
    pg = config["postgresql"]
    assert pg["create_replica_methods"][0] == "pgvault"
    assert pg["pgvault"]["keep_data"] is True and pg["pgvault"]["config"] == "/etc/pgvault/pgvault.toml"
    assert "wal-fetch %f %p" in pg["recovery_conf"]["restore_command"]
    assert pg["remove_data_directory_on_rewind_failure"] is False
    assert pg["remove_data_directory_on_diverged_timelines"] is False
    dcs = config["bootstrap"]["dcs"]["postgresql"]
    assert dcs["use_pg_rewind"] is False
    assert "wal-push %p" in dcs["parameters"]["archive_command"]


def test_the_example_patroni_config_passes_patronis_own_validation():
    patroni = patroni_executable()
    if patroni is None:
        pytest.skip("patroni is not installed (it is in pgvault's test extras)")
    done = subprocess.run([patroni, "--validate-config", str(CONFIG)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


def _fake_pgvault(tmp_path, exit_code: int) -> tuple[str, Path]:
    """A stand-in for the pgvault program that records its arguments (the script's contract is its command line)."""
    record = tmp_path / "args"
    fake = tmp_path / "pgvault"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {record}\nexit {exit_code}\n')
    fake.chmod(0o755)
    return str(fake), record


def test_the_replica_script_runs_reseed_with_patronis_arguments(tmp_path):
    fake, record = _fake_pgvault(tmp_path, 0)
    data = tmp_path / "data dir"
    done = subprocess.run([REPLICA_SCRIPT, "--scope=demo", "--role=replica", f"--datadir={data}",
                           "--connstring=dbname=postgres user=replicator host=10.0.0.2 port=5432",
                           "--config=/etc/pgvault/pgvault.toml", f"--pgvault={fake}", "--keep_data=True"],
                          check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert record.read_text().splitlines() == [
        "--config", "/etc/pgvault/pgvault.toml", "reseed", "--data-dir", str(data), "--primary-conninfo",
        "dbname=postgres user=replicator host=10.0.0.2 port=5432", "--delta", "--no-start"]


def test_the_replica_script_copies_the_nodes_wal_aside_when_reseed_fails(tmp_path):
    fake, _record = _fake_pgvault(tmp_path, 101)
    data = tmp_path / "data"
    (data / "pg_wal").mkdir(parents=True)
    (data / "pg_wal" / "000000010000000000000005").write_bytes(b"diverged")
    done = subprocess.run([REPLICA_SCRIPT, f"--datadir={data}", "--connstring=host=x", f"--pgvault={fake}"],
                          check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 101
    kept = [p for p in os.listdir(tmp_path) if p.startswith("data.pg_wal-kept-")]
    assert len(kept) == 1, os.listdir(tmp_path)
    assert (tmp_path / kept[0] / "000000010000000000000005").read_bytes() == b"diverged"
    assert "the node's WAL is copied to" in done.stderr
    done = subprocess.run([REPLICA_SCRIPT, f"--datadir={data}", "--connstring=", f"--pgvault={fake}"],
                          check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "no --connstring" in done.stderr
