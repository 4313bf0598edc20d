package compat

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// Verified migration (issue 14) against real QEMU: the sidecar resumes the destination only
// after hashing both RAMs; one changed page on the destination is refused with the page named
// and nothing resumed; a destination that is not held paused is refused before the source is
// touched; a QEMU that dies during the check leaves the other side untouched.

// verifyPair starts a source running g and a destination listening on a fresh port; the
// destination is held paused (-S) unless running is set; shared picks both RAM backends (the
// same on both sides: a backend's id names the RAM block, "ram0", which must match); dstNS
// is the destination's network namespace (the link tests).
func verifyPair(t *testing.T, ctx context.Context, srcQ, dstQ QEMU, g guestCase, running bool, shared string, dstNS ...string) (src, dst *VM, uri string) {
	t.Helper()
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	uri = fmt.Sprintf("tcp:127.0.0.1:%d", port)
	machine := MachineFor(srcQ, dstQ)
	disk := g.disk(g.memMiB)
	src = StartVM(t, VMConfig{Name: "src", QEMU: srcQ, Machine: machine, MemMiB: g.memMiB, Disk: disk, SharedMem: shared})
	dst = StartVM(t, VMConfig{Name: "dst", QEMU: dstQ, Machine: machine, MemMiB: g.memMiB, Disk: disk,
		Incoming: uri, Paused: !running, SharedMem: shared, Netns: strings.Join(dstNS, "")})
	if err := src.WaitMoreSerial(ctx, g.progress, 3); err != nil {
		t.Fatal(err)
	}
	return src, dst, uri
}

func verifyArgs(src, dst *VM, uri string, extra ...string) []string {
	return append([]string{"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json", "--verify"}, extra...)
}

// atVerifyPaused is a hook that runs f once, when the sidecar says both guests are paused and
// it starts comparing (QMG_TEST_VERIFY_DELAY holds it there).
func atVerifyPaused(f func(p *sidecarProc)) func(*sidecarProc, savevm.Event) {
	var once sync.Once
	return func(p *sidecarProc, e savevm.Event) {
		if e.Type == "verify" && strings.Contains(e.Message, "both guests are paused") {
			once.Do(func() {
				p.fault = time.Now()
				f(p)
			})
		}
	}
}

// TestVerifyMigration: both guests, 7.2 and 10.0 (and across), the destination held by -S is
// resumed by the sidecar after the check, and its guest runs on. With its RAM in a shared file
// (the file method), anonymous (the process's mapping), and read by pmemsave, the fallback
// that needs only QMP (its guest-physical map must be the loaded guest's, not the fresh boot's
// that the destination had before the stream).
func TestVerifyMigration(t *testing.T) {
	sidecarBinary(t)
	type variant struct{ guest, shared, methods string }
	for _, p := range pairs {
		for _, vr := range []variant{{"dirty", "", ""}, {"fill", "file", ""}, {"dirty", "", "pmemsave,process_vm_readv"}} {
			g := guestCases(128, 256)[0]
			if vr.guest == "fill" {
				g = guestCases(128, 256)[1]
			}
			shared := vr.shared
			name := fmt.Sprintf("%s-%s/%s", p[0], p[1], g.name)
			var extra []string
			if vr.methods != "" {
				name += "/" + strings.ReplaceAll(vr.methods, ",", "+") // a comma in t.TempDir would break -qmp
				extra = []string{"--verify-method", vr.methods}
			}
			t.Run(name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				src, dst, uri := verifyPair(t, ctx, requireQEMU(t, p[0]), requireQEMU(t, p[1]), g, false, shared)
				proc := startSidecar(t, nil, verifyArgs(src, dst, uri, extra...)...)
				code, wall, stderr := proc.wait(t, 2*time.Minute)
				if code != 0 {
					t.Fatalf("exit %d: %s", code, stderr)
				}
				sum := summaryOf(proc)
				if sum == nil || sum.Verify == nil {
					t.Fatalf("no verify summary: %+v", sum)
				}
				v := sum.Verify
				if !v.Equal || v.Differing != 0 {
					t.Fatalf("verify says not equal yet exited 0: %+v", v)
				}
				if vr.methods != "" && (!strings.HasPrefix(v.SourceMethod, "pmemsave") || !strings.HasPrefix(v.DestMethod, "pmemsave")) {
					t.Errorf("the guest's RAM was not read by pmemsave: source %s, destination %s", v.SourceMethod, v.DestMethod)
				}
				if want := int64(g.memMiB) << 20 >> 12; int64(v.Pages) < want {
					t.Errorf("verified %d pages, the guest alone has %d", v.Pages, want)
				}
				if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
					t.Error(err)
				}
				if _, err := dst.WaitStatus(ctx, "running"); err != nil {
					t.Fatalf("the sidecar did not resume the verified destination: %v", err)
				}
				if err := dst.WaitMoreSerial(ctx, g.progress, 3); err != nil {
					t.Fatalf("guest does not run on the destination: %v", err)
				}
				t.Logf("%v total; %d pages in %d blocks verified in %d ms (source %s %d ms, destination %s %d ms), %d excluded",
					wall.Round(time.Millisecond), v.Pages, v.Blocks, v.DurationMs, v.SourceMethod, v.SourceMs, v.DestMethod, v.DestMs, v.Excluded)
			})
		}
	}
}

// TestVerifyMismatch: one page of the destination's loaded RAM is changed through its shared
// backend file after loading and before the check: the sidecar exits 8 naming the block and
// the page, the destination stays paused, and the source — in postmigrate — runs on after
// `cont`, as the message says.
func TestVerifyMismatch(t *testing.T) {
	sidecarBinary(t)
	t.Setenv("QMG_TEST_VERIFY_DELAY", "1500ms")
	for _, series := range []string{"7.2", "10.0"} {
		t.Run(series, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			q := requireQEMU(t, series)
			g := guestCases(128, 256)[0]
			src, dst, uri := verifyPair(t, ctx, q, q, g, false, "file")
			const page = 0x2345 // a page of the guest's dirty area (1 MiB..), 4 KiB each
			var werr error
			proc := startSidecar(t, atVerifyPaused(func(*sidecarProc) {
				werr = flipPage(filepath.Join(dst.Dir, "ram"), page)
			}), verifyArgs(src, dst, uri)...)
			code, _, stderr := proc.wait(t, 2*time.Minute)
			if werr != nil {
				t.Fatal(werr)
			}
			if code != 8 {
				t.Fatalf("exit %d, want 8 (verify): %s", code, stderr)
			}
			checkMismatchMessage(t, "sidecar", stderr, page)
			if sum := summaryOf(proc); sum == nil || sum.Verify == nil || sum.Verify.Equal || sum.Verify.Differing != 1 {
				t.Errorf("summary: %+v", sum)
			}
			checkNothingResumed(t, ctx, src, dst, g)
			t.Logf("refused: %s", lastLine(stderr))
		})
	}
}

// checkMismatchMessage checks that a refusal names the changed page and what to do.
func checkMismatchMessage(t *testing.T, side, msg string, page int64) {
	t.Helper()
	for _, want := range []string{"block ram0: 1 of", fmt.Sprintf("page %d (offset 0x%x000)", page, page), "not resumed", "`cont` on the source"} {
		if !strings.Contains(msg, want) {
			t.Errorf("the %s's error does not say %q: %s", side, want, msg)
		}
	}
}

// checkNothingResumed checks the state a refused check leaves: the destination paused, the
// source in postmigrate — and resumable, as the message says.
func checkNothingResumed(t *testing.T, ctx context.Context, src, dst *VM, g guestCase) {
	t.Helper()
	time.Sleep(500 * time.Millisecond) // a resume, had there been one, would show by now
	if st, err := dst.QMP.QueryStatus(ctx); err != nil || st.Status != "paused" {
		t.Errorf("destination is %+v (%v), want paused", st, err)
	}
	if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
		t.Fatal(err)
	}
	if err := src.QMP.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	if err := src.WaitMoreSerial(ctx, g.progress, 3); err != nil {
		t.Fatalf("the source does not run on after `cont`: %v", err)
	}
}

// flipPage inverts one byte in page n of a RAM backend file.
func flipPage(path string, n int64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	b := make([]byte, 1)
	off := n<<12 + 0x123
	if _, err := f.ReadAt(b, off); err != nil {
		return err
	}
	b[0] ^= 0xff
	_, err = f.WriteAt(b, off)
	return err
}

// TestVerifyRefusesRunningDestination: a destination started without -S would run by itself
// after loading: --verify refuses before the source is touched, with the fix in the message.
func TestVerifyRefusesRunningDestination(t *testing.T) {
	sidecarBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	q := requireQEMU(t, "10.0")
	g := guestCases(128, 256)[0]
	src, dst, uri := verifyPair(t, ctx, q, q, g, true, "")
	proc := startSidecar(t, nil, verifyArgs(src, dst, uri)...)
	code, _, stderr := proc.wait(t, time.Minute)
	if code != 2 {
		t.Fatalf("exit %d, want 2: %s", code, stderr)
	}
	if !strings.Contains(stderr, "-S") || !strings.Contains(stderr, "stays paused") {
		t.Errorf("the refusal does not say how to start the destination: %s", stderr)
	}
	if ph := proc.phases(); len(ph) != 0 {
		t.Errorf("the sidecar went on to phases %v before refusing", ph)
	}
	if st, err := src.QMP.QueryStatus(ctx); err != nil || st.Status != "running" {
		t.Errorf("source is %+v (%v), want running", st, err)
	}
	if mi, err := src.QMP.QueryMigrate(ctx); err == nil && mi.Status != "" && mi.Status != "none" {
		t.Errorf("the source's migration was started: %s", mi.Status)
	}
	t.Logf("refused: %s", lastLine(stderr))
}

// TestVerifyInterrupted: SIGINT while the sidecar holds at the check: exit 6, nothing resumed.
func TestVerifyInterrupted(t *testing.T) {
	sidecarBinary(t)
	t.Setenv("QMG_TEST_VERIFY_DELAY", "1500ms")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	q := requireQEMU(t, "10.0")
	g := guestCases(128, 256)[0]
	src, dst, uri := verifyPair(t, ctx, q, q, g, false, "")
	proc := startSidecar(t, atVerifyPaused(func(p *sidecarProc) { p.cmd.Process.Signal(syscall.SIGINT) }), verifyArgs(src, dst, uri)...)
	code, _, stderr := proc.wait(t, time.Minute)
	if code != 6 {
		t.Errorf("exit %d, want 6 (interrupted): %s", code, stderr)
	}
	if !strings.Contains(stderr, "interrupted") || !strings.Contains(stderr, "Nothing was resumed") {
		t.Errorf("the error does not say what happened: %s", stderr)
	}
	checkNothingResumed(t, ctx, src, dst, g)
}

// TestVerifyQEMUDies: the source's or the destination's QEMU (and with it its QMP) is killed
// while the sidecar holds at the check: a clear error naming the side, and the other side is
// not resumed (a destination stays paused, a source in postmigrate).
func TestVerifyQEMUDies(t *testing.T) {
	sidecarBinary(t)
	t.Setenv("QMG_TEST_VERIFY_DELAY", "1500ms")
	for _, victim := range []string{"source", "destination"} {
		t.Run(victim, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			q := requireQEMU(t, "10.0")
			g := guestCases(128, 256)[0]
			src, dst, uri := verifyPair(t, ctx, q, q, g, false, "")
			kill, other, otherState := src, dst, "paused"
			if victim == "destination" {
				kill, other, otherState = dst, src, "postmigrate"
			}
			proc := startSidecar(t, atVerifyPaused(func(*sidecarProc) { kill.Kill() }), verifyArgs(src, dst, uri)...)
			code, took, stderr := proc.wait(t, time.Minute)
			if code == 0 || code == 8 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			if !strings.Contains(stderr, "could not read the "+victim) || !strings.Contains(stderr, "Nothing was resumed") {
				t.Errorf("the error does not name the %s or what was resumed: %s", victim, stderr)
			}
			time.Sleep(300 * time.Millisecond)
			if st, err := other.QMP.QueryStatus(ctx); err != nil || st.Status != otherState {
				t.Errorf("the surviving side is %+v (%v), want %s", st, err, otherState)
			}
			t.Logf("exit %d after %v: %s", code, took.Round(time.Millisecond), lastLine(stderr))
		})
	}
}

// verifyLinkRun runs receive (next to dst, in the link's destination namespace) and the sender
// with --verify, mutual TLS across the veth pair; on sees the sender's events.
func verifyLinkRun(t *testing.T, ctx context.Context, ends linkEnds, pki *TestPKI, src, dst *VM, uri string, on func(*sidecarProc, savevm.Event)) pairRun {
	t.Helper()
	var r pairRun
	r.recv = startReceiver(t, ctx, ends, "--to", uri, "--dst-qmp", dst.SidecarQMP,
		"--tls-cert", pki.Server.CertFile, "--tls-key", pki.Server.KeyFile, "--tls-ca", pki.CA.CertFile)
	r.send = startSidecarIn(t, ends.srcNS, on, "--qmp", src.SidecarQMP, "--to", "qmg://"+ends.dial, "--json", "--verify",
		"--tls-cert", pki.Client.CertFile, "--tls-key", pki.Client.KeyFile, "--tls-ca", pki.CA.CertFile)
	r.sendCode, r.sendWall, r.sendErr = r.send.wait(t, 2*time.Minute)
	r.recvCode, r.recvWall, r.recvErr = r.recv.wait(t, 3*time.Minute) // from its start: it lives as long as the sender
	return r
}

// TestLinkVerify: --verify over a pair of sidecars, each hashing its own QEMU and only the
// destination's hash list crossing the link. Passes for every version pair (the receiver
// resumes its destination only on the sender's verdict); one page changed on the destination
// → both sidecars exit 8 naming it, nothing resumed, the source resumable; a destination not
// held paused → the receiver refuses HELLO, the source untouched.
func TestLinkVerify(t *testing.T) {
	sidecarBinary(t)
	ends, np := netEnds(t, NetOptions{})
	pki := NewTestPKI(t, np.Dst.Addr.String())
	for _, p := range pairs {
		t.Run("equal/"+p[0]+"-"+p[1], func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			g := guestCases(128, 256)[0]
			src, dst, uri := verifyPair(t, ctx, requireQEMU(t, p[0]), requireQEMU(t, p[1]), g, false, "", np.Dst.Name)
			r := verifyLinkRun(t, ctx, ends, pki, src, dst, uri, nil)
			if r.sendCode != 0 || r.recvCode != 0 {
				t.Fatalf("sender exit %d: %s; receiver exit %d: %s", r.sendCode, r.sendErr, r.recvCode, r.recvErr)
			}
			ss, rs := summaryOf(r.send), summaryOf(r.recv)
			if ss == nil || ss.Verify == nil || !ss.Verify.Equal || rs == nil || rs.Verify == nil || !rs.Verify.Equal {
				t.Fatalf("summaries: sender %+v, receiver %+v", ss, rs)
			}
			if want := int64(g.memMiB) << 20 >> 12; int64(ss.Verify.Pages) < want {
				t.Errorf("verified %d pages, the guest alone has %d", ss.Verify.Pages, want)
			}
			if _, err := dst.WaitStatus(ctx, "running"); err != nil {
				t.Fatalf("the receiver did not resume the verified destination: %v", err)
			}
			if err := dst.WaitMoreSerial(ctx, g.progress, 3); err != nil {
				t.Fatalf("guest does not run on the destination: %v", err)
			}
			v := ss.Verify
			t.Logf("%d pages verified in %d ms (source %s %d ms; destination %s, %d ms to its list on the sender)",
				v.Pages, v.DurationMs, v.SourceMethod, v.SourceMs, v.DestMethod, v.DestMs)
		})
	}
	t.Run("mismatch", func(t *testing.T) {
		t.Setenv("QMG_TEST_VERIFY_DELAY", "1500ms")
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		q := requireQEMU(t, "10.0")
		g := guestCases(128, 256)[0]
		src, dst, uri := verifyPair(t, ctx, q, q, g, false, "file", np.Dst.Name)
		const page = 0x3456
		var werr error
		r := verifyLinkRun(t, ctx, ends, pki, src, dst, uri, atVerifyPaused(func(*sidecarProc) {
			werr = flipPage(filepath.Join(dst.Dir, "ram"), page)
		}))
		if werr != nil {
			t.Fatal(werr)
		}
		for side, c := range map[string]struct {
			code int
			msg  string
		}{"sender": {r.sendCode, r.sendErr}, "receiver": {r.recvCode, r.recvErr}} {
			if c.code != 8 {
				t.Errorf("%s exit %d, want 8: %s", side, c.code, c.msg)
			}
			checkMismatchMessage(t, side, c.msg, page)
		}
		checkNothingResumed(t, ctx, src, dst, g)
		t.Logf("receiver: %s", lastLine(r.recvErr))
	})
	t.Run("destination-not-held", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		q := requireQEMU(t, "10.0")
		g := guestCases(128, 256)[0]
		src, dst, uri := verifyPair(t, ctx, q, q, g, true, "", np.Dst.Name)
		r := verifyLinkRun(t, ctx, ends, pki, src, dst, uri, nil)
		if r.sendCode == 0 || r.recvCode == 0 {
			t.Fatalf("not refused: sender exit %d, receiver exit %d", r.sendCode, r.recvCode)
		}
		for side, msg := range map[string]string{"sender": r.sendErr, "receiver": r.recvErr} {
			if !strings.Contains(msg, "-S") {
				t.Errorf("the %s does not say how to start the destination: %s", side, msg)
			}
		}
		if m, err := src.QMP.QueryMigrate(ctx); err != nil || m.Status != "" {
			t.Errorf("the source was touched: migration %q (%v)", m.Status, err)
		}
		if st, err := dst.QMP.QueryStatus(ctx); err != nil || st.Status != "inmigrate" {
			t.Errorf("destination is %+v (%v), want still inmigrate", st, err)
		}
		t.Logf("sender exit %d: %s", r.sendCode, lastLine(r.sendErr))
	})
}
