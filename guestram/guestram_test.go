package guestram

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/zeebo/xxh3"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
)

// testSeed is a non-zero seed, so that the seed is exercised everywhere.
const testSeed = 0x5eed_1234

func requireQEMU(t testing.TB, series string) compat.QEMU {
	t.Helper()
	q, err := compat.FindQEMU(series)
	if err != nil {
		t.Fatal(err) // make test installs both: a missing QEMU is a failure, not a skip
	}
	return q
}

func fillOpt(memMiB int) compat.FillOptions {
	return compat.FillOptions{MemBytes: uint64(memMiB) << 20, DirtyEvery: 16, Seed: 7}
}

// startFilled starts a VM running the fill guest, waits until it has filled its RAM, and pauses it.
func startFilled(t testing.TB, ctx context.Context, cfg compat.VMConfig) *compat.VM {
	t.Helper()
	if cfg.MemMiB == 0 {
		cfg.MemMiB = 128
	}
	img, err := compat.GuestFill(fillOpt(cfg.MemMiB))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Disk = img
	vm := compat.StartVM(t, cfg)
	if err := vm.WaitSerial(ctx, "F", func(s string) bool { return strings.Contains(s, "F") }); err != nil {
		t.Fatal(err)
	}
	if err := vm.QMP.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.WaitStatus(ctx, "paused"); err != nil {
		t.Fatal(err)
	}
	return vm
}

// locateVM finds the VM's PID through its free monitor socket (as the sidecar will) and its layout.
func locateVM(t testing.TB, ctx context.Context, vm *compat.VM) *Layout {
	t.Helper()
	pid, err := PIDFromSocket(ctx, vm.SidecarQMP)
	if err != nil {
		t.Fatal(err)
	}
	if pid != vm.PID {
		t.Fatalf("PIDFromSocket = %d, QEMU is %d", pid, vm.PID)
	}
	l, err := Locate(ctx, vm.QMP, pid)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func hashWith(t testing.TB, ctx context.Context, vm *compat.VM, l *Layout, m Method) *List {
	t.Helper()
	list, err := Hash(ctx, vm.QMP, l, Options{Methods: []Method{m}, Seed: testSeed})
	if err != nil {
		t.Fatalf("hash with %s: %v", m, err)
	}
	return list
}

// TestMethodsAgree hashes one paused guest with every method that can read it, on both QEMUs and
// both shared backends, and checks that all agree with each other and with a pmemsave dump the
// test hashes itself.
func TestMethodsAgree(t *testing.T) {
	for _, v := range compat.Versions {
		for _, shm := range []string{"memfd", "file"} {
			t.Run(v+"/"+shm, func(t *testing.T) {
				t.Parallel()
				ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
				defer cancel()
				vm := startFilled(t, ctx, compat.VMConfig{QEMU: requireQEMU(t, v), SharedMem: shm})
				l := locateVM(t, ctx, vm)
				ram := l.Block("ram0")
				if ram == nil {
					t.Fatalf("no block ram0 in %+v", l.Blocks)
				}
				for _, b := range l.Blocks {
					if b.HVA == 0 {
						t.Errorf("block %s not located: %s", b.Name, b.Located)
					}
				}
				if ram.File == nil {
					t.Fatalf("ram0 has no shared file: %s", ram.FileNote)
				}
				if ram.Backend == nil || ram.Backend.Type != "memory-backend-"+map[string]string{"memfd": "memfd", "file": "file"}[shm] || !ram.Backend.Share {
					t.Errorf("ram0's backend = %+v", ram.Backend)
				}
				if v == "10.0" {
					checkLocatedWithoutHVA(t, ctx, vm, l)
				}
				lists := map[Method]*List{}
				for _, m := range DefaultMethods {
					lists[m] = hashWith(t, ctx, vm, l, m)
				}
				// Which method read what: the file only ram0; the process mapping everything;
				// pmemsave what the guest sees (ram0 whole, pc.bios).
				wantRead := map[Method][]string{
					MethodFile:      {"ram0"},
					MethodProcessVM: blockNames(l),
					MethodProcMem:   blockNames(l),
					MethodPMemSave:  {"ram0", "pc.bios"},
				}
				for m, names := range wantRead {
					for _, n := range names {
						bh := lists[m].Block(n)
						if bh == nil || bh.Method != m {
							t.Errorf("%s did not read block %s: %+v", m, n, bh.Note)
						}
					}
				}
				if bh := lists[MethodPMemSave].Block("ram0"); len(bh.Unread) != 0 {
					t.Errorf("pmemsave left pages of ram0 unread: %v (%s)", bh.Unread, bh.Note)
				}
				for _, a := range DefaultMethods {
					for _, b := range DefaultMethods {
						if a >= b {
							continue
						}
						d := Compare(lists[a], lists[b], nil)
						if d.Differing != 0 {
							t.Errorf("%s and %s disagree:\n%s", a, b, d)
						}
					}
				}
				// An independent check: QEMU's own pmemsave of guest RAM into a file, hashed here.
				dump := t.TempDir() + "/ram.dump"
				size, err := vm.DumpRAM(ctx, dump)
				if err != nil {
					t.Fatal(err)
				}
				f, err := os.Open(dump)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				page := make([]byte, PageSize)
				fileList := lists[MethodFile].Block("ram0")
				if int64(len(fileList.Pages))*PageSize != size {
					t.Fatalf("ram0 has %d pages, the dump %d bytes", len(fileList.Pages), size)
				}
				bad := 0
				for p := range fileList.Pages {
					if _, err := io.ReadFull(f, page); err != nil {
						t.Fatal(err)
					}
					h := xxh3.Hash128Seed(page, testSeed)
					if (Sum{h.Hi, h.Lo}) != fileList.Pages[p] {
						if bad++; bad <= 3 {
							t.Errorf("page %d: the dump's hash differs from the file method's", p)
						}
					}
				}
				// The fill guest's content really is there (not, say, all zero pages).
				distinct := map[Sum]bool{}
				for _, s := range fileList.Pages {
					distinct[s] = true
				}
				if len(distinct) < len(fileList.Pages)/4 {
					t.Errorf("only %d distinct hashes in %d pages: the guest did not fill its RAM", len(distinct), len(fileList.Pages))
				}
			})
		}
	}
}

func blockNames(l *Layout) []string {
	var n []string
	for _, b := range l.Blocks {
		n = append(n, b.Name)
	}
	return n
}

// checkLocatedWithoutHVA runs 7.2's way of locating blocks (gpa2hva, then elimination among the
// MADV_DONTFORK mappings) on a 10.0, whose HVA column tells the truth.
func checkLocatedWithoutHVA(t *testing.T, ctx context.Context, vm *compat.VM, truth *Layout) {
	t.Helper()
	l, err := locate(ctx, vm.QMP, truth.PID, false)
	if err != nil {
		t.Fatal(err)
	}
	for i, b := range l.Blocks {
		if b.HVA != truth.Blocks[i].HVA {
			t.Errorf("block %s: located at 0x%x (%s) without the HVA column, info ramblock says 0x%x",
				b.Name, b.HVA, b.Located, truth.Blocks[i].HVA)
		}
	}
}

// TestChangedPageFound changes pages of guest RAM behind QEMU's back, through the shared backend
// file, and checks that the comparison names exactly those pages of that block.
func TestChangedPageFound(t *testing.T) {
	for _, v := range compat.Versions {
		t.Run(v, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			vm := startFilled(t, ctx, compat.VMConfig{QEMU: requireQEMU(t, v), SharedMem: "file", MemMiB: 64})
			l := locateVM(t, ctx, vm)
			before, err := Hash(ctx, vm.QMP, l, Options{Seed: testSeed})
			if err != nil {
				t.Fatal(err)
			}
			if m := before.Block("ram0").Method; m != MethodFile {
				t.Errorf("ram0 read with %s, want %s by default", m, MethodFile)
			}
			f, err := os.OpenFile(vm.Dir+"/ram", os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			flip := func(off int64) {
				var b [1]byte
				if _, err := f.ReadAt(b[:], off); err != nil {
					t.Fatal(err)
				}
				b[0] ^= 0x5a
				if _, err := f.WriteAt(b[:], off); err != nil {
					t.Fatal(err)
				}
			}
			flip(300*PageSize + 17)
			for p := int64(1000); p < 1003; p++ {
				flip(p*PageSize + PageSize - 1)
			}
			// QEMU's own view of its RAM, through its mapping, must show the change.
			after, err := Hash(ctx, vm.QMP, l, Options{Seed: testSeed, Methods: []Method{MethodProcessVM}})
			if err != nil {
				t.Fatal(err)
			}
			d := Compare(before, after, nil)
			if d.Equal() || d.Differing != 4 || len(d.OnlySource)+len(d.OnlyDest)+len(d.SizeMismatch) != 0 {
				t.Fatalf("diff:\n%s", d)
			}
			for _, bd := range d.Blocks {
				want := []PageRange(nil)
				if bd.Name == "ram0" {
					want = []PageRange{{300, 301}, {1000, 1003}}
				}
				if fmt.Sprint(bd.Differ) != fmt.Sprint(want) {
					t.Errorf("block %s: differing %v, want %v", bd.Name, bd.Differ, want)
				}
			}
			// Excluding page 300 leaves the other three, and reports the exclusion.
			d = Compare(before, after, []Exclusion{{Block: "ram0", Page: 300, Reason: "test"}})
			if d.Differing != 3 {
				t.Errorf("with page 300 excluded: %d differ, want 3", d.Differing)
			}
			for _, bd := range d.Blocks {
				if bd.Name == "ram0" && (len(bd.Excluded) != 1 || !bd.Excluded[0].Differed) {
					t.Errorf("exclusion not reported: %+v", bd.Excluded)
				}
			}
			if !strings.Contains(d.String(), "page 300 (offset 0x12c000) excluded (test): differs") {
				t.Errorf("report does not show the exclusion:\n%s", d)
			}
		})
	}
}

// TestMigratedEqual migrates a guest with QEMU itself from 7.2 to 10.0 into a destination started
// without -S that HoldPaused keeps paused, then hashes both (the source in postmigrate), sends the
// source's list through its serialised form, and compares.
func TestMigratedEqual(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	srcQ, dstQ := requireQEMU(t, "7.2"), requireQEMU(t, "10.0")
	machine := compat.MachineFor(srcQ, dstQ)
	port, err := compat.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
	img, err := compat.GuestFill(fillOpt(128))
	if err != nil {
		t.Fatal(err)
	}
	src := compat.StartVM(t, compat.VMConfig{Name: "src", QEMU: srcQ, Machine: machine, MemMiB: 128, Disk: img})
	dst := compat.StartVM(t, compat.VMConfig{Name: "dst", QEMU: dstQ, Machine: machine, MemMiB: 128, Disk: img, Incoming: uri})
	if err := src.WaitSerial(ctx, "F", func(s string) bool { return strings.Contains(s, "F") }); err != nil {
		t.Fatal(err)
	}
	hp, err := CheckHeldPaused(ctx, dst.QMP, dst.PID)
	if err != nil {
		t.Fatal(err)
	}
	if hp.Held {
		t.Fatalf("a destination without -S reported held: %+v", hp)
	}
	if err := HoldPaused(ctx, dst.QMP); err != nil {
		t.Fatal(err)
	}
	if _, err := compat.MigrateDirect(ctx, src, dst, uri, compat.Tuning{}); err != nil {
		t.Fatal(err)
	}
	if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
		t.Fatal(err)
	}
	// Without HoldPaused this destination would be running now.
	if st, err := dst.WaitStatus(ctx, "paused"); err != nil {
		t.Fatalf("destination %q after loading: %v", st, err)
	}
	srcL, dstL := locateVM(t, ctx, src), locateVM(t, ctx, dst)
	srcList, err := Hash(ctx, src.QMP, srcL, Options{Seed: testSeed})
	if err != nil {
		t.Fatal(err)
	}
	dstList, err := Hash(ctx, dst.QMP, dstL, Options{Seed: testSeed})
	if err != nil {
		t.Fatal(err)
	}
	wire, err := srcList.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(wire, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	d := Compare(got, dstList, nil)
	if !d.Equal() {
		t.Fatalf("migrated guest differs:\n%s", d)
	}
	for i, b := range d.Blocks {
		t.Logf("%s: %d pages, source %s, destination %s", b.Name, b.Pages, d.Blocks[i].SourceMethod, d.Blocks[i].DestMethod)
	}
	t.Logf("hash list of the source: %d bytes on the wire for %d pages", len(wire), d.Compared)
	if d.Compared < 128<<20/PageSize {
		t.Errorf("only %d pages compared", d.Compared)
	}
	// A stale list of another guest state must not compare equal: change a page of the source
	// list and compare again.
	got.Blocks[0].Pages[1234] = Sum{1, 2}
	if d := Compare(got, dstList, nil); d.Equal() || d.Differing != 1 {
		t.Errorf("a changed hash went unnoticed:\n%s", d)
	}
}

// TestHeldPaused starts destinations with and without -S and reads what they will do.
func TestHeldPaused(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, v := range compat.Versions {
		for _, paused := range []bool{true, false} {
			dst := compat.StartVM(t, compat.VMConfig{QEMU: requireQEMU(t, v), Incoming: "defer", Paused: paused})
			hp, err := CheckHeldPaused(ctx, dst.QMP, dst.PID)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s -S=%v: %+v", v, paused, hp)
			if hp.Held != paused || hp.Status != "inmigrate" || len(hp.Reasons) == 0 || len(hp.Unknown) == 0 {
				t.Errorf("%s with -S=%v: %+v", v, paused, hp)
			}
			dst.Kill()
		}
	}
}

func TestParseQEMUArgs(t *testing.T) {
	for _, c := range []struct {
		args      string
		stopped   bool
		ambiguous string
	}{
		{"-machine q35 -S -incoming defer", true, ""},
		{"-machine q35 --S -incoming defer", true, ""},
		{"-machine q35 -incoming defer", false, ""},
		{"-name -S -incoming defer", false, "-name"},      // -S is the guest's name
		{"-nodefaults -S", true, ""},                      // a known argument-less option before it
		{"-drive file=-S,if=none -incoming x", false, ""}, // inside a value
		{"-append -S -S", true, ""},                       // the second one is the option
		{"-some-future-flag -S -incoming defer", false, "-some-future-flag"},
	} {
		r := parseQEMUArgs(strings.Fields(c.args))
		if r.stopped != c.stopped || r.ambiguousS != c.ambiguous {
			t.Errorf("%q: stopped %v ambiguous %q, want %v %q", c.args, r.stopped, r.ambiguousS, c.stopped, c.ambiguous)
		}
	}
}

// failingVM is a paused VM for a failure test: small chunks so that a hash takes many reads.
func failingVM(t *testing.T, v string) (*compat.VM, *Layout) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	vm := compat.StartVM(t, compat.VMConfig{QEMU: requireQEMU(t, v), SharedMem: "memfd", MemMiB: 64, Paused: true})
	return vm, locateVM(t, ctx, vm)
}

var hookMu sync.Mutex

// withHook runs fn with testHookChunk set to hook (the first call only).
func withHook(hook func(), fn func()) {
	hookMu.Lock()
	defer hookMu.Unlock()
	var once sync.Once
	testHookChunk = func(Method, int64) { once.Do(hook) }
	defer func() { testHookChunk = nil }()
	fn()
}

// TestFailures kills QEMU, closes the monitor, or freezes QEMU during a hash, for every method,
// and checks for a clear error (never a hang: the test's context is the bound).
func TestFailures(t *testing.T) {
	opts := func(m Method) Options {
		return Options{Methods: []Method{m}, ChunkSize: 256 << 10, ReadTimeout: 2 * time.Second}
	}
	for _, m := range DefaultMethods {
		t.Run("killed/"+string(m), func(t *testing.T) {
			vm, l := failingVM(t, "10.0")
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var err error
			withHook(func() { syscall.Kill(vm.PID, syscall.SIGKILL); <-vm.Exited() }, func() {
				_, err = Hash(ctx, vm.QMP, l, opts(m))
			})
			if err == nil || !strings.Contains(err.Error(), "has exited") {
				t.Fatalf("error %v, want one saying QEMU exited", err)
			}
			t.Log(err)
		})
		t.Run("qmp-closed/"+string(m), func(t *testing.T) {
			vm, l := failingVM(t, "7.2")
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var err error
			withHook(func() { vm.QMP.Close() }, func() {
				_, err = Hash(ctx, vm.QMP, l, opts(m))
			})
			if err == nil || !(strings.Contains(err.Error(), "closed") || strings.Contains(err.Error(), "EOF")) {
				t.Fatalf("error %v, want one saying the monitor is gone", err)
			}
			t.Log(err)
		})
	}
	t.Run("qmp-frozen", func(t *testing.T) {
		vm, l := failingVM(t, "10.0")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := syscall.Kill(vm.PID, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		defer syscall.Kill(vm.PID, syscall.SIGCONT)
		_, err := Hash(ctx, vm.QMP, l, Options{ReadTimeout: time.Second})
		if err == nil || !strings.Contains(err.Error(), "no reply") {
			t.Fatalf("error %v, want no reply", err)
		}
		t.Log(err)
	})
	t.Run("running", func(t *testing.T) {
		vm, l := failingVM(t, "10.0")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := vm.QMP.Cont(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := Hash(ctx, vm.QMP, l, Options{}); !errors.Is(err, ErrRunning) {
			t.Fatalf("error %v, want ErrRunning", err)
		}
	})
}

// TestNoProcessAccess: a sidecar that may not read the QEMU's mappings (another user's QEMU, not
// root) still locates the guest ranges and hashes what the guest sees with pmemsave; the other
// methods say why they cannot.
func TestNoProcessAccess(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	vm := startFilled(t, ctx, compat.VMConfig{QEMU: requireQEMU(t, "7.2"), MemMiB: 64})
	hookMu.Lock()
	readSmapsFn = func(pid int) ([]vma, error) {
		return nil, fmt.Errorf("guestram: mappings of QEMU pid %d: %w", pid, os.ErrPermission)
	}
	l, err := Locate(ctx, vm.QMP, vm.PID)
	readSmapsFn = readSmaps
	hookMu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if l.ProcessDenied == "" {
		t.Fatal("ProcessDenied not set")
	}
	list, err := Hash(ctx, vm.QMP, l, Options{Seed: testSeed})
	if err != nil {
		t.Fatal(err)
	}
	full, err := Hash(ctx, vm.QMP, locateVM(t, ctx, vm), Options{Seed: testSeed})
	if err != nil {
		t.Fatal(err)
	}
	for _, bh := range list.Blocks {
		switch bh.Name {
		case "pc.ram", "pc.bios":
			if bh.Method != MethodPMemSave {
				t.Errorf("%s read with %q: %s", bh.Name, bh.Method, bh.Note)
			}
		default:
			if bh.Method != "" || !strings.Contains(bh.Note, "not read") {
				t.Errorf("%s: method %q, note %q", bh.Name, bh.Method, bh.Note)
			}
		}
	}
	if d := Compare(full, list, nil); d.Differing != 0 || d.Unverified != 32+32+1+1 {
		t.Errorf("pmemsave alone against all methods:\n%s", d)
	}
}
