#!/usr/bin/env bash
# Installs what the Linux test guest (compat/linuxguest.go) is made of, idempotently, into
# $CACHE/linux-guest (QMG_CACHE, default <repo>/.cache; ignored by git):
#   kernel/   vmlinuz and config of Debian bookworm's kernel, from linux-image-cloud-amd64's
#             dependency (QMG_LINUX_FLAVOUR=amd64 for the generic flavour);
#   files/    the contents of a few Debian bookworm packages (Go sources, LLVM and ICU
#             libraries, Perl, Python and libstdc++ documentation, fonts, locales, the
#             kernel's documentation: ~740 MiB of real file data), one folder per package,
#             from which the guest's initramfs takes the amount a test asks for;
#   STAMP     the packages and versions installed (part of the initramfs cache key).
# Everything is downloaded with apt-get download through a private sources list and state
# folder (the system's apt configuration is never read or edited) and unpacked with
# dpkg-deb. When STAMP exists nothing is downloaded: remove $CACHE/linux-guest (or set
# QMG_LINUX_REFRESH=1) to fetch the current versions.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${QMG_CACHE:-$here/.cache}
root=$cache/linux-guest
mirror=${QMG_DEBIAN_MIRROR:-http://deb.debian.org/debian}
flavour=${QMG_LINUX_FLAVOUR:-cloud-amd64}
log() { echo "install-linux-guest: $*" >&2; }

# The packages whose files the guest holds in RAM, and why each: real data of several kinds.
packages=(
  golang-1.19-src     # Go source code: text, ~11.7k files, 114 MiB
  libllvm14           # one large shared library: machine code, 105 MiB
  libicu72            # ICU libraries and data tables: 36 MiB
  libperl5.36         # libperl and its XS modules: 29 MiB
  perl-modules-5.36   # Perl modules: text, 18 MiB
  python3.11-doc      # HTML documentation: 69 MiB
  libstdc++-12-doc    # doxygen HTML and man pages, many small files: 131 MiB
  linux-doc-6.1       # the kernel's documentation (reST, HTML): 186 MiB
  fonts-noto-core     # TrueType fonts: compressed binary data, 42 MiB
  locales             # locale sources and charmaps (gzip-compressed): 16 MiB
)

if [ -f "$root/STAMP" ] && [ -s "$root/kernel/vmlinuz" ] && [ -d "$root/files" ] && [ -z "${QMG_LINUX_REFRESH:-}" ]; then
  log "ok: $root ($(head -1 "$root/STAMP"))"
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb tar; do
  command -v "$tool" >/dev/null || { log "$tool is needed (Debian's apt and dpkg)"; exit 1; }
done
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || { log "$keyring is missing: install debian-archive-keyring"; exit 1; }

apt=$root/apt
tmp=$root/tmp
rm -rf "$apt" "$tmp"
mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$tmp/debs" "$tmp/kernel" "$tmp/files"
echo "deb [signed-by=$keyring] $mirror bookworm main" >"$apt/sources.list"
opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$apt/lists" -o "Dir::State::status=/dev/null"
      -o "Dir::Cache=$apt" -o "Dir::Cache::Archives=$apt/archives"
      -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Get::List-Cleanup=0
      -o APT::Sandbox::User=root)
log "reading bookworm's package lists ($mirror)"
apt-get "${opts[@]}" update -qq

# The metapackage names the current ABI's image: linux-image-cloud-amd64 -> linux-image-6.1.0-N-cloud-amd64.
kpkg=$(apt-cache "${opts[@]}" depends "linux-image-$flavour" | awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\./ {print $2; exit}')
[ -n "$kpkg" ] || { log "linux-image-$flavour does not depend on a linux-image-6.1.* package"; exit 1; }

log "downloading $kpkg and ${#packages[@]} packages"
(cd "$tmp/debs" && apt-get "${opts[@]}" download -qq "$kpkg" "${packages[@]}")

# The kernel: only boot/ of the package (its modules are not needed: the guest loads none).
kdeb=$(ls "$tmp/debs/${kpkg}"_*.deb)
dpkg-deb --fsys-tarfile "$kdeb" | tar -x -C "$tmp/kernel" --wildcards './boot/vmlinuz-*' './boot/config-*'
mv "$tmp"/kernel/boot/vmlinuz-* "$tmp/kernel/vmlinuz"
mv "$tmp"/kernel/boot/config-* "$tmp/kernel/config"
rmdir "$tmp/kernel/boot"

stamp="kernel $(dpkg-deb -f "$kdeb" Package) $(dpkg-deb -f "$kdeb" Version)"
for p in "${packages[@]}"; do
  deb=$(ls "$tmp/debs/${p}"_*.deb)
  mkdir -p "$tmp/files/$p"
  dpkg-deb -x "$deb" "$tmp/files/$p"
  stamp+=$'\n'"files $p $(dpkg-deb -f "$deb" Version)"
done
echo "$stamp" >"$tmp/STAMP"

rm -rf "$root/kernel" "$root/files" "$root/STAMP"
mv "$tmp/kernel" "$root/kernel"
mv "$tmp/files" "$root/files"
mv "$tmp/STAMP" "$root/STAMP"
rm -rf "$tmp" "$apt"
log "ok: $root ($(head -1 "$root/STAMP"), $(du -sm --apparent-size "$root/files" | cut -f1) MiB of files)"
