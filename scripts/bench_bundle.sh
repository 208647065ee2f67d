#!/usr/bin/env bash
# Export/import of a busy 512 MiB guest's snapshot (two disks: qcow2 and raw) against GNU tar
# over the same files: `tar -S --zstd -cf` (export) and `tar -x --zstd` (import); then an
# incremental export of a snapshot taken a minute later against a full one. Prints a table.
# Usage: scripts/bench_bundle.sh [QSNAP_BINARY]   (bench.sh --only bundle runs it)
# BENCH_DIRTY_MB=N: how much RAM the guest keeps rewriting (default 64; 0 = an idle guest).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
qsnap=${1:-$repo/target/release/qsnap}
kit="${QSNAP_GUEST_DIR:-$repo/target/qsnap-guest}"
work=$(mktemp -d /tmp/qsnap-bench-bundle.XXXXXX)
store="$work/a"
cleanup() {
  "$qsnap" --store "$store" stop src >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
dirty_mb=${BENCH_DIRTY_MB:-64}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# Some data on both disks (random: it does not compress), so that there is something to ship
# besides holes.
dd if=/dev/urandom of="$work/seed.raw" bs=1M count=48 status=none
qemu-img convert -q -f raw -O qcow2 "$work/seed.raw" "$work/disk.qcow2"
qemu-img resize -q "$work/disk.qcow2" 256M
rm "$work/seed.raw"
qemu-img create -q -f raw "$work/raw.img" 128M
dd if=/dev/urandom of="$work/raw.img" bs=1M count=32 seek=16 conv=notrunc status=none
"$qsnap" --store "$store" run src -- qemu-system-x86_64 -nodefaults -no-user-config -display none \
  -accel tcg -m 512 -kernel "$kit/vmlinuz" -initrd "$kit/initramfs.gz" \
  -append "console=ttyS0 quiet panic=-1 qsnap.tick_ms=200 qsnap.dirty_mb=$dirty_mb" \
  -blockdev "driver=file,filename=$work/disk.qcow2,node-name=file0" \
  -blockdev driver=qcow2,file=file0,node-name=disk0 -device virtio-blk-pci,drive=disk0,id=vd0 \
  -drive "file=$work/raw.img,if=virtio,format=raw,id=drive1" \
  -chardev "file,id=ser,path=$work/serial.log,append=on" -serial chardev:ser -no-reboot >/dev/null
for _ in $(seq 1 240); do
  grep -q '^tick 5' "$work/serial.log" 2>/dev/null && break
  sleep 0.5
done
"$qsnap" --store "$store" create src s1 --mode precopy >/dev/null

# The files a bundle of s1 carries: frozen images (the base images: s1 is the first
# snapshot), the memory file, kernel and initrd.
mem=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["memory"]["file"])' \
  < <("$qsnap" --store "$store" show src s1 --json))
files=("$work/disk.qcow2" "$work/raw.img" "$mem" "$kit/vmlinuz" "$kit/initramfs.gz")

t0=$(now); "$qsnap" --store "$store" export src s1 "$work/s1.qsnap" >/dev/null; t1=$(now)
tar -S --zstd -cf "$work/s1.tar.zst" "${files[@]}" 2>/dev/null; t2=$(now)
mkdir -p "$work/b-disks" "$work/untar"
t3=$(now); "$qsnap" --store "$work/b" import "$work/s1.qsnap" dst --disk-dir "$work/b-disks" >/dev/null; t4=$(now)
tar -x --zstd -f "$work/s1.tar.zst" -C "$work/untar"; t5=$(now)
export_s=$(secs "$t0" "$t1"); tar_c_s=$(secs "$t1" "$t2")
import_s=$(secs "$t3" "$t4"); tar_x_s=$(secs "$t4" "$t5")
bundle=$(stat -c %s "$work/s1.qsnap"); tarball=$(stat -c %s "$work/s1.tar.zst")
data=$(du -cb --apparent-size "${files[@]}" | tail -1 | cut -f1)

sleep 60
"$qsnap" --store "$store" create src s2 --mode precopy >/dev/null
"$qsnap" --store "$store" export src s2 "$work/s2-full.qsnap" >/dev/null
t6=$(now); "$qsnap" --store "$store" export src s2 "$work/s2-inc.qsnap" --base s1 >/dev/null; t7=$(now)
full=$(stat -c %s "$work/s2-full.qsnap"); inc=$(stat -c %s "$work/s2-inc.qsnap")

printf '%-44s %10s %10s %8s\n' "512 MiB guest rewriting $dirty_mb MiB, qcow2 + raw" "qsnap" "tar" "ratio"
printf '%-44s %9ss %9ss %8s\n' "export (bundle / tar -S --zstd -c)" "$export_s" "$tar_c_s" \
  "$(awk -v a="$export_s" -v b="$tar_c_s" 'BEGIN { printf "%.2f", a / b }')"
printf '%-44s %9ss %9ss %8s\n' "import (staged, checked / tar -x --zstd)" "$import_s" "$tar_x_s" \
  "$(awk -v a="$import_s" -v b="$tar_x_s" 'BEGIN { printf "%.2f", a / b }')"
printf '%-44s %7s MiB %6s MiB %8s\n' "size (of $(mib "$data") MiB of files)" "$(mib "$bundle")" "$(mib "$tarball")" \
  "$(awk -v a="$bundle" -v b="$tarball" 'BEGIN { printf "%.2f", a / b }')"
printf '%-44s %7s MiB %6s MiB %8s\n' "s2 a minute later: incremental / full" "$(mib "$inc")" "$(mib "$full")" \
  "$(awk -v a="$inc" -v b="$full" 'BEGIN { printf "%.2f", a / b }')"
printf '%-44s %9ss\n' "incremental export time" "$(secs "$t6" "$t7")"
