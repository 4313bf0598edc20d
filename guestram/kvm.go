package guestram

import (
	"fmt"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// Under KVM a few guest pages are written by the hypervisor itself rather than by the guest: the
// paravirtual structures whose guest-physical address the guest gave KVM through an MSR. The
// source's copy is what KVM last wrote before the source stopped; when the destination loads
// the stream, QEMU writes the vCPU's MSRs back into the destination's KVM (kvm_put_msrs with the
// full state), and KVM fills those structures in again with its own values (new clock
// timestamps, a new version counter; the wall clock at once, kvmclock at its next clock update).
// So those pages, and only those, may legitimately differ on a KVM destination that has not run.
// Under TCG none of this exists (the MSRs are 0).
//
// The addresses are in the stream: the "cpu" sections (one per vCPU, target/i386/machine.c
// vmstate_x86_cpu) carry env.system_time_msr and env.wall_clock_msr, and subsections
// cpu/steal_time_msr, cpu/async_pf_msr and cpu/async_pv_eoi_msr the others. That is how
// compat's 0xe8000 page is explained: it is where SeaBIOS points MSR_KVM_SYSTEM_TIME_NEW.
// KVMWrites turns one vCPU's values into the exact structures, and Layout.Exclusions into the
// block pages to exclude, so that a verifier excludes exactly these pages and reports them.
// Hyper-V enlightenments (the reference TSC page, SynIC pages) and Xen emulation write guest
// pages too; they are not covered here, and a guest that uses them fails verification loudly.

// PVMSRs are the paravirtual MSRs of one vCPU whose values name guest memory KVM writes.
type PVMSRs struct {
	SystemTime uint64 // MSR_KVM_SYSTEM_TIME(_NEW): bit 0 enables, pvclock_vcpu_time_info (32 bytes) at the rest
	WallClock  uint64 // MSR_KVM_WALL_CLOCK(_NEW): pvclock_wall_clock (12 bytes) at the value, written on every MSR write
	StealTime  uint64 // MSR_KVM_STEAL_TIME: bit 0 enables, kvm_steal_time (64 bytes) at value &^ 0x3f
	AsyncPF    uint64 // MSR_KVM_ASYNC_PF_EN: bit 0 enables, kvm_vcpu_pv_apf_data (64 bytes) at value &^ 0x3f
	PVEOI      uint64 // MSR_KVM_PV_EOI_EN: bit 0 enables, a 4-byte flag at value &^ 1
}

// HypervisorWrite is a structure in guest memory that KVM writes by itself.
type HypervisorWrite struct {
	CPU  int    // the vCPU (its cpu section's instance id)
	MSR  string // which MSR names it
	GPA  uint64 // guest-physical address of the structure
	Size uint64 // its size in bytes
}

// KVMWrites returns the structures KVM writes for one vCPU's MSR values.
func KVMWrites(cpu int, m PVMSRs) []HypervisorWrite {
	var w []HypervisorWrite
	add := func(msr string, gpa, size uint64) {
		w = append(w, HypervisorWrite{CPU: cpu, MSR: msr, GPA: gpa, Size: size})
	}
	if m.SystemTime&1 != 0 {
		add("MSR_KVM_SYSTEM_TIME", m.SystemTime&^1, 32)
	}
	if m.WallClock != 0 {
		add("MSR_KVM_WALL_CLOCK", m.WallClock, 12)
	}
	if m.StealTime&1 != 0 {
		add("MSR_KVM_STEAL_TIME", m.StealTime&^0x3f, 64)
	}
	if m.AsyncPF&1 != 0 {
		add("MSR_KVM_ASYNC_PF_EN", m.AsyncPF&^0x3f, 64)
	}
	if m.PVEOI&1 != 0 {
		add("MSR_KVM_PV_EOI_EN", m.PVEOI&^1, 4)
	}
	return w
}

// PVMSRsFromVMState reads the MSRs from a decoded cpu section (stream.DecodeVMState of a "cpu"
// device). Subsections that are absent (QEMU sends them only when the MSR is not 0) read as 0;
// a field that is present but not an integer is an error.
func PVMSRsFromVMState(cpu *stream.Node) (PVMSRs, error) {
	var m PVMSRs
	for _, f := range []struct {
		dst  *uint64
		path []string
	}{
		{&m.SystemTime, []string{"env.system_time_msr"}},
		{&m.WallClock, []string{"env.wall_clock_msr"}},
		{&m.StealTime, []string{"cpu/steal_time_msr", "env.steal_time_msr"}},
		{&m.AsyncPF, []string{"cpu/async_pf_msr", "env.async_pf_en_msr"}},
		{&m.PVEOI, []string{"cpu/async_pv_eoi_msr", "env.pv_eoi_en_msr"}},
	} {
		n := cpu.Lookup(f.path...)
		if n == nil {
			continue
		}
		v, err := n.Uint()
		if err != nil {
			return m, fmt.Errorf("guestram: cpu state %v: %w", f.path, err)
		}
		*f.dst = v
	}
	return m, nil
}

// Exclusions maps hypervisor writes to the block pages that hold them (through the guest
// physical ranges Locate found), each with its reason. A write at an address no block shows is
// returned in unmapped, so the caller can say so.
func (l *Layout) Exclusions(writes []HypervisorWrite) (ex []Exclusion, unmapped []HypervisorWrite) {
	for _, w := range writes {
		found := false
		for a := w.GPA &^ (PageSize - 1); a < w.GPA+w.Size; a += PageSize {
			for _, b := range l.Blocks {
				for _, r := range b.GPA {
					if a >= r.GPA && a < r.GPA+r.Size {
						found = true
						ex = append(ex, Exclusion{Block: b.Name, Page: int64((r.Offset + a - r.GPA) / PageSize),
							Reason: fmt.Sprintf("KVM writes vCPU %d's %s structure at guest address 0x%x", w.CPU, w.MSR, w.GPA)})
					}
				}
			}
		}
		if !found {
			unmapped = append(unmapped, w)
		}
	}
	return ex, unmapped
}
