package link

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"testing"
)

// allFrameTypes is every frame type of protocol version 1 (PROTOCOL.md §2.1, §2.2, §7).
var allFrameTypes = []FrameType{
	FrameHello, FrameWelcome, FramePing, FramePong, FrameError, FrameReady, FrameCommit,
	FrameDelivered, FrameStatus, FrameVerify, FrameHashes, FrameVerdict, FrameReturn, FrameUrgent,
	FrameBegin, FrameSection, FrameMemSize, FramePages, FrameSectionEnd, FrameCommand,
	FrameDevice, FrameEnd, FramePackaged,
}

// allocated is the number of bytes f allocates per call, averaged over runs (TotalAlloc counts
// every allocation, freed or not). Only for tests that do not run in parallel.
func allocated(runs int, f func()) uint64 {
	f()
	var a, b runtime.MemStats
	runtime.ReadMemStats(&a)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&b)
	return (b.TotalAlloc - a.TotalAlloc) / uint64(runs)
}

// countingReader serves r and counts what was read from it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// endless is a reader that never ends: a payload it announces is always there to read.
type endless struct{}

func (endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 0xAA
	}
	return len(p), nil
}

func TestFrameTypes(t *testing.T) {
	names := map[FrameType]string{
		FrameHello: "HELLO", FrameWelcome: "WELCOME", FramePing: "PING", FramePong: "PONG", FrameError: "ERROR",
		FrameReady: "READY", FrameCommit: "COMMIT", FrameDelivered: "DELIVERED", FrameStatus: "STATUS",
		FrameVerify: "VERIFY", FrameHashes: "HASHES", FrameVerdict: "VERDICT", FrameReturn: "RETURN", FrameUrgent: "URGENT",
		FrameBegin: "BEGIN", FrameSection: "SECTION", FrameMemSize: "MEMSIZE", FramePages: "PAGES",
		FrameSectionEnd: "SECTION_END", FrameCommand: "COMMAND", FrameDevice: "DEVICE", FrameEnd: "END",
		FramePackaged: "PACKAGED",
	}
	for v := 0; v < 256; v++ {
		ft := FrameType(v)
		name, known := names[ft]
		if ft.Known() != known {
			t.Errorf("0x%02x: Known() = %v", v, ft.Known())
		}
		if known && ft.String() != name {
			t.Errorf("0x%02x: String() = %q, want %q", v, ft.String(), name)
		}
		if !known && !strings.Contains(ft.String(), "0x") {
			t.Errorf("0x%02x: String() = %q names no number", v, ft.String())
		}
		// Data frames are exactly 0x10…0x18 (PROTOCOL.md §2.2, §7).
		if data := v >= 0x10 && v <= 0x18; ft.IsData() != data {
			t.Errorf("0x%02x: IsData() = %v", v, ft.IsData())
		}
		want := MaxControlPayload
		switch {
		case ft == FrameEnd:
			want = 16<<20 + 9
		case ft == FramePackaged:
			want = 16<<20 + 8
		case ft.IsData():
			want = 2 << 20
		}
		if got := MaxPayloadOf(ft); got != want {
			t.Errorf("MaxPayloadOf(0x%02x) = %d, want %d", v, got, want)
		}
	}
	if len(names) != len(allFrameTypes) {
		t.Fatalf("allFrameTypes lists %d types, the spec %d", len(allFrameTypes), len(names))
	}
}

// TestFramerRoundTrip writes frames of every type with payloads of edge sizes (empty, the
// one-write limit of WriteFrame and one past it, the type's maximum) and reads them back.
func TestFramerRoundTrip(t *testing.T) {
	type frame struct {
		t FrameType
		p []byte
	}
	var frames []frame
	for i, ft := range allFrameTypes {
		for _, n := range []int{0, 1, 512, 513, MaxPayloadOf(ft)} {
			p := make([]byte, n)
			for j := range p {
				p[j] = byte(j*7 + i)
			}
			frames = append(frames, frame{ft, p})
		}
	}
	var buf bytes.Buffer
	w := NewFramer("w", nil, &buf)
	var offsets []int64
	for _, f := range frames {
		offsets = append(offsets, w.WriteOffset())
		if err := w.WriteFrame(f.t, f.p); err != nil {
			t.Fatalf("WriteFrame(%v, %d bytes): %v", f.t, len(f.p), err)
		}
	}
	if w.WriteOffset() != int64(buf.Len()) {
		t.Fatalf("WriteOffset %d, %d bytes written", w.WriteOffset(), buf.Len())
	}
	// The wire format is exactly u8 type, be32 length, payload.
	raw := buf.Bytes()
	for i, f := range frames {
		at := offsets[i]
		if FrameType(raw[at]) != f.t || binary.BigEndian.Uint32(raw[at+1:]) != uint32(len(f.p)) {
			t.Fatalf("frame %d: header % x, want type %v length %d", i, raw[at:at+5], f.t, len(f.p))
		}
	}
	r := NewFramer("r", &buf, nil)
	for i, want := range frames {
		got, err := r.ReadFrame()
		if err != nil {
			t.Fatalf("frame %d (%v, %d bytes): %v", i, want.t, len(want.p), err)
		}
		if got.Type != want.t || !bytes.Equal(got.Payload, want.p) || got.Offset != offsets[i] {
			t.Fatalf("frame %d: got %v of %d bytes at %d, want %v of %d at %d", i, got.Type, len(got.Payload), got.Offset, want.t, len(want.p), offsets[i])
		}
	}
	if r.ReadOffset() != w.WriteOffset() {
		t.Errorf("ReadOffset %d, WriteOffset %d", r.ReadOffset(), w.WriteOffset())
	}
	for range 2 { // a clean end between frames is io.EOF, and it stays
		if _, err := r.ReadFrame(); err != io.EOF {
			t.Fatalf("after the last frame: %v, want io.EOF", err)
		}
	}
}

func TestWriteFrameTooLarge(t *testing.T) {
	for _, ft := range allFrameTypes {
		var buf bytes.Buffer
		fr := NewFramer("w", nil, &buf)
		err := fr.WriteFrame(ft, make([]byte, MaxPayloadOf(ft)+1))
		if !errors.Is(err, ErrFrameTooLarge) {
			t.Errorf("%v: WriteFrame of max+1 bytes: %v", ft, err)
		}
		if buf.Len() != 0 || fr.WriteOffset() != 0 {
			t.Errorf("%v: a refused frame wrote %d bytes", ft, buf.Len())
		}
	}
}

// TestReadFrameChecksLengthFirst: a header announcing more than its type may carry is refused
// from the header alone: the payload is never read and never allocated.
func TestReadFrameChecksLengthFirst(t *testing.T) {
	for _, tc := range []struct {
		t FrameType
		n uint32
	}{
		{FrameDevice, 2 << 30}, {FrameDevice, 0xFFFFFFFF}, {FrameEnd, 2 << 30}, {FrameHello, 2 << 30},
		{FramePages, MaxPayload + 1}, {FrameEnd, MaxEndPayload + 1}, {FramePing, MaxControlPayload + 1},
	} {
		hdr := AppendHeader(nil, tc.t, int(tc.n))
		cr := &countingReader{r: io.MultiReader(bytes.NewReader(hdr), endless{})}
		_, err := NewFramer("data 3", cr, nil).ReadFrame()
		var pe *ProtocolError
		if !errors.As(err, &pe) || !errors.Is(err, ErrFrameTooLarge) {
			t.Fatalf("%v of %d: %v, want a ProtocolError for ErrFrameTooLarge", tc.t, tc.n, err)
		}
		if pe.Type != tc.t || pe.Offset != 0 || pe.Conn != "data 3" {
			t.Errorf("%v of %d: %+v", tc.t, tc.n, pe)
		}
		if cr.n != HeaderSize {
			t.Errorf("%v of %d: read %d bytes, want only the %d of the header", tc.t, tc.n, cr.n, HeaderSize)
		}
		per := allocated(100, func() {
			NewFramer("data 3", io.MultiReader(bytes.NewReader(hdr), endless{}), nil).ReadFrame()
		})
		if per > 2048 {
			t.Errorf("%v of %d: refusing the header allocated %d bytes", tc.t, tc.n, per)
		}
	}
}

// TestProtocolErrorOffset: in a stream of good frames, the bad one is reported at its own offset
// on its connection, with its type when the header could be read; the error is sticky.
func TestProtocolErrorOffset(t *testing.T) {
	var good []byte
	good = AppendHeader(good, FramePing, 24)
	good = (Ping{Nonce: 1}).Append(good)
	good = Begin{Seq: 1, Magic: 0x5145564d, Version: 3, Config: []byte("\x00\x00\x00\x0apc-q35-7.2")}.Append(good)
	second := int64(HeaderSize + 24)
	third := int64(len(good))
	for _, tc := range []struct {
		name  string
		bad   []byte
		ftype FrameType
		want  string
	}{
		{"unknown type", []byte{0x42, 0, 0, 0, 1, 0}, 0, "unknown frame type 0x42"},
		{"unknown type 0x00", []byte{0x00, 0, 0, 0, 0}, 0, "unknown frame type 0x00"},
		{"too large", AppendHeader(nil, FrameSection, MaxPayload+1), FrameSection, "larger than the protocol allows"},
		{"control too large", AppendHeader(nil, FrameStatus, MaxControlPayload+1), FrameStatus, "larger than the protocol allows"},
		{"truncated payload", append(AppendHeader(nil, FrameDevice, 100), make([]byte, 99)...), FrameDevice, io.ErrUnexpectedEOF.Error()},
		{"truncated header", []byte{byte(FrameDevice), 0, 0}, 0, io.ErrUnexpectedEOF.Error()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fr := NewFramer("data 2", bytes.NewReader(append(bytes.Clone(good), tc.bad...)), nil)
			for i, off := range []int64{0, second} {
				f, err := fr.ReadFrame()
				if err != nil || f.Offset != off {
					t.Fatalf("good frame %d: offset %d, %v", i+1, f.Offset, err)
				}
			}
			_, err := fr.ReadFrame()
			var pe *ProtocolError
			if !errors.As(err, &pe) {
				t.Fatalf("third frame: %v, want *ProtocolError", err)
			}
			if pe.Offset != third || pe.Conn != "data 2" || pe.Type != tc.ftype {
				t.Errorf("third frame: %+v, want offset %d, conn data 2, type %v", pe, third, tc.ftype)
			}
			msg := err.Error()
			for _, part := range []string{"data 2 connection", fmt.Sprintf("offset %d:", third), tc.want} {
				if !strings.Contains(msg, part) {
					t.Errorf("%q does not contain %q", msg, part)
				}
			}
			if tc.ftype != 0 && !strings.Contains(msg, tc.ftype.String()+" frame") {
				t.Errorf("%q does not name the %v frame", msg, tc.ftype)
			}
			if _, again := fr.ReadFrame(); again != err {
				t.Errorf("the error is not sticky: then %v", again)
			}
		})
	}
}

// TestReadFrameReaderError: a failing connection is a ProtocolError at the frame it broke.
func TestReadFrameReaderError(t *testing.T) {
	boom := errors.New("connection reset by peer")
	good := (SectionEnd{Seq: 4, ID: 2}).Append(nil)
	fr := NewFramer("control", io.MultiReader(bytes.NewReader(good), &failReader{err: boom}), nil)
	if _, err := fr.ReadFrame(); err != nil {
		t.Fatal(err)
	}
	_, err := fr.ReadFrame()
	var pe *ProtocolError
	if !errors.Is(err, boom) || !errors.As(err, &pe) || pe.Offset != int64(len(good)) {
		t.Fatalf("%v", err)
	}
	if !strings.Contains(err.Error(), "frame header") {
		t.Errorf("%q: a frame whose header was not read is not named", err)
	}
}

type failReader struct{ err error }

func (r *failReader) Read([]byte) (int, error) { return 0, r.err }

type failWriter struct{ err error }

func (w *failWriter) Write([]byte) (int, error) { return 0, w.err }

func TestWriteFrameWriterError(t *testing.T) {
	boom := errors.New("broken pipe")
	fr := NewFramer("w", nil, &failWriter{boom})
	for _, n := range []int{0, 512, 513, 100 << 10} {
		if err := fr.WriteFrame(FrameDevice, make([]byte, n)); !errors.Is(err, boom) {
			t.Errorf("%d bytes: %v", n, err)
		}
	}
	if err := fr.WriteEncoded(deviceFrame(1, nil)); !errors.Is(err, boom) {
		t.Errorf("WriteEncoded: %v", err)
	}
}

// TestWriteEncoded: a frame encoded in place (AppendHeader, payload, SetHeaderLength) is the
// same bytes as WriteFrame makes.
func TestWriteEncoded(t *testing.T) {
	payload := []byte("payload of a DEVICE frame")
	b := AppendHeader([]byte("prefix"), FrameDevice, 0)
	b = append(b, payload...)
	SetHeaderLength(b[len("prefix"):])
	var a, c bytes.Buffer
	NewFramer("a", nil, &a).WriteFrame(FrameDevice, payload)
	fr := NewFramer("c", nil, &c)
	if err := fr.WriteEncoded(b[len("prefix"):]); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), c.Bytes()) || fr.WriteOffset() != int64(c.Len()) {
		t.Fatalf("WriteFrame % x, WriteEncoded % x", a.Bytes(), c.Bytes())
	}
}

func TestFrameSeq(t *testing.T) {
	for _, tc := range []struct {
		f    Frame
		want uint64
	}{
		{Frame{Type: FrameDevice, Payload: []byte{0, 0, 0, 0, 0, 0, 1, 2}}, 0x102},
		{Frame{Type: FrameEnd, Payload: []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1}}, 1<<64 - 1},
		{Frame{Type: FrameDevice, Payload: []byte{0, 0, 0, 0, 0, 0, 1}}, 0},   // short
		{Frame{Type: FrameReady, Payload: []byte{0, 0, 0, 0, 0, 0, 0, 9}}, 0}, // control
	} {
		if got := tc.f.Seq(); got != tc.want {
			t.Errorf("%v % x: Seq() = %d, want %d", tc.f.Type, tc.f.Payload, got, tc.want)
		}
	}
}

// TestReadFrameAllocation: reading frames into one Framer reuses its buffer.
func TestReadFrameAllocation(t *testing.T) {
	var stream []byte
	for i := range 64 {
		stream = deviceFrameTo(stream, uint64(i+1), 1000+i*100)
	}
	r := bytes.NewReader(stream)
	fr := NewFramer("r", r, nil)
	allocs := testing.AllocsPerRun(20, func() {
		r.Reset(stream)
		fr.roff, fr.rerr = 0, nil
		for {
			if _, err := fr.ReadFrame(); err != nil {
				break
			}
		}
	})
	if allocs > 0 {
		t.Errorf("reading 64 frames allocated %v times", allocs)
	}
}

func deviceFrameTo(dst []byte, seq uint64, n int) []byte {
	st := len(dst)
	dst = append(AppendDeviceHeader(dst, seq), make([]byte, n)...)
	SetHeaderLength(dst[st:])
	return dst
}

// TestFramerTLSClientHello: a plain-text Framer met by a TLS client's first flight (0x16 0x03…,
// whose 0x16 is also DEVICE's type byte) says that the peer speaks TLS, from the header alone.
func TestFramerTLSClientHello(t *testing.T) {
	hello := clientHello(t)
	if hello[0] != 0x16 || hello[1] != 0x03 {
		t.Fatalf("a ClientHello starting % x", hello[:5])
	}
	cr := &countingReader{r: bytes.NewReader(hello)}
	_, err := NewFramer("control", cr, nil).ReadFrame()
	var pe *ProtocolError
	if !errors.As(err, &pe) || pe.Offset != 0 || pe.Conn != "control" {
		t.Fatalf("%v, want a *ProtocolError at offset 0 of the control connection", err)
	}
	if !strings.Contains(err.Error(), "the peer speaks TLS (a TLS handshake record) but this side has --no-tls") {
		t.Errorf("%q does not say the peer speaks TLS", err)
	}
	if cr.n != HeaderSize {
		t.Errorf("read %d bytes of the ClientHello", cr.n)
	}
}
