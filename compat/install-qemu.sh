#!/usr/bin/env bash
# Installs the two QEMUs the compatibility suite runs against, idempotently:
#   QEMU 7.2  — Debian bookworm's qemu-system-x86, with apt-get, when qemu-system-x86_64 is missing;
#   QEMU 10.0 — bookworm-backports' qemu-system-{x86,common,data}, downloaded with apt-get through a
#               private sources list and state folder, unpacked with dpkg-deb -x into $CACHE/qemu-10.0.
# The system's apt configuration is never edited. Prints the two binaries when done.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${QMG_CACHE:-$here/.cache}
root10=$cache/qemu-10.0
mirror=${QMG_DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "install-qemu: $*" >&2; }
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo

# --- QEMU 7.2 from bookworm ---------------------------------------------------------------------
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  log "installing Debian bookworm qemu-system-x86 (QEMU 7.2) with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends qemu-system-x86 seabios ipxe-qemu >/dev/null
fi
v72=$(qemu-system-x86_64 --version | head -1)
case "$v72" in *" 7.2."*) ;; *) log "qemu-system-x86_64 is not QEMU 7.2: $v72"; exit 1;; esac

# --- QEMU 10.0 from bookworm-backports, unpacked privately ----------------------------------------
bin10=$root10/usr/bin/qemu-system-x86_64
if [ ! -x "$bin10" ] || ! "$bin10" -L "$root10/usr/share/qemu" --version 2>/dev/null | grep -q 'version 10\.0\.'; then
  log "fetching bookworm-backports QEMU 10.0 into $root10"
  apt=$cache/apt
  rm -rf "$apt" "$root10.tmp"
  mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/debs" "$root10.tmp"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm-backports main" >"$apt/sources.list"
  opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt" -o "Dir::Cache::Archives=$apt/archives"
        -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Get::List-Cleanup=0)
  apt-get "${opts[@]}" update -qq
  (cd "$apt/debs" && apt-get "${opts[@]}" download -qq \
      qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports qemu-system-data/bookworm-backports)
  for deb in "$apt"/debs/*.deb; do dpkg-deb -x "$deb" "$root10.tmp"; done
  rm -rf "$root10"; mv "$root10.tmp" "$root10"
fi
missing=$(ldd "$bin10" | awk '/not found/{print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then
  log "QEMU 10.0 needs shared libraries that are not installed: $missing"; exit 1
fi
v10=$("$bin10" -L "$root10/usr/share/qemu" --version | head -1)
log "ok: $(command -v qemu-system-x86_64) ($v72); $bin10 ($v10)"
