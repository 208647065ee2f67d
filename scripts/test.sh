#!/usr/bin/env bash
# Runs qsnap's whole test suite against a real QEMU and the real test guest, installing what
# is missing first (QEMU from bookworm-backports on Debian 12, the guest kit, bookworm's QEMU 7.2
# in a private prefix for the old-QEMU test).
# Usage: ./scripts/test.sh [extra arguments for the test runner]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

bash tests/guest/install-deps.sh
bash tests/guest/build.sh
# SeaweedFS (S3) for the object-store tests, in target/tools/seaweedfs-venv (tests fail under
# CI without it).
bash tests/seaweedfs/install.sh >/dev/null
# QEMU 7.2 beside the installed one, for the old-QEMU test (it skips loudly without; under CI
# its absence fails the test).
bash tests/qemu-old/fetch.sh || echo "qsnap: QEMU 7.2 could not be fetched; the old-QEMU test will skip" >&2

# The engine's failpoints are on for the tests (fault injection at every step boundary of
# create, revert and delete); release builds and the demo leave them off.
features=(--features qsnap-engine/failpoints)
# Every --json output a test gets is checked against its schema in docs/json/ and its name
# logged here; a whole run (no arguments) then fails if some output was never checked.
export QSNAP_JSON_CHECKED="$repo/target/json-outputs-checked"
rm -f "$QSNAP_JSON_CHECKED"
if cargo nextest --version >/dev/null 2>&1; then
  profile=default
  [ -n "${CI:-}" ] && profile=ci
  cargo nextest run --workspace "${features[@]}" --profile "$profile" "$@"
else
  echo "qsnap: cargo-nextest not found; using cargo test (no per-test time limit)" >&2
  cargo test --workspace "${features[@]}" "$@"
fi
if [ "$#" -eq 0 ]; then
  unchecked=()
  for schema in docs/json/*.schema.json; do
    name=$(basename "$schema" .schema.json)
    grep -qx "$name" "$QSNAP_JSON_CHECKED" 2>/dev/null || unchecked+=("$name")
  done
  if [ "${#unchecked[@]}" -gt 0 ]; then
    echo "qsnap: no test checked these --json outputs against their schemas: ${unchecked[*]}" >&2
    exit 1
  fi
  echo "every --json output ($(ls docs/json/*.schema.json | wc -l)) was checked against its schema by some test"
fi
