#!/usr/bin/env bash
# Runs qsnap's whole test suite against a real QEMU and the real test guest, installing what
# is missing first (QEMU from bookworm-backports on Debian 12, the guest kit).
# Usage: ./scripts/test.sh [extra arguments for the test runner]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

bash tests/guest/install-deps.sh
bash tests/guest/build.sh

if cargo nextest --version >/dev/null 2>&1; then
  profile=default
  [ -n "${CI:-}" ] && profile=ci
  exec cargo nextest run --workspace --profile "$profile" "$@"
else
  echo "qsnap: cargo-nextest not found; using cargo test (no per-test time limit)" >&2
  exec cargo test --workspace "$@"
fi
