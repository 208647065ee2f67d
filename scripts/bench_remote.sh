#!/usr/bin/env bash
# Push/pull of a 512 MiB guest's snapshot through a real SeaweedFS (weed mini on loopback),
# side by side with what a user would do without qsnap's remotes:
#   (a) first push  vs  the `export` bundle uploaded as one object with boto3
#   (b) a second snapshot a minute later: bytes uploaded, against the first push's
#   (c) pull into an empty store and chunk cache, then revert until the guest runs  vs
#       import of the bundle, then revert until the guest runs
# and MB/s against the store's loopback bandwidth (boto3's upload rate). Prints a table.
# Usage: scripts/bench_remote.sh [QSNAP_BINARY]   (bench.sh --only remote runs it)
# BENCH_DIRTY_MB=N: RAM the guest keeps rewriting (default 0: idle; 64: busy).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
qsnap=${1:-$repo/target/release/qsnap}
kit="${QSNAP_GUEST_DIR:-$repo/target/qsnap-guest}"
dirty_mb=${BENCH_DIRTY_MB:-0}
work=$(mktemp -d /tmp/qsnap-bench-remote.XXXXXX)
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
jget() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }

bash "$repo/tests/seaweedfs/install.sh" >/dev/null
venv="$repo/target/tools/bench-venv"
if ! [ -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import boto3' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check boto3 >&2
fi
(cd "$repo" && cargo build -q -p qsnap-testkit --example seaweed)
coproc WEED { "$repo/target/debug/examples/seaweed" "$work/weed"; }
cleanup() {
  for s in a b c; do "$qsnap" --store "$work/$s" stop src >/dev/null 2>&1 || true; done
  "$qsnap" --store "$work/c" stop pulled >/dev/null 2>&1 || true
  "$qsnap" --store "$work/d" stop imported >/dev/null 2>&1 || true
  exec {WEED[1]}>&- 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
while read -r line <&"${WEED[0]}"; do
  [ "$line" = ready ] && break
  eval "$line"
done
url="s3://$QSNAP_BUCKET/bench"

dd if=/dev/urandom of="$work/seed.raw" bs=1M count=48 status=none
qemu-img convert -q -f raw -O qcow2 "$work/seed.raw" "$work/disk.qcow2"
qemu-img resize -q "$work/disk.qcow2" 256M
rm "$work/seed.raw"
"$qsnap" --store "$work/a" run src -- qemu-system-x86_64 -nodefaults -no-user-config -display none \
  -accel tcg -m 512 -kernel "$kit/vmlinuz" -initrd "$kit/initramfs.gz" \
  -append "console=ttyS0 quiet panic=-1 qsnap.tick_ms=200 qsnap.dirty_mb=$dirty_mb" \
  -blockdev "driver=file,filename=$work/disk.qcow2,node-name=file0" \
  -blockdev driver=qcow2,file=file0,node-name=disk0 -device virtio-blk-pci,drive=disk0,id=vd0 \
  -chardev "file,id=ser,path=$work/serial.log,append=on" -serial chardev:ser -no-reboot >/dev/null
for _ in $(seq 1 240); do
  grep -q '^tick 5' "$work/serial.log" 2>/dev/null && break
  sleep 0.5
done
"$qsnap" --store "$work/a" create src s1 --mode precopy >/dev/null

# (a) push vs the bundle as one object through boto3.
t0=$(now); push1=$("$qsnap" --store "$work/a" push src s1 "$url" --json); t1=$(now)
"$qsnap" --store "$work/a" export src s1 "$work/s1.qsnap" >/dev/null
t2=$(now)
"$venv/bin/python" - "$work/s1.qsnap" <<'PY'
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
s3.upload_file(sys.argv[1], os.environ["QSNAP_BUCKET"], "bench-bundles/s1.qsnap")
PY
t3=$(now)
push_s=$(secs "$t0" "$t1"); boto_s=$(secs "$t2" "$t3")
bundle=$(stat -c %s "$work/s1.qsnap")
size=$(jget '["size-bytes"]' <<<"$push1"); up1=$(jget '["uploaded-bytes"]' <<<"$push1")

# (b) a second snapshot a minute later.
sleep 60
"$qsnap" --store "$work/a" create src s2 --mode precopy >/dev/null
push2=$("$qsnap" --store "$work/a" push src s2 "$url" --json)
up2=$(jget '["uploaded-bytes"]' <<<"$push2")
"$qsnap" --store "$work/a" stop src >/dev/null

# (c) pull + revert until the guest runs vs import + revert until the guest runs.
runs() { # console log, start line count: waits for a new tick
  local log=$1 from=$2
  for _ in $(seq 1 600); do
    [ "$(tail -n +"$((from + 1))" "$log" 2>/dev/null | grep -c '^tick')" -gt 0 ] && return 0
    sleep 0.05
  done
  echo "the guest did not run" >&2; return 1
}
t4=$(now)
pulled=$("$qsnap" --store "$work/c" pull "$url" src/s1 pulled --json)
clog=$(jget '["import"]["moved"][0]["to"]' <<<"$pulled")
"$qsnap" --store "$work/c" revert pulled s1 >/dev/null
runs "$clog" 0; t5=$(now)
imported=$("$qsnap" --store "$work/d" import "$work/s1.qsnap" imported --json)
dlog=$(jget '["moved"][0]["to"]' <<<"$imported")
"$qsnap" --store "$work/d" revert imported s1 >/dev/null
runs "$dlog" 0; t6=$(now)
pull_s=$(secs "$t4" "$t5"); import_s=$(secs "$t5" "$t6")
down=$(jget '["downloaded-bytes"]' <<<"$pulled")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.0f", b / 1048576 / s }'; }
printf '%-50s %10s %10s %8s\n' "512 MiB guest rewriting $dirty_mb MiB, SeaweedFS" "qsnap" "other" "ratio"
printf '%-50s %9ss %9ss %8s\n' "(a) first push / bundle upload (boto3)" "$push_s" "$boto_s" "$(ratio "$push_s" "$boto_s")"
printf '%-50s %6s MiB %6s MiB %8s\n' "    bytes uploaded (push / bundle)" "$(mib "$up1")" "$(mib "$bundle")" "$(ratio "$up1" "$bundle")"
printf '%-50s %6s MiB %6s MiB %8s\n' "(b) s2 a minute later: uploaded / first push" "$(mib "$up2")" "$(mib "$up1")" "$(ratio "$up2" "$up1")"
printf '%-50s %9ss %9ss %8s\n' "(c) pull+revert / import+revert, until it runs" "$pull_s" "$import_s" "$(ratio "$pull_s" "$import_s")"
printf '%-50s %6s MB/s %5s MB/s\n' "push (snapshot bytes) / store bandwidth (boto3)" "$(rate "$size" "$push_s")" "$(rate "$bundle" "$boto_s")"
printf '%-50s %6s MiB\n' "    pull downloaded" "$(mib "$down")"
