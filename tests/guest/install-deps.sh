#!/usr/bin/env bash
# Installs what qsnap's demo and tests need on a fresh Debian/Ubuntu machine:
# QEMU >= 7.2 (10.x from bookworm-backports on Debian 12) and the tools the guest kit uses.
# Idempotent: does nothing that is already done.
set -euo pipefail

need_root() { if [ "$(id -u)" -ne 0 ]; then echo sudo; fi; }
SUDO=$(need_root)

have_qemu() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local v
  v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  set -- $v
  [ "${1:-0}" -gt 7 ] || { [ "${1:-0}" -eq 7 ] && [ "${2:-0}" -ge 2 ]; }
}

# Debian 12 ships QEMU 7.2; 10.x is in bookworm-backports. Add it once.
if . /etc/os-release 2>/dev/null && [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "qsnap: adding the bookworm-backports apt source (for QEMU 10.x)" >&2
    $SUDO tee /etc/apt/sources.list.d/qsnap-backports.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    APT_UPDATED=
  fi
  BACKPORTS="-t bookworm-backports"
else
  BACKPORTS=""
fi

pkgs=()
if ! have_qemu || { [ -n "$BACKPORTS" ] && ! qemu-system-x86_64 --version | grep -q 'version \(9\|1[0-9]\)\.'; }; then
  pkgs+=(qemu-system-x86 qemu-utils)
fi
command -v cpio >/dev/null 2>&1 || pkgs+=(cpio)
command -v gzip >/dev/null 2>&1 || pkgs+=(gzip)
# The bundle tests list bundles with `tar --zstd` and re-pack them with `zstd`.
command -v zstd >/dev/null 2>&1 || pkgs+=(zstd)
command -v tar >/dev/null 2>&1 || pkgs+=(tar)
# procps (ps, pgrep): to look at a test run's QEMUs by hand; nothing in the suite needs it.
command -v pkill >/dev/null 2>&1 || pkgs+=(procps)
# The pytest plugin's test (python/): pytest, setuptools (pip builds the package offline with
# it) and mypy (--strict) for /usr/bin/python3, whatever else python3 may be on PATH; and venv.
/usr/bin/python3 -c 'import pytest' >/dev/null 2>&1 || pkgs+=(python3-pytest)
/usr/bin/python3 -c 'import setuptools' >/dev/null 2>&1 || pkgs+=(python3-setuptools)
/usr/bin/python3 -c 'import mypy' >/dev/null 2>&1 || pkgs+=(python3-mypy)
/usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
# SeaweedFS for the object-store tests installs into a virtualenv (tests/seaweedfs/install.sh).
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
# man (man-db, with groff) renders the manual pages in their test (`man -l`); zsh and fish
# load the completion scripts in theirs (bash is there).
command -v man >/dev/null 2>&1 || pkgs+=(man-db)
command -v zsh >/dev/null 2>&1 || pkgs+=(zsh)
command -v fish >/dev/null 2>&1 || pkgs+=(fish)
command -v apt-get >/dev/null 2>&1 || { echo "qsnap: needs apt (Debian/Ubuntu)" >&2; exit 1; }

if [ ${#pkgs[@]} -gt 0 ]; then
  echo "qsnap: installing ${pkgs[*]}" >&2
  $SUDO apt-get update -q
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $BACKPORTS "${pkgs[@]}"
fi
qemu-system-x86_64 --version | head -1
