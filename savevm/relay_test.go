package savevm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// The relay is fed hostile sources here. A fake source QEMU (a goroutine writing into an
// io.Pipe) stands in for the real one because a real QEMU cannot be made to send corrupt or
// truncated bytes; the destination is a recorder standing in for transport.Conn.

// recDst records what the relay sends to the destination and how it ends it: Close is a clean
// end of stream (a destination QEMU would go on to load what it got), Abort a failure (RST,
// killed command). failAfter ≥ 0 makes writes fail once that many bytes have been taken.
type recDst struct {
	mu        sync.Mutex
	buf       bytes.Buffer
	discard   bool // count only
	n         int64
	failAfter int64
	closed    int
	aborted   int
}

func newRecDst() *recDst { return &recDst{failAfter: -1} }

var errDstBroken = errors.New("destination: connection reset by peer (test)")

func (d *recDst) Write(p []byte) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed > 0 || d.aborted > 0 {
		return 0, io.ErrClosedPipe
	}
	if d.failAfter >= 0 && d.n+int64(len(p)) > d.failAfter {
		k := int(max(0, d.failAfter-d.n))
		d.n += int64(k)
		if !d.discard {
			d.buf.Write(p[:k])
		}
		return k, errDstBroken
	}
	d.n += int64(len(p))
	if !d.discard {
		d.buf.Write(p)
	}
	return len(p), nil
}

func (d *recDst) Close() error {
	d.mu.Lock()
	d.closed++
	d.mu.Unlock()
	return nil
}

func (d *recDst) Abort() {
	d.mu.Lock()
	d.aborted++
	d.mu.Unlock()
}

func (d *recDst) state() (received []byte, closed, aborted int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]byte(nil), d.buf.Bytes()...), d.closed, d.aborted
}

// fakeSource returns the read end of a pipe fed by a goroutine with data in chunks, then closed
// (QEMU closing its side). done is closed when the goroutine has ended.
func fakeSource(data []byte) (src io.ReadCloser, done <-chan struct{}) {
	pr, pw := io.Pipe()
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		for len(data) > 0 {
			n := min(len(data), 64<<10)
			if _, err := pw.Write(data[:n]); err != nil {
				return // the relay closed the source
			}
			data = data[n:]
		}
		pw.Close()
	}()
	return pr, ch
}

// relayOnce relays data from a fake source into a recorder, as savevm.Restore does (ctl nil),
// with a deadline on the whole relay. Like Restore's caller, it closes the source afterwards.
func relayOnce(t *testing.T, what string, data []byte, opt Options) (*recDst, error) {
	t.Helper()
	src, srcDone := fakeSource(data)
	dst := newRecDst()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res := make(chan error, 1)
	go func() {
		_, err := NewRelay(src, dst, nil, opt).Run(ctx)
		res <- err
	}()
	var err error
	select {
	case err = <-res:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: Run did not return", what)
	}
	src.Close()
	select {
	case <-srcDone:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: the fake source is still blocked after the relay ended", what)
	}
	return dst, err
}

// eofOffset returns the offset of the top-level EOF record of a capture.
func eofOffset(t *testing.T, data []byte) (eof int64, offs []int64) {
	t.Helper()
	r := stream.NewReader(bytes.NewReader(data))
	eof = -1
	for {
		rec, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		offs = append(offs, rec.Offset)
		if rec.Kind == stream.KindEOF && rec.Depth == 0 {
			eof = rec.Offset
		}
	}
	if eof < 0 {
		t.Fatal("capture without EOF")
	}
	return eof, offs
}

// checkFailedRelay checks the safety contract for a relay that had to fail: an error, an Abort
// and no clean Close of the destination, and the destination never got the EOF record (a
// destination QEMU that reads EOF loads the state and may start the guest: the vmdesc after it
// is optional to QEMU), so it never holds a complete stream, in particular not the original's
// EOF + vmdesc.
func checkFailedRelay(t *testing.T, what string, in []byte, eof int64, orig []byte, dst *recDst, err error) {
	t.Helper()
	got, closed, aborted := dst.state()
	if err == nil {
		t.Errorf("%s: Run returned nil", what)
	}
	if closed > 0 {
		t.Errorf("%s: the failed relay closed the destination cleanly (Close) instead of aborting it: %v", what, err)
	}
	if aborted == 0 {
		t.Errorf("%s: the failed relay did not abort the destination: %v", what, err)
	}
	if !bytes.HasPrefix(in, got) {
		t.Errorf("%s: the destination received %d bytes that are not a prefix of the source's", what, len(got))
	}
	if int64(len(got)) > eof {
		t.Errorf("%s: the destination received %d bytes, including the EOF record at %d, although the relay failed: %v", what, len(got), eof, err)
	}
	if tail := orig[eof:]; bytes.HasSuffix(got, tail) {
		t.Errorf("%s: the destination holds the original's EOF + vmdesc", what)
	}
}

// TestRelayHostileSource relays truncated and bit-flipped captures and checks that every
// failure is reported and never looks like a completed stream to the destination.
func TestRelayHostileSource(t *testing.T) {
	for _, name := range []string{"idle-7.2", "idle-10.0", "compress-7.2", "multifd-10.0"} {
		t.Run(name, func(t *testing.T) {
			orig := streamtest.Load(t, name)
			eof, offs := eofOffset(t, orig)
			rng := rand.New(rand.NewSource(7))
			// Cuts: every non-RAM boundary near the end (device tail, EOF, inside the vmdesc),
			// a sample of the others, random offsets.
			cuts := []int64{1, 8, 9, 20, eof, eof + 2, eof + 5, eof + 6, int64(len(orig)) - 1}
			for i, o := range offs {
				if o > eof-2000 || rng.Intn(len(offs)) < 25 || i < 4 {
					cuts = append(cuts, o, o+1)
				}
			}
			for range 25 {
				cuts = append(cuts, 1+rng.Int63n(int64(len(orig)-1)))
			}
			if testing.Short() {
				cuts = cuts[:min(len(cuts), 30)]
			}
			for _, c := range cuts {
				if c <= 0 || c >= int64(len(orig)) {
					continue
				}
				in := orig[:c]
				what := fmt.Sprintf("cut at %d of %d", c, len(orig))
				dst, err := relayOnce(t, what, in, Options{})
				if c > eof {
					// Cut after EOF: complete for QEMU (a destination ignores the vmdesc, and the
					// relay forwards the stream up to EOF, stream-format.md §5.1).
					got, closed, aborted := dst.state()
					if err != nil || closed != 1 || aborted != 0 || int64(len(got)) < eof+1 || !bytes.HasPrefix(in, got) {
						t.Errorf("%s: cut after EOF: %v, closed %d, aborted %d, %d bytes forwarded", what, err, closed, aborted, len(got))
					}
					continue
				}
				checkFailedRelay(t, what, in, eof, orig, dst, err)
			}
			// Bit flips at record starts (type bytes, ids, lengths, RAM flags): the relay either
			// fails safely or forwards the changed stream exactly and closes cleanly.
			data := append([]byte(nil), orig...)
			failed := 0
			nflips := 60
			if testing.Short() {
				nflips = 15
			}
			for range nflips {
				o := offs[rng.Intn(len(offs))]
				pos := o + rng.Int63n(min(8, int64(len(data))-o))
				mask := byte(1) << rng.Intn(8)
				data[pos] ^= mask
				what := fmt.Sprintf("flip 0x%02x at %d", mask, pos)
				dst, err := relayOnce(t, what, data, Options{})
				if err != nil {
					failed++
					var se *stream.Error
					if !errors.As(err, &se) {
						t.Errorf("%s: error is not a *stream.Error: %v", what, err)
					}
					checkFailedRelay(t, what, data, eof, orig, dst, err)
				} else if got, closed, aborted := dst.state(); closed != 1 || aborted != 0 ||
					!bytes.HasPrefix(data, got) || !bytes.Equal(got, data) && int64(len(got)) != eof+1 {
					// Harmless: the changed stream forwarded exactly, or up to EOF when the change
					// damaged only the vmdesc.
					t.Errorf("%s: relay succeeded but forwarded %d of %d bytes (equal %v), closed %d, aborted %d",
						what, len(got), len(data), bytes.Equal(got, data), closed, aborted)
				}
				data[pos] ^= mask
			}
			t.Logf("%d cuts, %d flips (%d failed, the rest harmless)", len(cuts), nflips, failed)
		})
	}
}

// TestRelayCancelDoesNotCloseCleanly: cancelling a relay (SIGINT, the caller's deadline) must
// not end the destination with Close, the clean end of stream; the caller aborts it.
func TestRelayCancelDoesNotCloseCleanly(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	orig := streamtest.Load(t, "idle-7.2")
	pr, pw := io.Pipe()
	go func() {
		pw.Write(orig[:len(orig)/3]) // then stall: the source sends nothing more
	}()
	dst := newRecDst()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(200*time.Millisecond, cancel)
	_, err := NewRelay(pr, dst, nil, Options{}).Run(ctx)
	pr.Close()
	pw.Close()
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Run: %v, want context.Canceled", err)
	}
	_, closed, aborted := dst.state()
	if closed > 0 {
		t.Errorf("cancelled relay called Close on the destination (%d×, Abort %d×): a clean end of stream", closed, aborted)
	}
}

// TestRelayNoGoroutineLeak: after a failed relay — corrupt source, destination failing its
// writes, stalled source caught by the policy — no goroutine is left behind.
func TestRelayNoGoroutineLeak(t *testing.T) {
	orig := streamtest.Load(t, "idle-7.2")
	eof, _ := eofOffset(t, orig)
	t.Run("corrupt source", func(t *testing.T) {
		defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
		bad := append([]byte(nil), orig...)
		bad[eof-5] ^= 0x40 // the last footer's type byte
		dst, err := relayOnce(t, "corrupt", bad, Options{})
		checkFailedRelay(t, "corrupt", bad, eof, orig, dst, err)
	})
	t.Run("truncated source", func(t *testing.T) {
		defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
		dst, err := relayOnce(t, "truncated", orig[:len(orig)/2], Options{})
		checkFailedRelay(t, "truncated", orig[:len(orig)/2], eof, orig, dst, err)
	})
	t.Run("destination fails", func(t *testing.T) {
		defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
		src, srcDone := fakeSource(orig)
		dst := newRecDst()
		dst.failAfter = 100 << 10
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_, err := NewRelay(src, dst, nil, Options{}).Run(ctx)
		src.Close() // the caller's job (savevm.Restore: defer in.Close)
		<-srcDone
		if err == nil || !strings.Contains(err.Error(), "reset by peer") {
			t.Errorf("Run: %v", err)
		}
		if _, closed, _ := dst.state(); closed > 0 {
			t.Errorf("relay with a failing destination called Close")
		}
	})
	t.Run("stalled source", func(t *testing.T) {
		defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
		pr, pw := io.Pipe() // the fake source connects and never sends a byte
		dst := newRecDst()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		start := time.Now()
		_, err := NewRelay(pr, dst, nil, Options{Policy: Policy{StallTimeout: 300 * time.Millisecond}, PollInterval: 20 * time.Millisecond}).Run(ctx)
		pw.Close()
		var pe *PolicyError
		if !errors.As(err, &pe) {
			t.Errorf("Run: %v, want a *PolicyError", err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("stall caught after %v", d)
		}
		if _, closed, aborted := dst.state(); closed > 0 || aborted != 1 {
			t.Errorf("stalled relay: destination closed %d×, aborted %d×; want aborted once", closed, aborted)
		}
	})
}

// synthSource generates a migration stream with one RAM block of ramBytes bytes ("pc.ram"),
// every page sent once in PART sections of 512 PAGE records, around the real header,
// configuration, ram START header and device tail of a capture (idle-7.2), and writes it to w.
func synthSource(w io.Writer, capture []byte, ramBytes uint64) error {
	var (
		cfg   stream.Configuration
		start stream.SectionHeader
		tail  []byte
		other []stream.RAMBlock
	)
	r := stream.NewReader(bytes.NewReader(capture), stream.WithRawTail(func(b []byte) { tail = b }))
	for tail == nil {
		rec, err := r.Next()
		if err != nil {
			return fmt.Errorf("capture: %w", err)
		}
		switch rec.Kind {
		case stream.KindConfiguration:
			cfg = rec.Config
			cfg.Raw = append([]byte(nil), cfg.Raw...)
			cfg.Capabilities = append([]string(nil), cfg.Capabilities...)
		case stream.KindSectionStart:
			start = rec.Section
		case stream.KindRAM:
			if rec.RAM.Flags&^stream.RAMContinue == stream.RAMMemSize {
				for _, b := range rec.RAM.Blocks {
					if b.Name != "pc.ram" {
						other = append(other, b)
					}
				}
			}
		}
	}
	sw := stream.NewWriter(w)
	sw.WriteHeader()
	sw.WriteConfiguration(&cfg)
	id := start.ID
	sw.WriteSectionHeader(stream.SectionStart, id, "ram", start.Instance, start.Version)
	blocks := append([]stream.RAMBlock{{Name: "pc.ram", UsedLength: ramBytes}}, other...)
	sw.WriteMemSize(blocks)
	sw.WriteEOS()
	sw.WriteFooter(id)
	page := make([]byte, 4096)
	for i := range page {
		page[i] = byte(i * 7)
	}
	const perPart = 512
	for off := uint64(0); off < ramBytes; {
		sw.WriteSectionHeader(stream.SectionPart, id, "ram", start.Instance, start.Version)
		for i := 0; i < perPart && off < ramBytes; i++ {
			page[0] = byte(off >> 12)
			if err := sw.WritePage(off, "pc.ram", page); err != nil {
				return err
			}
			off += 4096
		}
		sw.WriteEOS()
		if err := sw.WriteFooter(id); err != nil {
			return err
		}
	}
	sw.WriteSectionHeader(stream.SectionEnd, id, "ram", start.Instance, start.Version)
	sw.WriteEOS()
	sw.WriteFooter(id)
	sw.WriteRaw(tail)
	return sw.Flush()
}

// relaySynthetic relays a synthetic stream of ramBytes of RAM from a generator goroutine into a
// counting destination; it returns the bytes relayed and the time taken.
func relaySynthetic(t testing.TB, ramBytes uint64) (int64, time.Duration) {
	capture := streamtest.Load(t, "idle-7.2")
	pr, pw := io.Pipe()
	genErr := make(chan error, 1)
	go func(capture []byte) {
		err := synthSource(pw, capture, ramBytes)
		pw.CloseWithError(err)
		genErr <- err
	}(capture)
	dst := newRecDst()
	dst.discard = true
	start := time.Now()
	sum, err := NewRelay(pr, dst, nil, Options{}).Run(context.Background())
	d := time.Since(start)
	pr.Close()
	if err != nil {
		t.Fatalf("relay: %v", err)
	}
	if err := <-genErr; err != nil {
		t.Fatalf("generator: %v", err)
	}
	if dst.closed != 1 || dst.n != sum.BytesIn || sum.NormalPages != int64(ramBytes/4096) {
		t.Fatalf("relayed %d of %d bytes, %d pages, closed %d", dst.n, sum.BytesIn, sum.NormalPages, dst.closed)
	}
	return dst.n, d
}

// TestRelaySyntheticHelper is the child process of TestRelayLargeStream (it does nothing
// unless QMG_RELAY_HELPER_GIB is set): it relays a synthetic stream and prints the figures.
func TestRelaySyntheticHelper(t *testing.T) {
	gib, _ := strconv.Atoi(os.Getenv("QMG_RELAY_HELPER_GIB"))
	if gib <= 0 {
		t.Skip("helper process of TestRelayLargeStream")
	}
	n, d := relaySynthetic(t, uint64(gib)<<30)
	fmt.Printf("RELAYED %d %d %d\n", n, d.Nanoseconds(), vmHWM(t))
}

// vmHWM returns this process's peak resident set size (peakRSS: VmHWM of /proc/self/status),
// in bytes.
func vmHWM(t testing.TB) int64 {
	n := peakRSS()
	if n == 0 {
		t.Fatal("no VmHWM in /proc/self/status")
	}
	return n
}

// TestRelayLargeStream relays a synthetic 16 GiB stream (QMG_RELAY_GIB overrides) through the
// engine in a child process and checks its peak RSS stays within 64 MiB. The child reports its
// own VmHWM: in this process the heap of the other tests would pollute it, and the child's
// rusage ru_maxrss is no better, since Linux carries the parent's high-water mark across the
// vfork+exec that starts the child.
func TestRelayLargeStream(t *testing.T) {
	if testing.Short() {
		t.Skip("relays GiBs")
	}
	gib := 16 // about 4 s on 2 cores (4.3 GB/s)
	if s := os.Getenv("QMG_RELAY_GIB"); s != "" {
		gib, _ = strconv.Atoi(s)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestRelaySyntheticHelper$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "QMG_RELAY_HELPER_GIB="+strconv.Itoa(gib))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	var n, ns, rss int64
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "RELAYED ") {
			fmt.Sscanf(line, "RELAYED %d %d %d", &n, &ns, &rss)
		}
	}
	if n == 0 {
		t.Fatalf("helper printed no figures:\n%s", out)
	}
	ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	secs := float64(ns) / 1e9
	t.Logf("relayed %d GiB of RAM (%d bytes) in %.2f s: %.2f GB/s; child peak RSS (VmHWM) %.1f MiB (user %.1f s, sys %.1f s)",
		gib, n, secs, float64(n)/secs/1e9, float64(rss)/(1<<20),
		time.Duration(ru.Utime.Nano()).Seconds(), time.Duration(ru.Stime.Nano()).Seconds())
	if rss > 64<<20 {
		t.Errorf("peak RSS %d MiB > 64 MiB", rss>>20)
	}
}

// TestEmitSummaryPeakRSS: the summary carries the process's own peak RSS — what the benchmarks
// and an operator read, since a parent's rusage of the sidecar is polluted by the parent's.
func TestEmitSummaryPeakRSS(t *testing.T) {
	before := vmHWM(t)
	var got []Event
	sum := Summary{BytesOut: 1}
	EmitSummary(Options{Events: func(e Event) { got = append(got, e) }}, &sum)
	after := vmHWM(t)
	if len(got) != 1 || got[0].Type != "summary" || got[0].Summary == nil {
		t.Fatalf("events %+v", got)
	}
	if p := got[0].Summary.PeakRSSBytes; p < before || p > after || sum.PeakRSSBytes != p {
		t.Errorf("peak RSS %d in the event, %d in the caller's summary; VmHWM %d before, %d after", p, sum.PeakRSSBytes, before, after)
	}
}
