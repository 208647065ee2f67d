#!/usr/bin/env bash
# What a command costs as the store grows: one running VM with N disk-only snapshots in one
# chain (and one memory snapshot at each step of the sweep), then 50 more (stopped) VMs in the
# store. At each step: the first `check` (it reads what the step added), then `check` (which
# does not read again what a check verified, unchanged since), `check --full` (which reads
# every file), the delete of a small layer (a disk-only snapshot taken just before), a
# disk-only `create`, `list` and `status` — medians of ROUNDS runs; at the end `delete --all`.
# The cost should not grow with N (issue 22): compare the rows.
# Usage: scripts/bench_tree.sh [QSNAP_BINARY] [ROUNDS]   (bench.sh --only tree runs it)
# BENCH_TREE_STEPS="3 10 30 100": the sweep's snapshot counts.
set -euo pipefail
shopt -s inherit_errexit
repo=$(cd "$(dirname "$0")/.." && pwd)
qsnap=${1:-$repo/target/release/qsnap}
rounds=${2:-5}
steps=${BENCH_TREE_STEPS:-"3 10 30 100"}
kit="${QSNAP_GUEST_DIR:-$repo/target/qsnap-guest}"
work=$(mktemp -d /tmp/qsnap-bench-tree.XXXXXX)
store="$work/store"
q() { "$qsnap" --store "$store" "$@"; }
cleanup() {
  for v in src $(seq -f 'o%g' 1 50); do
    q stop "$v" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# Milliseconds of one command (its output discarded; a failure stops the bench).
ms() {
  local t0 t1
  t0=$(date +%s%N)
  "$@" >/dev/null || { echo "bench_tree: $* failed" >&2; exit 1; }
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000000))
}
median() { tr ' ' '\n' | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# The median of ROUNDS runs of "$@".
med() {
  local all=()
  for _ in $(seq 1 "$rounds"); do all+=("$(ms "$@")"); done
  echo "${all[*]}" | median
}
# The median of ROUNDS deletes of a small layer: a disk-only snapshot taken just before.
med_delete() {
  local all=()
  for r in $(seq 1 "$rounds"); do
    q create src "small-$r" --disk-only >/dev/null
    all+=("$(ms q delete src "small-$r")")
  done
  echo "${all[*]}" | median
}
med_create() {
  local all=()
  for r in $(seq 1 "$rounds"); do
    all+=("$(ms q create src "c-$n-$r" --disk-only)")
    q delete src "c-$n-$r" >/dev/null
  done
  echo "${all[*]}" | median
}

qemu-img create -q -f qcow2 "$work/disk.qcow2" 256M
q run src -- qemu-system-x86_64 -nodefaults -no-user-config -display none \
  -accel tcg -m 256 -kernel "$kit/vmlinuz" -initrd "$kit/initramfs.gz" \
  -append "console=ttyS0 quiet panic=-1 qsnap.tick_ms=200" \
  -drive "file=$work/disk.qcow2,if=virtio,format=qcow2,id=drive0" \
  -chardev "file,id=ser,path=$work/serial.log,append=on" -serial chardev:ser -no-reboot >/dev/null
for _ in $(seq 1 240); do
  grep -q '^tick 3' "$work/serial.log" 2>/dev/null && break
  sleep 0.5
done

rows=()
made=0
row() { # label n first-check check check-full delete create list status
  printf '%-26s %5s %9s %9s %10s %9s %9s %7s %7s\n' "$@"
}
# `check --full` reads every file again; plain `check` reads what changed since a check verified
# it (a qsnap without --full: null).
full() {
  local help
  help=$(q check --help)
  if [[ $help == *--full* ]]; then med q check src --full; else echo null; fi
}
row "store" "snaps" "1st check" "check ms" "--full ms" "delete ms" "create ms" "list" "status"
for n in $steps; do
  while [ "$made" -lt "$((n - 1))" ]; do
    made=$((made + 1))
    q create src "d$made" --disk-only >/dev/null
  done
  made=$((made + 1))
  q create src "m$made" >/dev/null # the step's memory snapshot
  # qsnap trusts what it read of a file's header only once the file has been still for 2 s
  # (coarse file times): the rows are the steady state, not the 2 s after a burst.
  sleep 3
  # The first check reads what the step added (and remembers it); the next ones are the steady
  # state a store of N snapshots costs.
  c1=$(ms q check src)
  c=$(med q check src); f=$(full); d=$(med_delete); k=$(med_create)
  l=$(med q list src); s=$(med q status src)
  row "1 VM" "$n" "$c1" "$c" "$f" "$d" "$k" "$l" "$s"
  rows+=("{\"vms\": 1, \"snapshots\": $n, \"first_check_ms\": $c1, \"check_ms\": $c, \"check_full_ms\": $f, \"delete_ms\": $d, \"create_ms\": $k, \"list_ms\": $l, \"status_ms\": $s}")
done

# 50 more VMs, stopped, each with a snapshot: another VM's chains are read by every delete.
for i in $(seq 1 50); do
  qemu-img create -q -f qcow2 "$work/o$i.qcow2" 64M
  q run "o$i" -- qemu-system-x86_64 -nodefaults -no-user-config -display none -accel tcg -m 16 \
    -drive "file=$work/o$i.qcow2,if=virtio,format=qcow2,id=drive0" >/dev/null
  q create "o$i" s --disk-only >/dev/null
  q stop "o$i" >/dev/null
done
sleep 3
c1=$(ms q check src)
c=$(med q check src); f=$(full); d=$(med_delete); k=$(med_create)
l=$(med q list src); s=$(med q status src)
row "1 VM + 50 stopped" "$made" "$c1" "$c" "$f" "$d" "$k" "$l" "$s"
rows+=("{\"vms\": 51, \"snapshots\": $made, \"first_check_ms\": $c1, \"check_ms\": $c, \"check_full_ms\": $f, \"delete_ms\": $d, \"create_ms\": $k, \"list_ms\": $l, \"status_ms\": $s}")
all=$(ms q delete src --all)
printf '%-26s %5s %9s\n' "delete --all" "$made" "${all} ms"
mkdir -p "$repo/target/bench"
(
  IFS=,
  echo "{\"rows\": [${rows[*]}], \"delete_all_ms\": $all, \"snapshots\": $made}"
) >"$repo/target/bench/tree.json"
