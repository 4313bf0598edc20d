#!/usr/bin/env bash
# Installs and configures the libvirtd the libvirt compat tests drive, idempotently:
#   - Debian bookworm's libvirt-daemon-system and libvirt-clients (libvirt 9.0), with apt-get,
#     when libvirtd is missing;
#   - a managed block in /etc/libvirt/qemu.conf that lets libvirt run QEMU on a machine without
#     systemd, cgroups or an LSM: security_driver = "none", cgroup_controllers = [ ], user and
#     group root, QEMU's stdout/stderr to a plain file (no virtlogd needed).
# It does not start the daemon: the tests do that (compat.Libvirtd) and stop what they started.
set -euo pipefail

log() { echo "install-libvirt: $*" >&2; }
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
conf=/etc/libvirt/qemu.conf
begin="# qemu-migrate-go compat settings: begin (managed by install-libvirt.sh)"
end="# qemu-migrate-go compat settings: end"
# strip prints the file without the managed block.
strip() { awk -v b="$begin" -v e="$end" '$0==b{skip=1} !skip{print} $0==e{skip=0}' "$conf"; }
managed() { awk -v b="$begin" -v e="$end" '$0==b{on=1} on{print} $0==e{on=0}' "$conf"; }

if ! command -v libvirtd >/dev/null 2>&1 || ! command -v virsh >/dev/null 2>&1; then
  log "installing Debian bookworm libvirt-daemon-system and libvirt-clients with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends libvirt-daemon-system libvirt-clients >/dev/null
fi

block="$begin
security_driver = \"none\"
cgroup_controllers = [ ]
user = \"root\"
group = \"root\"
stdio_handler = \"file\"
$end"
if [ -f "$conf" ] && [ "$(managed)" = "$block" ]; then
  :
else
  # Our settings must be the only uncommented ones for these keys.
  for key in security_driver cgroup_controllers user group stdio_handler; do
    if [ -f "$conf" ] && strip | grep -qE "^\s*$key\s*="; then
      log "$conf already sets $key outside the managed block; refusing to change it"; exit 1
    fi
  done
  tmp=$(mktemp)
  { if [ -f "$conf" ]; then strip; fi; printf '%s\n' "$block"; } >"$tmp"
  $sudo install -m 0600 "$tmp" "$conf"
  rm -f "$tmp"
  log "configured $conf (a running libvirtd must be restarted to read it)"
fi
log "ok: $(libvirtd --version)"
