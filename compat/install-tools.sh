#!/usr/bin/env bash
# Installs, idempotently, the tools the link tests and benchmarks drive: iproute2 (ip netns,
# tc, ss -K for a link's namespaces, shaping and resets), iptables (a stalled link) and strace
# (the relay cost benchmark's system call counts). apt-get install only for what is missing;
# the system's apt configuration is never edited.
set -euo pipefail

log() { echo "install-tools: $*" >&2; }
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
missing=()
command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 && command -v ss >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v strace >/dev/null 2>&1 || missing+=(strace)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
log "ok: $(ip -V 2>&1 | head -1); $(iptables --version 2>&1 | head -1); $(strace -V 2>&1 | head -1)"
