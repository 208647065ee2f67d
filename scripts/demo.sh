#!/usr/bin/env bash
# qsnap's demo: installs what is missing (QEMU, the test guest), boots the test guest under
# QEMU, and shows qsnap talking to it over QMP while the guest keeps ticking.
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

say "qsnap qmp: pausing the guest with a raw QMP command"
"$qsnap" qmp "$work/qmp.sock" stop
paused_at=$(last_tick)
sleep 1.5
"$qsnap" qmp "$work/qmp.sock" query-status
after=$(last_tick)
echo "tick before pause: $paused_at, after 1.5 s paused: $after"
[ "$after" = "$paused_at" ] || { echo "the guest kept ticking while paused" >&2; exit 1; }

say "qsnap qmp: resuming"
"$qsnap" qmp "$work/qmp.sock" cont
resumed=$(wait_tick_above "$after" 30)
echo "guest resumed: tick $resumed"
if grep -a MISMATCH "$work/serial.log"; then echo "memory and disk disagree!" >&2; exit 1; fi

say "Done: the guest ran, paused and resumed under qsnap's control; no MISMATCH."
