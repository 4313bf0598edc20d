package stream

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"strings"
	"sync"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// pageKey names one target page of a RAM block.
type pageKey struct {
	block string
	off   uint64
}

// pcSummary is what one decode of a postcopy capture's source → destination connections (main
// stream, preempt channel, and after a recovery the resumed ones) found. Every connection is
// re-encoded on the way; the differences are kept for TestPostcopyRoundTrip.
type pcSummary struct {
	blocks      []RAMBlock
	cmds        []string // commands of the first connection, "d" prefix inside the package
	resumeCmds  []string
	pings       []uint32 // PING values of the first connection (package included)
	resumePings []uint32
	advise      PostcopyAdvise
	discards    []RAMDiscard
	pages       map[string]int // PAGE / ZERO records per connection
	zeros       map[string]int
	// sentAfterPackage: pages carried after the PACKAGED command (postcopy) on any connection;
	// sentAfterResume: pages carried by the connections of the recovery.
	sentAfterPackage map[pageKey]bool
	sentAfterResume  map[pageKey]bool
	recvBitmapCmds   []string
	resumeCmd        bool
	lastKinds        []Kind // the last records of the final main connection
	cutErr           error  // the error that ended a cut first connection
	roundTrip        []string
	fulls, heur      int
}

var (
	pcMu        sync.Mutex
	pcSummaries = map[string]*pcSummary{}
)

// postcopySummary decodes capture c once per test binary.
func postcopySummary(t testing.TB, c streamtest.PostcopyCapture) *pcSummary {
	t.Helper()
	pcMu.Lock()
	defer pcMu.Unlock()
	if s := pcSummaries[c.Name]; s != nil {
		return s
	}
	s := &pcSummary{pages: map[string]int{}, zeros: map[string]int{},
		sentAfterPackage: map[pageKey]bool{}, sentAfterResume: map[pageKey]bool{}}
	postcopied := false
	resumed := false
	note := func(key string, rec *Record) {
		if rec.Kind != KindRAM || !rec.RAM.Flags.hasBlock() {
			return
		}
		switch rec.RAM.Flags &^ RAMContinue {
		case RAMPage:
			s.pages[key]++
		case RAMZero:
			s.zeros[key]++
		}
		k := pageKey{rec.RAM.Block, rec.RAM.Offset}
		if postcopied {
			s.sentAfterPackage[k] = true
		}
		if resumed {
			s.sentAfterResume[k] = true
		}
	}
	// The main connection(s).
	main := c.Read(t, streamtest.PostcopyMain)
	var out bytes.Buffer
	r := NewReader(bytes.NewReader(main), WithWarnings(func(int64, string) {}))
	w := NewWriter(&out)
	cmds := &s.cmds
	pings := &s.pings
	for conn, data := range [][]byte{main, c.Read(t, streamtest.PostcopyResume)} {
		if conn == 1 {
			if data == nil {
				break
			}
			r.Resume(bytes.NewReader(data))
			out.Reset()
			w.Resume(&out)
			resumed, cmds, pings = true, &s.resumeCmds, &s.resumePings
		}
		for {
			rec, err := r.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				if conn == 0 && c.Meta.Files[streamtest.PostcopyResume] != "" {
					s.cutErr = err
					break
				}
				t.Fatalf("%s connection %d: %v", c.Name, conn, err)
			}
			if err := w.WriteRecord(rec); err != nil {
				t.Fatalf("%s: WriteRecord(%s at %d): %v", c.Name, rec.Kind, rec.Offset, err)
			}
			note(fmt.Sprint("main", conn), rec)
			s.lastKinds = append(s.lastKinds, rec.Kind)
			if len(s.lastKinds) > 4 {
				s.lastKinds = s.lastKinds[1:]
			}
			switch rec.Kind {
			case KindRAM:
				if rec.RAM.Flags == RAMMemSize {
					s.blocks = append([]RAMBlock(nil), rec.RAM.Blocks...)
				}
			case KindSectionFull:
				s.fulls++
				if rec.Heuristic {
					s.heur++
				}
			case KindPackageEnd:
				postcopied = true
			case KindCommand:
				name := rec.Cmd.String()
				if rec.Depth > 0 {
					name = "d" + name
				}
				p, off := rec.Payload, PayloadOffset(rec)
				switch rec.Cmd {
				case CmdPing:
					v, err := ParsePing(p, off)
					if err != nil {
						t.Fatal(err)
					}
					*pings = append(*pings, v)
					name += fmt.Sprint(v)
				case CmdPostcopyAdvise:
					if s.advise, err = ParsePostcopyAdvise(p, off); err != nil {
						t.Fatal(err)
					}
				case CmdPostcopyRAMDiscard:
					var d RAMDiscard
					if err := ParseRAMDiscard(p, off, &d); err != nil {
						t.Fatal(err)
					}
					s.discards = append(s.discards, d)
					if b, _ := d.Append(nil); !bytes.Equal(b, p) {
						s.roundTrip = append(s.roundTrip, fmt.Sprintf("RAM_DISCARD at %d re-encodes as %x, was %x", rec.Offset, b, p))
					}
				case CmdRecvBitmap:
					block, err := ParseRecvBitmapCommand(p, off)
					if err != nil {
						t.Fatal(err)
					}
					s.recvBitmapCmds = append(s.recvBitmapCmds, block)
					if b, _ := AppendRecvBitmapCommand(nil, block); !bytes.Equal(b, p) {
						s.roundTrip = append(s.roundTrip, fmt.Sprintf("RECV_BITMAP at %d re-encodes as %x", rec.Offset, b))
					}
				case CmdPostcopyResume:
					s.resumeCmd = true
				}
				if n := len(*cmds); n == 0 || (*cmds)[n-1] != name || rec.Cmd != CmdPostcopyRAMDiscard && rec.Cmd != CmdRecvBitmap {
					*cmds = append(*cmds, name)
				}
			}
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		got := out.Bytes()
		if s.cutErr != nil && conn == 0 {
			var e *Error
			if !errors.As(s.cutErr, &e) || !errors.Is(s.cutErr, ErrUnexpectedEOF) || e.Offset < int64(len(got)) || e.Offset > int64(len(got))+8+256+4096 {
				s.roundTrip = append(s.roundTrip, fmt.Sprintf("cut connection ends with %v after %d re-encoded bytes", s.cutErr, len(got)))
			}
			data = data[:min(len(got), len(data))]
		}
		if !bytes.Equal(got, data) {
			s.roundTrip = append(s.roundTrip, fmt.Sprintf("main connection %d re-encodes differently (%d vs %d bytes)", conn, len(got), len(data)))
		}
	}
	// The preempt channel(s): after the package only.
	postcopied = true
	resumed = false
	var pr *PreemptReader
	for conn, key := range []string{streamtest.PostcopyPreempt, streamtest.PostcopyResumePreempt} {
		data := c.Read(t, key)
		if data == nil {
			continue
		}
		var out bytes.Buffer
		if pr == nil {
			pr = NewPreemptReader(bytes.NewReader(data), s.blocks)
		} else {
			pr.Resume(bytes.NewReader(data))
		}
		resumed = conn == 1
		pw := NewPreemptWriter(&out)
		for {
			rec, err := pr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("%s %s: %v", c.Name, key, err)
			}
			if err := pw.WriteRecord(rec); err != nil {
				t.Fatal(err)
			}
			note(key, rec)
		}
		if !bytes.Equal(out.Bytes(), data) {
			s.roundTrip = append(s.roundTrip, fmt.Sprintf("%s re-encodes differently (%d vs %d bytes)", key, out.Len(), len(data)))
		}
	}
	pcSummaries[c.Name] = s
	return s
}

// TestPostcopyRoundTrip decodes every postcopy capture — main stream, preempt channel, and the
// connections of a recovery continued with Reader.Resume / Writer.Resume — and re-encodes it
// byte for byte; its commands must follow QEMU's postcopy sequence (stream-format.md §3, §6)
// and its page records must add up to the source's own counters.
func TestPostcopyRoundTrip(t *testing.T) {
	for _, c := range streamtest.PostcopyCaptures(t) {
		t.Run(c.Name, func(t *testing.T) {
			s := postcopySummary(t, c)
			for _, m := range s.roundTrip {
				t.Error(m)
			}
			v10 := strings.HasSuffix(c.Name, "-10.0")
			recovered := c.Meta.Files[streamtest.PostcopyResume] != ""
			// Precopy setup, the switch to postcopy, the package and the PING after it.
			want := "OPEN_RETURN_PATH PING1 POSTCOPY_ADVISE POSTCOPY_RAM_DISCARD PING2 PACKAGED dPOSTCOPY_LISTEN dPING3 dPOSTCOPY_RUN PING4"
			if v10 {
				want = strings.Replace(want, "POSTCOPY_RAM_DISCARD", "SWITCHOVER_START POSTCOPY_RAM_DISCARD", 1)
			}
			if got := strings.Join(s.cmds, " "); got != want {
				t.Errorf("commands\n %s\nwant\n %s", got, want)
			}
			if a := s.advise; !a.RAM || a.PageSizeSummary != 4096 || a.TargetPageSize != 4096 || a.Check(true, a) != nil {
				t.Errorf("POSTCOPY_ADVISE %+v", a)
			}
			if len(s.discards) == 0 {
				t.Error("no POSTCOPY_RAM_DISCARD")
			}
			for _, d := range s.discards {
				var length uint64
				for _, b := range s.blocks {
					if b.Name == d.Block {
						length = b.UsedLength
					}
				}
				if err := d.CheckRanges(length, 4096); err != nil || d.Version != 0 || len(d.Ranges) == 0 || len(d.Ranges) > 12 {
					t.Errorf("discard %+v: %v", d, err)
				}
			}
			// The package holds every device (no vmdesc in postcopy: heuristic footer scans).
			if s.fulls < 25 {
				t.Errorf("%d FULL sections in the package", s.fulls)
			}
			if recovered {
				want := "RECV_BITMAP POSTCOPY_RESUME"
				if got := strings.Join(s.resumeCmds, " "); got != want {
					t.Errorf("resumed connection's commands %q, want %q", got, want)
				}
				var names []string
				for _, b := range s.blocks {
					names = append(names, b.Name)
				}
				if fmt.Sprint(s.recvBitmapCmds) != fmt.Sprint(names) {
					t.Errorf("RECV_BITMAP commands for %v, the blocks are %v", s.recvBitmapCmds, names)
				}
				if s.cutErr == nil {
					t.Error("the cut connection decoded to its end")
				}
			}
			// The stream ends with an empty END section of ram (everything was sent in
			// postcopy) and EOF, without vmdesc.
			if got, want := fmt.Sprint(s.lastKinds), fmt.Sprint([]Kind{KindSectionEnd, KindRAM, KindFooter, KindEOF}); got != want {
				t.Errorf("last records %s, want %s", got, want)
			}
			var pages, zeros int
			for k, n := range s.pages {
				pages += n
				zeros += s.zeros[k]
			}
			t.Logf("pages %v zeros %v; QEMU normal %d duplicate %d, %d postcopy requests; %d FULL (%d heuristic)",
				s.pages, s.zeros, c.Meta.RAM.Normal, c.Meta.RAM.Duplicate, c.Meta.RAM.PostcopyRequests, s.fulls, s.heur)
			if recovered {
				// What the source had written into its socket when the connection was cut never
				// reached the proxy; the source counted it and sent it again after the recovery.
				if int64(pages) < c.Meta.RAM.Normal-200 || int64(pages) > c.Meta.RAM.Normal || int64(zeros) != c.Meta.RAM.Duplicate {
					t.Errorf("%d PAGE and %d ZERO records; QEMU counted normal %d duplicate %d", pages, zeros, c.Meta.RAM.Normal, c.Meta.RAM.Duplicate)
				}
			} else if int64(pages) != c.Meta.RAM.Normal || int64(zeros) != c.Meta.RAM.Duplicate {
				t.Errorf("%d PAGE and %d ZERO records; QEMU counted normal %d duplicate %d", pages, zeros, c.Meta.RAM.Normal, c.Meta.RAM.Duplicate)
			}
			if c.Meta.Capabilities["postcopy-preempt"] && s.pages[streamtest.PostcopyPreempt] == 0 {
				t.Error("no page on the preempt channel")
			}
		})
	}
}

// TestPostcopyPayloads checks the payload codecs against hand-made bad payloads (the
// destination's checks and texts) and round trips of good ones.
func TestPostcopyPayloads(t *testing.T) {
	const base = 1000
	discard := func(name string, ranges ...uint64) []byte {
		b := append([]byte{0, byte(len(name))}, name...)
		b = append(b, 0)
		for _, r := range ranges {
			b = append(b, u64b(r)...)
		}
		return b
	}
	good := discard("pc.ram", 0x1000, 0x3000, 0x10000, 0x1000)
	var d RAMDiscard
	if err := ParseRAMDiscard(good, base, &d); err != nil || d.Block != "pc.ram" || len(d.Ranges) != 2 || d.Ranges[1] != (DiscardRange{0x10000, 0x1000}) {
		t.Fatalf("%+v %v", d, err)
	}
	if b, err := d.Append(nil); err != nil || !bytes.Equal(b, good) {
		t.Fatalf("Append: %x %v", b, err)
	}
	if err := d.CheckRanges(0x11000, 4096); err != nil {
		t.Fatal(err)
	}
	if err := d.CheckRanges(0x10800, 4096); err == nil || !strings.Contains(err.Error(), "Overrun block 'pc.ram'") {
		t.Fatalf("overrun: %v", err)
	}
	if err := (&RAMDiscard{Block: "b", Ranges: []DiscardRange{{0x800, 0x1000}}}).CheckRanges(1<<20, 4096); err == nil || !strings.Contains(err.Error(), "Unaligned start") {
		t.Fatalf("unaligned: %v", err)
	}
	bad := func(b []byte, i int, v byte) []byte { c := append([]byte(nil), b...); c[i] = v; return c }
	for _, tc := range []struct {
		name string
		p    []byte
		off  int64
		want string
	}{
		{"short", good[:19], base, "invalid length (19)"},
		{"version 1", bad(good, 0, 1), base, "invalid version (1)"},
		{"empty name", append([]byte{0, 0, 0}, make([]byte, 17)...), base + 1, "Failed to read RAMBlock ID"},
		{"name past the end", bad(good, 1, 40), base + 1, "Failed to read RAMBlock ID"},
		{"missing nil", bad(good, 8, 'x'), base + 8, "missing nil (120)"},
		{"NUL in the name", bad(good, 4, 0), base + 2, "contains a NUL byte"},
		{"ranges not 16 bytes", good[:len(good)-1], base, "invalid length (31)"},
	} {
		err := ParseRAMDiscard(tc.p, base, &d)
		var e *Error
		if !errors.As(err, &e) || e.Offset != tc.off || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("discard %s: %v, want offset %d and %q", tc.name, err, tc.off, tc.want)
		}
	}
	// A 17-byte name leaves room for no range: QEMU accepts it (len ≥ 20, (20-3-17) % 16 == 0).
	if err := ParseRAMDiscard(discard("seventeen-chars-x"), base, &d); err != nil || len(d.Ranges) != 0 {
		t.Errorf("name-only discard: %v %+v", err, d)
	}

	a, err := ParsePostcopyAdvise(append(u64b(0x201000), u64b(4096)...), base)
	if err != nil || !a.RAM || a.PageSizeSummary != 0x201000 || !bytes.Equal(a.Append(nil), append(u64b(0x201000), u64b(4096)...)) {
		t.Fatalf("advise %+v %v", a, err)
	}
	if err := a.Check(true, PostcopyAdvise{RAM: true, PageSizeSummary: 0x1000, TargetPageSize: 4096}); err == nil || !strings.Contains(err.Error(), "matching RAM page sizes (s=201000 d=1000)") {
		t.Errorf("page-size check: %v", err)
	}
	if err := (PostcopyAdvise{}).Check(true, a); err == nil || !strings.Contains(err.Error(), "have 0 byte advise") {
		t.Errorf("0-byte advise with postcopy-ram: %v", err)
	}
	if err := a.Check(false, a); err == nil || !strings.Contains(err.Error(), "disabled but have 16 byte advise") {
		t.Errorf("16-byte advise without postcopy-ram: %v", err)
	}
	if _, err := ParsePostcopyAdvise(make([]byte, 8), base); err == nil || !strings.Contains(err.Error(), "CMD_POSTCOPY_ADVISE invalid length (8)") {
		t.Errorf("8-byte advise: %v", err)
	}
	if a, err := ParsePostcopyAdvise(nil, base); err != nil || a.RAM || len(a.Append(nil)) != 0 {
		t.Errorf("0-byte advise: %+v %v", a, err)
	}

	if b, err := ParseRecvBitmapCommand(cstr("pc.ram"), base); err != nil || b != "pc.ram" {
		t.Errorf("RECV_BITMAP: %q %v", b, err)
	}
	for _, p := range [][]byte{nil, {0}, {7, 'p', 'c'}, append(cstr("pc.ram"), 0)} {
		if _, err := ParseRecvBitmapCommand(p, base); err == nil {
			t.Errorf("RECV_BITMAP payload %x accepted", p)
		}
	}
	if _, err := AppendRecvBitmapCommand(nil, ""); !errors.Is(err, ErrEncode) {
		t.Errorf("empty RECV_BITMAP name: %v", err)
	}
	if v, err := ParsePing(u32b(3), base); err != nil || v != 3 || !bytes.Equal(AppendPing(nil, 3), u32b(3)) {
		t.Errorf("PING %d %v", v, err)
	}
}

// preemptData is the captured preempt channel and the main stream's blocks.
func preemptData(t *testing.T) ([]byte, []RAMBlock) {
	for _, c := range streamtest.PostcopyCaptures(t) {
		if data := c.Read(t, streamtest.PostcopyPreempt); data != nil {
			return data, postcopySummary(t, c).blocks
		}
	}
	t.Fatal("no capture with a preempt channel")
	return nil, nil
}

// TestPreemptHostile cuts the captured preempt channel at its first record boundaries and at
// random offsets, and feeds it records QEMU's ram_load_postcopy refuses.
func TestPreemptHostile(t *testing.T) {
	data, blocks := preemptData(t)
	decode := func(in []byte, blocks []RAMBlock) (int, error) {
		r := NewPreemptReader(bytes.NewReader(in), blocks)
		for n := 0; ; n++ {
			_, err := r.Next()
			if err == io.EOF {
				return n, nil
			}
			if err != nil {
				return n, err
			}
		}
	}
	// A 10.0 source closes the channel without an EOS: a cut at a record boundary is a clean end.
	boundary := map[int64]bool{}
	r := NewPreemptReader(bytes.NewReader(data), blocks)
	for {
		off := r.Offset()
		boundary[off] = true
		if _, err := r.Next(); err != nil {
			break
		}
	}
	rng := rand.New(rand.NewSource(hostileSeed))
	var cuts []int64
	for _, c := range []int64{0, 1, 7, 8, 9, 15, 4096 + 15, 4096 + 16} {
		cuts = append(cuts, c)
	}
	for range 40 {
		cuts = append(cuts, rng.Int63n(int64(len(data))))
	}
	for _, c := range cuts {
		what := fmt.Sprintf("cut at %d", c)
		err := runHostile(t, what, int(c), func() error { _, err := decode(data[:c], blocks); return err })
		checkStreamErr(t, what, err, int(c), boundary[c], !boundary[c])
		if boundary[c] && err != nil {
			t.Errorf("%s, a record boundary: %v", what, err)
		}
	}
	// The first record names pc.ram: a page record for another block, one past the block's
	// end, a MEM_SIZE, an XBZRLE and bytes after the EOS are refused at their offsets.
	page := append(append(u64b(0x1000|uint64(RAMPage)), cstr("pc.ram")...), make([]byte, 4096)...)
	for _, tc := range []struct {
		name string
		in   []byte
		off  int64
		want string
	}{
		{"unknown block", append(u64b(uint64(RAMZero)), append(cstr("pc.rox"), 0)...), 8, `can't find block "pc.rox"`},
		{"offset past the block", append(append(u64b(64<<20|uint64(RAMPage)), cstr("pc.ram")...), make([]byte, 4096)...), 0, "illegal RAM offset 0x4000000"},
		{"MEM_SIZE", append(append([]byte{}, page...), u64b(0x1000|uint64(RAMMemSize))...), int64(len(page)), "unknown combination of migration flags: 0x4 (postcopy mode)"},
		{"XBZRLE", u64b(uint64(RAMXBZRLE | RAMContinue)), 0, "flags: 0x60 (postcopy mode)"},
		{"zero page with value 1", append(append(u64b(uint64(RAMZero)), cstr("pc.ram")...), 1), 0, "found a zero page with value 1"},
		{"data after the EOS", append(append(append([]byte{}, page...), u64b(uint64(RAMEOS))...), 0), int64(len(page)) + 8, "1 bytes after the EOS"},
		{"CONTINUE first", append(u64b(uint64(RAMPage|RAMContinue)), make([]byte, 4096)...), 0, "CONTINUE flag without a previous block"},
	} {
		_, err := decode(tc.in, blocks)
		var e *Error
		if !errors.As(err, &e) || e.Offset != tc.off || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want offset %d and %q", tc.name, err, tc.off, tc.want)
		}
	}
	// A good channel: page, zero with CONTINUE, EOS.
	good := append(append(append([]byte{}, page...), u64b(0x2000|uint64(RAMZero|RAMContinue))...), 0)
	good = append(good, u64b(uint64(RAMEOS))...)
	if n, err := decode(good, blocks); err != nil || n != 3 {
		t.Fatalf("good channel: %d records, %v", n, err)
	}
	var out bytes.Buffer
	pw := NewPreemptWriter(&out)
	if err := pw.WritePage(0x1000, "pc.ram", make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	if err := pw.WriteZero(0x2000, "pc.ram"); err != nil {
		t.Fatal(err)
	}
	if err := pw.WriteEOS(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), good) || pw.Offset() != int64(len(good)) {
		t.Fatalf("PreemptWriter wrote %x", out.Bytes())
	}
	if err := pw.WriteRecord(&Record{Kind: KindCommand}); !errors.Is(err, ErrEncode) {
		t.Fatalf("command on the preempt channel: %v", err)
	}
}

// TestPreemptReaderAllocs checks that preempt pages decode without allocating.
func TestPreemptReaderAllocs(t *testing.T) {
	data, blocks := preemptData(t)
	r := NewPreemptReader(bytes.NewReader(data), blocks)
	if _, err := r.Next(); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := r.Next(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%.2f allocations per page", allocs)
	}
}

// TestResumeHostile cuts the captured resumed connection of a recovery in its commands and its
// first records: the errors carry the offset in the new connection.
func TestResumeHostile(t *testing.T) {
	var c streamtest.PostcopyCapture
	for _, pc := range streamtest.PostcopyCaptures(t) {
		if pc.Meta.Files[streamtest.PostcopyResume] != "" {
			c = pc
		}
	}
	if c.Name == "" {
		t.Fatal("no recovery capture")
	}
	resume := c.Read(t, streamtest.PostcopyResume)
	// The state a relay has when the first connection is cut: sections and blocks known.
	first := func() *Reader {
		r := NewReader(bytes.NewReader(c.Read(t, streamtest.PostcopyMain)[:400]))
		for {
			rec, err := r.Next()
			if err != nil {
				t.Fatalf("prefix of the first connection: %v", err)
			}
			if rec.Kind == KindRAM && rec.RAM.Flags == RAMMemSize {
				return r
			}
		}
	}
	rng := rand.New(rand.NewSource(hostileSeed))
	cuts := []int64{1, 4, 5, 11, 12, 115, 116, 119}
	for range 12 {
		cuts = append(cuts, rng.Int63n(200000))
	}
	for _, cut := range cuts {
		r := first()
		r.Resume(bytes.NewReader(resume[:cut]))
		what := fmt.Sprintf("resumed connection cut at %d", cut)
		err := runHostile(t, what, int(cut), func() error {
			for {
				_, err := r.Next()
				if err != nil {
					return err
				}
			}
		})
		checkStreamErr(t, what, err, int(cut), false, true)
	}
	// Without the first connection's state, the PART section of the resumed one is unknown.
	r := NewReader(bytes.NewReader(resume))
	if _, err := r.Next(); err == nil || !strings.Contains(err.Error(), "not a migration stream") {
		t.Errorf("a resumed connection read as a new stream: %v", err)
	}
	r = NewReader(bytes.NewReader(nil))
	r.Resume(bytes.NewReader(resume))
	var err error
	for err == nil {
		_, err = r.Next()
	}
	var e *Error
	if !errors.As(err, &e) || e.Offset != 119 || !strings.Contains(err.Error(), "was not started by a START section") {
		t.Errorf("resumed connection without the first one's state: %v", err)
	}
}

// FuzzPostcopyPayloads checks that the payload parsers never panic, report errors inside the
// payload, and that what they accept re-encodes byte for byte.
func FuzzPostcopyPayloads(f *testing.F) {
	f.Add(byte(CmdPostcopyRAMDiscard), []byte("\x00\x06pc.ram\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x3f\xf0\x00"))
	f.Add(byte(CmdPostcopyAdvise), append(u64b(4096), u64b(4096)...))
	f.Add(byte(CmdRecvBitmap), cstr("/rom@etc/acpi/tables"))
	f.Add(byte(CmdPing), u32b(4))
	f.Fuzz(func(t *testing.T, cmd byte, p []byte) {
		const base = 77
		check := func(err error) bool {
			if err == nil {
				return true
			}
			var e *Error
			if !errors.As(err, &e) || e.Offset < base || e.Offset > base+int64(len(p)) {
				t.Fatalf("bad error %v", err)
			}
			return false
		}
		var out []byte
		switch Command(cmd % 12) {
		case CmdPostcopyRAMDiscard:
			var d RAMDiscard
			if !check(ParseRAMDiscard(p, base, &d)) {
				return
			}
			var err error
			if out, err = d.Append(nil); err != nil {
				t.Fatalf("Append refused a parsed discard: %v", err)
			}
		case CmdPostcopyAdvise:
			a, err := ParsePostcopyAdvise(p, base)
			if !check(err) {
				return
			}
			out = a.Append(nil)
		case CmdRecvBitmap:
			b, err := ParseRecvBitmapCommand(p, base)
			if !check(err) {
				return
			}
			if out, err = AppendRecvBitmapCommand(nil, b); err != nil {
				t.Fatal(err)
			}
		default:
			v, err := ParsePing(p, base)
			if !check(err) {
				return
			}
			out = AppendPing(nil, v)
		}
		if !bytes.Equal(out, p) {
			t.Fatalf("re-encoded payload differs: %x vs %x", out, p)
		}
	})
}

// FuzzPreemptReader checks PreemptReader/PreemptWriter: no panic, errors inside the input, and
// byte-identical re-encoding of what is accepted.
func FuzzPreemptReader(f *testing.F) {
	page := append(append(u64b(0x1000|uint64(RAMPage)), cstr("pc.ram")...), make([]byte, 4096)...)
	f.Add(append(append(page, u64b(0x2000|uint64(RAMZero|RAMContinue))...), 0, 0, 0, 0, 0, 0, 0, 0, 0x10))
	f.Fuzz(func(t *testing.T, data []byte) {
		var out bytes.Buffer
		r := NewPreemptReader(bytes.NewReader(data), nil, WithBufferSize(1<<16), WithLimits(fuzzLimits))
		w := NewPreemptWriter(&out)
		for {
			rec, err := r.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				var e *Error
				if !errors.As(err, &e) || e.Offset < 0 || e.Offset > int64(len(data)) {
					t.Fatalf("bad error %T %v", err, err)
				}
				if !bytes.Equal(out.Bytes(), data[:out.Len()]) {
					t.Fatal("re-encoded prefix differs")
				}
				return
			}
			if err := w.WriteRecord(rec); err != nil {
				t.Fatalf("WriteRecord refused a decoded record: %v", err)
			}
		}
		if !bytes.Equal(out.Bytes(), data) {
			t.Fatalf("re-encoded channel differs")
		}
	})
}

// FuzzPostcopyResume decodes data[:cut] as a first connection and the rest as the connection
// of a postcopy recovery (Reader.Resume / Writer.Resume): no panic, errors are *Error inside
// their connection, and every accepted record re-encodes byte for byte.
func FuzzPostcopyResume(f *testing.F) {
	f.Add(minimalStream, uint16(len(minimalStream)))
	f.Fuzz(func(t *testing.T, data []byte, cut uint16) {
		c := min(int(cut), len(data))
		parts := [][]byte{data[:c], data[c:]}
		var out bytes.Buffer
		r := NewReader(bytes.NewReader(parts[0]), WithLimits(fuzzLimits), WithBufferSize(1<<16))
		w := NewWriter(&out)
		for i, in := range parts {
			if i == 1 {
				r.Resume(bytes.NewReader(in))
				out.Reset()
				w.Resume(&out)
			}
			for {
				rec, err := r.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					var e *Error
					if !errors.As(err, &e) || e.Offset < 0 || e.Offset > int64(len(in)) {
						t.Fatalf("connection %d: bad error %T %v", i, err, err)
					}
					break
				}
				if err := w.WriteRecord(rec); err != nil {
					t.Fatalf("WriteRecord(%s) refused a decoded record: %v", rec.Kind, err)
				}
			}
		}
	})
}
