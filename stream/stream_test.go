package stream

import (
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// realStream is a captured stream with its expected QMP RAM counters.
type realStream struct {
	name      string
	data      []byte
	normal    int64 // PAGE records expected, -1 unknown
	duplicate int64 // ZERO records expected, -1 unknown
}

// realStreams returns every capture in ../testdata/streams plus the /tmp ones if present.
func realStreams(t testing.TB) []realStream {
	t.Helper()
	var out []realStream
	files, _ := filepath.Glob(filepath.Join("..", "testdata", "streams", "*.bin"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		s := realStream{name: filepath.Base(f), data: b, normal: -1, duplicate: -1}
		if j, err := os.ReadFile(strings.TrimSuffix(f, ".bin") + ".json"); err == nil {
			var meta struct {
				RAM struct {
					Normal    *int64 `json:"normal"`
					Duplicate *int64 `json:"duplicate"`
				} `json:"ram"`
			}
			if err := json.Unmarshal(j, &meta); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if meta.RAM.Normal != nil {
				s.normal = *meta.RAM.Normal
			}
			if meta.RAM.Duplicate != nil {
				s.duplicate = *meta.RAM.Duplicate
			}
		}
		out = append(out, s)
	}
	for _, f := range []string{"/tmp/idle72.bin", "/tmp/idle10.bin", "/tmp/idle10on72.bin"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		out = append(out, realStream{name: filepath.Base(f), data: b, normal: 119, duplicate: 16395})
	}
	if len(out) == 0 {
		t.Skip("no captured streams")
	}
	return out
}

// decodeAll decodes data and re-encodes every record, returning the records' summary.
type summary struct {
	kinds        map[Kind]int
	pages, zeros int64
	cmds         []Command
	machine      string
	ramID        uint32
	fulls        int
	heuristic    int
	warnings     int
	vmdescLen    int
	reencoded    []byte
}

func decodeAll(t testing.TB, data []byte, opts ...Option) (*summary, error) {
	s := &summary{kinds: map[Kind]int{}}
	var out bytes.Buffer
	w := NewWriter(&out)
	opts = append([]Option{WithWarnings(func(int64, string) { s.warnings++ })}, opts...)
	r := NewReader(bytes.NewReader(data), opts...)
	for {
		rec, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return s, err
		}
		s.kinds[rec.Kind]++
		switch rec.Kind {
		case KindConfiguration:
			s.machine = rec.Config.Machine
		case KindSectionStart:
			if rec.Section.Idstr == "ram" {
				s.ramID = rec.Section.ID
			}
		case KindSectionFull:
			s.fulls++
			if rec.Heuristic {
				s.heuristic++
			}
		case KindRAM:
			switch rec.RAM.Flags &^ RAMContinue {
			case RAMPage:
				s.pages++
			case RAMZero:
				s.zeros++
			}
		case KindCommand:
			s.cmds = append(s.cmds, rec.Cmd)
		case KindVMDesc:
			s.vmdescLen = len(rec.JSON)
		}
		if err := w.WriteRecord(rec); err != nil {
			t.Fatalf("WriteRecord(%v at %d): %v", rec.Kind, rec.Offset, err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	s.reencoded = out.Bytes()
	return s, nil
}

func TestRealStreamsRoundTrip(t *testing.T) {
	for _, rs := range realStreams(t) {
		t.Run(rs.name, func(t *testing.T) {
			s, err := decodeAll(t, rs.data)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(s.reencoded, rs.data) {
				i := 0
				for i < len(s.reencoded) && i < len(rs.data) && s.reencoded[i] == rs.data[i] {
					i++
				}
				t.Fatalf("re-encoded stream differs at offset %d (len %d vs %d)", i, len(s.reencoded), len(rs.data))
			}
			if rs.normal >= 0 && s.pages != rs.normal {
				t.Errorf("PAGE records = %d, QMP normal = %d", s.pages, rs.normal)
			}
			if rs.duplicate >= 0 && s.zeros != rs.duplicate {
				t.Errorf("ZERO records = %d, QMP duplicate = %d", s.zeros, rs.duplicate)
			}
			if s.ramID == 0 {
				t.Errorf("ram section id is 0")
			}
			if s.vmdescLen == 0 {
				t.Errorf("no vmdesc")
			}
			t.Logf("machine %s, %d pages, %d zero, %d FULL sections (%d heuristic), cmds %v, kinds %v",
				s.machine, s.pages, s.zeros, s.fulls, s.heuristic, s.cmds, s.kinds)
			switch rs.name {
			case "idle72.bin", "idle10on72.bin":
				if s.machine != "pc-q35-7.2" {
					t.Errorf("machine %q", s.machine)
				}
			case "idle10.bin":
				if s.machine != "pc-q35-10.0" {
					t.Errorf("machine %q", s.machine)
				}
			}
			has11 := false
			for _, c := range s.cmds {
				has11 = has11 || c == CmdSwitchoverStart
			}
			if want := rs.name == "idle10.bin"; want && !has11 {
				t.Errorf("no SWITCHOVER_START command")
			} else if rs.name == "idle72.bin" || rs.name == "idle10on72.bin" {
				if has11 {
					t.Errorf("unexpected SWITCHOVER_START")
				}
			}
		})
	}
}
