package compat

import (
	"context"
	"fmt"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/migration"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// relayAndVerify migrates guest g from src to dst through the sidecar's engine (in process, on
// the VMs' second QMP sockets) and checks it like QEMU's own migration (checkMigrated).
func relayAndVerify(t testing.TB, srcQ, dstQ QEMU, accel string, g guestCase, opt savevm.Options) savevm.Summary {
	t.Helper()
	var sum savevm.Summary
	checkMigrated(t, srcQ, dstQ, accel, g, func(ctx context.Context, src, dst *VM, uri string) error {
		to, err := transport.Parse(uri)
		if err != nil {
			return err
		}
		sum, err = migration.Migrate(ctx, migration.MigrateOptions{Source: qmp.Endpoint{Socket: src.SidecarQMP}, To: to, DstQMP: dst.SidecarQMP, Options: opt})
		return err
	})
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
