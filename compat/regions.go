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

// kvmclockRanges: Debian bookworm's SeaBIOS (used by both QEMUs here) keeps its pvclock
// structure in the page at 0xe8000 of its data area; KVM updates it when the destination
// restores the clock. Found by comparing whole dumps under KVM: it is the only page that differs
// (compat scenarios, kvm/*/dirty). A SeaBIOS that moved it would make the comparison fail
// loudly, not pass silently.
var kvmclockRanges = []Range{{Start: 0xe8000, End: 0xe9000}}
