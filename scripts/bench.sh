#!/usr/bin/env bash
# qsnap's speed figures on this machine. Not part of the tests: it measures, the tests assert
# behaviour. Three parts, each printing a table:
#   1. engine/examples/bench.rs — qsnap alone: pauses, create/revert times (eager, checksum
#      remembered, lazy), lazy-RAM conversion, delete with 256 MiB to merge.
#   2. scripts/bench_peers.py — side by side, same guest, same run: qsnap (eager and lazy),
#      QEMU's own snapshot-save/load, and libvirt with --with-libvirt (installs it from
#      bookworm-backports). vCPU pause from QEMU's STOP/RESUME events on an observer monitor,
#      the guest's largest tick gap, wall times, file sizes, the disk's bandwidth.
#   3. engine/examples/bench_scale.rs — memory (PSS) of 1 and 8 QEMUs restored from one
#      snapshot, eager and lazy; 8 VMs snapshotted one at a time and concurrently.
#   4. harness/examples/bench_clone.rs — 1, 4 and 8 clones of one 256 MiB snapshot started at
#      once (the harness API): time to each clone's first console line, PSS per clone; the
#      same from a pool of standbys (fork() time, PSS of an idle standby), `qsnap clone`
#      with and without a standby, and sustained forks/s by pool size.
#   5. scripts/bench_bundle.sh — export/import of a busy 512 MiB guest's snapshot against
#      tar -S --zstd over the same files; an incremental export against a full one.
#   6. scripts/bench_remote.sh — push/pull through a real SeaweedFS against uploading the
#      bundle with boto3 and importing it; a second snapshot's upload; idle and busy guest.
#   7. scripts/bench_tree.sh — check, delete, create, list, status as one VM's tree grows to
#      100 snapshots, then with 50 more VMs in the store; delete --all.
# Usage: ./scripts/bench.sh [ROUNDS] [--with-libvirt] [--ram 512,2048] [--only engine|peers|scale|clone|bundle|remote|tree]
#        (JSON of every part goes to target/bench/)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
rounds=3
only=""
peers_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --with-libvirt) peers_args+=(--with-libvirt) ;;
    --ram) peers_args+=(--ram "$2"); shift ;;
    --only) only=$2; shift ;;
    [0-9]*) rounds=$1 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
bash tests/guest/install-deps.sh >/dev/null
bash tests/guest/build.sh >/dev/null
mkdir -p target/bench
cargo build -q --release -p qsnap
cargo build -q --release -p qsnap-engine --examples
if [ -z "$only" ] || [ "$only" = engine ]; then
  echo "== 1. qsnap alone"
  cargo run -q --release -p qsnap-engine --example bench -- "$rounds"
fi
if [ -z "$only" ] || [ "$only" = peers ]; then
  echo "== 2. side by side"
  python3 scripts/bench_peers.py --rounds "$rounds" --json target/bench/peers.json "${peers_args[@]}"
fi
if [ -z "$only" ] || [ "$only" = scale ]; then
  echo "== 3. scale"
  cargo run -q --release -p qsnap-engine --example bench_scale -- --json target/bench/scale.json
fi
if [ -z "$only" ] || [ "$only" = clone ]; then
  echo "== 4. clones"
  cargo run -q --release -p qsnap-harness --example bench_clone -- --json target/bench/clone.json --qsnap "$repo/target/release/qsnap"
fi
if [ -z "$only" ] || [ "$only" = bundle ]; then
  echo "== 5. bundles (export/import)"
  bash scripts/bench_bundle.sh "$repo/target/release/qsnap"
fi
if [ -z "$only" ] || [ "$only" = remote ]; then
  echo "== 6. remotes (push/pull through SeaweedFS), idle and busy guest"
  BENCH_DIRTY_MB=0 bash scripts/bench_remote.sh "$repo/target/release/qsnap"
  BENCH_DIRTY_MB=64 bash scripts/bench_remote.sh "$repo/target/release/qsnap"
fi
if [ -z "$only" ] || [ "$only" = tree ]; then
  echo "== 7. a growing tree (cost per command as snapshots and VMs accumulate)"
  bash scripts/bench_tree.sh "$repo/target/release/qsnap" "$rounds"
fi
