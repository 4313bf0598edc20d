package compat

// TestBenchLink: the link benchmark of issue 10. Every mode migrates the same guest across a
// NetPair (1 Gbit/s shaped, and unshaped), measured by one Meter: QEMU by itself (direct, its own
// TLS, 10.0 multifd(4)+zstd), the sidecar pair with mutual TLS (`receive` on the destination
// host, `--to qmg://` on the source host) and the single relay sidecar (`--to tcp:`).

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The sidecar modes of the link benchmark (the baselines are BaselineModes).
const (
	linkModePair  = "pair"  // receive + --to qmg://, mutual TLS
	linkModeRelay = "relay" // the single relay sidecar, --to tcp: straight to the destination QEMU
)

// linkBenchModes is the order the modes run in, interleaved run by run.
var linkBenchModes = []string{string(ModeDirect), string(ModeQEMUTLS), string(ModeMultifdZstd), linkModePair, linkModeRelay}

// linkPairArgs are the sender's options in pair mode (QMG_BENCH_PAIR_ARGS replaces them): as many
// connections as multifd has channels, compression chosen by the sidecar.
var linkPairArgs = []string{"--connections", "4", "--compress", "auto"}

// benchLinkGuest is a guest of the link benchmark.
type benchLinkGuest struct {
	name   string
	memMiB int
	// config puts the guest (boot disk, or kernel and initramfs) into a VM configuration.
	config func(t testing.TB, cfg VMConfig) VMConfig
	// ready waits until the source guest's RAM holds what it is meant to and it runs steadily.
	ready func(ctx context.Context, vm *VM) error
	// verify checks the destination's guest after the migration (nil: not verified).
	verify func(ctx context.Context, t testing.TB, dst *VM) error
}

// fillLinkGuest is the 1 GiB (memMiB) fill guest: a quarter zero pages, three eighths text, three
// eighths random, every 64th page dirtied continuously once filled. Every 64th, not every 16th
// as in the relay benchmark: the guest rewrites its whole working set hundreds of times a
// second, so at each dirty sync all of it is dirty again, and 1/16 of 1 GiB (64 MiB) takes
// 0.55 s at 1 Gbit/s — more than the 300 ms downtime, so no mode would ever converge. 16 MiB
// takes 0.14 s.
func fillLinkGuest(memMiB int) benchLinkGuest {
	opt := FillOptions{MemBytes: uint64(memMiB) << 20, DirtyEvery: 64, Seed: 7}
	img, err := GuestFill(opt)
	return benchLinkGuest{name: "fill", memMiB: memMiB,
		config: func(t testing.TB, cfg VMConfig) VMConfig {
			if err != nil {
				t.Fatal(err)
			}
			cfg.Disk = img
			return cfg
		},
		ready: func(ctx context.Context, vm *VM) error {
			if err := vm.WaitSerial(ctx, "F", func(s string) bool { return strings.Contains(s, "F") }); err != nil {
				return err
			}
			return vm.WaitMoreSerial(ctx, 'B', 3)
		},
		// The destination may run while it is dumped: CheckFill ignores the one word of each
		// page the guest keeps incrementing and checks every other byte of the fill.
		verify: func(ctx context.Context, t testing.TB, dst *VM) error {
			return withRAMDump(ctx, t, dst, func(f *os.File, size int64) error {
				_, err := CheckFill(f, size, opt)
				return err
			})
		}}
}

// withRAMDump dumps vm's RAM into a temporary file and hands it to check.
func withRAMDump(ctx context.Context, t testing.TB, vm *VM, check func(f *os.File, size int64) error) error {
	path := filepath.Join(t.TempDir(), "ram")
	size, err := vm.DumpRAM(ctx, path)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return check(f, size)
}

// linkBenchLinuxGuest is the guest whose RAM holds real files: the Linux test guest with
// LinuxDefaultFilesMiB (400 MiB) of installed packages' files in its initramfs, unpacked into
// its page cache, idle once ready. After the migration its destination must hold every distinct
// file page (FilePages). QMG_BENCH_LINUX=0 leaves it out.
var linkBenchLinuxGuest = func(t testing.TB, memMiB int) (benchLinkGuest, bool) {
	if os.Getenv("QMG_BENCH_LINUX") == "0" {
		return benchLinkGuest{}, false
	}
	img := LinuxGuest(t, LinuxOptions{MemMiB: max(memMiB, 1024), FilesMiB: LinuxDefaultFilesMiB})
	return benchLinkGuest{name: "linux-files", memMiB: img.Options.MemMiB,
		config: func(t testing.TB, cfg VMConfig) VMConfig { return img.VMConfig(t, cfg) },
		ready: func(ctx context.Context, vm *VM) error {
			_, err := LinuxWaitReady(ctx, vm)
			return err
		},
		verify: func(ctx context.Context, t testing.TB, dst *VM) error {
			fp, err := img.FilePages()
			if err != nil {
				return err
			}
			return withRAMDump(ctx, t, dst, func(f *os.File, size int64) error {
				found, err := fp.Find(f, size)
				if err == nil && found != fp.Len() {
					err = fmt.Errorf("the destination's RAM holds %d of the files' %d distinct pages", found, fp.Len())
				}
				return err
			})
		}}, true
}

// ============================================================

// benchLinkRun is one measured migration of the link benchmark.
type benchLinkRun struct {
	LinkResult
	srcCPU, dstCPU time.Duration // user+system CPU of the source host's / destination host's sidecar
	srcRSS, dstRSS int64         // their peak RSS, KiB
}

// TestBenchLink prints the link benchmark table (QMG_BENCH=1, make bench): for each link (1 Gbit/s
// shaped, unshaped), guest (1 GiB fill; the Linux guest once its hook is wired) and source state
// (paused: the pure data path; running), every mode, interleaved, QMG_BENCH_RUNS times (default
// 5), medians. QMG_BENCH_MODES (comma-separated, e.g. direct,qemu-tls,multifd-zstd) and
// QMG_BENCH_LINKS (1gbit,unshaped) choose a part; QMG_BENCH_MEM sets the guest size in MiB. The
// first run of each mode verifies the destination's memory.
func TestBenchLink(t *testing.T) {
	if os.Getenv("QMG_BENCH") == "" {
		t.Skip("set QMG_BENCH=1 (make bench) to run the link benchmark")
	}
	runs, mem := 5, 1024
	runs = benchEnv("QMG_BENCH_RUNS", runs)
	mem = benchEnv("QMG_BENCH_MEM", mem)
	modes := linkBenchModes
	if s := os.Getenv("QMG_BENCH_MODES"); s != "" {
		modes = strings.Split(s, ",")
	}
	links := []string{"1gbit", "unshaped"}
	if s := os.Getenv("QMG_BENCH_LINKS"); s != "" {
		links = strings.Split(s, ",")
	}
	if len(os.Getenv("QMG_BENCH_PAIR_ARGS")) > 0 {
		linkPairArgs = strings.Fields(os.Getenv("QMG_BENCH_PAIR_ARGS"))
	}
	q := requireQEMU(t, "10.0") // multifd+zstd is 10.0's; every mode runs the same QEMU
	var guests []benchLinkGuest
	if os.Getenv("QMG_BENCH_FILL") != "0" { // QMG_BENCH_FILL=0: only the real-files guest
		guests = append(guests, fillLinkGuest(mem))
	}
	if g, ok := linkBenchLinuxGuest(t, mem); ok {
		guests = append(guests, g)
	}
	var tables []string
	for _, link := range links {
		rate := link
		if link == "unshaped" {
			rate = ""
		}
		p := NewNetPair(t, NetOptions{Rate: rate})
		pki := NewTestPKI(t, p.Dst.Addr.String())
		for _, g := range guests {
			for _, paused := range []bool{true, false} {
				state := map[bool]string{true: "paused", false: "running"}[paused]
				res := map[string][]benchLinkRun{}
				for i := 0; i < runs; i++ {
					for _, mode := range modes { // interleaved: every mode sees the same conditions
						t.Run(fmt.Sprintf("%s/%s/%s/%s/%d", link, g.name, state, mode, i), func(t *testing.T) {
							r := linkBenchRun(t, p, pki, q, g, mode, paused, i == 0)
							t.Logf("total %v, downtime %v (QEMU %v) to %s, link %d B → %d B ←, sidecars %v/%dKiB %v/%dKiB",
								r.Total.Round(time.Millisecond), r.Downtime.Round(time.Millisecond), r.QEMUDowntime, r.End,
								r.Link.SrcToDst, r.Link.DstToSrc, r.srcCPU.Round(time.Millisecond), r.srcRSS, r.dstCPU.Round(time.Millisecond), r.dstRSS)
							res[mode] = append(res[mode], r)
						})
					}
				}
				tables = append(tables, linkTable(fmt.Sprintf("%s link, %s %d MiB, source %s", link, g.name, g.memMiB, state), modes, res, runs, link == "unshaped"))
			}
		}
	}
	t.Logf("\nQEMU %s; medians of %d runs. total = migrate command (sidecar start) → destination runs (or, paused, has loaded: its MIGRATION completed);\n"+
		"down = source STOP event → that end (QMP timestamps; paused: from the `stop`, the guest is down all along); qemu = the source QEMU's downtime figure;\n"+
		"MB = bytes on the veth (10^6) each way; cpu/rss = each sidecar's CPU (rusage) and its own peak RSS (its summary's peak_rss_bytes) (source host's, destination host's); × = total against that mode's median total.\n\n%s",
		q.Full, runs, strings.Join(tables, "\n"))
}

// linkTable formats one group's medians.
func linkTable(title string, modes []string, res map[string][]benchLinkRun, runs int, unshaped bool) string {
	med := map[string]benchLinkRun{}
	for _, m := range modes {
		if len(res[m]) > 0 {
			med[m] = medianLink(res[m])
		}
	}
	ratio := func(r benchLinkRun, ref string) string {
		b, ok := med[ref]
		if !ok || b.Total == 0 {
			return "    —"
		}
		return fmt.Sprintf("%5.2f", r.Total.Seconds()/b.Total.Seconds())
	}
	side := func(cpu time.Duration, rss int64) string {
		if cpu == 0 && rss == 0 {
			return "—"
		}
		return fmt.Sprintf("%v/%dMiB", cpu.Round(10*time.Millisecond), rss>>10)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n%-13s %4s %9s %9s %8s %9s %8s %15s %15s %8s %8s %8s\n", title, "mode", "runs", "total", "down", "qemu",
		"MB →", "MB ←", "src cpu/rss", "dst cpu/rss", "×direct", "×multifd", "×relay")
	for _, m := range modes {
		r, ok := med[m]
		if !ok {
			fmt.Fprintf(&b, "%-13s %2d/%d failed\n", m, 0, runs)
			continue
		}
		fmt.Fprintf(&b, "%-13s %2d/%d %9v %9v %8v %9.1f %8.1f %15s %15s %8s %8s %8s\n", m, len(res[m]), runs,
			r.Total.Round(time.Millisecond), r.Downtime.Round(time.Millisecond), r.QEMUDowntime,
			float64(r.Link.SrcToDst)/1e6, float64(r.Link.DstToSrc)/1e6, side(r.srcCPU, r.srcRSS), side(r.dstCPU, r.dstRSS),
			ratio(r, string(ModeDirect)), ratio(r, string(ModeMultifdZstd)), ratio(r, linkModeRelay))
	}
	if p, ok := med[linkModePair]; ok && unshaped {
		if r, ok := med[linkModeRelay]; ok && r.Total > 0 {
			x := p.Total.Seconds() / r.Total.Seconds()
			fmt.Fprintf(&b, "pair / single relay: %.2f× (target ≤ 1.20×: %s)\n", x, map[bool]string{true: "met", false: "missed"}[x <= 1.2])
		}
	}
	return b.String()
}

// medianLink takes the median of every column separately.
func medianLink(rs []benchLinkRun) benchLinkRun {
	d := func(f func(benchLinkRun) time.Duration) time.Duration { v := sorted(rs, f); return v[len(v)/2] }
	n := func(f func(benchLinkRun) int64) int64 { v := sorted(rs, f); return v[len(v)/2] }
	var m benchLinkRun
	m.Total = d(func(r benchLinkRun) time.Duration { return r.Total })
	m.Downtime = d(func(r benchLinkRun) time.Duration { return r.Downtime })
	m.QEMUDowntime = d(func(r benchLinkRun) time.Duration { return r.QEMUDowntime })
	m.Link.SrcToDst = uint64(n(func(r benchLinkRun) int64 { return int64(r.Link.SrcToDst) }))
	m.Link.DstToSrc = uint64(n(func(r benchLinkRun) int64 { return int64(r.Link.DstToSrc) }))
	m.srcCPU = d(func(r benchLinkRun) time.Duration { return r.srcCPU })
	m.dstCPU = d(func(r benchLinkRun) time.Duration { return r.dstCPU })
	m.srcRSS = n(func(r benchLinkRun) int64 { return r.srcRSS })
	m.dstRSS = n(func(r benchLinkRun) int64 { return r.dstRSS })
	return m
}

// linkBenchRun migrates guest g once across p in mode, from fresh VMs; the destination runs (or,
// with a paused source, has loaded everything) when it returns. verify checks its memory.
func linkBenchRun(t *testing.T, p *NetPair, pki *TestPKI, q QEMU, g benchLinkGuest, mode string, paused, verify bool) benchLinkRun {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	// The migration itself gets 3 minutes (a 1 GiB guest needs seconds): one that does not
	// converge fails its run instead of holding up the table.
	migrateCtx := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, 3*time.Minute) }
	srcCfg := g.config(t, VMConfig{Name: "src", QEMU: q, MemMiB: g.memMiB})
	dstCfg := g.config(t, VMConfig{Name: "dst", QEMU: q, MemMiB: g.memMiB})
	dstCfg.Extra = append(dstCfg.Extra, benchDestinationRAM...) // first touches before the clock, as in TestBenchRelay
	var run benchLinkRun
	switch mode {
	case string(ModeDirect), string(ModeQEMUTLS), string(ModeMultifdZstd):
		b := &Baseline{Mode: BaselineMode(mode), Pair: p, ServerCreds: pki.QEMUDir, ClientCreds: pki.QEMUDir}
		var err error
		if srcCfg, dstCfg, err = b.Configure(srcCfg, dstCfg); err != nil {
			t.Fatal(err)
		}
		src, dst := StartVM(t, srcCfg), StartVM(t, dstCfg)
		if err := g.ready(ctx, src); err != nil {
			t.Fatal(err)
		}
		mctx, mcancel := migrateCtx()
		defer mcancel()
		if run.LinkResult, err = b.Migrate(mctx, src, dst, paused); err != nil {
			t.Fatal(err)
		}
		verifyLinkGuest(ctx, t, g, dst, verify)
	case linkModeRelay, linkModePair:
		run = sidecarLinkRun(ctx, migrateCtx, t, p, pki, g, mode, srcCfg, dstCfg, paused, verify)
	default:
		t.Fatalf("unknown mode %q (want one of %v)", mode, linkBenchModes)
	}
	return run
}

func verifyLinkGuest(ctx context.Context, t *testing.T, g benchLinkGuest, dst *VM, verify bool) {
	t.Helper()
	if verify && g.verify != nil {
		if err := g.verify(ctx, t, dst); err != nil {
			t.Fatalf("destination memory: %v", err)
		}
	}
}

// sidecarLinkRun runs the relay or the pair mode with the built binary, each sidecar inside its
// host's namespace.
func sidecarLinkRun(ctx context.Context, migrateCtx func() (context.Context, context.CancelFunc), t *testing.T, p *NetPair,
	pki *TestPKI, g benchLinkGuest, mode string, srcCfg, dstCfg VMConfig, paused, verify bool) benchLinkRun {
	bin := sidecarBinary(t)
	port := p.NextPort()
	srcCfg.Netns, dstCfg.Netns = p.Src.Name, p.Dst.Name
	incoming := filepath.Join(t.TempDir(), "dst-incoming.sock")
	if mode == linkModeRelay {
		dstCfg.Incoming = p.DstTCP(port)
	} else {
		dstCfg.Incoming = "unix:" + incoming
	}
	src, dst := StartVM(t, srcCfg), StartVM(t, dstCfg)
	if err := g.ready(ctx, src); err != nil {
		t.Fatal(err)
	}
	m, err := NewMeter(ctx, p, src, dst)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if paused {
		if err := src.QMP.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	var receiver *netnsProc
	var to string
	var senderArgs []string
	if mode == linkModeRelay {
		to = p.DstTCP(port)
	} else {
		listen := p.DstTCP(port)
		receiver = startNetnsProc(t, p.Dst, bin, "receive", "--listen", listen, "--to", "unix:"+incoming,
			"--dst-qmp", dst.SidecarQMP, "--tls-cert", pki.Server.CertFile, "--tls-key", pki.Server.KeyFile,
			"--tls-ca", pki.CA.CertFile, "--json")
		first, err := receiver.firstLine(ctx, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var ev struct{ Type, Message string }
		if json.Unmarshal([]byte(first), &ev) != nil || ev.Type != "listening" || ev.Message != listen {
			t.Fatalf("receive's first line %q: want {\"type\":\"listening\",…,\"message\":%q}", first, listen)
		}
		to = "qmg://" + strings.TrimPrefix(listen, "tcp:")
		senderArgs = append([]string{"--tls-cert", pki.Client.CertFile, "--tls-key", pki.Client.KeyFile, "--tls-ca", pki.CA.CertFile}, linkPairArgs...)
	}
	m.Start()
	sender := startNetnsProc(t, p.Src, bin, append([]string{"--qmp", src.SidecarQMP, "--to", to, "--json"}, senderArgs...)...)
	// A sidecar that fails ends the wait at once, with its own words.
	mctx, mcancel := migrateCtx()
	defer mcancel()
	waitCtx, stop := context.WithCancelCause(mctx)
	defer stop(nil)
	for _, pr := range []*netnsProc{sender, receiver} {
		if pr != nil {
			go func() {
				<-pr.done
				if code := pr.exitCode(); code != 0 {
					stop(fmt.Errorf("%s exited %d: %s", pr.name, code, pr.lastWords()))
				}
			}()
		}
	}
	res, err := m.Wait(waitCtx)
	if err != nil {
		if cause := context.Cause(waitCtx); cause != nil && cause != mctx.Err() {
			err = fmt.Errorf("%w (%v)", cause, err)
		}
		if receiver != nil { // the other side's words too: each may blame the other
			time.Sleep(time.Second)
			err = fmt.Errorf("%w\n%s: %s\n%s: %s", err, sender.name, sender.lastWords(), receiver.name, receiver.lastWords())
		}
		t.Fatal(err)
	}
	run := benchLinkRun{LinkResult: res}
	for _, pr := range []*netnsProc{sender, receiver} {
		if pr == nil {
			continue
		}
		cpu, err := pr.finish(ctx, time.Minute)
		if err != nil {
			if receiver != nil {
				receiver.finish(ctx, 10*time.Second) // its exit, to be reported
				err = fmt.Errorf("%w\n%s: %s\n%s: %s", err, sender.name, sender.lastWords(), receiver.name, receiver.lastWords())
			}
			t.Fatal(err)
		}
		rss := summaryRSS(t, pr.summaryLine())
		if pr == sender {
			run.srcCPU, run.srcRSS = cpu, rss
		} else {
			run.dstCPU, run.dstRSS = cpu, rss
		}
	}
	verifyLinkGuest(ctx, t, g, dst, verify)
	return run
}

// netnsProc is a sidecar running inside a namespace, its --json stdout read line by line.
type netnsProc struct {
	name  string
	cmd   *exec.Cmd
	lines chan string // the first lines (bounded), for firstLine
	mu    sync.Mutex
	last  string // the last stdout line so far
	// summary is the summary event's line, where the sidecar reports its own peak RSS.
	summary string
	stderr  lockedBuffer
	done    chan struct{}
	err     error
}

func startNetnsProc(t *testing.T, h *NetHost, bin string, args ...string) *netnsProc {
	t.Helper()
	name := "sender (" + h.Name + ")"
	if len(args) > 0 && args[0] == "receive" {
		name = "receiver (" + h.Name + ")"
	}
	pr := &netnsProc{name: name, lines: make(chan string, 16), done: make(chan struct{})}
	pr.cmd = h.Command(context.Background(), bin, args...)
	pr.cmd.Stderr = &pr.stderr
	pr.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := pr.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := pr.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var events io.Writer = io.Discard
	if dir := os.Getenv("QMG_BENCH_EVENTS"); dir != "" {
		// QMG_BENCH_EVENTS=DIR keeps each sidecar's --json events, to see where a run's time went.
		side := strings.Fields(name)[0]
		f, err := os.Create(filepath.Join(dir, strings.NewReplacer("/", "_").Replace(t.Name())+"-"+side+".jsonl"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		events = f
	}
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			fmt.Fprintln(events, sc.Text())
			pr.mu.Lock()
			pr.last = sc.Text()
			if strings.Contains(pr.last, `"type":"summary"`) {
				pr.summary = pr.last
			}
			pr.mu.Unlock()
			select {
			case pr.lines <- sc.Text():
			default:
			}
		}
		io.Copy(io.Discard, out)
		pr.err = pr.cmd.Wait()
		close(pr.done)
	}()
	t.Cleanup(func() {
		select {
		case <-pr.done:
		default:
			pr.cmd.Process.Kill() // by its own PID
			<-pr.done
		}
	})
	return pr
}

// firstLine returns the first stdout line, within limit.
func (pr *netnsProc) firstLine(ctx context.Context, limit time.Duration) (string, error) {
	select {
	case l := <-pr.lines:
		return l, nil
	case <-pr.done:
		return "", fmt.Errorf("%s exited %d before its first line: %s", pr.name, pr.exitCode(), pr.lastWords())
	case <-time.After(limit):
		return "", fmt.Errorf("%s printed nothing within %v: %s", pr.name, limit, pr.lastWords())
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// exitCode is the exit status once done (-1: killed by a signal, or could not run).
func (pr *netnsProc) exitCode() int {
	var ee *exec.ExitError
	if errors.As(pr.err, &ee) {
		return ee.ExitCode()
	}
	if pr.err != nil {
		return -1
	}
	return 0
}

func (pr *netnsProc) lastLine() string {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.last
}

func (pr *netnsProc) lastWords() string {
	state := "running"
	select {
	case <-pr.done:
		state = fmt.Sprintf("exit %d", pr.exitCode())
	default:
	}
	return fmt.Sprintf("%s, stderr %q, last line %q", state, lastLine(pr.stderr.String()), pr.lastLine())
}

// finish waits (bounded) for a successful exit and returns the process's CPU time.
func (pr *netnsProc) finish(ctx context.Context, limit time.Duration) (time.Duration, error) {
	select {
	case <-pr.done:
	case <-time.After(limit):
		return 0, fmt.Errorf("%s did not exit within %v after the migration: %s", pr.name, limit, pr.lastWords())
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	if code := pr.exitCode(); code != 0 {
		return 0, fmt.Errorf("%s exited %d: %s", pr.name, code, pr.lastWords())
	}
	var ev struct {
		Type     string
		ExitCode *int `json:"exit_code"`
	}
	if last := pr.lastLine(); json.Unmarshal([]byte(last), &ev) != nil || ev.Type != "exit" || ev.ExitCode == nil || *ev.ExitCode != 0 {
		return 0, fmt.Errorf("%s: last line %q, want {\"type\":\"exit\",\"exit_code\":0,…}", pr.name, last)
	}
	return cpuTime(pr.cmd.ProcessState), nil
}

// summaryLine is the summary event's line, where the sidecar reports its own peak RSS.
func (pr *netnsProc) summaryLine() string {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return pr.summary
}
