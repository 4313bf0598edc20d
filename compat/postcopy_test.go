package compat

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// Postcopy through the sidecar (issue 11). The dirty guest rewrites ~99 MiB continuously; with
// the source capped at 20 MB/s it can never converge within --downtime, so --postcopy-after 1
// switches after the first pass.

// postcopyArgs are the sidecar flags of a postcopy that must switch.
func postcopyArgs(src, dst *VM, uri string, extra ...string) []string {
	return append([]string{"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json",
		"--postcopy", "--postcopy-after", "1", "--bandwidth", "20000000"}, extra...)
}

// TestPostcopyMigration: every version pair, the destination held paused (-S): in postcopy it
// then asks for nothing and gets every page in the background, so its RAM must equal the
// paused source's page for page (checkMigrated) — the discard, the package with the device
// state and the postcopy pages all went through the relay right.
func TestPostcopyMigration(t *testing.T) {
	sidecarBinary(t)
	for _, p := range pairs {
		t.Run(p[0]+"-"+p[1], func(t *testing.T) {
			g := guestCases(128, 256)[0]
			var sum *savevm.Summary
			checkMigrated(t, requireQEMU(t, p[0]), requireQEMU(t, p[1]), "tcg", g, func(ctx context.Context, src, dst *VM, uri string) error {
				proc := startSidecar(t, nil, postcopyArgs(src, dst, uri)...)
				code, _, stderr := proc.wait(t, 2*time.Minute)
				if code != 0 {
					return fmt.Errorf("exit %d: %s", code, stderr)
				}
				sum = summaryOf(proc)
				return nil
			})
			if sum == nil || sum.Postcopy == nil || !sum.Postcopy.Started {
				t.Fatalf("the migration did not switch to postcopy: %+v", sum)
			}
			t.Logf("total %dms, %dms in postcopy, %d pages, %d requests", sum.TotalTimeMs, sum.Postcopy.PostcopyMs, sum.NormalPages, sum.Postcopy.Requests)
		})
	}
}

// postcopyPair starts the dirty guest and a destination that runs (no -S: in postcopy it asks
// for the pages it touches).
func postcopyPair(t *testing.T, ctx context.Context, srcQ, dstQ QEMU) (src, dst *VM, uri string) {
	return postcopyPairWith(t, ctx, srcQ, dstQ, nil)
}

// postcopyPairWith is postcopyPair with extra arguments for the destination QEMU.
func postcopyPairWith(t *testing.T, ctx context.Context, srcQ, dstQ QEMU, dstExtra []string) (src, dst *VM, uri string) {
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	uri = fmt.Sprintf("tcp:127.0.0.1:%d", port)
	machine := MachineFor(srcQ, dstQ)
	dst = StartVM(t, VMConfig{Name: "dst", QEMU: dstQ, Machine: machine, Disk: GuestDirty(), Incoming: uri, Extra: dstExtra})
	src = StartVM(t, VMConfig{Name: "src", QEMU: srcQ, Machine: machine, Disk: GuestDirty()})
	if err := src.WaitMoreSerial(ctx, 'B', 3); err != nil {
		t.Fatal(err)
	}
	return src, dst, uri
}

// postcopyNetPair is postcopyPair with the destination on the far host of a fresh NetPair
// (the sidecar then runs on the near one, np.Src).
func postcopyNetPair(t *testing.T, ctx context.Context, q QEMU) (np *NetPair, src, dst *VM, uri string) {
	np = NewNetPair(t, NetOptions{})
	uri = np.DstTCP(np.NextPort())
	dst = StartVM(t, VMConfig{Name: "dst", QEMU: q, Disk: GuestDirty(), Incoming: uri, Netns: np.Dst.Name})
	src = StartVM(t, VMConfig{Name: "src", QEMU: q, Disk: GuestDirty()})
	if err := src.WaitMoreSerial(ctx, 'B', 3); err != nil {
		t.Fatal(err)
	}
	return np, src, dst, uri
}

// checkRunningGuest checks the dirty guest on a destination that ran during postcopy: it keeps
// running, and its memory is consistent (CheckDirty: every page's counter is v or v+1 with one
// boundary — a page lost or stale in postcopy breaks that).
func checkRunningGuest(t *testing.T, ctx context.Context, dst *VM) {
	t.Helper()
	if err := dst.WaitMoreSerial(ctx, 'B', 2); err != nil {
		t.Fatalf("the guest does not run on the destination: %v", err)
	}
	if err := dst.QMP.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "dst.ram")
	size, err := dst.DumpRAM(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := CheckDirty(f, size); err != nil {
		t.Errorf("the destination's memory after postcopy: %v", err)
	}
}

// TestPostcopyRequests: the destination runs during postcopy and asks for the pages its guest
// touches; the sidecar forwards the requests to the source and the pages back, and reports the
// request latency. A SIGINT during postcopy is refused with a message.
func TestPostcopyRequests(t *testing.T) {
	sidecarBinary(t)
	for _, p := range pairs {
		t.Run(p[0]+"-"+p[1], func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			src, dst, uri := postcopyPair(t, ctx, requireQEMU(t, p[0]), requireQEMU(t, p[1]))
			proc := startSidecar(t, atPhase(savevm.PhasePostcopy, func(p *sidecarProc) {
				p.cmd.Process.Signal(syscall.SIGINT)
			}), postcopyArgs(src, dst, uri)...)
			code, wall, stderr := proc.wait(t, 2*time.Minute)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			if !strings.Contains(stderr, "refusing interrupt") {
				t.Errorf("the SIGINT during postcopy was not refused with a message: %q", stderr)
			}
			sum := summaryOf(proc)
			if sum == nil || sum.Postcopy == nil || !sum.Postcopy.Started {
				t.Fatalf("no postcopy summary: %+v", sum)
			}
			pc := sum.Postcopy
			if pc.Requests == 0 {
				t.Errorf("the running destination asked for no page")
			}
			t.Logf("%v total, %dms in postcopy, %d requests, latency p50 %dus p99 %dus max %dus", wall.Round(time.Millisecond),
				pc.PostcopyMs, pc.Requests, pc.LatencyP50Us, pc.LatencyP99Us, pc.LatencyMaxUs)
			if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
				t.Error(err)
			}
			checkRunningGuest(t, ctx, dst)
		})
	}
}

// TestPostcopyRecover: the TCP connection between the sidecar and the destination is reset
// (ss -K) during postcopy; both QEMUs pause (postcopy-paused) and the sidecar recovers by itself
// (migrate-recover, migrate resume), and the migration completes with the guest intact.
func TestPostcopyRecover(t *testing.T) {
	sidecarBinary(t)
	for _, v := range Versions {
		t.Run(v, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			q := requireQEMU(t, v)
			src, dst, uri := postcopyPair(t, ctx, q, q)
			port := strings.TrimPrefix(uri, "tcp:127.0.0.1:")
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
			proc := startSidecar(t, func(p *sidecarProc, e savevm.Event) {
				cutter(p, e)
				clock.watch(e, "connected again")
			}, postcopyArgs(src, dst, uri, "--postcopy-bandwidth", "8000000")...)
			sum, wall := waitRecovered(t, proc)
			mu.Lock()
			t.Logf("recovered %d time(s); both sides connected again %v after the cut; %v total", sum.Postcopy.Recoveries,
				clock.at("connected again").Sub(cut).Round(time.Millisecond), wall.Round(time.Millisecond))
			mu.Unlock()
			checkRunningGuest(t, ctx, dst)
		})
	}
}

// TestPostcopyRecoverSilentLink: the link to the destination goes silent during postcopy
// (everything dropped, no RST reaches the destination) and the sidecar's own connection is
// destroyed: the destination QEMU never notices by itself (it would wait for TCP's
// retransmission timeout, many minutes), so the sidecar pauses it (migrate-pause), and once the
// link is back it recovers; the guest runs on intact.
func TestPostcopyRecoverSilentLink(t *testing.T) {
	sidecarBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	np, src, dst, uri := postcopyNetPair(t, ctx, requireQEMU(t, "10.0"))
	var (
		mu     sync.Mutex
		healed time.Time
		clock  eventClock
	)
	cutter := atPhase(savevm.PhasePostcopy, func(*sidecarProc) {
		go func() {
			time.Sleep(300 * time.Millisecond)
			if err := np.Stall(); err != nil {
				t.Error(err)
			}
			if _, err := np.Src.killTCP(ctx, true); err != nil { // the RST is dropped on the way
				t.Error(err)
			}
			time.Sleep(3 * time.Second)
			mu.Lock()
			healed = time.Now()
			mu.Unlock()
			if err := np.Heal(); err != nil {
				t.Error(err)
			}
		}()
	})
	proc := startSidecarIn(t, np.Src.Name, func(p *sidecarProc, e savevm.Event) {
		cutter(p, e)
		clock.watch(e, "migrate-pause")
	}, postcopyArgs(src, dst, uri, "--postcopy-bandwidth", "8000000")...)
	sum, wall := waitRecovered(t, proc)
	mu.Lock()
	if clock.at("migrate-pause").IsZero() {
		t.Errorf("the sidecar did not pause the destination that missed the break")
	}
	t.Logf("recovered %d time(s), finished %v after the heal; %v total", sum.Postcopy.Recoveries, time.Since(healed).Round(time.Millisecond), wall.Round(time.Millisecond))
	mu.Unlock()
	checkRunningGuest(t, ctx, dst)
}

// TestPostcopyDestinationKilled: the destination QEMU dies during postcopy. The guest's newest
// state died with it; the sidecar must say so within seconds, with the state of each side, and
// never resume the source.
func TestPostcopyDestinationKilled(t *testing.T) {
	sidecarBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	q := requireQEMU(t, "10.0")
	src, dst, uri := postcopyPair(t, ctx, q, q)
	proc := startSidecar(t, atPhase(savevm.PhasePostcopy, func(*sidecarProc) {
		go func() {
			time.Sleep(300 * time.Millisecond)
			syscall.Kill(dst.PID, syscall.SIGKILL)
		}()
	}), postcopyArgs(src, dst, uri, "--postcopy-bandwidth", "8000000")...)
	code, wall, stderr := proc.wait(t, time.Minute)
	msg := oneLine(t, stderr, "gone", "never `cont` the source")
	if code != 4 {
		t.Errorf("exit %d, want 4", code)
	}
	if wall > 15*time.Second {
		t.Errorf("took %v to report", wall)
	}
	t.Logf("exit %d after %v: %s", code, wall.Round(time.Millisecond), msg)
	checkNeverResumed(t, ctx, src)
}

// checkNeverResumed: after the switch to postcopy the source must not run again.
func checkNeverResumed(t *testing.T, ctx context.Context, src *VM) {
	t.Helper()
	st, err := src.QMP.QueryStatus(ctx)
	if err != nil || st.Status == "running" {
		t.Errorf("the source is %q (%v): it must never be resumed after the switch", st.Status, err)
	}
}

// eventClock notes when the sidecar first sent a recovery event whose message holds a text.
type eventClock struct {
	mu   sync.Mutex
	seen map[string]time.Time
}

// watch is called with every event; texts are what to note.
func (c *eventClock) watch(e savevm.Event, texts ...string) {
	if e.Type != "recovery" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range texts {
		if _, ok := c.seen[s]; !ok && strings.Contains(e.Message, s) {
			if c.seen == nil {
				c.seen = map[string]time.Time{}
			}
			c.seen[s] = time.Now()
		}
	}
}

// at is when text was first seen (zero: never).
func (c *eventClock) at(text string) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seen[text]
}

// waitRecovered waits for a postcopy that must recover and finish: exit 0, a recovery counted.
func waitRecovered(t *testing.T, proc *sidecarProc) (*savevm.Summary, time.Duration) {
	t.Helper()
	code, wall, stderr := proc.wait(t, 3*time.Minute)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	sum := summaryOf(proc)
	if sum == nil || sum.Postcopy == nil || sum.Postcopy.Recoveries < 1 {
		t.Fatalf("no recovery in the summary: %+v", sum)
	}
	return sum, wall
}

// TestPostcopyRefusesPreempt: a source with postcopy-preempt on (a channel the relay does not
// serve) is refused before anything is touched, with the fix in the message.
func TestPostcopyRefusesPreempt(t *testing.T) {
	sidecarBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	q := requireQEMU(t, "10.0")
	src, dst, uri := postcopyPair(t, ctx, q, q)
	if err := src.QMP.SetCapabilities(ctx, map[string]bool{"postcopy-ram": true, "postcopy-preempt": true}); err != nil {
		t.Fatal(err)
	}
	proc := startSidecar(t, nil, postcopyArgs(src, dst, uri)...)
	code, _, stderr := proc.wait(t, time.Minute)
	msg := oneLine(t, stderr, "postcopy-preempt", "turn it off")
	if code != 2 {
		t.Errorf("exit %d, want 2", code)
	}
	if m, err := src.QMP.QueryMigrate(ctx); err != nil || m.Status != "" {
		t.Errorf("the source was touched: migration %q (%v)", m.Status, err)
	}
	t.Logf("refused: %s", msg)
}

// killConns resets every established TCP connection to 127.0.0.1:port (ss -K).
func killConns(port string) error {
	out, err := exec.Command("ss", "-K", "dst", "127.0.0.1:"+port).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ss -K: %v: %s", err, out)
	}
	return nil
}
