package preflight

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// seedFiles adds every testdata file matching pattern to the fuzz corpus.
func seedFiles(f *testing.F, pattern string) {
	f.Helper()
	files, err := filepath.Glob(filepath.Join("testdata", pattern))
	if err != nil || len(files) == 0 {
		f.Fatalf("no seeds for %s: %v", pattern, err)
	}
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(b))
	}
}

func FuzzParseRAMBlocks(f *testing.F) {
	seedFiles(f, "info-ramblock-*.txt")
	f.Add("Block Name PSize Offset Used Total\n x 4 KiB 0x0 0x1 0x2 0x3 rw\n")
	f.Fuzz(func(t *testing.T, s string) {
		bs, err := ParseRAMBlocks(s)
		if err != nil {
			return
		}
		if len(bs) > strings.Count(s, "\n")+1 || len(bs) > maxRAMBlocks {
			t.Fatalf("%d blocks from %d lines", len(bs), strings.Count(s, "\n")+1)
		}
		for _, b := range bs {
			if b.Name == "" {
				t.Fatalf("block without a name from %q", s)
			}
		}
	})
}

func FuzzParseQtree(f *testing.F) {
	seedFiles(f, "info-qtree-*.txt")
	f.Add("bus: main-system-bus\n  type System\n  dev: a, id \"x\"\n    addr = 01.0\n    bus: b\n      type PCIE\n")
	f.Fuzz(func(t *testing.T, s string) {
		devs, err := ParseQtree(s)
		if err != nil {
			return
		}
		if len(devs) > strings.Count(s, "dev: ") {
			t.Fatalf("%d devices from %d dev lines", len(devs), strings.Count(s, "dev: "))
		}
		for _, d := range devs {
			if d.Type == "" || d.Path == "" {
				t.Fatalf("device %+v", d)
			}
			_ = d.Key()
		}
		// A tree compared with itself has no difference.
		if m, x := diffDevices(devs, devs); len(m)+len(x) != 0 {
			t.Fatalf("self-diff: %v %v", m, x)
		}
	})
}

func FuzzParseDomainXML(f *testing.F) {
	seedFiles(f, "domain-*.xml")
	f.Add("<domain><name>x</name><memory unit='GiB'>1</memory><os><type machine='q35'>hvm</type></os>" +
		"<memoryBacking><hugepages><page size='2' unit='M'/></hugepages><source type='memfd'/></memoryBacking></domain>")
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDomainXML([]byte(s))
		if err != nil {
			return
		}
		if d.Machine == "" {
			t.Fatalf("accepted a domain without a machine: %q", s)
		}
		// Whatever was parsed can be compared without a panic.
		_ = CompareDomain(Facts{Machine: "pc-q35-7.2", RAMBlocks: []RAMBlock{{Name: "pc.ram", Used: 1 << 27}}}, d, nil)
		_ = describeBacking(d)
	})
}

func FuzzParseMachineHelp(f *testing.F) {
	seedFiles(f, "machine-help-*.txt")
	f.Fuzz(func(t *testing.T, s string) {
		ms, err := ParseMachineHelp(s)
		if err != nil {
			return
		}
		var e Emulator
		e.setMachines(ms)
		for a, m := range e.Aliases {
			if exact, ok := e.Knows(a); !ok || exact != m {
				t.Fatalf("alias %s → %s not known", a, m)
			}
		}
	})
}
