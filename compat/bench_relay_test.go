package compat

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// benchRun is one measured migration of the relay benchmark.
type benchRun struct {
	total    time.Duration // from the start of the migration until the destination runs
	downtime time.Duration // the source QEMU's downtime figure
	cpu      time.Duration // sidecar user+system CPU (sidecar mode only)
	rssKiB   int64         // sidecar peak RSS (sidecar mode only)
	// syncs is the source's dirty-sync-count and downBytes what it sent with the guest stopped:
	// together they show whether QEMU switched over in the middle of its first pass (few syncs,
	// many bytes after the stop) or after full passes (the running fill guest does either).
	syncs     int64
	downBytes int64
}

// benchMigrate migrates guest g once in one of three ways: "direct" (QEMU to QEMU over TCP),
// "proxy" (source → unix socket → io.Copy → TCP, the KubeVirt-proxy pattern) or "sidecar" (the
// binary). The destination runs when it returns (or is paused, if paused stopped the source
// first: one pass and no dirtying, the pure data path).
func benchMigrate(t *testing.T, mode string, q QEMU, g guestCase, paused bool) benchRun {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	disk := g.disk(g.memMiB)
	port, _ := FreePort()
	uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
	src := StartVM(t, VMConfig{Name: "src", QEMU: q, MemMiB: g.memMiB, Disk: disk})
	multifd := strings.HasPrefix(mode, "multifd-")
	incoming := uri
	if multifd {
		incoming = "defer" // 10.0 takes multifd only before the incoming migration starts
	}
	dst := StartVM(t, VMConfig{Name: "dst", QEMU: q, MemMiB: g.memMiB, Disk: disk, Incoming: incoming, Extra: benchDestinationRAM})
	if multifd {
		// Both modes get the same multifd destination: 4 channels, set before it listens.
		if err := multifdTuning.Apply(ctx, dst, false); err != nil {
			t.Fatal(err)
		}
		if err := dst.QMP.SetParameters(ctx, map[string]any{"multifd-channels": 4}); err != nil {
			t.Fatal(err)
		}
		if err := dst.QMP.MigrateIncoming(ctx, uri); err != nil {
			t.Fatal(err)
		}
	}
	if g.name == "fill" {
		if err := src.WaitSerial(ctx, "F", func(s string) bool { return strings.Contains(s, "F") }); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.WaitMoreSerial(ctx, g.progress, 3); err != nil {
		t.Fatal(err)
	}
	if paused {
		if err := src.QMP.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	var run benchRun
	start := time.Now()
	switch mode {
	case "direct", "proxy":
		if err := (Tuning{}).Apply(ctx, src, true); err != nil {
			t.Fatal(err)
		}
		target := uri
		if mode == "proxy" {
			sock := filepath.Join(t.TempDir(), "proxy.sock")
			l, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			go func() {
				in, err := l.Accept()
				if err != nil {
					return
				}
				defer in.Close()
				out, err := net.Dial("tcp", uri[len("tcp:"):])
				if err != nil {
					return
				}
				io.Copy(out, in)
				out.Close()
			}()
			target = "unix:" + sock
		}
		start = time.Now()
		if err := src.QMP.Migrate(ctx, target); err != nil {
			t.Fatal(err)
		}
	case "multifd-direct":
		if err := multifdTuning.Apply(ctx, src, true); err != nil {
			t.Fatal(err)
		}
		start = time.Now()
		if err := src.QMP.Migrate(ctx, uri); err != nil {
			t.Fatal(err)
		}
	case "sidecar", "multifd-sidecar":
		args := []string{"--qmp", src.SidecarQMP, "--to", uri, "--json"}
		if mode == "multifd-sidecar" {
			// The source's 4 channels forwarded as 4 channels to a multifd destination.
			args = append(args, "--multifd", "4", "--dst-qmp", dst.SidecarQMP)
		}
		cmd := exec.CommandContext(ctx, sidecarBinary(t), args...)
		cmd.Stderr = os.Stderr
		start = time.Now()
		run.cpu, run.rssKiB = runMeasured(t, cmd)
	}
	return finishBenchRun(t, ctx, src.QMP, dst, start, run, paused)
}

// benchDestinationRAM has the destination QEMU touch all its RAM before it listens. Memory
// this machine's own hypervisor has not backed yet costs about 5 ms per 2 MiB page at the first
// touch (measured: the loading destination at 100 % CPU for 1.2 s with 19 faults per 100 ms,
// against 0.2 s and 185 in a fast run), and whether a new QEMU gets such memory is luck: it
// made the fill rows swing 0.3–1.5 s for QEMU by itself, paused, with the same bytes. The
// benchmark measures migrations, so every mode's destination pays that cost before the clock.
var benchDestinationRAM = []string{"-mem-prealloc"}

// multifdTuning is QEMU's own multifd with 4 channels (what libvirt's --parallel sets).
var multifdTuning = Tuning{Capabilities: map[string]bool{"multifd": true}, Parameters: map[string]any{"multifd-channels": 4}}

// finishBenchRun waits until the destination runs (the end of total, counted from start) and
// takes the source QEMU's downtime figure.
func finishBenchRun(t *testing.T, ctx context.Context, src *qmp.Client, dst *VM, start time.Time, run benchRun, paused bool) benchRun {
	t.Helper()
	want := "running"
	if paused {
		want = "paused"
	}
	if _, err := dst.WaitStatus(ctx, want); err != nil {
		t.Fatal(err)
	}
	run.total = time.Since(start)
	m, err := src.WaitMigration(ctx, 10*time.Millisecond)
	if err != nil || m.Status != "completed" {
		t.Fatalf("source: %+v %v", m, err)
	}
	run.downtime = time.Duration(m.Downtime) * time.Millisecond
	if m.RAM != nil {
		run.syncs, run.downBytes = m.RAM.DirtySyncCount, m.RAM.DowntimeBytes
		t.Logf("total %v, downtime %v, %d dirty syncs, %d MB sent after the stop", run.total.Round(time.Millisecond), run.downtime, run.syncs, run.downBytes>>20)
	}
	return run
}

// TestBenchRelay prints the relay benchmark table: direct QEMU→QEMU, a plain byte proxy and the
// sidecar, 5 runs each, medians, for 1 GiB fill and dirty guests (QMG_BENCH=1, make bench).
func TestBenchRelay(t *testing.T) {
	if os.Getenv("QMG_BENCH") == "" {
		t.Skip("set QMG_BENCH=1 (make bench) to run the relay benchmark")
	}
	runs := 5
	mem := 1024
	mem = benchEnv("QMG_BENCH_MEM", mem)
	runs = benchEnv("QMG_BENCH_RUNS", runs)
	var rows, mrows []string
	for _, series := range Versions {
		q := requireQEMU(t, series)
		for _, c := range relayBenchCases(mem) {
			g, name := c.g, c.name()
			res := map[string][]benchRun{}
			plain := []string{"direct", "proxy", "sidecar"}
			if os.Getenv("QMG_BENCH_MULTIFD") == "only" {
				plain = nil
			}
			for i := 0; i < runs; i++ {
				for _, mode := range plain { // interleaved: same conditions
					t.Run(fmt.Sprintf("%s/%s/%s/%d", series, name, mode, i), func(t *testing.T) {
						res[mode] = append(res[mode], benchMigrate(t, mode, q, g, c.paused))
					})
				}
			}
			if os.Getenv("QMG_BENCH_MULTIFD") != "0" && !c.paused {
				for i := 0; i < runs; i++ {
					for _, mode := range []string{"multifd-direct", "multifd-sidecar"} {
						t.Run(fmt.Sprintf("%s/%s/%s/%d", series, name, mode, i), func(t *testing.T) {
							res[mode] = append(res[mode], benchMigrate(t, mode, q, g, false))
						})
					}
				}
				md, ms := median(res["multifd-direct"]), median(res["multifd-sidecar"])
				mrows = append(mrows, fmt.Sprintf("%-5s %-12s %4dMiB | %8v %6v | %8v %6v %7v %6dMiB | %5.2f×  %+v",
					series, name, mem, md.total, md.downtime, ms.total, ms.downtime, ms.cpu, ms.rssKiB>>10,
					ms.total.Seconds()/md.total.Seconds(), ms.downtime-md.downtime))
			}
			if plain == nil {
				continue
			}
			d, p, s := median(res["direct"]), median(res["proxy"]), median(res["sidecar"])
			rows = append(rows, fmt.Sprintf("%-5s %-12s %4dMiB | %8v %6v | %8v %6v | %8v %6v %7v %6dMiB | %5.2f× %5.2f×  %+v | %s / %s / %s",
				series, name, mem, d.total, d.downtime, p.total, p.downtime, s.total, s.downtime, s.cpu, s.rssKiB>>10,
				s.total.Seconds()/d.total.Seconds(), s.total.Seconds()/p.total.Seconds(), s.downtime-d.downtime,
				passes(res["direct"]), passes(res["proxy"]), passes(res["sidecar"])))
		}
	}
	t.Logf("\nmedians of %d runs (total = migrate start → destination running; downtime = source QEMU's)\n"+
		"qemu  guest        size   | direct total/down | proxy total/down  | sidecar total/down/cpu/rss      | vs direct, vs proxy, downtime Δ | each run's dirty syncs:MB sent after the stop, direct / proxy / sidecar\n%s",
		runs, strings.Join(rows, "\n"))
	if len(mrows) > 0 {
		t.Logf("\nmultifd, 4 channels, medians of %d runs: QEMU multifd direct against the source's channels through the sidecar to a multifd destination\n"+
			"qemu  guest        size   | direct total/down | sidecar total/down/cpu/rss      | vs direct, downtime Δ\n%s", runs, strings.Join(mrows, "\n"))
	}
}

// relayBenchCase is one row of the relay benchmark: a guest, running or paused.
type relayBenchCase struct {
	g      guestCase
	paused bool
}

func (c relayBenchCase) name() string {
	if c.paused {
		return c.g.name + "/paused"
	}
	return c.g.name
}

// relayBenchCases are the dirty and fill guests running, and the fill guest paused. Running,
// the fill guest's migrations differ in what QEMU decides (it switches over in the middle of
// its first pass with hundreds of MB still to send, or after full passes with 64 MB); paused,
// every mode and run does the same work (one pass, 785 MB), so any spread left there is the
// data path's own, QEMU's by itself included. The syncs:MB column shows which is which.
func relayBenchCases(mem int) []relayBenchCase {
	var cs []relayBenchCase
	for _, g := range guestCases(mem, mem) {
		cs = append(cs, relayBenchCase{g: g})
		if g.name == "fill" {
			cs = append(cs, relayBenchCase{g: g, paused: true})
		}
	}
	return cs
}

// passes lists each run's dirty syncs and MB sent after the stop, as syncs:MB.
func passes(rs []benchRun) string {
	var b []string
	for _, r := range rs {
		b = append(b, fmt.Sprintf("%d:%d", r.syncs, r.downBytes>>20))
	}
	return strings.Join(b, " ")
}

func median(rs []benchRun) benchRun {
	if len(rs) == 0 {
		return benchRun{}
	}
	med := func(f func(benchRun) time.Duration) time.Duration {
		v := sorted(rs, f)
		return v[len(v)/2].Round(time.Millisecond)
	}
	rss := sorted(rs, func(r benchRun) int64 { return r.rssKiB })
	return benchRun{
		total:    med(func(r benchRun) time.Duration { return r.total }),
		downtime: med(func(r benchRun) time.Duration { return r.downtime }),
		cpu:      med(func(r benchRun) time.Duration { return r.cpu }),
		rssKiB:   rss[len(rss)/2],
	}
}
