#!/usr/bin/env bash
# Install what pgvault's development and test suite need on Debian 12, as root:
# PostgreSQL 15 (if missing), Debian's python3-venv, zstd and pgbench tools, and a
# venv with pgvault and its test extras. The venv lives outside any home
# directory (default /opt/pgvault-venv) because the postgres user must be able to
# run pgvault from it: archive_command and restore_command run as postgres.
set -euo pipefail

VENV="${PGVAULT_VENV:-/opt/pgvault-venv}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

need_apt=()
command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ] && [ -x "$(pg_config --bindir)/pgbench" ] \
  || need_apt+=(postgresql-15 postgresql-client-15 libpq5)  # contrib (amcheck, …) is part of postgresql-15
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v zstd >/dev/null || need_apt+=(zstd)
command -v runuser >/dev/null || need_apt+=(util-linux)
command -v etcd >/dev/null || need_apt+=(etcd-server)  # the Patroni failover test runs its own etcd on free ports
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup-dev: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# Debian's postgresql package starts a cluster of its own; our tests never touch it.
id postgres >/dev/null 2>&1 || { echo "setup-dev: no postgres OS user after install" >&2; exit 1; }

# Debian's python3 (not a pyenv build under /root) so that postgres can run the venv.
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# A regular (non-editable) install: the code is copied into the venv, where postgres can read it.
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$REPO" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" -m pip install -q "$REPO[test]" 2>&1 | grep -v "is ignored" || true
chmod -R a+rX "$VENV"
"$VENV/bin/pgvault" --version
echo "setup-dev: venv ready at $VENV"
