#!/usr/bin/env bash
# Install the OS packages Kiln's local stack and tests need, when they are missing.
# Idempotent and non-interactive. Usage: scripts/ensure-packages.sh [server|browser|all]
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
    ;;
esac
[ "${#pkgs[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
export DEBIAN_FRONTEND=noninteractive
echo "kiln: installing ${pkgs[*]} from the OS packages" >&2
$SUDO dpkg --configure -a >/dev/null 2>&1 || true
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
