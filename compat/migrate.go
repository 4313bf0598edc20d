package compat

import (
	"context"
	"fmt"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// Tuning is what a scenario sets on the source before migrating.
type Tuning struct {
	MaxBandwidth int64           // bytes/s; 0 = effectively unlimited (QEMU's own default is 128 MiB/s)
	DowntimeMs   int64           // downtime-limit; default 300
	Capabilities map[string]bool // migrate-set-capabilities
	Parameters   map[string]any  // further migrate-set-parameters
}

// Unlimited is the max-bandwidth used for "no cap": 1 TiB/s.
const Unlimited = int64(1) << 40

// Apply sets the tuning on a VM (source, or the capabilities on a destination).
func (tu Tuning) Apply(ctx context.Context, vm *VM, source bool) error {
	if len(tu.Capabilities) > 0 {
		if err := vm.QMP.SetCapabilities(ctx, tu.Capabilities); err != nil {
			return fmt.Errorf("%s: %w", vm.Config.Name, err)
		}
	}
	if !source {
		return nil
	}
	params := map[string]any{}
	for k, v := range tu.Parameters {
		params[k] = v
	}
	bw := tu.MaxBandwidth
	if bw == 0 {
		bw = Unlimited
	}
	params["max-bandwidth"] = bw
	dt := tu.DowntimeMs
	if dt == 0 {
		dt = 300
	}
	params["downtime-limit"] = dt
	if err := vm.QMP.SetParameters(ctx, params); err != nil {
		return fmt.Errorf("%s: %w", vm.Config.Name, err)
	}
	return nil
}

// Result is what one migration measured, from the source's query-migrate after completion and
// the wall clock of the caller.
type Result struct {
	Status      string
	TotalTime   time.Duration // QEMU's total-time
	Downtime    time.Duration // QEMU's downtime
	SetupTime   time.Duration // QEMU's setup-time
	Transferred int64         // bytes
	Normal      int64         // pages sent whole
	Duplicate   int64         // zero pages
	DirtySync   int64         // dirty-sync-count (≈ iterations + 1)
	Wall        time.Duration // from the migrate command until the destination ran
	Error       string
}

// ResultFrom fills a Result from a finished query-migrate reply.
func ResultFrom(m qmp.MigrationInfo, wall time.Duration) Result {
	r := Result{Status: m.Status, TotalTime: time.Duration(m.TotalTime) * time.Millisecond,
		Downtime: time.Duration(m.Downtime) * time.Millisecond, SetupTime: time.Duration(m.SetupTime) * time.Millisecond,
		Wall: wall, Error: m.ErrorDesc}
	if m.RAM != nil {
		r.Transferred, r.Normal, r.Duplicate, r.DirtySync = m.RAM.Transferred, m.RAM.Normal, m.RAM.Duplicate, m.RAM.DirtySyncCount
	}
	return r
}

// MigrateDirect migrates src straight to dst (started with Incoming set to uri) the way QEMU does
// by itself — the baseline. It waits until the source reports completion and the destination has
// left the "inmigrate" state.
func MigrateDirect(ctx context.Context, src, dst *VM, uri string, tu Tuning) (Result, error) {
	if err := tu.Apply(ctx, dst, false); err != nil {
		return Result{}, err
	}
	if err := tu.Apply(ctx, src, true); err != nil {
		return Result{}, err
	}
	start := time.Now()
	if err := src.QMP.Migrate(ctx, uri); err != nil {
		return Result{}, fmt.Errorf("%s: %w", src.Config.Name, err)
	}
	m, err := src.QMP.WaitMigration(ctx, 10*time.Millisecond)
	if err != nil {
		src.QMP.MigrateCancel(context.Background())
		return Result{}, fmt.Errorf("%s: %w", src.Config.Name, err)
	}
	if m.Status != "completed" {
		return ResultFrom(m, time.Since(start)), fmt.Errorf("%s: migration %s: %s", src.Config.Name, m.Status, m.ErrorDesc)
	}
	if _, err := dst.WaitStatus(ctx, "running", "paused"); err != nil {
		return ResultFrom(m, time.Since(start)), err
	}
	return ResultFrom(m, time.Since(start)), nil
}
