#!/usr/bin/env bash
# Install what pgvault's development and test suite need on Debian 12, as root:
# PostgreSQL 15 (if missing), Debian's python3-venv, zstd, runuser, pkill and etcd, and a
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
command -v pkill >/dev/null || need_apt+=(procps)  # tests kill stray writers and Patroni children with pkill
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
# pip's own upgrade may fail offline; the installs below may not: their failure stops the setup.
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
pip_install() {
  local out
  if ! out="$("$VENV/bin/python" -m pip install -q "$@" 2>&1)"; then
    printf '%s\n' "$out" >&2
    echo "setup-dev: pip install $* failed" >&2
    exit 1
  fi
  printf '%s\n' "$out" | grep -v -e "is ignored" -e '^$' >&2 || true
}
# A regular (non-editable) install: the code is copied into the venv, where postgres can read it.
pip_install --force-reinstall --no-deps "$REPO"
pip_install "$REPO[test]"
chmod -R a+rX "$VENV"
"$VENV/bin/pgvault" --version
# The failover tests skip without these; in a set-up machine that would hide a broken install.
command -v etcd >/dev/null || { echo "setup-dev: etcd is missing after apt-get install etcd-server" >&2; exit 1; }
"$VENV/bin/patroni" --version >/dev/null || { echo "setup-dev: patroni is missing from $VENV" >&2; exit 1; }
echo "setup-dev: venv ready at $VENV"
