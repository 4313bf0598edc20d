package compat

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// benchLibvirtMigrate migrates a fresh libvirt domain (the dirty guest) once: "direct" (QEMU by
// itself, commanded through libvirtd), "sidecar-qmp" (the sidecar on a QMP socket of the same
// kind of domain) or "sidecar-libvirt" (the sidecar through libvirtd). The sidecar runs with
// --dst-qmp, so its pre-flight checks are part of the time. total is from the start of the
// migration (the command) until the destination runs.
func benchLibvirtMigrate(t *testing.T, mode string, q QEMU, mem int) benchRun {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	d := StartDomain(t, DomainConfig{MemMiB: mem, Disk: GuestDirty(), ExtraQMP: mode == "sidecar-qmp"})
	if err := d.WaitMoreSerial(ctx, 'B', 3); err != nil {
		t.Fatal(err)
	}
	port, _ := FreePort()
	uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
	cfg := d.Destination(q, uri)
	cfg.Paused = false
	dst := StartVM(t, cfg)
	src, err := qmp.DialLibvirt(ctx, LibvirtURI, d.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var run benchRun
	var start time.Time
	switch mode {
	case "direct":
		if err := src.SetParameters(ctx, map[string]any{"max-bandwidth": Unlimited, "downtime-limit": 300}); err != nil {
			t.Fatal(err)
		}
		start = time.Now()
		if err := src.Migrate(ctx, uri); err != nil {
			t.Fatal(err)
		}
	default:
		args := []string{"--to", uri, "--dst-qmp", dst.SidecarQMP, "-q"}
		if mode == "sidecar-qmp" {
			args = append(args, "--qmp", d.QMPPath)
		} else {
			args = append(args, "--libvirt", LibvirtURI, "--domain", d.Name)
		}
		cmd := exec.CommandContext(ctx, sidecarBinary(t), args...)
		cmd.Stderr = os.Stderr
		start = time.Now()
		if err := cmd.Run(); err != nil {
			t.Fatal(err)
		}
		run.cpu = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	return finishBenchRun(t, ctx, src, dst, start, run, false)
}

// TestBenchLibvirt prints the libvirt benchmark (QMG_BENCH=1, make bench): a libvirt domain
// migrated by QEMU itself, by the sidecar on a QMP socket and by the sidecar through libvirtd,
// interleaved, medians of QMG_BENCH_RUNS (5); then the latency of preflight (socket and
// libvirt) and of the hook (migrate begin, and any other operation).
func TestBenchLibvirt(t *testing.T) {
	if os.Getenv("QMG_BENCH") == "" {
		t.Skip("set QMG_BENCH=1 (make bench) to run the libvirt benchmark")
	}
	runs, mem := 5, 1024
	runs = benchEnv("QMG_BENCH_RUNS", runs)
	mem = benchEnv("QMG_BENCH_MEM", mem)
	q := requireQEMU(t, "7.2")
	modes := []string{"direct", "sidecar-qmp", "sidecar-libvirt"}
	res := map[string][]benchRun{}
	for i := 0; i < runs; i++ {
		for _, mode := range modes {
			t.Run(fmt.Sprintf("%s/%d", mode, i), func(t *testing.T) {
				res[mode] = append(res[mode], benchLibvirtMigrate(t, mode, q, mem))
			})
		}
	}
	dm, sq, sl := median(res["direct"]), median(res["sidecar-qmp"]), median(res["sidecar-libvirt"])

	// Latencies of the commands an operator or a hook calls, on one domain and destination.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	d := StartDomain(t, DomainConfig{Disk: GuestDirty(), ExtraQMP: true})
	dst := StartVM(t, d.Destination(q, "defer"))
	xml, err := d.DumpXML(ctx)
	if err != nil {
		t.Fatal(err)
	}
	lat := func(stdin string, want int, args ...string) time.Duration {
		var ds []time.Duration
		for i := 0; i < 2*runs+1; i++ {
			_, stderr, code, took := runCmd(t, time.Minute, stdin, sidecarBinary(t), args...)
			if code != want {
				t.Fatalf("%v: exit %d: %s", args, code, stderr)
			}
			ds = append(ds, took)
		}
		return sorted(ds, func(d time.Duration) time.Duration { return d })[len(ds)/2].Round(100 * time.Microsecond)
	}
	pfQMP := lat("", 0, "preflight", "--qmp", d.QMPPath, "--dst-qmp", dst.SidecarQMP)
	pfLibvirt := lat("", 0, "preflight", "--libvirt", LibvirtURI, "--domain", d.Name, "--dst-qmp", dst.SidecarQMP)
	hook := lat(xml, 0, "hook", d.Name, "migrate", "begin", "-")
	hookOther := lat(xml, 0, "hook", d.Name, "prepare", "begin", "-")

	t.Logf("\nlibvirt domain, dirty guest %d MiB, QEMU 7.2 → stock 7.2 -incoming, medians of %d interleaved runs\n"+
		"(total = migration start → destination running, sidecar runs include preflight; downtime = source QEMU's)\n"+
		"mode             total      downtime  sidecar CPU  vs direct  vs --qmp\n"+
		"direct           %-9v  %-8v  -            1.00×      -\n"+
		"sidecar --qmp    %-9v  %-8v  %-11v  %.2f×      1.00×\n"+
		"sidecar libvirt  %-9v  %-8v  %-11v  %.2f×      %.2f×\n\n"+
		"command latency (median of %d, process start → exit):\n"+
		"preflight --qmp        %v\npreflight --libvirt    %v  (%.2f× --qmp)\nhook migrate begin     %v\nhook other operation   %v\n",
		mem, runs,
		dm.total, dm.downtime,
		sq.total, sq.downtime, sq.cpu, sq.total.Seconds()/dm.total.Seconds(),
		sl.total, sl.downtime, sl.cpu, sl.total.Seconds()/dm.total.Seconds(), sl.total.Seconds()/sq.total.Seconds(),
		2*runs+1, pfQMP, pfLibvirt, pfLibvirt.Seconds()/pfQMP.Seconds(), hook, hookOther)
}
