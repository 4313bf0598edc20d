package compat

// The fault matrix (issue 5): the built sidecar against real QEMU, one fault per case. Each case
// checks that the sidecar exits non-zero within a bounded time with one clear line on stderr
// naming the phase and the cause, and checks the source VM against the safety contract
// (design.md): a failure before the destination had the complete stream leaves the source
// running (the dirty guest still prints 'B') with its migration parameters restored; a failure
// after it leaves the source in postmigrate and the message says how to recover. Every case
// records a row `case | exit code | time | source state | message`; TestFault logs the table.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// faultRow is one line of the matrix.
type faultRow struct {
	name, source, message string
	code                  int
	wall                  time.Duration
}

var (
	faultMu   sync.Mutex
	faultRows []faultRow
)

func recordFault(t *testing.T, code int, wall time.Duration, source, msg string) {
	t.Helper()
	name := strings.TrimPrefix(t.Name(), "TestFault/")
	faultMu.Lock()
	faultRows = append(faultRows, faultRow{name, source, msg, code, wall})
	faultMu.Unlock()
	t.Logf("%s | %d | %v | %s | %s", name, code, wall.Round(time.Millisecond), source, msg)
}

// eventWriter is the sidecar's stdout: it decodes the --json lines as they come and hands each
// event to on, synchronously, so that a fault can be injected at a phase.
type eventWriter struct {
	mu        sync.Mutex
	buf       []byte
	p         *sidecarProc
	on        func(*sidecarProc, savevm.Event)
	phases    []savevm.Phase
	summary   *savevm.Summary
	listening bool     // a receiver's listening event came
	recent    []string // the last few event lines, for a timeout's message
}

func (w *eventWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.recent = append(w.recent, string(w.buf[:i]))
		if len(w.recent) > 400 {
			w.recent = w.recent[1:]
		}
		var e savevm.Event
		if json.Unmarshal(w.buf[:i], &e) == nil {
			if e.Type == "phase" {
				w.phases = append(w.phases, e.Phase)
			}
			if e.Type == "summary" {
				w.summary = e.Summary
			}
			if e.Type == "listening" {
				w.listening = true
			}
			if w.on != nil {
				w.on(w.p, e)
			}
		}
		w.buf = w.buf[i+1:]
	}
	return len(p), nil
}

// sidecarProc is the sidecar binary running in the background.
type sidecarProc struct {
	cmd    *exec.Cmd
	start  time.Time
	out    *eventWriter
	stderr lockedBuffer
	done   chan struct{}
	err    error
	wall   time.Duration
	fault  time.Time // when the hook injected the fault
}

// startSidecar starts the binary with args; on (may be nil) sees every --json event.
func startSidecar(t *testing.T, on func(*sidecarProc, savevm.Event), args ...string) *sidecarProc {
	t.Helper()
	return startSidecarIn(t, "", on, args...)
}

// startSidecarIn is startSidecar inside network namespace ns ("" = this one), through
// `ip netns exec`, which execs the binary: the PID is the sidecar's own.
func startSidecarIn(t *testing.T, ns string, on func(*sidecarProc, savevm.Event), args ...string) *sidecarProc {
	t.Helper()
	p := &sidecarProc{out: &eventWriter{on: on}, done: make(chan struct{})}
	p.out.p = p
	p.cmd = exec.Command(sidecarBinary(t), args...)
	if ns != "" {
		p.cmd = exec.Command("ip", append([]string{"netns", "exec", ns, sidecarBinary(t)}, args...)...)
	}
	p.cmd.Stdout = p.out
	p.cmd.Stderr = &p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.start = time.Now()
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		p.wall = time.Since(p.start)
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.cmd.Process.Kill() // by its own PID
			<-p.done
		}
	})
	return p
}

// wait waits (bounded) for the sidecar to exit and returns its exit code, the time it took to
// exit (from the fault when a hook injected one, else from its start) and its stderr.
func (p *sidecarProc) wait(t *testing.T, limit time.Duration) (int, time.Duration, string) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(limit - time.Since(p.start)):
		p.cmd.Process.Kill()
		<-p.done
		p.out.mu.Lock()
		recent := strings.Join(p.out.recent, "\n")
		p.out.mu.Unlock()
		t.Fatalf("sidecar did not exit within %v; stderr: %s\nlast events:\n%s", limit, p.stderr.String(), recent)
	}
	code := 0
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		code = ee.ExitCode()
	} else if p.err != nil {
		t.Fatal(p.err)
	}
	p.out.mu.Lock()
	fault := p.fault
	p.out.mu.Unlock()
	if !fault.IsZero() {
		return code, p.wall - fault.Sub(p.start), p.stderr.String()
	}
	return code, p.wall, p.stderr.String()
}

// phases returns the phase events seen so far.
func (p *sidecarProc) phases() []savevm.Phase {
	p.out.mu.Lock()
	defer p.out.mu.Unlock()
	return append([]savevm.Phase(nil), p.out.phases...)
}

// atPhase returns an event hook that injects a fault (f) once, when the sidecar enters phase
// ph, and notes the time for the time-to-exit column.
func atPhase(ph savevm.Phase, f func(p *sidecarProc)) func(*sidecarProc, savevm.Event) {
	var once sync.Once
	return func(p *sidecarProc, e savevm.Event) {
		if e.Type == "phase" && e.Phase == ph {
			once.Do(func() {
				p.fault = time.Now() // under p.out.mu: the hook runs inside eventWriter.Write
				f(p)
			})
		}
	}
}

// oneLine checks that the sidecar wrote exactly one line on stderr, containing every want.
func oneLine(t *testing.T, stderr string, want ...string) string {
	t.Helper()
	msg := strings.TrimSpace(stderr)
	if msg == "" || strings.Contains(msg, "\n") {
		t.Errorf("stderr is not one line: %q", stderr)
	}
	for _, w := range want {
		if !strings.Contains(msg, w) {
			t.Errorf("message does not say %q: %s", w, msg)
		}
	}
	return msg
}

// faultVM starts a 128 MiB dirty guest and waits until it runs.
func faultVM(t *testing.T, ctx context.Context, cfg VMConfig) *VM {
	t.Helper()
	if cfg.MemMiB == 0 {
		cfg.MemMiB = 128
	}
	if cfg.Disk == nil {
		cfg.Disk = GuestDirty()
	}
	vm := StartVM(t, cfg)
	if cfg.Incoming == "" {
		if err := vm.WaitMoreSerial(ctx, 'B', 2); err != nil {
			t.Fatal(err)
		}
	}
	return vm
}

// faultPair starts a source and a destination (listening on a fresh port) of the same kind.
func faultPair(t *testing.T, ctx context.Context, q QEMU) (src, dst *VM, uri string) {
	t.Helper()
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	uri = fmt.Sprintf("tcp:127.0.0.1:%d", port)
	dst = faultVM(t, ctx, VMConfig{Name: "dst", QEMU: q, Incoming: uri})
	src = faultVM(t, ctx, VMConfig{Name: "src", QEMU: q})
	return src, dst, uri
}

// migrationParams returns the parameters the sidecar changes and must restore.
func migrationParams(t *testing.T, ctx context.Context, vm *VM) string {
	t.Helper()
	return paramsOf(t, ctx, vm.QMP)
}

// paramsOf is migrationParams for any monitor (a libvirt domain's).
func paramsOf(t *testing.T, ctx context.Context, c *qmp.Client) string {
	t.Helper()
	p, err := c.QueryParameters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	num := func(v any) string {
		if f, ok := v.(float64); ok {
			return strconv.FormatFloat(f, 'f', -1, 64)
		}
		return fmt.Sprint(v)
	}
	return fmt.Sprintf("downtime-limit=%s max-bandwidth=%s", num(p["downtime-limit"]), num(p["max-bandwidth"]))
}

// sourceRestored checks the source after a failure before the destination had the complete
// stream: running, the guest still making progress, no migration left, parameters as before.
func sourceRestored(t *testing.T, ctx context.Context, src *VM, params string) string {
	t.Helper()
	st, err := src.WaitStatus(ctx, "running")
	if err != nil {
		t.Errorf("source not running: %v", err)
		return st
	}
	if err := src.WaitMoreSerial(ctx, 'B', 2); err != nil {
		t.Errorf("source guest does not make progress: %v", err)
		return st + " (guest stuck)"
	}
	if m, err := src.QMP.QueryMigrate(ctx); err != nil {
		t.Error(err)
	} else if !m.Finished() && m.Status != "" {
		t.Errorf("source migration still %q", m.Status)
	}
	if now := migrationParams(t, ctx, src); now != params {
		t.Errorf("source migration parameters not restored: %s, had %s", now, params)
		return st + " (params not restored)"
	}
	return st + ", guest runs, params restored"
}

// sourcePostmigrate checks the source after a failure once the destination had the complete
// stream: paused in postmigrate, never resumed by the sidecar, and the message says how to
// recover.
func sourcePostmigrate(t *testing.T, ctx context.Context, src *VM, msg string) string {
	t.Helper()
	st, err := src.WaitStatus(ctx, "postmigrate")
	if err != nil {
		t.Errorf("source not in postmigrate: %v", err)
		return st
	}
	time.Sleep(300 * time.Millisecond)
	if s, err := src.QMP.QueryStatus(ctx); err != nil || s.Status != "postmigrate" {
		t.Errorf("source left postmigrate: %q %v", s.Status, err)
	}
	if !strings.Contains(msg, "postmigrate") || !strings.Contains(msg, "cont") {
		t.Errorf("message does not say the source stays in postmigrate and how to resume it: %s", msg)
	}
	return "postmigrate (not resumed)"
}

// TestFault runs the fault matrix and logs it as a table.
func TestFault(t *testing.T) {
	q72 := requireQEMU(t, "7.2")
	q10 := requireQEMU(t, "10.0")
	sidecarBinary(t)
	faultMu.Lock()
	faultRows = nil
	faultMu.Unlock()
	t.Cleanup(func() {
		faultMu.Lock()
		defer faultMu.Unlock()
		var b strings.Builder
		b.WriteString("fault matrix (time to exit: from the fault where a hook injects one, else from the start):\n" +
			"| case | exit code | time to exit | source state | message |\n|---|---|---|---|---|\n")
		for _, r := range faultRows {
			fmt.Fprintf(&b, "| %s | %d | %v | %s | %s |\n", r.name, r.code, r.wall.Round(time.Millisecond), r.source,
				strings.ReplaceAll(r.message, "|", "\\|"))
		}
		t.Log(b.String())
	})

	// Nothing listens on the destination's port: the sidecar fails before touching the source.
	for _, q := range []QEMU{q72, q10} {
		t.Run("dst-not-listening/"+q.Version, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			src := faultVM(t, ctx, VMConfig{Name: "src", QEMU: q})
			params := migrationParams(t, ctx, src)
			port, _ := FreePort()
			p := startSidecar(t, nil, "--qmp", src.SidecarQMP, "--to", fmt.Sprintf("tcp:127.0.0.1:%d", port), "--json")
			code, wall, stderr := p.wait(t, 30*time.Second)
			msg := oneLine(t, stderr, "destination", "connection refused")
			if code != 4 {
				t.Errorf("exit %d, want 4", code)
			}
			if m, err := src.QMP.QueryMigrate(ctx); err != nil || m.Status != "" {
				t.Errorf("source was touched: migration %q %v", m.Status, err)
			}
			recordFault(t, code, wall, sourceRestored(t, ctx, src, params), msg)
		})
	}

	// The destination QEMU dies (SIGKILL by its PID) when the sidecar enters a phase. The
	// failure surfaces at the sidecar's next write to it, so the message names the phase the
	// sidecar was in then: a kill in setup (a few KiB: header, configuration, ram START) is
	// noticed in iterate.
	killed := []struct {
		q       QEMU
		ph      savevm.Phase
		noticed []string // phases the message may name
	}{
		{q72, savevm.PhaseSetup, []string{"setup", "iterate"}},
		{q72, savevm.PhaseIterate, []string{"iterate"}},
		{q72, savevm.PhaseComplete, []string{"complete", "devices", "done"}},
		{q10, savevm.PhaseIterate, []string{"iterate"}},
		{q10, savevm.PhaseComplete, []string{"complete", "devices", "done"}},
	}
	for _, c := range killed {
		t.Run(fmt.Sprintf("dst-killed/%s/%s", c.ph, c.q.Version), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			src, dst, uri := faultPair(t, ctx, c.q)
			params := migrationParams(t, ctx, src)
			args := []string{"--qmp", src.SidecarQMP, "--to", uri, "--json"}
			if c.ph == savevm.PhaseComplete {
				// Switch over at the second pass, with the whole dirty set (~99 MiB) still to
				// send: the complete phase then lasts long enough to be hit.
				args = append(args, "--max-iterations", "1")
			}
			p := startSidecar(t, atPhase(c.ph, func(*sidecarProc) { syscall.Kill(dst.PID, syscall.SIGKILL) }), args...)
			code, wall, stderr := p.wait(t, 30*time.Second)
			msg := oneLine(t, stderr, "destination")
			if code != 4 {
				t.Errorf("exit %d, want 4", code)
			}
			if ph := namedPhase(msg); !slices.Contains(c.noticed, ph) {
				t.Errorf("message names phase %q, want one of %v", ph, c.noticed)
			}
			var state string
			if strings.Contains(msg, "postmigrate") {
				state = sourcePostmigrate(t, ctx, src, msg)
			} else {
				state = sourceRestored(t, ctx, src, params)
			}
			recordFault(t, code, wall, state, msg)
		})
	}

	// The sidecar itself dies (SIGKILL) in a phase. Nobody is left to put the source back, so
	// the source QEMU must do it by itself: the sidecar holds it with the return-path
	// capability, under which QEMU completes only after the sidecar's SHUT and fails the
	// migration — resuming the guest — when the return path breaks first. The devices phase is
	// the telling one: QEMU has stopped the guest and sent everything, so without the return
	// path it would sit in postmigrate with the destination never complete. The parameters the
	// sidecar changed cannot be set back by a dead sidecar (the row says so).
	for _, c := range []struct {
		q  QEMU
		ph savevm.Phase
	}{{q72, savevm.PhaseIterate}, {q72, savevm.PhaseDevices}, {q10, savevm.PhaseComplete}, {q10, savevm.PhaseDevices}} {
		t.Run(fmt.Sprintf("sidecar-killed/%s/%s", c.ph, c.q.Version), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			src, dst, uri := faultPair(t, ctx, c.q)
			args := []string{"--qmp", src.SidecarQMP, "--to", uri, "--json"}
			if c.ph != savevm.PhaseIterate {
				args = append(args, "--max-iterations", "1")
			}
			if c.ph == savevm.PhaseDevices {
				// The devices phase ends within milliseconds at the point of no return
				// (the sidecar's SHUT); the test-only delay before it keeps the kill
				// inside the phase the row names instead of racing it.
				t.Setenv("QMG_TEST_COMMIT_DELAY", "1s")
			}
			p := startSidecar(t, atPhase(c.ph, func(p *sidecarProc) { p.cmd.Process.Kill() }), args...)
			code, wall, _ := p.wait(t, 30*time.Second)
			if code != -1 {
				t.Errorf("exit code %d, want -1 (killed)", code)
			}
			st, err := src.WaitStatus(ctx, "running")
			if err != nil {
				t.Fatalf("the source did not resume by itself: %v", err)
			}
			if err := src.WaitMoreSerial(ctx, 'B', 2); err != nil {
				t.Fatalf("source guest does not make progress: %v", err)
			}
			m, err := src.QMP.QueryMigrate(ctx)
			if err != nil || m.Status != "failed" {
				t.Errorf("source migration %q (%v), want failed", m.Status, err)
			}
			select {
			case <-dst.Exited():
			case <-time.After(5 * time.Second):
				if s, err := dst.QMP.QueryStatus(ctx); err == nil && s.Status != "inmigrate" {
					t.Errorf("destination is %q: it must never have had a complete stream", s.Status)
				}
			}
			recordFault(t, code, wall, st+", guest runs (resumed by QEMU itself; parameters as the sidecar set them)",
				"(killed: no message) source migration "+m.Status+": "+m.ErrorDesc)
		})
	}

	// The destination rejects the stream. QEMU exits on a load failure (its error goes to its
	// own stderr), so with --dst-qmp the sidecar can only tell that it exited; a 10.0
	// destination started with `-incoming defer` + migrate-incoming exit-on-error=false stays
	// up and its own error text reaches the sidecar's message through query-migrate.
	rejects := []struct {
		name        string
		q           QEMU
		srcMachine  string
		srcExtra    []string
		exitOnError bool
		noDstQMP    bool   // run without --dst-qmp: nothing can be checked before sending
		want        string // in the message
	}{
		// With --dst-qmp the pre-flight checks compare the two QEMUs before anything is sent: the
		// source is untouched and the destination still waits.
		{"machine/7.2", q72, "pc-q35-7.1", nil, true, false, "machine: source runs pc-q35-7.1, destination pc-q35-7.2"},
		{"machine/10.0", q10, "pc-q35-7.2", nil, true, false, "machine: source runs pc-q35-7.2, destination pc-q35-10.0"},
		{"device/7.2-preflight", q72, "", []string{"-device", "i6300esb"}, true, false, "devices: missing on destination: i6300esb"},
		// Without it the destination rejects the configuration section and drops the connection.
		{"machine/10.0-no-dst-qmp", q10, "pc-q35-7.2", nil, true, true, "destination"},
		// --no-preflight: the destination rejects the stream itself.
		{"device/7.2", q72, "", []string{"-device", "i6300esb"}, true, false, "destination QEMU has exited"},
		{"device/10.0-exit-on-error-false", q10, "", []string{"-device", "i6300esb"}, false, false, "the destination QEMU failed to load it: load of migration failed"},
	}
	for _, c := range rejects {
		t.Run("dst-rejects/"+c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			port, _ := FreePort()
			uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
			incoming := uri
			if !c.exitOnError {
				incoming = "defer"
			}
			dst := faultVM(t, ctx, VMConfig{Name: "dst", QEMU: c.q, Incoming: incoming})
			if !c.exitOnError {
				if err := dst.QMP.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri, "exit-on-error": false}, nil); err != nil {
					t.Fatal(err)
				}
			}
			src := faultVM(t, ctx, VMConfig{Name: "src", QEMU: c.q, Machine: c.srcMachine, Extra: c.srcExtra})
			params := migrationParams(t, ctx, src)
			args := []string{"--qmp", src.SidecarQMP, "--to", uri, "--json"}
			if !c.noDstQMP {
				args = append(args, "--dst-qmp", dst.SidecarQMP)
			}
			precheck := (strings.HasPrefix(c.name, "machine/") || strings.HasSuffix(c.name, "-preflight")) && !c.noDstQMP
			if strings.HasPrefix(c.name, "device/") && !precheck {
				args = append(args, "--no-preflight")
			}
			p := startSidecar(t, nil, args...)
			code, wall, stderr := p.wait(t, 45*time.Second)
			var msg string
			if precheck {
				msg = oneLine(t, stderr, "destination", c.want, "untouched")
			} else {
				msg = oneLine(t, stderr, "destination", "phase", c.want)
			}
			if code != 4 {
				t.Errorf("exit %d, want 4", code)
			}
			var state string
			if strings.Contains(msg, "postmigrate") {
				state = sourcePostmigrate(t, ctx, src, msg)
			} else {
				state = sourceRestored(t, ctx, src, params)
			}
			if precheck {
				if st, err := dst.QMP.QueryStatus(ctx); err != nil || st.Status != "inmigrate" {
					t.Errorf("destination %q %v after the pre-check, want still inmigrate", st.Status, err)
				}
			} else if c.exitOnError {
				select {
				case <-dst.Exited():
				case <-time.After(10 * time.Second):
					t.Errorf("destination QEMU did not exit")
				}
			} else if m, err := dst.QMP.QueryMigrate(ctx); err != nil || m.Status != "failed" {
				t.Errorf("destination migration %q %v, want failed", m.Status, err)
			} else {
				t.Logf("destination's query-migrate error-desc: %q", m.ErrorDesc)
			}
			t.Logf("destination's own error (its stderr): %q", strings.TrimSpace(dst.Stderr()))
			recordFault(t, code, wall, state, msg)
		})
	}

	// The source QEMU dies (SIGKILL) in the middle of the iterate phase.
	for _, q := range []QEMU{q72, q10} {
		t.Run("src-killed/iterate/"+q.Version, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			src, dst, uri := faultPair(t, ctx, q)
			p := startSidecar(t, atPhase(savevm.PhaseIterate, func(*sidecarProc) { syscall.Kill(src.PID, syscall.SIGKILL) }),
				"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json")
			code, wall, stderr := p.wait(t, 30*time.Second)
			msg := oneLine(t, stderr, "source", "iterate phase")
			if code != 3 {
				t.Errorf("exit %d, want 3", code)
			}
			if wall > 10*time.Second {
				t.Errorf("took %v to notice the source died", wall)
			}
			select {
			case <-dst.Exited():
			case <-time.After(10 * time.Second):
				if st, err := dst.QMP.QueryStatus(ctx); err != nil || st.Status != "inmigrate" {
					t.Errorf("destination %q %v, want it failed or still inmigrate", st.Status, err)
				}
			}
			recordFault(t, code, wall, "dead (killed)", msg)
		})
	}

	// The source QEMU hangs (SIGSTOP) in the iterate phase: its QMP stops answering, and the
	// sidecar must give up by its QMP deadline; after SIGCONT the source must be running.
	t.Run("src-hung/iterate", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		src, dst, uri := faultPair(t, ctx, q72)
		params := migrationParams(t, ctx, src)
		p := startSidecar(t, atPhase(savevm.PhaseIterate, func(*sidecarProc) { syscall.Kill(src.PID, syscall.SIGSTOP) }),
			"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json")
		code, wall, stderr := p.wait(t, 45*time.Second)
		syscall.Kill(src.PID, syscall.SIGCONT)
		// The sidecar cannot restore a source that does not answer: the message must say what
		// is left to do, with the parameters' old values.
		msg := oneLine(t, stderr, "source", "iterate phase", "does not answer", "migrate-set-parameters", `"downtime-limit":300`)
		if code != 3 {
			t.Errorf("exit %d, want 3", code)
		}
		if wall > 15*time.Second {
			t.Errorf("took %v to give up on a hung source", wall)
		}
		state := "after SIGCONT: "
		if st, err := src.WaitStatus(ctx, "running"); err != nil {
			t.Errorf("source after SIGCONT: %v", err)
			state += st
		} else if err := src.WaitMoreSerial(ctx, 'B', 2); err != nil {
			t.Errorf("source guest stuck after SIGCONT: %v", err)
			state += "running, guest stuck"
		} else {
			m, _ := src.QMP.QueryMigrate(ctx)
			state += fmt.Sprintf("running, guest runs, its migration %s, params %s (were %s)", m.Status, migrationParams(t, ctx, src), params)
		}
		recordFault(t, code, wall, state, msg)
	})

	// The destination stops reading (SIGSTOP): --stall-timeout fires.
	t.Run("dst-stopped/iterate", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		src, dst, uri := faultPair(t, ctx, q72)
		params := migrationParams(t, ctx, src)
		p := startSidecar(t, atPhase(savevm.PhaseIterate, func(*sidecarProc) { syscall.Kill(dst.PID, syscall.SIGSTOP) }),
			"--qmp", src.SidecarQMP, "--to", uri, "--stall-timeout", "3s", "--json")
		code, wall, stderr := p.wait(t, 30*time.Second)
		msg := oneLine(t, stderr, "--stall-timeout", "iterate phase")
		if code != 5 {
			t.Errorf("exit %d, want 5", code)
		}
		if wall > 10*time.Second {
			t.Errorf("took %v with --stall-timeout 3s", wall)
		}
		recordFault(t, code, wall, sourceRestored(t, ctx, src, params), msg)
	})

	// SIGINT and SIGTERM to the sidecar (by its PID) in each phase. The complete phase of the
	// dirty guest (--max-iterations 1: ~99 MiB dirty at the switchover) lasts ~100 ms, shorter
	// than it takes to be sure a signal lands in it on a loaded machine; so the destination is
	// also held (SIGSTOP) at the complete event, which keeps the sidecar in that phase, and
	// resumed after the sidecar has exited.
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		for _, c := range []struct {
			q  QEMU
			ph savevm.Phase
		}{{q72, savevm.PhaseSetup}, {q72, savevm.PhaseIterate}, {q72, savevm.PhaseComplete}, {q10, savevm.PhaseIterate}} {
			ph := c.ph
			t.Run(fmt.Sprintf("%s/%s/%s", strings.ToLower(unix(sig)), ph, c.q.Version), func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				src, dst, uri := faultPair(t, ctx, c.q)
				params := migrationParams(t, ctx, src)
				args := []string{"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json"}
				if ph == savevm.PhaseComplete {
					args = append(args, "--max-iterations", "1")
				}
				p := startSidecar(t, atPhase(ph, func(p *sidecarProc) {
					if ph == savevm.PhaseComplete {
						syscall.Kill(dst.PID, syscall.SIGSTOP)
					}
					p.cmd.Process.Signal(sig)
				}), args...)
				code, wall, stderr := p.wait(t, 30*time.Second)
				syscall.Kill(dst.PID, syscall.SIGCONT)
				wantPhase := string(ph) + " phase"
				if ph == savevm.PhaseSetup {
					// Setup is a few KiB: the signal sent at its event may land in iterate.
					wantPhase = "phase"
				}
				msg := oneLine(t, stderr, "interrupted", map[syscall.Signal]string{syscall.SIGINT: "interrupt", syscall.SIGTERM: "terminated"}[sig], wantPhase)
				if code != 6 {
					t.Errorf("exit %d, want 6", code)
				}
				recordFault(t, code, wall, sourceRestored(t, ctx, src, params), msg)
			})
		}
	}

	// A signal once the destination has the complete stream is too late to cancel: the
	// migration stands (exit 0), the source stays in postmigrate, the guest runs on the
	// destination.
	t.Run("sigint/done/7.2", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		src, dst, uri := faultPair(t, ctx, q72)
		p := startSidecar(t, atPhase(savevm.PhaseDone, func(p *sidecarProc) { p.cmd.Process.Signal(syscall.SIGINT) }),
			"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json")
		code, wall, stderr := p.wait(t, 30*time.Second)
		if code != 0 {
			t.Errorf("exit %d after the destination had the stream: %s", code, stderr)
		}
		if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
			t.Error(err)
		}
		if err := dst.WaitMoreSerial(ctx, 'B', 2); err != nil {
			t.Error(err)
		}
		recordFault(t, code, wall, "postmigrate; the guest runs on the destination", "(none: migrated)"+strings.TrimSpace(stderr))
	})

	// `--to file:` on a full filesystem (an 8 MiB tmpfs).
	t.Run("file-enospc", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		dir := t.TempDir()
		if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=8m"); err != nil {
			if errors.Is(err, syscall.EPERM) {
				t.Skipf("cannot mount a tmpfs (%v): the case needs root", err)
			}
			t.Fatal(err)
		}
		t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
		src := faultVM(t, ctx, VMConfig{Name: "src", QEMU: q72})
		params := migrationParams(t, ctx, src)
		p := startSidecar(t, nil, "--qmp", src.SidecarQMP, "--to", "file:"+filepath.Join(dir, "vm.stream"), "--json")
		code, wall, stderr := p.wait(t, 30*time.Second)
		msg := oneLine(t, stderr, "destination", "no space left on device", "phase")
		if code != 4 {
			t.Errorf("exit %d, want 4", code)
		}
		recordFault(t, code, wall, sourceRestored(t, ctx, src, params), msg)
	})

	// `restore` of a truncated stream file: the decoder names the offset and the destination
	// never completes.
	t.Run("restore-truncated", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		src := faultVM(t, ctx, VMConfig{Name: "src", QEMU: q72})
		file := filepath.Join(t.TempDir(), "vm.stream")
		if _, stderr, code, _ := runSidecar(t, time.Minute, "--qmp", src.SidecarQMP, "--to", "file:"+file, "-q"); code != 0 {
			t.Fatalf("save to file: exit %d: %s", code, stderr)
		}
		fi, err := os.Stat(file)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(file, fi.Size()/2); err != nil {
			t.Fatal(err)
		}
		port, _ := FreePort()
		uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
		dst := faultVM(t, ctx, VMConfig{Name: "dst", QEMU: q72, Incoming: uri, Paused: true})
		p := startSidecar(t, nil, "restore", "--from", file, "--to", uri, "--dst-version", "7.2", "--json")
		code, wall, stderr := p.wait(t, 30*time.Second)
		msg := oneLine(t, stderr, "offset")
		if code != 7 {
			t.Errorf("exit %d for a truncated stream, want 7 (invalid stream)", code)
		}
		dstState := "exited"
		select {
		case <-dst.Exited():
			dstState = "destination QEMU exited: " + lastLine(dst.Stderr())
		case <-time.After(5 * time.Second):
			st, err := dst.QMP.QueryStatus(ctx)
			if err != nil || st.Status != "inmigrate" {
				t.Errorf("destination %q %v, want it failed or still inmigrate", st.Status, err)
			}
			dstState = "destination still " + st.Status
		}
		recordFault(t, code, wall, fmt.Sprintf("(file of %d bytes cut to %d) %s", fi.Size(), fi.Size()/2, dstState), msg)
	})

	// Two sidecars against the same VM at once: the second refuses at once, the first completes.
	// The first is capped at 50 MB/s, so that it still runs when the second starts on a busy
	// machine (uncapped it can be done in 130 ms), and switches over after its first pass (about
	// 2 s; the dirty guest never converges at that rate).
	t.Run("two-sidecars", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		src, dst, uri := faultPair(t, ctx, q72)
		started := make(chan struct{})
		first := startSidecar(t, atPhase(savevm.PhaseSetup, func(*sidecarProc) { close(started) }),
			"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json", "--bandwidth", "50000000", "--max-iterations", "1")
		select {
		case <-started:
		case <-first.done:
			t.Fatalf("first sidecar ended early: %s", first.stderr.String())
		}
		port2, _ := FreePort()
		_, stderr, code, wall := runSidecar(t, 10*time.Second, "--qmp", src.SidecarQMP, "--to", fmt.Sprintf("tcp:127.0.0.1:%d", port2), "--json")
		msg := oneLine(t, stderr, "already")
		if code != 2 {
			t.Errorf("second sidecar: exit %d, want 2", code)
		}
		if wall > 2*time.Second {
			t.Errorf("second sidecar took %v to refuse", wall)
		}
		code1, wall1, stderr1 := first.wait(t, 45*time.Second)
		if code1 != 0 {
			t.Errorf("first sidecar: exit %d: %s", code1, stderr1)
		}
		if !slices.Contains(first.phases(), savevm.PhaseDone) {
			t.Errorf("first sidecar never reached done: %v", first.phases())
		}
		if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
			t.Error(err)
		}
		if err := dst.WaitMoreSerial(ctx, 'B', 2); err != nil {
			t.Error(err)
		}
		recordFault(t, code, wall, fmt.Sprintf("first sidecar: exit %d after %v, source postmigrate, guest runs on the destination", code1, wall1.Round(time.Millisecond)), msg)
	})
}

func unix(sig syscall.Signal) string {
	switch sig {
	case syscall.SIGINT:
		return "SIGINT"
	case syscall.SIGTERM:
		return "SIGTERM"
	}
	return sig.String()
}

// namedPhase returns the phase the sidecar's message names ("in the X phase"), or "".
func namedPhase(msg string) string {
	_, rest, ok := strings.Cut(msg, "(in the ")
	if !ok {
		return ""
	}
	ph, _, _ := strings.Cut(rest, " phase)")
	return ph
}
