#!/usr/bin/env bash
# `make up`: the whole local stack, natively. PostgreSQL + Redis (scripts/services.sh), then
# kiln-api (migrated) on 127.0.0.1:8080, kiln-gateway on 127.0.0.1:8090, kiln-scheduler (node
# control on 127.0.0.1:7070, ops on :9091), kiln-billing (ops on :9092) and two simulated GPU hosts (kiln-agent with the
# 8x H100 and 4x A100 inventories) in the background. Writes .kiln/env. Running it again is harmless: healthy services are left running, unless
# their binary was rebuilt since they started, in which case they are restarted.
#
# Env: PROFILE=release builds and runs release binaries (default: debug, shared with tests).
#      CARGO_TARGET_DIR as for cargo (default: ${TMPDIR:-/tmp}/kiln-target, as in the Makefile).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STATE="$ROOT/.kiln"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${TMPDIR:-/tmp}/kiln-target}"
PROFILE="${PROFILE:-debug}"

API_ADDR=127.0.0.1:8080
GATEWAY_ADDR=127.0.0.1:8090
FLEET_ADDR=127.0.0.1:7070
SCHEDULER_OPS_ADDR=127.0.0.1:9091
SCHEDULER_URL="http://$SCHEDULER_OPS_ADDR"
BILLING_OPS_ADDR=127.0.0.1:9092
BILLING_URL="http://$BILLING_OPS_ADDR"
# Simulated GPU hosts: NAME:INVENTORY (agent/inventory/inventories/INVENTORY.toml).
AGENTS="sim-h100-0:h100-sxm-8x sim-a100-0:a100-40gb-4x"
API_URL="http://$API_ADDR"
GATEWAY_URL="http://$GATEWAY_ADDR"
ADMIN_EMAIL=admin@kiln.local
HEALTH_DEADLINE_SECS=60

log() { echo "kiln up: $*" >&2; }
die() { log "$*"; exit 1; }

mkdir -p "$STATE/logs" "$STATE/pids"

# 1. PostgreSQL and Redis.
"$ROOT/scripts/services.sh" start
eval "$("$ROOT/scripts/services.sh" env)"   # DATABASE_URL, REDIS_URL

# 2. Build.
case "$PROFILE" in
  debug)   cargo build --bins ;;
  release) cargo build --bins --release ;;
  *)       die "PROFILE must be debug or release, not '$PROFILE'" ;;
esac
BIN="$CARGO_TARGET_DIR/$PROFILE"

# 2b. Local container images (no registry here): the reference model server.
DEMO_IMAGE=""
if docker info >/dev/null 2>&1; then
  DEMO_IMAGE="$("$ROOT/scripts/build-images.sh")"
else
  log "Docker is not running: skipping the demo model image (pods need Docker)"
fi

# 2c. The VM guest image instances boot (a kernel, an initramfs with an SSH server, a data
# disk), from OS packages; the agents find it through their config, the catalog by name.
VM_IMAGE_DIR=""
if ! VM_IMAGE_DIR="$("$ROOT/scripts/build-vm-image.sh")"; then
  log "could not build the VM guest image: instances will not boot (see the lines above)"
  VM_IMAGE_DIR=""
fi
# Instances run under TCG by default: on these machines /dev/kvm opens but a KVM guest hangs.
# KILN_VM_ACCEL=auto uses KVM where it works.
VM_ACCEL="${KILN_VM_ACCEL:-tcg}"

# 3. The operator password: generated once, then read back from .kiln/env.
ADMIN_PASSWORD=""
if [ -f "$STATE/env" ]; then
  ADMIN_PASSWORD="$(sed -n 's/^KILN_ADMIN_PASSWORD=//p' "$STATE/env" | tail -n1)"
fi
if [ "${#ADMIN_PASSWORD}" -lt 20 ]; then
  ADMIN_PASSWORD="$(head -c 24 /dev/urandom | base64 | tr '+/' 'xy' | tr -d '=\n')"
fi

# 3b. The key that encrypts tenants' secret env values at rest: generated once, then kept.
SECRETS_KEY=""
if [ -f "$STATE/env" ]; then
  SECRETS_KEY="$(sed -n 's/^KILN_SECRETS_KEY=//p' "$STATE/env" | tail -n1)"
fi
if [ "${#SECRETS_KEY}" -lt 40 ]; then
  SECRETS_KEY="$(head -c 32 /dev/urandom | base64 | tr -d '\n')"
fi

# 3c. The secret the payment provider signs billing webhooks with: generated once, then kept.
WEBHOOK_SECRET=""
if [ -f "$STATE/env" ]; then
  WEBHOOK_SECRET="$(sed -n 's/^KILN_BILLING_WEBHOOK_SECRET=//p' "$STATE/env" | tail -n1)"
fi
if [ "${#WEBHOOK_SECRET}" -lt 32 ]; then
  WEBHOOK_SECRET="$(head -c 32 /dev/urandom | base64 | tr '+/' 'xy' | tr -d '=\n')"
fi

# 4. Schema.
DATABASE_URL="$DATABASE_URL" "$BIN/kiln-api" migrate

# 5. Services.
healthy() { curl -fs --max-time 2 -o /dev/null "$1/healthz"; }

# our_pid NAME: the pid from .kiln/pids/NAME.pid when that process is alive and runs NAME
# (not a recycled pid).
our_pid() {
  local f="$STATE/pids/$1.pid" pid args
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  kill -0 "$pid" 2>/dev/null || return 1
  args="$(ps -p "$pid" -o args= 2>/dev/null)" || return 1
  case " $args" in *"/$1"*|*" $1"*) echo "$pid" ;; *) return 1 ;; esac
}

stop_pid() {
  local pid="$1" deadline=$((SECONDS + 15))
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then kill -KILL "$pid" 2>/dev/null || true; break; fi
    sleep 0.2
  done
}

# start_service NAME URL SUBCOMMAND ENV...: start `$BIN/NAME [SUBCOMMAND]` with ENV, unless it
# is already up and current.
start_service() {
  local name="$1" url="$2" sub="$3"; shift 3
  local pid pidfile="$STATE/pids/$name.pid" logfile="$STATE/logs/$name.log"
  if pid="$(our_pid "$name")"; then
    if [ "$BIN/$name" -nt "$pidfile" ]; then
      log "$name (pid $pid) runs an older binary: restarting it"
      stop_pid "$pid"
    elif healthy "$url"; then
      log "$name already running (pid $pid)"
      return 0
    else
      log "$name (pid $pid) does not answer $url/healthz: restarting it"
      stop_pid "$pid"
    fi
  fi
  rm -f "$pidfile"
  if healthy "$url"; then
    die "something that is not ours already answers $url/healthz; stop it first"
  fi
  log "starting $name (log: ${logfile#"$ROOT"/})"
  echo "=== $(date -u +%FT%TZ) starting $name" >>"$logfile"
  # shellcheck disable=SC2086 # $sub is one word or none
  env "$@" nohup "$BIN/$name" $sub </dev/null >>"$logfile" 2>&1 &
  echo $! >"$pidfile"
}

# wait_healthy NAME URL: poll URL/healthz until it answers; on failure show the log and fail.
wait_healthy() {
  local name="$1" url="$2" pid deadline=$((SECONDS + HEALTH_DEADLINE_SECS))
  pid="$(cat "$STATE/pids/$name.pid")"
  until healthy "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited before answering $url/healthz; last lines of .kiln/logs/$name.log:"
      tail -n 40 "$STATE/logs/$name.log" >&2
      rm -f "$STATE/pids/$name.pid"
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "$name did not answer $url/healthz within ${HEALTH_DEADLINE_SECS} s; last lines of .kiln/logs/$name.log:"
      tail -n 40 "$STATE/logs/$name.log" >&2
      exit 1
    fi
    sleep 0.2
  done
}

RUST_LOG="${RUST_LOG:-info}"
start_service kiln-api "$API_URL" serve \
  RUST_LOG="$RUST_LOG" \
  KILN_API_LISTEN="$API_ADDR" \
  DATABASE_URL="$DATABASE_URL" \
  REDIS_URL="$REDIS_URL" \
  KILN_PUBLIC_URL="$API_URL" \
  KILN_ADMIN_EMAIL="$ADMIN_EMAIL" \
  KILN_ADMIN_PASSWORD="$ADMIN_PASSWORD" \
  KILN_SECRETS_KEY="$SECRETS_KEY" \
  KILN_BILLING_WEBHOOK_SECRET="$WEBHOOK_SECRET" \
  KILN_GATEWAY_URL="$GATEWAY_URL" \
  KILN_INSTANCE_SHAPE="${KILN_INSTANCE_SHAPE:-cpu_millis=1000,memory_mib=512}"
start_service kiln-gateway "$GATEWAY_URL" "" \
  RUST_LOG="$RUST_LOG" \
  KILN_GATEWAY_LISTEN="$GATEWAY_ADDR" \
  DATABASE_URL="$DATABASE_URL" \
  REDIS_URL="$REDIS_URL"
start_service kiln-scheduler "$SCHEDULER_URL" "" \
  RUST_LOG="$RUST_LOG" \
  KILN_FLEET_LISTEN="$FLEET_ADDR" \
  KILN_SCHEDULER_OPS_LISTEN="$SCHEDULER_OPS_ADDR" \
  DATABASE_URL="$DATABASE_URL" \
  REDIS_URL="$REDIS_URL" \
  KILN_SECRETS_KEY="$SECRETS_KEY"
start_service kiln-billing "$BILLING_URL" "" \
  RUST_LOG="$RUST_LOG" \
  KILN_BILLING_OPS_LISTEN="$BILLING_OPS_ADDR" \
  DATABASE_URL="$DATABASE_URL"
wait_healthy kiln-api "$API_URL"
wait_healthy kiln-gateway "$GATEWAY_URL"
wait_healthy kiln-scheduler "$SCHEDULER_URL"
wait_healthy kiln-billing "$BILLING_URL"

# 6. Simulated GPU hosts. Each keeps its node credential in .kiln/agents/NAME; only a host
# without one asks the API (as the operator) for a one-time bootstrap token.
operator_token() {
  curl -fsS --max-time 10 -H 'content-type: application/json' \
    -d "{\"email\":\"$ADMIN_EMAIL\",\"password\":\"$ADMIN_PASSWORD\"}" \
    "$API_URL/v1/auth/login" | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p'
}
bootstrap_token() {
  curl -fsS --max-time 10 -H "authorization: Bearer $1" -H 'content-type: application/json' \
    -d "{\"note\":\"make up: $2\"}" "$API_URL/v1/admin/node-tokens" |
    sed -n 's/.*"token":"\([^"]*\)".*/\1/p'
}
agent_pid() {
  local f="$STATE/pids/agent-$1.pid" pid args
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  kill -0 "$pid" 2>/dev/null || return 1
  args="$(ps -p "$pid" -o args= 2>/dev/null)" || return 1
  case "$args" in *"/kiln-agent "*"agents/$1"*) echo "$pid" ;; *) return 1 ;; esac
}
ACCESS=""
for spec in $AGENTS; do
  name="${spec%%:*}" inventory="${spec#*:}"
  dir="$STATE/agents/$name" pidfile="$STATE/pids/agent-$name.pid" logfile="$STATE/logs/agent-$name.log"
  mkdir -p "$dir" && chmod 700 "$dir"
  # Instances: QEMU with the guest image above; a short ACPI wait (the tiny guest ignores it).
  printf '# Written by scripts/up.sh.\n[runtime]\nvm_image_dir = "%s"\nvm_accel = "%s"\nvm_powerdown_timeout_ms = 3000\nvm_start_timeout_ms = 60000\n' \
    "$VM_IMAGE_DIR" "$VM_ACCEL" >"$dir/agent.toml"
  if pid="$(agent_pid "$name")"; then
    if [ "$BIN/kiln-agent" -nt "$pidfile" ]; then
      log "agent $name (pid $pid) runs an older binary: restarting it"
      stop_pid "$pid"
    else
      log "agent $name already running (pid $pid)"
      continue
    fi
  fi
  token=""
  if [ ! -f "$dir/credential.json" ]; then
    [ -n "$ACCESS" ] || ACCESS="$(operator_token)"
    [ -n "$ACCESS" ] || die "could not sign in as $ADMIN_EMAIL to issue a bootstrap token"
    token="$(bootstrap_token "$ACCESS" "$name")"
    [ -n "$token" ] || die "could not issue a bootstrap token for $name"
  fi
  log "starting agent $name ($inventory; log: ${logfile#"$ROOT"/})"
  echo "=== $(date -u +%FT%TZ) starting kiln-agent $name" >>"$logfile"
  marker="$(wc -l <"$logfile")"
  KILN_AGENT_BOOTSTRAP_TOKEN="$token" RUST_LOG="$RUST_LOG" nohup "$BIN/kiln-agent" \
    --config "$dir/agent.toml" --control-plane "http://$FLEET_ADDR" --state-dir "$dir" --hostname "$name" --public-address 127.0.0.1 \
    --nvml disabled --simulated-inventory "$ROOT/agent/inventory/inventories/$inventory.toml" \
    --fault-file "$dir/faults.toml" </dev/null >>"$logfile" 2>&1 &
  echo $! >"$pidfile"
  deadline=$((SECONDS + HEALTH_DEADLINE_SECS))
  until tail -n +"$((marker + 1))" "$logfile" | grep -q "registered with the control plane"; do
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      log "agent $name exited; last lines of ${logfile#"$ROOT"/}:"
      tail -n 20 "$logfile" >&2
      rm -f "$pidfile"
      exit 1
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "agent $name did not register within ${HEALTH_DEADLINE_SECS} s (see ${logfile#"$ROOT"/})"
    sleep 0.2
  done
done

# 6b. The guest image in the catalog (PUT is idempotent), so a newcomer can create an instance.
if [ -n "$VM_IMAGE_DIR" ]; then
  [ -n "$ACCESS" ] || ACCESS="$(operator_token)"
  [ -n "$ACCESS" ] || die "could not sign in as $ADMIN_EMAIL to register the VM image"
  curl -fsS --max-time 10 -o /dev/null -X PUT -H "authorization: Bearer $ACCESS" \
    -H 'content-type: application/json' \
    -d '{"description":"Kiln tiny guest: busybox and dropbear, root login with your key, data disk on /mnt/data","kernel":"vmlinuz","initrd":"initramfs.cpio.gz","disk":"disk.raw","kernel_args":"console=ttyS0 quiet panic=-1","login_user":"root","min_disk_gib":1}' \
    "$API_URL/v1/admin/images/kiln-tiny" || die "could not register the VM image kiln-tiny"
  log "VM image kiln-tiny registered (files in $VM_IMAGE_DIR)"
fi

# 7. .kiln/env
umask 077
cat >"$STATE/env.tmp" <<EOF
# Written by scripts/up.sh (make up). Shell KEY=value lines: \`set -a; . .kiln/env; set +a\`
KILN_API_URL=$API_URL
KILN_GATEWAY_URL=$GATEWAY_URL
KILN_FLEET_URL=http://$FLEET_ADDR
KILN_ADMIN_EMAIL=$ADMIN_EMAIL
KILN_ADMIN_PASSWORD=$ADMIN_PASSWORD
DATABASE_URL=$DATABASE_URL
REDIS_URL=$REDIS_URL
KILN_DEMO_IMAGE=$DEMO_IMAGE
KILN_SECRETS_KEY=$SECRETS_KEY
KILN_BILLING_WEBHOOK_SECRET=$WEBHOOK_SECRET
KILN_DEMO_VM_IMAGE=${VM_IMAGE_DIR:+kiln-tiny}
EOF
mv "$STATE/env.tmp" "$STATE/env"

cat <<EOF

Kiln is up.
  console  $API_URL/
  API      $API_URL   (GraphQL at $API_URL/graphql)
  gateway  $GATEWAY_URL
  fleet    http://$FLEET_ADDR (agents dial in here; ops at $SCHEDULER_URL)
  billing  rates usage every 15 s (ops at $BILLING_URL)
  agents   $(for spec in $AGENTS; do printf '%s ' "${spec%%:*}"; done)(simulated GPU hosts; see $API_URL/admin/fleet)
  operator $ADMIN_EMAIL / $ADMIN_PASSWORD
  images   kiln-tiny (GET $API_URL/v1/images): a VM with an SSH server, booted under QEMU
Log in at the console with that email and password, or from a shell:
  set -a; source .kiln/env; set +a
  kiln login
Logs: .kiln/logs/   Stop: make down
EOF
