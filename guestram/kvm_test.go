package guestram

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
	"github.com/qemu-migrate-go/qemu-migrate-go/inspect"
)

var msrRE = regexp.MustCompile(`env\.(system_time_msr|wall_clock_msr|steal_time_msr|async_pf_en_msr|pv_eoi_en_msr) uint64 = (\d+)`)

// TestKVMWrittenPages checks, under KVM (where /dev/kvm opens, like compat's scenarios; QMG_NO_KVM=1
// turns it off), that the pages a KVM destination has different from its source right after
// loading are exactly those the vCPU's paravirtual MSRs in the stream name: the source is saved to
// a file, the destination (-S) loads it, the cpu section's MSR is read from the same file, and
// the comparison must be equal with those exclusions and differ without them.
func TestKVMWrittenPages(t *testing.T) {
	if !compat.KVMUsable() || os.Getenv("QMG_NO_KVM") != "" {
		t.Skip("no usable /dev/kvm (or QMG_NO_KVM set): TCG never has hypervisor-written pages")
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	q := requireQEMU(t, "10.0")
	file := filepath.Join(t.TempDir(), "stream.bin")
	src := compat.StartVM(t, compat.VMConfig{Name: "src", QEMU: q, Accel: "kvm", Disk: compat.GuestDirty()})
	// 'A' comes once the guest runs: SeaBIOS has set up its kvmclock by then.
	if err := src.WaitSerial(ctx, "A", func(s string) bool { return strings.Contains(s, "A") }); err != nil {
		t.Fatal(err)
	}
	if err := src.QMP.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := src.QMP.Migrate(ctx, "file:"+file); err != nil {
		t.Fatal(err)
	}
	if m, err := src.QMP.WaitMigration(ctx, 20*time.Millisecond); err != nil || m.Status != "completed" {
		t.Fatalf("saving the source: %v %+v", err, m)
	}
	dst := compat.StartVM(t, compat.VMConfig{Name: "dst", QEMU: q, Accel: "kvm", Disk: compat.GuestDirty(), Paused: true, Incoming: "file:" + file})
	if _, err := dst.WaitStatus(ctx, "paused"); err != nil {
		t.Fatal(err)
	}
	srcL, dstL := locateVM(t, ctx, src), locateVM(t, ctx, dst)
	a, err := Hash(ctx, src.QMP, srcL, Options{Seed: testSeed})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Hash(ctx, dst.QMP, dstL, Options{Seed: testSeed})
	if err != nil {
		t.Fatal(err)
	}
	// The MSR, from the stream both sides have.
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out bytes.Buffer
	if _, err := inspect.Inspect(f, inspect.Options{Device: "cpu", DeviceOut: &out}); err != nil {
		t.Fatal(err)
	}
	var msrs PVMSRs
	dsts := map[string]*uint64{"system_time_msr": &msrs.SystemTime, "wall_clock_msr": &msrs.WallClock,
		"steal_time_msr": &msrs.StealTime, "async_pf_en_msr": &msrs.AsyncPF, "pv_eoi_en_msr": &msrs.PVEOI}
	found := 0
	for _, m := range msrRE.FindAllStringSubmatch(out.String(), -1) {
		*dsts[m[1]], _ = strconv.ParseUint(m[2], 10, 64)
		found++
	}
	if found < 2 {
		t.Fatalf("no MSR fields in the cpu section:\n%.2000s", out.String())
	}
	writes := KVMWrites(0, msrs)
	ex, unmapped := dstL.Exclusions(writes)
	t.Logf("MSRs %+v: %v -> %v", msrs, writes, ex)
	if len(unmapped) != 0 {
		for _, bl := range dstL.Blocks {
			t.Logf("%s: %+v", bl.Name, bl.GPA)
		}
		t.Logf("flat %+v notes %v", dstL.flat, dstL.Notes)
		t.Fatalf("writes outside guest RAM: %v", unmapped)
	}
	plain := Compare(a, b, nil)
	withEx := Compare(a, b, ex)
	t.Logf("without exclusions:\n%s\nwith:\n%s", plain, withEx)
	if !withEx.Equal() {
		t.Errorf("differences beyond the pages the MSRs name:\n%s", withEx)
	}
	if plain.Equal() {
		t.Logf("KVM rewrote none of the pages this time") // allowed: the exclusions only permit
	}
}
