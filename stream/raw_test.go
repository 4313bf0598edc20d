package stream

import (
	"bytes"
	"encoding/binary"
	"io"
	"strings"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// rawCopy decodes data and rebuilds it from the records' Raw bytes the way a relay forwarding
// records unchanged does: slices are kept from one read to the next and written out only in
// WithBeforeRead (so the test fails if a read moved bytes a kept slice points at), PACKAGED
// headers are rebuilt from their payload (their Raw is nil), and the tail is forwarded while it
// arrives up to SafeTailPrefix, then skipped when its records are walked.
func rawCopy(t *testing.T, data []byte, bufSize int, opts ...Option) []byte {
	t.Helper()
	var out bytes.Buffer
	var kept [][]byte
	var keptFrom []int64 // source offset of each kept slice
	var fwd int64 = -1   // source offset up to which the tail was already forwarded
	var tailStart int64 = -1
	flush := func() {
		for i, b := range kept {
			// A kept slice must still hold the source's bytes at its offset.
			if !bytes.Equal(b, data[keptFrom[i]:keptFrom[i]+int64(len(b))]) {
				t.Fatalf("a slice kept from offset %d changed before WithBeforeRead", keptFrom[i])
			}
			out.Write(b)
		}
		kept, keptFrom = kept[:0], keptFrom[:0]
	}
	var rd *Reader
	opts = append(opts, WithBufferSize(bufSize), WithBeforeRead(flush), WithTailData(func(tail []byte) {
		if tailStart < 0 {
			tailStart = int64(out.Len()) // everything before the tail is out: flush ran first
		}
		n := SafeTailPrefix(tail)
		if tailStart+int64(n) > fwd {
			from := max(fwd-tailStart, 0)
			out.Write(tail[from:n])
			fwd = tailStart + int64(n)
		}
	}))
	rd = NewReader(bytes.NewReader(data), opts...)
	for {
		rec, err := rd.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		raw := rd.Raw()
		switch {
		case rec.Kind == KindCommand && rec.Cmd == CmdPackaged:
			if raw != nil {
				t.Fatalf("PACKAGED at %d has Raw", rec.Offset)
			}
			raw = binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16([]byte{byte(SectionCommand)}, uint16(CmdPackaged)), 4)
			raw = append(raw, rec.Payload...)
		case rec.Kind == KindPackageEnd:
			continue
		case raw == nil:
			t.Fatalf("%s record at %d has no Raw", rec.Kind, rec.Offset)
		}
		off := rec.Offset
		if off < fwd { // forwarded with the tail already
			if skip := fwd - off; skip < int64(len(raw)) {
				raw, off = raw[skip:], fwd
			} else {
				continue
			}
		}
		kept = append(kept, raw)
		keptFrom = append(keptFrom, off)
	}
	flush()
	return out.Bytes()
}

// TestRawRebuildsEveryCapture: the records' own bytes are the stream, for every real capture —
// precopy, multifd main channels, compress, xbzrle, postcopy with its packages — with buffers
// small enough to force many compactions.
func TestRawRebuildsEveryCapture(t *testing.T) {
	type cap struct {
		name string
		data []byte
	}
	var caps []cap
	for _, c := range streamtest.Captures(t) {
		if c.Meta.Capabilities["mapped-ram"] {
			continue // its MEM_SIZE skips the file's page areas: no Raw, by design
		}
		caps = append(caps, cap{c.Name, streamtest.Read(t, c.Path)})
	}
	for _, c := range streamtest.PostcopyCaptures(t) {
		if strings.Contains(c.Name, "recover") {
			continue // its main connection was cut on purpose: it does not decode to the end
		}
		caps = append(caps, cap{c.Name, c.Read(t, streamtest.PostcopyMain)})
	}
	for _, c := range caps {
		for _, size := range []int{300 << 10, 1 << 20} {
			got := rawCopy(t, c.data, size, WithIgnoreAfterEOF())
			if !bytes.Equal(got, c.data) {
				n := 0
				for n < len(got) && n < len(c.data) && got[n] == c.data[n] {
					n++
				}
				t.Errorf("%s (buffer %d): rebuilt %d bytes of %d, first difference at %d", c.name, size, len(got), len(c.data), n)
			}
		}
	}
}

// TestSafeTailPrefix: the forwarded prefix of a tail never reaches its EOF byte, at any point
// of its arrival.
func TestSafeTailPrefix(t *testing.T) {
	for _, c := range streamtest.Captures(t) {
		data := streamtest.Read(t, c.Path)
		var tail []byte
		rd := NewReader(bytes.NewReader(data), WithRawTail(func(b []byte) { tail = b }))
		for {
			if _, err := rd.Next(); err != nil {
				break
			}
		}
		if tail == nil {
			continue
		}
		eof := bytes.LastIndex(tail, []byte{byte(SectionEOF), byte(SectionVMDescription)})
		for n := 0; n <= len(tail); n += 97 {
			if p := SafeTailPrefix(tail[:n]); p > eof {
				t.Fatalf("%s: after %d tail bytes the safe prefix %d includes the EOF at %d", c.Name, n, p, eof)
			}
		}
		if p := SafeTailPrefix(tail); eof-p > 5 {
			t.Errorf("%s: the whole tail's safe prefix %d stops %d bytes before EOF", c.Name, p, eof-p)
		}
	}
}
