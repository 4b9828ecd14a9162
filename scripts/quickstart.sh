#!/usr/bin/env bash
# pgvault in two minutes, on a fresh Debian 12 machine, as root:
#   sudo scripts/quickstart.sh
# Installs pgvault into a venv (and PostgreSQL if missing), starts a throwaway
# cluster archiving into a local vault, takes a backup, commits rows, notes a
# moment, commits more rows, restores to that moment into a second directory,
# starts it and shows that exactly the rows before the moment are there.
# Then it cleans up. Nothing outside its temporary directory is touched.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PGVAULT_VENV:-/opt/pgvault-venv}"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
as_pg() { runuser -u postgres -- "$@"; }

if [ "$(id -u)" != 0 ]; then
  echo "quickstart: run as root (it installs packages and runs PostgreSQL as the postgres user)" >&2
  exit 1
fi

step "1. Install pgvault into $VENV (and PostgreSQL 15 if missing)"
PGVAULT_VENV="$VENV" bash "$REPO/scripts/setup-dev.sh"
PGVAULT="$VENV/bin/pgvault"
BIN="$(pg_config --bindir)"
free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK="$(mktemp -d /tmp/pgvault-quickstart-XXXXXX)"
chmod 755 "$WORK"
chown postgres: "$WORK"
PORT="$(free_port)"
PORT2="$(free_port)"
cleanup() {
  as_pg "$BIN/pg_ctl" -D "$WORK/restored" -m immediate stop >/dev/null 2>&1 || true
  as_pg "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

step "2. A throwaway cluster on port $PORT, archiving into a local vault"
CONFIG="$WORK/pgvault.toml"
as_pg tee "$CONFIG" >/dev/null <<TOML
[vault]
url = "file://$WORK/vault"
[postgres]
conninfo = "host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
data_dir = "$WORK/data"
[archive]
spool_dir = "$WORK/spool"
TOML
echo "config $CONFIG:"; sed 's/^/    /' "$CONFIG"
as_pg "$BIN/initdb" -D "$WORK/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
as_pg tee -a "$WORK/data/postgresql.auto.conf" >/dev/null <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = replica
archive_mode = on
archive_command = '$PGVAULT --config $CONFIG wal-push %p'
track_commit_timestamp = on
CONF
as_pg "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w start >/dev/null
psql_() { as_pg "$BIN/psql" -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 "${@:2}"; }

step "3. pgvault init and pgvault check"
as_pg "$PGVAULT" --config "$CONFIG" init
as_pg "$PGVAULT" --config "$CONFIG" check || true

step "4. Some rows, then a base backup"
psql_ "$PORT" -c "CREATE TABLE orders(id int PRIMARY KEY, note text, at timestamptz DEFAULT clock_timestamp())"
psql_ "$PORT" -c "INSERT INTO orders(id, note) SELECT g, 'before the backup' FROM generate_series(1, 1000) g"
as_pg "$PGVAULT" --config "$CONFIG" backup

step "5. More rows; note the moment; then rows we will not want"
psql_ "$PORT" -c "INSERT INTO orders(id, note) SELECT g, 'after the backup, before the moment' FROM generate_series(1001, 1500) g"
sleep 1
MOMENT="$(psql_ "$PORT" -At -c "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'")"
echo "the moment: $MOMENT"
sleep 1
psql_ "$PORT" -c "INSERT INTO orders(id, note) SELECT g, 'after the moment (a mistake)' FROM generate_series(1501, 1600) g"
psql_ "$PORT" -c "DELETE FROM orders WHERE id <= 100"   # the mistake we want to undo
psql_ "$PORT" -At -c "SELECT pg_switch_wal()" >/dev/null
sleep 2   # let archive_command ship the segment
echo "rows on the live server now: $(psql_ "$PORT" -At -c 'SELECT count(*) FROM orders')"

step "6. Plan the restore (changes nothing)"
as_pg "$PGVAULT" --config "$CONFIG" plan --to "$MOMENT"

step "7. Restore to the moment into $WORK/restored, start it on port $PORT2"
# --no-archive: this scratch copy must not push a new timeline into the vault of the original.
as_pg "$PGVAULT" --config "$CONFIG" restore --to "$MOMENT" --data-dir "$WORK/restored" --port "$PORT2" --no-archive --start

step "8. What the restored server holds"
psql_ "$PORT2" -c "SELECT note, count(*) FROM orders GROUP BY note ORDER BY min(id)"
GOT="$(psql_ "$PORT2" -At -c 'SELECT count(*) FROM orders')"
if [ "$GOT" = 1500 ]; then
  echo "exactly the 1500 rows committed before $MOMENT are back; the later rows and the DELETE are not."
else
  echo "expected 1500 rows, found $GOT" >&2
  exit 1
fi

step "9. Clean up"
echo "stopping both servers and removing $WORK"
