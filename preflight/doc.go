// Package preflight finds every incompatibility between a migration's source and destination
// before anything is sent. It is its own folder because it only reads — QMP queries, libvirt
// domain XML, an emulator's help output — and must not depend on the engine that moves data.
//
// Three entry points:
//
//   - Gather + Compare: two running QEMUs, the destination waiting with -incoming
//     (`qemu-migrate-go preflight`, and `migrate` when it can reach the destination's QMP).
//   - CompareDomain: a running source against the destination's libvirt domain XML (plus the
//     destination's emulator, probed with ProbeEmulator, when it is on this host).
//   - CheckIncoming: libvirt's qemu hook on the destination (`migrate begin`): can the incoming
//     domain start here at all?
//
// Checks (Check.Name):
//
//	machine           exact machine type names equal (QEMU refuses another; an alias like q35
//	                  means the newest type of each version)
//	version           destination QEMU not older than the source's (no backward migration)
//	status            source running/paused; destination in "inmigrate" (-incoming)
//	ramblocks         same RAM blocks with the same used lengths (fw_cfg "/rom@" blobs are
//	                  resizable); page sizes noted
//	devices           the same devices, from `info qtree`, placed by bus path and PCI slot — not
//	                  by the PCI bus numbers of query-pci, which the guest's firmware assigns
//	capabilities      x-ignore-shared (and 10.0's mapped-ram) equal on both sides; multifd and
//	                  postcopy-ram on one side only are warned about
//	uuid              with validate-uuid on the source, the destination's -uuid must match
//	memory-backends   with x-ignore-shared, skipped blocks must be the same shared file on the
//	                  destination; without it, the same shared file on both sides is an error
//	emulator          (CheckIncoming) the domain's <emulator> exists and runs
//	machine-supported (CheckIncoming) the emulator knows the machine type (aliases resolved)
//	accelerator       (CheckIncoming) /dev/kvm for a kvm domain
//	memory-backing    memfd support, hugetlbfs mounts and free hugepages; with CompareDomain,
//	                  the XML's backing against the source's backend
//	memory-size       host memory (CheckIncoming); the XML's <memory> against the source's
//	                  main RAM block (CompareDomain)
package preflight
