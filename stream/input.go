package stream

import (
	"encoding/binary"
	"io"
)

// input is a forward-only byte source: either a large buffer refilled from an io.Reader
// (stream mode) or a fixed byte slice (slice mode: the device tail, or the bytes of a PACKAGED
// command). Parsers look at buf[r:w] through ensure and consume with skip; slices handed out
// stay valid until the next ensure that has to refill.
type input struct {
	buf  []byte
	r, w int
	rd   io.Reader // nil in slice mode
	base int64     // absolute stream offset of buf[0]
	err  error     // sticky error from rd (io.EOF at the end)

	// before, when set, is called before every read from rd (WithBeforeRead): the caller may
	// still hold slices of buf, which the read may move.
	before func()

	// Slice mode only.
	end    int    // device bodies may not extend past buf[end] (start of EOF+vmdesc), else w
	vmdesc []byte // vmdesc JSON located at the end of the tail, nil if none
	pkg    bool   // bytes of a PACKAGED command
	// scanNoted: the warning that this package's device sections are delimited by footer scan
	// (postcopy packages never have a vmdesc) was given.
	scanNoted bool
}

func (in *input) off() int64  { return in.base + int64(in.r) }
func (in *input) avail() int  { return in.w - in.r }
func (in *input) win() []byte { return in.buf[in.r:in.w] }
func (in *input) skip(n int)  { in.r += n }

// ensure makes at least n bytes available at buf[r:], reading more in stream mode. It reports
// false when the input ends (or fails) first. n must not exceed len(buf).
func (in *input) ensure(n int) bool {
	if in.w-in.r >= n {
		return true
	}
	if in.rd == nil {
		return false
	}
	return in.fill(n)
}

func (in *input) fill(n int) bool {
	if in.before != nil {
		in.before()
	}
	if in.r+n > len(in.buf) {
		copy(in.buf, in.buf[in.r:in.w])
		in.base += int64(in.r)
		in.w -= in.r
		in.r = 0
	}
	for empty := 0; in.w-in.r < n && in.err == nil; {
		m, err := in.rd.Read(in.buf[in.w:])
		in.w += m
		if err != nil {
			in.err = err
		} else if m == 0 {
			if empty++; empty > 100 {
				in.err = io.ErrNoProgress
			}
		}
	}
	return in.w-in.r >= n
}

// readErr returns the reason the input ended: ErrUnexpectedEOF at a clean end of input or of
// the slice, else the underlying read error.
func (in *input) readErr() error {
	if in.err == nil || in.err == io.EOF {
		return ErrUnexpectedEOF
	}
	return in.err
}

// readGrow returns the next n bytes in a fresh slice grown as data arrives (never allocating
// far beyond what the input actually delivered), consuming them.
func (in *input) readGrow(n int, dst []byte) ([]byte, bool) {
	dst = dst[:0]
	for len(dst) < n {
		if in.avail() == 0 && !in.ensure(1) {
			return dst, false
		}
		take := min(in.avail(), n-len(dst))
		if cap(dst)-len(dst) < take {
			nc := max(2*cap(dst), len(dst)+take, 64<<10)
			nc = min(nc, n)
			nd := make([]byte, len(dst), nc)
			copy(nd, dst)
			dst = nd
		}
		dst = append(dst, in.buf[in.r:in.r+take]...)
		in.r += take
	}
	return dst, true
}

// discard consumes n bytes, passing them in chunks to fn (if set) with their absolute offset.
func (in *input) discard(n int64, fn func(off int64, data []byte)) bool {
	for n > 0 {
		if in.avail() == 0 && !in.ensure(1) {
			return false
		}
		take := int(min(int64(in.avail()), n))
		if fn != nil {
			fn(in.off(), in.buf[in.r:in.r+take])
		}
		in.r += take
		n -= int64(take)
	}
	return true
}

func be16(b []byte) uint16 { return binary.BigEndian.Uint16(b) }
func be32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }
func be64(b []byte) uint64 { return binary.BigEndian.Uint64(b) }
