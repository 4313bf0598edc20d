package preflight

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// loadFacts reads facts captured by Gather from a real QEMU (testdata/facts-*.json).
func loadFacts(t testing.TB, name string) Facts {
	t.Helper()
	var f Facts
	if err := json.Unmarshal([]byte(readTestdata(t, "facts-"+name+".json")), &f); err != nil {
		t.Fatal(err)
	}
	return f
}

// asDestination makes captured facts look like a QEMU waiting with -incoming.
func asDestination(f Facts) Facts {
	f.Status = "inmigrate"
	return f
}

func check(t testing.TB, r Report, name string) Check {
	t.Helper()
	for _, c := range r.Checks {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no %q check in %+v", name, r.Checks)
	return Check{}
}

func wantCheck(t testing.TB, r Report, name string, sev Severity, contains ...string) {
	t.Helper()
	c := check(t, r, name)
	if c.Severity != sev {
		t.Errorf("%s: severity %s, want %s: %s", name, c.Severity, sev, c.Message)
	}
	for _, s := range contains {
		if !strings.Contains(c.Message, s) {
			t.Errorf("%s: message %q does not contain %q", name, c.Message, s)
		}
	}
}

func wantOnlyErrors(t testing.TB, r Report, names ...string) {
	t.Helper()
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	for _, c := range r.Checks {
		if (c.Severity == SeverityError) != want[c.Name] {
			t.Errorf("%s: severity %s (%s); errors expected only in %v", c.Name, c.Severity, c.Message, names)
		}
	}
	if r.OK != (len(names) == 0) {
		t.Errorf("OK = %v with errors expected in %v", r.OK, names)
	}
}

func TestCompareCapturedCompatible(t *testing.T) {
	src := loadFacts(t, "7.2-pc-q35-7.2")
	dst := asDestination(loadFacts(t, "10.0-pc-q35-7.2"))
	r := Compare(src, dst)
	wantOnlyErrors(t, r)
	for _, c := range r.Checks {
		if c.Severity != SeverityOK {
			t.Errorf("%s: %s %s", c.Name, c.Severity, c.Message)
		}
	}
	wantCheck(t, r, "machine", SeverityOK, "pc-q35-7.2 on both sides")
	wantCheck(t, r, "version", SeverityOK, "7.2.22", "10.0.2")
	if r.Source != "QEMU 7.2.22, pc-q35-7.2" || r.Destination != "QEMU 10.0.2, pc-q35-7.2" {
		t.Errorf("source %q destination %q", r.Source, r.Destination)
	}
}

func TestCompareMachineAliasDiffers(t *testing.T) {
	src := loadFacts(t, "7.2-q35")
	dst := asDestination(loadFacts(t, "10.0-q35"))
	r := Compare(src, dst)
	wantOnlyErrors(t, r, "machine")
	wantCheck(t, r, "machine", SeverityError, "pc-q35-7.2", "pc-q35-10.0",
		"what -machine q35 gives on QEMU 10.0", "start the destination with -machine pc-q35-7.2")
}

func TestCompareOlderDestination(t *testing.T) {
	src := loadFacts(t, "10.0-pc-q35-7.2")
	dst := asDestination(loadFacts(t, "7.2-pc-q35-7.2"))
	r := Compare(src, dst)
	wantOnlyErrors(t, r, "version")
	wantCheck(t, r, "version", SeverityError, "older", "10.0 or newer")

	// 10.0 running its own q35 cannot go to 7.2 at all: both the type and the version.
	src = loadFacts(t, "10.0-q35")
	dst = asDestination(loadFacts(t, "7.2-q35"))
	r = Compare(src, dst)
	wantOnlyErrors(t, r, "machine", "version")
	wantCheck(t, r, "machine", SeverityError, "QEMU 7.2 has no pc-q35-10.0", "pc-q35-7.2")
}

func TestCompareStatus(t *testing.T) {
	f := loadFacts(t, "7.2-pc-q35-7.2")
	r := Compare(f, f) // the destination "runs"
	wantOnlyErrors(t, r, "status")
	wantCheck(t, r, "status", SeverityError, "-incoming")
	paused := f
	paused.Status = "paused"
	wantOnlyErrors(t, Compare(paused, asDestination(f)))
	src := f
	src.Status = "inmigrate"
	wantCheck(t, Compare(src, asDestination(f)), "status", SeverityError, "source is itself waiting")
	src.Status = "postmigrate"
	wantCheck(t, Compare(src, asDestination(f)), "status", SeverityWarning, "already migrated")
}

func TestCompareRAMBlocks(t *testing.T) {
	src := loadFacts(t, "7.2-pc-q35-7.2")
	dst := asDestination(loadFacts(t, "7.2-pc-q35-7.2"))
	dst.RAMBlocks = append([]RAMBlock(nil), dst.RAMBlocks...)
	dst.RAMBlocks[0].Used, dst.RAMBlocks[0].Total = 256<<20, 256<<20
	dst.MemoryBackends = append([]MemoryBackend(nil), dst.MemoryBackends...)
	dst.MemoryBackends[0].Size = 256 << 20
	r := Compare(src, dst)
	wantOnlyErrors(t, r, "ramblocks", "memory-backends")
	wantCheck(t, r, "ramblocks", SeverityError, "pc.ram: 128 MiB on source, 256 MiB on destination", "-m 128M")

	// A resizable fw_cfg blob that grew on the destination is resized by QEMU.
	dst = asDestination(loadFacts(t, "7.2-pc-q35-7.2"))
	for i := range dst.RAMBlocks {
		if dst.RAMBlocks[i].Name == "/rom@etc/acpi/tables" {
			dst.RAMBlocks[i].Used = 0x40000
		}
	}
	r = Compare(src, dst)
	wantOnlyErrors(t, r)
	wantCheck(t, r, "ramblocks", SeverityInfo, "resizable")

	// Missing and extra blocks, a different page size.
	dst = asDestination(loadFacts(t, "7.2-pc-q35-7.2"))
	dst.RAMBlocks = append([]RAMBlock{{Name: "vga.vram", PageSize: 4096, Used: 16 << 20, Total: 16 << 20}}, dst.RAMBlocks[1:]...)
	r = Compare(src, dst)
	wantCheck(t, r, "ramblocks", SeverityError, "pc.ram (128 MiB) missing on destination", "vga.vram (16 MiB) only on destination",
		"QEMU fails the load")
	// Only an extra block on the destination: QEMU loads the stream, still not the same VM.
	dst = asDestination(loadFacts(t, "7.2-pc-q35-7.2"))
	dst.RAMBlocks = append(dst.RAMBlocks, RAMBlock{Name: "0000:00:02.0/e1000.rom", PageSize: 4096, Used: 256 << 10, Total: 256 << 10})
	wantCheck(t, Compare(src, dst), "ramblocks", SeverityError, "0000:00:02.0/e1000.rom (256 KiB) only on destination", "QEMU would load the stream")
	dst = asDestination(loadFacts(t, "7.2-pc-q35-7.2"))
	dst.RAMBlocks[0].PageSize = 2 << 20
	wantCheck(t, Compare(src, dst), "ramblocks", SeverityWarning, "page size 4 KiB on source, 2 MiB on destination")
}

func TestCompareDevices(t *testing.T) {
	src := loadFacts(t, "7.2-pc-q35-7.2")
	dst := asDestination(loadFacts(t, "10.0-rootport-inmigrate"))
	r := Compare(src, dst)
	wantOnlyErrors(t, r, "devices")
	wantCheck(t, r, "devices", SeverityError, "only on destination", `virtio-rng-pci "rng0" at pcie.0/pcie-root-port@02.0/rp1 slot 00.0`,
		`pcie-root-port "rp1" at main-system-bus/q35-pcihost/pcie.0 slot 02.0`,
		"virtio-rng-device at rp1/virtio-rng-pci@00.0/virtio-bus")
	r = Compare(loadFacts(t, "10.0-rootport"), asDestination(loadFacts(t, "7.2-pc-q35-7.2")))
	wantCheck(t, r, "devices", SeverityError, "missing on destination")
}

func TestCompareCapabilitiesAndUUID(t *testing.T) {
	base := loadFacts(t, "7.2-pc-q35-7.2")
	withCaps := func(f Facts, kv map[string]bool) Facts {
		m := map[string]bool{}
		for k, v := range f.Capabilities {
			m[k] = v
		}
		for k, v := range kv {
			m[k] = v
		}
		f.Capabilities = m
		return f
	}
	src := withCaps(base, map[string]bool{"x-ignore-shared": true})
	r := Compare(src, asDestination(base))
	wantOnlyErrors(t, r, "capabilities")
	wantCheck(t, r, "capabilities", SeverityError, "x-ignore-shared is on on the source, off on the destination")
	r = Compare(base, asDestination(src))
	wantCheck(t, r, "capabilities", SeverityError, "x-ignore-shared is off on the source, on on the destination")
	// mapped-ram (10.0 only) on a 10.0 source, 7.2 destination does not know it.
	s10 := withCaps(loadFacts(t, "10.0-pc-q35-7.2"), map[string]bool{"mapped-ram": true})
	wantCheck(t, Compare(s10, asDestination(base)), "capabilities", SeverityError, "does not know")
	// multifd on one side only is a warning.
	wantCheck(t, Compare(withCaps(base, map[string]bool{"multifd": true}), asDestination(base)), "capabilities", SeverityWarning, "multifd")

	// UUIDs.
	a, b := "11111111-2222-3333-4444-555555555555", "66666666-2222-3333-4444-555555555555"
	s := withCaps(base, map[string]bool{"validate-uuid": true})
	s.UUID = a
	d := asDestination(base)
	d.UUID = b
	wantCheck(t, Compare(s, d), "uuid", SeverityError, "start it with -uuid "+a)
	d.UUID = a
	wantCheck(t, Compare(s, d), "uuid", SeverityOK, "same UUID")
	d.UUID = zeroUUID
	wantCheck(t, Compare(s, d), "uuid", SeverityWarning, "no -uuid")
	s.Capabilities["validate-uuid"] = false
	d.UUID = b
	wantCheck(t, Compare(s, d), "uuid", SeverityWarning, "validate-uuid is off", "-uuid "+a)
	d.UUID = zeroUUID
	wantCheck(t, Compare(s, d), "uuid", SeverityWarning, "destination none", "-uuid "+a)
	wantCheck(t, Compare(d, asDestination(s)), "uuid", SeverityInfo, "the source has no -uuid")
	wantCheck(t, Compare(base, asDestination(base)), "uuid", SeverityOK, "no -uuid on either side")
}

func TestCompareMemoryBackends(t *testing.T) {
	file := loadFacts(t, "7.2-file")
	ign := func(f Facts, on bool) Facts {
		m := map[string]bool{}
		for k, v := range f.Capabilities {
			m[k] = v
		}
		m["x-ignore-shared"] = on
		f.Capabilities = m
		return f
	}
	path := file.MemoryBackends[0].MemPath
	// Same shared file on both sides with x-ignore-shared: fine.
	r := Compare(ign(file, true), asDestination(ign(file, true)))
	wantOnlyErrors(t, r)
	wantCheck(t, r, "memory-backends", SeverityInfo, "shared through "+path)
	// Same file without x-ignore-shared: the destination would write into the source's RAM.
	r = Compare(file, asDestination(file))
	wantOnlyErrors(t, r, "memory-backends")
	wantCheck(t, r, "memory-backends", SeverityError, "x-ignore-shared is off", "own mem-path")
	// Another file on the destination.
	other := asDestination(ign(file, true))
	other.MemoryBackends = []MemoryBackend{other.MemoryBackends[0]}
	other.MemoryBackends[0].MemPath = "/dev/shm/elsewhere"
	wantCheck(t, Compare(ign(file, true), other), "memory-backends", SeverityError, "mem-path="+path)
	// Anonymous RAM on the destination.
	anon := loadFacts(t, "7.2-pc-q35-7.2")
	anonDst := asDestination(ign(anon, true))
	for i := range anonDst.RAMBlocks {
		if anonDst.RAMBlocks[i].Name == "pc.ram" {
			anonDst.RAMBlocks[i].Name = "ram0"
		}
	}
	anonDst.MemoryBackends = []MemoryBackend{{ID: "ram0", Type: "memory-backend-ram", Size: 128 << 20}}
	wantCheck(t, Compare(ign(file, true), anonDst), "memory-backends", SeverityError, "not the source's file")
	// memfd with x-ignore-shared: 7.2 skips it and the content is lost; 10.0 sends it.
	m72 := loadFacts(t, "7.2-memfd")
	wantCheck(t, Compare(ign(m72, true), asDestination(ign(m72, true))), "memory-backends", SeverityError, "content would be lost")
	m10 := loadFacts(t, "10.0-memfd")
	wantCheck(t, Compare(ign(m10, true), asDestination(ign(m10, true))), "memory-backends", SeverityInfo, "sent normally")
	// Different backend kinds without x-ignore-shared: just noted.
	wantCheck(t, Compare(m72, asDestination(file)), "memory-backends", SeverityInfo, "content is sent")
}

func TestWriteText(t *testing.T) {
	r := Compare(loadFacts(t, "7.2-q35"), asDestination(loadFacts(t, "10.0-q35")))
	var b bytes.Buffer
	if err := r.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(b.String(), "\n"), "\n")
	if lines[0] != "source:      QEMU 7.2.22, pc-q35-7.2" || lines[1] != "destination: QEMU 10.0.2, pc-q35-10.0" {
		t.Errorf("header:\n%s", b.String())
	}
	if lines[len(lines)-1] != "preflight: 1 problem(s): migration would fail" {
		t.Errorf("last line %q", lines[len(lines)-1])
	}
	// Aligned: every check line has its message at the same column.
	col := -1
	for _, l := range lines[2 : len(lines)-1] {
		f := strings.Fields(l)
		i := strings.Index(l, f[2])
		if col == -1 {
			col = i
		} else if i != col {
			t.Errorf("misaligned line %q (message at %d, want %d)", l, i, col)
		}
	}
	if !strings.HasPrefix(lines[2], "error  machine ") {
		t.Errorf("first check line %q", lines[2])
	}
	if r.Err() == nil || !strings.Contains(r.Err().Error(), "machine:") {
		t.Errorf("Err() = %v", r.Err())
	}
	b.Reset()
	ok := Compare(loadFacts(t, "7.2-pc-q35-7.2"), asDestination(loadFacts(t, "7.2-pc-q35-7.2")))
	ok.WriteText(&b)
	if !strings.HasSuffix(b.String(), "\npreflight: migration can work\n") || !strings.Contains(b.String(), "\nok  machine          pc-q35-7.2 on both sides\n") {
		t.Errorf("ok report:\n%s", b.String())
	}
	// JSON: severities as strings, the documented keys.
	j, _ := json.Marshal(ok)
	for _, s := range []string{`"check":"machine"`, `"severity":"ok"`, `"ok":true`, `"source":"QEMU 7.2.22, pc-q35-7.2"`} {
		if !bytes.Contains(j, []byte(s)) {
			t.Errorf("JSON lacks %s: %s", s, j)
		}
	}
	// Messages are folded onto one line.
	nl := Report{Checks: []Check{{Name: "x", Severity: SeverityInfo, Message: "a\nb"}}}
	b.Reset()
	nl.WriteText(&b)
	if strings.Contains(b.String(), "a\nb") {
		t.Errorf("newline kept: %q", b.String())
	}
}
