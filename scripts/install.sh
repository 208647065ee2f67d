#!/usr/bin/env bash
# Installs qsnap: the binary, its manual pages (qsnap.1 and one per subcommand) and its shell
# completions for bash, zsh and fish.
#
# Usage: ./scripts/install.sh [PREFIX]          (default /usr/local; needs root there)
#   DESTDIR=DIR     stage the files under DIR instead (for packaging: scripts/deb.sh)
#   QSNAP_BIN=PATH  install this binary instead of building one (cargo build --release)
#
# Files: PREFIX/bin/qsnap, PREFIX/share/man/man1/qsnap*.1,
#   PREFIX/share/bash-completion/completions/qsnap, PREFIX/share/zsh/site-functions/_qsnap,
#   PREFIX/share/fish/vendor_completions.d/qsnap.fish
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-/usr/local}
case "$prefix" in /*) ;; *) echo "qsnap install: PREFIX must be an absolute path, not $prefix" >&2; exit 2 ;; esac

umask 022
root=${DESTDIR:-}$prefix
# Where the files go must be writable before anything is built or copied.
install -d "$root/bin" "$root/share/man/man1" "$root/share/bash-completion/completions" \
  "$root/share/zsh/site-functions" "$root/share/fish/vendor_completions.d" || {
  echo "qsnap install: cannot write under $root (run it with sudo for a system prefix)" >&2
  exit 1
}

bin=${QSNAP_BIN:-}
if [ -z "$bin" ]; then
  if [ "$(id -u)" -eq 0 ] && [ -n "${SUDO_USER:-}" ]; then
    # Root's cargo would build into the user's target/ as root (or is not on sudo's PATH).
    if [ -x "$repo/target/release/qsnap" ]; then
      bin=$repo/target/release/qsnap
      echo "qsnap install: installing $bin (built earlier by you; rebuild with \`cargo build --release --locked -p qsnap\` first if it is old)" >&2
    else
      echo "qsnap install: build first as yourself: cargo build --release --locked -p qsnap; then run this again with sudo" >&2
      exit 1
    fi
  else
    (cd "$repo" && cargo build --release --locked -p qsnap)
    bin=$repo/target/release/qsnap
  fi
fi
[ -x "$bin" ] || { echo "qsnap install: $bin is not an executable" >&2; exit 1; }
install -m 755 "$bin" "$root/bin/qsnap"

pages=$(mktemp -d)
trap 'rm -rf "$pages"' EXIT
"$bin" man "$pages" >/dev/null
install -m 644 "$pages"/*.1 "$root/share/man/man1/"

"$bin" completions bash > "$pages/qsnap.bash"
"$bin" completions zsh > "$pages/_qsnap"
"$bin" completions fish > "$pages/qsnap.fish"
install -m 644 "$pages/qsnap.bash" "$root/share/bash-completion/completions/qsnap"
install -m 644 "$pages/_qsnap" "$root/share/zsh/site-functions/_qsnap"
install -m 644 "$pages/qsnap.fish" "$root/share/fish/vendor_completions.d/qsnap.fish"

echo "qsnap: installed into ${DESTDIR:+$DESTDIR}$prefix (bin/qsnap, $(ls "$pages"/*.1 | wc -l) manual pages, bash/zsh/fish completions)" >&2
