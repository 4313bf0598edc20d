package compat

// HypervisorWritten returns the guest-physical ranges that may legitimately differ between the
// source's RAM (paused in postmigrate) and the destination's after loading: under KVM, the
// kvmclock (pvclock) structure SeaBIOS registers is rewritten by KVM when the destination loads
// its clock state. Under TCG nothing is rewritten.
func HypervisorWritten(accel string) []Range {
	if accel != "kvm" {
		return nil
	}
	return kvmclockRanges
}

// kvmclockRanges: SeaBIOS keeps its kvmclock pvclock structure in its own data in low memory
// (below 1 MiB); KVM updates it on every clock restore.
var kvmclockRanges = []Range{{Start: 0, End: 1 << 20}}
