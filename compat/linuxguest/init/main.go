//go:build linux

// Command init is PID 1 of the compat suite's Linux test guest: a static program the kernel
// runs from the initramfs. It mounts /proc, /sys and /dev, reads its workload from the
// kernel command line (linuxguest.Options), allocates and fills the dirty region, prints
// READY on the console (COM1), then runs the workload — nothing, or dirtying the region at
// the asked rate while checking every page it revisits — printing a TICK line every tick.
// Files are checksummed against the manifest on demand: "verify SEQ" on the control port
// (COM2), or every qmg.verify seconds. Reports are linuxguest's "QMG …" lines.
//
// Built by the compat suite with GOOS=linux GOARCH=amd64 CGO_ENABLED=0.
package main

import (
	"bufio"
	"bytes"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat/linuxguest"
	"golang.org/x/sys/unix"
)

var (
	outMu sync.Mutex
	out   = os.Stdout // the kernel opened /dev/console (console=ttyS0) as fds 0-2
)

// report prints one QMG line with a single write.
func report(kind, format string, args ...any) {
	line := linuxguest.LinePrefix + kind
	if format != "" {
		line += " " + fmt.Sprintf(format, args...)
	}
	outMu.Lock()
	defer outMu.Unlock()
	out.WriteString(line + "\n")
}

// fatal reports the error and powers the guest off (PID 1 must not exit: the kernel would
// panic), so that the host sees QEMU end right after the ERROR line.
func fatal(format string, args ...any) {
	msg := strings.ReplaceAll(fmt.Sprintf(format, args...), "\n", " ")
	report(linuxguest.KindError, "msg=%q", msg)
	time.Sleep(200 * time.Millisecond) // let the UART drain
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

func main() {
	defer func() {
		if r := recover(); r != nil {
			fatal("panic: %v: %s", r, bytes.ReplaceAll(debug.Stack(), []byte("\n"), []byte(" | ")))
		}
	}()
	for _, m := range []struct{ src, dir, fs string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
	} {
		os.MkdirAll(m.dir, 0o755)
		if err := unix.Mount(m.src, m.dir, m.fs, 0, ""); err != nil && err != unix.EBUSY {
			fatal("mount %s: %v", m.dir, err)
		}
	}
	var uts unix.Utsname
	unix.Uname(&uts)
	report(linuxguest.KindBoot, "t=%.2f kernel=%s go=%s", uptime(), unix.ByteSliceToString(uts.Release[:]), runtime.Version())

	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		fatal("read /proc/cmdline: %v", err)
	}
	opt, err := linuxguest.ParseCmdline(string(cmdline))
	if err != nil {
		fatal("%v", err)
	}
	files, err := loadManifest()
	if err != nil {
		fatal("%v", err)
	}
	var d *dirtier
	if opt.DirtyMiB > 0 {
		if d, err = newDirtier(opt); err != nil {
			fatal("%v", err)
		}
	}
	// The control port is opened (and put in raw mode) before READY: the UART drops what
	// arrives while the tty is closed, and the host may send a command as soon as it sees READY.
	var ctl *os.File
	if opt.Control != "" {
		ctl = openControl("/dev/" + opt.Control)
	}
	mem := meminfo()
	initrdAddr, initrdSize := initrd()
	layout()
	report(linuxguest.KindReady, "t=%.2f files=%d bytes=%d mem_total_kib=%d mem_free_kib=%d cached_kib=%d initrd=%#x initrd_bytes=%d dirty_mib=%d rate_mibs=%d",
		uptime(), len(files.entries), files.bytes, mem["MemTotal"], mem["MemFree"], mem["Cached"],
		initrdAddr, initrdSize, opt.DirtyMiB, opt.RateMiBs)

	if ctl != nil {
		go control(ctl, files, d)
	}
	if opt.VerifySec > 0 {
		go func() {
			for seq := int64(1); ; seq++ {
				time.Sleep(time.Duration(opt.VerifySec) * time.Second)
				files.verify(-seq) // negative: periodic, not asked for
			}
		}()
	}
	tick := time.Duration(opt.TickMs) * time.Millisecond
	if d == nil {
		for seq := 1; ; seq++ {
			time.Sleep(tick)
			report(linuxguest.KindTick, "seq=%d t=%.2f pages=0 pass=0 rate_mibs=0.0 bad=0", seq, uptime())
		}
	}
	d.run(tick)
}

// uptime is the first field of /proc/uptime (seconds since boot), 0 if unreadable.
func uptime() float64 {
	b, _ := os.ReadFile("/proc/uptime")
	f, _ := strconv.ParseFloat(strings.Fields(string(b) + " 0")[0], 64)
	return f
}

// meminfo returns /proc/meminfo in KiB by name.
func meminfo() map[string]int64 {
	m := map[string]int64{}
	b, _ := os.ReadFile("/proc/meminfo")
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if f := strings.Fields(v); ok && len(f) > 0 {
			m[k], _ = strconv.ParseInt(f[0], 10, 64)
		}
	}
	return m
}

// initrd returns where the boot loader (QEMU) put the initramfs, from the boot parameters
// (setup header: ramdisk_image at 0x218, ramdisk_size at 0x21c; their high halves at 0xc0 and
// 0xc4). The kernel freed that memory after unpacking, filled with its poison byte 0xcc (then
// zeroed, with init_on_free=1).
func initrd() (addr, size uint64) {
	b, err := os.ReadFile("/sys/kernel/boot_params/data")
	if err != nil || len(b) < 0x220 {
		return 0, 0
	}
	le := func(o int) uint64 { return uint64(b[o]) | uint64(b[o+1])<<8 | uint64(b[o+2])<<16 | uint64(b[o+3])<<24 }
	return le(0x218) | le(0xc0)<<32, le(0x21c) | le(0xc4)<<32
}

// layout prints, per 128 MiB of guest-physical memory, how many MiB are file pages (the
// initramfs files in the rootfs's page cache: on an LRU list, not anonymous) and how
// many anonymous (the dirty region, init's heap), from /proc/kpageflags (one 64-bit flag word
// per page frame). The rest is the kernel, its allocations and free memory.
func layout() {
	const (
		kpfLRU      = 1 << 5
		kpfAnon     = 1 << 12
		regionPages = 128 << 20 / linuxguest.PageSize
	)
	f, err := os.Open("/proc/kpageflags")
	if err != nil {
		return
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	var w [8]byte
	for base := uint64(0); ; base += regionPages {
		var file, anon, present int
		for i := 0; i < regionPages; i++ {
			if _, err := io.ReadFull(r, w[:]); err != nil {
				if present > 0 || i > 0 {
					report(linuxguest.KindLayout, "from=%#x mib=%d files_mib=%.1f anon_mib=%.1f", base*linuxguest.PageSize, i*linuxguest.PageSize>>20, mib(file), mib(anon))
				}
				return
			}
			fl := uint64(w[0]) | uint64(w[1])<<8 | uint64(w[2])<<16 | uint64(w[3])<<24 | uint64(w[4])<<32 | uint64(w[5])<<40 | uint64(w[6])<<48 | uint64(w[7])<<56
			present++
			switch {
			case fl&kpfAnon != 0:
				anon++
			case fl&kpfLRU != 0:
				file++
			}
		}
		report(linuxguest.KindLayout, "from=%#x mib=%d files_mib=%.1f anon_mib=%.1f", base*linuxguest.PageSize, 128, mib(file), mib(anon))
	}
}

func mib(pages int) float64 { return float64(pages) * linuxguest.PageSize / (1 << 20) }

// fileSet is the manifest and the checksum runs over it.
type fileSet struct {
	mu      sync.Mutex // one run at a time
	entries []linuxguest.Entry
	bytes   int64
	buf     []byte
}

func loadManifest() (*fileSet, error) {
	f, err := os.Open("/" + linuxguest.ManifestPath)
	if err != nil {
		return nil, fmt.Errorf("the initramfs has no manifest: %v", err)
	}
	defer f.Close()
	entries, err := linuxguest.ParseManifest(f)
	if err != nil {
		return nil, err
	}
	fs := &fileSet{entries: entries, buf: make([]byte, 256<<10)}
	for _, e := range entries {
		fs.bytes += e.Size
	}
	return fs, nil
}

// verify checksums every file of the manifest and reports FILES OK or BAD with seq.
func (fs *fileSet) verify(seq int64) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	start := time.Now()
	var bad int
	var first string
	var total int64
	for _, e := range fs.entries {
		sum, n, err := fs.sum("/" + e.Path)
		total += n
		if err == nil && (n != e.Size || sum != e.CRC) {
			err = fmt.Errorf("%d bytes crc32c %08x, want %d bytes %08x", n, sum, e.Size, e.CRC)
		}
		if err != nil {
			bad++
			if first == "" {
				first = fmt.Sprintf("%q:%q", e.Path, err.Error())
			}
		}
	}
	ms := time.Since(start).Milliseconds()
	if bad == 0 {
		report(linuxguest.KindFiles, "OK seq=%d files=%d bytes=%d ms=%d", seq, len(fs.entries), total, ms)
		return
	}
	report(linuxguest.KindFiles, "BAD seq=%d files=%d bad=%d bytes=%d ms=%d first=%s", seq, len(fs.entries), bad, total, ms, first)
}

func (fs *fileSet) sum(path string) (uint32, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	var crc uint32
	var n int64
	for {
		m, err := f.Read(fs.buf)
		crc = crc32.Update(crc, linuxguest.Castagnoli, fs.buf[:m])
		n += int64(m)
		if err == io.EOF {
			return crc, n, nil
		}
		if err != nil {
			return crc, n, err
		}
	}
}

// spoil flips one byte of the first non-empty file, in the middle.
func (fs *fileSet) spoil() (string, error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	for _, e := range fs.entries {
		if e.Size == 0 {
			continue
		}
		f, err := os.OpenFile("/"+e.Path, os.O_RDWR, 0)
		if err != nil {
			return "", err
		}
		defer f.Close()
		var b [1]byte
		if _, err := f.ReadAt(b[:], e.Size/2); err != nil {
			return "", err
		}
		b[0] ^= 0xff
		_, err = f.WriteAt(b[:], e.Size/2)
		return e.Path, err
	}
	return "", fmt.Errorf("no file to spoil")
}

// openControl opens the control port in raw mode (cfmakeraw: no echo, no line editing, no
// translation, 8 bits); nil, after a CTL BAD line, if it cannot.
func openControl(dev string) *os.File {
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		report(linuxguest.KindControl, "BAD msg=%q", "open "+dev+": "+err.Error())
		return nil
	}
	t, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	if err == nil {
		t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
		t.Oflag &^= unix.OPOST
		t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
		t.Cflag &^= unix.CSIZE | unix.PARENB
		t.Cflag |= unix.CS8
		t.Cc[unix.VMIN], t.Cc[unix.VTIME] = 1, 0
		err = unix.IoctlSetTermios(int(f.Fd()), unix.TCSETS, t)
	}
	if err != nil {
		report(linuxguest.KindControl, "BAD msg=%q", "raw mode on "+dev+": "+err.Error())
	}
	return f
}

// control serves the control port: one command per line.
//
//	verify SEQ   checksum the files now; reply FILES OK|BAD seq=SEQ
//	rate N SEQ   dirty at N MiB/s from now on (0: as fast as possible); reply RATE seq=SEQ
//	stale N SEQ  fault injection: put page N of the dirty region back to the generation before
//	             the one it holds (what a migration that missed a dirty page leaves); the
//	             dirtier reports it CORRUPT when it next visits it; reply INJECTED seq=SEQ
//	spoil SEQ    fault injection: flip a byte in the middle of the first non-empty file; the
//	             next verify reports it BAD; reply INJECTED seq=SEQ
func control(f *os.File, fs *fileSet, d *dirtier) {
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 256), 256)
	for sc.Scan() {
		w := strings.Fields(sc.Text())
		switch {
		case len(w) == 0:
		case w[0] == "verify" && len(w) == 2 && isInt(w[1]):
			seq, _ := strconv.ParseInt(w[1], 10, 64)
			fs.verify(seq)
		case w[0] == "rate" && len(w) == 3 && isInt(w[1]) && isInt(w[2]) && d != nil:
			r, _ := strconv.Atoi(w[1])
			if r > linuxguest.MaxRateMiBs {
				r = linuxguest.MaxRateMiBs
			}
			d.rate.Store(int64(r))
			report(linuxguest.KindRate, "seq=%s rate_mibs=%d", w[2], r)
		case w[0] == "stale" && len(w) == 3 && isInt(w[1]) && isInt(w[2]) && d != nil:
			page, _ := strconv.ParseUint(w[1], 10, 64)
			seq := w[2]
			d.inject <- func() {
				i := page % d.pages
				p := d.page(i)
				if gen := p[linuxguest.WordGen]; gen > 0 {
					linuxguest.FillPage(p, d.seed, i, gen-1)
				} else {
					clear(p) // never rewritten yet: a page that was not sent at all
				}
				report(linuxguest.KindInjected, "seq=%s what=stale page=%d", seq, i)
			}
		case w[0] == "spoil" && len(w) == 2 && isInt(w[1]):
			if path, err := fs.spoil(); err != nil {
				report(linuxguest.KindControl, "BAD seq=%s msg=%q", w[1], err.Error())
			} else {
				report(linuxguest.KindInjected, "seq=%s what=spoil path=%s", w[1], path)
			}
		default: // the host puts the sequence number last
			report(linuxguest.KindControl, "BAD seq=%s cmd=%q", w[len(w)-1], w[0])
		}
	}
	report(linuxguest.KindControl, "BAD msg=%q", fmt.Sprintf("control port closed: %v", sc.Err()))
}

func isInt(s string) bool {
	_, err := strconv.ParseInt(s, 10, 64)
	return err == nil
}

// dirtier owns the dirty region: anonymous memory outside Go's heap, filled with the page
// pattern at generation 0. Pass p (from 1) visits every page in address order, checks that
// it holds generation p-1 (the whole body too, every BodyEvery-th pass of each page), and
// writes generation p into its header: one dirtied page per visit.
type dirtier struct {
	mem       []uint64
	pages     uint64
	seed      uint64
	bodyEvery uint64
	rate      atomic.Int64 // MiB/s; 0: unlimited
	inject    chan func()  // faults to make between two chunks of visits (control port)

	pass, next uint64 // current pass (from 1) and the next page it visits
	visited    uint64 // pages visited since READY
	bad        uint64 // pages found wrong (and rewritten)
}

// maxCorruptLines caps the CORRUPT lines (the TICK lines keep counting bad pages).
const maxCorruptLines = 20

func newDirtier(opt linuxguest.Options) (*dirtier, error) {
	size := opt.DirtyMiB << 20
	b, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
	if err != nil {
		return nil, fmt.Errorf("allocating the %d MiB dirty region: %v", opt.DirtyMiB, err)
	}
	d := &dirtier{mem: unsafe.Slice((*uint64)(unsafe.Pointer(&b[0])), size/8), pages: uint64(size / linuxguest.PageSize),
		seed: opt.Seed, bodyEvery: uint64(opt.BodyEvery), pass: 1, inject: make(chan func())}
	d.rate.Store(int64(opt.RateMiBs))
	for i := uint64(0); i < d.pages; i++ {
		linuxguest.FillPage(d.page(i), d.seed, i, 0)
	}
	return d, nil
}

func (d *dirtier) page(i uint64) []uint64 {
	return d.mem[i*linuxguest.PageWords : (i+1)*linuxguest.PageWords]
}

// visit visits n pages.
func (d *dirtier) visit(n int) {
	for ; n > 0; n-- {
		i, gen := d.next, d.pass
		p := d.page(i)
		body := d.bodyEvery > 0 && (i+gen)%d.bodyEvery == 0
		if err := linuxguest.CheckPage(p, d.seed, i, gen-1, body); err != nil {
			d.bad++
			if d.bad <= maxCorruptLines {
				report(linuxguest.KindCorrupt, "page=%d addr=%#x pass=%d err=%q", i, uintptr(unsafe.Pointer(&p[0])), gen, err.Error())
			}
			linuxguest.FillPage(p, d.seed, i, gen)
		} else {
			p[linuxguest.WordGen] = gen
			p[linuxguest.WordCheck] = linuxguest.CheckWord(d.seed, i, gen)
		}
		d.visited++
		if d.next++; d.next == d.pages {
			d.next, d.pass = 0, d.pass+1
		}
	}
}

// run dirties forever at the current rate, printing a TICK line every tick. The rate is kept
// by credit: pages allowed = elapsed time × rate, at most 100 ms worth saved up (a guest that
// was paused, by a migration's downtime or a stop, does not catch up in a burst).
func (d *dirtier) run(tick time.Duration) {
	last := time.Now()
	nextTick := last.Add(tick)
	lastTick, lastVisited := last, d.visited
	credit := 0.0
	for seq := 1; ; {
		now := time.Now()
		if !now.Before(nextTick) {
			el := now.Sub(lastTick).Seconds()
			rate := float64(d.visited-lastVisited) * linuxguest.PageSize / (1 << 20) / el
			report(linuxguest.KindTick, "seq=%d t=%.2f pages=%d pass=%d rate_mibs=%.1f bad=%d", seq, uptime(), d.visited, d.pass, rate, d.bad)
			seq++
			lastTick, lastVisited = now, d.visited
			if nextTick = nextTick.Add(tick); nextTick.Before(now) {
				nextTick = now.Add(tick)
			}
		}
		select {
		case f := <-d.inject:
			f()
		default:
		}
		r := d.rate.Load()
		if r == 0 {
			d.visit(256)
			last = now
			continue
		}
		perSec := float64(r) * (1 << 20) / linuxguest.PageSize
		credit = min(credit+now.Sub(last).Seconds()*perSec, perSec/10)
		last = now
		chunk := max(1, perSec/200) // 5 ms worth
		if credit >= chunk {
			n := int(min(credit, 4*chunk))
			d.visit(n)
			credit -= float64(n)
			continue
		}
		wait := time.Duration((chunk - credit) / perSec * float64(time.Second))
		time.Sleep(max(wait, time.Millisecond))
	}
}
