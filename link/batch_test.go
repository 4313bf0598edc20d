package link

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
)

// Page data of the tests: what guest RAM looks like to the link.

var (
	realPagesOnce sync.Once
	realPagesData [][]byte
	realPagesErr  error
)

// realPages are the non-zero 4 KiB pieces of a migration stream QEMU 7.2 made of an idle guest
// (testdata/streams/idle-7.2.bin.gz): firmware, ACPI tables, the guest's code and data as QEMU
// sent them, with the stream's record headers here and there.
func realPages(t testing.TB) [][]byte {
	t.Helper()
	realPagesOnce.Do(func() {
		f, err := os.Open(filepath.Join("..", "testdata", "streams", "idle-7.2.bin.gz"))
		if err != nil {
			realPagesErr = err
			return
		}
		defer f.Close()
		z, err := gzip.NewReader(f)
		if err != nil {
			realPagesErr = err
			return
		}
		b, err := io.ReadAll(io.LimitReader(z, 8<<20))
		if err != nil {
			realPagesErr = err
			return
		}
		zero := make([]byte, PageSize)
		for off := 0; off+PageSize <= len(b); off += PageSize {
			if p := b[off : off+PageSize]; !bytes.Equal(p, zero) {
				realPagesData = append(realPagesData, p)
			}
		}
	})
	if realPagesErr != nil {
		t.Fatalf("the captured stream (a part of the repository): %v", realPagesErr)
	}
	if len(realPagesData) < 64 {
		t.Fatalf("only %d pages in the captured stream", len(realPagesData))
	}
	return realPagesData
}

// textPages are pages of text: this package's sources and spec.
func textPages(t testing.TB) [][]byte {
	t.Helper()
	files, _ := filepath.Glob("*.go")
	files = append(files, "PROTOCOL.md")
	slices.Sort(files)
	var all []byte
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, b...)
	}
	var pages [][]byte
	for off := 0; off+PageSize <= len(all); off += PageSize {
		pages = append(pages, all[off:off+PageSize])
	}
	return pages
}

// randomPages are incompressible pages.
func randomPages(n int, seed uint64) [][]byte {
	r := rand.New(rand.NewPCG(seed, seed))
	pages := make([][]byte, n)
	for i := range pages {
		p := make([]byte, PageSize)
		for j := 0; j < PageSize; j += 8 {
			binary.LittleEndian.PutUint64(p[j:], r.Uint64())
		}
		pages[i] = p
	}
	return pages
}

// xbzrleEncode is QEMU's XBZRLE delta of new against old (migration/xbzrle.c's format: pairs
// of ULEB128 zero-run length and ULEB128 non-zero-run length + bytes; no trailing zero run).
func xbzrleEncode(old, new []byte) []byte {
	var d []byte
	for i := 0; i < len(new); {
		z := i
		for i < len(new) && old[i] == new[i] {
			i++
		}
		if i == len(new) {
			break
		}
		d = binary.AppendUvarint(d, uint64(i-z))
		nz := i
		for i < len(new) && old[i] != new[i] {
			i++
		}
		d = binary.AppendUvarint(d, uint64(i-nz))
		d = append(d, new[nz:i]...)
	}
	return d
}

// xbzrleDeltas are deltas of real pages with a few words changed, as a guest dirties them.
func xbzrleDeltas(t testing.TB, n int) [][]byte {
	pages := realPages(t)
	r := rand.New(rand.NewPCG(7, 7))
	var out [][]byte
	for i := 0; i < n; i++ {
		old := pages[i%len(pages)]
		nw := bytes.Clone(old)
		for range 1 + r.IntN(40) {
			nw[r.IntN(PageSize)] ^= byte(1 + r.IntN(255))
		}
		d := xbzrleEncode(old, nw)
		if len(d) > MaxXBZRLE {
			continue
		}
		out = append(out, d)
	}
	return out
}

// entry is one page record of a test batch.
type entry struct {
	off  uint64
	kind int
	data []byte // a page, or an XBZRLE delta
}

func fill(b *Batch, block uint16, entries []entry) {
	b.Reset(block)
	for _, e := range entries {
		switch e.kind {
		case KindPage:
			b.Page(e.off, e.data)
		case KindZero:
			b.Zero(e.off)
		case KindXBZRLE:
			b.XBZRLE(e.off, e.data)
		}
	}
}

// batchCases are batches of the shapes the sender makes.
func batchCases(t testing.TB) map[string][]entry {
	pages := func(src [][]byte, n int, stride uint64) []entry {
		var es []entry
		for i := 0; i < n; i++ {
			es = append(es, entry{off: uint64(i) * stride, kind: KindPage, data: src[i%len(src)]})
		}
		return es
	}
	zeros := func(n int) []entry {
		var es []entry
		for i := 0; i < n; i++ {
			es = append(es, entry{off: uint64(i) << 12, kind: KindZero})
		}
		return es
	}
	real, text, rnd := realPages(t), textPages(t), randomPages(256, 1)
	var deltas []entry
	for i, d := range xbzrleDeltas(t, 200) {
		deltas = append(deltas, entry{off: uint64(i) << 12, kind: KindXBZRLE, data: d})
	}
	var mixed []entry
	r := rand.New(rand.NewPCG(3, 3))
	for i := 0; i < 300; i++ {
		e := entry{off: uint64(i) << 12}
		switch r.IntN(5) {
		case 0:
			e.kind = KindZero
		case 1:
			e.kind, e.data = KindPage, rnd[i%len(rnd)]
		case 2:
			e.kind, e.data = KindPage, text[i%len(text)]
		case 3:
			e.kind, e.data = KindXBZRLE, deltas[i%len(deltas)].data
		default:
			e.kind, e.data = KindPage, real[i%len(real)]
		}
		mixed = append(mixed, e)
	}
	// The largest batch: 512 entries, 1 MiB of data.
	maxBatch := append(pages(real, MaxBatchData/PageSize, 1<<12), zeros(MaxBatchEntries-MaxBatchData/PageSize)...)
	return map[string][]entry{
		"empty":       nil,
		"one zero":    zeros(1),
		"zero pages":  zeros(MaxBatchEntries),
		"real pages":  pages(real, 200, 1<<12),
		"text pages":  pages(text, 40, 1<<12),
		"random":      pages(rnd, 128, 1<<12),
		"xbzrle":      deltas,
		"empty delta": {{off: 1 << 30, kind: KindXBZRLE, data: nil}, {off: 2 << 30, kind: KindXBZRLE, data: make([]byte, MaxXBZRLE)}},
		"mixed":       mixed[:MaxBatchEntries/2],
		"max":         maxBatch,
		"high offset": {{off: 1<<64 - PageSize, kind: KindPage, data: real[0]}, {off: 1<<64 - 2*PageSize, kind: KindZero}},
	}
}

var allCodecs = []Codec{CodecNone, CodecZstd, CodecS2, CodecLZ4}

// TestPagesRoundTrip: every batch shape, with every codec: Encoder → Framer → Decoder gives the
// entries and data back; incompressible data falls back to none.
func TestPagesRoundTrip(t *testing.T) {
	enc, dec := NewEncoder(), NewDecoder()
	defer dec.Close()
	var b Batch
	for name, entries := range batchCases(t) {
		for _, c := range allCodecs {
			t.Run(fmt.Sprintf("%s/%s", name, c), func(t *testing.T) {
				fill(&b, 3, entries)
				if b.Len() != len(entries) {
					t.Fatalf("Len %d", b.Len())
				}
				frame, used := enc.AppendPages([]byte("prefix"), 42, &b, c)
				frame = frame[len("prefix"):]
				if FrameType(frame[0]) != FramePages || int(binary.BigEndian.Uint32(frame[1:])) != len(frame)-HeaderSize {
					t.Fatalf("header % x for a frame of %d bytes", frame[:HeaderSize], len(frame))
				}
				p := frame[HeaderSize:]
				if Codec(p[10]) != used || int(binary.BigEndian.Uint32(p[17:])) != len(p)-8-pagesHeader {
					t.Fatalf("codec byte %d (used %v), encoded length %d of %d", p[10], used, binary.BigEndian.Uint32(p[17:]), len(p)-8-pagesHeader)
				}
				bodyLen := 8*len(entries) + len(b.Data)
				if used == CodecNone && len(frame)-PagesOverhead != bodyLen {
					t.Fatalf("PagesOverhead %d: a raw frame of %d bytes around a body of %d", PagesOverhead, len(frame), bodyLen)
				}
				switch {
				case c == CodecNone && used != CodecNone:
					t.Fatalf("none became %v", used)
				case used == CodecNone && len(p)-8-pagesHeader != bodyLen:
					t.Fatalf("raw body of %d bytes, want %d", len(p)-8-pagesHeader, bodyLen)
				case used != CodecNone && len(p)-8-pagesHeader >= bodyLen:
					t.Fatalf("%v made %d bytes of %d: it should have fallen back to none", used, len(p)-8-pagesHeader, bodyLen)
				case name == "random" && used != CodecNone:
					t.Fatalf("random pages sent with %v", used)
				case (name == "text pages" || name == "real pages" || name == "zero pages" || name == "max") && used != c:
					t.Fatalf("compressible pages sent with %v, not %v", used, c)
				}
				if len(p) > MaxPayload {
					t.Fatalf("payload of %d bytes", len(p))
				}
				var buf bytes.Buffer
				if err := NewFramer("w", nil, &buf).WriteFrame(FramePages, p); err != nil {
					t.Fatal(err)
				}
				f, err := NewFramer("r", &buf, nil).ReadFrame()
				if err != nil {
					t.Fatal(err)
				}
				pg, err := dec.ParsePages(f.Payload)
				if err != nil {
					t.Fatal(err)
				}
				if pg.Seq != 42 || pg.Block != 3 || pg.Codec != used {
					t.Fatalf("seq %d block %d codec %v", pg.Seq, pg.Block, pg.Codec)
				}
				if !slices.Equal(pg.Entries, b.Entries) || !bytes.Equal(pg.Data, b.Data) {
					t.Fatalf("%d entries and %d data bytes back, want %d and %d", len(pg.Entries), len(pg.Data), len(b.Entries), len(b.Data))
				}
				// The data is each entry's page or (be16 length, delta), in entry order.
				at := 0
				for i, e := range entries {
					if pg.Entries[i]&^kindMask != e.off || int(pg.Entries[i]&kindMask) != e.kind {
						t.Fatalf("entry %d: %#x", i, pg.Entries[i])
					}
					switch e.kind {
					case KindPage:
						if !bytes.Equal(pg.Data[at:at+PageSize], e.data) {
							t.Fatalf("entry %d: page differs", i)
						}
						at += PageSize
					case KindXBZRLE:
						n := int(binary.BigEndian.Uint16(pg.Data[at:]))
						if !bytes.Equal(pg.Data[at+2:at+2+n], e.data) {
							t.Fatalf("entry %d: delta differs", i)
						}
						at += 2 + n
					}
				}
			})
		}
	}
}

// TestEncoderReuse: one Encoder and one Decoder, many frames of every codec in turn (their
// buffers are reused), and frames appended one after another to one buffer.
func TestEncoderReuse(t *testing.T) {
	enc, dec := NewEncoder(), NewDecoder()
	defer dec.Close()
	cases := batchCases(t)
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range cases {
			if !yield(n) {
				return
			}
		}
	})
	var stream []byte
	var batches []Batch
	seq := uint64(0)
	for round := range 3 {
		for i, name := range names {
			var b Batch
			fill(&b, uint16(i), cases[name])
			seq++
			stream, _ = enc.AppendPages(stream, seq, &b, allCodecs[(i+round)%len(allCodecs)])
			batches = append(batches, b)
		}
	}
	fr := NewFramer("r", bytes.NewReader(stream), nil)
	for i, want := range batches {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		pg, err := dec.ParsePages(f.Payload)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if pg.Seq != uint64(i+1) || pg.Block != want.Block || !slices.Equal(pg.Entries, want.Entries) || !bytes.Equal(pg.Data, want.Data) {
			t.Fatalf("frame %d differs", i)
		}
	}
}

func TestBatch(t *testing.T) {
	page := realPages(t)[0]
	var b Batch
	b.Reset(9)
	b.Page(0x1000, page)
	b.Zero(0x2000)
	b.XBZRLE(0x3000, []byte{1, 2, 3})
	if b.Block != 9 || b.Len() != 3 || b.SourceBytes != PageSize+3 || len(b.Data) != PageSize+2+3 {
		t.Fatalf("%d entries, %d source bytes, %d data bytes", b.Len(), b.SourceBytes, len(b.Data))
	}
	want := []uint64{0x1000 | KindPage, 0x2000 | KindZero, 0x3000 | KindXBZRLE}
	if !slices.Equal(b.Entries, want) || !bytes.Equal(b.Data[PageSize:], []byte{0, 3, 1, 2, 3}) {
		t.Fatalf("entries %x, data tail % x", b.Entries, b.Data[PageSize:])
	}
	b.Reset(1)
	if b.Len() != 0 || len(b.Data) != 0 || b.SourceBytes != 0 || b.Block != 1 {
		t.Fatal("Reset left something")
	}
	// Filled until Full, with any kind of entry, a batch stays within what the receiver takes.
	enc, dec := NewEncoder(), NewDecoder()
	defer dec.Close()
	for name, add := range map[string]func(i int){
		"pages":  func(i int) { b.Page(uint64(i)<<12, page) },
		"zeros":  func(i int) { b.Zero(uint64(i) << 12) },
		"deltas": func(i int) { b.XBZRLE(uint64(i)<<12, make([]byte, MaxXBZRLE)) },
		"mixed": func(i int) {
			switch i % 3 {
			case 0:
				b.Page(uint64(i)<<12, page)
			case 1:
				b.Zero(uint64(i) << 12)
			default:
				b.XBZRLE(uint64(i)<<12, page[:i%MaxXBZRLE])
			}
		},
	} {
		b.Reset(0)
		for i := 0; !b.Full(); i++ {
			add(i)
		}
		if b.Len() > MaxBatchEntries || len(b.Data) > MaxBatchData {
			t.Errorf("%s: a full batch has %d entries and %d data bytes", name, b.Len(), len(b.Data))
		}
		frame, _ := enc.AppendPages(nil, 1, &b, CodecNone)
		if _, err := dec.ParsePages(frame[HeaderSize:]); err != nil {
			t.Errorf("%s: a full batch is refused: %v", name, err)
		}
	}
}

// pagesPayload builds a PAGES payload field by field (PROTOCOL.md §2.2).
func pagesPayload(seq uint64, block uint16, codec Codec, count uint16, dataLen, encLen uint32, enc []byte) []byte {
	return payload(seq, block, uint8(codec), count, dataLen, encLen, enc)
}

// rawBody is the uncompressed body of a batch: entries (be64) then data.
func rawBody(entries []uint64, data []byte) []byte {
	var b []byte
	for _, e := range entries {
		b = binary.BigEndian.AppendUint64(b, e)
	}
	return append(b, data...)
}

// framed is a PAGES payload for a body encoded with c, whose header claims count entries and
// dataLen data bytes.
func framed(c Codec, count, dataLen int, enc []byte) []byte {
	return pagesPayload(7, 0, c, uint16(count), uint32(dataLen), uint32(len(enc)), enc)
}

func zstdOf(t testing.TB, b []byte) []byte {
	z, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer z.Close()
	return z.EncodeAll(b, nil)
}

func lz4Of(t testing.TB, b []byte) []byte {
	out := make([]byte, lz4.CompressBlockBound(len(b)))
	n, err := lz4.CompressBlock(b, out, nil)
	if err != nil || n == 0 {
		t.Fatalf("lz4 of %d bytes: %d, %v", len(b), n, err)
	}
	return out[:n]
}

// s2Literal is an s2 block whose header says n bytes and whose one literal holds lit.
func s2Literal(n int, lit []byte) []byte {
	b := binary.AppendUvarint(nil, uint64(n))
	// A literal of up to 60 bytes: tag (length-1)<<2; longer: tag 60<<2, then length-1 in one byte.
	if len(lit) <= 60 {
		b = append(b, byte(len(lit)-1)<<2)
	} else {
		b = append(b, 60<<2, byte(len(lit)-1))
	}
	return append(b, lit...)
}

type refusal struct {
	name string
	p    []byte
	want string
}

// pagesRefusals are PAGES payloads the Decoder must refuse, each with what its error says.
func pagesRefusals(t testing.TB) []refusal {
	page := realPages(t)[1]
	one := rawBody([]uint64{0x1000 | KindPage}, page) // 1 entry, 4096 data: 4104 bytes
	small := rawBody([]uint64{KindZero, 0x1000 | KindZero}, nil)
	many := rawBody(make([]uint64, MaxBatchEntries+1), nil)
	for i := range MaxBatchEntries + 1 {
		binary.BigEndian.PutUint64(many[8*i:], uint64(i)<<12|KindZero)
	}
	xb := func(entries []uint64, data []byte) []byte {
		return framed(CodecNone, len(entries), len(data), rawBody(entries, data))
	}
	kind := func(k uint64) []byte { return xb([]uint64{0x5000 | k}, nil) }
	return []refusal{
		{"short header", payload(uint64(7), uint16(0), uint8(0), uint16(0), uint32(0)), "PAGES: encoded length at payload offset 17"},
		{"no seq", []byte{1, 2, 3}, "PAGES: sequence number"},
		{"513 entries", framed(CodecNone, MaxBatchEntries+1, 0, many), "513 entries (at most 512)"},
		{"65535 entries", pagesPayload(7, 0, CodecNone, 0xffff, 0, 0, nil), "65535 entries (at most 512)"},
		{"data over 1 MiB", pagesPayload(7, 0, CodecNone, 0, MaxBatchData+1, 0, nil), "1048577 data bytes (at most 1048576)"},
		{"data 4 GiB", pagesPayload(7, 0, CodecZstd, 1, 0xffffffff, 0, nil), "4294967295 data bytes"},
		{"encoded length short", pagesPayload(7, 0, CodecNone, 1, PageSize, uint32(len(one)-1), one), "encoded length 4103, but 4104 bytes follow"},
		{"encoded length long", pagesPayload(7, 0, CodecNone, 1, PageSize, uint32(len(one)+1), one), "encoded length 4105, but 4104 bytes follow"},
		{"encoded length 4 GiB", pagesPayload(7, 0, CodecNone, 1, PageSize, 0xffffffff, one), "encoded length 4294967295"},
		{"codec 4", framed(Codec(4), 1, PageSize, one), "codec Codec(4) was not offered"},
		{"codec 255", framed(Codec(255), 1, PageSize, one), "codec Codec(255) was not offered"},
		{"raw body short", framed(CodecNone, 1, PageSize, one[:len(one)-1]), "raw body of 4103 bytes, want 4104"},
		{"raw body long", framed(CodecNone, 1, PageSize, append(bytes.Clone(one), 0)), "raw body of 4105 bytes, want 4104"},
		{"zstd decodes longer", framed(CodecZstd, 1, PageSize, zstdOf(t, append(bytes.Clone(one), 0))), "zstd body of 4105 bytes, want 4104"},
		{"zstd decodes shorter", framed(CodecZstd, 1, PageSize, zstdOf(t, one[:len(one)-1])), "zstd body of 4103 bytes, want 4104"},
		{"zstd decodes to nothing", framed(CodecZstd, 1, PageSize, nil), "zstd body of 0 bytes, want 4104"},
		{"zstd 64 MiB", framed(CodecZstd, 1, PageSize, zstdOf(t, make([]byte, 64<<20))), "zstd:"},
		{"zstd garbage", framed(CodecZstd, 1, PageSize, []byte("not a zstd frame at all")), "zstd:"},
		{"zstd truncated", framed(CodecZstd, 1, PageSize, zstdOf(t, one)[:20]), "zstd:"},
		{"s2 decodes longer", framed(CodecS2, 1, PageSize, s2.Encode(nil, append(bytes.Clone(one), 0))), "s2 body of 4105 bytes (<nil>), want 4104"},
		{"s2 decodes shorter", framed(CodecS2, 1, PageSize, s2.Encode(nil, one[:len(one)-1])), "s2 body of 4103 bytes (<nil>), want 4104"},
		{"s2 header long, data short", framed(CodecS2, 2, 0, s2Literal(16, small[:8])), "s2: s2: corrupt input"},
		{"s2 header short, data long", framed(CodecS2, 1, 0, s2Literal(8, small)), "s2: s2: corrupt input"},
		{"s2 4 GiB", framed(CodecS2, 1, PageSize, binary.AppendUvarint(nil, 1<<32)), "s2 body of"},
		{"s2 garbage", framed(CodecS2, 1, PageSize, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}), "s2 body of"},
		{"lz4 decodes longer", framed(CodecLZ4, 1, PageSize, lz4Of(t, append(bytes.Clone(one), page...))), "lz4 body of"},
		{"lz4 decodes shorter", framed(CodecLZ4, 1, PageSize, lz4Of(t, one[:len(one)-1])), "lz4 body of 4103 bytes (<nil>), want 4104"},
		{"lz4 garbage", framed(CodecLZ4, 1, PageSize, []byte{0xf0, 0xff, 0xff, 0xff, 0x10}), "lz4 body of"},
		{"lz4 empty", framed(CodecLZ4, 1, PageSize, nil), "lz4 body of"},
		{"pages past the data", xb([]uint64{0x1000 | KindPage, 0x2000 | KindPage}, page), "entry 1: data ends at 8192, past the 4096 data bytes"},
		{"data the entries do not use", xb([]uint64{0x1000 | KindPage}, append(bytes.Clone(page), page...)), "8192 data bytes, the entries use 4096"},
		{"zero page with data", xb([]uint64{0x1000 | KindZero}, []byte{0}), "1 data bytes, the entries use 0"},
		{"page with a short page", xb([]uint64{0x1000 | KindPage}, page[:4095]), "entry 0: data ends at 4096, past the 4095 data bytes"},
		{"kind 0", kind(0), "entry 0: kind 0x000"},
		{"kind MEM_SIZE", kind(0x004), "entry 0: kind 0x004"},
		{"kind page|zero", kind(KindPage | KindZero), "entry 0: kind 0x00a"},
		{"kind CONTINUE", kind(0x020), "entry 0: kind 0x020"},
		{"kind page|CONTINUE", kind(KindPage | 0x020), "entry 0: kind 0x028"},
		{"kind EOS", kind(0x010), "entry 0: kind 0x010"},
		{"kind 0xfff", kind(0xfff), "entry 0: kind 0xfff"},
		{"XBZRLE without length", xb([]uint64{KindXBZRLE}, []byte{0}), "entry 0: XBZRLE length past the data"},
		{"XBZRLE no data", xb([]uint64{KindZero, KindXBZRLE}, nil), "entry 1: XBZRLE length past the data"},
		{"XBZRLE past the data", xb([]uint64{KindXBZRLE}, append([]byte{0, 100}, make([]byte, 50)...)), "entry 0: data ends at 102, past the 52 data bytes"},
		{"XBZRLE over a page", xb([]uint64{KindXBZRLE}, append([]byte{0x10, 0x01}, make([]byte, 4097)...)), "entry 0: XBZRLE delta of 4097 bytes"},
		{"XBZRLE 65535", xb([]uint64{KindXBZRLE}, []byte{0xff, 0xff}), "entry 0: XBZRLE delta of 65535 bytes"},
		{"second XBZRLE past", xb([]uint64{KindXBZRLE, KindXBZRLE}, []byte{0, 1, 9, 0, 3, 1}), "entry 1: data ends at 8, past the 6 data bytes"},
	}
}

func TestPagesRefusals(t *testing.T) {
	dec := NewDecoder()
	defer dec.Close()
	for _, tc := range pagesRefusals(t) {
		t.Run(tc.name, func(t *testing.T) {
			pg, err := dec.ParsePages(tc.p)
			if err == nil {
				t.Fatalf("accepted: %d entries, %d data bytes", len(pg.Entries), len(pg.Data))
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%q, want …%s…", err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "PAGES") {
				t.Errorf("%q does not name the frame", err)
			}
		})
	}
}

// TestDecoderCodecs: a Decoder decodes none and the codecs it was made for, nothing else.
func TestDecoderCodecs(t *testing.T) {
	enc := NewEncoder()
	var b Batch
	fill(&b, 0, batchCases(t)["text pages"])
	frames := map[Codec][]byte{}
	for _, c := range allCodecs {
		f, used := enc.AppendPages(nil, 1, &b, c)
		if used != c {
			t.Fatalf("%v: used %v", c, used)
		}
		frames[c] = f[HeaderSize:]
	}
	for _, offered := range [][]Codec{nil, {CodecZstd}, {CodecS2}, {CodecLZ4}, {CodecS2, CodecLZ4}, {CodecNone}} {
		dec := NewDecoder(offered...)
		for _, c := range allCodecs {
			ok := c == CodecNone || len(offered) == 0 || slices.Contains(offered, c)
			_, err := dec.ParsePages(frames[c])
			if ok && err != nil {
				t.Errorf("offered %v: %v refused: %v", offered, c, err)
			}
			if !ok && (err == nil || !strings.Contains(err.Error(), "codec "+c.String()+" was not offered")) {
				t.Errorf("offered %v: %v: %v", offered, c, err)
			}
		}
		dec.Close()
	}
}

// decodeBound is the most a ParsePages may allocate: the body the header announces at its
// largest (PROTOCOL.md §3), plus room for the decoders' own small state.
const decodeBound = MaxBatchData + 8*MaxBatchEntries + 128<<10

// TestDecoderMemory: no input, refused or not, makes a warmed-up Decoder allocate more than one
// largest batch; a refused header allocates nothing of the sizes it announces.
func TestDecoderMemory(t *testing.T) {
	dec := NewDecoder()
	defer dec.Close()
	enc := NewEncoder()
	var b Batch
	fill(&b, 0, batchCases(t)["max"])
	inputs := map[string][]byte{}
	for _, c := range allCodecs {
		f, _ := enc.AppendPages(nil, 1, &b, c)
		inputs["max/"+c.String()] = f[HeaderSize:]
		if _, err := dec.ParsePages(f[HeaderSize:]); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range pagesRefusals(t) {
		inputs[r.name] = r.p
	}
	var most uint64
	var mostName string
	for name, p := range inputs {
		n := allocated(5, func() { dec.ParsePages(p) })
		if n > decodeBound {
			t.Errorf("%s: %d bytes allocated per call", name, n)
		}
		if n > most {
			most, mostName = n, name
		}
	}
	t.Logf("most allocated by one call: %d bytes (%s)", most, mostName)
	// A fresh Decoder given headers that announce the largest sizes, with no body to match.
	for name, p := range map[string][]byte{
		"4 GiB data":    pagesPayload(7, 0, CodecZstd, 0xffff, 0xffffffff, 0xffffffff, nil),
		"65535 entries": pagesPayload(7, 0, CodecLZ4, 0xffff, 0, 3, []byte{1, 2, 3}),
		"encoded 4 GiB": pagesPayload(7, 0, CodecS2, 1, 0, 0xffffffff, nil),
	} {
		if n := allocated(5, func() { dec.ParsePages(p) }); n > 4096 {
			t.Errorf("%s: %d bytes allocated to refuse a header", name, n)
		}
	}
}

func TestCodecNames(t *testing.T) {
	if got := CodecNames(); !slices.Equal(got, []string{"none", "zstd", "s2", "lz4"}) {
		t.Fatalf("CodecNames() = %q", got)
	}
	CodecNames()[0] = "changed"
	if CodecNames()[0] != "none" {
		t.Fatal("CodecNames shares its slice")
	}
	for i, name := range CodecNames() {
		c, err := ParseCodec(name)
		if err != nil || c != Codec(i) || c.String() != name {
			t.Errorf("%q: %v %v", name, c, err)
		}
	}
	for _, bad := range []string{"", "auto", "ZSTD", "gzip"} {
		if _, err := ParseCodec(bad); err == nil || !strings.Contains(err.Error(), "none, zstd, s2, lz4") {
			t.Errorf("ParseCodec(%q): %v", bad, err)
		}
	}
}

func TestChooser(t *testing.T) {
	auto, err := NewChooser("auto")
	if err != nil {
		t.Fatal(err)
	}
	def, err := NewChooser("")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		busy float64
		want Codec
	}{{0, CodecNone}, {0.1, CodecNone}, {0.125, CodecS2}, {0.3, CodecS2}, {0.5, CodecZstd}, {1, CodecZstd}} {
		if got := auto.Pick(tc.busy); got != tc.want {
			t.Errorf("auto.Pick(%v) = %v, want %v", tc.busy, got, tc.want)
		}
		if got := def.Pick(tc.busy); got != tc.want {
			t.Errorf(`"".Pick(%v) = %v, want %v`, tc.busy, got, tc.want)
		}
	}
	for _, name := range CodecNames() {
		c, err := NewChooser(name)
		if err != nil {
			t.Fatal(err)
		}
		for _, busy := range []float64{0, 0.2, 1} {
			if got := c.Pick(busy); got.String() != name {
				t.Errorf("%s.Pick(%v) = %v", name, busy, got)
			}
		}
	}
	// The strong codec follows the measured ratios: zstd only where it pays against s2.
	for _, tc := range []struct {
		name     string
		zstd, s2 float64
		want     Codec
	}{{"like s2", 0.50, 0.51, CodecS2}, {"much better", 0.42, 0.54, CodecZstd}} {
		c, _ := NewChooser("auto")
		picks := map[Codec]int{}
		for i := 0; i < 160; i++ {
			got := c.Pick(1)
			picks[got]++
			r := map[Codec]float64{CodecZstd: tc.zstd, CodecS2: tc.s2}[got]
			c.Observe(got, 100000, int(r*100000))
		}
		if picks[tc.want] < 140 {
			t.Errorf("%s: picks %v, want mostly %v", tc.name, picks, tc.want)
		}
		other := map[Codec]Codec{CodecS2: CodecZstd, CodecZstd: CodecS2}[tc.want]
		if picks[other] == 0 {
			t.Errorf("%s: %v never sampled (%v)", tc.name, other, picks)
		}
	}
	if _, err := NewChooser("gzip"); err == nil || !strings.Contains(err.Error(), "--compress") || !strings.Contains(err.Error(), "auto") {
		t.Errorf("NewChooser(gzip): %v", err)
	}
}

// BenchmarkPages encodes and decodes batches of each kind of page data with each codec; the
// "ratio" metric is the frame's size over the raw batch's (go test -run x -bench Pages ./link/).
func BenchmarkPages(b *testing.B) {
	cases := batchCases(b)
	for _, name := range []string{"real pages", "text pages", "mixed", "random", "xbzrle", "max"} {
		for _, c := range allCodecs {
			b.Run(strings.ReplaceAll(name, " ", "-")+"/"+c.String(), func(b *testing.B) {
				enc, dec := NewEncoder(), NewDecoder()
				defer dec.Close()
				var batch Batch
				fill(&batch, 0, cases[name])
				raw := 8*batch.Len() + len(batch.Data)
				var frame []byte
				b.SetBytes(int64(raw))
				b.ResetTimer()
				for range b.N {
					frame, _ = enc.AppendPages(frame[:0], 1, &batch, c)
					if _, err := dec.ParsePages(frame[HeaderSize:]); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(len(frame))/float64(raw), "ratio")
			})
		}
	}
}
