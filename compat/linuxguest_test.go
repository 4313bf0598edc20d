package compat

import (
	"bytes"
	"context"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat/linuxguest"
)

// TestLinuxOptionsChecked: options that cannot boot or make no sense are refused before
// anything is built.
func TestLinuxOptionsChecked(t *testing.T) {
	for _, tc := range []struct {
		opt  LinuxOptions
		want string
	}{
		{LinuxOptions{FilesMiB: 500}, "need at least 1175 MiB of RAM to boot"},
		{LinuxOptions{FilesMiB: 400, DirtyMiB: 500}, "need at least 1040 MiB"},
		{LinuxOptions{DirtyMiB: -1}, "negative"},
		{LinuxOptions{Tick: time.Millisecond}, "Tick 1ms outside"},
		{LinuxOptions{VerifyEvery: 48 * time.Hour}, "VerifyEvery"},
	} {
		if _, err := BuildLinuxGuest(tc.opt); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want one saying %q", tc.opt, err, tc.want)
		}
	}
}

// writeTree creates files (path → size, content derived from the path) below root.
func writeTree(t *testing.T, root string, files map[string]int) {
	t.Helper()
	for name, size := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, size)
		for i := range b {
			b[i] = byte(len(name) + i*7)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLinuxFilePick: files come alternately from each package (the one with the fewest bytes
// taken first), in path order, without overshooting the limit.
func TestLinuxFilePick(t *testing.T) {
	root := t.TempDir()
	writeTree(t, root, map[string]int{
		"big/lib/huge.so": 9000, "big/z": 100,
		"doc/a/1.html": 1000, "doc/a/2.html": 1000, "doc/b.txt": 500,
		"src/x.go": 300, "src/y.go": 300, "src/z/w.go": 3000,
	})
	got, err := pickLinuxFiles(root, 6000)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	var total int64
	for _, f := range got {
		names = append(names, f.name)
		total += f.size
	}
	// big's first file (9000) would overshoot, then the lightest package with files left goes
	// next each time: big 100, doc 1000, src 300, src 600, src 3600, doc 2000; doc/b.txt would
	// overshoot.
	want := "data/big/z data/doc/a/1.html data/src/x.go data/src/y.go data/src/z/w.go data/doc/a/2.html"
	if strings.Join(names, " ") != want || total != 5700 {
		t.Errorf("picked %q (%d bytes), want %q (5700)", strings.Join(names, " "), total, want)
	}
	if _, err := pickLinuxFiles(root, 20000); err == nil || !strings.Contains(err.Error(), "hold 0 MiB") {
		t.Errorf("more than the packages hold: %v", err)
	}
}

// TestLinuxInitramfs writes an initramfs from a small tree and reads it back: directories
// before what they hold, /dev/console and /init, the files with their content, and a
// manifest whose checksums are those of the content; FilePages finds the pages in a "dump".
func TestLinuxInitramfs(t *testing.T) {
	root := t.TempDir()
	writeTree(t, root, map[string]int{"p/a/b": 5000, "p/c": 10, "q/d": 4096, "q/e": 0})
	files, err := pickLinuxFiles(root, 9106)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "initramfs.cpio")
	n, total, err := writeInitramfs(path, []byte("\x7fELF init"), files)
	if err != nil || n != 4 || total != 9106 {
		t.Fatalf("wrote %d files, %d bytes, %v; want 4, 9106", n, total, err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := linuxguest.NewReader(f)
	seen := map[string]bool{"": true}
	contents := map[string][]byte{}
	var manifest []linuxguest.Entry
	for {
		h, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if dir := filepath.Dir(h.Name); !seen[strings.TrimPrefix(dir, ".")] {
			t.Errorf("%s comes before its directory", h.Name)
		}
		seen[h.Name] = true
		b, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		contents[h.Name] = b
		if h.Name == linuxguest.ManifestPath {
			if manifest, err = linuxguest.ParseManifest(bytes.NewReader(b)); err != nil {
				t.Fatal(err)
			}
		}
		if h.Name == "dev/console" && (h.Mode != linuxguest.ModeCharDev|0o600 || h.Major != 5 || h.Minor != 1) {
			t.Errorf("dev/console: mode %o, %d:%d", h.Mode, h.Major, h.Minor)
		}
	}
	if string(contents["init"]) != "\x7fELF init" {
		t.Errorf("init holds %q", contents["init"])
	}
	if len(manifest) != 4 {
		t.Fatalf("manifest lists %d files: %+v", len(manifest), manifest)
	}
	for _, e := range manifest {
		b, ok := contents[e.Path]
		if !ok || int64(len(b)) != e.Size || crc32.Checksum(b, linuxguest.Castagnoli) != e.CRC {
			t.Errorf("manifest entry %+v does not match the archived file (%d bytes)", e, len(b))
		}
	}

	// FilePages: p/a/b is 2 pages (the second zero-filled), p/c and q/d one each; q/e none.
	img := &LinuxImage{Initrd: path}
	fp, err := img.FilePages()
	if err != nil {
		t.Fatal(err)
	}
	if fp.Len() != 4 {
		t.Errorf("%d distinct file pages, want 4", fp.Len())
	}
	dump := make([]byte, 8*GuestPageSize)
	copy(dump[GuestPageSize:], contents["data/p/a/b"][:GuestPageSize]) // one page of one file, aligned
	copy(dump[3*GuestPageSize+1:], contents["data/q/d"])               // another, not aligned
	if found, err := fp.Find(bytes.NewReader(dump), int64(len(dump))); err != nil || found != 1 {
		t.Errorf("found %d file pages (%v), want 1", found, err)
	}
}

// startLinux boots img on a fresh VM made from cfg and waits for READY; it returns the VM,
// the READY line and the wall time from the launch to READY.
func startLinux(ctx context.Context, t *testing.T, img *LinuxImage, cfg VMConfig) (*VM, linuxguest.Line, time.Duration) {
	t.Helper()
	start := time.Now()
	vm := StartVM(t, img.VMConfig(t, cfg))
	ready, err := LinuxWaitReady(ctx, vm)
	if err != nil {
		t.Fatalf("%v\nserial:\n%s", err, tail(vm.Serial(), 2000))
	}
	return vm, ready, time.Since(start)
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// TestLinuxGuestBoot boots the real-files guest (1 GiB, LinuxDefaultFilesMiB of files) on
// both QEMUs: READY counts every file of the image, the page cache holds them (the guest's
// LAYOUT of physical memory), their checksums are right (on 10.0), and the guest keeps
// ticking.
func TestLinuxGuestBoot(t *testing.T) {
	img := LinuxGuest(t, LinuxOptions{FilesMiB: LinuxDefaultFilesMiB})
	t.Logf("image: %d files, %.1f MiB, %s; %s", img.Files, float64(img.FileBytes)/(1<<20), img.Initrd, strings.ReplaceAll(img.Packages, "\n", "; "))
	for _, v := range Versions {
		t.Run(v, func(t *testing.T) {
			q := requireQEMU(t, v)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			vm, ready, wall := startLinux(ctx, t, img, VMConfig{Name: "linux", QEMU: q})
			uptime, _ := ready.Float("t")
			t.Logf("%s: READY %v after launch (guest uptime %.2f s): %s", q, wall.Round(10*time.Millisecond), uptime, ready.Text)
			if n, _ := ready.Int("files"); n != int64(img.Files) {
				t.Errorf("guest lists %d files, the image %d", n, img.Files)
			}
			if n, _ := ready.Int("bytes"); n != img.FileBytes {
				t.Errorf("guest lists %d bytes of files, the image %d", n, img.FileBytes)
			}
			var fileMiB float64
			for _, l := range LinuxLines(vm) {
				if l.Kind == linuxguest.KindLayout {
					f, _ := l.Float("files_mib")
					fileMiB += f
					t.Log(l.Text)
				}
			}
			// Every byte of every file is in a page-cache page; small files waste the rest
			// of theirs (the init binary and the manifest add a few MiB).
			want := float64(img.FileBytes) / (1 << 20)
			if fileMiB < want || fileMiB > 1.5*want+8 {
				t.Errorf("the page cache holds %.1f MiB of file pages for %.1f MiB of files", fileMiB, want)
			}
			// 7.2's unpacking is checked by TestLinuxGuestMigrate, whose source boots on 7.2
			// and whose destination checksums what it received.
			if v != "7.2" {
				start := time.Now()
				l, err := LinuxVerifyFiles(ctx, vm)
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("checksums in %v: %s", time.Since(start).Round(10*time.Millisecond), l.Text)
			}
			if _, err := LinuxWaitTicks(ctx, vm, 2); err != nil {
				t.Fatal(err)
			}
			if err := LinuxCheckSerial(vm); err != nil {
				t.Error(err)
			}
		})
	}
}

// TestLinuxGuestMigrate migrates the idle real-files guest from QEMU 7.2 to 10.0 (QEMU by
// itself, on the versioned machine type both know): the destination's RAM equals the
// source's page for page and holds every page of the files; once resumed the guest keeps
// running and its files' checksums are still right.
func TestLinuxGuestMigrate(t *testing.T) {
	srcQ, dstQ := requireQEMU(t, "7.2"), requireQEMU(t, "10.0")
	img := LinuxGuest(t, LinuxOptions{FilesMiB: LinuxDefaultFilesMiB})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	machine := MachineFor(srcQ, dstQ)
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
	dst := StartVM(t, img.VMConfig(t, VMConfig{Name: "dst", QEMU: dstQ, Machine: machine, Incoming: uri, Paused: true}))
	src, _, _ := startLinux(ctx, t, img, VMConfig{Name: "src", QEMU: srcQ, Machine: machine})
	if _, err := LinuxWaitTicks(ctx, src, 1); err != nil {
		t.Fatal(err)
	}
	res, err := MigrateDirect(ctx, src, dst, uri, Tuning{})
	if err != nil {
		t.Fatalf("%v; dst stderr: %s", err, lastLine(dst.Stderr()))
	}
	t.Logf("migrated in %v (downtime %v): %d bytes, %d normal and %d zero pages",
		res.TotalTime, res.Downtime, res.Transferred, res.Normal, res.Duplicate)
	if _, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.WaitStatus(ctx, "paused"); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	srcPath, dstPath := filepath.Join(dir, "src.ram"), filepath.Join(dir, "dst.ram")
	size, err := src.DumpRAM(ctx, srcPath)
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
	if _, err := CompareMemory(a, b, size, HypervisorWritten("tcg")); err != nil {
		t.Errorf("destination RAM differs from the source's: %v", err)
	}
	fp, err := img.FilePages()
	if err != nil {
		t.Fatal(err)
	}
	found, err := fp.Find(b, size)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("destination RAM holds %d of the %d distinct file pages", found, fp.Len())
	if found != fp.Len() || found < img.Files/2 {
		t.Errorf("destination RAM holds %d of the files' %d distinct pages", found, fp.Len())
	}
	os.Remove(srcPath)
	os.Remove(dstPath)

	if err := dst.QMP.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := LinuxWaitTicks(ctx, dst, 2); err != nil {
		t.Fatalf("the guest does not run on the destination: %v", err)
	}
	l, err := LinuxVerifyFiles(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(l.Text)
	if err := LinuxCheckSerial(dst); err != nil {
		t.Error(err)
	}
}

// qemuDirtyRate measures the guest's dirty rate with QEMU's own calc-dirty-rate
// (page-sampling: the dirty-bitmap mode counts nothing under TCG) over secs seconds, in MB/s
// as QEMU reports it (MiB).
func qemuDirtyRate(ctx context.Context, vm *VM, secs int) (int64, error) {
	if err := vm.QMP.Execute(ctx, "calc-dirty-rate", map[string]any{"calc-time": secs, "sample-pages": 8192, "mode": "page-sampling"}, nil); err != nil {
		return 0, err
	}
	for {
		var r struct {
			Status    string `json:"status"`
			DirtyRate int64  `json:"dirty-rate"`
		}
		if err := vm.QMP.Execute(ctx, "query-dirty-rate", nil, &r); err != nil {
			return 0, err
		}
		if r.Status == "measured" {
			return r.DirtyRate, nil
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("query-dirty-rate: still %q: %w", r.Status, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// TestLinuxGuestDirtyRate checks that the dirtying workload dirties about as fast as asked,
// as QEMU measures it, at two rates (the second set through the control port), with loose
// bounds: within a factor of two of the asked rate, and faster at the faster rate.
func TestLinuxGuestDirtyRate(t *testing.T) {
	q := requireQEMU(t, "7.2")
	img := LinuxGuest(t, LinuxOptions{MemMiB: 512, DirtyMiB: 256, DirtyRateMiBs: 16})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	vm, _, _ := startLinux(ctx, t, img, VMConfig{Name: "linux", QEMU: q})
	var measured []int64
	for i, rate := range []int{16, 48} {
		if i > 0 {
			if err := LinuxSetRate(ctx, vm, rate); err != nil {
				t.Fatal(err)
			}
		}
		before, err := LinuxWaitTicks(ctx, vm, 1) // a whole tick at the new rate
		if err != nil {
			t.Fatal(err)
		}
		got, err := qemuDirtyRate(ctx, vm, 2)
		if err != nil {
			t.Fatal(err)
		}
		after, err := LinuxWaitTicks(ctx, vm, 1)
		if err != nil {
			t.Fatal(err)
		}
		p0, _ := before.Int("pages")
		p1, _ := after.Int("pages")
		t0, _ := before.Float("t")
		t1, _ := after.Float("t")
		own := float64(p1-p0) * linuxguest.PageSize / (1 << 20) / (t1 - t0)
		t.Logf("asked %d MiB/s: QEMU measures %d MB/s, the guest counts %.1f MiB/s", rate, got, own)
		if got < int64(rate)/2 || got > 2*int64(rate) {
			t.Errorf("asked %d MiB/s, QEMU measures %d MB/s", rate, got)
		}
		if own < float64(rate)/2 || own > 1.5*float64(rate) {
			t.Errorf("asked %d MiB/s, the guest dirtied %.1f MiB/s", rate, own)
		}
		measured = append(measured, got)
	}
	if measured[1] <= measured[0] {
		t.Errorf("QEMU measures %d MB/s at 48 MiB/s, not more than the %d at 16", measured[1], measured[0])
	}
	if err := LinuxCheckSerial(vm); err != nil {
		t.Error(err)
	}
}

// TestLinuxGuestSelfChecks shows that the guest's checks can fail: a dirty page put back to
// an older generation (what a migration that missed a dirty page leaves) is reported
// CORRUPT, and a changed file makes the checksums BAD.
func TestLinuxGuestSelfChecks(t *testing.T) {
	q := requireQEMU(t, "10.0")
	img := LinuxGuest(t, LinuxOptions{MemMiB: 512, FilesMiB: 16, DirtyMiB: 16, DirtyRateMiBs: 64})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	vm, _, _ := startLinux(ctx, t, img, VMConfig{Name: "linux", QEMU: q})
	if _, err := LinuxWaitTicks(ctx, vm, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := LinuxVerifyFiles(ctx, vm); err != nil {
		t.Fatal(err)
	}
	if err := LinuxCheckSerial(vm); err != nil {
		t.Fatalf("before any fault: %v", err)
	}

	if err := LinuxStalePage(ctx, vm, 1000); err != nil {
		t.Fatal(err)
	}
	err := linuxWait(ctx, vm, "QMG CORRUPT page=1000", func(ls []linuxguest.Line) bool {
		for _, l := range ls {
			if l.Kind == linuxguest.KindCorrupt && l.Fields["page"] == "1000" {
				return true
			}
		}
		return false
	})
	if err != nil {
		t.Fatal(err)
	}
	tick, err := LinuxWaitTicks(ctx, vm, 1)
	if err != nil {
		t.Fatal(err)
	}
	if bad, _ := tick.Int("bad"); bad != 1 {
		t.Errorf("TICK counts %d bad pages after one stale page: %s", bad, tick.Text)
	}
	if err := LinuxCheckSerial(vm); err == nil || !strings.Contains(err.Error(), "CORRUPT page=1000") {
		t.Errorf("LinuxCheckSerial after a stale page: %v", err)
	}

	path, err := LinuxSpoilFile(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := LinuxVerifyFiles(ctx, vm); err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "bad=1 ") {
		t.Errorf("checksums after spoiling %s: %v", path, err)
	}
}

// TestBenchLinuxGuest prints the Linux guest's boot figures (QMG_BENCH=1, make bench): for
// each QEMU, the medians over QMG_BENCH_RUNS (5) boots of a 1 GiB guest, without files and
// with LinuxDefaultFilesMiB of them, of the wall time from launch to READY, the guest's
// uptime at READY, and the time a checksum run over the files takes.
func TestBenchLinuxGuest(t *testing.T) {
	if os.Getenv("QMG_BENCH") == "" {
		t.Skip("set QMG_BENCH=1 (make bench) to run the Linux guest benchmark")
	}
	runs := 5
	runs = benchEnv("QMG_BENCH_RUNS", runs)
	type row struct{ wall, uptime, verify []time.Duration }
	med := func(ds []time.Duration) time.Duration {
		if len(ds) == 0 {
			return 0
		}
		return sorted(ds, func(d time.Duration) time.Duration { return d })[len(ds)/2].Round(10 * time.Millisecond)
	}
	var table []string
	for _, files := range []int{0, LinuxDefaultFilesMiB} {
		img := LinuxGuest(t, LinuxOptions{FilesMiB: files})
		for _, v := range Versions {
			q := requireQEMU(t, v)
			var r row
			for i := 0; i < runs; i++ {
				t.Run(fmt.Sprintf("%dMiB/%s/%d", files, v, i), func(t *testing.T) {
					ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
					defer cancel()
					vm, ready, wall := startLinux(ctx, t, img, VMConfig{Name: "linux", QEMU: q})
					up, _ := ready.Float("t")
					r.wall, r.uptime = append(r.wall, wall), append(r.uptime, time.Duration(up*float64(time.Second)))
					if files > 0 {
						start := time.Now()
						if _, err := LinuxVerifyFiles(ctx, vm); err != nil {
							t.Fatal(err)
						}
						r.verify = append(r.verify, time.Since(start))
					}
					vm.Kill()
				})
			}
			table = append(table, fmt.Sprintf("%-6s %4d MiB  %8v  %8v  %8v", v, files, med(r.wall), med(r.uptime), med(r.verify)))
		}
	}
	t.Logf("Linux guest, 1 GiB, TCG, medians of %d boots\nQEMU   files     READY     uptime    checksums\n%s", runs, strings.Join(table, "\n"))
}

// TestLinuxGuestInitFailure: an init that cannot start its workload says why on the console
// and powers the guest off, and the wait for READY fails at once with its message.
func TestLinuxGuestInitFailure(t *testing.T) {
	q := requireQEMU(t, "10.0")
	img := LinuxGuest(t, LinuxOptions{MemMiB: 256, Append: "qmg.rate=fast"})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	vm := StartVM(t, img.VMConfig(t, VMConfig{Name: "linux", QEMU: q}))
	_, err := LinuxWaitReady(ctx, vm)
	if err == nil || !strings.Contains(err.Error(), "QMG ERROR") || !strings.Contains(err.Error(), "qmg.rate=fast") {
		t.Fatalf("LinuxWaitReady: %v", err)
	}
	select {
	case <-vm.Exited():
	case <-ctx.Done():
		t.Fatal("the guest did not power off after its ERROR")
	}
}
