#!/usr/bin/env bash
# Build Kiln's local container images from source — no registry is needed or used.
#
#   kiln/demo-model:1   the reference model server (images/demo-model), a static binary in a
#                       FROM-scratch image: KILN_DEMO_IMAGE for pods and endpoints.
#
# The binary is linked statically against glibc (libc6-dev ships libc.a) in its own target
# directory, so the workspace's normal build cache is not disturbed. Idempotent: an image whose
# binary has not changed is not rebuilt. Prints the image reference on stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${TMPDIR:-/tmp}/kiln-target}"
TRIPLE=x86_64-unknown-linux-gnu
IMAGE=kiln/demo-model:1

log() { echo "kiln images: $*" >&2; }

command -v docker >/dev/null || { log "docker is not installed"; exit 1; }
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --quiet --target "$TRIPLE" -p kiln-demo-model --manifest-path "$ROOT/Cargo.toml" >&2
BIN="$CARGO_TARGET_DIR/$TRIPLE/release/kiln-demo-model"
SUM="$(sha256sum "$BIN" | cut -c1-16)"
if [ "$(docker image inspect -f '{{ index .Config.Labels "kiln.binary" }}' "$IMAGE" 2>/dev/null || true)" = "$SUM" ]; then
  log "$IMAGE is current"
else
  CTX="$(mktemp -d)"
  trap 'rm -rf "$CTX"' EXIT
  cp "$BIN" "$CTX/kiln-demo-model"
  cat >"$CTX/Dockerfile" <<DOCKERFILE
FROM scratch
COPY kiln-demo-model /kiln-demo-model
LABEL kiln.binary="$SUM"
ENV PORT=8000
EXPOSE 8000
USER 65534:65534
ENTRYPOINT ["/kiln-demo-model"]
DOCKERFILE
  docker build --quiet -t "$IMAGE" "$CTX" >&2
  log "built $IMAGE"
fi
echo "$IMAGE"
