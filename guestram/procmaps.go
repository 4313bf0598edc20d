package guestram

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// maxSmaps caps how much of /proc/PID/smaps is read: a QEMU has a few hundred mappings (~300 KB);
// anything past 64 MiB is not a QEMU this package understands.
const maxSmaps = 64 << 20

// vma is one line of /proc/PID/smaps with the fields this package uses.
type vma struct {
	Start, End uint64
	Perms      string // "rw-s", "r--p", …
	Offset     int64  // file offset of Start
	Dev        string // "fe:00" (major:minor, hex)
	Inode      uint64
	Path       string // "" for anonymous memory; "/memfd:NAME (deleted)" for a memfd
	Flags      string // VmFlags, space separated ("rd wr mr mw me dc ac hg mg")
}

func (v vma) shared() bool { return len(v.Perms) == 4 && v.Perms[3] == 's' }

// hasFlag reports whether VmFlags contains f ("dc" = MADV_DONTFORK, "hg" = MADV_HUGEPAGE).
func (v vma) hasFlag(f string) bool {
	for _, x := range strings.Fields(v.Flags) {
		if x == f {
			return true
		}
	}
	return false
}

// readSmapsFn is readSmaps; tests replace it to see what a sidecar without access gets.
var readSmapsFn = readSmaps

// readSmaps parses /proc/PID/smaps.
func readSmaps(pid int) ([]vma, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return nil, fmt.Errorf("guestram: mappings of QEMU pid %d: %w", pid, err)
	}
	defer f.Close()
	vmas, err := parseSmaps(io.LimitReader(f, maxSmaps))
	if err != nil {
		return nil, fmt.Errorf("guestram: /proc/%d/smaps: %w", pid, err)
	}
	return vmas, nil
}

// parseSmaps reads the smaps format: a maps line per mapping followed by "Key: value" lines.
func parseSmaps(r io.Reader) ([]vma, error) {
	var out []vma
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		s := sc.Text()
		if s == "" {
			continue
		}
		if strings.HasPrefix(s, "VmFlags:") {
			if len(out) == 0 {
				return nil, fmt.Errorf("line %d: VmFlags before any mapping", line)
			}
			out[len(out)-1].Flags = strings.TrimSpace(strings.TrimPrefix(s, "VmFlags:"))
			continue
		}
		// A mapping line starts with "start-end " in hex; attribute lines start with "Key:".
		dash := strings.IndexByte(s, '-')
		sp := strings.IndexByte(s, ' ')
		if dash <= 0 || sp <= dash || strings.Contains(s[:sp], ":") {
			continue
		}
		v, err := parseMapsLine(s)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		out = append(out, v)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// parseMapsLine parses "start-end perms offset dev inode [path]".
func parseMapsLine(s string) (vma, error) {
	var v vma
	f := strings.Fields(s)
	if len(f) < 5 {
		return v, fmt.Errorf("short mapping line %q", s)
	}
	a, b, ok := strings.Cut(f[0], "-")
	if !ok {
		return v, fmt.Errorf("bad range in %q", s)
	}
	var err error
	if v.Start, err = strconv.ParseUint(a, 16, 64); err != nil {
		return v, fmt.Errorf("bad range in %q", s)
	}
	if v.End, err = strconv.ParseUint(b, 16, 64); err != nil || v.End < v.Start {
		return v, fmt.Errorf("bad range in %q", s)
	}
	v.Perms = f[1]
	off, err := strconv.ParseUint(f[2], 16, 63)
	if err != nil {
		return v, fmt.Errorf("bad offset in %q", s)
	}
	v.Offset = int64(off)
	v.Dev = f[3]
	if v.Inode, err = strconv.ParseUint(f[4], 10, 64); err != nil {
		return v, fmt.Errorf("bad inode in %q", s)
	}
	if len(f) > 5 {
		// The path is everything after the inode column (it may contain spaces, " (deleted)").
		idx := strings.Index(s, f[4]+" ")
		if idx >= 0 {
			v.Path = strings.TrimSpace(s[idx+len(f[4]):])
		} else {
			v.Path = strings.Join(f[5:], " ")
		}
	}
	return v, nil
}

// dcRun is a maximal run of address-contiguous mappings that all carry MADV_DONTFORK ("dc"):
// QEMU advises exactly [host, host+max_length) of every RAM block so (physmem.c ram_block_add),
// and the PROT_NONE guard page it leaves after each block (qemu_ram_mmap) keeps two blocks' runs
// apart. So every RAM block is exactly one run, starting at its host address.
type dcRun struct {
	Start, End uint64
	First      vma // the first mapping of the run (file, offset, sharing)
	Mappings   int // how many mappings the run spans
}

// dcRuns returns the runs of "dc" mappings in address order.
func dcRuns(vmas []vma) []dcRun {
	var runs []dcRun
	for _, v := range vmas {
		if !v.hasFlag("dc") {
			continue
		}
		if n := len(runs); n > 0 && runs[n-1].End == v.Start && sameBacking(runs[n-1].First, v) {
			runs[n-1].End = v.End
			runs[n-1].Mappings++
			continue
		}
		runs = append(runs, dcRun{Start: v.Start, End: v.End, First: v, Mappings: 1})
	}
	return runs
}

// sameBacking reports whether b continues a's mapping (same file and consecutive offsets, or both
// anonymous): a block split into several mappings by madvise/mprotect keeps its backing.
func sameBacking(a, b vma) bool {
	if a.Path != b.Path || a.Inode != b.Inode || a.Dev != b.Dev || a.shared() != b.shared() {
		return false
	}
	return true
}

// vmaAt returns the mapping containing addr.
func vmaAt(vmas []vma, addr uint64) (vma, bool) {
	for _, v := range vmas {
		if addr >= v.Start && addr < v.End {
			return v, true
		}
	}
	return vma{}, false
}

// covered reports whether [start, end) lies in consecutive mappings of vmas.
func covered(vmas []vma, start, end uint64) bool {
	at := start
	for _, v := range vmas {
		if v.End <= at {
			continue
		}
		if v.Start > at {
			return false
		}
		at = v.End
		if at >= end {
			return true
		}
	}
	return at >= end
}

// fdFor finds the descriptor of process pid open on the file that mapping v maps (same device
// and inode), so that a deleted file (a memfd, an unlinked mem-path file) can still be opened
// through /proc/PID/fd/N.
func fdFor(pid int, v vma) (int, string, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return -1, "", fmt.Errorf("listing %s: %w", dir, err)
	}
	maj, min, ok := parseDev(v.Dev)
	if !ok {
		return -1, "", fmt.Errorf("bad device %q in the mapping", v.Dev)
	}
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		p := filepath.Join(dir, e.Name())
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil {
			continue
		}
		if st.Ino == v.Inode && devMajor(st.Dev) == maj && devMinor(st.Dev) == min {
			target, _ := os.Readlink(p)
			return n, target, nil
		}
	}
	return -1, "", fmt.Errorf("no descriptor of pid %d is open on %s (inode %d)", pid, v.Path, v.Inode)
}

func parseDev(s string) (uint64, uint64, bool) {
	a, b, ok := strings.Cut(s, ":")
	if !ok {
		return 0, 0, false
	}
	maj, err1 := strconv.ParseUint(a, 16, 32)
	min, err2 := strconv.ParseUint(b, 16, 32)
	return maj, min, err1 == nil && err2 == nil
}

// devMajor and devMinor split a Linux dev_t (glibc's encoding, as the kernel returns it in stat).
func devMajor(d uint64) uint64 { return (d>>8)&0xfff | (d>>32)&^0xfff }
func devMinor(d uint64) uint64 { return d&0xff | (d>>12)&^0xff }

// cmdline returns /proc/PID/cmdline split at its NUL bytes.
func cmdline(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil, err
	}
	if len(b) == 0 {
		return nil, errors.New("empty command line (a kernel thread, or a process that has exited)")
	}
	b = bytes.TrimSuffix(b, []byte{0})
	return strings.Split(string(b), "\x00"), nil
}

// startTime returns field 22 of /proc/PID/stat (the process's start time in clock ticks): with the
// PID it names one process for good, so a QEMU that died and whose PID was reused is noticed.
func startTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may contain spaces: split after its ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("bad /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); field 22 is f[19].
	if len(f) < 20 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	return strconv.ParseUint(f[19], 10, 64)
}
