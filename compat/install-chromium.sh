#!/usr/bin/env bash
# Installs Debian's chromium for the report test (compat/report_test.go renders the HTML page of
# `qemu-migrate-go report` in a real headless browser), idempotently: apt-get install only when
# /usr/bin/chromium is missing or does not run. The system's apt configuration is never edited.
set -euo pipefail

log() { echo "install-chromium: $*" >&2; }
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
bin=/usr/bin/chromium

if [ ! -x "$bin" ] || ! "$bin" --version >/dev/null 2>&1; then
  log "installing Debian's chromium (and a font for its text) with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
log "ok: $bin ($("$bin" --version 2>/dev/null | head -1))"
