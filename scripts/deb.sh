#!/usr/bin/env bash
# Builds a Debian package of qsnap with dpkg-deb: the files scripts/install.sh installs, under
# /usr (manual pages gzipped, as Debian's policy has them), depending on QEMU ≥ 7.2 and
# qemu-utils. Install it with `apt install ./target/debian/qsnap_*.deb`; it removes cleanly.
#
# Usage: ./scripts/deb.sh [OUT_DIR]       (default target/debian; prints the .deb's path)
#   QSNAP_BIN=PATH  package this binary instead of building one (cargo build --release)
#   QSNAP_DEB_COMPRESS=xz|gzip|none   the archive's compression (default xz)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/target/debian}
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
arch=$(dpkg --print-architecture)
[ -n "$version" ] || { echo "qsnap deb: no version in Cargo.toml" >&2; exit 1; }

umask 022
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 755 "$stage"   # it becomes the package's `./`
DESTDIR=$stage bash "$repo/scripts/install.sh" /usr
gzip -9n "$stage"/usr/share/man/man1/*.1
# Debian's zsh looks in vendor-completions, not site-functions (which is /usr/local's).
install -d "$stage/usr/share/zsh/vendor-completions"
mv "$stage/usr/share/zsh/site-functions/_qsnap" "$stage/usr/share/zsh/vendor-completions/_qsnap"
rmdir "$stage/usr/share/zsh/site-functions"
install -d "$stage/usr/share/doc/qsnap"
install -m 644 "$repo/README.md" "$stage/usr/share/doc/qsnap/README.md"
install -d "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: qsnap
Version: $version
Architecture: $arch
Maintainer: qsnap developers <qsnap@localhost>
Installed-Size: $size
Depends: qemu-system-x86 (>= 1:7.2), qemu-utils, libc6
Section: admin
Priority: optional
Description: live QEMU snapshots (memory + disks) over QMP, without libvirt
 qsnap talks QMP straight to a running QEMU's monitor socket to take live
 snapshots (qcow2 disk overlays plus memory and device state) while the guest
 runs, to revert to them and delete them, to clone running VMs, and to move
 snapshots between hosts as bundles or through an object store.
CONTROL
mkdir -p "$out"
deb=$out/qsnap_${version}_${arch}.deb
dpkg-deb --root-owner-group "-Z${QSNAP_DEB_COMPRESS:-xz}" --build "$stage" "$deb" >/dev/null
echo "$deb"
