#!/usr/bin/env bash
# Install the OS packages Kiln's local stack and tests need, when they are missing.
# Idempotent and non-interactive. Usage: scripts/ensure-packages.sh [server|browser|deploy|all]
#
# `deploy` (the checks of deploy/ and docker-compose.yml in tests/tests/deploy.rs) also makes a
# Python venv with the Kubernetes schema validator from PyPI (it bundles the schemas: no
# network at test time) in $KILN_TOOLS_DIR (default ~/.cache/kiln/tools); the tests look there.
set -euo pipefail
want="${1:-server}"
pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || pkgs+=("$2"); }
case "$want" in
  server|all)
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || pkgs+=(postgresql)
    need redis-server redis-server
    need curl curl
    need ip iproute2   # network namespaces for the fleet's network-cut test
    [ -x /bin/busybox ] || pkgs+=(busybox-static)   # the agent's Docker tests' tiny image and the VM guest's init
    # The VM guest image (scripts/build-vm-image.sh) and its boot test (images/vm).
    need qemu-system-x86_64 qemu-system-x86
    need qemu-img qemu-utils   # the agent's per-instance qcow2 overlays
    need ssh openssh-client
    need ssh-keygen openssh-client
    need depmod kmod
    need cpio cpio
    need dropbear dropbear-bin
    need genisoimage genisoimage
    need mke2fs e2fsprogs
    ;;&
  browser|all)
    need chromium chromium
    need chromedriver chromium-driver
    ;;&
  deploy|all)
    need docker-compose docker-compose   # `docker-compose config` validates docker-compose.yml
    need systemd-analyze systemd         # `verify` and `security` over the agent's unit
    need objcopy binutils                # strips the debug binaries the image test packs
    /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || pkgs+=(python3-venv)
    ;;
esac
if [ "${#pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  echo "kiln: installing ${pkgs[*]} from the OS packages" >&2
  $SUDO dpkg --configure -a >/dev/null 2>&1 || true
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

case "$want" in
  deploy|all)
    # Pinned: the schemas it bundles (Kubernetes 1.25 … 1.37) are what the manifests are held to.
    KUBERNETES_VALIDATE=1.37.0
    tools="${KILN_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/tools}"
    venv="$tools/venv"
    if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null)" != "$KUBERNETES_VALIDATE" ]; then
      echo "kiln: installing kubernetes-validate $KUBERNETES_VALIDATE from PyPI into $venv" >&2
      rm -rf "$venv"
      mkdir -p "$tools"
      /usr/bin/python3 -m venv "$venv"
      "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE"
    fi
    ;;
esac
