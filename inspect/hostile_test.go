package inspect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// Hostile input for Inspect (design.md safety contract, item 3): truncated and bit-flipped
// captures — main streams and multifd channels — must give a report and an error wrapping
// ErrInvalid whose ErrorOffset lies within the input and is the offset the error names (or a
// clean report for a harmless change), never a panic, a hang or an allocation out of proportion
// to the input. stream/hostile_test.go does the same, more exhaustively, for the decoders.

const (
	hostileDeadline = 10 * time.Second
	hostileSeed     = 20250505
)

var errPanic = errors.New("panic")

// inspectBounded runs Inspect on in with a deadline, and checks what it allocates.
func inspectBounded(t *testing.T, what string, in []byte) (*Report, error) {
	t.Helper()
	type result struct {
		rep *Report
		err error
	}
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	done := make(chan result, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				done <- result{nil, fmt.Errorf("%w: %v\n%s", errPanic, p, debug.Stack())}
			}
		}()
		rep, err := Inspect(bytes.NewReader(in), Options{})
		done <- result{rep, err}
	}()
	timer := time.NewTimer(hostileDeadline)
	defer timer.Stop()
	var res result
	select {
	case res = <-done:
	case <-timer.C:
		t.Fatalf("%s: Inspect returned nothing after %v: it hangs", what, hostileDeadline)
	}
	runtime.ReadMemStats(&m1)
	// The page bitmaps are proportional to the RAM size the stream announces (≤ 1 TiB tracked:
	// 32 MiB); the rest must be proportional to the input.
	if a, lim := m1.TotalAlloc-m0.TotalAlloc, 64<<20+8*uint64(len(in)); a > lim {
		t.Errorf("%s: allocated %d bytes for a %d-byte input (limit %d)", what, a, len(in), lim)
	}
	if errors.Is(res.err, errPanic) {
		t.Fatalf("%s: %v", what, res.err)
	}
	return res.rep, res.err
}

var streamOffset = regexp.MustCompile(`stream: offset (\d+) \(0x`)

// checkInspect checks a hostile Inspect result for an n-byte input.
func checkInspect(t *testing.T, what string, rep *Report, err error, n int, cleanOK bool) {
	t.Helper()
	if rep == nil {
		t.Errorf("%s: no report (error %v)", what, err)
		return
	}
	if err == nil {
		if !cleanOK {
			t.Errorf("%s: no error", what)
		}
		if rep.Error != "" {
			t.Errorf("%s: no error returned, but the report says %q", what, rep.Error)
		}
		return
	}
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("%s: error does not wrap ErrInvalid: %v", what, err)
	}
	if rep.Error == "" {
		t.Errorf("%s: report has no Error: %v", what, err)
	}
	if rep.ErrorOffset < 0 || rep.ErrorOffset > int64(n) {
		t.Errorf("%s: ErrorOffset %d outside the %d-byte input: %v", what, rep.ErrorOffset, n, err)
	}
	// ErrorOffset must be the offset the error names: an error that carries no offset leaves
	// it 0 (omitted from the JSON), which tells the operator nothing.
	m := streamOffset.FindStringSubmatch(rep.Error)
	if m == nil {
		t.Errorf("%s: the error names no stream offset, ErrorOffset is %d: %s", what, rep.ErrorOffset, rep.Error)
		return
	}
	if off, _ := strconv.ParseInt(m[1], 10, 64); off != rep.ErrorOffset {
		t.Errorf("%s: ErrorOffset %d, the error says offset %d: %s", what, rep.ErrorOffset, off, rep.Error)
	}
}

type capture struct {
	name    string
	data    []byte
	channel bool
}

func hostileCaptures(t *testing.T) []capture {
	var out []capture
	for _, c := range streamtest.Captures(t) {
		out = append(out, capture{c.Name, streamtest.Read(t, c.Path), false})
		for _, ch := range c.Channels {
			name := strings.TrimSuffix(filepath.Base(ch), ".bin.gz")
			out = append(out, capture{name, streamtest.Read(t, ch), true})
		}
	}
	return out
}

// boundaries returns the record (or packet) offsets of a capture, where a cut leaves a complete
// channel (between packets), and the offset of the main stream's EOF record (after which
// Inspect only warns: a destination ignores the vmdesc).
func boundaries(t *testing.T, c capture) (offs []int64, clean map[int64]bool, eof int64) {
	t.Helper()
	clean = map[int64]bool{}
	if c.channel {
		r := stream.NewMultifdReader(bytes.NewReader(c.data), stream.MultifdV100, stream.MultifdLimits{})
		if _, err := r.ReadHello(); err != nil {
			t.Fatal(err)
		}
		for {
			off := r.Offset()
			offs = append(offs, off)
			clean[off] = true
			if _, err := r.Next(); err == io.EOF {
				return offs, clean, -1
			} else if err != nil {
				t.Fatal(err)
			}
		}
	}
	r := stream.NewReader(bytes.NewReader(c.data))
	for {
		rec, err := r.Next()
		if err == io.EOF {
			return offs, clean, eof
		}
		if err != nil {
			t.Fatal(err)
		}
		offs = append(offs, rec.Offset)
		if rec.Kind == stream.KindEOF && rec.Depth == 0 {
			eof = rec.Offset
		}
	}
}

// sample returns up to n elements of s chosen with rng, in order.
func sample(rng *rand.Rand, s []int64, n int) []int64 {
	if len(s) <= n {
		return s
	}
	idx := rng.Perm(len(s))[:n]
	sort.Ints(idx)
	out := make([]int64, n)
	for i, j := range idx {
		out[i] = s[j]
	}
	return out
}

// TestInspectHostile truncates and bit-flips every capture (sampled: each case inspects up to
// the whole capture) and inspects it.
func TestInspectHostile(t *testing.T) {
	for _, c := range hostileCaptures(t) {
		t.Run(c.name, func(t *testing.T) {
			data := append([]byte(nil), c.data...)
			rng := rand.New(rand.NewSource(hostileSeed))
			offs, clean, eof := boundaries(t, c)
			nb, nr, nf := 50, 40, 100
			if len(data) > 8<<20 {
				nb, nr, nf = 15, 15, 40
			}
			if testing.Short() {
				nb, nr, nf = nb/4, nr/4, nf/4
			}
			cuts := sample(rng, offs, nb)
			for range nr {
				cuts = append(cuts, rng.Int63n(int64(len(data))))
			}
			for _, cut := range cuts {
				in := data[:cut]
				what := fmt.Sprintf("cut at %d of %d", cut, len(data))
				rep, err := inspectBounded(t, what, in)
				checkInspect(t, what, rep, err, len(in), clean[cut] || eof >= 0 && cut > eof)
			}
			// Flips: structural bytes at record starts (type bytes, ids, lengths, RAM flags in
			// the 8th byte) and random bytes.
			harmless := 0
			for i := range nf {
				var pos int64
				var mask byte
				if o := offs[rng.Intn(len(offs))]; i%3 == 2 || o >= int64(len(data)) {
					pos, mask = rng.Int63n(int64(len(data))), byte(1)<<rng.Intn(8)
				} else {
					pos, mask = o+rng.Int63n(min(8, int64(len(data))-o)), byte(1)<<rng.Intn(8)
				}
				data[pos] ^= mask
				what := fmt.Sprintf("flip 0x%02x at %d", mask, pos)
				rep, err := inspectBounded(t, what, data)
				checkInspect(t, what, rep, err, len(data), true)
				if err == nil {
					harmless++
				}
				data[pos] ^= mask
				if t.Failed() && i > 20 {
					t.Fatal("stopping after the first failures")
				}
			}
			t.Logf("%d cuts, %d flips (%d harmless)", len(cuts), nf, harmless)
		})
	}
}

// TestInspectPageBeforeMemSize: a page record before the MEM_SIZE list decodes (the stream
// package accepts it) but Inspect rejects it with an error that carries no *stream.Error, so the
// report's ErrorOffset stays 0 although the offending record's offset is known.
func TestInspectPageBeforeMemSize(t *testing.T) {
	var b bytes.Buffer
	w := stream.NewWriter(&b)
	w.WriteHeader()
	w.WriteConfiguration(&stream.Configuration{Machine: "pc-q35-7.2"})
	w.WriteSectionHeader(stream.SectionStart, 2, "ram", 0, 4)
	pageAt := w.Offset()
	w.WritePage(0, "pc.ram", make([]byte, 4096))
	w.WriteEOS()
	w.WriteFooter(2)
	w.WriteEOF()
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	rep, err := inspectBounded(t, "page before MEM_SIZE", b.Bytes())
	checkInspect(t, "page before MEM_SIZE", rep, err, b.Len(), false)
	if rep != nil && rep.ErrorOffset != pageAt {
		t.Errorf("ErrorOffset %d, want %d (the page record): %s", rep.ErrorOffset, pageAt, rep.Error)
	}
}

// TestInspectMultifdAnnouncedSize: `inspect` of a 340-byte file holding a multifd hello and a
// 10.0 device-state packet header that announces 256 MiB must not allocate 256 MiB.
func TestInspectMultifdAnnouncedSize(t *testing.T) {
	h := &stream.MultifdHello{Magic: stream.MultifdMagic, Version: stream.MultifdVersion}
	in := h.Append(nil)
	in = binary.BigEndian.AppendUint32(in, stream.MultifdMagic)
	in = binary.BigEndian.AppendUint32(in, stream.MultifdVersion)
	in = binary.BigEndian.AppendUint32(in, stream.MultifdFlagDeviceState)
	in = append(in, make([]byte, 256)...)
	in = binary.BigEndian.AppendUint32(in, 0)
	in = binary.BigEndian.AppendUint32(in, stream.DefaultMultifdMaxDeviceStateSize-1)
	rep, err := inspectBounded(t, "device-state packet announcing 256 MiB", in)
	checkInspect(t, "device-state packet announcing 256 MiB", rep, err, len(in), false)
}
