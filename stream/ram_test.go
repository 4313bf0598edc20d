package stream

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

func TestXBZRLERoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 200 {
		old := make([]byte, 4096)
		for j := range old {
			old[j] = byte(rng.IntN(4))
		}
		newp := append([]byte(nil), old...)
		for range rng.IntN(300) {
			newp[rng.IntN(4096)] = byte(rng.IntN(256))
		}
		delta := make([]byte, 4096)
		n, ok := XBZRLEEncode(old, newp, delta)
		if !ok {
			continue // too many changes: would be sent as PAGE
		}
		if bytes.Equal(old, newp) != (n == 0) {
			t.Fatalf("case %d: n=%d for equal=%v", i, n, bytes.Equal(old, newp))
		}
		dst := append([]byte(nil), old...)
		if err := XBZRLEDecode(dst, delta[:n]); err != nil {
			t.Fatalf("case %d: %v", i, err)
		}
		if !bytes.Equal(dst, newp) {
			t.Fatalf("case %d: decoded page differs", i)
		}
	}
	// A page full of changes does not fit in a small buffer.
	old, newp := make([]byte, 4096), bytes.Repeat([]byte{1}, 4096)
	if _, ok := XBZRLEEncode(old, newp, make([]byte, 100)); ok {
		t.Fatal("expected overflow")
	}
}

func TestXBZRLEDecodeErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		delta []byte
	}{
		{"zero run past page", []byte{0xff, 0x7f, 1, 0}},
		{"literal past page", []byte{0x80, 0x20, 0x10, 1, 2}},
		{"literal past delta", []byte{0, 5, 1, 2}},
		{"empty literal", []byte{3, 0}},
		{"missing literal", []byte{3}},
		{"three-byte uleb", []byte{0x80, 0x80, 0x01}},
	} {
		err := XBZRLEDecode(make([]byte, 4096), tc.delta)
		var e *Error
		if !errors.As(err, &e) {
			t.Errorf("%s: got %v", tc.name, err)
		}
	}
}

func TestInflate(t *testing.T) {
	page := bytes.Repeat([]byte("abcdefgh"), 512)
	var f Inflater
	dst := make([]byte, 4096)
	for range 3 { // reuse
		n, err := f.Inflate(dst, zlibPage(page))
		if err != nil || n != 4096 || !bytes.Equal(dst, page) {
			t.Fatalf("n=%d err=%v", n, err)
		}
	}
	long := zlibPage(append(page, 'x'))
	if _, err := f.Inflate(dst, long); !errors.Is(err, errInflateTooLong) {
		t.Fatalf("longer output: %v", err)
	}
	z := zlibPage(page)
	if _, err := f.Inflate(dst, z[:len(z)-3]); err == nil {
		t.Fatal("truncated zlib accepted")
	}
	bad := append([]byte(nil), z...)
	bad[len(bad)-1] ^= 1
	if _, err := InflatePage(dst, bad); err == nil {
		t.Fatal("bad checksum accepted")
	}
}

// TestSyntheticContents checks decoded values, not only the round trip.
func TestSyntheticContents(t *testing.T) {
	streams := map[string][]byte{}
	for _, s := range syntheticStreams() {
		streams[s.name] = s.data
	}
	var f Inflater
	page := make([]byte, 4096)
	recs := func(name string, fn func(rec *Record)) {
		r := NewReader(bytes.NewReader(streams[name]))
		for {
			rec, err := r.Next()
			if err == io.EOF {
				return
			}
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			fn(rec)
		}
	}
	var got []string
	recs("xbzrle", func(rec *Record) {
		if rec.Kind == KindRAM && rec.RAM.Flags&^RAMContinue == RAMXBZRLE {
			if rec.RAM.Block != "pc.ram" || rec.RAM.Flags != RAMXBZRLE|RAMContinue {
				t.Errorf("xbzrle record %+v", rec.RAM)
			}
			clear(page)
			if err := XBZRLEDecode(page, rec.RAM.Data); err != nil || string(page[100:105]) != "hello" || page[4000] != 9 {
				t.Errorf("xbzrle decode: %v", err)
			}
			got = append(got, "x")
		}
	})
	recs("compress", func(rec *Record) {
		if rec.Kind == KindRAM && rec.RAM.Flags&^RAMContinue == RAMCompressPage {
			n, err := f.Inflate(page, rec.RAM.Data)
			if err != nil || n != 4096 || rec.RAM.Block != "pc.ram" {
				t.Errorf("compressed page: n=%d %v %q", n, err, rec.RAM.Block)
			}
			got = append(got, "c")
		}
	})
	flushes := 0
	recs("multifd-flush", func(rec *Record) {
		if rec.Kind == KindRAM && rec.RAM.Flags == RAMMultifdFlush {
			flushes++
		}
	})
	if flushes != 2 {
		t.Errorf("%d MULTIFD_FLUSH records", flushes)
	}
	recs("continue-across-sections", func(rec *Record) {
		if rec.Kind == KindRAM && rec.RAM.Flags&RAMContinue != 0 && rec.RAM.Block != "pc.rom" {
			t.Errorf("CONTINUE resolved to %q", rec.RAM.Block)
		}
		if rec.Kind == KindRAM && rec.RAM.Flags&RAMContinue != 0 {
			got = append(got, "k")
		}
	})
	recs("x-ignore-shared", func(rec *Record) {
		if rec.Kind == KindRAM && rec.RAM.Flags == RAMMemSize {
			b := rec.RAM.Blocks
			if len(b) != 2 || !b[1].HasGPA || b[1].GPA != 0xfffc0000 || b[0].HasPageSize || rec.RAM.Offset != 1<<20+0x40000 {
				t.Errorf("blocks %+v", b)
			}
			got = append(got, "g")
		}
	})
	depth := 0
	recs("packaged", func(rec *Record) {
		switch rec.Kind {
		case KindCommand:
			if rec.Cmd == CmdPackaged {
				depth++
			}
			if rec.Cmd == CmdPostcopyRun && rec.Depth != 1 {
				t.Errorf("RUN at depth %d", rec.Depth)
			}
		case KindSectionFull:
			if rec.Depth != 1 || (rec.Section.Idstr == "dev" && !bytes.Equal(rec.Body, devBody)) {
				t.Errorf("FULL %q depth %d body %x", rec.Section.Idstr, rec.Depth, rec.Body)
			}
			got = append(got, "f")
		case KindPackageEnd:
			depth--
		}
	})
	if depth != 0 {
		t.Errorf("unbalanced package")
	}
	recs("uuid-pagebits", func(rec *Record) {
		if rec.Kind == KindConfiguration {
			c := rec.Config
			if c.Machine != "virt" || !c.HasUUID || c.UUID[0] != 0x11 || !c.HasTargetPageBits || c.TargetPageBits != 12 {
				t.Errorf("config %+v", c)
			}
		}
	})
	if want := "xcckkgff"; string(bytes.Join(func() [][]byte {
		var o [][]byte
		for _, s := range got {
			o = append(o, []byte(s))
		}
		return o
	}(), nil)) != want {
		t.Errorf("saw %v, want %s", got, want)
	}
}

// TestMappedRAM builds a small mapped-ram file (stream-format.md §4.3) and checks that the
// reader skips the file regions, reports them, and that the writer reproduces them.
func TestMappedRAM(t *testing.T) {
	const used = 0x4000
	var buf bytes.Buffer
	pattern := func(off int64, dst []byte) {
		for i := range dst {
			dst[i] = byte(off + int64(i))
		}
	}
	w := NewWriter(&buf, WithMappedRAMFill(pattern))
	w.WriteHeader()
	w.WriteConfiguration(&Configuration{Machine: "pc-q35-10.0", HasCapabilities: true, Capabilities: []string{CapMappedRAM}})
	w.WriteSectionHeader(SectionStart, 1, "ram", 0, 4)
	var blocks []RAMBlock
	off := uint64(w.Offset()) + 8
	for _, name := range []string{"pc.ram", "pc.rom"} {
		bm := off + 1 + uint64(len(name)) + 8 + mappedRAMHeaderLen
		pages := (bm + 8 + 0xfff) &^ 0xfff
		blocks = append(blocks, RAMBlock{Name: name, UsedLength: used, HasMappedRAM: true,
			MappedRAM: MappedRAMHeader{Version: 1, PageSize: 4096, BitmapOffset: bm, PagesOffset: pages}})
		off = pages + used
	}
	if err := w.WriteMemSize(blocks); err != nil {
		t.Fatal(err)
	}
	w.WriteEOS()
	w.WriteFooter(1)
	w.WriteSectionHeader(SectionEnd, 1, "", 0, 0)
	w.WriteEOS()
	w.WriteFooter(1)
	w.WriteEOF()
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	data := buf.Bytes()
	if uint64(len(data)) != off+8+5+5+8+5+1 {
		t.Fatalf("file length %d, expected %d", len(data), off+8+5+5+8+5+1)
	}
	var regions int64
	r := NewReader(bytes.NewReader(data), WithMappedRAMData(func(o int64, d []byte) {
		want := make([]byte, len(d))
		pattern(o, want)
		if !bytes.Equal(d, want) {
			t.Errorf("region at %d differs", o)
		}
		regions += int64(len(d))
	}))
	var out bytes.Buffer
	w2 := NewWriter(&out, WithMappedRAMFill(pattern))
	for {
		rec, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if rec.Kind == KindRAM && rec.RAM.Flags == RAMMemSize {
			if len(rec.RAM.Blocks) != 2 || rec.RAM.Blocks[1].MappedRAM != blocks[1].MappedRAM {
				t.Fatalf("blocks %+v", rec.RAM.Blocks)
			}
		}
		if err := w2.WriteRecord(rec); err != nil {
			t.Fatal(err)
		}
	}
	w2.Flush()
	if !bytes.Equal(out.Bytes(), data) {
		t.Fatal("mapped-ram round trip differs")
	}
	if regions == 0 {
		t.Fatal("no region data reported")
	}
}
