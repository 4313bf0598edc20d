package stream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// vmdescTestSection is a FULL device section located independently of the vmdesc walker (by
// chaining footers to the next expected header), used to check the walker's results.
type vmdescTestSection struct {
	idstr     string
	instance  uint32
	id        uint32
	bodyStart int // offset of the first body byte
	bodyEnd   int // offset of the footer byte 0x7E
}

// vmdescTestStream is a real stream with its vmdesc tail located.
type vmdescTestStream struct {
	name     string
	data     []byte
	eof      int // offset of the EOF byte 0x00 before `06 be32 len json`
	json     []byte
	desc     *VMDesc
	sections []vmdescTestSection
}

var (
	vmdescTestOnce    sync.Once
	vmdescTestStreams []*vmdescTestStream
	vmdescTestErrs    []string
)

// vmdescTestFiles lists the main-stream captures in testdata/streams.
func vmdescTestFiles() []string {
	files, _ := filepath.Glob(filepath.Join(streamtest.Dir(), "*.bin.gz"))
	var out []string
	for _, f := range files {
		if !strings.Contains(filepath.Base(f), ".ch") {
			out = append(out, f)
		}
	}
	return out
}

func vmdescTestRead(path string) ([]byte, error) { return streamtest.ReadFile(path) }

// vmdescTestLoad reads every available stream and locates its tail.
func vmdescTestLoad(t testing.TB) []*vmdescTestStream {
	vmdescTestOnce.Do(func() {
		for _, f := range vmdescTestFiles() {
			data, err := vmdescTestRead(f)
			if err != nil {
				vmdescTestErrs = append(vmdescTestErrs, f+": "+err.Error())
				continue
			}
			s, err := vmdescTestLocate(filepath.Base(f), data)
			if err != nil {
				vmdescTestErrs = append(vmdescTestErrs, f+": "+err.Error())
				continue
			}
			vmdescTestStreams = append(vmdescTestStreams, s)
		}
	})
	for _, e := range vmdescTestErrs {
		t.Errorf("locating stream tail: %s", e)
	}
	if len(vmdescTestStreams) == 0 {
		t.Skip("no real streams available")
	}
	return vmdescTestStreams
}

// vmdescTestHeader builds the FULL section header `04 be32 id cstr idstr be32 instance`
// (without id and version, which the search does not know) as prefix/suffix pair.
func vmdescTestHeaderMatch(b []byte, d *VMDescDevice) (id uint32, hdrLen int, ok bool) {
	n := len(d.Name)
	if len(b) < 1+4+1+n+4+4 || b[0] != 0x04 || int(b[5]) != n || string(b[6:6+n]) != d.Name {
		return 0, 0, false
	}
	if binary.BigEndian.Uint32(b[6+n:]) != d.InstanceID {
		return 0, 0, false
	}
	return binary.BigEndian.Uint32(b[1:]), 1 + 4 + 1 + n + 4 + 4, true
}

// vmdescTestLocate finds the vmdesc (0x00, 0x06, be32 len == rest) from the end, parses it and
// chains the FULL sections it describes: a candidate header of device 0, then for each device the
// first `7E be32 id` followed by the next device's header (or by the EOF byte).
func vmdescTestLocate(name string, data []byte) (*vmdescTestStream, error) {
	s := &vmdescTestStream{name: name, data: data, eof: -1}
	for i := len(data) - 6; i >= 0 && i >= len(data)-(1<<24); i-- {
		if data[i] == 0 && data[i+1] == 6 && int(binary.BigEndian.Uint32(data[i+2:])) == len(data)-i-6 {
			s.eof = i
			break
		}
	}
	if s.eof < 0 {
		return nil, errors.New("no vmdesc tail")
	}
	s.json = data[s.eof+6:]
	d, err := ParseVMDesc(s.json)
	if err != nil {
		return nil, err
	}
	s.desc = d
	if len(d.Devices) == 0 {
		return s, nil
	}
	first := []byte{0x04}
	for from := 0; ; {
		i := bytes.Index(data[from:s.eof], first)
		if i < 0 {
			return nil, errors.New("device section chain not found")
		}
		at := from + i
		from = at + 1
		if secs := vmdescTestChain(data, s.eof, d, at); secs != nil {
			s.sections = secs
			return s, nil
		}
	}
}

func vmdescTestChain(data []byte, eof int, d *VMDesc, at int) []vmdescTestSection {
	var secs []vmdescTestSection
	for k := range d.Devices {
		id, hl, ok := vmdescTestHeaderMatch(data[at:], &d.Devices[k])
		if !ok {
			return nil
		}
		sec := vmdescTestSection{idstr: d.Devices[k].Name, instance: d.Devices[k].InstanceID, id: id, bodyStart: at + hl}
		var foot [5]byte
		foot[0] = 0x7E
		binary.BigEndian.PutUint32(foot[1:], id)
		found := false
		for p := sec.bodyStart; p+5 <= eof; {
			j := bytes.Index(data[p:eof], foot[:])
			if j < 0 {
				break
			}
			q := p + j
			next := q + 5
			if k == len(d.Devices)-1 {
				if next == eof {
					found = true
				}
			} else if _, _, ok := vmdescTestHeaderMatch(data[next:], &d.Devices[k+1]); ok {
				found = true
			}
			if found {
				sec.bodyEnd = q
				at = next
				break
			}
			p = q + 1
		}
		if !found {
			return nil
		}
		secs = append(secs, sec)
	}
	return secs
}

func TestParseVMDescReal(t *testing.T) {
	for _, s := range vmdescTestLoad(t) {
		t.Run(s.name, func(t *testing.T) {
			d := s.desc
			if d.PageSize != 4096 {
				t.Errorf("page_size = %d", d.PageSize)
			}
			if len(s.sections) != len(d.Devices) || len(d.Devices) == 0 {
				t.Fatalf("%d sections located for %d devices", len(s.sections), len(d.Devices))
			}
			is10 := bytes.Contains(s.json[:min(len(s.json), 64)], []byte(`"configuration"`))
			if is10 != (d.Configuration != nil) {
				t.Errorf("configuration present = %v", d.Configuration != nil)
			}
			if d.Configuration != nil && (d.Configuration.Name != "configuration" || len(d.Configuration.Fields) < 2) {
				t.Errorf("configuration = %+v", d.Configuration)
			}
			if d.Device("globalstate", 0) == nil {
				t.Errorf("no globalstate device")
			}
		})
	}
}

func TestParseVMDescSmall(t *testing.T) {
	js := `{"page_size": 4096, "devices": [{"name": "x", "instance_id": 3, "vmsd_name": "x", "version": 2,
	 "fields": [{"name": "a", "array_len": 4, "type": "uint8", "size": 1},
	            {"name": "t", "type": "tmp", "vmsd_name": "t1", "version": 0, "fields": [{"name":"q"}], "vmsd_name": "t2", "fields": [], "size": 9},
	            {"name": "e", "index": 1, "type": "struct", "struct": {"vmsd_name": "s", "version": 1, "fields": []}, "size": 0},
	            {"name": "n", "type": "nullptr", "size": 1, "unknown": {"deep": [1, [2, {"x": null}]]}}],
	 "subsections": [{"vmsd_name": "x/sub", "version": 1, "fields": [{"name": "b", "type": "bool", "size": 1}]}]},
	 {"name": "old", "instance_id": 0, "vmsd_name": "old", "version": 4, "size": 5, "fields": [{"name": "data", "size": 5, "type": "buffer"}]}]}`
	d, err := ParseVMDesc([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Devices) != 2 {
		t.Fatalf("devices = %d", len(d.Devices))
	}
	x := d.Devices[0]
	if x.Name != "x" || x.InstanceID != 3 || x.VMSD.Version != 2 || len(x.VMSD.Fields) != 4 || x.VMSD.Size != -1 {
		t.Errorf("device x = %+v", x)
	}
	f := x.VMSD.Fields
	if f[0].ArrayLen != 4 || f[0].Index != -1 || f[1].Type != "tmp" || f[1].Size != 9 || f[1].Struct != nil ||
		f[2].Index != 1 || f[2].Struct == nil || f[2].Struct.Name != "s" || f[3].Type != "nullptr" {
		t.Errorf("fields = %+v", f)
	}
	if len(x.VMSD.Subsections) != 1 || x.VMSD.Subsections[0].Name != "x/sub" {
		t.Errorf("subsections = %+v", x.VMSD.Subsections)
	}
	if d.Devices[1].VMSD.Size != 5 {
		t.Errorf("old-style size = %d", d.Devices[1].VMSD.Size)
	}
}

func TestParseVMDescErrors(t *testing.T) {
	cases := map[string]string{
		"empty":       ``,
		"truncated":   `{"page_size": 4096, "devices": [{"name": "x"`,
		"not object":  `[1,2]`,
		"bad number":  `{"page_size": 1.5}`,
		"neg size":    `{"devices": [{"name": "x", "fields": [{"name": "a", "size": -1}]}]}`,
		"zero arrlen": `{"devices": [{"name": "x", "fields": [{"name": "a", "array_len": 0}]}]}`,
		"huge inst":   `{"devices": [{"name": "x", "instance_id": 4294967296}]}`,
		"str type":    `{"devices": [{"name": 5}]}`,
		"trailing":    `{"devices": []} {}`,
		"garbage":     `{"devices": [}`,
		"deep":        `{"x": ` + strings.Repeat("[", 200) + strings.Repeat("]", 200) + `}`,
	}
	for name, js := range cases {
		d, err := ParseVMDesc([]byte(js))
		var e *Error
		if !errors.As(err, &e) {
			t.Errorf("%s: got %v, %v; want *Error", name, d, err)
		}
	}
	if _, err := ParseVMDescWith([]byte(`{"devices": [{"name": "x", "fields": [{}, {}, {}]}]}`), VMDescOptions{MaxItems: 3}); !errors.Is(err, ErrVMDescInvalid) {
		t.Errorf("MaxItems: %v", err)
	}
	_, err := ParseVMDescWith([]byte(`{"devices": [`), VMDescOptions{BaseOffset: 1000})
	var e *Error
	if !errors.As(err, &e) || !errors.Is(err, ErrUnexpectedEOF) || e.Offset < 1000 {
		t.Errorf("truncated: %v", err)
	}
}

// TestParseVMDescCorrupt truncates and flips bytes of a real vmdesc: errors, never panics.
func TestParseVMDescCorrupt(t *testing.T) {
	s := vmdescTestLoad(t)[0]
	js := s.json
	step := 31
	if testing.Short() {
		step = 127
	}
	for n := 0; n < len(js); n += step * 7 {
		if _, err := ParseVMDesc(js[:n]); err == nil {
			t.Fatalf("prefix %d parsed", n)
		}
	}
	buf := append([]byte(nil), js...)
	for i := 0; i < len(js); i += step * 13 {
		old := buf[i]
		for _, c := range []byte{'"', '{', ']', '9', 0} {
			buf[i] = c
			if d, err := ParseVMDesc(buf); err == nil {
				// Still valid JSON: walking it must not panic either.
				for k := range d.Devices {
					if k < len(s.sections) {
						sec := s.sections[k]
						_, _ = d.Devices[k].BodySize(s.data[sec.bodyStart:])
					}
				}
			}
		}
		buf[i] = old
	}
}
