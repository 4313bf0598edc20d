package compat

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// Postcopy over a pair of sidecars (issue 11 over issue 10's link): the dirty guest, capped at
// 20 MB/s so that it cannot converge, switches to postcopy after the first pass; the receiver
// gives its destination postcopy-ram, forwards the destination's return path back over the link
// (RETURN frames), and both ends recover a link that breaks.

// linkPostcopyArgs are the sender's flags of a postcopy that must switch.
func linkPostcopyArgs(extra ...string) []string {
	return append([]string{"--postcopy", "--postcopy-after", "1", "--bandwidth", "20000000"}, extra...)
}

// TestLinkPostcopyMigration: every version pair across a veth pair with mutual TLS, the
// destination held paused (-S): its RAM must equal the paused source's page for page — the
// discard, the package and the postcopy pages all crossed the link right.
func TestLinkPostcopyMigration(t *testing.T) {
	sidecarBinary(t)
	for _, p := range pairs {
		t.Run(p[0]+"-"+p[1], func(t *testing.T) {
			srcQ, dstQ := requireQEMU(t, p[0]), requireQEMU(t, p[1])
			ends, np := netEnds(t, NetOptions{})
			pki := NewTestPKI(t, np.Dst.Addr.String())
			var run pairRun
			checkMigratedIn(t, placement{dstNS: np.Dst.Name}, srcQ, dstQ, "tcg", guestCases(128, 256)[0], func(ctx context.Context, src, dst *VM, uri string) error {
				run = migrateOverLink(t, ctx, ends, pki, src, dst, uri, linkPostcopyArgs()...)
				if run.sendCode != 0 || run.recvCode != 0 {
					return fmt.Errorf("sender exit %d: %s; receiver exit %d: %s", run.sendCode, run.sendErr, run.recvCode, run.recvErr)
				}
				return nil
			})
			sum := summaryOf(run.send)
			if sum == nil || sum.Postcopy == nil || !sum.Postcopy.Started || sum.Link == nil {
				t.Fatalf("the migration did not switch to postcopy over the link: %+v", sum)
			}
			t.Logf("total %dms, %dms in postcopy, %d pages, %d B on the link", sum.TotalTimeMs, sum.Postcopy.PostcopyMs, sum.NormalPages, sum.Link.BytesOnLink)
		})
	}
}

// loopEnds is a link on this host's loopback (the connections can then be reset with ss -K).
func loopEnds(t *testing.T) (linkEnds, string) {
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	a := fmt.Sprintf("127.0.0.1:%d", port)
	return linkEnds{listen: a, dial: a}, fmt.Sprint(port)
}

// startLinkPostcopy starts a receiver and a sender of a postcopy over ends (TLS from pki, or
// --no-tls when it is nil), the destination running (it asks for the pages its guest touches);
// on gets the sender's events, recvOn the receiver's.
func startLinkPostcopy(t *testing.T, ctx context.Context, ends linkEnds, pki *TestPKI, src, dst *VM, uri string, on, recvOn func(*sidecarProc, savevm.Event), extra ...string) (recv, send *sidecarProc) {
	t.Helper()
	rargs, sargs := linkArgs(ends, pki, src, dst, uri)
	recv = startSidecarIn(t, ends.dstNS, recvOn, append([]string{"receive", "--listen", "tcp:" + ends.listen, "--json"}, rargs...)...)
	waitListening(t, ctx, recv)
	send = startSidecarIn(t, ends.srcNS, on, append(sargs, linkPostcopyArgs(extra...)...)...)
	return recv, send
}

// TestLinkPostcopyRecover: every connection of the link is reset (ss -K) during postcopy, the
// destination running. Both QEMUs pause; the receiver makes its destination listen again and
// waits for its sender, the sender redials and resumes its source, and the migration completes
// with the guest intact; a SIGINT to the receiver during postcopy is refused.
func TestLinkPostcopyRecover(t *testing.T) {
	sidecarBinary(t)
	for _, v := range Versions {
		t.Run(v, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			q := requireQEMU(t, v)
			src, dst, uri := postcopyPair(t, ctx, q, q)
			ends, port := loopEnds(t)
			var (
				mu    sync.Mutex
				cut   time.Time
				clock eventClock
			)
			cutter := atPhase(savevm.PhasePostcopy, func(*sidecarProc) {
				go func() {
					time.Sleep(500 * time.Millisecond)
					mu.Lock()
					cut = time.Now()
					mu.Unlock()
					if err := killConns(port); err != nil {
						t.Error(err)
					}
				}()
			})
			interrupt := atPhase(savevm.PhasePostcopy, func(p *sidecarProc) { p.cmd.Process.Signal(syscall.SIGINT) })
			recv, send := startLinkPostcopy(t, ctx, ends, nil, src, dst, uri, func(p *sidecarProc, e savevm.Event) {
				cutter(p, e)
				clock.watch(e, "connected again")
			}, interrupt, "--postcopy-bandwidth", "8000000")
			sum, wall := waitRecovered(t, send)
			code, _, stderr := recv.wait(t, 3*time.Minute)
			if code != 0 {
				t.Fatalf("receiver exit %d: %s", code, stderr)
			}
			if !strings.Contains(stderr, "refusing interrupt") {
				t.Errorf("the receiver's SIGINT during postcopy was not refused with a message: %q", stderr)
			}
			mu.Lock()
			t.Logf("recovered %d time(s); both sides connected again %v after the cut; %v total, %d requests", sum.Postcopy.Recoveries,
				clock.at("connected again").Sub(cut).Round(time.Millisecond), wall.Round(time.Millisecond), sum.Postcopy.Requests)
			mu.Unlock()
			if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
				t.Error(err)
			}
			checkRunningGuest(t, ctx, dst)
		})
	}
}

// TestLinkPostcopyDestinationKilled: the destination QEMU dies during postcopy. The receiver
// cannot recover and tells the sender (ERROR 3 to its next HELLO); both say so within seconds,
// and the source is never resumed.
func TestLinkPostcopyDestinationKilled(t *testing.T) {
	sidecarBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	q := requireQEMU(t, "10.0")
	src, dst, uri := postcopyPair(t, ctx, q, q)
	ends, _ := loopEnds(t)
	recv, send := startLinkPostcopy(t, ctx, ends, nil, src, dst, uri, atPhase(savevm.PhasePostcopy, func(*sidecarProc) {
		go func() {
			time.Sleep(300 * time.Millisecond)
			syscall.Kill(dst.PID, syscall.SIGKILL)
		}()
	}), nil, "--postcopy-bandwidth", "8000000")
	code, wall, stderr := send.wait(t, time.Minute)
	msg := oneLine(t, stderr, "gone", "never `cont` the source")
	if code != 4 {
		t.Errorf("sender exit %d, want 4", code)
	}
	if wall > 20*time.Second {
		t.Errorf("the sender took %v to report", wall)
	}
	rcode, rwall, rstderr := recv.wait(t, time.Minute)
	if rcode != 4 || !strings.Contains(rstderr, "gone") {
		t.Errorf("receiver exit %d after %v: %s", rcode, rwall, rstderr)
	}
	t.Logf("sender exit %d after %v: %s", code, wall.Round(time.Millisecond), msg)
	checkNeverResumed(t, ctx, src)
}

// TestLinkPostcopyRefusedWithoutDstQMP: a receiver without --dst-qmp cannot give its
// destination postcopy-ram nor recover it, so it refuses the sender's HELLO: both exit with the
// reason, before anything crossed; the source runs on untouched and the destination still waits.
func TestLinkPostcopyRefusedWithoutDstQMP(t *testing.T) {
	sidecarBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	q := requireQEMU(t, "10.0")
	src := faultVM(t, ctx, VMConfig{Name: "src", QEMU: q})
	port, _ := FreePort()
	uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
	dst := faultVM(t, ctx, VMConfig{Name: "dst", QEMU: q, Incoming: uri})
	ends, _ := loopEnds(t)
	recv := startReceiver(t, ctx, ends, "--to", uri, "--no-tls")
	send := startSidecar(t, nil, append([]string{"--qmp", src.SidecarQMP, "--to", "qmg://" + ends.dial, "--json", "--no-tls"}, linkPostcopyArgs()...)...)
	code, _, stderr := send.wait(t, 30*time.Second)
	msg := oneLine(t, stderr, "needs receive --dst-qmp")
	if code != 4 {
		t.Errorf("sender exit %d, want 4", code)
	}
	rcode, _, rstderr := recv.wait(t, 10*time.Second)
	if rcode == 0 || !strings.Contains(rstderr, "needs receive --dst-qmp") {
		t.Errorf("receiver exit %d: %s", rcode, rstderr)
	}
	t.Logf("sender: %s", msg)
	if m, err := src.QMP.QueryMigrate(ctx); err != nil || m.Status != "" {
		t.Errorf("the source was touched: migration %q (%v)", m.Status, err)
	}
	if s, err := dst.QMP.QueryStatus(ctx); err != nil || s.Status != "inmigrate" {
		t.Errorf("destination %q (%v), want still inmigrate", s.Status, err)
	}
}
