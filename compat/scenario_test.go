package compat

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// pairs are the direct migrations of the baseline: same version both ways, and 7.2 → 10.0 on the
// versioned machine type both know (stream-format.md §7).
var pairs = [][2]string{{"7.2", "7.2"}, {"10.0", "10.0"}, {"7.2", "10.0"}}

// requireQEMU returns the QEMU of a series; a missing QEMU fails the test (never a silent skip:
// make test installs both).
func requireQEMU(t testing.TB, series string) QEMU {
	t.Helper()
	q, err := FindQEMU(series)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// accels are the accelerators scenarios run under: TCG always, KVM in addition where /dev/kvm
// opens (QMG_NO_KVM=1 turns it off).
func accels() []string {
	if KVMUsable() && os.Getenv("QMG_NO_KVM") == "" {
		return []string{"tcg", "kvm"}
	}
	return []string{"tcg"}
}

// guestCase is a test guest with the checks a migrated copy of it must pass.
type guestCase struct {
	name   string
	memMiB int
	disk   func(memMiB int) []byte
	// check verifies the destination's RAM dump on its own (beyond equality with the source).
	check func(t testing.TB, dump *os.File, size int64)
	// progress is the serial byte the running guest keeps printing.
	progress byte
}

func guestCases(memDirty, memFill int) []guestCase {
	fillOpt := func(mem int) FillOptions { return FillOptions{MemBytes: uint64(mem) << 20, DirtyEvery: 16, Seed: 7} }
	return []guestCase{
		{name: "dirty", memMiB: memDirty, progress: 'B',
			disk: func(int) []byte { return GuestDirty() },
			check: func(t testing.TB, f *os.File, size int64) {
				if _, err := CheckDirty(f, size); err != nil {
					t.Error(err)
				}
			}},
		{name: "fill", memMiB: memFill, progress: 'B',
			disk: func(mem int) []byte {
				img, err := GuestFill(fillOpt(mem))
				if err != nil {
					panic(err)
				}
				return img
			},
			check: func(t testing.TB, f *os.File, size int64) {
				if _, err := CheckFill(f, size, fillOpt(int(size>>20))); err != nil {
					t.Error(err)
				}
			}},
	}
}

// migrateAndVerify runs one direct migration src→dst of guest g (QEMU by itself) and checks it
// with checkMigrated.
func migrateAndVerify(t testing.TB, srcQ, dstQ QEMU, accel string, g guestCase) Result {
	t.Helper()
	var res Result
	checkMigrated(t, srcQ, dstQ, accel, g, func(ctx context.Context, src, dst *VM, uri string) error {
		var err error
		res, err = MigrateDirect(ctx, src, dst, uri, Tuning{})
		return err
	})
	return res
}

// checkMigrated starts a source running guest g and a paused destination (-S, so that its
// memory can be compared with the source's, frozen in postmigrate), lets migrate move the guest
// to uri, and checks: the source ends in postmigrate, the destination's RAM equals the source's
// page for page and passes the guest's own check, and after `cont` the guest keeps printing.
func checkMigrated(t testing.TB, srcQ, dstQ QEMU, accel string, g guestCase, migrate func(ctx context.Context, src, dst *VM, uri string) error) {
	t.Helper()
	checkMigratedIn(t, placement{}, srcQ, dstQ, accel, g, migrate)
}

// placement says which network namespace each QEMU runs in ("" = this one), and how the
// destination is prepared: with dstSetup it starts with `-incoming defer`, dstSetup runs (e.g.
// capabilities that must be set before the incoming migration starts), then migrate-incoming.
type placement struct {
	srcNS, dstNS string
	dstSetup     func(ctx context.Context, dst *VM) error
}

// checkMigratedIn is checkMigrated with the two QEMUs in the namespaces of pl (the destination
// listens on its namespace's loopback).
func checkMigratedIn(t testing.TB, pl placement, srcQ, dstQ QEMU, accel string, g guestCase, migrate func(ctx context.Context, src, dst *VM, uri string) error) {
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
	src := StartVM(t, VMConfig{Name: "src", QEMU: srcQ, Machine: machine, Accel: accel, MemMiB: g.memMiB, Disk: disk, Netns: pl.srcNS})
	incoming := uri
	if pl.dstSetup != nil {
		incoming = "defer"
	}
	dst := StartVM(t, VMConfig{Name: "dst", QEMU: dstQ, Machine: machine, Accel: accel, MemMiB: g.memMiB, Disk: disk,
		Incoming: incoming, Paused: true, Netns: pl.dstNS})
	if pl.dstSetup != nil {
		if err := pl.dstSetup(ctx, dst); err != nil {
			t.Fatal(err)
		}
		if err := dst.QMP.MigrateIncoming(ctx, uri); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.WaitMoreSerial(ctx, g.progress, 3); err != nil {
		t.Fatal(err)
	}
	if err := migrate(ctx, src, dst, uri); err != nil {
		t.Fatalf("%v; dst stderr: %s", err, lastLine(dst.Stderr()))
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
}

// verifyAgainstSource dumps both RAMs and compares them, then runs the guest's own check.
func verifyAgainstSource(ctx context.Context, t testing.TB, src, dst *VM, g guestCase) {
	t.Helper()
	verifyDumps(ctx, t, src.DumpRAM, dst, g)
}

// verifyDumps is verifyAgainstSource for any source that dumpSrc can dump (a libvirt domain).
func verifyDumps(ctx context.Context, t testing.TB, dumpSrc func(context.Context, string) (int64, error), dst *VM, g guestCase) {
	t.Helper()
	dir := t.TempDir()
	srcPath, dstPath := filepath.Join(dir, "src.ram"), filepath.Join(dir, "dst.ram")
	size, err := dumpSrc(ctx, srcPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dst.DumpRAM(ctx, dstPath); err != nil {
		t.Fatal(err)
	}
	a, err := os.Open(srcPath)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := os.Open(dstPath)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if _, err := CompareMemory(a, b, size, HypervisorWritten(dst.Config.Accel)); err != nil {
		t.Errorf("destination RAM differs from the source's: %v", err)
	}
	g.check(t, b, size)
}

// TestDirectMigration is the baseline scenario matrix: QEMU migrating by itself over TCP on
// loopback, guest memory verified on the destination.
func TestDirectMigration(t *testing.T) {
	for _, accel := range accels() {
		for _, p := range pairs {
			for _, g := range guestCases(128, 256) {
				name := fmt.Sprintf("%s/%s-%s/%s", accel, p[0], p[1], g.name)
				t.Run(name, func(t *testing.T) {
					srcQ, dstQ := requireQEMU(t, p[0]), requireQEMU(t, p[1])
					if accel == "kvm" && g.name == "fill" {
						// Under this machine's paravirtual KVM 32-bit guest code is emulated at a
						// fraction of TCG's speed: filling 256 MiB would take minutes.
						t.Skip("fill guest is TCG-only on paravirtual KVM")
					}
					r := migrateAndVerify(t, srcQ, dstQ, accel, g)
					t.Logf("total %v downtime %v setup %v transferred %d sync %d wall %v",
						r.TotalTime, r.Downtime, r.SetupTime, r.Transferred, r.DirtySync, r.Wall)
				})
			}
		}
	}
}
