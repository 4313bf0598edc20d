package stream

import (
	"bytes"
	"compress/zlib"
	"errors"
	"fmt"
	"io"
)

// XBZRLE payloads (stream-format.md §4 "XBZRLE payload") are a sequence of pairs
// (zrun, nzrun): zrun bytes unchanged w.r.t. the previous copy of the page, then nzrun > 0
// literal bytes that follow. Both numbers are ULEB128 of at most two bytes (< 16384); the
// trailing unchanged run is not encoded.

const xbzrleMaxRun = 1<<14 - 1

// ulebSmall decodes a ULEB128 number of at most two bytes.
func ulebSmall(b []byte) (v, n int, ok bool) {
	if len(b) == 0 {
		return 0, 0, false
	}
	if b[0] < 0x80 {
		return int(b[0]), 1, true
	}
	if len(b) < 2 || b[1] >= 0x80 {
		return 0, 0, false
	}
	return int(b[0]&0x7f) | int(b[1])<<7, 2, true
}

func appendUlebSmall(b []byte, v int) []byte {
	if v < 0x80 {
		return append(b, byte(v))
	}
	return append(b, byte(v)|0x80, byte(v>>7))
}

// XBZRLEDecode applies an XBZRLE delta to dst (the destination's current copy of the page) in
// place. Every run is bounds-checked against dst and delta; on error dst may be partly updated
// and the *Error's Offset is the position inside delta.
func XBZRLEDecode(dst []byte, delta []byte) error {
	fail := func(i int, format string, args ...any) error {
		return &Error{Offset: int64(i), Expected: "XBZRLE delta", Err: fmt.Errorf(format, args...)}
	}
	d := 0
	for i := 0; i < len(delta); {
		zrun, n, ok := ulebSmall(delta[i:])
		if !ok {
			return fail(i, "bad unchanged-run length")
		}
		if d+zrun > len(dst) {
			return fail(i, "unchanged run of %d bytes at page offset %d exceeds the page (%d bytes)", zrun, d, len(dst))
		}
		d += zrun
		i += n
		nz, n, ok := ulebSmall(delta[i:])
		if !ok {
			return fail(i, "bad literal-run length")
		}
		if nz == 0 {
			return fail(i, "empty literal run")
		}
		i += n
		if d+nz > len(dst) {
			return fail(i, "literal run of %d bytes at page offset %d exceeds the page (%d bytes)", nz, d, len(dst))
		}
		if i+nz > len(delta) {
			return fail(i, "literal run of %d bytes exceeds the delta (%d bytes left): %w", nz, len(delta)-i, ErrUnexpectedEOF)
		}
		copy(dst[d:], delta[i:i+nz])
		d += nz
		i += nz
	}
	return nil
}

// XBZRLEEncode encodes the delta from old to new (same length, at most 16383 bytes) into dst.
// It returns the encoded length (0 when the pages are equal) and ok=false when the delta does
// not fit in dst, in which case QEMU would send the page as a normal PAGE.
func XBZRLEEncode(old, new, dst []byte) (n int, ok bool) {
	if len(old) != len(new) || len(new) > xbzrleMaxRun {
		return 0, false
	}
	out := dst[:0]
	for i := 0; i < len(new); {
		z := i
		for i < len(new) && old[i] == new[i] {
			i++
		}
		if i == len(new) {
			break
		}
		zrun := i - z
		s := i
		for i < len(new) && old[i] != new[i] {
			i++
		}
		need := 4 + (i - s)
		if len(out)+need > cap(dst) {
			// Check precisely: ULEB128 lengths may be shorter than 4 bytes.
			exact := len(appendUlebSmall(appendUlebSmall(nil, zrun), i-s)) + (i - s)
			if len(out)+exact > cap(dst) {
				return 0, false
			}
		}
		out = appendUlebSmall(out, zrun)
		out = appendUlebSmall(out, i-s)
		out = append(out, new[s:i]...)
	}
	return len(out), true
}

// Inflater inflates COMPRESS_PAGE records (raw zlib streams, RFC 1950) into caller buffers,
// reusing its decompressor between calls. The zero value is ready to use.
type Inflater struct {
	src bytes.Reader
	zr  io.ReadCloser
}

// errInflateTooLong is wrapped when a compressed page inflates to more than the buffer holds.
var errInflateTooLong = errors.New("compressed page inflates to more than the page size")

// Inflate decompresses the zlib stream src into dst and returns the number of bytes produced.
// Output longer than len(dst) is rejected (it never writes past dst). Errors are *Error with
// Offset relative to src.
func (f *Inflater) Inflate(dst, src []byte) (int, error) {
	fail := func(err error) (int, error) {
		return 0, &Error{Offset: f.src.Size() - int64(f.src.Len()), Expected: "zlib compressed page", Err: err}
	}
	f.src.Reset(src)
	if f.zr == nil {
		zr, err := zlib.NewReader(&f.src)
		if err != nil {
			return fail(err)
		}
		f.zr = zr
	} else if err := f.zr.(zlib.Resetter).Reset(&f.src, nil); err != nil {
		return fail(err)
	}
	n := 0
	for n < len(dst) {
		m, err := f.zr.Read(dst[n:])
		n += m
		if err == io.EOF {
			return n, nil // stream complete, checksum verified
		}
		if err != nil {
			return fail(err)
		}
	}
	// dst is full: the stream must end here.
	var one [1]byte
	for {
		m, err := f.zr.Read(one[:])
		if m > 0 {
			return fail(fmt.Errorf("%w (%d)", errInflateTooLong, len(dst)))
		}
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return fail(err)
		}
	}
}

// InflatePage is a convenience for a single Inflater.Inflate call.
func InflatePage(dst, src []byte) (int, error) {
	var f Inflater
	return f.Inflate(dst, src)
}
