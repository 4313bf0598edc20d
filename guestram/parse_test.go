package guestram

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// Outputs of real QEMUs (q35, -m 128, -nodefaults), as printed by info ramblock.
const ramblock72 = `              Block Name    PSize              Offset               Used              Total
                  pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000
    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000
                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000
                  pc.rom    4 KiB  0x0000000008040000 0x0000000000020000 0x0000000000020000
   /rom@etc/table-loader    4 KiB  0x0000000008280000 0x0000000000001000 0x0000000000010000
      /rom@etc/acpi/rsdp    4 KiB  0x00000000082c0000 0x0000000000001000 0x0000000000001000
`

const ramblock100 = `              Block Name    PSize              Offset               Used              Total                HVA  RO
                  pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000 0x00007fe89fe00000  rw
    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000 0x00007fe8f5e00000  ro
                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000 0x00007fe8f6400000  ro
                  pc.rom    4 KiB  0x0000000008040000 0x0000000000020000 0x0000000000020000 0x00007fe8f6200000  ro
   /rom@etc/table-loader    4 KiB  0x0000000008280000 0x0000000000001000 0x0000000000010000 0x00007fe8f5c00000  ro
      /rom@etc/acpi/rsdp    4 KiB  0x00000000082c0000 0x0000000000001000 0x0000000000001000 0x00007fe8f5a00000  ro
`

func TestParseRAMBlocks(t *testing.T) {
	b72, hva72, err := parseRAMBlocks(ramblock72)
	if err != nil || hva72 || len(b72) != 6 {
		t.Fatalf("7.2: %v %v %d", err, hva72, len(b72))
	}
	b10, hva10, err := parseRAMBlocks(ramblock100)
	if err != nil || !hva10 || len(b10) != 6 {
		t.Fatalf("10.0: %v %v %d", err, hva10, len(b10))
	}
	want := Block{Name: "/rom@etc/acpi/tables", PageSize: 4096, Offset: 0x8080000, Used: 0x20000, Max: 0x200000}
	if got := b72[1]; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("7.2 block 1 = %+v, want %+v", got, want)
	}
	want.HVA, want.ReadOnly, want.Located = 0x7fe8f5e00000, true, "info ramblock"
	if got := b10[1]; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("10.0 block 1 = %+v, want %+v", got, want)
	}
	if b10[0].ReadOnly || b10[0].Pages() != 0x8000 {
		t.Errorf("pc.ram = %+v", b10[0])
	}
	for _, bad := range []string{"", "nonsense", strings.Replace(ramblock72, "0x0000000008000000 0x0000000008000000", "0x0000000008000000", 1),
		ramblock72 + "                  pc.ram    4 KiB  0x0 0x1000 0x1000\n",                                            // listed twice
		strings.Replace(ramblock72, "0x0000000000020000 0x0000000000200000", "0x0000000000400000 0x0000000000200000", 1), // used > max
	} {
		if _, _, err := parseRAMBlocks(bad); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
	if ps, err := parseSize("2", "Mi"); err != nil || ps != 2<<20 {
		t.Errorf("2 MiB = %d, %v", ps, err)
	}
}

// A flat view as QEMU 7.2 renders it for q35 after SeaBIOS set PAM (info mtree -f, abridged),
// with two lines as KVM prints them (the accelerator's name after the region).
const mtree = `FlatView #0
 AS "mch", root: bus master container
 Root memory region: (none)
  No rendered FlatView

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): ram0
  00000000000c3000-00000000000e7fff (prio 1, rom): ram0 @00000000000c3000
  00000000000e8000-00000000000effff (prio 1, ram): ram0 @00000000000e8000
  0000000000100000-0000000007ffffff (prio 0, ram): ram0 @0000000000100000
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-0000000103ffffff (prio 0, ram): extra
  0000000104000000-0000000104ffffff (prio 0, ram): kvm-ram @0000000000001000 KVM
  0000000105000000-0000000105ffffff (prio 0, ram): kvm-ram2 KVM

FlatView #2
 AS "cpu-smm-0", root: memory
  0000000000000000-00000000000bffff (prio 0, ram): ram0
`

func TestParseFlatView(t *testing.T) {
	r, err := parseFlatView(mtree, "memory")
	if err != nil {
		t.Fatal(err)
	}
	want := []flatRange{
		{0, 0xc2fff, "ram", "ram0", 0}, {0xc3000, 0xe7fff, "rom", "ram0", 0xc3000}, {0xe8000, 0xeffff, "ram", "ram0", 0xe8000},
		{0x100000, 0x7ffffff, "ram", "ram0", 0x100000}, {0xfffc0000, 0xffffffff, "rom", "pc.bios", 0},
		{0x100000000, 0x103ffffff, "ram", "extra", 0}, {0x104000000, 0x104ffffff, "ram", "kvm-ram", 0x1000},
		{0x105000000, 0x105ffffff, "ram", "kvm-ram2", 0},
	}
	if fmt.Sprint(r) != fmt.Sprint(want) {
		t.Errorf("got  %v\nwant %v", r, want)
	}
	if _, err := parseFlatView(mtree, "nope"); err == nil {
		t.Error("found a flat view for an address space that is not there")
	}
	if !nameMatches("0000:00:02.0/vga.vram", "vga.vram") || nameMatches("xvga.vram", "vga.vram") {
		t.Error("nameMatches")
	}
}

func TestParseSmaps(t *testing.T) {
	const smaps = `7fbdc7a00000-7fbdc7c00000 rw-p 00000000 00:00 0 
Size:               2048 kB
VmFlags: rd wr mr mw me dc ac hg mg
7fbdc7c00000-7fbdc7c01000 ---p 00000000 00:00 0 
VmFlags: mr mw me hg
7fbdcbfff000-7fbdcfffe000 rw-s 00000000 00:01 174                        /memfd:memory-backend-memfd (deleted)
VmFlags: rd wr sh mr mw me ms dc hg
7fbdcfffe000-7fbdd3fff000 rw-s 03fff000 00:01 174                        /memfd:memory-backend-memfd (deleted)
VmFlags: rd wr sh mr mw me ms dc
`
	v, err := parseSmaps(strings.NewReader(smaps))
	if err != nil || len(v) != 4 {
		t.Fatal(err, v)
	}
	if v[2].Path != "/memfd:memory-backend-memfd (deleted)" || !v[2].shared() || v[2].Inode != 174 || v[3].Offset != 0x3fff000 {
		t.Errorf("memfd mapping = %+v", v[2])
	}
	runs := dcRuns(v)
	// The anonymous block alone; the memfd block split in two mappings is one run.
	if len(runs) != 2 || runs[0].End-runs[0].Start != 0x200000 || runs[1].Start != 0x7fbdcbfff000 || runs[1].End != 0x7fbdd3fff000 || runs[1].Mappings != 2 {
		t.Errorf("runs = %+v", runs)
	}
	if _, err := parseSmaps(strings.NewReader("VmFlags: dc\n")); err == nil {
		t.Error("flags before a mapping accepted")
	}
	if _, err := parseSmaps(strings.NewReader("zz-1 rw-p 0 0:0 0\n")); err == nil {
		t.Error("bad range accepted")
	}
}

func TestKVMWrites(t *testing.T) {
	// SeaBIOS's kvmclock at 0xe8000 (what compat's HypervisorWritten excludes), and Linux-like
	// per-cpu structures.
	w := KVMWrites(0, PVMSRs{SystemTime: 0xe8000 | 1, WallClock: 0x7ff000 - 4, StealTime: 0x1234040 | 1, AsyncPF: 0x1234080 | 0x3, PVEOI: 0x12340c4 | 1})
	want := []HypervisorWrite{{0, "MSR_KVM_SYSTEM_TIME", 0xe8000, 32}, {0, "MSR_KVM_WALL_CLOCK", 0x7feffc, 12},
		{0, "MSR_KVM_STEAL_TIME", 0x1234040, 64}, {0, "MSR_KVM_ASYNC_PF_EN", 0x1234080, 64}, {0, "MSR_KVM_PV_EOI_EN", 0x12340c4, 4}}
	if fmt.Sprint(w) != fmt.Sprint(want) {
		t.Fatalf("got  %v\nwant %v", w, want)
	}
	if w := KVMWrites(1, PVMSRs{SystemTime: 0xe8000, StealTime: 0x1234040}); len(w) != 0 {
		t.Errorf("disabled MSRs gave %v", w)
	}
	l := &Layout{Blocks: []Block{{Name: "pc.ram", Used: 128 << 20, GPA: []GPARange{
		{GPA: 0, Offset: 0, Size: 0xc3000}, {GPA: 0xc3000, Offset: 0xc3000, Size: 0x25000, ReadOnly: true},
		{GPA: 0xe8000, Offset: 0xe8000, Size: 0x8000}, {GPA: 0x100000, Offset: 0x100000, Size: 128<<20 - 0x100000}}}}}
	ex, unmapped := l.Exclusions(append(w, HypervisorWrite{CPU: 0, MSR: "MSR_KVM_SYSTEM_TIME", GPA: 0xf0000000, Size: 32}))
	var pages []int64
	for _, e := range ex {
		pages = append(pages, e.Page)
	}
	// The wall clock straddles pages 0x7fe and 0x7ff.
	if fmt.Sprint(pages) != fmt.Sprint([]int64{0xe8, 0x7fe, 0x7ff, 0x1234, 0x1234, 0x1234}) || len(unmapped) != 1 {
		t.Errorf("pages %x, unmapped %v", pages, unmapped)
	}
	if !strings.Contains(ex[0].Reason, "MSR_KVM_SYSTEM_TIME") {
		t.Errorf("reason %q", ex[0].Reason)
	}
}

// TestPVMSRsFromVMState reads the MSRs from a cpu section tree shaped as stream.DecodeVMState
// builds it, with the field names that the captured streams' vmdesc uses.
func TestPVMSRsFromVMState(t *testing.T) {
	for _, c := range streamtest.Captures(t) {
		if !strings.HasPrefix(c.Name, "dirty-") {
			continue
		}
		raw := streamtest.Read(t, c.Path)
		for _, f := range []string{"env.system_time_msr", "env.wall_clock_msr"} {
			if !bytes.Contains(raw, []byte(`{"name": "`+f+`", "type": "uint64", "size": 8}`)) {
				t.Errorf("%s: the cpu vmdesc has no uint64 field %s", c.Name, f)
			}
		}
	}
	u64 := func(name string, v uint64) *stream.Node {
		return &stream.Node{Name: name, Type: "uint64", Raw: binary.BigEndian.AppendUint64(nil, v), Index: -1}
	}
	cpu := &stream.Node{Name: "cpu", Type: stream.NodeTypeDevice, Children: []*stream.Node{
		u64("env.tsc_aux", 5), u64("env.system_time_msr", 0xe8001), u64("env.wall_clock_msr", 0),
		{Name: "cpu/steal_time_msr", Type: stream.NodeTypeSubsection, Subsection: true, Children: []*stream.Node{u64("env.steal_time_msr", 0x1000041)}},
		{Name: "cpu/async_pv_eoi_msr", Type: stream.NodeTypeSubsection, Subsection: true, Children: []*stream.Node{u64("env.pv_eoi_en_msr", 0x2001)}},
	}}
	m, err := PVMSRsFromVMState(cpu)
	if err != nil {
		t.Fatal(err)
	}
	if m != (PVMSRs{SystemTime: 0xe8001, StealTime: 0x1000041, PVEOI: 0x2001}) {
		t.Errorf("got %+v", m)
	}
	cpu.Children[1] = &stream.Node{Name: "env.system_time_msr", Type: "buffer", Raw: []byte{1}}
	if _, err := PVMSRsFromVMState(cpu); err == nil {
		t.Error("a non-integer field was accepted")
	}
}
