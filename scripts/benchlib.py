"""What the benchmark scripts share: logging, the postgres OS user, and a regular install of pgvault.

Imported by scripts/bench_archive.py, bench_backup.py and (through bench_backup) bench_restore.py,
which all run as root from this directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time

PG_USER = "postgres"
PW = pwd.getpwnam(PG_USER)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mkdir_pg(path: str, mode: int = 0o750) -> str:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    os.chown(path, PW.pw_uid, PW.pw_gid)
    return path


def chown_pg(path: str) -> None:
    for root, dirs, files in os.walk(path):
        os.chown(root, PW.pw_uid, PW.pw_gid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), PW.pw_uid, PW.pw_gid)


def dir_bytes(path: str) -> int:
    """Apparent size of every file under ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


#: The console script pip (23+) writes for [project.scripts]: no more than this runs before pgvault.
LAUNCHER = """#!{python}
import sys
from pgvault.entry import main
if __name__ == '__main__':
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit(main())
"""


def build_regular_install(venv: str) -> str:
    """A venv with pgvault copied in and byte-compiled, as a non-editable pip install leaves it; its script.

    Dependencies come from this (the dev) venv's site-packages as a plain path entry, so its
    .pth files (the editable install's import hook) do not run.
    """
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", venv], check=True, capture_output=True)
    site = subprocess.run([f"{venv}/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    shutil.copytree(os.path.join(REPO, "pgvault"), os.path.join(site, "pgvault"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dev_site = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "pgvault-bench-deps.pth"), "w") as f:
        f.write(dev_site + "\n")
    script = os.path.join(venv, "bin", "pgvault")
    with open(script, "w") as f:
        f.write(LAUNCHER.format(python=f"{venv}/bin/python"))
    os.chmod(script, 0o755)
    subprocess.run([f"{venv}/bin/python", "-m", "compileall", "-q", os.path.join(site, "pgvault")],
                   check=True, capture_output=True)
    subprocess.run(["chmod", "-R", "a+rX", venv], check=True)
    return script
