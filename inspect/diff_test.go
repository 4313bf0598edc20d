package inspect

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

func diffBytes(t testing.TB, a, b []byte) (*Diff, string) {
	t.Helper()
	d, err := DiffStreams(bytes.NewReader(a), "A", bytes.NewReader(b), "B", DiffOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var txt strings.Builder
	if err := d.WriteText(&txt); err != nil {
		t.Fatal(err)
	}
	if _, err := json.Marshal(d); err != nil {
		t.Fatal(err)
	}
	return d, txt.String()
}

// rewrite re-encodes a captured stream record by record through stream.Writer, letting edit
// change a record or drop it (a dropped FULL section takes its footer along).
func rewrite(t testing.TB, in []byte, edit func(rec *stream.Record) (drop bool)) []byte {
	t.Helper()
	var out bytes.Buffer
	w := stream.NewWriter(&out)
	rd := stream.NewReader(bytes.NewReader(in), stream.WithDeviceSizer(stream.VMDescSizer()))
	dropFooter := map[uint32]bool{}
	for {
		rec, err := rd.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if rec.Kind == stream.KindFooter && dropFooter[rec.Section.ID] {
			delete(dropFooter, rec.Section.ID)
			continue
		}
		if edit(rec) {
			if rec.Kind == stream.KindSectionFull {
				dropFooter[rec.Section.ID] = true
			}
			continue
		}
		if err := w.WriteRecord(rec); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// TestDiffIdentical: every capture against itself, and against its re-encoding (the same
// bytes), reports no difference.
func TestDiffIdentical(t *testing.T) {
	for _, c := range streamtest.Captures(t) {
		data := streamtest.Read(t, c.Path)
		d, txt := diffBytes(t, data, append([]byte(nil), data...))
		if !d.Identical || !strings.Contains(txt, "no difference") {
			t.Errorf("%s against itself: %s", c.Name, txt)
		}
	}
	data := streamtest.Load(t, "idle-7.2")
	if d, txt := diffBytes(t, data, rewrite(t, data, func(*stream.Record) bool { return false })); !d.Identical {
		t.Errorf("idle-7.2 against its re-encoding: %s", txt)
	}
}

// TestDiffMachineType: QEMU 7.2's and 10.0's idle saves of -machine q35 differ in the machine
// type (pc-q35-7.2, pc-q35-10.0) — what a destination refuses first.
func TestDiffMachineType(t *testing.T) {
	d, txt := diffBytes(t, streamtest.Load(t, "idle-7.2"), streamtest.Load(t, "idle-10.0"))
	if d.Identical || d.Machine == nil || d.Machine.A != "pc-q35-7.2" || d.Machine.B != "pc-q35-10.0" {
		t.Fatalf("machine %+v:\n%s", d.Machine, txt)
	}
	if !strings.Contains(txt, "machine        pc-q35-7.2 in A, pc-q35-10.0 in B") {
		t.Errorf("text:\n%s", txt)
	}
	// 10.0's globalstate has fields 7.2's has not: named from each side's vmdesc.
	var gs *DeviceFields
	for i := range d.Fields {
		if d.Fields[i].Device == "globalstate/0" {
			gs = &d.Fields[i]
		}
	}
	if gs == nil || !hasField(gs, "vm_was_suspended", "added") {
		t.Errorf("globalstate fields: %+v", gs)
	}
	// The same machine type on both QEMUs: no machine difference.
	if d, txt := diffBytes(t, streamtest.Load(t, "idle-7.2"), streamtest.Load(t, "idle-10.0-pc-q35-7.2")); d.Machine != nil {
		t.Errorf("pc-q35-7.2 on both: %s", txt)
	}
}

func hasField(f *DeviceFields, name, change string) bool {
	for _, fd := range f.Fields {
		if fd.Field == name && fd.Change == change {
			return true
		}
	}
	return false
}

// TestDiffOneField: a save whose timer state differs in one field (cpu_clock_offset, bytes
// 16..24 of the body per the vmdesc) is reported as exactly that field, with both values.
func TestDiffOneField(t *testing.T) {
	a := streamtest.Load(t, "idle-7.2")
	var old uint64
	b := rewrite(t, a, func(rec *stream.Record) bool {
		if rec.Kind == stream.KindSectionFull && rec.Section.Idstr == "timer" {
			body := append([]byte(nil), rec.Body...)
			old = binary.BigEndian.Uint64(body[16:])
			binary.BigEndian.PutUint64(body[16:], old+1000)
			rec.Body = body
		}
		return false
	})
	d, txt := diffBytes(t, a, b)
	if d.Identical || d.Machine != nil || len(d.RAMBlocks) != 0 || len(d.Devices) != 0 || len(d.Fields) != 1 {
		t.Fatalf("want one device with one field:\n%s", txt)
	}
	f := d.Fields[0]
	if f.Device != "timer/0" || len(f.Fields) != 1 || f.Compared != 3 {
		t.Fatalf("%+v", f)
	}
	fd := f.Fields[0]
	if fd.Field != "cpu_clock_offset" || fd.Type != "int64" || fd.Change != "value" ||
		!strings.HasPrefix(fd.A, strings.Split(value(&stream.Node{Type: "int64", Raw: be64(old)}), " ")[0]) ||
		!strings.HasPrefix(fd.B, strings.Split(value(&stream.Node{Type: "int64", Raw: be64(old + 1000)}), " ")[0]) {
		t.Errorf("%+v (old value %d)", fd, old)
	}
	if !strings.Contains(txt, "timer/0 (v2): 1 of 3 fields differ") || !strings.Contains(txt, "cpu_clock_offset int64: ") {
		t.Errorf("text:\n%s", txt)
	}
}

func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// TestDiffDevices: a device missing from B, one whose version differs, and a RAM block of
// another size are each reported once, and nothing else.
func TestDiffDevices(t *testing.T) {
	a := streamtest.Load(t, "idle-7.2")
	b := rewrite(t, a, func(rec *stream.Record) bool {
		switch {
		case rec.Kind == stream.KindSectionFull && rec.Section.Idstr == "pcspk":
			return true
		case rec.Kind == stream.KindSectionFull && rec.Section.Idstr == "hpet":
			rec.Section.Version = 3
		case rec.Kind == stream.KindRAM && rec.RAM.Flags&^stream.RAMContinue == stream.RAMMemSize:
			blocks := append([]stream.RAMBlock(nil), rec.RAM.Blocks...)
			for i := range blocks {
				if blocks[i].Name == "pc.ram" {
					rec.RAM.Offset += blocks[i].UsedLength
					blocks[i].UsedLength *= 2
				}
			}
			rec.RAM.Blocks = blocks
		}
		return false
	})
	d, txt := diffBytes(t, a, b)
	want := []DeviceDiff{{Device: "hpet/0", Type: "full", Change: "version", VersionA: 2, VersionB: 3},
		{Device: "pcspk/0", Type: "full", Change: "missing", VersionA: 1}}
	got := append([]DeviceDiff(nil), d.Devices...)
	if len(got) == 2 && got[0].Device > got[1].Device {
		got[0], got[1] = got[1], got[0]
	}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("devices %+v, want %+v\n%s", d.Devices, want, txt)
	}
	if len(d.RAMBlocks) != 1 || d.RAMBlocks[0].Name != "pc.ram" || d.RAMBlocks[0].Change != "changed" ||
		d.RAMBlocks[0].A.Size != 64<<20 || d.RAMBlocks[0].B.Size != 128<<20 || d.RAMBlocks[0].A.PageSize != 4096 {
		t.Errorf("RAM blocks %+v", d.RAMBlocks)
	}
	if len(d.Fields) != 0 || d.Machine != nil {
		t.Errorf("fields %+v machine %+v", d.Fields, d.Machine)
	}
	for _, w := range []string{"pc.ram: 67108864 bytes (64 MiB), page size 4096 in A, 134217728 bytes (128 MiB), page size 4096 in B",
		"pcspk/0 v1: only in A (missing from B)", "hpet/0: version 2 in A, 3 in B"} {
		if !strings.Contains(txt, w) {
			t.Errorf("text does not say %q:\n%s", w, txt)
		}
	}
	// The other way round the device is added.
	d, _ = diffBytes(t, b, a)
	if len(d.Devices) != 2 || !strings.Contains(d.Devices[0].Change+d.Devices[1].Change, "added") {
		t.Errorf("B→A: %+v", d.Devices)
	}
}

// TestDiffInvalid: a stream cut short is compared as far as it goes, says where it stops, and
// the error wraps ErrInvalid.
func TestDiffInvalid(t *testing.T) {
	a := streamtest.Load(t, "idle-7.2")
	cut := a[:len(a)/2]
	d, err := DiffStreams(bytes.NewReader(cut), "cut", bytes.NewReader(a), "whole", DiffOptions{})
	if !errors.Is(err, ErrInvalid) || d == nil || d.A.Error == "" || d.A.ErrorOffset == 0 || d.Identical {
		t.Fatalf("err %v diff %+v", err, d)
	}
	if d.Machine != nil || len(d.Devices) == 0 || d.Devices[0].Change != "added" {
		t.Errorf("the part that was read: machine %+v devices %+v", d.Machine, d.Devices)
	}
	if _, err := DiffStreams(errReader{}, "x", bytes.NewReader(a), "y", DiffOptions{}); err == nil || errors.Is(err, ErrInvalid) {
		t.Errorf("a read error: %v", err)
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("disk on fire") }

// FuzzDiff: no input makes DiffStreams panic, hang or fail to produce a report.
func FuzzDiff(f *testing.F) {
	idle := streamtest.Load(f, "idle-7.2")
	// Small streams with the structure of a real one: the head, and the device tail.
	var tailAt int64
	rd := stream.NewReader(bytes.NewReader(idle), stream.WithDeviceSizer(stream.VMDescSizer()))
	for tailAt == 0 {
		rec, err := rd.Next()
		if err != nil {
			f.Fatal(err)
		}
		if rec.Kind == stream.KindSectionFull {
			tailAt = rec.Offset
		}
	}
	tail := idle[tailAt:]
	head := idle[:4096]
	f.Add(head, append(append([]byte(nil), head[:24]...), tail...))
	f.Add(append(append([]byte(nil), idle[:24]...), tail...), append(append([]byte(nil), idle[:24]...), tail...))
	f.Fuzz(func(t *testing.T, a, b []byte) {
		d, err := DiffStreams(bytes.NewReader(a), "a", bytes.NewReader(b), "b", DiffOptions{})
		if d == nil {
			t.Fatalf("no diff: %v", err)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Fatalf("error %v does not wrap ErrInvalid", err)
		}
		var sb strings.Builder
		if err := d.WriteText(&sb); err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(a, b) && err == nil && !d.Identical {
			t.Fatalf("the same valid stream twice differs:\n%s", sb.String())
		}
	})
}
