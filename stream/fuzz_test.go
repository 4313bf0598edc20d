package stream

import (
	"bytes"
	"errors"
	"io"
	"runtime"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// minimalStream is the 22-byte stream QEMU accepts as a complete migration (stream-format.md §2).
var minimalStream = []byte("QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0apc-q35-7.2\x00")

// fuzzLimits keeps the fuzzer's allocations small.
var fuzzLimits = Limits{
	MachineName: 256, Capabilities: 16, VMDesc: 1 << 16, Packaged: 1 << 16, Tail: 1 << 18,
	RAMBlocks: 64, PackageDepth: 3, Sections: 256,
}

func FuzzReader(f *testing.F) {
	f.Add(minimalStream)
	for _, name := range []string{"idle-7.2", "idle-10.0"} {
		b := streamtest.Load(f, name)
		f.Add(b[:min(len(b), 600)]) // header, config, START with MEM_SIZE, first records
	}
	for _, s := range syntheticStreams() {
		f.Add(s.data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var ms0, ms1 runtime.MemStats
		runtime.ReadMemStats(&ms0)
		var out bytes.Buffer
		r := NewReader(bytes.NewReader(data), WithLimits(fuzzLimits), WithBufferSize(1<<16))
		w := NewWriter(&out, WithMappedRAMFill(func(off int64, dst []byte) {
			if off >= 0 && off < int64(len(data)) {
				copy(dst, data[off:])
			}
		}))
		var err error
		for {
			var rec *Record
			rec, err = r.Next()
			if err != nil {
				break
			}
			if werr := w.WriteRecord(rec); werr != nil {
				t.Fatalf("WriteRecord(%v at %d) refused a decoded record: %v", rec.Kind, rec.Offset, werr)
			}
		}
		runtime.ReadMemStats(&ms1)
		if alloc := ms1.TotalAlloc - ms0.TotalAlloc; alloc > 4<<20+8*uint64(len(data)) {
			t.Fatalf("allocated %d bytes for a %d-byte input", alloc, len(data))
		}
		if err != io.EOF {
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error is not *Error: %T %v", err, err)
			}
			if e.Offset < 0 || e.Offset > int64(len(data)) {
				t.Fatalf("error offset %d outside input of %d bytes: %v", e.Offset, len(data), err)
			}
			return
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), data) {
			t.Fatalf("re-encoded stream differs:\n in  %x\n out %x", data, out.Bytes())
		}
	})
}

// FuzzXBZRLE checks that XBZRLEDecode never panics or writes outside the page, and that
// XBZRLEEncode output decodes back to the new page.
func FuzzXBZRLE(f *testing.F) {
	f.Add([]byte{0, 3, 1, 2, 3, 10, 1, 9}, []byte("old page"), []byte("new page"))
	f.Fuzz(func(t *testing.T, delta, old, newp []byte) {
		page := make([]byte, 4096)
		copy(page, old)
		guard := make([]byte, 4096+64)
		copy(guard, page)
		if err := XBZRLEDecode(guard[:4096], delta); err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Offset < 0 || e.Offset > int64(len(delta)) {
				t.Fatalf("bad error %v", err)
			}
		}
		for _, b := range guard[4096:] {
			if b != 0 {
				t.Fatal("wrote past the page")
			}
		}
		n2 := append([]byte(nil), page...)
		copy(n2, newp)
		dst := make([]byte, 4096)
		if n, ok := XBZRLEEncode(page, n2, dst); ok {
			if err := XBZRLEDecode(page, dst[:n]); err != nil || !bytes.Equal(page, n2) {
				t.Fatalf("encode/decode mismatch: %v", err)
			}
		}
	})
}

// FuzzInflate checks that Inflate never returns more than the buffer and never panics.
func FuzzInflate(f *testing.F) {
	f.Add(zlibPage(bytes.Repeat([]byte{7}, 4096)))
	f.Add(zlibPage(bytes.Repeat([]byte{7}, 5000)))
	f.Fuzz(func(t *testing.T, src []byte) {
		dst := make([]byte, 4096)
		var in Inflater
		n, err := in.Inflate(dst, src)
		if err == nil && (n < 0 || n > len(dst)) {
			t.Fatalf("n=%d", n)
		}
	})
}
