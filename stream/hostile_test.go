package stream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sort"
	"strings"
	"testing"
	"time"
)

// Hostile input (design.md safety contract, item 3): every real capture — main streams and
// multifd channels — is truncated at every record boundary and at random offsets, and has bits
// flipped in its structural bytes (headers, lengths, flags, footer ids). Every case must end in
// an *Error whose Offset lies within the input, or decode cleanly (a harmless change), within a
// deadline and with bounded allocation. TestTruncatedRealStreams and TestCorruptions
// (errors_test.go) cover sparse cuts of the main streams and hand-made corruptions; this file
// adds every boundary, the bit flips and the multifd reader.

const (
	hostileDeadline = 10 * time.Second
	hostileRandCuts = 200
	hostileSeed     = 20250505
)

// hostileAllocLimit is the most a single decode of an n-byte input may allocate.
func hostileAllocLimit(n int) uint64 { return 64<<20 + 8*uint64(n) }

// errHostilePanic marks a decode that panicked (recovered so that the table can name the case).
var errHostilePanic = errors.New("panic")

// runHostile runs decode in a goroutine with a deadline and measures what it allocates. A hang
// fails the test at once (the goroutine is left behind: there is no way to stop it).
func runHostile(t *testing.T, what string, n int, decode func() error) error {
	t.Helper()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	done := make(chan error, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				done <- fmt.Errorf("%w: %v\n%s", errHostilePanic, p, debug.Stack())
			}
		}()
		done <- decode()
	}()
	timer := time.NewTimer(hostileDeadline)
	defer timer.Stop()
	var err error
	select {
	case err = <-done:
	case <-timer.C:
		t.Fatalf("%s: no result after %v: the decoder hangs", what, hostileDeadline)
	}
	runtime.ReadMemStats(&m1)
	if a := m1.TotalAlloc - m0.TotalAlloc; a > hostileAllocLimit(n) {
		t.Errorf("%s: allocated %d bytes for a %d-byte input (limit %d)", what, a, n, hostileAllocLimit(n))
	}
	if errors.Is(err, errHostilePanic) {
		t.Fatalf("%s: %v", what, err)
	}
	return err
}

// checkStreamErr checks the result of a hostile decode of an n-byte input: nil (harmless) when
// cleanOK, else an *Error with 0 ≤ Offset ≤ n (and wrapping ErrUnexpectedEOF when short).
func checkStreamErr(t *testing.T, what string, err error, n int, cleanOK, short bool) {
	t.Helper()
	if err == nil {
		if !cleanOK {
			t.Errorf("%s: decoded cleanly, want an error", what)
		}
		return
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Errorf("%s: error %v (%T) is not *Error", what, err, err)
		return
	}
	if e.Offset < 0 || e.Offset > int64(n) {
		t.Errorf("%s: error offset %d outside the %d-byte input: %v", what, e.Offset, n, err)
	}
	if short && !errors.Is(err, ErrUnexpectedEOF) {
		t.Errorf("%s: truncated input, but the error does not wrap ErrUnexpectedEOF: %v", what, err)
	}
}

// hostileStream is one capture from testdata/streams.
type hostileStream struct {
	name string
	data []byte
}

func hostileStreams(t *testing.T) []hostileStream {
	var out []hostileStream
	for _, rs := range realStreams(t) {
		out = append(out, hostileStream{rs.name, rs.data})
	}
	return out
}

// recSpan is one record of a capture: kind, where it starts and ends, and what the bit flips
// need to know about it.
type recSpan struct {
	kind      Kind
	off, end  int64
	depth     int
	flags     RAMFlag // KindRAM
	named     bool    // KindRAM: carries a block name (no CONTINUE)
	idstrLen  int     // START/FULL: idstr length
	vmdescLen int     // KindVMDesc: JSON length
}

// walkRecords decodes a capture and returns its records (offsets copied: Records are reused).
func walkRecords(t *testing.T, data []byte) []recSpan {
	t.Helper()
	r := NewReader(bytes.NewReader(data))
	var spans []recSpan
	for {
		rec, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("capture does not decode: %v", err)
		}
		if n := len(spans); n > 0 {
			spans[n-1].end = rec.Offset
		}
		s := recSpan{kind: rec.Kind, off: rec.Offset, depth: rec.Depth}
		switch rec.Kind {
		case KindRAM:
			s.flags = rec.RAM.Flags
			s.named = rec.RAM.Flags&RAMContinue == 0 && rec.RAM.Flags.hasBlock()
		case KindSectionStart, KindSectionFull:
			s.idstrLen = len(rec.Section.Idstr)
		case KindVMDesc:
			s.vmdescLen = len(rec.JSON)
		}
		spans = append(spans, s)
	}
	if n := len(spans); n > 0 {
		spans[n-1].end = int64(len(data))
	}
	return spans
}

// decodeStream decodes data to the end the way the relay does (VMDescSizer when sizer).
func decodeStream(data []byte, sizer bool) error {
	var opts []Option
	if sizer {
		opts = append(opts, WithDeviceSizer(VMDescSizer()))
	}
	return decodeErr(data, opts...)
}

// fullBoundaryStreams get a cut at every record boundary; the others at a sample of RAM record
// boundaries (every non-RAM boundary is always cut).
var fullBoundaryStreams = map[string]bool{"idle-7.2": true, "idle-10.0": true}

// maxRAMCuts bounds the RAM record boundaries cut in the other streams (each cut decodes the
// prefix: tens of MB in the large captures).
func maxRAMCuts(size int) int {
	if size > 8<<20 {
		return 40
	}
	return 300
}

// TestHostileTruncation cuts every capture at its record boundaries and at random offsets.
func TestHostileTruncation(t *testing.T) {
	for _, hs := range hostileStreams(t) {
		t.Run(hs.name, func(t *testing.T) {
			data := hs.data
			spans := walkRecords(t, data)
			rng := rand.New(rand.NewSource(hostileSeed))
			// A stream cut right after its EOF record is complete: QEMU does not need the vmdesc.
			clean := map[int64]bool{}
			var cuts []int64
			var ramCuts []int64
			for _, s := range spans {
				if s.kind == KindEOF && s.depth == 0 {
					clean[s.end] = true
				}
				if s.kind == KindRAM && (!fullBoundaryStreams[hs.name] || testing.Short()) {
					ramCuts = append(ramCuts, s.off)
					continue
				}
				cuts = append(cuts, s.off)
			}
			if m := maxRAMCuts(len(data)); len(ramCuts) > m {
				rng.Shuffle(len(ramCuts), func(i, j int) { ramCuts[i], ramCuts[j] = ramCuts[j], ramCuts[i] })
				ramCuts = ramCuts[:m]
			}
			cuts = append(cuts, ramCuts...)
			nrand := hostileRandCuts
			if testing.Short() && len(data) > 8<<20 {
				nrand = 30
			}
			for range nrand {
				cuts = append(cuts, 1+rng.Int63n(int64(len(data)-1)))
			}
			sort.Slice(cuts, func(i, j int) bool { return cuts[i] < cuts[j] })
			n := 0
			for i, c := range cuts {
				if i > 0 && c == cuts[i-1] {
					continue
				}
				n++
				in := data[:c]
				what := fmt.Sprintf("cut at %d of %d", c, len(data))
				err := runHostile(t, what, len(in), func() error { return decodeStream(in, false) })
				checkStreamErr(t, what, err, len(in), clean[c], true)
				if t.Failed() && n > 20 {
					t.Fatalf("stopping after the first failures")
				}
			}
			t.Logf("%d cuts (%d records)", n, len(spans))
		})
	}
}

// flip is one bit to invert: data[pos] ^= mask.
type flip struct {
	pos  int64
	mask byte
	what string
}

// structuralFlips lists bit flips in the structural bytes of the records: section headers (type,
// id, idstr length, a bit of the idstr, instance, version), footers, command headers, the be32
// lengths of the configuration, vmdesc and commands, RAM record flag bits, block-name lengths,
// MEM_SIZE totals and block lengths, XBZRLE/COMPRESS_PAGE lengths, and the EOF byte.
func structuralFlips(data []byte, spans []recSpan) (must, sampled []flip) {
	allBits := func(dst []flip, pos int64, what string) []flip {
		for b := 0; b < 8; b++ {
			dst = append(dst, flip{pos, 1 << b, what})
		}
		return dst
	}
	perKind := map[string]int{}
	for _, s := range spans {
		var fl []flip
		o := s.off
		switch s.kind {
		case KindHeader:
			for i := int64(0); i < 8; i++ {
				fl = allBits(fl, o+i, "header")
			}
		case KindConfiguration:
			// Type byte, be32 machine-name length, then the subsection headers, capability
			// count and names (bounded).
			for i := o; i < s.end && i < o+5; i++ {
				fl = allBits(fl, i, "configuration type/length")
			}
			nl := int64(be32(data[o+1:]))
			for i := o + 5 + nl; i < s.end && i < o+5+nl+96; i++ {
				fl = allBits(fl, i, "configuration subsections")
			}
			if nl > 0 {
				fl = append(fl, flip{o + 5, 0x20, "configuration machine name"})
			}
		case KindSectionStart, KindSectionFull, KindSectionPart, KindSectionEnd, KindFooter, KindCommand:
			for i := int64(0); i < 5; i++ {
				fl = allBits(fl, o+i, s.kind.String()+" type/id")
			}
			if s.kind == KindSectionStart || s.kind == KindSectionFull {
				l := int64(s.idstrLen)
				fl = allBits(fl, o+5, "idstr length")
				fl = append(fl, flip{o + 6, 0x01, "idstr"}, flip{o + 6 + l - 1, 0x40, "idstr"},
					flip{o + 6 + l + 3, 0x01, "instance"}, flip{o + 6 + l, 0x80, "instance"},
					flip{o + 6 + l + 7, 0x01, "version"}, flip{o + 6 + l + 4, 0x80, "version"})
			}
		case KindEOF:
			fl = allBits(fl, o, "EOF")
		case KindVMDesc:
			for i := int64(0); i < 5; i++ {
				fl = allBits(fl, o+i, "vmdesc type/length")
			}
			for _, p := range []int64{5, 6, 5 + int64(s.vmdescLen)/2, 5 + int64(s.vmdescLen) - 1} {
				fl = append(fl, flip{o + p, 0x04, "vmdesc JSON"})
			}
		case KindRAM:
			// be64 flags+offset: the 12 low bits are flags (4 KiB pages), then offset bits.
			fl = allBits(fl, o+7, "ram flags")
			for b := 0; b < 4; b++ {
				fl = append(fl, flip{o + 6, 1 << b, "ram flags"})
			}
			fl = append(fl, flip{o + 6, 0x10, "ram offset"}, flip{o + 4, 0x01, "ram offset"}, flip{o, 0x80, "ram offset"})
			p := o + 8
			if s.named {
				fl = allBits(fl, p, "ram block name length")
				fl = append(fl, flip{p + 1, 0x01, "ram block name"})
				p += 1 + int64(data[p])
			}
			switch s.flags &^ RAMContinue {
			case RAMXBZRLE:
				for i := int64(0); i < 3; i++ {
					fl = allBits(fl, p+i, "XBZRLE header")
				}
			case RAMCompressPage:
				for i := int64(0); i < 4; i++ {
					fl = allBits(fl, p+i, "COMPRESS_PAGE length")
				}
			case RAMZero:
				fl = append(fl, flip{p, 0x01, "zero fill byte"})
			case RAMMemSize:
				// First block entry: name length, a name bit, and bits of its used length.
				fl = allBits(fl, p, "MEM_SIZE block name length")
				l := int64(data[p])
				fl = append(fl, flip{p + 1, 0x01, "MEM_SIZE block name"})
				for _, i := range []int64{0, 3, 4, 5, 7} {
					fl = append(fl, flip{p + 1 + l + i, 0x01, "MEM_SIZE block length"}, flip{p + 1 + l + i, 0x80, "MEM_SIZE block length"})
				}
			}
		}
		// Every flip of the records that occur once or a few times (header, configuration,
		// START, commands, EOF, vmdesc, MEM_SIZE) is kept; of the common kinds (FULL, PART, END,
		// footers, page records) the first few of each are kept and the rest sampled.
		key := s.kind.String()
		if s.kind == KindRAM {
			key += (s.flags &^ RAMContinue).String()
			if s.named {
				key += "/named"
			}
		}
		perKind[key]++
		keep := 1 << 30
		switch {
		case s.kind == KindRAM && s.flags&^RAMContinue == RAMMemSize:
		case s.kind == KindSectionFull, s.kind == KindFooter:
			keep = 3
		case s.kind == KindRAM, s.kind == KindSectionPart, s.kind == KindSectionEnd:
			keep = 2
		}
		for _, f := range fl {
			if f.pos < 0 || f.pos >= int64(len(data)) {
				continue
			}
			if perKind[key] <= keep {
				must = append(must, f)
			} else {
				sampled = append(sampled, f)
			}
		}
	}
	return must, sampled
}

// maxFlips bounds the bit flips decoded per capture (each decodes the whole capture when it
// is harmless); the idle captures get the most.
func maxFlips(name string, size int) int {
	switch {
	case testing.Short():
		return 100
	case fullBoundaryStreams[name]:
		return 800
	case size > 8<<20:
		return 150
	}
	return 300
}

// TestHostileBitFlips flips single bits in the structural bytes of every capture and decodes it
// with and without the vmdesc-driven device sizer. A decode that succeeds must still re-encode to
// exactly its input (Reader and Writer are inverses).
func TestHostileBitFlips(t *testing.T) {
	for _, hs := range hostileStreams(t) {
		t.Run(hs.name, func(t *testing.T) {
			data := append([]byte(nil), hs.data...)
			spans := walkRecords(t, data)
			must, sampled := structuralFlips(data, spans)
			budget := maxFlips(hs.name, len(data))
			rng := rand.New(rand.NewSource(hostileSeed))
			rng.Shuffle(len(sampled), func(i, j int) { sampled[i], sampled[j] = sampled[j], sampled[i] })
			flips := must
			if len(flips) > budget {
				rng.Shuffle(len(flips), func(i, j int) { flips[i], flips[j] = flips[j], flips[i] })
				flips = flips[:budget]
			} else {
				flips = append(flips, sampled[:min(len(sampled), budget-len(flips))]...)
			}
			harmless := map[string]int{}
			for i, f := range flips {
				data[f.pos] ^= f.mask
				sizer := i%2 == 0
				what := fmt.Sprintf("flip 0x%02x at %d (%s, sizer %v)", f.mask, f.pos, f.what, sizer)
				err := runHostile(t, what, len(data), func() error { return decodeStream(data, sizer) })
				checkStreamErr(t, what, err, len(data), true, false)
				if err == nil {
					harmless[f.what]++
					if rerr := roundTrip(data, sizer); rerr != nil {
						t.Errorf("%s: decoded cleanly but %v", what, rerr)
					}
				}
				data[f.pos] ^= f.mask
				if t.Failed() && i > 50 {
					t.Fatalf("stopping after the first failures")
				}
			}
			t.Logf("%d flips (%d structural, %d more sampled); harmless: %v", len(flips), len(must), len(sampled), harmless)
		})
	}
}

// roundTrip re-encodes data record by record and checks that the output equals the input.
func roundTrip(data []byte, sizer bool) error {
	var opts []Option
	if sizer {
		opts = append(opts, WithDeviceSizer(VMDescSizer()))
	}
	r := NewReader(bytes.NewReader(data), opts...)
	h := crc32.New(crc32.MakeTable(crc32.Castagnoli))
	var n int64
	cw := writerFunc(func(p []byte) (int, error) { n += int64(len(p)); return h.Write(p) })
	w := NewWriter(cw, WithMappedRAMFill(func(off int64, dst []byte) { copy(dst, data[off:]) }))
	for {
		rec, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("second decode failed: %w", err)
		}
		if err := w.WriteRecord(rec); err != nil {
			return fmt.Errorf("WriteRecord(%v at %d) refused a decoded record: %w", rec.Kind, rec.Offset, err)
		}
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if n != int64(len(data)) || h.Sum32() != crc32.Checksum(data, crc32.MakeTable(crc32.Castagnoli)) {
		return fmt.Errorf("re-encoded stream differs (%d bytes for %d)", n, len(data))
	}
	return nil
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// multifdChannel is one multifd channel capture.
type multifdChannel struct {
	name   string
	layout MultifdLayout
	data   []byte
}

func hostileChannels(t *testing.T) []multifdChannel {
	var out []multifdChannel
	for f, l := range multifdTestChannels(t) {
		if !strings.HasPrefix(f, "../testdata/") {
			continue
		}
		data, err := vmdescTestRead(f)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, multifdChannel{filepath.Base(f), l, data})
	}
	if len(out) == 0 {
		t.Skip("no multifd channel captures")
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// decodeChannel reads a channel to the end with the default limits (as inspect does).
func decodeChannel(data []byte, l MultifdLayout) error {
	r := NewMultifdReader(bytes.NewReader(data), l, MultifdLimits{})
	if _, err := r.ReadHello(); err != nil {
		return err
	}
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

// channelPackets returns the offset of every packet of a channel (and the end), with its flags.
func channelPackets(t *testing.T, data []byte, l MultifdLayout) (offs []int64, flags []uint32) {
	t.Helper()
	r := NewMultifdReader(bytes.NewReader(data), l, MultifdLimits{})
	if _, err := r.ReadHello(); err != nil {
		t.Fatal(err)
	}
	for {
		off := r.Offset()
		p, err := r.Next()
		if err == io.EOF {
			offs = append(offs, off)
			return offs, flags
		}
		if err != nil {
			t.Fatal(err)
		}
		offs, flags = append(offs, off), append(flags, p.Flags)
	}
}

// TestHostileMultifd truncates every multifd channel capture at every packet boundary and at
// random offsets, and flips bits in the hello and in packet headers (magic, version, flags,
// pages_alloc, normal_pages, next_packet_size, zero_pages).
func TestHostileMultifd(t *testing.T) {
	for _, ch := range hostileChannels(t) {
		t.Run(ch.name, func(t *testing.T) {
			data := append([]byte(nil), ch.data...)
			offs, flags := channelPackets(t, data, ch.layout)
			rng := rand.New(rand.NewSource(hostileSeed))
			boundary := map[int64]bool{}
			cuts := []int64{0, 1, 4, 8, 24, 63}
			for _, o := range offs {
				boundary[o] = true
				cuts = append(cuts, o, o+12, o+MultifdPacketHeaderSize)
			}
			for range hostileRandCuts {
				cuts = append(cuts, rng.Int63n(int64(len(data))))
			}
			ncut := 0
			for _, c := range cuts {
				if c < 0 || c >= int64(len(data)) {
					continue
				}
				ncut++
				in := data[:c]
				what := fmt.Sprintf("cut at %d of %d", c, len(data))
				err := runHostile(t, what, len(in), func() error { return decodeChannel(in, ch.layout) })
				// A cut between packets is a clean end of the channel (QEMU's channel ends there too).
				checkStreamErr(t, what, err, len(in), boundary[c], true)
			}
			// Bit flips: the hello's magic, version and channel id; the header fields of the
			// first packets, of SYNC packets and of a sample of the others. A flip in packet i is
			// decoded in a channel made of the hello and packets i, i+1, i+2, so that a harmless
			// flip does not cost a decode of the whole capture.
			hello := data[:MultifdHelloSize]
			harmless, nflips := 0, 0
			try := func(win []byte, f flip) {
				win[f.pos] ^= f.mask
				what := fmt.Sprintf("flip 0x%02x at %d (%s)", f.mask, f.pos, f.what)
				err := runHostile(t, what, len(win), func() error { return decodeChannel(win, ch.layout) })
				checkStreamErr(t, what, err, len(win), true, false)
				if err == nil {
					harmless++
				}
				win[f.pos] ^= f.mask
				nflips++
			}
			first := append(append([]byte(nil), hello...), data[offs[0]:offs[min(2, len(offs)-1)]]...)
			for i := int64(0); i < 8; i++ {
				for b := 0; b < 8; b++ {
					try(first, flip{i, 1 << b, "hello magic/version"})
				}
			}
			try(first, flip{24, 0x01, "hello channel id"})
			try(first, flip{8, 0x01, "hello uuid"})
			syncs := 0
			for i := range flags {
				pick := i < 3 || i == len(flags)-1 || rng.Intn(len(flags)) < 4
				if flags[i]&MultifdFlagSync != 0 && syncs < 6 {
					pick, syncs = true, syncs+1
				}
				if !pick {
					continue
				}
				win := append(append([]byte(nil), hello...), data[offs[i]:offs[min(i+3, len(offs)-1)]]...)
				o := int64(MultifdHelloSize)
				for f := int64(0); f < 36; f++ {
					if f >= 24 && f < 32 {
						continue // packet_num: not interpreted
					}
					for b := 0; b < 8; b++ {
						try(win, flip{o + f, 1 << b, fmt.Sprintf("packet %d header byte %d", i, f)})
					}
				}
				try(win, flip{o + 64, 0x01, "packet block name"})
				try(win, flip{o + 320 + 7, 0x01, "packet offset"})
			}
			t.Logf("%d packets: %d cuts, %d flips (%d harmless)", len(flags), ncut, nflips, harmless)
		})
	}
}

// TestHostileMultifdAnnouncedSize: a device-state packet header (10.0) that announces a large
// next_packet_size, followed by nothing, must not make the reader allocate what it announces:
// the input is 340 bytes. Allocation must grow with the data that actually arrives, as the main
// stream Reader's readGrow does.
func TestHostileMultifdAnnouncedSize(t *testing.T) {
	h := &MultifdHello{Magic: MultifdMagic, Version: MultifdVersion}
	in := h.Append(nil)
	in = binary.BigEndian.AppendUint32(in, MultifdMagic)
	in = binary.BigEndian.AppendUint32(in, MultifdVersion)
	in = binary.BigEndian.AppendUint32(in, MultifdFlagDeviceState)
	in = append(in, make([]byte, 256)...) // idstr
	in = binary.BigEndian.AppendUint32(in, 0)
	in = binary.BigEndian.AppendUint32(in, DefaultMultifdMaxDeviceStateSize-1)
	err := runHostile(t, "device-state packet announcing 256 MiB", len(in), func() error { return decodeChannel(in, MultifdV100) })
	checkStreamErr(t, "device-state packet announcing 256 MiB", err, len(in), false, true)
}
