"""A reader that stops early (`pgvault config | head -1`) ends pgvault quietly, as it does other commands."""

from __future__ import annotations

import os
import subprocess

from tests.fixtures.pgcluster import pgvault_executable


def test_a_closed_stdout_is_not_an_internal_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGVAULT_")}
    proc = subprocess.Popen([pgvault_executable(), "config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=tmp_path)
    proc.stdout.close()  # before pgvault writes its first line: every write meets a closed pipe
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 1
    assert err == ""
