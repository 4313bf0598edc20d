package stream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

func multifdTestPacket(l MultifdLayout, normal, zero uint32, flags uint32) *MultifdPacket {
	p := &MultifdPacket{Magic: MultifdMagic, Version: MultifdVersion, Flags: flags,
		PagesAlloc: MultifdPageSlots, NormalPages: normal, NextPacketSize: normal * MultifdPageSize, PacketNum: 77}
	if l == MultifdV100 {
		p.ZeroPages = zero
	}
	p.SetBlockName("pc.ram")
	for i := range p.Offsets {
		p.Offsets[i] = uint64(i) * MultifdPageSize
	}
	p.Data = make([]byte, int(normal)*MultifdPageSize)
	for i := range p.Data {
		p.Data[i] = byte(i / MultifdPageSize)
	}
	return p
}

func TestMultifdLayout(t *testing.T) {
	if MultifdPacketHeaderSize != 1344 || MultifdHelloSize != 64 || MultifdDeviceStateHeaderSize != 276 {
		t.Fatalf("sizes %d %d %d", MultifdPacketHeaderSize, MultifdHelloSize, MultifdDeviceStateHeaderSize)
	}
	p := multifdTestPacket(MultifdV100, 2, 3, MultifdFlagSync)
	p.Reserved[27] = 0xee
	b, err := AppendMultifdPacket(nil, p, MultifdV100)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 1344+2*4096 {
		t.Fatalf("len %d", len(b))
	}
	// §4.1 field offsets.
	for _, c := range []struct {
		off  int
		want uint32
	}{{0, MultifdMagic}, {4, 1}, {8, 1}, {12, 128}, {16, 2}, {20, 8192}, {32, 3}} {
		if v := binary.BigEndian.Uint32(b[c.off:]); v != c.want {
			t.Errorf("be32 at %d = %d, want %d", c.off, v, c.want)
		}
	}
	if binary.BigEndian.Uint64(b[24:]) != 77 || b[63] != 0xee || string(b[64:70]) != "pc.ram" || b[70] != 0 ||
		binary.BigEndian.Uint64(b[320+8:]) != 4096 || b[1344+4096] != 1 {
		t.Errorf("layout wrong")
	}
	h := MultifdHello{Magic: MultifdMagic, Version: MultifdVersion, ChannelID: 1}
	h.UUID[0], h.Reserved[38] = 0x11, 0x22
	hb := h.Append(nil)
	if len(hb) != 64 || hb[8] != 0x11 || hb[24] != 1 || hb[63] != 0x22 {
		t.Errorf("hello % x", hb)
	}
	h2, err := ParseMultifdHello(hb, 0)
	if err != nil || *h2 != h {
		t.Errorf("hello round trip %+v %v", h2, err)
	}
}

func TestMultifdRoundTrip(t *testing.T) {
	for _, l := range []MultifdLayout{MultifdV72, MultifdV100} {
		var buf bytes.Buffer
		w := NewMultifdWriter(&buf, l)
		h := &MultifdHello{Magic: MultifdMagic, Version: MultifdVersion, ChannelID: 3}
		if err := w.WriteHello(h); err != nil {
			t.Fatal(err)
		}
		pkts := []*MultifdPacket{
			multifdTestPacket(l, 128, 0, 0),
			multifdTestPacket(l, 0, 5, 0),
			multifdTestPacket(l, 0, 0, MultifdFlagSync),
			multifdTestPacket(l, 1, 0, MultifdFlagZlib),
		}
		pkts[3].NextPacketSize = 17
		pkts[3].Data = bytes.Repeat([]byte{0x78}, 17)
		if l == MultifdV100 {
			ds := &MultifdPacket{Magic: MultifdMagic, Version: MultifdVersion, Flags: MultifdFlagDeviceState, InstanceID: 9, NextPacketSize: 5, Data: []byte("state")}
			ds.SetBlockName("0000:00:02.0/vfio")
			pkts = append(pkts, ds)
		}
		for _, p := range pkts {
			if err := w.WritePacket(p); err != nil {
				t.Fatal(err)
			}
		}
		bad := multifdTestPacket(l, 2, 0, 0)
		bad.Data = bad.Data[:100]
		if err := w.WritePacket(bad); err == nil {
			t.Errorf("%v: inconsistent payload accepted", l)
		}
		data := buf.Bytes()
		r := NewMultifdReader(bytes.NewReader(data), l, MultifdLimits{})
		h2, err := r.ReadHello()
		if err != nil || *h2 != *h {
			t.Fatalf("hello %v %v", h2, err)
		}
		var out bytes.Buffer
		w2 := NewMultifdWriter(&out, l)
		_ = w2.WriteHello(h2)
		// The same packets again to a writer that takes slices (a socket's writev): one call
		// per packet with a payload, and the same bytes.
		vw := &vectorRecorder{}
		w3 := NewMultifdWriter(vw, l)
		_ = w3.WriteHello(h2)
		vectored := 0
		for i := 0; ; i++ {
			p, err := r.Next()
			if err == io.EOF {
				if i != len(pkts) {
					t.Errorf("%v: %d packets, want %d", l, i, len(pkts))
				}
				break
			}
			if err != nil {
				t.Fatalf("%v packet %d: %v", l, i, err)
			}
			if p.BlockName() != pkts[i].BlockName() || p.InstanceID != pkts[i].InstanceID || !bytes.Equal(p.Data, pkts[i].Data) {
				t.Errorf("%v packet %d differs", l, i)
			}
			if err := w2.WritePacket(p); err != nil {
				t.Fatal(err)
			}
			if err := w3.WritePacket(p); err != nil {
				t.Fatal(err)
			}
			if len(p.Data) > 0 {
				vectored++
			}
		}
		if !bytes.Equal(out.Bytes(), data) {
			t.Errorf("%v: re-encoding differs", l)
		}
		if !bytes.Equal(vw.b.Bytes(), data) || vw.calls != vectored || w3.Offset() != int64(len(data)) {
			t.Errorf("%v: vectored re-encoding: %d bytes (want %d) in %d WriteBuffers calls (want %d), offset %d",
				l, vw.b.Len(), len(data), vw.calls, vectored, w3.Offset())
		}
	}
}

func TestMultifdErrors(t *testing.T) {
	base, _ := AppendMultifdPacket(nil, multifdTestPacket(MultifdV100, 1, 0, 0), MultifdV100)
	type mod struct {
		name string
		off  int
		val  uint32
		want error
	}
	for _, m := range []mod{
		{"magic", 0, 0x11223345, nil},
		{"version", 4, 2, nil},
		{"pages_alloc", 12, 129, ErrTooLarge},
		{"normal", 16, 129, ErrTooLarge},
		{"zero", 32, 128, ErrTooLarge},
		{"compressed size", 8, MultifdFlagZlib, ErrTooLarge},
	} {
		b := append([]byte(nil), base...)
		binary.BigEndian.PutUint32(b[m.off:], m.val)
		if m.name == "compressed size" {
			binary.BigEndian.PutUint32(b[20:], 1<<30)
		}
		_, err := NewMultifdReader(bytes.NewReader(b), MultifdV100, MultifdLimits{}).Next()
		var e *Error
		if !errors.As(err, &e) || (m.want != nil && !errors.Is(err, m.want)) {
			t.Errorf("%s: %v", m.name, err)
		}
	}
	// zero_pages is reserved in 7.2: not checked.
	b := append([]byte(nil), base...)
	binary.BigEndian.PutUint32(b[32:], 1000)
	if _, err := NewMultifdReader(bytes.NewReader(b), MultifdV72, MultifdLimits{}).Next(); err != nil {
		t.Errorf("7.2 zero_pages: %v", err)
	}
	for _, n := range []int{1, 11, 12, 100, 1344, 1344 + 4095} {
		_, err := NewMultifdReader(bytes.NewReader(base[:n]), MultifdV100, MultifdLimits{}).Next()
		if !errors.Is(err, ErrUnexpectedEOF) {
			t.Errorf("truncated at %d: %v", n, err)
		}
	}
	if _, err := NewMultifdReader(bytes.NewReader(nil), MultifdV100, MultifdLimits{}).Next(); err != io.EOF {
		t.Errorf("empty: %v", err)
	}
	if _, err := NewMultifdReader(bytes.NewReader(make([]byte, 64)), MultifdV100, MultifdLimits{}).ReadHello(); err == nil {
		t.Errorf("zero hello accepted")
	}
}

// TestMultifdAllocs checks that Next does not allocate per packet after warm-up.
func TestMultifdAllocs(t *testing.T) {
	var data []byte
	for i := 0; i < 4; i++ {
		data, _ = AppendMultifdPacket(data, multifdTestPacket(MultifdV100, 128, 0, 0), MultifdV100)
	}
	br := bytes.NewReader(data)
	r := NewMultifdReader(br, MultifdV100, MultifdLimits{})
	if _, err := r.Next(); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := r.Next(); err != nil {
			br.Reset(data)
		}
	})
	if allocs > 0 {
		t.Errorf("%v allocations per packet", allocs)
	}
}

// multifdTestChannels lists the channel captures of testdata/streams with the packet layout of
// the QEMU that made them (NAME.json "qemu").
func multifdTestChannels(t testing.TB) map[string]MultifdLayout {
	out := map[string]MultifdLayout{}
	for _, c := range streamtest.Captures(t) {
		l := MultifdV100
		if strings.HasPrefix(c.Meta.QEMU, "7.") {
			l = MultifdV72
		}
		for _, ch := range c.Channels {
			out[ch] = l
		}
	}
	return out
}

// TestMultifdReal reads every recorded channel, checks the hello and packet invariants and
// re-encodes the channel byte-identically.
func TestMultifdReal(t *testing.T) {
	chans := multifdTestChannels(t)
	if len(chans) == 0 {
		t.Fatal("no multifd channel captures in testdata/streams")
	}
	for f, l := range chans {
		t.Run(filepath.Base(f)+"/"+l.String(), func(t *testing.T) {
			data, err := vmdescTestRead(f)
			if err != nil {
				t.Fatal(err)
			}
			r := NewMultifdReader(bytes.NewReader(data), l, MultifdLimits{})
			h, err := r.ReadHello()
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			w := NewMultifdWriter(&out, l)
			_ = w.WriteHello(h)
			var n, pages, zeros, syncs int
			for {
				p, err := r.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				n++
				pages += int(p.NormalPages)
				zeros += int(p.ZeroPages)
				if p.Sync() {
					syncs++
				}
				if err := w.WritePacket(p); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(out.Bytes(), data) {
				t.Errorf("re-encoding differs")
			}
			if l == MultifdV72 && zeros != 0 {
				t.Errorf("7.2 channel with zero_pages bytes set")
			}
			t.Logf("channel %d: %d packets, %d normal pages, %d zero pages, %d SYNC", h.ChannelID, n, pages, zeros, syncs)
		})
	}
}

// BenchmarkMultifdNext reads full 128-page packets.
func BenchmarkMultifdNext(b *testing.B) {
	pkt, _ := AppendMultifdPacket(nil, multifdTestPacket(MultifdV100, 128, 0, 0), MultifdV100)
	br := bytes.NewReader(pkt)
	r := NewMultifdReader(br, MultifdV100, MultifdLimits{})
	b.SetBytes(int64(len(pkt)))
	b.ReportAllocs()
	for b.Loop() {
		br.Reset(pkt)
		if _, err := r.Next(); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzMultifd fuzzes the channel reader: errors are *Error (or io.EOF at a packet boundary) and
// every packet read re-encodes to exactly the bytes it was read from.
func FuzzMultifd(f *testing.F) {
	h := &MultifdHello{Magic: MultifdMagic, Version: MultifdVersion, ChannelID: 1}
	p1, _ := AppendMultifdPacket(h.Append(nil), multifdTestPacket(MultifdV100, 1, 2, 0), MultifdV100)
	p2, _ := AppendMultifdPacket(nil, multifdTestPacket(MultifdV72, 0, 0, MultifdFlagSync), MultifdV72)
	ds := &MultifdPacket{Magic: MultifdMagic, Version: MultifdVersion, Flags: MultifdFlagDeviceState, NextPacketSize: 3, Data: []byte("abc")}
	p3, _ := AppendMultifdPacket(nil, ds, MultifdV100)
	f.Add(p1, true, true)
	f.Add(p2, false, false)
	f.Add(p3, false, true)
	f.Fuzz(func(t *testing.T, data []byte, hello, v100 bool) {
		l := MultifdV72
		if v100 {
			l = MultifdV100
		}
		r := NewMultifdReader(bytes.NewReader(data), l, MultifdLimits{MaxCompressedSize: 1 << 16, MaxDeviceStateSize: 1 << 16})
		var out []byte
		if hello {
			h, err := r.ReadHello()
			if err != nil {
				var e *Error
				if !errors.As(err, &e) {
					t.Fatalf("ReadHello: %v", err)
				}
				return
			}
			out = h.Append(out)
		}
		for {
			start := r.Offset()
			p, err := r.Next()
			if err == io.EOF {
				if start != int64(len(data)) {
					t.Fatalf("EOF at %d of %d", start, len(data))
				}
				break
			}
			if err != nil {
				var e *Error
				if !errors.As(err, &e) {
					t.Fatalf("Next: %v", err)
				}
				break
			}
			out, err = AppendMultifdPacket(out, p, l)
			if err != nil {
				t.Fatalf("re-encode: %v", err)
			}
			if !bytes.Equal(out, data[:r.Offset()]) {
				t.Fatalf("re-encoding differs at packet starting %d", start)
			}
		}
	})
}

// vectorRecorder is a BuffersWriter that keeps what it was given and counts the calls.
type vectorRecorder struct {
	b     bytes.Buffer
	calls int
}

func (v *vectorRecorder) Write(p []byte) (int, error) { return v.b.Write(p) }

func (v *vectorRecorder) WriteBuffers(bufs *net.Buffers) (int64, error) {
	v.calls++
	return bufs.WriteTo(&v.b)
}
