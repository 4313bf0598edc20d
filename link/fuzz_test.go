package link

import (
	"bytes"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

// The fuzz targets of the link's decoders (make fuzz; go test -fuzz FuzzX ./link/). Their seed
// corpora in testdata/fuzz/<Target>/ are real frames made by this package's encoders
// (go test ./link/ -run TestFuzzSeeds -update-seeds rewrites them); plain go test runs every
// seed.

var updateSeeds = flag.Bool("update-seeds", false, "rewrite the seed corpora in testdata/fuzz")

// FuzzReadFrame: any bytes through a Framer give frames and then io.EOF or a *ProtocolError at
// the offset of the frame that failed, never a panic; the frames read re-encode to exactly the
// bytes they were read from.
func FuzzReadFrame(f *testing.F) {
	for _, s := range readFrameSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := NewFramer("data 1", bytes.NewReader(data), nil)
		var out bytes.Buffer
		w := NewFramer("out", nil, &out)
		var off int64
		for {
			fm, err := fr.ReadFrame()
			if err != nil {
				if err == io.EOF {
					if off != int64(len(data)) {
						t.Fatalf("io.EOF at %d of %d bytes", off, len(data))
					}
				} else {
					var pe *ProtocolError
					if !errors.As(err, &pe) {
						t.Fatalf("%T %v, want *ProtocolError", err, err)
					}
					if pe.Offset != off || pe.Conn != "data 1" || off >= int64(len(data)) {
						t.Fatalf("%v: offset %d, the frame began at %d of %d", err, pe.Offset, off, len(data))
					}
				}
				if _, again := fr.ReadFrame(); again != err {
					t.Fatalf("not sticky: %v, then %v", err, again)
				}
				break
			}
			if fm.Offset != off || !fm.Type.Known() || len(fm.Payload) > MaxPayloadOf(fm.Type) {
				t.Fatalf("frame %v of %d bytes at %d, expected at %d", fm.Type, len(fm.Payload), fm.Offset, off)
			}
			if err := w.WriteFrame(fm.Type, fm.Payload); err != nil {
				t.Fatalf("a frame read does not write: %v", err)
			}
			off += HeaderSize + int64(len(fm.Payload))
			if fr.ReadOffset() != off {
				t.Fatalf("ReadOffset %d, want %d", fr.ReadOffset(), off)
			}
		}
		if !bytes.Equal(out.Bytes(), data[:off]) {
			t.Fatal("the frames re-encode differently")
		}
	})
}

// dataParsers are the parsers FuzzDataFrames feeds (PAGES has its own target).
var dataParsers = []FrameType{FrameBegin, FrameSection, FrameMemSize, FrameSectionEnd, FrameCommand, FrameDevice, FrameEnd, FramePackaged}

// FuzzDataFrames: a payload goes to every data frame parser; each refuses it with an error that
// names its frame type, or decodes something that re-encodes to the same bytes.
func FuzzDataFrames(f *testing.F) {
	for _, s := range dataFrameSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		for _, ft := range dataParsers {
			v, err := parseData(ft, p)
			if err != nil {
				if !strings.HasPrefix(err.Error(), ft.String()+": ") {
					t.Fatalf("%v: error %q does not name the frame", ft, err)
				}
				continue
			}
			b := v.Append(nil)
			if FrameType(b[0]) != ft || int(uint32(b[1])<<24|uint32(b[2])<<16|uint32(b[3])<<8|uint32(b[4])) != len(b)-HeaderSize {
				t.Fatalf("%v: re-encoded header % x", ft, b[:HeaderSize])
			}
			if !bytes.Equal(b[HeaderSize:], p) {
				t.Fatalf("%v: decoded %.200s, which re-encodes differently:\n in  %x\n out %x", ft, fmt.Sprintf("%+v", v), p, b[HeaderSize:])
			}
		}
	})
}

// FuzzPages: the Decoder on any payload refuses it or decodes a batch within the limits, never
// allocating more than one largest batch; what decodes re-encodes, with every codec, to the same
// entries and data (and with none, to the same bytes when it came with none).
func FuzzPages(f *testing.F) {
	for _, s := range pagesSeeds(f) {
		f.Add(s)
	}
	dec := NewDecoder()
	defer dec.Close()
	enc := NewEncoder()
	f.Fuzz(func(t *testing.T, p []byte) {
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		pg, err := dec.ParsePages(p)
		runtime.ReadMemStats(&m1)
		if n := m1.TotalAlloc - m0.TotalAlloc; n > decodeBound {
			t.Fatalf("ParsePages allocated %d bytes for %d (err %v)", n, len(p), err)
		}
		if err != nil {
			if !strings.HasPrefix(err.Error(), "PAGES") {
				t.Fatalf("error %q does not name the frame", err)
			}
			return
		}
		if len(pg.Entries) > MaxBatchEntries || len(pg.Data) > MaxBatchData || pg.Codec > CodecLZ4 {
			t.Fatalf("decoded %d entries, %d data bytes, codec %v", len(pg.Entries), len(pg.Data), pg.Codec)
		}
		b := Batch{Block: pg.Block, Entries: slices.Clone(pg.Entries), Data: bytes.Clone(pg.Data)}
		for _, c := range allCodecs {
			frame, used := enc.AppendPages(nil, pg.Seq, &b, c)
			if c == CodecNone && pg.Codec == CodecNone && !bytes.Equal(frame[HeaderSize:], p) {
				t.Fatalf("re-encoded with none differently:\n in  %x\n out %x", p, frame[HeaderSize:])
			}
			again, err := dec.ParsePages(frame[HeaderSize:])
			if err != nil {
				t.Fatalf("re-encoded with %v (used %v), refused: %v", c, used, err)
			}
			if again.Seq != pg.Seq || again.Block != b.Block || !slices.Equal(again.Entries, b.Entries) || !bytes.Equal(again.Data, b.Data) {
				t.Fatalf("re-encoded with %v (used %v), decodes differently", c, used)
			}
		}
	})
}

// FuzzHello: a payload goes to ParseHello, ParseWelcome, ParsePing and ParseError; what parses
// re-encodes to something that parses to the same (PING and ERROR: to the same bytes; HELLO and
// WELCOME carry JSON, whose spelling may change once and then no more).
func FuzzHello(f *testing.F) {
	for _, s := range helloSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		if h, err := ParseHello(p); err == nil {
			b, err := AppendHello(nil, h)
			if err != nil {
				t.Fatal(err)
			}
			h2, err := ParseHello(b)
			if err != nil {
				t.Fatalf("HELLO %q re-encoded as %q, refused: %v", p, b, err)
			}
			b2, _ := AppendHello(nil, h2)
			if !bytes.Equal(b, b2) || h2.MinVersion != h.MinVersion || h2.MaxVersion != h.MaxVersion || h2.Role != h.Role ||
				h2.Connections != h.Connections || h2.Session != h.Session || h2.Index != h.Index {
				t.Fatalf("HELLO %q: %q then %q", p, b, b2)
			}
		}
		if w, err := ParseWelcome(p); err == nil {
			b, err := AppendWelcome(nil, w)
			if err != nil {
				t.Fatal(err)
			}
			w2, err := ParseWelcome(b)
			if err != nil {
				t.Fatalf("WELCOME %q re-encoded as %q, refused: %v", p, b, err)
			}
			b2, _ := AppendWelcome(nil, w2)
			if !bytes.Equal(b, b2) || w2.Version != w.Version || w2.Session != w.Session || w2.Connections != w.Connections {
				t.Fatalf("WELCOME %q: %q then %q", p, b, b2)
			}
		}
		if pg, err := ParsePing(p); err == nil {
			if b := pg.Append(nil); !bytes.Equal(b, p) {
				t.Fatalf("PING % x re-encoded as % x", p, b)
			}
		}
		if re, err := ParseError(p); err == nil {
			if b := AppendError(nil, re.Code, re.Message); !bytes.Equal(b, p) {
				t.Fatalf("ERROR %q re-encoded as %q", p, b)
			}
		}
	})
}

// ---------------------------------------------------------------------------------------------
// Seeds: real frames.

// seedControlFrames are the control frames of one link, in a plausible order.
func seedControlFrames(t testing.TB) [][]byte {
	hello, _ := AppendHello(nil, Hello{MinVersion: 1, MaxVersion: 1, Role: "control", Connections: 4, Compress: CodecNames(),
		Source: &Endpoint{QEMU: "7.2.22", Machine: "pc-q35-7.2", RAM: 1 << 30, Status: "running"}, Sidecar: "v1"})
	dataHello, _ := AppendHello(nil, Hello{MinVersion: 1, MaxVersion: 1, Role: "data", Session: "00112233445566778899aabbccddeeff", Index: 2})
	welcome, _ := AppendWelcome(nil, Welcome{Version: 1, Session: "00112233445566778899aabbccddeeff", Connections: 4,
		Compress: CodecNames(), Destination: &Endpoint{QEMU: "10.0.2", Status: "inmigrate"}})
	delivered, _ := AppendJSON(nil, Delivered{State: "delivered", BytesOut: 123456789, DeliveredMs: 42})
	status, _ := AppendJSON(nil, Delivered{State: "running"})
	frame := func(ft FrameType, p []byte) []byte { return append(AppendHeader(nil, ft, len(p)), p...) }
	return [][]byte{
		frame(FrameHello, hello), frame(FrameHello, dataHello), frame(FrameWelcome, welcome),
		frame(FramePing, Ping{Nonce: 3, Received: 1 << 20, Applied: 77}.Append(nil)),
		frame(FramePong, Ping{Nonce: 3}.Append(nil)[:8]),
		frame(FrameReady, payload(uint64(1234))), frame(FrameCommit, nil), frame(FrameDelivered, delivered),
		frame(FrameStatus, status), frame(FrameError, AppendError(nil, CodeRefused, "the destination QEMU is not in inmigrate")),
	}
}

// seedPagesFrames are small PAGES frames of real page data with every codec.
func seedPagesFrames(t testing.TB) [][]byte {
	real, text := realPages(t), textPages(t)
	deltas := xbzrleDeltas(t, 4)
	var b Batch
	b.Reset(1)
	b.Page(0x10000, real[5])
	b.Zero(0x11000)
	b.XBZRLE(0x12000, deltas[0])
	b.Page(0x13000, text[0])
	b.Zero(0x14000)
	enc := NewEncoder()
	var frames [][]byte
	for _, c := range allCodecs {
		f, _ := enc.AppendPages(nil, 9, &b, c)
		frames = append(frames, f)
	}
	var z Batch
	z.Reset(0)
	z.Zero(0)
	f, _ := enc.AppendPages(nil, 10, &z, CodecNone)
	return append(frames, f)
}

// seedDataFrames are the data frames of one small stream.
func seedDataFrames(t testing.TB) [][]byte {
	var frames [][]byte
	for _, v := range []dataFrame{
		Begin{Seq: 1, Magic: 0x5145564d, Version: 3, Config: config},
		Section{Seq: 2, Type: StartSection, ID: 2, Idstr: "ram", Instance: 0, Version: 4},
		MemSize{Seq: 3, Blocks: []Block{{Name: "pc.ram", UsedLength: 1 << 30}, {Name: "/rom@etc/acpi/tables", UsedLength: 0x20000, HasPageSize: true, PageSize: 4096},
			{Name: "0000:00:01.0/vga.vram", UsedLength: 16 << 20, HasGPA: true, GPA: 0xfd000000}}},
		SectionEnd{Seq: 5, ID: 2},
		Section{Seq: 6, Type: PartSection, ID: 2},
		Section{Seq: 7, Type: EndSection, ID: 2},
		Command{Seq: 8, Cmd: 2, Payload: []byte{0, 0, 0, 1}},
		deviceAppender{Seq: 9, Data: []byte("\x04\x00\x00\x00\x03\x05timer\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x7e\x00\x00\x00\x03")},
		End{Seq: 10, HasVMDesc: true, VMDesc: []byte(`{"page_size":4096,"devices":[{"name":"timer","instance_id":0}]}`)},
		End{Seq: 10},
		// The postcopy switch's package: LISTEN, RUN (feature postcopy, PROTOCOL.md §7).
		packagedAppender{Seq: 11, Data: []byte("\x08\x00\x04\x00\x00\x08\x00\x05\x00\x00")},
	} {
		frames = append(frames, v.Append(nil))
	}
	pages := seedPagesFrames(t)
	return slices.Insert(frames, 3, pages...)
}

// clientHello is the first flight of a Go TLS client, as a plain-text receiver sees it.
func clientHello(t testing.TB) []byte {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go tls.Client(a, &tls.Config{ServerName: "qmg-dst.test", MinVersion: tls.VersionTLS13}).Handshake()
	b.SetReadDeadline(time.Now().Add(testWait))
	buf := make([]byte, 4096)
	n, err := b.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return buf[:n]
}

func readFrameSeeds(t testing.TB) map[string][]byte {
	ctl, data := seedControlFrames(t), seedDataFrames(t)
	seeds := map[string][]byte{
		"control-stream": bytes.Join(ctl, nil),
		"data-stream":    bytes.Join(data, nil),
		"tls-hello":      clientHello(t),
		"qemu-stream":    []byte("QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0apc-q35-7.2\x00"),
		"truncated":      bytes.Join(data, nil)[:200],
		"huge-header":    AppendHeader(nil, FrameDevice, 2<<30),
	}
	return seeds
}

func dataFrameSeeds(t testing.TB) map[string][]byte {
	seeds := map[string][]byte{}
	for i, fm := range seedDataFrames(t) {
		if FrameType(fm[0]) != FramePages {
			seeds[fmt.Sprintf("%02d-%s", i, strings.ToLower(FrameType(fm[0]).String()))] = fm[HeaderSize:]
		}
	}
	return seeds
}

func pagesSeeds(t testing.TB) map[string][]byte {
	seeds := map[string][]byte{}
	for i, fm := range seedPagesFrames(t) {
		name := "one-zero"
		if i < len(allCodecs) {
			name = allCodecs[i].String() + "-asked"
		}
		seeds[name] = fm[HeaderSize:]
	}
	return seeds
}

func helloSeeds(t testing.TB) map[string][]byte {
	names := []string{"hello", "hello-data", "welcome", "ping", "pong", "ready", "commit", "delivered", "status", "error"}
	seeds := map[string][]byte{}
	for i, fm := range seedControlFrames(t) {
		seeds[names[i]] = fm[HeaderSize:]
	}
	return seeds
}

// TestFuzzSeeds checks the seed corpora of testdata/fuzz: each file holds one []byte in the
// format of go test's corpus, and every target has seeds; -update-seeds rewrites them from
// the encoders (the page data comes from the captured streams and the ClientHello is fresh each
// time, so the files are not compared with what the encoders make now).
func TestFuzzSeeds(t *testing.T) {
	targets := map[string]map[string][]byte{
		"FuzzReadFrame":  readFrameSeeds(t),
		"FuzzDataFrames": dataFrameSeeds(t),
		"FuzzPages":      pagesSeeds(t),
		"FuzzHello":      helloSeeds(t),
	}
	for target, seeds := range targets {
		dir := filepath.Join("testdata", "fuzz", target)
		if *updateSeeds {
			if err := os.RemoveAll(dir); err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			for name, s := range seeds {
				if err := os.WriteFile(filepath.Join(dir, "seed-"+name), corpusFile(s), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
		files, _ := filepath.Glob(filepath.Join(dir, "*"))
		if len(files) < len(seeds) {
			t.Errorf("%s: %d seed files, want at least %d (go test ./link/ -run TestFuzzSeeds -update-seeds)", target, len(files), len(seeds))
		}
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(b, []byte("go test fuzz v1\n[]byte(")) || bytes.Count(b, []byte("\n")) != 2 {
				t.Errorf("%s: not a corpus file of one []byte", f)
			}
		}
	}
}

// corpusFile is go test's corpus file of one []byte argument.
func corpusFile(b []byte) []byte {
	return fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", b)
}
