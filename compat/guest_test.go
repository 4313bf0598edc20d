package compat

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestGuestDirtyMatchesMkguest(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	script := filepath.Join(RepoRoot(), "..", "shared", "tools", "mkguest.py")
	if _, err := os.Stat(script); err != nil {
		script = "/work/shared/tools/mkguest.py"
		if _, err := os.Stat(script); err != nil {
			t.Skip("mkguest.py not found")
		}
	}
	out := filepath.Join(t.TempDir(), "guest.img")
	if b, err := exec.Command(py, script, out).CombinedOutput(); err != nil {
		t.Fatalf("mkguest.py: %v\n%s", err, b)
	}
	want, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	got := GuestDirty()
	if !bytes.Equal(got, want) {
		for i := range min(len(got), len(want)) {
			if got[i] != want[i] {
				t.Fatalf("GuestDirty differs from mkguest.py at byte %d: %#02x, want %#02x (len %d, want %d)", i, got[i], want[i], len(got), len(want))
			}
		}
		t.Fatalf("GuestDirty is %d bytes, mkguest.py %d", len(got), len(want))
	}
}

func TestGuestAsmEncodings(t *testing.T) {
	// Spot checks against GNU as output for the helpers GuestFill adds.
	cases := []struct {
		name string
		emit func(a *guestAsm)
		want []byte
	}{
		{"mov %ebp,%edi", func(a *guestAsm) { a.movRR(guestEDI, guestEBP) }, []byte{0x89, 0xef}},
		{"xor $0x12345678,%eax", func(a *guestAsm) { a.aluImm32(guestALUXor, guestEAX, 0x12345678) }, []byte{0x35, 0x78, 0x56, 0x34, 0x12}},
		{"and $7,%esi", func(a *guestAsm) { a.aluImm32(guestALUAnd, guestESI, 7) }, []byte{0x83, 0xe6, 0x07}},
		{"cmp $0x10000,%ebp", func(a *guestAsm) { a.aluImm32(guestALUCmp, guestEBP, 0x10000) }, []byte{0x81, 0xfd, 0, 0, 1, 0}},
		{"imul $0x9e3779b1,%eax,%eax", func(a *guestAsm) { a.imulImm32(guestEAX, guestEAX, 0x9e3779b1) }, []byte{0x69, 0xc0, 0xb1, 0x79, 0x37, 0x9e}},
		{"shl $13,%ebx", func(a *guestAsm) { a.shl32(guestEBX, 13) }, []byte{0xc1, 0xe3, 0x0d}},
		{"shr $17,%ebx", func(a *guestAsm) { a.shr32(guestEBX, 17) }, []byte{0xc1, 0xeb, 0x11}},
		{"xor %ebx,%eax", func(a *guestAsm) { a.aluRR(guestALUXor, guestEAX, guestEBX) }, []byte{0x31, 0xd8}},
		{"or %eax,%eax", func(a *guestAsm) { a.aluRR(guestALUOr, guestEAX, guestEAX) }, []byte{0x09, 0xc0}},
		{"mov %ebp,-0xffc(%edi)", func(a *guestAsm) { a.movMemDisp32R(guestEDI, -0xffc, guestEBP) }, []byte{0x89, 0xaf, 0x04, 0xf0, 0xff, 0xff}},
		{"mov %eax,0x1c(%edi)", func(a *guestAsm) { a.movMemDisp8R(guestEDI, 0x1c, guestEAX) }, []byte{0x89, 0x47, 0x1c}},
		{"mov 0x1c(%esi),%eax", func(a *guestAsm) { a.movRMemDisp8(guestEAX, guestESI, 0x1c) }, []byte{0x8b, 0x46, 0x1c}},
		{"incl (%eax)", func(a *guestAsm) { a.inclMem(guestEAX) }, []byte{0xff, 0x00}},
		{"rep movsl", func(a *guestAsm) { a.repMovsl() }, []byte{0xf3, 0xa5}},
		{"jb .+0 (rel32)", func(a *guestAsm) { a.label("x"); a.jcc32(guestCCB, "x") }, []byte{0x0f, 0x82, 0xfa, 0xff, 0xff, 0xff}},
	}
	for _, c := range cases {
		a := newGuestAsm(0)
		c.emit(a)
		got, err := a.finish()
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if !bytes.Equal(got, c.want) {
			t.Errorf("%s: % x, want % x", c.name, got, c.want)
		}
	}
	a := newGuestAsm(0)
	a.label("far")
	a.raw(make([]byte, 200)...)
	a.jmp8("far")
	if _, err := a.finish(); err == nil {
		t.Error("a rel8 jump 200 bytes back assembled")
	}
	a = newGuestAsm(0)
	a.jmp8("nowhere")
	if _, err := a.finish(); err == nil {
		t.Error("a jump to an undefined label assembled")
	}
}

func TestGuestFillImage(t *testing.T) {
	for _, opt := range []FillOptions{
		{MemBytes: 256 << 20},
		{MemBytes: 256 << 20, DirtyEvery: 1, Seed: 1},
		{MemBytes: 4 << 30, DirtyEvery: 64, Seed: 0xffffffff},
	} {
		img, err := GuestFill(opt)
		if err != nil {
			t.Fatalf("%+v: %v", opt, err)
		}
		if len(img) != 512 || img[510] != 0x55 || img[511] != 0xaa {
			t.Fatalf("%+v: not a boot sector (len %d)", opt, len(img))
		}
		// The phrase is the last thing in the code, followed by zero padding.
		code := bytes.TrimRight(img[:510], "\x00")
		if !bytes.HasSuffix(code, []byte(guestFillPhrase)) {
			t.Errorf("%+v: image does not end with the text phrase", opt)
		}
		t.Logf("%+v: %d bytes of code", opt, len(code))
	}
	a, _ := GuestFill(FillOptions{MemBytes: 256 << 20, Seed: 1})
	b, _ := GuestFill(FillOptions{MemBytes: 256 << 20, Seed: 2})
	if bytes.Equal(a, b) {
		t.Error("the seed does not change the image")
	}
	for _, bad := range []FillOptions{
		{MemBytes: 1 << 20},
		{MemBytes: 256<<20 + 1},
		{MemBytes: 256 << 20, DirtyEvery: -1},
		{MemBytes: 256 << 20, DirtyEvery: 1 << 20},
	} {
		if _, err := GuestFill(bad); err == nil {
			t.Errorf("GuestFill(%+v) did not fail", bad)
		}
	}
	if got := (FillOptions{MemBytes: 4 << 30}).FillEnd(); got != FillMaxEnd {
		t.Errorf("FillEnd for 4 GiB = %#x, want %#x", got, FillMaxEnd)
	}
}

func TestGuestFillModel(t *testing.T) {
	var counts [3]int
	const n = 1 << 16
	for i := range n {
		counts[FillPageKind(256+i, 42)]++
	}
	for k, want := range []float64{0.25, 0.375, 0.375} {
		if got := float64(counts[k]) / n; got < want-0.02 || got > want+0.02 {
			t.Errorf("%s pages: fraction %.3f, want about %.3f", FillKind(k), got, want)
		}
	}
	page := make([]byte, GuestPageSize)
	seen := map[FillKind]bool{}
	for i := 256; len(seen) < 3; i++ {
		k := FillPageKind(i, 42)
		if seen[k] {
			continue
		}
		seen[k] = true
		FillPage(i, 42, page)
		switch k {
		case FillZero:
			if !bytes.Equal(page, make([]byte, GuestPageSize)) {
				t.Error("zero page is not zero")
			}
		case FillText:
			if binary.LittleEndian.Uint32(page[4:]) != uint32(i) {
				t.Error("text page does not hold its index at offset 4")
			}
			if !bytes.Contains(page, []byte(guestFillPhrase)) {
				t.Error("text page does not contain the phrase")
			}
		case FillRandom:
			// xorshift32 reference values for the first words.
			x := uint32(i) ^ 42
			x ^= x << 13
			x ^= x >> 17
			x ^= x << 5
			if binary.LittleEndian.Uint32(page) != x {
				t.Error("random page does not start with xorshift32(i^seed)")
			}
			if bytes.Count(page, []byte{0}) > 64 {
				t.Error("random page has too many zero bytes")
			}
		}
	}
	// Seed ^ index == 0 would make xorshift32 output zeros; the hash makes
	// such pages zero pages anyway.
	for i := 256; i < 300; i++ {
		if k := FillPageKind(i, uint32(i)); k != FillZero {
			t.Errorf("page %d with seed %d is %s, want zero", i, i, k)
		}
	}
	// Pages of one kind differ from each other (the index varies them).
	a, b := make([]byte, GuestPageSize), make([]byte, GuestPageSize)
	for _, kind := range []FillKind{FillText, FillRandom} {
		var idx []int
		for i := 256; len(idx) < 2; i++ {
			if FillPageKind(i, 7) == kind {
				idx = append(idx, i)
			}
		}
		FillPage(idx[0], 7, a)
		FillPage(idx[1], 7, b)
		if bytes.Equal(a, b) {
			t.Errorf("%s pages %d and %d are equal", kind, idx[0], idx[1])
		}
	}
	opt := FillOptions{MemBytes: 256 << 20, DirtyEvery: 16}
	if !opt.FillTouched(256) || !opt.FillTouched(256+32) || opt.FillTouched(257) || opt.FillTouched(255) || opt.FillTouched(65536) {
		t.Error("FillTouched is wrong")
	}
	if (FillOptions{MemBytes: 256 << 20}).FillTouched(256) {
		t.Error("FillTouched with DirtyEvery 0 is true")
	}
}

// --- Boot tests ---

// guestBoot starts a guest under TCG and waits for its first serial output.
func guestBoot(t *testing.T, series string, img []byte, memMiB int) *VM {
	t.Helper()
	return StartVM(t, VMConfig{Name: "guest", QEMU: requireQEMU(t, series), MemMiB: memMiB, Disk: img})
}

// guestWait waits for the serial output to satisfy ok and returns when it did.
func guestWait(t *testing.T, vm *VM, what string, timeout time.Duration, ok func(string) bool) time.Time {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := vm.WaitSerial(ctx, what, ok); err != nil {
		t.Fatal(err)
	}
	return time.Now()
}

// guestCheckSerial checks the whole serial output against a regular expression.
func guestCheckSerial(t *testing.T, vm *VM, re string) {
	t.Helper()
	if s := vm.Serial(); !regexp.MustCompile(re).MatchString(s) {
		if len(s) > 60 {
			s = s[:30] + "…" + s[len(s)-30:]
		}
		t.Fatalf("serial output %q does not match %s", s, re)
	}
}

// guestPassRate counts the 'B' passes printed during d.
func guestPassRate(vm *VM, d time.Duration) float64 {
	s0, t0 := vm.Serial(), time.Now()
	time.Sleep(d)
	return float64(strings.Count(vm.Serial(), "B")-strings.Count(s0, "B")) / time.Since(t0).Seconds()
}

// guestDump pauses the VM and saves its RAM with pmemsave.
func guestDump(t *testing.T, vm *VM, name string) (*os.File, int64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := vm.QMP.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(vm.Dir, name)
	size, err := vm.DumpRAM(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if st, err := f.Stat(); err != nil || st.Size() != size {
		t.Fatalf("pmemsave wrote %v bytes, want %d (%v)", st.Size(), size, err)
	}
	return f, size
}

func TestGuestDirtyBoot(t *testing.T) {
	for _, series := range Versions {
		t.Run("qemu-"+series, func(t *testing.T) {
			vm := guestBoot(t, series, GuestDirty(), 128)
			guestWait(t, vm, "'A' then 'B'", 60*time.Second, func(s string) bool { return strings.HasPrefix(s, "AB") })
			rate := guestPassRate(vm, time.Second)
			t.Logf("QEMU %s TCG: dirty guest at 128 MiB: %.1f passes/s (%d pages per pass)", series, rate, (DirtyEnd-DirtyStart)/GuestPageSize)
			if rate <= 0 {
				t.Fatal("no passes")
			}
			guestCheckSerial(t, vm, `^AB+$`)
			f1, size := guestDump(t, vm, "mem1.bin")
			rep, err := CheckDirty(f1, size)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("dump: %+v", rep)
			// A second dump of the paused guest is identical; after running a little more, it
			// is not.
			f2, _ := guestDump(t, vm, "mem2.bin")
			if _, err := CompareMemory(f1, f2, size, nil); err != nil {
				t.Fatalf("two dumps of the paused guest: %v", err)
			}
			if err := vm.QMP.Cont(context.Background()); err != nil {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond)
			f3, _ := guestDump(t, vm, "mem3.bin")
			if _, err := CheckDirty(f3, size); err != nil {
				t.Fatal(err)
			}
			d, err := CompareMemory(f1, f3, size, nil)
			if err == nil {
				t.Fatal("CompareMemory found no difference after the guest ran on")
			}
			t.Logf("after running on: %d of %d pages differ", d.Differing, d.Pages)
		})
	}
}

func TestGuestFillBoot(t *testing.T) {
	type run struct {
		memMiB, every int
	}
	// The 1 GiB run measures the fill phase at benchmark size; -short skips it.
	runs := []run{{256, 1}, {256, 16}, {1024, 0}}
	for _, series := range Versions {
		for _, r := range runs {
			t.Run(fmt.Sprintf("qemu-%s/%dMiB/every-%d", series, r.memMiB, r.every), func(t *testing.T) {
				if r.memMiB > 256 && testing.Short() {
					t.Skip("1 GiB guest skipped in -short mode")
				}
				opt := FillOptions{MemBytes: uint64(r.memMiB) << 20, DirtyEvery: r.every, Seed: 0x5eed0000 + uint32(r.every)}
				img, err := GuestFill(opt)
				if err != nil {
					t.Fatal(err)
				}
				vm := guestBoot(t, series, img, r.memMiB)
				tA := guestWait(t, vm, "'A'", 60*time.Second, func(s string) bool { return strings.HasPrefix(s, "A") })
				tF := guestWait(t, vm, "'F'", 120*time.Second, func(s string) bool { return strings.HasPrefix(s, "AF") })
				fill := tF.Sub(tA)
				t.Logf("QEMU %s TCG: fill of %d MiB took %v (%.0f MiB/s)", series, r.memMiB-1, fill.Round(time.Millisecond), float64(r.memMiB-1)/fill.Seconds())
				if r.every > 0 {
					guestWait(t, vm, "'B'", 60*time.Second, func(s string) bool { return strings.HasPrefix(s, "AFB") })
					rate := guestPassRate(vm, time.Second)
					first, end := opt.fillPages()
					t.Logf("QEMU %s TCG: fill guest at %d MiB, DirtyEvery %d: %.1f passes/s (%d pages per pass)",
						series, r.memMiB, r.every, rate, (end-first+r.every-1)/r.every)
					if rate <= 0 {
						t.Fatal("no passes")
					}
					guestCheckSerial(t, vm, `^AFB+$`)
				} else {
					time.Sleep(100 * time.Millisecond)
					guestCheckSerial(t, vm, `^AF$`)
				}
				f, size := guestDump(t, vm, "mem.bin")
				rep, err := CheckFill(f, size, opt)
				if err != nil {
					t.Fatal(err)
				}
				total := rep.Pages[0] + rep.Pages[1] + rep.Pages[2]
				t.Logf("dump: %d zero, %d text, %d random pages; %d touched", rep.Pages[FillZero], rep.Pages[FillText], rep.Pages[FillRandom], rep.Touched)
				if frac := float64(rep.Pages[FillZero]) / float64(total); frac < 0.23 || frac > 0.27 {
					t.Errorf("zero pages are %.3f of the range, want about 1/4", frac)
				}
				if r.every > 0 {
					// The counters went up: the touched pages' first words differ from phase 1.
					page := make([]byte, GuestPageSize)
					got := make([]byte, 4)
					first, _ := opt.fillPages()
					FillPage(first, opt.Seed, page)
					if _, err := f.ReadAt(got, int64(first)*GuestPageSize); err != nil {
						t.Fatal(err)
					}
					if bytes.Equal(got, page[:4]) {
						t.Errorf("page %d's counter did not move", first)
					}
				}
			})
		}
	}
}
