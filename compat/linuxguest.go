package compat

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"hash/maphash"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat/linuxguest"
)

// This file is the host side of the Linux test guest: a real Linux (Debian bookworm's
// kernel, booted with -kernel/-initrd/-append, no disk) whose init is the static Go program
// of compat/linuxguest/init, and whose initramfs also holds an asked-for amount of real
// files (the contents of Debian packages, see install-linux-guest.sh): after boot they sit in
// the rootfs's page cache, i.e. in guest RAM, like the cached files of a real VM. The guest
// can dirty anonymous memory at a chosen rate, checking every page it revisits, and checksums
// its files when asked on its control port (COM2). It reports on COM1 with linuxguest's
// "QMG …" lines, which LinuxWaitReady, LinuxWaitTicks, LinuxVerifyFiles and LinuxCheckSerial
// read.

// LinuxGuestDir is where install-linux-guest.sh puts the kernel and the packages' files, and
// where the initramfs images are cached (build/).
func LinuxGuestDir() string { return filepath.Join(CacheDir(), "linux-guest") }

// LinuxDefaultFilesMiB is the amount of files for a 1 GiB guest with "a few hundred MiB of
// real files in RAM".
const LinuxDefaultFilesMiB = 400

// LinuxOptions configures the Linux test guest.
type LinuxOptions struct {
	// MemMiB is the guest RAM; default 1024.
	MemMiB int
	// FilesMiB is how many MiB of file data the initramfs holds (0: none). Files are taken
	// from the installed packages, alternately from each (the one with the fewest bytes
	// taken goes next), in path order, skipping any file that would overshoot: the same set
	// on every machine with the same package versions.
	FilesMiB int
	// DirtyMiB > 0 runs the dirtying workload over that much anonymous memory.
	DirtyMiB int
	// DirtyRateMiBs is the dirtying rate (pages visited per second × 4 KiB); 0: as fast as
	// the vCPU can.
	DirtyRateMiBs int
	// BodyEvery: every BodyEvery-th visit of a page also checks its whole body; default 32,
	// negative: headers only.
	BodyEvery int
	// VerifyEvery > 0 makes the guest checksum its files periodically (whole seconds) besides
	// on demand.
	VerifyEvery time.Duration
	// Tick is the period of the guest's TICK lines; default 1 s.
	Tick time.Duration
	// Seed varies the dirty region's page pattern.
	Seed uint64
	// KeepInitrdPoison leaves the memory that held the initramfs archive (freed by the kernel
	// once unpacked: about FilesMiB, at the top of RAM) filled with the poison byte 0xcc the
	// kernel writes into it, as on any Linux booted with an initramfs: non-zero pages that
	// QEMU sends whole. By default freed memory is zeroed (init_on_free=1), so that RAM holds
	// the files' pages, the kernel's ~110 MiB, the dirty region, and zero pages.
	KeepInitrdPoison bool
	// Append holds further kernel parameters.
	Append string
}

// LinuxImage is a built Linux guest: what VMConfig needs to boot it.
type LinuxImage struct {
	Options   LinuxOptions // with defaults applied
	Kernel    string       // vmlinuz (-kernel)
	Initrd    string       // the uncompressed newc initramfs (-initrd), cached in LinuxGuestDir()/build
	Append    string       // the whole kernel command line (-append)
	Files     int          // files of the initramfs listed in its manifest
	FileBytes int64        // their bytes
	Packages  string       // the STAMP of install-linux-guest.sh: kernel and package versions
}

// linuxKernelArgs are the kernel parameters of every boot:
//   - console=ttyS0 and quiet: the kernel's warnings and the init's reports on COM1 (the
//     compat launcher's -serial file:), nothing else;
//   - nokaslr, page_alloc.shuffle=0, initramfs_async=0 (unpacking before, not alongside,
//     the other initcalls): the files land at nearly the same physical addresses boot after
//     boot (the LAYOUT lines of two boots differ by a few MiB per 128 MiB at most);
//   - transparent_hugepage=never: the dirty region is 4 KiB pages, never collapsed (moved)
//     by khugepaged;
//   - init_on_alloc=0, cryptomgr.notests: Debian zeroes every page it allocates (the page
//     cache the unpacking then overwrites) and runs the crypto self-tests at boot, both slow
//     under TCG (the self-tests: +1.5-6 s of boot, measured);
//   - mitigations=off: a test guest has nothing to protect from itself;
//   - no_timer_check, nowatchdog: no check that the IO-APIC timer ticks within a few
//     jiffies (it panics the kernel when a busy host does not run the vCPU for a moment,
//     seen here under load) and no soft-lockup reports for the same reason;
//   - 8250.nr_uarts=2: COM1 and the control port COM2 are all there is;
//   - rdinit=/init, rootfstype=ramfs: the rootfs is a ramfs, not the default tmpfs that is
//     capped at half of RAM (400 MiB of files in a 1 GiB guest do not fit in that).
var linuxKernelArgs = []string{
	"console=ttyS0,115200", "quiet",
	"nokaslr", "page_alloc.shuffle=0", "initramfs_async=0", "transparent_hugepage=never",
	"init_on_alloc=0", "cryptomgr.notests", "mitigations=off", "no_timer_check", "nowatchdog",
	"8250.nr_uarts=2",
	"rdinit=/init", "rootfstype=ramfs",
}

// LinuxGuest builds (or takes from the cache) the Linux guest for opt; a missing kernel or
// package set fails the test with the command that installs them.
func LinuxGuest(t testing.TB, opt LinuxOptions) *LinuxImage {
	t.Helper()
	img, err := BuildLinuxGuest(opt)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

var (
	linuxBuildMu sync.Mutex
	linuxInit    struct {
		once sync.Once
		bin  []byte
		err  error
	}
)

// BuildLinuxGuest is LinuxGuest for callers without a testing.TB (benchmark commands).
func BuildLinuxGuest(opt LinuxOptions) (*LinuxImage, error) {
	if opt.MemMiB == 0 {
		opt.MemMiB = 1024
	}
	if opt.BodyEvery == 0 {
		opt.BodyEvery = 32
	}
	if opt.Tick == 0 {
		opt.Tick = time.Second
	}
	switch {
	case opt.FilesMiB < 0 || opt.DirtyMiB < 0 || opt.DirtyRateMiBs < 0 || opt.VerifyEvery < 0 || opt.Tick < 0:
		return nil, fmt.Errorf("linux guest: negative option in %+v", opt)
	case opt.DirtyMiB > linuxguest.MaxDirtyMiB || opt.DirtyRateMiBs > linuxguest.MaxRateMiBs:
		return nil, fmt.Errorf("linux guest: DirtyMiB and DirtyRateMiBs are capped at %d", linuxguest.MaxDirtyMiB)
	case opt.Tick < 10*time.Millisecond || opt.Tick > linuxguest.MaxTickMs*time.Millisecond:
		return nil, fmt.Errorf("linux guest: Tick %v outside [10ms, %v]", opt.Tick, linuxguest.MaxTickMs*time.Millisecond)
	case opt.VerifyEvery > linuxguest.MaxVerify*time.Second:
		return nil, fmt.Errorf("linux guest: VerifyEvery %v is more than %v", opt.VerifyEvery, linuxguest.MaxVerify*time.Second)
	// Booting needs the archive (~5% larger than its files) and its unpacked copy (~10%
	// larger: small files waste the rest of their last page) at once, then the copy and the
	// dirty region; the kernel and init take ~100 MiB.
	case linuxBootMiB(opt.FilesMiB) > opt.MemMiB:
		return nil, fmt.Errorf("linux guest: %d MiB of files need at least %d MiB of RAM to boot (the archive and its unpacked copy), not %d",
			opt.FilesMiB, linuxBootMiB(opt.FilesMiB), opt.MemMiB)
	case opt.FilesMiB*11/10+opt.DirtyMiB+linuxOverheadMiB > opt.MemMiB:
		return nil, fmt.Errorf("linux guest: %d MiB of files and a %d MiB dirty region need at least %d MiB of RAM, not %d",
			opt.FilesMiB, opt.DirtyMiB, opt.FilesMiB*11/10+opt.DirtyMiB+linuxOverheadMiB, opt.MemMiB)
	}
	dir := LinuxGuestDir()
	stamp, err := os.ReadFile(filepath.Join(dir, "STAMP"))
	kernel := filepath.Join(dir, "kernel", "vmlinuz")
	if err == nil {
		_, err = os.Stat(kernel)
	}
	if err != nil {
		return nil, fmt.Errorf("linux guest: the kernel and packages are not installed in %s (run compat/install-linux-guest.sh): %v", dir, err)
	}
	linuxInit.once.Do(func() { linuxInit.bin, linuxInit.err = buildLinuxInit() })
	if linuxInit.err != nil {
		return nil, linuxInit.err
	}
	img := &LinuxImage{Options: opt, Kernel: kernel, Packages: strings.TrimSpace(string(stamp))}
	body := opt.BodyEvery
	if body < 0 {
		body = 0
	}
	gopt := linuxguest.Options{DirtyMiB: opt.DirtyMiB, RateMiBs: opt.DirtyRateMiBs, TickMs: int(opt.Tick / time.Millisecond),
		VerifySec: int((opt.VerifyEvery + time.Second - 1) / time.Second), BodyEvery: body, Seed: opt.Seed, Control: "ttyS1"}
	args := append([]string{}, linuxKernelArgs...)
	if !opt.KeepInitrdPoison {
		args = append(args, "init_on_free=1")
	}
	img.Append = strings.Join(append(args, gopt.Cmdline()), " ")
	if opt.Append != "" {
		img.Append += " " + opt.Append
	}

	// The initramfs depends on the init, the packages and the amount of files only.
	h := sha256.New()
	fmt.Fprintf(h, "qmg-initramfs 1\n%s\n%d\n", stamp, opt.FilesMiB)
	h.Write(linuxInit.bin)
	key := hex.EncodeToString(h.Sum(nil))[:16]
	prefix := filepath.Join(dir, "build", fmt.Sprintf("initramfs-%dm-", opt.FilesMiB))
	img.Initrd = prefix + key + ".cpio"
	info := img.Initrd + ".info"
	linuxBuildMu.Lock()
	defer linuxBuildMu.Unlock()
	if b, err := os.ReadFile(info); err == nil {
		if _, err := fmt.Sscanf(string(b), "%d %d", &img.Files, &img.FileBytes); err == nil {
			if _, err := os.Stat(img.Initrd); err == nil {
				return img, nil
			}
		}
	}
	if err := os.MkdirAll(filepath.Dir(img.Initrd), 0o755); err != nil {
		return nil, err
	}
	files, err := pickLinuxFiles(filepath.Join(dir, "files"), int64(opt.FilesMiB)<<20)
	if err != nil {
		return nil, err
	}
	// Images of the same size built from another init or other packages are out of date.
	if old, _ := filepath.Glob(prefix + "*.cpio*"); len(old) > 0 {
		for _, f := range old {
			os.Remove(f)
		}
	}
	n, total, err := writeInitramfs(img.Initrd, linuxInit.bin, files)
	if err != nil {
		return nil, err
	}
	img.Files, img.FileBytes = n, total
	if err := os.WriteFile(info, fmt.Appendf(nil, "%d %d\n", n, total), 0o644); err != nil {
		return nil, err
	}
	return img, nil
}

// linuxBootMiB is the RAM a guest with filesMiB of files needs to unpack its initramfs.
func linuxBootMiB(filesMiB int) int { return filesMiB*21/20 + filesMiB*11/10 + linuxOverheadMiB }

// linuxOverheadMiB is what the kernel, its allocations and init need besides files and the
// dirty region (the cloud kernel leaves ~960 of 1024 MiB free before init starts).
const linuxOverheadMiB = 100

// buildLinuxInit builds compat/linuxguest/init as a static linux/amd64 binary with the go
// command (from PATH, else the running toolchain's) and returns it.
func buildLinuxInit() ([]byte, error) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		gobin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out := filepath.Join(LinuxGuestDir(), "build", fmt.Sprintf("init.%d.tmp", os.Getpid()))
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return nil, err
	}
	defer os.Remove(out)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, gobin, "build", "-trimpath", "-ldflags=-s -w", "-o", out, "./compat/linuxguest/init")
	cmd.Dir = RepoRoot()
	cmd.Env = append(os.Environ(), "GOOS=linux", "GOARCH=amd64", "CGO_ENABLED=0")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("linux guest: building its init: %v: %s", err, msg)
	}
	return os.ReadFile(out)
}

// linuxFile is one file picked for the initramfs.
type linuxFile struct {
	src  string // path on the host
	name string // path in the guest, below /
	size int64
	mode fs.FileMode
}

// pickLinuxFiles takes up to limit bytes of regular files from the package folders below
// root (see LinuxOptions.FilesMiB), each named data/PACKAGE/PATH in the guest.
func pickLinuxFiles(root string, limit int64) ([]linuxFile, error) {
	if limit == 0 {
		return nil, nil
	}
	pkgs, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("linux guest: %v (run compat/install-linux-guest.sh)", err)
	}
	type pkg struct {
		files []linuxFile
		taken int64
	}
	var all []*pkg
	var avail int64
	for _, d := range pkgs {
		if !d.IsDir() {
			continue
		}
		p := &pkg{}
		base := filepath.Join(root, d.Name())
		err := filepath.WalkDir(base, func(path string, e fs.DirEntry, err error) error {
			if err != nil || !e.Type().IsRegular() {
				return err
			}
			fi, err := e.Info()
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(base, path)
			name := "data/" + d.Name() + "/" + filepath.ToSlash(rel)
			if len(name)+1 >= linuxguest.MaxNameLen || strings.ContainsAny(name, "\n\r\x00") || fi.Size() > linuxguest.MaxFileSize {
				return nil // cannot be archived or listed: leave it out
			}
			p.files = append(p.files, linuxFile{src: path, name: name, size: fi.Size(), mode: fi.Mode().Perm()})
			avail += fi.Size()
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("linux guest: listing %s: %v", base, err)
		}
		all = append(all, p)
	}
	if avail < limit {
		return nil, fmt.Errorf("linux guest: %d MiB of files asked for, the packages in %s hold %d MiB", limit>>20, root, avail>>20)
	}
	var picked []linuxFile
	var total int64
	for {
		var next *pkg
		for _, p := range all { // the package with the fewest bytes taken, first in name order on ties
			if len(p.files) > 0 && (next == nil || p.taken < next.taken) {
				next = p
			}
		}
		if next == nil {
			break
		}
		f := next.files[0]
		next.files = next.files[1:]
		if total+f.size > limit {
			continue
		}
		picked = append(picked, f)
		next.taken += f.size
		total += f.size
	}
	return picked, nil
}

// writeInitramfs writes the initramfs to path (through a temporary file renamed into place):
// the directories init needs, /dev/console, /init, the files with their parent directories,
// and the manifest of their CRC-32C checksums (computed while copying them).
func writeInitramfs(path string, initBin []byte, files []linuxFile) (n int, total int64, err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*.tmp")
	if err != nil {
		return 0, 0, err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	w := linuxguest.NewWriter(tmp)
	const mtime = 1700000000 // fixed: the archive is the same bytes for the same inputs
	dirs := map[string]bool{}
	mkdir := func(name string) error {
		var err error
		for i := 0; i <= len(name) && err == nil; i++ {
			if i < len(name) && name[i] != '/' {
				continue
			}
			if d := name[:i]; !dirs[d] {
				dirs[d] = true
				err = w.WriteHeader(&linuxguest.Header{Name: d, Mode: linuxguest.ModeDir | 0o755, Mtime: mtime})
			}
		}
		return err
	}
	for _, d := range []string{"dev", "proc", "sys", "qmg", "data"} {
		if err := mkdir(d); err != nil {
			return 0, 0, err
		}
	}
	if err := w.WriteHeader(&linuxguest.Header{Name: "dev/console", Mode: linuxguest.ModeCharDev | 0o600, Major: 5, Minor: 1, Mtime: mtime}); err != nil {
		return 0, 0, err
	}
	if err := w.WriteHeader(&linuxguest.Header{Name: "init", Mode: linuxguest.ModeRegular | 0o755, Size: int64(len(initBin)), Mtime: mtime}); err != nil {
		return 0, 0, err
	}
	if _, err := w.Write(initBin); err != nil {
		return 0, 0, err
	}
	entries := make([]linuxguest.Entry, 0, len(files))
	for _, f := range files {
		if err := mkdir(f.name[:strings.LastIndexByte(f.name, '/')]); err != nil {
			return 0, 0, err
		}
		crc, err := copyLinuxFile(w, f)
		if err != nil {
			return 0, 0, err
		}
		entries = append(entries, linuxguest.Entry{Path: f.name, Size: f.size, CRC: crc})
		total += f.size
	}
	var man strings.Builder
	if err := linuxguest.WriteManifest(&man, entries); err != nil {
		return 0, 0, err
	}
	if err := w.WriteHeader(&linuxguest.Header{Name: linuxguest.ManifestPath, Mode: linuxguest.ModeRegular | 0o644, Size: int64(man.Len()), Mtime: mtime}); err != nil {
		return 0, 0, err
	}
	if _, err := io.WriteString(w, man.String()); err != nil {
		return 0, 0, err
	}
	if err := w.Close(); err != nil {
		return 0, 0, err
	}
	if err := tmp.Chmod(0o644); err != nil { // CreateTemp's 0600: let a QEMU of another user read it
		return 0, 0, err
	}
	if err := tmp.Close(); err != nil {
		return 0, 0, err
	}
	return len(entries), total, os.Rename(tmp.Name(), path)
}

func copyLinuxFile(w *linuxguest.Writer, f linuxFile) (uint32, error) {
	src, err := os.Open(f.src)
	if err != nil {
		return 0, err
	}
	defer src.Close()
	mode := uint32(f.mode&0o777) | 0o400 // readable by init whatever the package said
	if err := w.WriteHeader(&linuxguest.Header{Name: f.name, Mode: linuxguest.ModeRegular | mode, Size: f.size, Mtime: 1700000000}); err != nil {
		return 0, err
	}
	crc := crc32.New(linuxguest.Castagnoli)
	n, err := io.Copy(io.MultiWriter(w, crc), src)
	if err == nil && n != f.size {
		err = fmt.Errorf("linux guest: %s changed size while archived (%d, listed %d)", f.src, n, f.size)
	}
	return crc.Sum32(), err
}

// LinuxFilePages is the set of an image's file pages: every distinct, not all-zero 4 KiB page
// of its files' contents as the guest's page cache holds them (a file's last page filled up
// with zeros). It finds the files in a RAM dump without the guest's help.
type LinuxFilePages struct {
	seed  maphash.Seed
	pages map[uint64]struct{}
}

// FilePages reads the image's initramfs and returns its file pages.
func (img *LinuxImage) FilePages() (*LinuxFilePages, error) {
	f, err := os.Open(img.Initrd)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fp := &LinuxFilePages{seed: maphash.MakeSeed(), pages: map[uint64]struct{}{}}
	r := linuxguest.NewReader(f)
	page := make([]byte, GuestPageSize)
	for {
		h, err := r.Next()
		if err == io.EOF {
			return fp, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", img.Initrd, err)
		}
		if h.Mode&linuxguest.ModeType != linuxguest.ModeRegular || !strings.HasPrefix(h.Name, "data/") {
			continue
		}
		for {
			n, err := io.ReadFull(r, page)
			if n == 0 {
				break
			}
			clear(page[n:])
			if !isZeroPage(page) {
				fp.pages[maphash.Bytes(fp.seed, page)] = struct{}{}
			}
			if err != nil {
				break
			}
		}
	}
}

// Len is the number of distinct pages.
func (fp *LinuxFilePages) Len() int { return len(fp.pages) }

// Find returns how many of the distinct pages a RAM dump of size bytes holds, at any
// page-aligned address.
func (fp *LinuxFilePages) Find(dump io.ReaderAt, size int64) (int, error) {
	seen := make(map[uint64]struct{}, len(fp.pages))
	buf := make([]byte, memcheckChunk)
	for off := int64(0); off < size; off += memcheckChunk {
		chunk := buf[:min(memcheckChunk, size-off)]
		if err := memcheckRead(dump, chunk, off); err != nil {
			return 0, fmt.Errorf("file pages: %w", err)
		}
		for p := 0; p+GuestPageSize <= len(chunk); p += GuestPageSize {
			h := maphash.Bytes(fp.seed, chunk[p:p+GuestPageSize])
			if _, ok := fp.pages[h]; ok {
				seen[h] = struct{}{}
			}
		}
	}
	return len(seen), nil
}

func isZeroPage(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// VMConfig returns cfg set up to boot the image: its RAM size, -kernel, -initrd and -append,
// and the control port (COM2: a unix-socket chardev in a fresh folder removed when the test
// ends). Source and destination of a migration each get their own VMConfig call (their own
// control socket) with the same image.
func (img *LinuxImage) VMConfig(t testing.TB, cfg VMConfig) VMConfig {
	t.Helper()
	dir, err := os.MkdirTemp("", "qmg-linux-") // short: a unix socket path has 107 bytes at most
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.MemMiB = img.Options.MemMiB
	cfg.Disk = nil
	cfg.Extra = append(append([]string{}, cfg.Extra...),
		"-kernel", img.Kernel, "-initrd", img.Initrd, "-append", img.Append,
		"-chardev", "socket,id="+linuxControlID+",path="+filepath.Join(dir, "ctl.sock")+",server=on,wait=off",
		"-device", "isa-serial,chardev="+linuxControlID+",index=1")
	return cfg
}

// linuxControlID is the chardev id of the control port.
const linuxControlID = "qmgctl"

// linuxControlPath finds the control socket in a VM's arguments.
func linuxControlPath(vm *VM) (string, error) {
	for _, a := range vm.Config.Extra {
		if rest, ok := strings.CutPrefix(a, "socket,id="+linuxControlID+",path="); ok {
			p, _, _ := strings.Cut(rest, ",")
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: not a Linux guest VM (no control port; use LinuxImage.VMConfig)", vm.Config.Name)
}

// LinuxLines returns the guest's reports on the VM's serial console so far.
func LinuxLines(vm *VM) []linuxguest.Line { return linuxguest.ParseLines(vm.Serial()) }

// linuxFailure returns the first sign in serial output that the guest failed: an ERROR line,
// or a kernel panic or oops.
func linuxFailure(out string) string {
	// Only whole lines: the console may be read while init is still writing its ERROR line,
	// and a cut-off message would hide the cause.
	whole := out[:strings.LastIndexByte(out, '\n')+1]
	for _, l := range linuxguest.ParseLines(whole) {
		if l.Kind == linuxguest.KindError {
			return l.Text
		}
	}
	// Not "BUG:": a host too busy to run the vCPU can make a guest report a soft lockup.
	for _, s := range []string{"Kernel panic", "Oops: ", "general protection fault"} {
		if i := strings.Index(out, s); i >= 0 {
			line, _, _ := strings.Cut(out[i:], "\n")
			return line
		}
	}
	return ""
}

// errLinuxFailed ends a wait when the guest reported its own failure.
var errLinuxFailed = errors.New("linux guest failed")

// linuxWait waits until the guest's reports satisfy ok, failing at once on a guest failure.
func linuxWait(ctx context.Context, vm *VM, what string, ok func([]linuxguest.Line) bool) error {
	var failed string
	err := vm.WaitSerial(ctx, what, func(out string) bool {
		if failed = linuxFailure(out); failed != "" {
			return true
		}
		return ok(linuxguest.ParseLines(out))
	})
	if err != nil && failed == "" {
		failed = linuxFailure(vm.Serial()) // e.g. init powered the guest off after its ERROR
	}
	if failed != "" {
		return fmt.Errorf("%s: %w waiting for %s: %s", vm.Config.Name, errLinuxFailed, what, failed)
	}
	return err
}

// LinuxWaitReady waits for the guest's READY line (files in RAM, dirty region filled) and
// returns it.
func LinuxWaitReady(ctx context.Context, vm *VM) (linuxguest.Line, error) {
	var ready linuxguest.Line
	err := linuxWait(ctx, vm, "QMG READY", func(ls []linuxguest.Line) bool {
		for _, l := range ls {
			if l.Kind == linuxguest.KindReady {
				ready = l
				return true
			}
		}
		return false
	})
	return ready, err
}

func countKind(ls []linuxguest.Line, kind string) (int, linuxguest.Line) {
	var n int
	var last linuxguest.Line
	for _, l := range ls {
		if l.Kind == kind {
			n++
			last = l
		}
	}
	return n, last
}

// LinuxWaitTicks waits until the guest has printed n more TICK lines than it had at the call
// (it runs) and returns the last one.
func LinuxWaitTicks(ctx context.Context, vm *VM, n int) (linuxguest.Line, error) {
	start, _ := countKind(LinuxLines(vm), linuxguest.KindTick)
	var last linuxguest.Line
	err := linuxWait(ctx, vm, fmt.Sprintf("%d more QMG TICK", n), func(ls []linuxguest.Line) bool {
		var have int
		have, last = countKind(ls, linuxguest.KindTick)
		return have >= start+n
	})
	return last, err
}

var linuxSeq atomic.Int64

// linuxCommand sends a control-port command with a fresh sequence number and waits for the
// report of the given kind carrying it.
func linuxCommand(ctx context.Context, vm *VM, kind, format string, args ...any) (linuxguest.Line, error) {
	path, err := linuxControlPath(vm)
	if err != nil {
		return linuxguest.Line{}, err
	}
	seq := strconv.FormatInt(linuxSeq.Add(1), 10)
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return linuxguest.Line{}, fmt.Errorf("%s: control port: %w", vm.Config.Name, err)
	}
	defer c.Close() // only once the reply is there: closing drops what QEMU has not read yet
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	cmd := fmt.Sprintf(format, args...) + " " + seq
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return linuxguest.Line{}, fmt.Errorf("%s: control port: %w", vm.Config.Name, err)
	}
	var reply linuxguest.Line
	err = linuxWait(ctx, vm, fmt.Sprintf("QMG %s seq=%s", kind, seq), func(ls []linuxguest.Line) bool {
		for _, l := range ls {
			if l.Kind == kind && l.Fields["seq"] == seq {
				reply = l
				return true
			}
			if l.Kind == linuxguest.KindControl && l.Fields["seq"] == seq {
				reply = l
				return true
			}
		}
		return false
	})
	if err == nil && reply.Kind == linuxguest.KindControl {
		err = fmt.Errorf("%s: the guest did not take %q: %s", vm.Config.Name, cmd, reply.Text)
	}
	return reply, err
}

// LinuxVerifyFiles makes the guest checksum all its files now and returns its FILES line; a
// BAD result is an error naming the first bad file.
func LinuxVerifyFiles(ctx context.Context, vm *VM) (linuxguest.Line, error) {
	l, err := linuxCommand(ctx, vm, linuxguest.KindFiles, "verify")
	if err == nil && l.Word != "OK" {
		err = fmt.Errorf("%s: file check failed: %s", vm.Config.Name, l.Text)
	}
	return l, err
}

// LinuxSetRate changes the dirtying rate of a guest running the workload (0: unlimited).
func LinuxSetRate(ctx context.Context, vm *VM, mibs int) error {
	_, err := linuxCommand(ctx, vm, linuxguest.KindRate, "rate %d", mibs)
	return err
}

// LinuxStalePage makes the guest put page n of its dirty region back to an older generation
// (fault injection: what a migration that missed a dirty page leaves behind); its dirtier
// then reports the page CORRUPT, which LinuxCheckSerial turns into an error.
func LinuxStalePage(ctx context.Context, vm *VM, n int) error {
	_, err := linuxCommand(ctx, vm, linuxguest.KindInjected, "stale %d", n)
	return err
}

// LinuxSpoilFile makes the guest flip a byte of one of its files (fault injection) and
// returns the file's path; the next LinuxVerifyFiles fails naming it.
func LinuxSpoilFile(ctx context.Context, vm *VM) (string, error) {
	l, err := linuxCommand(ctx, vm, linuxguest.KindInjected, "spoil")
	return l.Fields["path"], err
}

// LinuxCheckSerial returns an error for any sign of trouble in the guest's output so far: a
// CORRUPT page, a FILES BAD, a TICK counting bad pages, an ERROR, a kernel panic or oops.
func LinuxCheckSerial(vm *VM) error {
	out := vm.Serial()
	if f := linuxFailure(out); f != "" {
		return fmt.Errorf("%s: %s", vm.Config.Name, f)
	}
	var bad []string
	for _, l := range linuxguest.ParseLines(out) {
		n, _ := l.Int("bad")
		switch {
		case l.Kind == linuxguest.KindCorrupt,
			l.Kind == linuxguest.KindFiles && l.Word != "OK",
			l.Kind == linuxguest.KindTick && n > 0:
			bad = append(bad, l.Text)
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("%s: %d bad report(s), first: %s", vm.Config.Name, len(bad), bad[0])
	}
	return nil
}
