#!/usr/bin/env bash
# Rehearse a failover on one machine with throwaway clusters, as root:
#   sudo scripts/failover-drill.sh
# A primary (A) archives into a local vault; a standby (B) streams from it. B is cut off, A keeps
# committing rows nobody else sees, then crashes. B is promoted and takes writes. `pgvault reseed`
# brings A back as a standby of B: A's diverged WAL is kept in the vault under orphans/ first, A is
# rebuilt from the vault and streams from B. Then the orphaned tail is replayed into a scratch node to
# show the rows A had acknowledged are not lost. Every step is printed; everything is removed at the end.
# PGVAULT_DRILL_SKIP_SETUP=1 uses the venv as it is (no scripts/setup-dev.sh).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PGVAULT_VENV:-/opt/pgvault-venv}"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
as_pg() { runuser -u postgres -- "$@"; }

if [ "$(id -u)" != 0 ]; then
  echo "failover-drill: run as root (it runs PostgreSQL as the postgres user)" >&2
  exit 1
fi

step "1. pgvault in $VENV (and PostgreSQL 15 if missing)"
if [ "${PGVAULT_DRILL_SKIP_SETUP:-}" != 1 ]; then
  PGVAULT_VENV="$VENV" bash "$REPO/scripts/setup-dev.sh"
fi
PGVAULT="$VENV/bin/pgvault"
BIN="$(pg_config --bindir)"
free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK="$(mktemp -d /tmp/pgvault-drill-XXXXXX)"
chmod 755 "$WORK"
chown postgres: "$WORK"
PA="$(free_port)"; PB="$(free_port)"; PS="$(free_port)"
cleanup() {
  for d in scratch b a; do as_pg "$BIN/pg_ctl" -D "$WORK/$d" -m immediate stop >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
psql_() { as_pg "$BIN/psql" -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 "${@:2}"; }
rows() { psql_ "$1" -At -c "SELECT coalesce(string_agg(note || ': ' || n, ', ' ORDER BY first), 'none') FROM (SELECT note, count(*) n, min(id) first FROM orders GROUP BY note) s"; }
node_conf() {  # port, directory
  as_pg tee -a "$WORK/$2/postgresql.auto.conf" >/dev/null <<CONF
port = $1
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = replica
archive_mode = on
archive_command = '$PGVAULT --config $CONFIG wal-push %p'
track_commit_timestamp = on
autovacuum = off
CONF
}

step "2. Node A: the primary, on port $PA, archiving into the vault $WORK/vault"
CONFIG="$WORK/pgvault.toml"
as_pg tee "$CONFIG" >/dev/null <<TOML
[vault]
url = "file://$WORK/vault"
[postgres]
conninfo = "host=127.0.0.1 port=$PA user=postgres dbname=postgres"
data_dir = "$WORK/a"
[archive]
spool_dir = "$WORK/spool"
TOML
as_pg "$BIN/initdb" -D "$WORK/a" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
node_conf "$PA" a
as_pg "$BIN/pg_ctl" -D "$WORK/a" -l "$WORK/a.log" -w start >/dev/null
as_pg "$PGVAULT" --config "$CONFIG" init
psql_ "$PA" -c "CREATE TABLE orders(id int PRIMARY KEY, note text)"
psql_ "$PA" -c "INSERT INTO orders SELECT g, 'before the backup' FROM generate_series(1, 1000) g"
as_pg "$PGVAULT" --config "$CONFIG" backup

step "3. Node B: a streaming standby of A, on port $PB (pg_basebackup)"
as_pg "$BIN/pg_basebackup" -D "$WORK/b" -h 127.0.0.1 -p "$PA" -U postgres -R -X stream
node_conf "$PB" b
as_pg "$BIN/pg_ctl" -D "$WORK/b" -l "$WORK/b.log" -w start >/dev/null
psql_ "$PA" -c "INSERT INTO orders SELECT g, 'replicated to B' FROM generate_series(1001, 1500) g"
sleep 1
psql_ "$PB" -c "SELECT status, sender_port FROM pg_stat_wal_receiver"
echo "B holds: $(rows "$PB")"

step "4. B loses A; A goes on committing (acknowledged, never replicated), then crashes"
psql_ "$PB" -c "ALTER SYSTEM SET primary_conninfo = ''" -c "SELECT pg_reload_conf()" >/dev/null
sleep 1
for i in $(seq 1501 1520); do psql_ "$PA" -c "INSERT INTO orders VALUES ($i, 'only on A')"; done
echo "A holds: $(rows "$PA")"
as_pg "$BIN/pg_ctl" -D "$WORK/a" -m immediate stop >/dev/null
echo "A crashed (pg_ctl stop -m immediate)"

step "5. Failover: B is promoted and takes writes on timeline 2"
psql_ "$PB" -At -c "SELECT pg_promote()" >/dev/null
psql_ "$PB" -c "INSERT INTO orders SELECT g, 'written on B after the failover' FROM generate_series(2001, 2300) g"
psql_ "$PB" -At -c "SELECT pg_switch_wal()" >/dev/null
sleep 2
echo "B holds: $(rows "$PB")"
as_pg "$PGVAULT" --config "$CONFIG" list

step "6. pgvault reseed: A comes back as a standby of B — its diverged WAL kept first"
"$PGVAULT" --config "$CONFIG" reseed --data-dir "$WORK/a" \
  --primary-conninfo "host=127.0.0.1 port=$PB user=postgres dbname=postgres" --delta --slot node_a
echo "A now holds: $(rows "$PA")"
psql_ "$PA" -c "SELECT pg_is_in_recovery() AS standby, status, sender_port, slot_name FROM pg_stat_wal_receiver"

step "7. Run it again: a healthy standby is left alone"
"$PGVAULT" --config "$CONFIG" reseed --data-dir "$WORK/a" \
  --primary-conninfo "host=127.0.0.1 port=$PB user=postgres dbname=postgres" --delta

step "8. What the vault keeps: pgvault orphans"
as_pg "$PGVAULT" --config "$CONFIG" orphans
ORPHAN="$(as_pg "$PGVAULT" --config "$CONFIG" orphans --json | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["orphans"][0]["id"])')"

step "9. Replay the orphaned tail into a scratch node on port $PS, and compare"
as_pg mkdir -m 700 "$WORK/scratch"
# timeline 1 as archived, then A's kept tail from pg_wal; --no-archive: the scratch node never archives
as_pg "$PGVAULT" --config "$CONFIG" restore --to latest --timeline 1 --data-dir "$WORK/scratch" --port "$PS" --no-archive
as_pg "$PGVAULT" --config "$CONFIG" orphans fetch "$ORPHAN" "$WORK/scratch/pg_wal"
as_pg "$BIN/pg_ctl" -D "$WORK/scratch" -l "$WORK/scratch.log" -w start >/dev/null
until [ "$(psql_ "$PS" -At -c 'SELECT NOT pg_is_in_recovery()')" = t ]; do sleep 0.5; done
echo "the scratch node holds: $(rows "$PS")"
GOT="$(psql_ "$PS" -At -c "SELECT count(*) FROM orders WHERE note = 'only on A'")"
if [ "$GOT" = 20 ]; then
  echo "the 20 rows A acknowledged but never replicated are in the orphaned tail: nothing was lost."
else
  echo "expected the 20 rows only A had, found $GOT" >&2
  exit 1
fi

step "10. Clean up"
echo "stopping the servers and removing $WORK"
