package compat

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	xunix "golang.org/x/sys/unix"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// sidecarBinary builds the CLI once per test run.
func sidecarBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "qmg-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "qemu-migrate-go")
		out, err := exec.Command("go", "build", "-o", binPath, filepath.Join(RepoRoot(), "cmd/qemu-migrate-go")).CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v: %s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// runSidecar runs the CLI with a deadline and returns stdout, stderr, exit code and wall time.
func runSidecar(t testing.TB, timeout time.Duration, args ...string) (string, string, int, time.Duration) {
	t.Helper()
	return runCmd(t, timeout, "", sidecarBinary(t), args...)
}

// runCmd runs argv0 (the CLI, or a link to it) with stdin and a deadline. Its stdout and stderr
// are pipes that must reach EOF: a child left holding them shows up as a timeout.
func runCmd(t testing.TB, timeout time.Duration, stdin, argv0 string, args ...string) (string, string, int, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv0, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	if ctx.Err() != nil {
		t.Fatalf("%s did not exit within %v; stderr: %s", filepath.Base(argv0), timeout, stderr.String())
	}
	return stdout.String(), stderr.String(), code, time.Since(start)
}

// jsonEvents parses the --json lines and checks each is one savevm.Event.
func jsonEvents(t *testing.T, out string) []savevm.Event {
	t.Helper()
	var evs []savevm.Event
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		dec := json.NewDecoder(strings.NewReader(sc.Text()))
		dec.DisallowUnknownFields()
		var e savevm.Event
		if err := dec.Decode(&e); err != nil {
			t.Fatalf("not a JSON event line: %q: %v", sc.Text(), err)
		}
		evs = append(evs, e)
	}
	return evs
}

// dirtyPair starts a source running the 128 MiB dirty guest (already passing) and a destination
// waiting on the returned URI.
func dirtyPair(ctx context.Context, t *testing.T, q QEMU) (src, dst *VM, uri string) {
	t.Helper()
	disk := GuestDirty()
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	uri = fmt.Sprintf("tcp:127.0.0.1:%d", port)
	src = StartVM(t, VMConfig{Name: "src", QEMU: q, MemMiB: 128, Disk: disk})
	dst = StartVM(t, VMConfig{Name: "dst", QEMU: q, MemMiB: 128, Disk: disk, Incoming: uri})
	if err := src.WaitMoreSerial(ctx, 'B', 3); err != nil {
		t.Fatal(err)
	}
	return src, dst, uri
}

// TestCLIMigrateJSON migrates with the binary as a hook script would (--json, not a TTY) and
// checks the event stream, the exit code and the guest on the destination.
func TestCLIMigrateJSON(t *testing.T) {
	q := requireQEMU(t, "10.0")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	src, dst, uri := dirtyPair(ctx, t, q)
	stdout, stderr, code, _ := runSidecar(t, time.Minute, "--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	evs := jsonEvents(t, stdout)
	phases := map[savevm.Phase]bool{}
	var sum *savevm.Summary
	for _, e := range evs {
		if e.Type == "phase" {
			phases[e.Phase] = true
		}
		if e.Type == "summary" {
			sum = e.Summary
		}
	}
	for _, p := range []savevm.Phase{savevm.PhaseSetup, savevm.PhaseIterate, savevm.PhaseComplete, savevm.PhaseDevices, savevm.PhaseDone} {
		if !phases[p] {
			t.Errorf("no phase event %q in %d events", p, len(evs))
		}
	}
	if sum == nil || sum.NormalPages == 0 || sum.BytesOut == 0 || sum.Sections["ram"] == 0 || sum.TailBytes == 0 {
		t.Fatalf("summary %+v", sum)
	}
	if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
		t.Fatal(err)
	}
	if err := dst.WaitMoreSerial(ctx, 'B', 3); err != nil {
		t.Fatal(err)
	}
}

// TestFileAndRestore saves a running 7.2 VM with --to file: (7.2 has no file: of its own), then
// replays the file with `restore` into a 7.2 and a 10.0 destination (pc-q35-7.2) and verifies
// the destination's RAM against the source's.
func TestFileAndRestore(t *testing.T) {
	q72, q10 := requireQEMU(t, "7.2"), requireQEMU(t, "10.0")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g := guestCases(128, 256)[0]
	disk := g.disk(g.memMiB)
	src := StartVM(t, VMConfig{Name: "src", QEMU: q72, Machine: "pc-q35-7.2", MemMiB: g.memMiB, Disk: disk})
	if err := src.WaitMoreSerial(ctx, 'B', 3); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "vm.stream")
	if _, stderr, code, _ := runSidecar(t, time.Minute, "--qmp", src.SidecarQMP, "--to", "file:"+file, "-q"); code != 0 {
		t.Fatalf("save to file: exit %d: %s", code, stderr)
	}
	if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code, _ := runSidecar(t, time.Minute, "inspect", "--verify", file); code != 0 {
		t.Fatalf("inspect --verify of the saved file: exit %d: %s", code, stderr)
	}
	for _, dq := range []QEMU{q72, q10} {
		t.Run(dq.Version, func(t *testing.T) {
			port, _ := FreePort()
			uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
			dst := StartVM(t, VMConfig{Name: "dst", QEMU: dq, Machine: "pc-q35-7.2", MemMiB: g.memMiB, Disk: disk, Incoming: uri, Paused: true})
			if _, stderr, code, _ := runSidecar(t, time.Minute, "restore", "--from", file, "--to", uri, "--dst-version", dq.Version); code != 0 {
				t.Fatalf("restore: exit %d: %s", code, stderr)
			}
			if _, err := dst.WaitStatus(ctx, "paused"); err != nil {
				t.Fatalf("%v; dst stderr: %s", err, lastLine(dst.Stderr()))
			}
			verifyAgainstSource(ctx, t, src, dst, g)
			if err := dst.QMP.Cont(ctx); err != nil {
				t.Fatal(err)
			}
			if err := dst.WaitMoreSerial(ctx, 'B', 3); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestPolicyTimeout runs the dirty guest with a downtime budget it cannot meet (1 ms: after every
// pass nearly all of its 127 MiB are dirty again). With --timeout-action abort the sidecar gives
// up, exits with the policy code and the source keeps running; with pause it stops the guest,
// completes, and (with --dst-qmp) resumes the guest on the destination.
func TestPolicyTimeout(t *testing.T) {
	q := requireQEMU(t, "7.2")
	for _, action := range []string{"abort", "pause"} {
		t.Run(action, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			src, dst, uri := dirtyPair(ctx, t, q)
			args := []string{"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP,
				"--downtime", "1ms", "--timeout", "3s", "--timeout-action", action, "-q"}
			if action == "abort" {
				// A guest starved of CPU on a busy machine may dirty almost nothing between two
				// syncs, and 1 ms can then be met. At 2 MB/s the first pass over 128 MiB alone
				// outlasts the timeout, so nothing but --timeout can end this migration. (The
				// pause case must stay uncapped: the paused guest's RAM still has to go.)
				args = append(args, "--bandwidth", "2000000")
			}
			_, stderr, code, wall := runSidecar(t, time.Minute, args...)
			t.Logf("exit %d after %v: %s", code, wall.Round(time.Millisecond), strings.TrimSpace(stderr))
			switch action {
			case "abort":
				if code != 5 || !strings.Contains(stderr, "--timeout") {
					t.Fatalf("exit %d, want 5 (policy) naming --timeout", code)
				}
				if st, err := src.WaitStatus(ctx, "running"); err != nil {
					t.Fatalf("source %q after abort: %v", st, err)
				}
				if err := src.WaitMoreSerial(ctx, 'B', 3); err != nil {
					t.Fatalf("source guest stopped after abort: %v", err)
				}
			case "pause":
				if code != 0 {
					t.Fatalf("exit %d", code)
				}
				if _, err := dst.WaitStatus(ctx, "running"); err != nil {
					t.Fatal(err)
				}
				if err := dst.WaitMoreSerial(ctx, 'B', 3); err != nil {
					t.Fatal(err)
				}
			}
			if wall > 20*time.Second {
				t.Errorf("took %v with --timeout 3s", wall)
			}
		})
	}
}

// TestPolicyAutoConverge: with --auto-converge QEMU throttles its vCPU once two dirty syncs in a
// row, at least a second apart, find more dirtied than half of what was sent. The throttle must
// show in the events, and the capability must be set back afterwards.
//
// The source is capped at 20 MB/s, so every pass over the guest's 99 MiB takes about 5 s and the
// 30 ms budget allows 0.6 MB of dirty RAM. Uncapped, a guest starved of CPU on a busy machine once
// dirtied less than 30 ms of loopback speed during a 200 ms first pass, and QEMU completed before
// any second sync (seen in CI). Whether the throttled guest then fits 30 ms depends on how busy the
// machine is, so --timeout-action pause completes it either way.
func TestPolicyAutoConverge(t *testing.T) {
	q := requireQEMU(t, "7.2")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	src, dst, uri := dirtyPair(ctx, t, q)
	stdout, stderr, code, wall := runSidecar(t, 90*time.Second, "--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP,
		"--downtime", "30ms", "--bandwidth", "20000000", "--auto-converge", "--timeout", "25s", "--timeout-action", "pause", "--json")
	if code != 0 {
		t.Fatalf("exit %d after %v: %s", code, wall, stderr)
	}
	var maxThrottle int64
	paused := false
	for _, e := range jsonEvents(t, stdout) {
		maxThrottle = max(maxThrottle, e.ThrottlePercent)
		if e.Summary != nil {
			paused = e.Summary.PausedByPolicy
		}
	}
	t.Logf("done in %v with the guest throttled up to %d%% (converged by itself: %v)", wall.Round(time.Millisecond), maxThrottle, !paused)
	if maxThrottle == 0 {
		t.Error("no throttling reported with --auto-converge")
	}
	if caps, err := src.QMP.QueryCapabilities(ctx); err != nil || caps["auto-converge"] {
		t.Errorf("auto-converge left on on the source (%v)", err)
	}
	if err := dst.WaitMoreSerial(ctx, 'B', 3); err != nil {
		t.Fatal(err)
	}
}

// TestPolicySwitchesMidPass: in relay mode QEMU keeps its own switchover rule with the budget as
// its downtime-limit (savevm.HoldDowntime), so it stops the guest in the middle of a pass, as
// soon as what is left fits, as it does migrating directly. The source is paused (nothing is
// dirtied) and capped at 25 MB/s; its first pass over the dirty guest's 99 MiB takes about 4 s,
// and with a 3 s budget QEMU switches over when about 75 MB are left: the last 29 MiB of the
// guest's RAM are zero pages (9 bytes each), so some 45 MB of full pages go with the guest
// stopped. Held at 1 ms it could only switch over after the whole pass, with nothing left: the
// RAM sent with the guest stopped is what tells the two apart.
func TestPolicySwitchesMidPass(t *testing.T) {
	for _, series := range Versions {
		t.Run(series, func(t *testing.T) {
			q := requireQEMU(t, series)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			src, dst, uri := dirtyPair(ctx, t, q)
			if err := src.QMP.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			stdout, stderr, code, wall := runSidecar(t, time.Minute, "--qmp", src.SidecarQMP, "--to", uri,
				"--downtime", "3s", "--bandwidth", "25000000", "--json")
			if code != 0 {
				t.Fatalf("exit %d after %v: %s", code, wall, stderr)
			}
			var atStop, atDevices int64 = -1, -1
			var sum *savevm.Summary
			for _, e := range jsonEvents(t, stdout) {
				switch {
				case e.Type == "phase" && e.Phase == savevm.PhaseComplete:
					atStop = e.Transferred
				case e.Type == "phase" && e.Phase == savevm.PhaseDevices:
					atDevices = e.Transferred
				case e.Summary != nil:
					sum = e.Summary
				}
			}
			if atStop < 0 || atDevices < 0 || sum == nil {
				t.Fatalf("no complete or devices phase, or no summary, in:\n%s", stdout)
			}
			stopped := atDevices - atStop
			t.Logf("done in %v: %.1f MB of RAM sent with the guest stopped, downtime %d ms", wall.Round(time.Millisecond), float64(stopped)/1e6, sum.DowntimeMs)
			if stopped < 20e6 {
				t.Errorf("%d bytes of RAM sent after the stop: QEMU switched over only after the whole pass", stopped)
			}
			if sum.DowntimeMs > 4500 {
				t.Errorf("downtime %d ms with a 3 s budget", sum.DowntimeMs)
			}
			if sum.Switchover != "qemu" {
				t.Errorf("the summary says the switchover was decided by %q: QEMU's own rule made it, mid-pass", sum.Switchover)
			}
			if _, err := dst.WaitStatus(ctx, "paused"); err != nil {
				t.Fatal(err)
			}
			f, size := guestDump(t, dst, "dst.bin")
			if _, err := CheckDirty(f, size); err != nil {
				t.Error(err)
			}
		})
	}
}

// TestCLIDetach runs `migrate --detach` as a libvirt hook would: the command must return at
// once with exit 0, naming the background process and its log; that process must run in its own
// session without the caller's descriptors, and its log must end with the exit event of a
// completed migration.
func TestCLIDetach(t *testing.T) {
	q := requireQEMU(t, "7.2")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	src, dst, uri := dirtyPair(ctx, t, q)
	logPath := filepath.Join(t.TempDir(), "migrate.log")
	stdout, stderr, code, took := runSidecar(t, 10*time.Second, "--qmp", src.SidecarQMP, "--to", uri,
		"--dst-qmp", dst.SidecarQMP, "--detach", "--log", logPath, "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if took > 2*time.Second {
		t.Errorf("--detach took %v to return", took)
	}
	t.Logf("--detach returned in %v", took.Round(time.Millisecond))
	evs := jsonEvents(t, stdout)
	if len(evs) != 1 || evs[0].Type != "detached" || evs[0].PID == 0 || evs[0].Log != logPath {
		t.Fatalf("stdout %q: want one detached event with the PID and %s", stdout, logPath)
	}
	pid := evs[0].PID
	// runSidecar waited for the CLI's stdout and stderr to close: the child does not hold them.
	if sid, err := xunix.Getsid(pid); err == nil && sid != pid {
		t.Errorf("background process %d is in session %d, not its own", pid, sid)
	}
	var last savevm.Event
	for {
		b, _ := os.ReadFile(logPath)
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		if err := json.Unmarshal([]byte(lines[len(lines)-1]), &last); err == nil && last.Type == "exit" {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("the log never ended with an exit event: %s", b)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if last.ExitCode == nil || *last.ExitCode != 0 {
		b, _ := os.ReadFile(logPath)
		t.Fatalf("background migration failed: %s", b)
	}
	b, _ := os.ReadFile(logPath)
	if !strings.Contains(string(b), `"type":"summary"`) {
		t.Errorf("log has no summary event: %s", b)
	}
	if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
		t.Fatal(err)
	}
	if err := dst.WaitMoreSerial(ctx, 'B', 3); err != nil {
		t.Fatal(err)
	}
}
