package stream

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"
)

// fullSizes from stream-format.md §9: total bytes of each FULL section incl. header+footer.
var fullSizes = map[string]int{
	"timer/0": 48, "cpu_common/0": 37, "cpu/0": 1864, "kvm-tpr-opt/0": 174, "apic/0": 204,
	"kvmclock/0": 68, "fw_cfg/0": 99, "0000:00:00.0/mch/0": 312, "PCIHost/0": 30, "PCIBUS/0": 61,
	"dma/0": 97, "dma/1": 97, "0000:00:1f.0/ICH9LPC/0": 18917, "i8259/0": 40, "i8259/1": 40,
	"ioapic/0": 231, "hpet/0": 174, "mc146818rtc/0": 275, "i8254/0": 132, "pcspk/0": 26,
	"ps2kbd/0": 309, "ps2mouse/0": 318, "pckbd/0": 64, "vmmouse/0": 4131, "port92/0": 26,
	"0000:00:1f.2/ich9_ahci/0": 4209, "i2c_bus/0": 27, "0000:00:1f.3/ich9_smb/0": 365,
	"acpi_build/0": 30, "globalstate/0": 134,
}

// TestIdleDeviceSections checks the heuristically found FULL boundaries against the sizes
// measured in stream-format.md §9 and the device list of the stream's own vmdesc, and the raw
// tail. The /tmp captures were taken on another host than the spec's table: they have no
// kvmclock section and a 1904-byte cpu section, so cpu/0 is checked against the vmdesc only.
func TestIdleDeviceSections(t *testing.T) {
	for _, rs := range realStreams(t) {
		if rs.name != "idle72.bin" && rs.name != "idle10.bin" && rs.name != "idle10on72.bin" {
			continue
		}
		t.Run(rs.name, func(t *testing.T) {
			var tail []byte
			r := NewReader(bytes.NewReader(rs.data), WithRawTail(func(b []byte) { tail = b }))
			var seen []string
			var vmdesc struct {
				Devices []struct {
					Name       string `json:"name"`
					InstanceID int    `json:"instance_id"`
				} `json:"devices"`
			}
			firstFull := int64(-1)
			for {
				rec, err := r.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				if rec.Kind == KindVMDesc {
					if err := json.Unmarshal(rec.JSON, &vmdesc); err != nil {
						t.Fatal(err)
					}
				}
				if rec.Kind != KindSectionFull {
					continue
				}
				if firstFull < 0 {
					firstFull = rec.Offset
				}
				key := fmt.Sprintf("%s/%d", rec.Section.Idstr, rec.Section.Instance)
				total := 1 + 4 + 1 + len(rec.Section.Idstr) + 8 + len(rec.Body) + 5
				if want, ok := fullSizes[key]; key != "cpu/0" && (!ok || want != total) {
					t.Errorf("%s: %d bytes, spec says %d", key, total, want)
				}
				seen = append(seen, key)
			}
			var want []string
			for _, d := range vmdesc.Devices {
				want = append(want, fmt.Sprintf("%s/%d", d.Name, d.InstanceID))
			}
			if fmt.Sprint(seen) != fmt.Sprint(want) {
				t.Errorf("FULL sections %v\nvmdesc devices %v", seen, want)
			}
			if !bytes.Equal(tail, rs.data[firstFull:]) || !bytes.Equal(r.Tail(), tail) {
				t.Errorf("raw tail is not the input from the first FULL section on")
			}
		})
	}
}

// TestDeviceSizer checks that a sizer's answer is used (no heuristic), that it sees the
// vmdesc, and that a failing sizer falls back to footer scanning with a warning.
func TestDeviceSizer(t *testing.T) {
	var data []byte
	for _, s := range syntheticStreams() {
		if s.name == "continue-across-sections" {
			data = s.data
		}
	}
	sizes := map[string]int{"dev": len(devBody), "0000:00:1f.0/other": 3}
	run := func(sizer DeviceSizer) (heur, warns int, refs []DeviceRef) {
		r := NewReader(bytes.NewReader(data), WithDeviceSizer(func(d DeviceRef, body []byte) (int, error) {
			refs = append(refs, d)
			return sizer(d, body)
		}), WithWarnings(func(int64, string) { warns++ }))
		for {
			rec, err := r.Next()
			if err == io.EOF {
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rec.Kind == KindSectionFull && rec.Heuristic {
				heur++
			}
		}
	}
	heur, warns, refs := run(func(d DeviceRef, body []byte) (int, error) { return sizes[d.Idstr], nil })
	if heur != 0 || warns != 0 || len(refs) != 2 {
		t.Fatalf("heuristic %d warnings %d refs %d", heur, warns, len(refs))
	}
	if string(refs[0].VMDesc) != `{"page_size": 4096, "devices": []}` || refs[1].Index != 1 || refs[1].InstanceID != 1 || refs[1].VersionID != 3 {
		t.Fatalf("refs %+v", refs)
	}
	heur, warns, _ = run(func(DeviceRef, []byte) (int, error) { return 0, errors.New("no") })
	if heur != 2 || warns != 4 {
		t.Fatalf("failing sizer: heuristic %d warnings %d", heur, warns)
	}
	heur, _, _ = run(func(DeviceRef, []byte) (int, error) { return 1, nil }) // wrong size
	if heur != 2 {
		t.Fatalf("wrong sizer: heuristic %d", heur)
	}
}

// TestCopyMode checks WithZeroCopy(false) returns the same data.
func TestCopyMode(t *testing.T) {
	for _, rs := range realStreams(t) {
		a := NewReader(bytes.NewReader(rs.data))
		b := NewReader(bytes.NewReader(rs.data), WithZeroCopy(false))
		for {
			ra, ea := a.Next()
			rb, eb := b.Next()
			if ea != eb {
				t.Fatalf("%s: %v vs %v", rs.name, ea, eb)
			}
			if ea != nil {
				break
			}
			if !bytes.Equal(ra.RAM.Data, rb.RAM.Data) || !bytes.Equal(ra.Payload, rb.Payload) || !bytes.Equal(ra.JSON, rb.JSON) {
				t.Fatalf("%s: data differs at %d", rs.name, ra.Offset)
			}
		}
	}
}

// TestPostcopyPageSize: with POSTCOPY_ADVISE announcing huge pages, a block entry carrying a
// page size is recognised (heuristically, or through WithPageSizeField).
func TestPostcopyPageSize(t *testing.T) {
	data := build(func(w *Writer) {
		w.WriteHeader()
		w.WriteConfiguration(&Configuration{Machine: "m"})
		w.WriteCommand(CmdPostcopyAdvise, []byte{0, 0, 0, 0, 0, 0x20, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0})
		w.WriteSectionHeader(SectionStart, 1, "ram", 0, 4)
		w.WriteMemSize([]RAMBlock{{Name: "pc.ram", UsedLength: 1 << 30, HasPageSize: true, PageSize: 2 << 20},
			{Name: "pc.rom", UsedLength: 0x20000}})
		w.WriteEOS()
		w.WriteFooter(1)
		w.WriteEOF()
	})
	for _, opts := range [][]Option{nil, {WithPageSizeField(func(b string) bool { return b == "pc.ram" })}} {
		s, err := decodeAll(t, data, opts...)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(s.reencoded, data) {
			t.Fatal("round trip differs")
		}
	}
}

// TestTailWithoutClose: a source that keeps the connection open after the vmdesc (e.g.
// waiting for a return-path SHUT) must not stall the reader before the KindVMDesc record.
func TestTailWithoutClose(t *testing.T) {
	for _, rs := range realStreams(t) {
		pr, pw := io.Pipe()
		go pw.Write(rs.data)
		got := make(chan error, 1)
		r := NewReader(pr)
		go func() {
			for {
				rec, err := r.Next()
				if err != nil {
					got <- err
					return
				}
				if rec.Kind == KindVMDesc {
					got <- nil
					return
				}
			}
		}()
		select {
		case err := <-got:
			if err != nil {
				t.Fatalf("%s: %v", rs.name, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: reader stalled before the vmdesc", rs.name)
		}
		pw.Close()
		if _, err := r.Next(); err != io.EOF {
			t.Fatalf("%s: after close: %v", rs.name, err)
		}
	}
}

// TestSizerAgreesWithFooterScan: on every capture, the vmdesc-driven sizer (VMDescSizer) and
// footer scanning must find the same FULL section boundaries, and the sizer must never fail.
func TestSizerAgreesWithFooterScan(t *testing.T) {
	bodies := func(data []byte, opts ...Option) (lens []int, heur int) {
		r := NewReader(bytes.NewReader(data), opts...)
		for {
			rec, err := r.Next()
			if err == io.EOF {
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rec.Kind == KindSectionFull {
				lens = append(lens, len(rec.Body))
				if rec.Heuristic {
					heur++
				}
			}
		}
	}
	for _, rs := range realStreams(t) {
		scan, _ := bodies(rs.data)
		sized, heur := bodies(rs.data, WithDeviceSizer(VMDescSizer()))
		if heur != 0 || fmt.Sprint(scan) != fmt.Sprint(sized) {
			t.Errorf("%s: sizer (%d heuristic) %v\nfooter scan %v", rs.name, heur, sized, scan)
		}
	}
}
