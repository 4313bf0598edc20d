package compat

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// TestBenchVerify measures what --verify adds (issue 14): the time both guests stay paused
// while the sidecar hashes and compares their RAM, per reading method, for a 1 GiB fill guest
// on memfd backends (QEMU 10.0), against the same relay without --verify. One guest moves along
// a chain of destinations, the cases interleaved round by round (QMG_BENCH_RUNS rounds,
// default 3), so every case sees the same guest and the same neighbours:
//
//	QMG_BENCH=1 go test -count=1 -run TestBenchVerify -v ./compat/
func TestBenchVerify(t *testing.T) {
	if os.Getenv("QMG_BENCH") == "" {
		t.Skip("set QMG_BENCH=1 (make bench) to run the verify cost benchmark")
	}
	sidecarBinary(t)
	runs, mem := 3, 1024
	runs = benchEnv("QMG_BENCH_RUNS", runs)
	mem = benchEnv("QMG_BENCH_MEM", mem)
	q := requireQEMU(t, "10.0")
	g := guestCases(mem, mem)[1] // fill
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	disk := g.disk(mem)
	src := StartVM(t, VMConfig{Name: "src", QEMU: q, MemMiB: mem, Disk: disk, SharedMem: "memfd"})
	if err := src.WaitSerial(ctx, "F", func(s string) bool { return strings.Contains(s, "F") }); err != nil {
		t.Fatal(err)
	}
	cases := []string{"off", "file", "process_vm_readv", "proc-mem", "pmemsave"}
	type run struct{ total, downtime, verify, srcMs, dstMs int64 }
	res := map[string][]run{}
	hop := 0
	for round := 0; round < runs; round++ {
		for i := range cases {
			c := cases[(i+round)%len(cases)] // a different case first in each round
			hop++
			port, err := FreePort()
			if err != nil {
				t.Fatal(err)
			}
			uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
			dst := StartVM(t, VMConfig{Name: fmt.Sprintf("dst%d", hop), QEMU: q, MemMiB: mem, Disk: disk, SharedMem: "memfd",
				Incoming: uri, Paused: c != "off"})
			if err := src.WaitMoreSerial(ctx, g.progress, 2); err != nil {
				t.Fatal(err)
			}
			args := []string{"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json"}
			if c != "off" {
				order := c // the main RAM block by c; the ROM blocks (no file, no guest address) by the process's mapping
				if c == "file" || c == "pmemsave" {
					order += ",process_vm_readv"
				}
				args = append(args, "--verify", "--verify-method", order)
			}
			proc := startSidecar(t, nil, args...)
			code, _, stderr := proc.wait(t, 5*time.Minute)
			if code != 0 {
				t.Fatalf("%s: exit %d: %s", c, code, stderr)
			}
			sum := summaryOf(proc)
			if sum == nil {
				t.Fatalf("%s: no summary", c)
			}
			r := run{total: sum.TotalTimeMs, downtime: sum.DowntimeMs}
			if c != "off" {
				v := sum.Verify
				if v == nil || !v.Equal || !strings.HasPrefix(v.SourceMethod, c) && !strings.Contains(v.SourceMethod, c+" (") {
					t.Fatalf("%s: verify summary %+v", c, v)
				}
				r.verify, r.srcMs, r.dstMs = v.DurationMs, v.SourceMs, v.DestMs
			}
			if _, err := dst.WaitStatus(ctx, "running"); err != nil {
				t.Fatal(err)
			}
			res[c] = append(res[c], r)
			src.Kill()
			src = dst
		}
	}
	med := func(rs []run, f func(run) int64) int64 {
		v := sorted(rs, func(r run) int64 { return f(r) })
		return v[len(v)/2]
	}
	gib := float64(mem) / 1024
	var rows []string
	off := res["off"]
	offTotal := med(off, func(r run) int64 { return r.total })
	offDown := med(off, func(r run) int64 { return r.downtime })
	for _, c := range cases {
		rs := res[c]
		total, down := med(rs, func(r run) int64 { return r.total }), med(rs, func(r run) int64 { return r.downtime })
		row := fmt.Sprintf("%-16s | %6d (%.2f) | %5d (%.2f)", c, total, float64(total)/float64(offTotal), down, float64(down)/float64(offDown))
		if c != "off" {
			vms := med(rs, func(r run) int64 { return r.verify })
			row += fmt.Sprintf(" | %9d | %10.0f | %6d | %6d", vms, float64(vms)/gib,
				med(rs, func(r run) int64 { return r.srcMs }), med(rs, func(r run) int64 { return r.dstMs }))
		}
		rows = append(rows, row)
	}
	t.Logf("\n--verify cost, %d MiB fill guest, QEMU 10.0, memfd backends, relay on one host, medians of %d interleaved rounds (ms; ratios to off)\n"+
		"method           | stream total  | stream downtime | verify ms | verify/GiB | src ms | dst ms\n%s\n"+
		"verify ms is the added downtime: both guests stay paused until the check passes (source and destination hashed at once, on the same 2 cores)",
		mem, runs, strings.Join(rows, "\n"))
}
