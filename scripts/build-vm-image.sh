#!/usr/bin/env bash
# Build Kiln's tiny VM guest image from Debian packages only (no image download):
#   - the kernel from linux-image-<version>-cloud-amd64 (apt-get download + dpkg -x),
#   - an initramfs with busybox-static as init and tools, dropbear as the SSH server (with the
#     libraries ldd lists), and the virtio / isofs / ext4 modules in modules.dep order.
# The guest's contract (seed format, console ready line) is in images/vm/README.md.
#
# Output: <dir>/vmlinuz, <dir>/initramfs.cpio.gz and <dir>/disk.raw (a small ext4 base data disk,
# what an instance's qcow2 overlay backs onto; the guest mounts it on /mnt/data), where <dir> is
# ${KILN_VM_IMAGE_DIR:-${TMPDIR:-/tmp}/kiln-vm-image}. Prints <dir> on stdout; logs go to stderr.
# Idempotent: skips the build when the outputs exist and the inputs (package versions, this
# script) are unchanged.
set -euo pipefail
log() { echo "build-vm-image: $*" >&2; }

out="${KILN_VM_IMAGE_DIR:-${TMPDIR:-/tmp}/kiln-vm-image}"
mkdir -p "$out"
# Concurrent callers (parallel tests) wait for one build instead of racing on the same files.
exec 9>"$out/.lock"
flock 9

for c in apt-get apt-cache dpkg depmod cpio gzip ldd mke2fs truncate; do
  command -v "$c" >/dev/null || { log "missing $c (run scripts/ensure-packages.sh all)"; exit 1; }
done
busybox=/bin/busybox
[ -x "$busybox" ] || { log "missing $busybox (package busybox-static)"; exit 1; }
dropbear=$(command -v dropbear || true)
[ -n "$dropbear" ] || { log "missing dropbear (package dropbear-bin)"; exit 1; }

# The kernel: whatever the cloud-amd64 metapackage points at.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
  | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)
[ -n "$kpkg" ] || { log "cannot resolve linux-image-cloud-amd64 (apt-get update?)"; exit 1; }
kver_pkg=$(apt-cache policy "$kpkg" | sed -n 's/^ *Candidate: //p')

# Inputs: anything that changes the image.
stamp="kernel=$kpkg $kver_pkg
busybox=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || sha256sum "$busybox" | cut -c1-16)
dropbear=$(dpkg-query -W -f='${Version}' dropbear-bin 2>/dev/null || sha256sum "$dropbear" | cut -c1-16)
script=$(sha256sum "$0" | cut -c1-16)"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] && [ -s "$out/disk.raw" ] && [ -f "$out/inputs" ] \
  && [ "$(cat "$out/inputs")" = "$stamp" ]; then
  log "up to date in $out"
  echo "$out"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-vm-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading $kpkg $kver_pkg"
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" >&2)
dpkg -x "$work"/linux-image-*.deb "$work/kernel"
kver=$(ls "$work/kernel/lib/modules" | head -n1)
moddir="$work/kernel/lib/modules/$kver"
depmod -b "$work/kernel" "$kver"

root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,root,mnt/seed,mnt/data,lib/modules,var/log}
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"

# dropbear and the shared libraries it needs.
cp "$dropbear" "$root/sbin/dropbear"
for lib in $(ldd "$dropbear" | awk '/=>/ {print $3} /^\t\// {print $1}'); do
  [ -f "$lib" ] || continue
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# /lib64 -> the loader path ldd names; make sure both layouts resolve.
mkdir -p "$root/lib64" "$root/lib/x86_64-linux-gnu"

# Modules in load order: each wanted module after its dependencies (modules.dep lists a module's
# dependencies, the deepest last).
want="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci failover net_failover virtio_net virtio_blk isofs ext4"
order=()
add_mod() {
  local name=$1 line rel deps d
  line=$(grep -E "(^|/)${name}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" || true)
  [ -n "$line" ] || { log "module $name is built in or absent, skipping"; return 0; }
  rel=${line%%:*}
  deps=${line#*:}
  for d in $(echo $deps | tr ' ' '\n' | tac); do
    d=$(basename "$d"); d=${d%%.ko*}
    add_mod "$d"
  done
  for d in "${order[@]:-}"; do [ "$d" = "$rel" ] && return 0; done
  order+=("$rel")
}
for m in $want; do add_mod "$m"; done
: > "$root/lib/modules/load-order"
for rel in "${order[@]}"; do
  f="$moddir/$rel"
  base=$(basename "$rel")
  case "$base" in
    *.ko.xz) xz -dc "$f" > "$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
    *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/${base%.zst}"; base=${base%.zst} ;;
    *.ko.gz) gzip -dc "$f" > "$root/lib/modules/${base%.gz}"; base=${base%.gz} ;;
    *) cp "$f" "$root/lib/modules/$base" ;;
  esac
  echo "$base" >> "$root/lib/modules/load-order"
done
log "modules: $(tr '\n' ' ' < "$root/lib/modules/load-order")"

cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat > "$root/etc/group" <<'EOF'
root:x:0:
EOF
echo '/bin/sh' > "$root/etc/shells"

cat > "$root/init" <<'EOF'
#!/bin/sh
# Kiln guest init (see images/vm/README.md for the contract).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
say() { echo "kiln-guest: $*" > /dev/console; }

while read -r m; do
  insmod "/lib/modules/$m" 2>/dev/null || say "insmod $m failed"
done < /lib/modules/load-order
mdev -s

ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

# The cloud-init NoCloud seed: an ISO 9660 volume labelled cidata with user-data and meta-data.
seed=
for dev in /dev/vd[a-z] /dev/sr[0-9]; do
  [ -b "$dev" ] || continue
  if mount -t iso9660 -o ro "$dev" /mnt/seed 2>/dev/null; then
    if [ -f /mnt/seed/user-data ]; then seed=$dev; break; fi
    umount /mnt/seed
  fi
done
mkdir -p /root/.ssh
chmod 700 /root /root/.ssh
: > /root/.ssh/authorized_keys
name=kiln-guest
if [ -n "$seed" ]; then
  say "seed on $seed"
  # ssh_authorized_keys: a YAML list of "- key" lines; hostname: a scalar.
  awk '
    /^ssh_authorized_keys:/ { inkeys = 1; next }
    inkeys && /^[ \t]*-[ \t]*/ { sub(/^[ \t]*-[ \t]*/, ""); gsub(/^["\047]|["\047]$/, ""); print; next }
    inkeys && /^[^ \t#]/ { inkeys = 0 }
  ' /mnt/seed/user-data > /root/.ssh/authorized_keys
  h=$(sed -n 's/^hostname:[ \t]*//p' /mnt/seed/user-data | tr -d "\"'\r" | head -n1)
  [ -n "$h" ] || h=$(sed -n 's/^local-hostname:[ \t]*//p' /mnt/seed/meta-data 2>/dev/null | tr -d "\"'\r" | head -n1)
  [ -n "$h" ] && name=$h
else
  say "no cidata seed found: no SSH keys"
fi
chmod 600 /root/.ssh/authorized_keys
hostname "$name"
echo "$name" > /etc/hostname
say "hostname $name, $(grep -c . /root/.ssh/authorized_keys) ssh key(s)"

# The writable disk: the first virtio disk holding an ext2/3/4 file system.
for dev in /dev/vd[a-z]; do
  [ -b "$dev" ] && [ "$dev" != "$seed" ] || continue
  if mount -t ext4 "$dev" /mnt/data 2>/dev/null; then say "data disk $dev on /mnt/data"; break; fi
done

mkdir -p /etc/dropbear
# -R: make host keys at the first connection; -s: no passwords; -E: log to stderr (console).
dropbear -R -s -E -p 22 2>/var/log/dropbear.log
if pidof dropbear >/dev/null; then
  say "ready"
else
  say "dropbear failed"; cat /var/log/dropbear.log > /dev/console
fi
exec sh -c 'while :; do sleep 3600; done'
EOF
chmod 755 "$root/init"

cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -6 > "$out/initramfs.cpio.gz.tmp"
# The base data disk: 64 MiB of ext4 holding a README, made without root (mke2fs -d).
mkdir -p "$work/data"
printf '%s\n' "This is the instance's own disk (a copy-on-write overlay of the image's base disk):" \
  "what is written under /mnt/data is kept across stop and start, and deleted with the instance." \
  > "$work/data/README"
rm -f "$out/disk.raw.tmp"
truncate -s 64M "$out/disk.raw.tmp"
mke2fs -q -t ext4 -F -L kiln-data -d "$work/data" "$out/disk.raw.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/disk.raw.tmp" "$out/disk.raw"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
printf '%s' "$stamp" > "$out/inputs"
log "built kernel $kver, initramfs and disk.raw in $out"
echo "$out"
