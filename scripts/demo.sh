#!/usr/bin/env bash
# qsnap's demo: installs what is missing (QEMU, the test guest), boots the test guest under
# QEMU, and takes a live snapshot of it with qsnap while the guest keeps ticking.
# Usage: ./scripts/demo.sh      (needs a Rust toolchain; root or sudo for apt)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

bash tests/guest/install-deps.sh
bash tests/guest/build.sh
cargo build -q -p qsnap
qsnap="$repo/target/debug/qsnap"
kit="${QSNAP_GUEST_DIR:-$repo/target/qsnap-guest}"

work=$(mktemp -d /tmp/qsnap-demo.XXXXXX)
qemu_pid=
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
last_tick() { grep -a -o 'tick [0-9]*' "$work/serial.log" 2>/dev/null | tail -n 1 | cut -d' ' -f2; }
wait_tick_above() { # N SECONDS: wait until the guest prints a tick above N
  local deadline=$((SECONDS + $2))
  while [ "$SECONDS" -lt "$deadline" ]; do
    t=$(last_tick || true)
    if [ -n "$t" ] && [ "$t" -gt "$1" ]; then echo "$t"; return 0; fi
    sleep 0.2
  done
  echo "the guest printed no tick above $1 within $2 s; serial log:" >&2
  tail -n 20 "$work/serial.log" >&2
  return 1
}

say "Booting the test guest (TCG, 256 MiB) in $work"
qemu-img create -q -f qcow2 "$work/disk.qcow2" 64M
qemu-system-x86_64 -nodefaults -no-user-config -display none -accel tcg -m 256 \
  -kernel "$kit/vmlinuz" -initrd "$kit/initramfs.gz" \
  -append "console=ttyS0 quiet panic=-1 qsnap.tick_ms=200" \
  -blockdev "driver=file,filename=$work/disk.qcow2,node-name=file0" \
  -blockdev driver=qcow2,file=file0,node-name=disk0 \
  -device virtio-blk-pci,drive=disk0,id=vd0 \
  -serial "file:$work/serial.log" -no-reboot \
  -qmp "unix:$work/qmp.sock,server=on,wait=off" 2>"$work/qemu.err" &
qemu_pid=$!
first=$(wait_tick_above 3 120)
echo "guest is up: tick $first (it keeps a counter in RAM and in sector 0 of its disk)"

say "qsnap info: what the VM is and whether it can be snapshotted"
"$qsnap" info "$work/qmp.sock"

export QSNAP_STORE="$work/store"
say "qsnap attach: registering the running VM as 'demo'"
"$qsnap" attach demo --qmp "$work/qmp.sock"

say "qsnap create: a live snapshot (memory + disk at one instant) while the guest runs"
before=$(last_tick)
"$qsnap" create demo s1
snap_tick=$(last_tick)
echo "the guest was at tick $before..$snap_tick when the snapshot froze it"
after=$(wait_tick_above "$snap_tick" 30)
echo "and it keeps running: tick $after"

say "qsnap list: the VM's snapshots"
"$qsnap" list demo

if grep -a MISMATCH "$work/serial.log"; then echo "memory and disk disagree!" >&2; exit 1; fi
say "Done: the guest ran on through a live snapshot; no MISMATCH."
