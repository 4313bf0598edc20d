package compat

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestBenchBaseline prints the reference table of QEMU migrating by itself: min and median of
// five runs for 1 GiB `dirty` and `fill` guests, each version pair, each accelerator. It runs
// only with QMG_BENCH=1 (make bench): it takes minutes and measures, it does not test.
func TestBenchBaseline(t *testing.T) {
	if os.Getenv("QMG_BENCH") == "" {
		t.Skip("set QMG_BENCH=1 (make bench) to run the baseline benchmark")
	}
	const runs = 5
	var rows []string
	for _, accel := range accels() {
		for _, p := range pairs {
			for _, g := range guestCases(1024, 1024) {
				if accel == "kvm" && g.name == "fill" {
					continue // see TestDirectMigration
				}
				srcQ, dstQ := requireQEMU(t, p[0]), requireQEMU(t, p[1])
				var rs []Result
				for i := 0; i < runs; i++ {
					t.Run(fmt.Sprintf("%s/%s-%s/%s/%d", accel, p[0], p[1], g.name, i), func(t *testing.T) {
						rs = append(rs, migrateAndVerify(t, srcQ, dstQ, accel, g))
					})
				}
				if len(rs) == runs {
					rows = append(rows, benchRow(fmt.Sprintf("%s %s→%s %s 1GiB", accel, p[0], p[1], g.name), rs))
				}
			}
		}
	}
	t.Logf("\n%-26s %19s %19s %19s %13s %10s %19s\n%s", "scenario (min / median)", "total", "downtime", "setup",
		"MB sent", "syncs", "wall", strings.Join(rows, "\n"))
}

// sorted returns f of every element of rs, in increasing order (for minimum and median).
func sorted[R any, V int64 | time.Duration](rs []R, f func(R) V) []V {
	v := make([]V, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	return v
}

func benchRow(name string, rs []Result) string {
	pick := func(f func(Result) time.Duration) string {
		v := sorted(rs, f)
		return fmt.Sprintf("%8v / %8v", v[0].Round(time.Millisecond), v[len(v)/2].Round(time.Millisecond))
	}
	med := func(f func(Result) int64) int64 { v := sorted(rs, f); return v[len(v)/2] }
	return fmt.Sprintf("%-26s %19s %19s %19s %13d %10d %19s", name,
		pick(func(r Result) time.Duration { return r.TotalTime }),
		pick(func(r Result) time.Duration { return r.Downtime }),
		pick(func(r Result) time.Duration { return r.SetupTime }),
		med(func(r Result) int64 { return r.Transferred })/1e6,
		med(func(r Result) int64 { return r.DirtySync }),
		pick(func(r Result) time.Duration { return r.Wall }))
}

// benchEnv is a benchmark's whole-number setting from the environment (QMG_BENCH_RUNS,
// QMG_BENCH_MEM), def when it is unset or not a number.
func benchEnv(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return n
	}
	return def
}

// summaryRSS is the sidecar's own peak RSS in KiB, from the summary event of its --json output
// (jsonEvents). A parent's rusage cannot give it: Linux carries the parent's high-water mark into
// a child started with vfork+exec, as os/exec starts one, so ru_maxrss is the larger of the test
// binary's and the sidecar's (savevm.Summary.PeakRSSBytes).
func summaryRSS(t *testing.T, out string) int64 {
	t.Helper()
	for _, e := range jsonEvents(t, out) {
		if e.Type == "summary" {
			if e.Summary == nil || e.Summary.PeakRSSBytes <= 0 {
				t.Fatalf("the sidecar's summary has no peak_rss_bytes: %+v", e.Summary)
			}
			return e.Summary.PeakRSSBytes >> 10
		}
	}
	t.Fatalf("no summary event in the sidecar's output (%d bytes)", len(out))
	return 0
}

// cpuTime is the user and system CPU time of a process that has exited.
func cpuTime(ps *os.ProcessState) time.Duration { return ps.UserTime() + ps.SystemTime() }

// runMeasured runs the sidecar (with --json) to its end and returns its CPU time and its own
// peak RSS in KiB.
func runMeasured(t *testing.T, cmd *exec.Cmd) (cpu time.Duration, rssKiB int64) {
	t.Helper()
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cpuTime(cmd.ProcessState), summaryRSS(t, out.String())
}
