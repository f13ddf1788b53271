#!/usr/bin/env bash
# `make down`: stop what `make up` started — the Kiln services by their pid files, then the
# PostgreSQL / Redis servers that scripts/services.sh started (servers that were already
# running are left alone). Idempotent. .kiln/env and .kiln/logs are kept.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.kiln"

log() { echo "kiln down: $*" >&2; }

# Agents first (by their pid files, agent-NAME.pid), then the services they talk to.
for pidfile in "$STATE"/pids/agent-*.pid; do
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  args="$(ps -p "$pid" -o args= 2>/dev/null || true)"
  case "$args" in
    *"/kiln-agent "*)
      log "stopping $(basename "$pidfile" .pid) (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 20))
      while kill -0 "$pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then kill -KILL "$pid" 2>/dev/null || true; break; fi
        sleep 0.2
      done ;;
  esac
  rm -f "$pidfile"
done

# VMs outlive their agent (a restarted agent adopts them): stop them too, by the pid each
# agent recorded in its VM directory.
for meta in "$STATE"/agents/*/vms/*/meta.json; do
  [ -f "$meta" ] || continue
  pid="$(sed -n 's/.*"pid":[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$meta")"
  [ -n "$pid" ] || continue
  case "$(ps -p "$pid" -o args= 2>/dev/null || true)" in
    *qemu-system*) log "stopping VM $(basename "$(dirname "$meta")") (pid $pid)"; kill -TERM "$pid" 2>/dev/null || true ;;
  esac
done

for name in kiln-billing kiln-scheduler kiln-gateway kiln-api; do
  pidfile="$STATE/pids/$name.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  # Only a live process that still runs $name (not a recycled pid).
  args="$(ps -p "$pid" -o args= 2>/dev/null || true)"
  if [ -n "$args" ] && case " $args" in *"/$name"*|*" $name"*) true ;; *) false ;; esac; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        log "$name (pid $pid) still running after 20 s: killing it"
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.2
    done
  fi
  rm -f "$pidfile"
done

"$ROOT/scripts/services.sh" stop
