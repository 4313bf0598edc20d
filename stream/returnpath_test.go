package stream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"runtime"
	"strings"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// rpSpan is one decoded return-path message with the items a truncation can fall into: the
// message itself (header and payload), and for RECV_BITMAP the size field, the bitmap and the
// end mark, each with its own start offset (where RPReader reports a cut inside it).
type rpSpan struct {
	typ   RPType
	value uint32
	block string
	start uint64
	items [][2]int64 // [start, end) of each item
	bits  []byte     // RECV_BITMAP: a copy of the bitmap
}

func (s rpSpan) end() int64 { return s.items[len(s.items)-1][1] }

// decodeRP decodes a whole return path, re-encodes every message with an RPWriter and returns
// the messages and the re-encoded bytes.
func decodeRP(data []byte, opts ...RPOption) ([]rpSpan, []byte, error) {
	var out bytes.Buffer
	r := NewRPReader(bytes.NewReader(data), opts...)
	w := NewRPWriter(&out)
	var spans []rpSpan
	for {
		m, err := r.Next()
		if err == io.EOF {
			return spans, out.Bytes(), nil
		}
		if err != nil {
			return spans, out.Bytes(), err
		}
		if err := w.WriteMessage(m); err != nil {
			// Not an *Error: every caller fails on it.
			return spans, out.Bytes(), fmt.Errorf("WriteMessage(%s at %d) refused a decoded message: %w", m.Type, m.Offset, err)
		}
		s := rpSpan{typ: m.Type, value: m.Value, block: m.Block, start: m.Start}
		hl := int64(4 + be16(data[m.Offset+2:]))
		s.items = append(s.items, [2]int64{m.Offset, m.Offset + hl})
		if m.Type == RPRecvBitmap {
			p := m.Offset + hl
			n := int64(len(m.Bitmap))
			s.items = append(s.items, [2]int64{p, p + 8}, [2]int64{p + 8, p + 8 + n}, [2]int64{p + 8 + n, p + 16 + n})
			s.bits = append([]byte(nil), m.Bitmap...)
		}
		if s.end() != r.Offset() {
			return spans, out.Bytes(), fmt.Errorf("message %s at %d ends at %d, reader at %d", m.Type, m.Offset, s.end(), r.Offset())
		}
		spans = append(spans, s)
	}
}

// rpCapture is one return-path recording of a postcopy capture with what the main streams say
// about it.
type rpCapture struct {
	name string
	key  string // streamtest.PostcopyRP or PostcopyResumeRP
	data []byte
	pc   *pcSummary
	cut  bool // the connection was cut (recovery): no SHUT, may end mid-message
}

func rpCaptures(t *testing.T) []rpCapture {
	var out []rpCapture
	for _, c := range streamtest.PostcopyCaptures(t) {
		pc := postcopySummary(t, c)
		for _, key := range []string{streamtest.PostcopyRP, streamtest.PostcopyResumeRP} {
			if data := c.Read(t, key); data != nil {
				cut := key == streamtest.PostcopyRP && c.Meta.Files[streamtest.PostcopyResume] != ""
				out = append(out, rpCapture{c.Name, key, data, pc, cut})
			}
		}
	}
	return out
}

// TestRPRealRoundTrip decodes every captured return path, with the checks of a QEMU source
// against the capture's RAM blocks, and re-encodes it byte for byte; the messages must be what
// the migration did: a PONG for every PING of the main stream, as many page requests as the
// source's postcopy-requests counter, every requested page sent afterwards, a RECV_BITMAP for
// every RECV_BITMAP command of a recovery (whose clear bits are exactly the pages the resumed
// stream carries), RESUME_ACK for POSTCOPY_RESUME, and SHUT(0) last.
func TestRPRealRoundTrip(t *testing.T) {
	requests := map[string]int64{}
	for _, rc := range rpCaptures(t) {
		t.Run(rc.name+"/"+rc.key, func(t *testing.T) {
			pc := rc.pc
			spans, out, err := decodeRP(rc.data, WithRPBlocks(pc.blocks))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out, rc.data) {
				t.Fatalf("re-encoded return path differs (%d vs %d bytes)", len(out), len(rc.data))
			}
			n := map[RPType]int{}
			var pongs []uint32
			for i, s := range spans {
				n[s.typ]++
				switch s.typ {
				case RPPong:
					pongs = append(pongs, s.value)
				case RPReqPages, RPReqPagesID:
					requests[rc.name]++
					if !pc.sentAfterPackage[pageKey{s.block, s.start}] {
						t.Errorf("page %s@0x%x requested at %d was never sent in postcopy", s.block, s.start, s.items[0][0])
					}
				case RPShut:
					if i != len(spans)-1 || s.value != 0 {
						t.Errorf("SHUT(%d) at %d is not the last message (%d of %d)", s.value, s.items[0][0], i+1, len(spans))
					}
				}
			}
			t.Logf("%v", n)
			resumed := rc.key == streamtest.PostcopyResumeRP
			if !resumed {
				// PING 3 travels in the package and is answered after PING 4, which the listen
				// thread reads while the main thread still loads the devices: compare as sets.
				if fmt.Sprint(sortedU32(pongs)) != fmt.Sprint(sortedU32(pc.pings)) {
					t.Errorf("PONGs %v, the main stream PINGs %v", pongs, pc.pings)
				}
				if n[RPRecvBitmap] != 0 || n[RPResumeAck] != 0 {
					t.Errorf("recovery messages on the first connection: %v", n)
				}
			} else {
				if len(pongs) != len(pc.resumePings) {
					t.Errorf("PONGs %v after the recovery, PINGs %v", pongs, pc.resumePings)
				}
				var blocks []string
				for _, s := range spans {
					if s.typ == RPRecvBitmap {
						blocks = append(blocks, s.block)
						checkResumeBitmap(t, pc, s)
					}
				}
				if fmt.Sprint(blocks) != fmt.Sprint(pc.recvBitmapCmds) {
					t.Errorf("RECV_BITMAP messages for %v, commands for %v", blocks, pc.recvBitmapCmds)
				}
				if n[RPResumeAck] != 1 || !pc.resumeCmd {
					t.Errorf("%d RESUME_ACK for POSTCOPY_RESUME sent: %v", n[RPResumeAck], pc.resumeCmd)
				}
			}
			if wantShut := !rc.cut; (n[RPShut] == 1) != wantShut {
				t.Errorf("%d SHUT messages, want %v", n[RPShut], wantShut)
			}
			if n[RPReqPagesID] == 0 {
				t.Errorf("no REQ_PAGES_ID: the destination requested no page")
			}
		})
	}
	for _, c := range streamtest.PostcopyCaptures(t) {
		if got, want := requests[c.Name], c.Meta.RAM.PostcopyRequests; got != want {
			t.Errorf("%s: %d page requests on the return path(s), the source counted %d", c.Name, got, want)
		}
	}
}

// checkResumeBitmap compares a RECV_BITMAP bitmap with the resumed main stream: the source
// resends exactly the pages whose bit is clear (ram_dirty_bitmap_reload: dirty = not received).
func checkResumeBitmap(t *testing.T, pc *pcSummary, s rpSpan) {
	t.Helper()
	var length uint64
	for _, b := range pc.blocks {
		if b.Name == s.block {
			length = b.UsedLength
		}
	}
	m := RPMessage{Bitmap: s.bits}
	missing, mismatch := 0, 0
	for i := uint64(0); i < length/4096; i++ {
		if !m.Received(i) {
			missing++
		}
		if m.Received(i) == pc.sentAfterResume[pageKey{s.block, i * 4096}] {
			mismatch++
		}
	}
	if mismatch != 0 {
		t.Errorf("block %s: %d pages where the bitmap (%d pages not received) and the resumed stream disagree", s.block, mismatch, missing)
	}
	t.Logf("block %s: %d of %d pages not received, all resent", s.block, missing, length/4096)
}

func sortedU32(v []uint32) []uint32 {
	s := append([]uint32(nil), v...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s
}

// TestRPTruncation cuts every captured return path at every offset (the largest one at a
// sample): a cut between messages ends cleanly with the messages before it; any other cut is an
// *Error wrapping ErrUnexpectedEOF at the start of the item cut (message, bitmap size, bitmap,
// end mark), never a panic, a hang or a large allocation.
func TestRPTruncation(t *testing.T) {
	for _, rc := range rpCaptures(t) {
		t.Run(rc.name+"/"+rc.key, func(t *testing.T) {
			data := rc.data
			spans, _, err := decodeRP(data)
			if err != nil {
				t.Fatal(err)
			}
			var cuts []int64
			if len(data) <= 8<<10 || testing.Short() && len(data) <= 2<<10 {
				for c := int64(0); c < int64(len(data)); c++ {
					cuts = append(cuts, c)
				}
			} else {
				rng := rand.New(rand.NewSource(hostileSeed))
				for c := int64(0); c < 600; c++ {
					cuts = append(cuts, c, int64(len(data))-1-c)
				}
				for range 400 {
					cuts = append(cuts, rng.Int63n(int64(len(data))))
				}
			}
			for _, c := range cuts {
				want, clean := int64(-1), false
				for _, s := range spans {
					if c == s.items[0][0] {
						clean = true
					}
					for _, it := range s.items {
						if c > it[0] && c < it[1] || c == it[0] && it[0] != s.items[0][0] {
							want = it[0]
						}
					}
				}
				what := fmt.Sprintf("cut at %d of %d", c, len(data))
				in := data[:c]
				err := runHostile(t, what, len(in), func() error {
					_, _, err := decodeRP(in)
					return err
				})
				switch {
				case clean && err != nil:
					t.Errorf("%s, between messages: %v", what, err)
				case !clean && want < 0:
					t.Fatalf("%s: test bug, no item contains the cut", what)
				case !clean:
					var e *Error
					if !errors.As(err, &e) || !errors.Is(err, ErrUnexpectedEOF) || e.Offset != want {
						t.Errorf("%s: got %v, want an *Error at offset %d wrapping ErrUnexpectedEOF", what, err, want)
					}
				}
				if t.Failed() {
					t.FailNow()
				}
			}
			t.Logf("%d cuts, %d messages", len(cuts), len(spans))
		})
	}
}

// rpMsg builds one return-path message: be16 type, be16 len, payload.
func rpMsg(t RPType, payload ...[]byte) []byte {
	p := bytes.Join(payload, nil)
	b := binary.BigEndian.AppendUint16(nil, uint16(t))
	b = binary.BigEndian.AppendUint16(b, uint16(len(p)))
	return append(b, p...)
}

func u32b(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func u64b(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }
func cstr(s string) []byte { return append([]byte{byte(len(s))}, s...) }

// TestRPHostile feeds hand-made bad return paths: each must fail with an *Error at the right
// offset carrying QEMU's reason (ErrTooLarge for what exceeds the limits), and allocate little.
func TestRPHostile(t *testing.T) {
	pong := rpMsg(RPPong, u32b(1))
	reqID := rpMsg(RPReqPagesID, u64b(0x1000), u32b(4096), cstr("pc.ram"))
	blocks := []RAMBlock{{Name: "pc.ram", UsedLength: 64 << 20}}
	bitmap := func(name string, size uint64, body []byte, mark uint64) []byte {
		return bytes.Join([][]byte{rpMsg(RPRecvBitmap, cstr(name)), u64b(size), body, u64b(mark)}, nil)
	}
	good := bitmap("pc.ram", 2048, make([]byte, 2048), RPBitmapEndMark)
	cases := []struct {
		name   string
		in     []byte
		opts   []RPOption
		off    int64
		want   string
		large  bool
		short  bool
		okMsgs int
	}{
		{"type 0", rpMsg(0, u32b(0)), nil, 0, "received invalid message 0x0000 length 0x0004", false, false, 0},
		{"type 8 after a PONG", append(append([]byte{}, pong...), rpMsg(8)...), nil, 8, "invalid message 0x0008", false, false, 1},
		{"PONG of 5 bytes", rpMsg(RPPong, []byte{0, 0, 0, 0, 1}), nil, 0, "'PONG' message (0x0002) with incorrect length 5 expecting 4", false, false, 0},
		{"SWITCHOVER_ACK with payload", rpMsg(RPSwitchoverAck, []byte{0}), nil, 0, "incorrect length 1 expecting 0", false, false, 0},
		{"REQ_PAGES of 13 bytes", rpMsg(RPReqPages, make([]byte, 13)), nil, 0, "incorrect length 13 expecting 12", false, false, 0},
		{"REQ_PAGES_ID of 600 bytes", rpMsg(RPReqPagesID, make([]byte, 600)), nil, 0, "incorrect length 600, at most 512", true, false, 0},
		{"REQ_PAGES_ID name length past the message", rpMsg(RPReqPagesID, u64b(0), u32b(4096), []byte{9}, []byte("pc.ram")), nil, 0, "Req_Page_id with length 19 expecting 22", false, false, 0},
		{"REQ_PAGES_ID of 12 bytes", rpMsg(RPReqPagesID, make([]byte, 12)), nil, 0, "Req_Page_id with length 12 expecting 13", false, false, 0},
		{"REQ_PAGES_ID with an empty name", rpMsg(RPReqPagesID, u64b(0), u32b(4096), []byte{0}), nil, 16, "has no block ''", false, false, 0},
		{"REQ_PAGES without REQ_PAGES_ID", append(append([]byte{}, pong...), rpMsg(RPReqPages, u64b(0), u32b(4096))...), nil, 8, "MIG_RP_MSG_REQ_PAGES has no previous block", false, false, 1},
		{"misaligned request", rpMsg(RPReqPagesID, u64b(0x1001), u32b(4096), cstr("pc.ram")), nil, 4, "Misaligned page request, start: 0x1001 len: 4096", false, false, 0},
		{"zero-length request", append(append([]byte{}, reqID...), rpMsg(RPReqPages, u64b(0), u32b(0))...), nil, int64(len(reqID)) + 4, "Misaligned page request", false, false, 1},
		{"request for an unknown block", rpMsg(RPReqPagesID, u64b(0), u32b(4096), cstr("pc.rom")), []RPOption{WithRPBlocks(blocks)}, 0, "MIG_RP_MSG_REQ_PAGES has no block 'pc.rom'", false, false, 0},
		{"request overrun", append(append([]byte{}, reqID...), rpMsg(RPReqPages, u64b(64<<20-4096), u32b(8192))...), []RPOption{WithRPBlocks(blocks)}, int64(len(reqID)) + 4, "request overrun, start=0x3fff000 len=0x2000 blocklen=0x4000000", false, false, 1},
		{"RESUME_ACK 2", rpMsg(RPResumeAck, u32b(2)), nil, 0, "illegal resume_ack value 2", false, false, 0},
		{"RECV_BITMAP without a name", rpMsg(RPRecvBitmap), nil, 0, "MIG_RP_MSG_RECV_BITMAP missing block name", false, false, 0},
		{"RECV_BITMAP name length", rpMsg(RPRecvBitmap, []byte{3}, []byte("pc.ram")), nil, 0, "block name of 3 bytes in a 7-byte message", false, false, 0},
		{"bitmap with a wrong end mark", bitmap("pc.ram", 2048, make([]byte, 2048), RPBitmapEndMark^1), nil, 11 + 8 + 2048, "ramblock 'pc.ram' end mark incorrect: 0x123456789abcdee", false, false, 0},
		{"bitmap over the limit", bitmap("pc.ram", 1<<40, nil, 0), []RPOption{WithRPLimits(RPLimits{MaxRAM: 1 << 30})}, 11, "bitmap of 0x10000000000 bytes, at most 0x8000", true, false, 0},
		{"bitmap over the default limit", bitmap("pc.ram", 1<<62, nil, 0), nil, 11, "at most 0x2000000", true, false, 0},
		{"bitmap of the wrong size for the block", bitmap("pc.ram", 4096, make([]byte, 4096), RPBitmapEndMark), []RPOption{WithRPBlocks(blocks)}, 11, "ramblock 'pc.ram' bitmap size mismatch (0x1000 != 0x800)", false, false, 0},
		{"bitmap for an unknown block", bitmap("pc.rom", 8, make([]byte, 8), RPBitmapEndMark), []RPOption{WithRPBlocks(blocks)}, 0, "MIG_RP_MSG_RECV_BITMAP has invalid block name 'pc.rom'", false, false, 0},
		{"bitmap size not a multiple of 8", bitmap("pc.ram", 12, make([]byte, 12), RPBitmapEndMark), nil, 11, "0xc is not a multiple of 8", false, false, 0},
		{"bitmap claiming 32 MiB, then nothing", bitmap("pc.ram", 32<<20, nil, 0)[:19], nil, 19, "", false, true, 0},
		{"bitmap cut in the middle", good[:11+8+1000], nil, 19, "", false, true, 0},
		{"bitmap cut in the end mark", good[:len(good)-3], nil, int64(len(good)) - 8, "", false, true, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var msgs int
			err := runHostile(t, tc.name, len(tc.in), func() error {
				r := NewRPReader(bytes.NewReader(tc.in), tc.opts...)
				for {
					_, err := r.Next()
					if err != nil {
						if err == io.EOF {
							return nil
						}
						// Sticky: the same error again.
						if _, err2 := r.Next(); err2 != err {
							return fmt.Errorf("error not sticky: %v then %v", err, err2)
						}
						return err
					}
					msgs++
				}
			})
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("got %v (%T), want *Error", err, err)
			}
			if e.Offset != tc.off || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v (offset %d), want offset %d and %q", err, e.Offset, tc.off, tc.want)
			}
			if errors.Is(err, ErrTooLarge) != tc.large || errors.Is(err, ErrUnexpectedEOF) != tc.short {
				t.Errorf("%v: ErrTooLarge %v (want %v), ErrUnexpectedEOF %v (want %v)", err, errors.Is(err, ErrTooLarge), tc.large, errors.Is(err, ErrUnexpectedEOF), tc.short)
			}
			if msgs != tc.okMsgs {
				t.Errorf("%d messages before the error, want %d", msgs, tc.okMsgs)
			}
		})
	}
	// A size field claiming the whole limit (32 MiB by default) followed by a few bytes must
	// not make the reader allocate what it claims.
	claim := append(bitmap("pc.ram", 32<<20, nil, 0)[:19], make([]byte, 100)...)
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	_, _, err := decodeRP(claim)
	runtime.ReadMemStats(&m1)
	if !errors.Is(err, ErrUnexpectedEOF) || m1.TotalAlloc-m0.TotalAlloc > 1<<20 {
		t.Errorf("a 32 MiB bitmap claim with 100 bytes: %v, allocated %d bytes", err, m1.TotalAlloc-m0.TotalAlloc)
	}
	// The good bitmap decodes, and a SHUT(1) is a message (the source reports the destination's
	// failure), not a decode error.
	in := append(append(append([]byte{}, reqID...), good...), rpMsg(RPShut, u32b(1))...)
	spans, out, err := decodeRP(in, WithRPBlocks(blocks))
	if err != nil || !bytes.Equal(out, in) || len(spans) != 3 || spans[2].value != 1 {
		t.Fatalf("good messages: %v, %d spans, round trip %v", err, len(spans), bytes.Equal(out, in))
	}
}

// TestRPWriter checks the helpers against QEMU's destination senders: REQ_PAGES_ID only when the
// block changes, RESUME_ACK 1, the bitmap framing, and what Resume forgets.
func TestRPWriter(t *testing.T) {
	var b bytes.Buffer
	w := NewRPWriter(&b)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := w.WriteMessage(&RPMessage{Type: RPReqPages, Start: 0, Length: 4096}); !errors.Is(err, ErrEncode) {
		t.Fatalf("REQ_PAGES without a block: %v", err)
	}
	must(w.WritePong(7))
	must(w.WriteReqPages("pc.ram", 0x2000, 4096))
	must(w.WriteReqPages("pc.ram", 0x3000, 4096))
	must(w.WriteReqPages("pc.rom", 0, 4096))
	must(w.WriteRecvBitmap("pc.ram", []byte{1, 2, 3, 4, 5, 6, 7, 8}))
	must(w.WriteResumeAck())
	must(w.WriteSwitchoverAck())
	if err := w.WriteMessage(&RPMessage{Type: RPReqPages, Block: "pc.ram", Length: 4096}); !errors.Is(err, ErrEncode) {
		t.Fatalf("REQ_PAGES naming another block than the last REQ_PAGES_ID: %v", err)
	}
	if err := w.WriteRecvBitmap("pc.ram", make([]byte, 5)); !errors.Is(err, ErrEncode) {
		t.Fatalf("bitmap of 5 bytes: %v", err)
	}
	must(w.WriteShut(0))
	want := bytes.Join([][]byte{
		rpMsg(RPPong, u32b(7)),
		rpMsg(RPReqPagesID, u64b(0x2000), u32b(4096), cstr("pc.ram")),
		rpMsg(RPReqPages, u64b(0x3000), u32b(4096)),
		rpMsg(RPReqPagesID, u64b(0), u32b(4096), cstr("pc.rom")),
		rpMsg(RPRecvBitmap, cstr("pc.ram")), u64b(8), {1, 2, 3, 4, 5, 6, 7, 8}, u64b(RPBitmapEndMark),
		rpMsg(RPResumeAck, u32b(1)),
		rpMsg(RPSwitchoverAck),
		rpMsg(RPShut, u32b(0)),
	}, nil)
	if !bytes.Equal(b.Bytes(), want) || w.Offset() != int64(len(want)) {
		t.Fatalf("wrote\n%x\nwant\n%x", b.Bytes(), want)
	}
	var b2 bytes.Buffer
	w.Resume(&b2)
	must(w.WriteReqPages("pc.rom", 0x1000, 4096))
	if want := rpMsg(RPReqPagesID, u64b(0x1000), u32b(4096), cstr("pc.rom")); !bytes.Equal(b2.Bytes(), want) {
		t.Fatalf("after Resume: %x, want the block named again %x", b2.Bytes(), want)
	}
	// The reader forgets the last block across Resume too, and counts offsets from 0 again.
	r := NewRPReader(bytes.NewReader(rpMsg(RPReqPagesID, u64b(0), u32b(4096), cstr("pc.ram"))))
	if _, err := r.Next(); err != nil {
		t.Fatal(err)
	}
	r.Resume(bytes.NewReader(append(rpMsg(RPPong, u32b(9)), rpMsg(RPReqPages, u64b(0x5000), u32b(4096))...)))
	if m, err := r.Next(); err != nil || m.Value != 9 || m.Offset != 0 {
		t.Fatalf("PONG after Resume: %+v %v", m, err)
	}
	var e *Error
	if _, err := r.Next(); !errors.As(err, &e) || e.Offset != 8 || !strings.Contains(err.Error(), "no previous block") {
		t.Fatalf("REQ_PAGES first after Resume: %v", err)
	}
}

// TestRPReaderAllocs checks that page requests decode without allocating.
func TestRPReaderAllocs(t *testing.T) {
	var in []byte
	in = append(in, rpMsg(RPReqPagesID, u64b(0), u32b(4096), cstr("pc.ram"))...)
	for i := range 2000 {
		if i%100 == 50 {
			in = append(in, rpMsg(RPReqPagesID, u64b(uint64(i)*4096), u32b(4096), cstr("pc.ram"))...)
		}
		in = append(in, rpMsg(RPReqPages, u64b(uint64(i)*4096), u32b(4096))...)
	}
	br := bytes.NewReader(in)
	r := NewRPReader(br)
	if _, err := r.Next(); err != nil { // the first sight of a name allocates it
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := r.Next(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%.2f allocations per page request", allocs)
	}
}

// FuzzRPReader checks that RPReader never panics or over-allocates, reports errors as *Error
// inside the input, and that RPWriter re-encodes whatever it accepts byte for byte.
func FuzzRPReader(f *testing.F) {
	f.Add(bytes.Join([][]byte{rpMsg(RPPong, u32b(1)), rpMsg(RPReqPagesID, u64b(0), u32b(4096), cstr("pc.ram")),
		rpMsg(RPReqPages, u64b(4096), u32b(4096)), rpMsg(RPRecvBitmap, cstr("pc.bios")), u64b(8), make([]byte, 8),
		u64b(RPBitmapEndMark), rpMsg(RPResumeAck, u32b(1)), rpMsg(RPSwitchoverAck), rpMsg(RPShut, u32b(0))}, nil))
	f.Fuzz(func(t *testing.T, data []byte) {
		lim := RPLimits{MaxRAM: 64 << 20}
		_, out, err := decodeRP(data, WithRPLimits(lim))
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || e.Offset < 0 || e.Offset > int64(len(data)) {
				t.Fatalf("bad error %T %v", err, err)
			}
			if !bytes.Equal(out, data[:len(out)]) {
				t.Fatalf("re-encoded prefix differs")
			}
			return
		}
		if !bytes.Equal(out, data) {
			t.Fatalf("re-encoded return path differs:\n in  %x\n out %x", data, out)
		}
	})
}
