#!/usr/bin/env bash
# qsnap's demo: installs what is missing (QEMU, the test guest), boots the test guest under
# QEMU with qsnap, takes a live snapshot while the guest keeps ticking, reverts to it and shows
# the guest going on from the snapshot's tick, makes the snapshot's memory lazy and reverts
# again (RAM mapped, not loaded: same tick), then deletes the snapshot while the guest runs
# (its disk layer merges back) and checks the store.
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
export QSNAP_STORE="$work/store"
cleanup() {
  "$qsnap" stop demo >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
last_tick() { grep -a -o 'tick [0-9]*' "$work/serial.log" 2>/dev/null | tail -n 1 | cut -d' ' -f2; }
# The first tick after line $1 that goes back below $2: the reverted guest's first tick (the old
# QEMU may still print a tick or two before it quits).
first_tick_back() {
  tail -n +"$(($1 + 1))" "$work/serial.log" | grep -a -o 'tick [0-9]*' | cut -d' ' -f2 |
    awk -v a="$2" '{ if ($1 <= a) { print; exit } a = $1 }'
}
revert_and_first_tick() { # SNAP TICK: revert, then print the reverted guest's first tick
  local lines t= deadline
  lines=$(wc -l < "$work/serial.log")
  "$qsnap" revert demo "$1" >&2
  deadline=$((SECONDS + 30))
  while [ -z "$t" ] && [ "$SECONDS" -lt "$deadline" ]; do
    t=$(first_tick_back "$lines" "$2" || true); sleep 0.1
  done
  [ -n "$t" ] || { echo "no tick after the revert" >&2; return 1; }
  echo "$t"
}
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

say "qsnap run: booting the test guest (TCG, 256 MiB) under qsnap in $work"
qemu-img create -q -f qcow2 "$work/disk.qcow2" 64M
"$qsnap" run demo -- qemu-system-x86_64 -nodefaults -no-user-config -display none -accel tcg -m 256 \
  -kernel "$kit/vmlinuz" -initrd "$kit/initramfs.gz" \
  -append "console=ttyS0 quiet panic=-1 qsnap.tick_ms=200 qsnap.dirty_mb=16" \
  -blockdev "driver=file,filename=$work/disk.qcow2,node-name=file0" \
  -blockdev driver=qcow2,file=file0,node-name=disk0 \
  -device virtio-blk-pci,drive=disk0,id=vd0 \
  -chardev "file,id=ser,path=$work/serial.log,append=on" -serial chardev:ser -no-reboot
first=$(wait_tick_above 3 120)
echo "guest is up: tick $first (it keeps a counter in RAM and in sector 0 of its disk, and rewrites 16 MiB of RAM continuously)"

say "qsnap info: what the VM is and whether it can be snapshotted"
"$qsnap" info "$work/store/vms/demo/qmp.sock"

say "qsnap create: a live snapshot (memory + disk at one instant) while the guest runs"
before=$(last_tick)
"$qsnap" create demo s1
snap_tick=$(last_tick)
echo "the snapshot froze the guest between ticks $before and $snap_tick"
after=$(wait_tick_above $((snap_tick + 15)) 60)
echo "the guest kept running: it is at tick $after now"

say "qsnap list: the VM's snapshots"
"$qsnap" list demo

say "qsnap revert: back to s1 (memory and disk)"
resumed=$(revert_and_first_tick s1 "$after")
echo "before the revert the guest was at tick $after; after it, it goes on from tick $resumed"
if [ "$resumed" -le "$before" ] || [ "$resumed" -gt $((snap_tick + 1)) ]; then
  echo "that is not the snapshot's tick ($before..$snap_tick)!" >&2; exit 1
fi
sleep 2
"$qsnap" status demo

say "qsnap lazy-ram: s1's memory becomes a RAM image; reverts map it instead of loading it"
"$qsnap" lazy-ram demo s1
now=$(wait_tick_above $((resumed + 5)) 60)
lazy=$(revert_and_first_tick s1 "$now")
echo "the lazy revert goes on from tick $lazy, as the eager one did from tick $resumed"
[ "$lazy" = "$resumed" ] || { echo "a lazy revert must resume where an eager one did!" >&2; exit 1; }
sleep 1

say "qsnap delete: the snapshot goes while the guest runs; its disk layer merges"
"$qsnap" delete demo s1
"$qsnap" check demo
now=$(last_tick)
later=$(wait_tick_above $((now + 3)) 60)
echo "the guest ran on through the merge: tick $later"
"$qsnap" status demo

if grep -a MISMATCH "$work/serial.log"; then echo "memory and disk disagree!" >&2; exit 1; fi
say "Done: live snapshot, the guest ran on, revert brought back its memory and disk together (loaded, then lazily mapped), delete merged the snapshot away live (no MISMATCH)."
