package stream

import (
	"bytes"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
)

// decodeErr decodes data to the end and returns the first error (nil at a clean io.EOF).
func decodeErr(data []byte, opts ...Option) error {
	r := NewReader(bytes.NewReader(data), opts...)
	for {
		_, err := r.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func TestTruncatedRealStreams(t *testing.T) {
	for _, rs := range realStreams(t) {
		t.Run(rs.name, func(t *testing.T) {
			data := rs.data
			// Offset just after the EOF record: a stream cut there is complete.
			eofEnd := -1
			r := NewReader(bytes.NewReader(data))
			for {
				rec, err := r.Next()
				if err != nil {
					break
				}
				if rec.Kind == KindEOF && rec.Depth == 0 {
					eofEnd = int(rec.Offset) + 1
				}
			}
			cuts := []int{0, 1, 4, 7, 8, 9, 12, 20, 22, 23, 30, 100, 200, 300, eofEnd + 1, eofEnd + 3, eofEnd + 5, eofEnd + 6, len(data) - 1}
			for c := 1; c < len(data); c += 1 + len(data)/300 {
				cuts = append(cuts, c)
			}
			for _, c := range cuts {
				if c < 0 || c >= len(data) {
					continue
				}
				err := decodeErr(data[:c])
				if c == eofEnd {
					if err != nil {
						t.Errorf("cut %d right after EOF: %v", c, err)
					}
					continue
				}
				var e *Error
				if !errors.As(err, &e) {
					t.Errorf("cut %d: error %v (%T) is not *Error", c, err, err)
					continue
				}
				if !errors.Is(err, ErrUnexpectedEOF) {
					t.Errorf("cut %d: error does not wrap ErrUnexpectedEOF: %v", c, err)
				}
				if e.Offset < 0 || e.Offset > int64(c) {
					t.Errorf("cut %d: error offset %d: %v", c, e.Offset, err)
				}
			}
		})
	}
}

// prefix returns header, configuration and a ram START (id 2) with one 1 MiB block "pc.ram".
func prefix() []byte {
	return build(func(w *Writer) {
		w.WriteHeader()
		w.WriteConfiguration(&Configuration{Machine: "pc-q35-7.2"})
		w.WriteSectionHeader(SectionStart, 2, "ram", 0, 4)
		w.WriteMemSize([]RAMBlock{{Name: "pc.ram", UsedLength: 1 << 20}})
		w.WriteEOS()
		w.WriteFooter(2)
	})
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func be64b(v uint64) []byte {
	return []byte{byte(v >> 56), byte(v >> 48), byte(v >> 40), byte(v >> 32), byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}
}

var part2 = []byte{0x02, 0, 0, 0, 2}

func TestCorruptions(t *testing.T) {
	page := make([]byte, 4096)
	named := func(flags uint64, off uint64) []byte {
		return cat(be64b(off|flags), []byte{6}, []byte("pc.ram"))
	}
	tests := []struct {
		name     string
		data     []byte
		want     string
		tooLarge bool
		idstr    string
	}{
		{"bad magic", []byte("QEVX\x00\x00\x00\x03"), "not a migration stream", false, ""},
		{"version 2", []byte("QEVM\x00\x00\x00\x02"), "obsolete", false, ""},
		{"version 4", []byte("QEVM\x00\x00\x00\x04"), "unsupported migration stream version 4", false, ""},
		{"machine name too long", []byte("QEVM\x00\x00\x00\x03\x07\x7f\x00\x00\x00"), "length exceeds limit", true, ""},
		{"unknown config subsection", cat([]byte("QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x01m\x05\x10configuration/xy\x00\x00\x00\x01")), "unknown configuration subsection", false, ""},
		{"hook flag", cat(prefix(), part2, be64b(0x80)), "HOOK", false, "ram"},
		{"full flag", cat(prefix(), part2, be64b(0x01)), "obsolete RAM_SAVE_FLAG_FULL", false, "ram"},
		{"unknown combination", cat(prefix(), part2, be64b(0x0a)), "unknown combination of migration flags: 0xa", false, "ram"},
		{"unknown bit", cat(prefix(), part2, be64b(0x400)), "unknown combination of migration flags: 0x400", false, "ram"},
		{"continue without block", cat(prefix(), part2, be64b(0x28), page), "CONTINUE flag without a previous block", false, "ram"},
		{"empty block name", cat(prefix(), part2, be64b(0x08), []byte{0}), "empty block name", false, "ram"},
		{"unknown block", cat(prefix(), part2, be64b(0x08), []byte{6}, []byte("pc.rom"), page), "can't find block \"pc.rom\"", false, "ram"},
		{"illegal offset", cat(prefix(), part2, named(0x08, 1<<20), page), "illegal RAM offset 0x100000", false, "ram"},
		{"xbzrle too long", cat(prefix(), part2, named(0x40, 0), []byte{1, 0x13, 0x88}), "length exceeds limit", true, "ram"},
		{"xbzrle bad encoding", cat(prefix(), part2, named(0x40, 0), []byte{2, 0, 1}), "wrong XBZRLE encoding flag", false, "ram"},
		{"compressed too long", cat(prefix(), part2, named(0x100, 0), []byte{0, 0, 0x20, 0}), "length exceeds limit", true, "ram"},
		{"footer mismatch", cat(prefix(), part2, be64b(0x10), []byte{0x7e, 0, 0, 0, 3}), "mismatched section id in footer for ram - read 0x3 expected 0x2", false, "ram"},
		{"missing footer", cat(prefix(), part2, be64b(0x10), []byte{0x00}), "missing section footer for ram", false, "ram"},
		{"unknown section type", cat(prefix(), []byte{0x09}), "unknown savevm section type 9", false, ""},
		{"top-level subsection", cat(prefix(), []byte{0x05}), "unknown savevm section type 5", false, ""},
		{"part of unknown id", cat(prefix(), []byte{0x02, 0, 0, 0, 7}), "section id 7 was not started", false, ""},
		{"empty idstr", cat(prefix(), []byte{0x04, 0, 0, 0, 9, 0}), "empty idstr", false, ""},
		{"non-ram START", cat(prefix(), []byte{0x01, 0, 0, 0, 9, 5}, []byte("block"), make([]byte, 8)), "unsupported iterative section \"block\"", false, "block"},
		{"unknown command", cat(prefix(), []byte{0x08, 0, 0x0c, 0, 0}), "MIG_CMD 0xc unknown", false, ""},
		{"command bad length", cat(prefix(), []byte{0x08, 0, 0x02, 0, 2, 0, 0}), "PING received with bad length - expecting 4, got 2", false, ""},
		{"packaged too long", cat(prefix(), []byte{0x08, 0, 0x07, 0, 4, 0x7f, 0, 0, 0}), "length exceeds limit", true, ""},
		{"vmdesc too long", cat(prefix(), []byte{0x00, 0x06, 0x7f, 0, 0, 0}), "length exceeds limit", true, ""},
		{"not vmdesc after EOF", cat(prefix(), []byte{0x00, 0x07}), "expected vmdescription section, but got 7", false, ""},
		{"trailing after vmdesc", cat(prefix(), []byte{0x00, 0x06, 0, 0, 0, 2, '{', '}', 0}), "trailing data after the vmdesc", false, ""},
		{"device without footer", cat(prefix(), []byte{0x04, 0, 0, 0, 9, 3}, []byte("dev"), make([]byte, 8), []byte{1, 2, 3, 0x00}), "cannot find the end of device section \"dev\" id 9", false, "dev"},
		{"mem size exceeds", cat(minimalStream[:len(minimalStream)-1], []byte{0x01, 0, 0, 0, 1, 3}, []byte("ram"), []byte{0, 0, 0, 0, 0, 0, 0, 4}, be64b(0x1000|4), []byte{1, 'a'}, be64b(0x2000)), "exceeds the remaining MEM_SIZE total", false, "ram"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := decodeErr(tt.data)
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("got %v (%T), want *Error", err, err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
			if errors.Is(err, ErrTooLarge) != tt.tooLarge {
				t.Errorf("errors.Is(ErrTooLarge) = %v: %v", !tt.tooLarge, err)
			}
			if e.Offset < 0 || e.Offset > int64(len(tt.data)) {
				t.Errorf("offset %d outside [0, %d]: %v", e.Offset, len(tt.data), err)
			}
			if e.Idstr != tt.idstr {
				t.Errorf("Idstr %q, want %q: %v", e.Idstr, tt.idstr, err)
			}
		})
	}
}

// TestShortInputsAllocateLittle: lengths near the limits announced by a short input must not
// make the reader allocate them.
func TestShortInputsAllocateLittle(t *testing.T) {
	for _, data := range [][]byte{
		cat(prefix(), []byte{0x08, 0, 0x07, 0, 4, 0x03, 0xff, 0xff, 0xff, 1, 2, 3}), // PACKAGED ~64 MiB
		cat(prefix(), []byte{0x00, 0x06, 0x00, 0xff, 0xff, 0xff, '{'}),              // vmdesc ~16 MiB
		cat([]byte("QEVM\x00\x00\x00\x03\x07\x00\x00\x03\xff")),                     // machine name 1023
	} {
		var m0, m1 runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&m0)
		err := decodeErr(data)
		runtime.ReadMemStats(&m1)
		if !errors.Is(err, ErrUnexpectedEOF) {
			t.Errorf("got %v", err)
		}
		if a := m1.TotalAlloc - m0.TotalAlloc; a > 3<<20 {
			t.Errorf("allocated %d bytes for a %d-byte input", a, len(data))
		}
	}
}
