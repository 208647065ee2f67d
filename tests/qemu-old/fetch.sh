#!/usr/bin/env bash
# Fetches Debian bookworm's QEMU 7.2 into a private prefix beside the installed 10.x, for the
# old-QEMU tests (no `file:` migration: the memory stream goes through a pipe; the
# background-snapshot thread resumes the guest by itself). Writes a wrapper that sets the
# module and firmware paths: target/qemu-7.2/qemu-system-x86_64.
# Usage: tests/qemu-old/fetch.sh        (Debian/Ubuntu with bookworm's package lists)
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out="${QSNAP_OLD_QEMU_DIR:-$repo/target/qemu-7.2}"
wrapper="$out/qemu-system-x86_64"
if [ -x "$wrapper" ] && "$wrapper" --version 2>/dev/null | grep -q 'version 7\.2'; then
  echo "qemu 7.2: up to date in $out"; exit 0
fi
# The newest 7.2 build bookworm offers (security updates move it).
ver=$(apt-cache madison qemu-system-x86 | awk -F'|' '$2 ~ /1:7\.2/ {gsub(/ /,"",$2); print $2; exit}')
[ -n "$ver" ] || { echo "no QEMU 7.2 in the package lists (is bookworm in sources.list?)" >&2; exit 1; }
data=$(apt-cache madison qemu-system-data | awk -F'|' '$2 ~ /1:7\.2/ {gsub(/ /,"",$2); print $2; exit}')
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q "qemu-system-x86=$ver" "qemu-system-common=$ver" "qemu-system-data=$data" >/dev/null 2>&1)
rm -rf "$out"; mkdir -p "$out"
for f in "$tmp"/*.deb; do dpkg -x "$f" "$out/prefix"; done
cat > "$wrapper" <<WRAP
#!/bin/sh
export QEMU_MODULE_DIR="$out/prefix/usr/lib/x86_64-linux-gnu/qemu"
exec "$out/prefix/usr/bin/qemu-system-x86_64" -L "$out/prefix/usr/share/qemu" -L /usr/share/seabios "\$@"
WRAP
chmod +x "$wrapper"
"$wrapper" --version | head -n 1
