package preflight

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func readTestdata(t testing.TB, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// The same guest on 7.2 (five columns) and 10.0 (seven, with HVA and RO) parses to the same
// blocks.
func TestParseRAMBlocksBothFormats(t *testing.T) {
	want := []struct {
		name        string
		used, total uint64
	}{
		{"pc.ram", 128 << 20, 128 << 20},
		{"/rom@etc/acpi/tables", 0x20000, 0x200000},
		{"pc.bios", 0x40000, 0x40000},
		{"pc.rom", 0x20000, 0x20000},
		{"/rom@etc/table-loader", 0x1000, 0x10000},
		{"/rom@etc/acpi/rsdp", 0x1000, 0x1000},
	}
	for _, file := range []string{"info-ramblock-7.2-pc-q35-7.2.txt", "info-ramblock-10.0-pc-q35-7.2.txt"} {
		text := readTestdata(t, file)
		bs, err := ParseRAMBlocks(text)
		if err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		if len(bs) != len(want) {
			t.Fatalf("%s: %d blocks, want %d: %+v", file, len(bs), len(want), bs)
		}
		for i, w := range want {
			b := bs[i]
			if b.Name != w.name || b.Used != w.used || b.Total != w.total || b.PageSize != 4096 {
				t.Errorf("%s block %d = %+v, want %+v with 4 KiB pages", file, i, b, w)
			}
		}
		has10 := strings.Contains(text, "HVA")
		if (bs[0].ReadOnly != nil) != has10 {
			t.Errorf("%s: ReadOnly %v but HVA column present %v", file, bs[0].ReadOnly, has10)
		}
		if has10 && (*bs[0].ReadOnly || !*bs[1].ReadOnly) {
			t.Errorf("%s: pc.ram should be rw and the ACPI tables ro", file)
		}
	}
	// A memory backend's block carries the backend's id.
	bs, err := ParseRAMBlocks(readTestdata(t, "info-ramblock-10.0-memfd.txt"))
	if err != nil || bs[0].Name != "ram0" {
		t.Fatalf("memfd: %v %+v", err, bs)
	}
}

func TestParseRAMBlocksEdgeCases(t *testing.T) {
	// Hugepages, a name longer than the column and one with a space.
	text := "              Block Name    PSize              Offset               Used              Total\n" +
		"  0000:00:02.0/vga.vram-with-a-long-name    2 MiB  0x0000000000000000 0x0000000001000000 0x0000000001000000\n" +
		"     my block    1 GiB  0x0000000040000000 0x0000000040000000 0x0000000040000000\n" +
		"    0xname    4 KiB  0x0000000080000000 0x0000000000001000 0x0000000000001000\n"
	bs, err := ParseRAMBlocks(text)
	if err != nil {
		t.Fatal(err)
	}
	if bs[0].Name != "0000:00:02.0/vga.vram-with-a-long-name" || bs[0].PageSize != 2<<20 || bs[0].Used != 16<<20 {
		t.Errorf("block 0 = %+v", bs[0])
	}
	if bs[1].Name != "my block" || bs[1].PageSize != 1<<30 {
		t.Errorf("block 1 = %+v", bs[1])
	}
	if bs[2].Name != "0xname" || bs[2].Used != 4096 {
		t.Errorf("block 2 = %+v", bs[2])
	}
	for _, bad := range []string{
		"",
		"Error: no such command",
		"  pc.ram 4 KiB 0x0 0x1\n",        // a column short
		"  pc.ram 4 XiB 0x0 0x1 0x2\n",    // unknown unit
		"  pc.ram 4 KiB 0x0 0xzz 0x2\n",   // not hex
		"  pc.ram 4 KiB 0x0 12 0x2\n",     // no 0x
		"  pc.ram -4 KiB 0x0 0x1 0x2\n",   // negative page size
		"  4 KiB 0x0 0x1 0x2\n",           // no name
		"  pc.ram 1e30 EiB 0x0 0x1 0x2\n", // overflow
	} {
		if bs, err := ParseRAMBlocks(bad); err == nil {
			t.Errorf("ParseRAMBlocks(%q) = %+v, want an error", bad, bs)
		}
	}
	// The header alone: a QEMU with no RAM block is odd but not unparsable.
	if bs, err := ParseRAMBlocks("  Block Name    PSize  Offset  Used  Total\n"); err != nil || len(bs) != 0 {
		t.Errorf("header only: %v %v", bs, err)
	}
}

func TestParseQtree(t *testing.T) {
	devs, err := ParseQtree(readTestdata(t, "info-qtree-7.2-rootport.txt"))
	if err != nil {
		t.Fatal(err)
	}
	find := func(typ string) Device {
		for _, d := range devs {
			if d.Type == typ {
				return d
			}
		}
		t.Fatalf("no %s in %v", typ, devs)
		return Device{}
	}
	rng := find("virtio-rng-pci")
	want := Device{Type: "virtio-rng-pci", ID: "rng0", Bus: "rp1", BusType: "PCIE",
		Path: "main-system-bus/q35-pcihost/pcie.0/pcie-root-port@02.0/rp1",
		Addr: "00.0", PCIID: "1af4:1044", Class: "Class 00ff"}
	if rng != want {
		t.Errorf("virtio-rng-pci = %+v\nwant              %+v", rng, want)
	}
	if d := find("virtio-rng-device"); d.Path != "main-system-bus/q35-pcihost/pcie.0/pcie-root-port@02.0/rp1/virtio-rng-pci@00.0/virtio-bus" || d.OnPCI() {
		t.Errorf("virtio-rng-device = %+v", d)
	}
	if d := find("isa-serial"); d.Path != "main-system-bus/q35-pcihost/pcie.0/ICH9-LPC@1f.0/isa.0" || d.BusType != "ISA" {
		t.Errorf("isa-serial = %+v", d)
	}
	if d := find("hpet"); d.Path != "main-system-bus" || d.Addr != "" || d.BusType != "System" {
		t.Errorf("hpet = %+v", d)
	}
	// i2c eeproms have an "address" property, which is not a PCI addr.
	if d := find("smbus-eeprom"); d.Addr != "" {
		t.Errorf("smbus-eeprom got a PCI addr: %+v", d)
	}
	n := 0
	for _, d := range devs {
		if d.Type == "smbus-eeprom" {
			n++
		}
	}
	if n != 8 {
		t.Errorf("%d smbus-eeproms, want 8", n)
	}
}

// What preflight compares must not differ between QEMU 7.2 and 10.0 running the same command
// line (10.0 adds properties and lists the RTC elsewhere), nor between a running source and an
// inmigrate destination (firmware has not numbered the bridges there) — while query-pci does
// differ in the latter case.
func TestDevicesStableAcrossVersionsAndStates(t *testing.T) {
	pairs := [][2]string{
		{"7.2-pc-q35-7.2", "10.0-pc-q35-7.2"},
		{"7.2-rootport", "10.0-rootport-inmigrate"},
		{"7.2-rootport", "7.2-rootport-inmigrate"},
		{"10.0-rootport", "7.2-rootport-inmigrate"},
	}
	for _, p := range pairs {
		a, err := ParseQtree(readTestdata(t, "info-qtree-"+p[0]+".txt"))
		if err != nil {
			t.Fatal(err)
		}
		b, err := ParseQtree(readTestdata(t, "info-qtree-"+p[1]+".txt"))
		if err != nil {
			t.Fatal(err)
		}
		if m, x := diffDevices(a, b); len(m)+len(x) != 0 {
			t.Errorf("%s vs %s: missing %v, extra %v", p[0], p[1], m, x)
		}
		if len(a) < 30 {
			t.Errorf("%s: only %d devices parsed", p[0], len(a))
		}
	}
	var running, waiting []pciBus
	if err := json.Unmarshal([]byte(readTestdata(t, "query-pci-7.2-rootport.json")), &running); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(readTestdata(t, "query-pci-7.2-rootport-inmigrate.json")), &waiting); err != nil {
		t.Fatal(err)
	}
	if r, w := len(flattenPCI(running)), len(flattenPCI(waiting)); r != w+1 {
		t.Errorf("query-pci lists %d devices running and %d inmigrate; expected the device behind the root port to be missing inmigrate (why Compare uses info qtree)", r, w)
	}
}

func TestParseQtreeBad(t *testing.T) {
	for _, bad := range []string{
		"",
		"Error: something",
		"  dev: x, id \"\"\n",                    // device outside a bus
		"bus: main\n  dev: , id \"\"\n",          // no type
		"bus: main\n  bus: inner\n",              // bus in a bus
		"bus: main\n  dev: a\n    bus: b\nnoise", // text at top level
	} {
		if d, err := ParseQtree(bad); err == nil {
			t.Errorf("ParseQtree(%q) = %+v, want an error", bad, d)
		}
	}
	deep := "bus: b0\n"
	ind := ""
	for i := 0; i < maxQtreeDepth; i++ {
		ind += "  "
		deep += ind + "dev: d, id \"\"\n"
		ind += "  "
		deep += ind + "bus: b\n"
	}
	if _, err := ParseQtree(deep); err == nil || !strings.Contains(err.Error(), "deeper") {
		t.Errorf("deep tree: %v", err)
	}
}

func TestParseMachineHelp(t *testing.T) {
	for _, tc := range []struct {
		series, q35, pc, dflt string
		deprecated            string
	}{
		{"7.2", "pc-q35-7.2", "pc-i440fx-7.2", "pc-i440fx-7.2", ""},
		{"10.0", "pc-q35-10.0", "pc-i440fx-10.0", "pc-i440fx-10.0", "pc-q35-5.2"},
	} {
		ms, err := ParseMachineHelp(readTestdata(t, "machine-help-"+tc.series+".txt"))
		if err != nil {
			t.Fatal(err)
		}
		var e Emulator
		e.setMachines(ms)
		if e.Aliases["q35"] != tc.q35 || e.Aliases["pc"] != tc.pc || e.Default != tc.dflt {
			t.Errorf("%s: aliases %v default %q", tc.series, e.Aliases, e.Default)
		}
		if exact, ok := e.Knows("q35"); !ok || exact != tc.q35 {
			t.Errorf("%s: Knows(q35) = %q %v", tc.series, exact, ok)
		}
		if exact, ok := e.Knows("pc-q35-7.2"); !ok || exact != "pc-q35-7.2" {
			t.Errorf("%s: Knows(pc-q35-7.2) = %q %v", tc.series, exact, ok)
		}
		if _, ok := e.Knows("pc-q35-99.0"); ok {
			t.Errorf("%s knows pc-q35-99.0", tc.series)
		}
		if tc.deprecated != "" && !e.IsDeprecated(tc.deprecated) {
			t.Errorf("%s: %s not deprecated (%v)", tc.series, tc.deprecated, e.Deprecated)
		}
		if e.IsDeprecated("pc-q35-7.2") {
			t.Errorf("%s: pc-q35-7.2 deprecated", tc.series)
		}
	}
	if _, err := ParseMachineHelp("qemu-system-x86_64: -machine help: unknown\n"); err == nil {
		t.Error("no list: want an error")
	}
}

func TestParseVersionAndObjects(t *testing.T) {
	for series, want := range map[string]string{"7.2": "7.2.22", "10.0": "10.0.2"} {
		v, ma, mi, err := ParseVersionOutput(readTestdata(t, "version-"+series+".txt"))
		if err != nil || v != want || ma*100+mi != map[string]int{"7.2": 702, "10.0": 1000}[series] {
			t.Errorf("%s: %q %d %d %v", series, v, ma, mi, err)
		}
		if !hasObject(readTestdata(t, "object-help-"+series+".txt"), "memory-backend-memfd") {
			t.Errorf("%s: no memory-backend-memfd", series)
		}
	}
	if hasObject("List of user creatable objects:\n  memory-backend-file\n", "memory-backend-memfd") {
		t.Error("memfd found where there is none")
	}
	if _, _, _, err := ParseVersionOutput("bash: qemu: not found\n"); err == nil {
		t.Error("not a version: want an error")
	}
}
