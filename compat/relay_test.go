package compat

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// relayAndVerify migrates guest g from src to dst through the sidecar's engine (in process, on
// the VMs' second QMP sockets) and checks what migrateAndVerify checks for QEMU by itself.
func relayAndVerify(t testing.TB, srcQ, dstQ QEMU, accel string, g guestCase, opt savevm.Options) savevm.Summary {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	machine := MachineFor(srcQ, dstQ)
	disk := g.disk(g.memMiB)
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
	src := StartVM(t, VMConfig{Name: "src", QEMU: srcQ, Machine: machine, Accel: accel, MemMiB: g.memMiB, Disk: disk})
	dst := StartVM(t, VMConfig{Name: "dst", QEMU: dstQ, Machine: machine, Accel: accel, MemMiB: g.memMiB, Disk: disk,
		Incoming: uri, Paused: true})
	if err := src.WaitMoreSerial(ctx, g.progress, 3); err != nil {
		t.Fatal(err)
	}
	to, _ := transport.Parse(uri)
	sum, err := savevm.Migrate(ctx, savevm.MigrateOptions{SourceQMP: src.SidecarQMP, To: to, DstQMP: dst.SidecarQMP, Options: opt})
	if err != nil {
		t.Fatalf("relay: %v; dst stderr: %s", err, lastLine(dst.Stderr()))
	}
	if st, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
		t.Fatalf("source status %q: %v", st, err)
	}
	if _, err := dst.WaitStatus(ctx, "paused"); err != nil {
		t.Fatal(err)
	}
	verifyAgainstSource(ctx, t, src, dst, g)
	if err := dst.QMP.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	if err := dst.WaitMoreSerial(ctx, g.progress, 3); err != nil {
		t.Fatalf("guest does not run on the destination: %v", err)
	}
	return sum
}

// TestRelayMigration is the relay scenario matrix: every version pair, both guests, through the
// sidecar's engine, guest memory verified.
func TestRelayMigration(t *testing.T) {
	for _, accel := range accels() {
		for _, p := range pairs {
			for _, g := range guestCases(128, 256) {
				t.Run(fmt.Sprintf("%s/%s-%s/%s", accel, p[0], p[1], g.name), func(t *testing.T) {
					if accel == "kvm" && g.name == "fill" {
						t.Skip("fill guest is TCG-only on paravirtual KVM")
					}
					sum := relayAndVerify(t, requireQEMU(t, p[0]), requireQEMU(t, p[1]), accel, g, savevm.Options{})
					t.Logf("total %dms downtime %dms (QEMU %dms, tail %d B in %dms) out %d B, pages %d zero %d iterations %d",
						sum.TotalTimeMs, sum.DowntimeMs, sum.QEMUDowntimeMs, sum.TailBytes, sum.TailMs, sum.BytesOut,
						sum.NormalPages, sum.ZeroPages, sum.Iterations)
				})
			}
		}
	}
}
