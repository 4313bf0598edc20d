package stream

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestWriterRefuses(t *testing.T) {
	page := make([]byte, 4096)
	long := strings.Repeat("x", 256)
	for _, tc := range []struct {
		name string
		fn   func(w *Writer) error
	}{
		{"long idstr", func(w *Writer) error { return w.WriteSectionHeader(SectionFull, 1, long, 0, 1) }},
		{"empty idstr", func(w *Writer) error { return w.WriteSectionHeader(SectionStart, 1, "", 0, 1) }},
		{"bad section type", func(w *Writer) error { return w.WriteSectionHeader(SectionEOF, 1, "x", 0, 1) }},
		{"long block", func(w *Writer) error { return w.WriteRAMPage(RAMPage, 0, long, page) }},
		{"short page", func(w *Writer) error { return w.WriteRAMPage(RAMPage, 0, "b", page[:100]) }},
		{"unaligned", func(w *Writer) error { return w.WriteRAMPage(RAMPage, 100, "b", page) }},
		{"continue first", func(w *Writer) error { return w.WriteRAMPage(RAMPage|RAMContinue, 0, "b", page) }},
		{"continue other block", func(w *Writer) error {
			w.WriteZero(RAMZero, 0, "a", 0)
			return w.WriteZero(RAMZero|RAMContinue, 0, "b", 0)
		}},
		{"page flags", func(w *Writer) error { return w.WriteRAMPage(RAMZero, 0, "b", page) }},
		{"unknown command", func(w *Writer) error { return w.WriteCommand(12, nil) }},
		{"ping length", func(w *Writer) error { return w.WriteCommand(CmdPing, nil) }},
		{"packaged via WriteCommand", func(w *Writer) error { return w.WriteCommand(CmdPackaged, []byte{0, 0, 0, 0}) }},
		{"flush in package", func(w *Writer) error { w.BeginPackage(); return w.Flush() }},
		{"end without begin", func(w *Writer) error { return w.EndPackage() }},
		{"xbzrle too long", func(w *Writer) error { return w.WriteXBZRLE(RAMXBZRLE, 0, "b", make([]byte, 70000)) }},
		{"zero-length block", func(w *Writer) error { return w.WriteMemSize([]RAMBlock{{Name: "b"}}) }},
	} {
		w := NewWriter(io.Discard)
		if err := tc.fn(w); !errors.Is(err, ErrEncode) {
			t.Errorf("%s: got %v, want ErrEncode", tc.name, err)
		}
	}
}

func TestWriterContinueHelper(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	page := make([]byte, 4096)
	w.WritePage(0, "a", page)
	w.WritePage(0x1000, "a", page)
	w.WritePage(0, "b", page)
	w.ResetContinue()
	w.WritePage(0x1000, "b", page)
	w.Flush()
	b := buf.Bytes()
	rec := 8 + 2 + 4096
	if len(b) != 3*rec+rec-2 {
		t.Fatalf("length %d", len(b))
	}
	if b[rec+7] != byte(RAMPage|RAMContinue) || b[2*rec-2+7] != byte(RAMPage) || b[3*rec-2+7] != byte(RAMPage) {
		t.Fatal("CONTINUE decided wrongly")
	}
}

// TestForcedCapabilities decodes an x-ignore-shared block list whose configuration does not
// list the capability.
func TestForcedCapabilities(t *testing.T) {
	data := build(func(w *Writer) {
		w.WriteHeader()
		w.WriteConfiguration(&Configuration{Machine: "m"})
		w.WriteSectionHeader(SectionStart, 1, "ram", 0, 4)
		w.WriteMemSize([]RAMBlock{{Name: "pc.ram", UsedLength: 0x1000, HasGPA: true, GPA: 0x1234000}})
		w.WriteEOS()
		w.WriteFooter(1)
		w.WriteEOF()
	})
	if err := decodeErr(data); err == nil {
		t.Fatal("decoded without the capability")
	}
	s, err := decodeAll(t, data, WithCapabilities(CapXIgnoreShared))
	if err != nil || !bytes.Equal(s.reencoded, data) {
		t.Fatalf("%v", err)
	}
}
