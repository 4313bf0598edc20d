package stream

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

const benchRAM = 256 << 20

var (
	benchOnce   sync.Once
	benchStream []byte
)

// pageHeavyStream builds in memory a stream carrying benchRAM bytes of pages: the header and
// configuration of idle72.bin when present (else synthetic), a ram START with MEM_SIZE, PART
// sections of 1024 PAGE records each (CONTINUE after the first), EOS, END, EOF.
func pageHeavyStream(tb testing.TB) []byte {
	benchOnce.Do(func() {
		var buf bytes.Buffer
		buf.Grow(benchRAM + benchRAM/256)
		w := NewWriter(&buf)
		if b, err := streamtest.ReadFile(filepath.Join(streamtest.Dir(), "idle-7.2.bin.gz")); err == nil && len(b) > 0x17 {
			w.WriteRaw(b[:0x17]) // header + configuration of a real QEMU 7.2 stream
		} else {
			w.WriteHeader()
			w.WriteConfiguration(&Configuration{Machine: "pc-q35-7.2"})
		}
		const id = 2
		w.WriteSectionHeader(SectionStart, id, "ram", 0, 4)
		w.WriteMemSize([]RAMBlock{{Name: "pc.ram", UsedLength: benchRAM}})
		w.WriteEOS()
		w.WriteFooter(id)
		page := make([]byte, 4096)
		for i := range page {
			page[i] = byte(i * 7)
		}
		for off := uint64(0); off < benchRAM; {
			w.WriteSectionHeader(SectionPart, id, "", 0, 0)
			for range 1024 {
				page[0] = byte(off >> 12)
				if err := w.WritePage(off, "pc.ram", page); err != nil {
					panic(err)
				}
				off += 4096
			}
			w.WriteEOS()
			w.WriteFooter(id)
		}
		w.WriteSectionHeader(SectionEnd, id, "", 0, 0)
		w.WriteEOS()
		w.WriteFooter(id)
		w.WriteEOF()
		if err := w.Flush(); err != nil {
			panic(err)
		}
		benchStream = buf.Bytes()
	})
	return benchStream
}

func BenchmarkDecode(b *testing.B) {
	data := pageHeavyStream(b)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	br := bytes.NewReader(data)
	b.ResetTimer()
	for b.Loop() {
		br.Reset(data)
		r := NewReader(br)
		pages := 0
		for {
			rec, err := r.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
			if rec.Kind == KindRAM && rec.RAM.Flags&RAMPage != 0 {
				pages++
			}
		}
		if pages != benchRAM/4096 {
			b.Fatalf("%d pages", pages)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(benchRAM/4096), "ns/page")
}

func BenchmarkDecodeEncode(b *testing.B) {
	data := pageHeavyStream(b)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	br := bytes.NewReader(data)
	b.ResetTimer()
	for b.Loop() {
		br.Reset(data)
		r := NewReader(br)
		w := NewWriter(io.Discard)
		for {
			rec, err := r.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
			if err := w.WriteRecord(rec); err != nil {
				b.Fatal(err)
			}
		}
		if err := w.Flush(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(benchRAM/4096), "ns/page")
}

// benchFile writes the page-heavy stream to a file once, for the benchmarks that read a file.
func benchFile(b *testing.B) string {
	path := filepath.Join(os.TempDir(), "qemu-migrate-go-bench.stream")
	data := pageHeavyStream(b)
	if st, err := os.Stat(path); err != nil || st.Size() != int64(len(data)) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			b.Fatal(err)
		}
	}
	return path
}

// BenchmarkDecodeFile decodes the stream from a file (read syscalls included), the case to
// compare with BenchmarkCat on the same file.
func BenchmarkDecodeFile(b *testing.B) {
	path := benchFile(b)
	st, _ := os.Stat(path)
	b.SetBytes(st.Size())
	b.ReportAllocs()
	for b.Loop() {
		f, err := os.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		r := NewReader(f)
		for {
			if _, err := r.Next(); err == io.EOF {
				break
			} else if err != nil {
				b.Fatal(err)
			}
		}
		f.Close()
	}
}

// BenchmarkCat runs cat(1) on the same file into /dev/null: the floor for reading it at all.
func BenchmarkCat(b *testing.B) {
	path := benchFile(b)
	st, _ := os.Stat(path)
	b.SetBytes(st.Size())
	for b.Loop() {
		cmd := exec.Command("cat", path)
		devnull, _ := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		cmd.Stdout = devnull
		if err := cmd.Run(); err != nil {
			b.Fatal(err)
		}
		devnull.Close()
	}
}

// TestNoAllocsPerPage checks that decoding and re-encoding a page record allocates nothing.
func TestNoAllocsPerPage(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	w.WriteHeader()
	w.WriteConfiguration(&Configuration{Machine: "m"})
	w.WriteSectionHeader(SectionStart, 1, "ram", 0, 4)
	w.WriteMemSize([]RAMBlock{{Name: "pc.ram", UsedLength: 1 << 30}})
	w.WriteEOS()
	w.WriteFooter(1)
	w.WriteSectionHeader(SectionPart, 1, "", 0, 0)
	page := make([]byte, 4096)
	const n = 2000
	for i := range n {
		w.WritePage(uint64(i)*4096, "pc.ram", page)
		if i%3 == 0 {
			w.WriteZero(RAMZero, uint64(i)*4096, "pc.ram", 0) // named each time
		}
	}
	w.Flush()
	r := NewReader(bytes.NewReader(buf.Bytes()))
	for range 6 { // header, config, START, MEM_SIZE, EOS, footer, PART
		if _, err := r.Next(); err != nil {
			t.Fatal(err)
		}
	}
	out := NewWriter(io.Discard)
	allocs := testing.AllocsPerRun(n, func() {
		rec, err := r.Next()
		if err != nil {
			t.Fatal(err)
		}
		if err := out.WriteRecord(rec); err != nil && rec.Kind == KindRAM {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per record", allocs)
	}
}
