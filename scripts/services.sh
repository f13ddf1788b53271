#!/usr/bin/env bash
# Local PostgreSQL and Redis for Kiln's stack and tests, from the OS packages.
#
#   scripts/services.sh start   install if missing, start what is not running, ensure role/db
#   scripts/services.sh stop    stop only what `start` started (recorded in .kiln/started)
#   scripts/services.sh env     print DATABASE_URL=... and REDIS_URL=... lines
#
# Idempotent and non-interactive. Runs as root (administers PostgreSQL as the postgres user).
# Servers that were already running are left alone by both start and stop.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.kiln"
STARTED="$STATE/started"

# The ports are fixed for the local stack (API.md); the overrides exist to test this script.
PG_PORT="${KILN_PG_PORT:-5432}"
REDIS_HOST=127.0.0.1
REDIS_PORT="${KILN_REDIS_PORT:-6379}"
DATABASE_URL="postgres://kiln:kiln@127.0.0.1:${PG_PORT}/kiln"
REDIS_URL="redis://${REDIS_HOST}:${REDIS_PORT}"

log() { echo "kiln services: $*" >&2; }
die() { log "$*"; exit 1; }

# wait_until SECONDS CMD...: run CMD until it succeeds or the deadline passes.
wait_until() {
  local secs="$1"; shift
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

mark_started() {
  mkdir -p "$STATE"
  grep -qxF "$1" "$STARTED" 2>/dev/null || echo "$1" >>"$STARTED"
}

unmark_started() {
  [ -f "$STARTED" ] || return 0
  local rest
  rest="$(grep -vxF "$1" "$STARTED" || true)"
  if [ -n "$rest" ]; then printf '%s\n' "$rest" >"$STARTED"; else rm -f "$STARTED"; fi
}

as_postgres() { su postgres -s /bin/sh -c "cd / && $1"; }

psql_admin() {
  # $1: SQL, fed on stdin. Runs against the maintenance database as the postgres superuser.
  as_postgres "psql -X -q -v ON_ERROR_STOP=1 -p $PG_PORT -d postgres -At" <<<"$1"
}

# The cluster listening on PG_PORT ("<version> <cluster>"), else the newest cluster, else empty.
pg_cluster() {
  pg_lsclusters --no-header 2>/dev/null | awk -v port="$PG_PORT" '
    $3 == port { print $1, $2; found = 1; exit }
    { last = $1 " " $2 }
    END { if (!found && last != "") print last }'
}

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }

start_postgres() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (PostgreSQL is administered with su postgres)"
  if ! pg_ready; then
    local cluster ver name
    cluster="$(pg_cluster)"
    if [ -z "$cluster" ]; then
      ver="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n1)"
      [ -n "$ver" ] || die "no PostgreSQL installation found under /usr/lib/postgresql"
      log "creating PostgreSQL $ver cluster main"
      pg_createcluster "$ver" main -p "$PG_PORT" >/dev/null
      cluster="$ver main"
    fi
    read -r ver name <<<"$cluster"
    if ! pg_lsclusters --no-header | awk -v v="$ver" -v n="$name" '$1==v && $2==n' | grep -q online; then
      log "starting PostgreSQL $ver/$name"
      pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start
      mark_started "postgres $ver $name"
    fi
    wait_until 60 pg_ready || die "PostgreSQL did not accept connections on 127.0.0.1:$PG_PORT within 60 s"
  fi
  # Role and database, idempotently. CREATEDB: sqlx::test makes a database per test.
  psql_admin "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kiln') THEN
        CREATE ROLE kiln LOGIN PASSWORD 'kiln' CREATEDB;
      ELSE
        ALTER ROLE kiln LOGIN PASSWORD 'kiln' CREATEDB;
      END IF;
    END \$\$;"
  if [ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname = 'kiln'")" != "1" ]; then
    psql_admin "CREATE DATABASE kiln OWNER kiln"
  else
    psql_admin "ALTER DATABASE kiln OWNER TO kiln"
  fi
}

redis_ready() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

start_redis() {
  redis_ready && return 0
  mkdir -p "$STATE/logs"
  log "starting redis-server on $REDIS_HOST:$REDIS_PORT"
  redis-server --daemonize yes --bind "$REDIS_HOST" --port "$REDIS_PORT" \
    --save "" --appendonly no \
    --pidfile "$STATE/redis.pid" --logfile "$STATE/logs/redis.log" </dev/null >/dev/null
  mark_started redis
  wait_until 30 redis_ready || die "redis did not answer PING within 30 s (see $STATE/logs/redis.log)"
}

stop_postgres() {
  local line ver name
  line="$(grep '^postgres ' "$STARTED" 2>/dev/null || true)"
  [ -n "$line" ] || return 0
  read -r _ ver name <<<"$line"
  if pg_lsclusters --no-header | awk -v v="$ver" -v n="$name" '$1==v && $2==n' | grep -q online; then
    log "stopping PostgreSQL $ver/$name"
    pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" stop -m fast
  fi
  unmark_started "$line"
}

stop_redis() {
  grep -qxF redis "$STARTED" 2>/dev/null || return 0
  local pidfile="$STATE/redis.pid" pid
  if [ -f "$pidfile" ]; then
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null && [ "$(ps -p "$pid" -o comm= 2>/dev/null)" = redis-server ]; then
      log "stopping redis-server (pid $pid)"
      kill -TERM "$pid"
      local deadline=$((SECONDS + 20))
      while kill -0 "$pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then kill -KILL "$pid" 2>/dev/null || true; break; fi
        sleep 0.2
      done
    fi
    rm -f "$pidfile"
  fi
  unmark_started redis
}

case "${1:-}" in
  start)
    "$ROOT/scripts/ensure-packages.sh" server
    mkdir -p "$STATE"
    start_postgres
    start_redis
    ;;
  stop)
    stop_redis
    stop_postgres
    ;;
  env)
    echo "DATABASE_URL=$DATABASE_URL"
    echo "REDIS_URL=$REDIS_URL"
    ;;
  *)
    echo "usage: $0 start|stop|env" >&2
    exit 2
    ;;
esac
