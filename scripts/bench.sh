#!/usr/bin/env bash
# qsnap's speed figures on this machine (guest pause for live snapshots, snapshot and revert
# times), idle and with the guest rewriting memory. Not part of the tests: it measures, the
# tests assert behaviour. Usage: ./scripts/bench.sh [ROUNDS]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
bash tests/guest/install-deps.sh >/dev/null
bash tests/guest/build.sh >/dev/null
exec cargo run -q --release -p qsnap-engine --example bench -- "$@"
