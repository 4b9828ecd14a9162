"""Run the real `pgvault` console script, as root or as the postgres user, and capture what it says."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from tests.fixtures.pgcluster import as_pg_user, pgvault_executable


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_pgvault(*args: str, config: str | None = None, env: dict | None = None, as_postgres: bool = False,
                timeout: int = 120, cwd: str | None = None) -> Result:
    cmd = [pgvault_executable()]
    if config:
        cmd += ["--config", config]
    cmd += list(args)
    if as_postgres:
        cmd = as_pg_user(cmd)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or "/tmp")
    return Result(proc.returncode, proc.stdout, proc.stderr)


def write_config(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path
