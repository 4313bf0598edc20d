// Package compat is the compatibility suite against stock QEMU: it locates (and, through
// install-qemu.sh, installs) QEMU 7.2 and 10.0, generates the test guests, launches source and
// destination VMs, verifies guest memory after a migration, and runs the scenario matrix and the
// baseline of QEMU migrating by itself that every benchmark of the sidecar is compared with.
package compat
