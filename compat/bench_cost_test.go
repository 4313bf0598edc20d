package compat

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// costRun is what one relay through the sidecar binary cost: its CPU, its peak RSS, and (in a
// run under strace) its system calls.
type costRun struct {
	total    time.Duration
	cpu      time.Duration
	rssKiB   int64
	bytes    int64            // bytes relayed (the source's stream)
	syscalls map[string]int64 // strace -c counts, by call (strace runs only)
}

// relayCost migrates guest g of size mem with the sidecar binary from a source to a destination
// on this host and measures the sidecar. paused stops the guest first (the pure data path: one
// pass, no dirtying). With strace the sidecar runs under `strace -c -f` (slow; only its counts
// are used). With profile != "" it writes a CPU profile there.
func relayCost(t *testing.T, q QEMU, g guestCase, paused, strace bool, profile string, extra ...string) costRun {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	disk := g.disk(g.memMiB)
	port, _ := FreePort()
	uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
	src := StartVM(t, VMConfig{Name: "src", QEMU: q, MemMiB: g.memMiB, Disk: disk})
	dst := StartVM(t, VMConfig{Name: "dst", QEMU: q, MemMiB: g.memMiB, Disk: disk, Incoming: uri, Extra: benchDestinationRAM})
	if g.name == "fill" {
		if err := src.WaitSerial(ctx, "F", func(s string) bool { return strings.Contains(s, "F") }); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.WaitMoreSerial(ctx, g.progress, 2); err != nil {
		t.Fatal(err)
	}
	if paused {
		if err := src.QMP.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	args := append([]string{"--qmp", src.SidecarQMP, "--to", uri, "--json"}, extra...)
	if profile != "" {
		args = append([]string{"--cpuprofile", profile}, args...)
	}
	var cmd *exec.Cmd
	straceOut := filepath.Join(t.TempDir(), "strace")
	if strace {
		cmd = exec.CommandContext(ctx, "strace", append([]string{"-c", "-f", "-o", straceOut, sidecarBinary(t)}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, sidecarBinary(t), args...)
	}
	cmd.Stderr = os.Stderr
	start := time.Now()
	cpu, rss := runMeasured(t, cmd)
	run := costRun{total: time.Since(start), cpu: cpu, rssKiB: rss}
	m, err := src.QMP.WaitMigration(ctx, 10*time.Millisecond)
	if err != nil || m.Status != "completed" {
		t.Fatalf("source: %+v %v", m, err)
	}
	if m.RAM != nil {
		run.bytes = m.RAM.Transferred
	}
	if _, err := dst.WaitStatus(ctx, "running", "paused"); err != nil {
		t.Fatal(err)
	}
	if strace {
		run.syscalls = parseStraceC(t, straceOut)
	}
	return run
}

// parseStraceC reads `strace -c` output: calls per system call.
func parseStraceC(t *testing.T, path string) map[string]int64 {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 5 || strings.HasPrefix(fs[0], "%") || strings.HasPrefix(fs[0], "-") || fs[len(fs)-1] == "total" {
			continue
		}
		// % time, seconds, usecs/call, calls, [errors], syscall
		calls, err := strconv.ParseInt(fs[3], 10, 64)
		if err != nil {
			continue
		}
		out[fs[len(fs)-1]] = calls
	}
	return out
}

// TestBenchRelayCost prints what relaying costs the sidecar per GiB: CPU seconds and peak RSS
// (medians of QMG_BENCH_RUNS, default 5) and system calls (one run under strace), for 1 GiB
// fill (paused: the pure data path; and running) and dirty guests on 7.2 and 10.0. With
// QMG_PROFILE_DIR it also writes one CPU profile per case there (go tool pprof -top).
func TestBenchRelayCost(t *testing.T) {
	if os.Getenv("QMG_BENCH") == "" {
		t.Skip("set QMG_BENCH=1 (make bench) to run the relay cost benchmark")
	}
	runs, mem := 5, 1024
	runs = benchEnv("QMG_BENCH_RUNS", runs)
	mem = benchEnv("QMG_BENCH_MEM", mem)
	profDir := os.Getenv("QMG_PROFILE_DIR")
	var rows []string
	for _, series := range Versions {
		q := requireQEMU(t, series)
		for _, g := range guestCases(mem, mem) {
			for _, paused := range []bool{true, false} {
				if g.name == "dirty" && paused {
					continue // paused, the dirty guest is 99 MiB of one-byte pages: see fill
				}
				state := "running"
				if paused {
					state = "paused"
				}
				name := fmt.Sprintf("%s/%s/%s", series, g.name, state)
				var rs []costRun
				for i := 0; i < runs; i++ {
					t.Run(fmt.Sprintf("%s/%d", name, i), func(t *testing.T) { rs = append(rs, relayCost(t, q, g, paused, false, "")) })
				}
				var sc costRun
				t.Run(name+"/strace", func(t *testing.T) {
					prof := ""
					if profDir != "" {
						prof = filepath.Join(profDir, strings.ReplaceAll(name, "/", "-")+".pprof")
						relayCost(t, q, g, paused, false, prof)
					}
					sc = relayCost(t, q, g, paused, true, "")
				})
				if len(rs) == 0 {
					continue
				}
				perGiB := func(d time.Duration, b int64) time.Duration {
					return time.Duration(float64(d) / (float64(b) / (1 << 30)))
				}
				cpus := sorted(rs, func(r costRun) time.Duration { return perGiB(r.cpu, r.bytes) })
				totals := sorted(rs, func(r costRun) time.Duration { return r.total })
				rss := sorted(rs, func(r costRun) int64 { return r.rssKiB })
				var calls int64
				var top []string
				for k, v := range sc.syscalls {
					calls += v
					top = append(top, fmt.Sprintf("%s %d", k, v))
				}
				sort.Slice(top, func(i, j int) bool {
					a, _ := strconv.Atoi(strings.Fields(top[i])[1])
					b, _ := strconv.Atoi(strings.Fields(top[j])[1])
					return a > b
				})
				if len(top) > 5 {
					top = top[:5]
				}
				gib := float64(sc.bytes) / (1 << 30)
				rows = append(rows, fmt.Sprintf("%-22s | %8v | %8v | %6d MiB | %9.0f | %s", name, totals[len(totals)/2].Round(time.Millisecond),
					cpus[len(cpus)/2].Round(time.Millisecond), rss[len(rss)/2]>>10, float64(calls)/gib, strings.Join(top, ", ")))
			}
		}
	}
	t.Logf("\nrelay cost, medians of %d runs (CPU and syscalls per GiB of the source's stream; syscalls from one run under strace -c -f)\n"+
		"case                   | total    | CPU/GiB  | peak RSS | calls/GiB | top calls (one run)\n%s", runs, strings.Join(rows, "\n"))
}
