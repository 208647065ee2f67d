#!/usr/bin/env bash
# Builds qsnap's test guest from Debian packages: a distribution kernel and an initramfs holding
# busybox-static, the virtio block/console, ext4 and power-button modules, the QEMU guest agent (qemu-ga with
# the shared libraries it links, taken from this Debian host) and tests/guest/init.sh as /init.
#
# Output (cached, never committed): $QSNAP_GUEST_DIR (default: <repo>/target/qsnap-guest)
#   vmlinuz  initramfs.gz  VERSIONS (packages and the hash of the inputs; a changed input rebuilds)
# Needs: apt-get (package downloads only, no install), dpkg-deb, cpio, gzip, ldd, and the
# libraries qemu-ga links (glib, libudev, liburing, libnuma: QEMU itself pulls them in).
# Override the kernel package with QSNAP_KERNEL_PKG (default: what linux-image-amd64 depends on).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${QSNAP_GUEST_DIR:-$repo/target/qsnap-guest}

resolve_kernel() {
  apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'
}
kernel_pkg=${QSNAP_KERNEL_PKG:-}
if [ -z "$kernel_pkg" ]; then
  kernel_pkg=$(resolve_kernel)
  if [ -z "$kernel_pkg" ]; then
    # A fresh machine may have no package lists yet.
    SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -q >&2 || true
    kernel_pkg=$(resolve_kernel)
  fi
  if [ -z "$kernel_pkg" ]; then
    echo "qsnap guest: cannot resolve linux-image-amd64 from apt (Debian's archive needed), or set QSNAP_KERNEL_PKG" >&2
    exit 1
  fi
fi
kver=$(apt-cache policy "$kernel_pkg" | awk '/Candidate:/{print $2}')
bver=$(apt-cache policy busybox-static | awk '/Candidate:/{print $2}')
gver=$(apt-cache policy qemu-guest-agent | awk '/Candidate:/{print $2}')
inputs_hash=$(cat "$here/build.sh" "$here/init.sh" | sha256sum | cut -c1-16)
stamp="kernel=$kernel_pkg $kver
busybox-static=$bver
qemu-guest-agent=$gver
inputs=$inputs_hash"

if [ -f "$out/VERSIONS" ] && [ "$(cat "$out/VERSIONS")" = "$stamp" ] \
   && [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ]; then
  echo "qsnap guest: up to date in $out" >&2
  exit 0
fi

echo "qsnap guest: building in $out ($kernel_pkg $kver, busybox-static $bver)" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"   # apt's sandbox user must be able to write the downloads
sandbox=(); [ "$(id -u)" -eq 0 ] && sandbox=(-o APT::Sandbox::User=root)  # root: no _apt drop
(cd "$work" && apt-get download -q "${sandbox[@]}" "$kernel_pkg" busybox-static qemu-guest-agent >/dev/null)
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/b"
dpkg-deb -x "$work"/qemu-guest-agent_*.deb "$work/g"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,etc,lib/modules,tmp}
cp "$work/b/bin/busybox" "$root/bin/busybox"
install -m 755 "$here/init.sh" "$root/init"

# The guest agent and the libraries it links, at the paths the dynamic loader looks in.
install -m 755 "$work/g/usr/sbin/qemu-ga" "$root/bin/qemu-ga"
ldd "$work/g/usr/sbin/qemu-ga" | grep -o '/[^ ]*' | while read -r lib; do
  [ -e "$lib" ] || { echo "qsnap guest: qemu-ga needs $lib, missing on this host" >&2; exit 1; }
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

moddir=$(echo "$work"/k/lib/modules/*)
# Load order: each module after its `depends=` (read from the .modinfo section), depth first.
declare -A seen=()
order=()
find_mod() { find "$moddir" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" | head -n 1; }
add_mod() {
  local m=$1 f deps d
  [ -n "${seen[$m]:-}" ] && return 0
  seen[$m]=1
  f=$(find_mod "$m")
  if [ -z "$f" ]; then
    # Built into the kernel: nothing to load.
    if grep -q "/$m\.ko\$" "$moddir/modules.builtin" 2>/dev/null; then return 0; fi
    echo "qsnap guest: module $m not found in $kernel_pkg" >&2; exit 1
  fi
  case "$f" in *.ko) ;; *) echo "qsnap guest: compressed module $f is not supported" >&2; exit 1 ;; esac
  deps=$(grep -ao 'depends=[a-z0-9_,-]*' "$f" | head -n 1 | cut -d= -f2 | tr ',' ' ')
  for d in $deps; do add_mod "$d"; done
  cp "$f" "$root/lib/modules/$m.ko"
  order+=("$m")
}
# button + evdev: the ACPI power button as /dev/input/event*, so `qsnap shutdown` powers it off.
for m in virtio_pci virtio_blk virtio_console crc32c_generic ext4 button evdev; do add_mod "$m"; done
printf '%s\n' "${order[@]}" > "$root/etc/modules.order"

mkdir -p "$out"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$work/initramfs.gz"
cp "$work"/k/boot/vmlinuz-* "$work/vmlinuz"
mv -f "$work/initramfs.gz" "$out/initramfs.gz"
mv -f "$work/vmlinuz" "$out/vmlinuz"
printf '%s\n' "$stamp" > "$out/VERSIONS.tmp" && mv -f "$out/VERSIONS.tmp" "$out/VERSIONS"
echo "qsnap guest: built ($(printf '%s ' "${order[@]}"))" >&2
