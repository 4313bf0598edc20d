package link

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
)

// PAGES frames (PROTOCOL.md §2.2, §3): a batch of page records of one RAM block, compressed as a
// whole.

// PageSize is the target page size of the pages a batch carries (x86: 4 KiB).
const PageSize = 4096

// Entry kinds, in the low 12 bits of an entry (the values of the RAM record flags,
// stream-format.md §4).
const (
	KindZero   = 0x002
	KindPage   = 0x008
	KindXBZRLE = 0x040
	kindMask   = PageSize - 1
)

// Batch limits (PROTOCOL.md §3).
const (
	MaxBatchEntries = 512
	MaxBatchData    = 1 << 20
	// MaxXBZRLE is the longest XBZRLE delta an entry may carry (QEMU: at most one page).
	MaxXBZRLE = PageSize
)

// Codec is the encoding of a PAGES frame's body (PROTOCOL.md §3).
type Codec uint8

const (
	CodecNone Codec = 0
	CodecZstd Codec = 1
	CodecS2   Codec = 2
	CodecLZ4  Codec = 3
)

var codecNames = [...]string{CodecNone: "none", CodecZstd: "zstd", CodecS2: "s2", CodecLZ4: "lz4"}

func (c Codec) String() string {
	if int(c) < len(codecNames) {
		return codecNames[c]
	}
	return fmt.Sprintf("Codec(%d)", uint8(c))
}

// ParseCodec reads a codec name.
func ParseCodec(name string) (Codec, error) {
	for i, n := range codecNames {
		if n == name {
			return Codec(i), nil
		}
	}
	return 0, fmt.Errorf("unknown codec %q (want %s)", name, strings.Join(codecNames[:], ", "))
}

// CodecNames are the names of every codec this side decodes, for HELLO and WELCOME.
func CodecNames() []string { return append([]string(nil), codecNames[:]...) }

// Batch collects the page records of one block for a PAGES frame. The zero value is empty;
// Reset starts a batch for a block.
type Batch struct {
	Block   uint16
	Entries []uint64 // offset | kind
	Data    []byte   // page bytes and (be16 length, delta) of XBZRLE entries, in entry order
	// SourceBytes counts what the entries stood for in the source's stream (a page 4096, a zero
	// page 0): the ratio of frame bytes to it is what the link costs per source byte.
	SourceBytes int
}

// Reset empties the batch and sets its block.
func (b *Batch) Reset(block uint16) {
	b.Block, b.Entries, b.Data, b.SourceBytes = block, b.Entries[:0], b.Data[:0], 0
}

// Len is the number of entries.
func (b *Batch) Len() int { return len(b.Entries) }

// Full reports whether one more page would not fit.
func (b *Batch) Full() bool {
	return len(b.Entries) >= MaxBatchEntries || len(b.Data)+2+PageSize > MaxBatchData
}

// Page adds a full page (len(data) == PageSize).
func (b *Batch) Page(off uint64, data []byte) {
	b.Entries = append(b.Entries, off|KindPage)
	b.Data = append(b.Data, data...)
	b.SourceBytes += PageSize
}

// Zero adds a zero page.
func (b *Batch) Zero(off uint64) { b.Entries = append(b.Entries, off|KindZero) }

// XBZRLE adds an XBZRLE delta (at most MaxXBZRLE bytes).
func (b *Batch) XBZRLE(off uint64, delta []byte) {
	b.Entries = append(b.Entries, off|KindXBZRLE)
	b.Data = binary.BigEndian.AppendUint16(b.Data, uint16(len(delta)))
	b.Data = append(b.Data, delta...)
	b.SourceBytes += len(delta)
}

// pagesHeader is the fixed part of a PAGES payload after the sequence number.
const pagesHeader = 2 + 1 + 2 + 4 + 4

// Encoder encodes PAGES frames. It is used by one goroutine at a time; give each worker its own.
type Encoder struct {
	zstd *zstd.Encoder
	lz4  lz4.Compressor
	body []byte
}

// batchWindow is the zstd window of a PAGES body: each body is compressed on its own, and the
// sender's batches are 256 KiB (postcopy's smaller), so a longer window finds nothing more and
// only costs each encoder its history buffer. Receivers accept windows up to MaxBatchData.
const batchWindow = 256 << 10

// NewEncoder returns an Encoder. zstd runs at its fastest level with a single goroutine and a
// window of batchWindow: the link's workers are the parallelism.
func NewEncoder() *Encoder {
	z, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1),
		zstd.WithLowerEncoderMem(true), zstd.WithWindowSize(batchWindow))
	if err != nil {
		panic(err) // only for invalid options
	}
	return &Encoder{zstd: z}
}

// AppendPages appends the whole PAGES frame of b, encoded with c, to dst. When c does not make
// the body smaller the frame is sent with CodecNone; the codec used is returned.
// PagesOverhead is a PAGES frame's bytes around its encoded body: the frame header, sequence
// number, block, codec, entry count, raw and encoded lengths (PROTOCOL.md §3).
const PagesOverhead = HeaderSize + 8 + pagesHeader

func (e *Encoder) AppendPages(dst []byte, seq uint64, b *Batch, c Codec) ([]byte, Codec) {
	e.body = e.body[:0]
	for _, v := range b.Entries {
		e.body = binary.BigEndian.AppendUint64(e.body, v)
	}
	e.body = append(e.body, b.Data...)
	st := len(dst)
	dst = begin(dst, FramePages, seq)
	hdr := len(dst)
	dst = binary.BigEndian.AppendUint16(dst, b.Block)
	dst = append(dst, byte(c))
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(b.Entries)))
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(b.Data)))
	dst = binary.BigEndian.AppendUint32(dst, 0) // encoded length, below
	at := len(dst)
	switch c {
	case CodecZstd:
		dst = e.zstd.EncodeAll(e.body, dst)
	case CodecS2:
		dst = grow(dst, s2.MaxEncodedLen(len(e.body)))
		n := len(s2.Encode(dst[at:cap(dst)], e.body))
		dst = dst[:at+n]
	case CodecLZ4:
		dst = grow(dst, lz4.CompressBlockBound(len(e.body)))
		n, err := e.lz4.CompressBlock(e.body, dst[at:cap(dst)])
		if err != nil || n == 0 {
			dst = dst[:at]
			c = CodecNone
		} else {
			dst = dst[:at+n]
		}
	}
	if c != CodecNone && len(dst)-at >= len(e.body) {
		c = CodecNone // incompressible: the raw body is smaller
	}
	if c == CodecNone {
		dst = append(dst[:at], e.body...)
	}
	dst[hdr+2] = byte(c)
	binary.BigEndian.PutUint32(dst[at-4:], uint32(len(dst)-at))
	return finish(dst, st), c
}

// grow makes room for n more bytes after len(b) (the slice keeps its length).
func grow(b []byte, n int) []byte {
	if cap(b)-len(b) >= n {
		return b
	}
	nb := make([]byte, len(b), len(b)+n)
	copy(nb, b)
	return nb
}

// Pages is a decoded PAGES frame. Entries and Data alias the Decoder's buffers until its next
// call.
type Pages struct {
	Seq     uint64
	Block   uint16
	Codec   Codec
	Entries []uint64
	Data    []byte
}

// Decoder decodes PAGES frames with bounded memory: a decoded body is never larger than the
// header says, and the header's sizes are capped (PROTOCOL.md §3). One goroutine at a time.
type Decoder struct {
	zstd    *zstd.Decoder
	body    []byte
	entries []uint64
	// Allowed codecs (bit per codec); the zero Decoder from NewDecoder allows all.
	allowed uint32
}

// NewDecoder returns a Decoder for the given codecs (none is always allowed).
func NewDecoder(codecs ...Codec) *Decoder {
	z, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(MaxBatchData+8*MaxBatchEntries),
		zstd.WithDecoderMaxWindow(1<<20))
	if err != nil {
		panic(err)
	}
	d := &Decoder{zstd: z, allowed: 1 << CodecNone}
	if len(codecs) == 0 {
		codecs = []Codec{CodecZstd, CodecS2, CodecLZ4}
	}
	for _, c := range codecs {
		d.allowed |= 1 << c
	}
	return d
}

// ParsePages decodes a PAGES payload and checks that its data adds up to its entries.
func (d *Decoder) ParsePages(p []byte) (Pages, error) {
	dd, seq := newDec(FramePages, p)
	pg := Pages{Seq: seq, Block: dd.u16("block index"), Codec: Codec(dd.u8("codec"))}
	count := int(dd.u16("entry count"))
	dataLen := int(dd.u32("data length"))
	encLen := int(dd.u32("encoded length"))
	enc := dd.rest()
	if err := dd.done(); err != nil {
		return pg, err
	}
	fail := func(format string, args ...any) (Pages, error) {
		return pg, fmt.Errorf("PAGES seq %d: %s", seq, fmt.Sprintf(format, args...))
	}
	switch {
	case count > MaxBatchEntries:
		return fail("%d entries (at most %d)", count, MaxBatchEntries)
	case dataLen > MaxBatchData:
		return fail("%d data bytes (at most %d)", dataLen, MaxBatchData)
	case encLen != len(enc):
		return fail("encoded length %d, but %d bytes follow", encLen, len(enc))
	case pg.Codec > CodecLZ4 || d.allowed&(1<<pg.Codec) == 0:
		return fail("codec %s was not offered", pg.Codec)
	}
	want := 8*count + dataLen
	if cap(d.body) < want {
		d.body = make([]byte, 0, max(want, 64<<10))
	}
	body := d.body[:want]
	switch pg.Codec {
	case CodecNone:
		if len(enc) != want {
			return fail("raw body of %d bytes, want %d", len(enc), want)
		}
		body = enc
	case CodecZstd:
		out, err := d.zstd.DecodeAll(enc, d.body[:0])
		if err != nil {
			return fail("zstd: %v", err)
		}
		if len(out) != want {
			return fail("zstd body of %d bytes, want %d", len(out), want)
		}
		body = out
	case CodecS2:
		n, err := s2.DecodedLen(enc)
		if err != nil || n != want {
			return fail("s2 body of %d bytes (%v), want %d", n, err, want)
		}
		if _, err := s2.Decode(body, enc); err != nil {
			return fail("s2: %v", err)
		}
	case CodecLZ4:
		n, err := lz4.UncompressBlock(enc, body)
		if err != nil || n != want {
			return fail("lz4 body of %d bytes (%v), want %d", n, err, want)
		}
	}
	d.entries = d.entries[:0]
	data := body[8*count:]
	used := 0
	for i := 0; i < count; i++ {
		v := binary.BigEndian.Uint64(body[8*i:])
		switch v & kindMask {
		case KindPage:
			used += PageSize
		case KindZero:
		case KindXBZRLE:
			if used+2 > len(data) {
				return fail("entry %d: XBZRLE length past the data", i)
			}
			n := int(binary.BigEndian.Uint16(data[used:]))
			if n > MaxXBZRLE {
				return fail("entry %d: XBZRLE delta of %d bytes", i, n)
			}
			used += 2 + n
		default:
			return fail("entry %d: kind 0x%03x", i, v&kindMask)
		}
		if used > len(data) {
			return fail("entry %d: data ends at %d, past the %d data bytes", i, used, len(data))
		}
		d.entries = append(d.entries, v)
	}
	if used != len(data) {
		return fail("%d data bytes, the entries use %d", len(data), used)
	}
	pg.Entries, pg.Data = d.entries, data
	return pg, nil
}

// Close releases the decoder's zstd state.
func (d *Decoder) Close() { d.zstd.Close() }
