package guestram

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// Layout is where a local QEMU keeps its guest RAM: every RAM block with its host address in the
// QEMU process, where it appears in guest physical space, and the shared file that holds it.
type Layout struct {
	PID       int       // the QEMU process on this host
	StartTime uint64    // its start time (/proc/PID/stat field 22): PID and start time name one process
	Version   string    // QEMU version (query-version)
	HVAColumn bool      // info ramblock printed host addresses (QEMU ≥ 8.2; 10.0 here, not 7.2)
	Blocks    []Block   // in info ramblock order
	Backends  []Backend // memory backend objects (query-memdev, qom-list /objects)
	Notes     []string  // what was noticed while locating (ambiguities, unlocated blocks)
	// ProcessDenied says why the process's mappings cannot be read (another user's QEMU and a
	// sidecar that is not root); then no block is located and only pmemsave can read.
	ProcessDenied string
	flat          []flatRange // the "memory" address space's flat view
}

// Block is one RAM block (QEMU's RAMBlock) as info ramblock reports it, with what was found out
// about where it lives.
type Block struct {
	Name     string // idstr: "pc.ram", "ram0" (a memory backend's id), "/rom@etc/acpi/tables", …
	PageSize int64  // the block's host page size (PSize): 4096, or a hugepage size
	Offset   uint64 // QEMU's ram_addr_t offset: internal numbering, not a guest-physical address
	Used     int64  // used_length: the bytes that migrate, and that are hashed
	Max      int64  // max_length: what QEMU maps (resizeable blocks grow up to it)
	ReadOnly bool   // "ro" in 10.0's RO column (ROM blobs); false where not reported
	// HVA is the block's first byte in the QEMU process, 0 when not located; Located says how it
	// was found ("info ramblock", "gpa2hva …", "the only unclaimed MADV_DONTFORK mapping of …")
	// or why not.
	HVA     uint64
	Located string
	// GPA are the parts of the block that the guest sees in its physical address space (flat
	// view of the "memory" address space), in block offset order; empty for blocks no guest
	// address maps (fw_cfg ROM blobs, device ROMs not enabled).
	GPA []GPARange
	// Backend is the memory backend object the block belongs to (nil: QEMU's own allocation).
	Backend *Backend
	// File is the shared file mapping that holds the block (memory-backend-file with share=on,
	// memory-backend-memfd), nil when there is none; FileNote says why not when that matters.
	File     *File
	FileNote string
}

// GPARange is one guest-physical range that shows bytes [Offset, Offset+Size) of a block.
type GPARange struct {
	GPA, Offset, Size uint64
	ReadOnly          bool // mapped read-only (ROM, or RAM behind a read-only PAM setting)
}

// Backend is a memory backend object (-object memory-backend-*).
type Backend struct {
	ID      string // object id (also the RAM block's name)
	Type    string // "memory-backend-ram", "memory-backend-file", "memory-backend-memfd", …
	Size    int64
	Share   bool   // share=on: the guest's writes reach the file
	MemPath string // memory-backend-file's mem-path (a file, or a folder QEMU made a file in)
}

// File is a file (memfd, or a file on a filesystem) that holds a block's bytes.
type File struct {
	FD     int    // the descriptor in the QEMU process (opened again through /proc/PID/fd/FD)
	Path   string // what /proc/PID/fd/FD points to ("/memfd:memory-backend-memfd (deleted)", a path)
	Offset int64  // file offset of the block's first byte
	Inode  uint64 // the file's inode (checked again when it is opened)
}

// Pages returns the number of target pages (PageSize bytes) of the block's used length.
func (b *Block) Pages() int64 { return (b.Used + PageSize - 1) / PageSize }

// Block returns the block with the given name, or nil.
func (l *Layout) Block(name string) *Block {
	for i := range l.Blocks {
		if l.Blocks[i].Name == name {
			return &l.Blocks[i]
		}
	}
	return nil
}

// PIDFromSocket returns the PID of the process listening on a unix socket (a QEMU's QMP socket),
// from the peer credentials (SO_PEERCRED) of a fresh connection: the kernel records the
// listener's credentials at listen(), so this works whether or not QEMU accepts the connection
// (QEMU serves one client per monitor socket; the connection is closed at once, which QEMU sees
// as a client that left).
func PIDFromSocket(ctx context.Context, path string) (int, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return 0, fmt.Errorf("guestram: finding the QEMU behind %s: %w", path, err)
	}
	defer conn.Close()
	raw, err := conn.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0, fmt.Errorf("guestram: finding the QEMU behind %s: %w", path, err)
	}
	var cred *syscall.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, fmt.Errorf("guestram: finding the QEMU behind %s: %w", path, err)
	}
	if cerr != nil {
		return 0, fmt.Errorf("guestram: SO_PEERCRED on %s: %w", path, cerr)
	}
	if cred.Pid <= 0 {
		return 0, fmt.Errorf("guestram: the process behind %s is in another PID namespace (peer pid %d)", path, cred.Pid)
	}
	return int(cred.Pid), nil
}

// Locate finds every RAM block of the QEMU reached through c, which runs on this host as process
// pid: info ramblock (names, sizes; host addresses on QEMU ≥ 8.2), the "memory" flat view
// (info mtree -f) with gpa2hva for each RAM range, query-memdev and the backends' properties,
// and /proc/PID/smaps and /proc/PID/fd. Blocks whose host address cannot be established are
// kept with HVA 0 and Located saying why; Locate fails only when the monitor does not answer or
// when pid is visibly not the QEMU behind c (its mappings hold none of the reported blocks).
//
// On QEMU 7.2 (no HVA column) a block is located by gpa2hva when the guest sees it (HVA of the
// range's first byte minus the range's offset in the block), else by elimination: QEMU advises
// MADV_DONTFORK on exactly [host, host+max_length) of every block, so each block is one run of
// "dc" mappings in smaps; a block is taken to be the run of its size only when that run and that
// block are the only ones of that size left unclaimed. Anything less is reported, not guessed.
func Locate(ctx context.Context, c *qmp.Client, pid int) (*Layout, error) {
	return locate(ctx, c, pid, true)
}

// locate is Locate; with useHVA false it ignores the HVA column, to check 7.2's way on 10.0.
func locate(ctx context.Context, c *qmp.Client, pid int, useHVA bool) (*Layout, error) {
	st, err := startTime(pid)
	if err != nil {
		return nil, fmt.Errorf("guestram: QEMU pid %d: %w", pid, err)
	}
	l := &Layout{PID: pid, StartTime: st}
	if v, err := c.QueryVersion(ctx); err == nil {
		l.Version = v.String()
	} else {
		return nil, fmt.Errorf("guestram: %w", err)
	}
	out, err := c.HMP(ctx, "info ramblock")
	if err != nil {
		return nil, fmt.Errorf("guestram: %w", err)
	}
	if l.Blocks, l.HVAColumn, err = parseRAMBlocks(out); err != nil {
		return nil, fmt.Errorf("guestram: info ramblock: %w", err)
	}
	if !useHVA {
		l.HVAColumn = false
		for i := range l.Blocks {
			l.Blocks[i].HVA, l.Blocks[i].Located = 0, ""
		}
	}
	if out, err = c.HMP(ctx, "info mtree -f"); err != nil {
		return nil, fmt.Errorf("guestram: %w", err)
	}
	if l.flat, err = parseFlatView(out, "memory"); err != nil {
		return nil, fmt.Errorf("guestram: info mtree -f: %w", err)
	}
	if err := l.readBackends(ctx, c); err != nil {
		return nil, err
	}
	vmas, err := readSmapsFn(pid)
	if errors.Is(err, fs.ErrPermission) {
		// Another user's QEMU (libvirt's) for a sidecar that is not root: its mappings are out of
		// reach, so are the file and process methods; pmemsave only needs the guest ranges.
		l.ProcessDenied = err.Error()
		l.Notes = append(l.Notes, err.Error()+": only pmemsave can read this QEMU's RAM")
		if err := l.mapGuestPhysical(ctx, c, nil); err != nil {
			return nil, err
		}
		for i := range l.Blocks {
			l.Blocks[i].HVA = 0
			l.Blocks[i].Located = "not located: " + err.Error()
		}
		return l, nil
	}
	if err != nil {
		return nil, err
	}
	if err := l.mapGuestPhysical(ctx, c, vmas); err != nil {
		return nil, err
	}
	l.validateHVAs(vmas)
	if !l.HVAColumn {
		l.eliminate(vmas)
	}
	located := 0
	for i := range l.Blocks {
		if l.Blocks[i].HVA != 0 {
			located++
		}
	}
	if located == 0 && len(l.Blocks) > 0 {
		return nil, fmt.Errorf("guestram: none of the %d RAM blocks the monitor reports is mapped in pid %d: is pid %d the QEMU behind this monitor? (%s)",
			len(l.Blocks), pid, pid, strings.Join(l.Notes, "; "))
	}
	l.findFiles(vmas)
	return l, nil
}

// RefreshGuestPhysical reads the guest-physical view of the blocks (Block.GPA, what pmemsave
// reads) again. It changes while the guest runs and when a destination loads: the chipset's
// state (the PAM registers that shadow the BIOS area, the option ROM window) arrives with the
// stream, so a destination's view located before loading is a fresh boot's, not the guest's.
// The host addresses and files found by Locate stay.
func (l *Layout) RefreshGuestPhysical(ctx context.Context, c *qmp.Client) error {
	out, err := c.HMP(ctx, "info mtree -f")
	if err != nil {
		return fmt.Errorf("guestram: %w", err)
	}
	flat, err := parseFlatView(out, "memory")
	if err != nil {
		return fmt.Errorf("guestram: info mtree -f: %w", err)
	}
	var vmas []vma
	if l.ProcessDenied == "" {
		if vmas, err = readSmapsFn(l.PID); err != nil {
			return err
		}
	}
	keep := make([]Block, len(l.Blocks))
	copy(keep, l.Blocks)
	for i := range l.Blocks {
		l.Blocks[i].GPA = nil
	}
	l.flat = flat
	if err := l.mapGuestPhysical(ctx, c, vmas); err != nil {
		return err
	}
	for i := range l.Blocks { // mapGuestPhysical fills HVA only where Locate had none
		l.Blocks[i].HVA, l.Blocks[i].Located = keep[i].HVA, keep[i].Located
	}
	return nil
}

// Usable reports whether method m can read block b at all (what Hash tries first for it);
// pmemsave's answer is by the guest-physical map as last read.
func (l *Layout) Usable(m Method, b *Block) bool {
	switch m {
	case MethodFile:
		return b.File != nil
	case MethodProcessVM, MethodProcMem:
		return b.HVA != 0 && l.ProcessDenied == ""
	case MethodPMemSave:
		return len(b.GPA) > 0
	}
	return false
}

// Plan counts the blocks by the first method of order (nil: DefaultMethods) that can read
// them; Hash falls back block by block when a method fails.
func (l *Layout) Plan(order []Method) map[Method]int {
	if order == nil {
		order = DefaultMethods
	}
	count := map[Method]int{}
	for i := range l.Blocks {
		for _, m := range order {
			if l.Usable(m, &l.Blocks[i]) {
				count[m]++
				break
			}
		}
	}
	return count
}

// ramblockRE matches one line of info ramblock: 7.2 prints name, page size, offset, used, total;
// 10.0 adds the host address and ro/rw (system/physmem.c ram_block_format).
var ramblockRE = regexp.MustCompile(`^\s*(.+?)\s+([0-9.]+)\s+([KMGTPE]i)?B\s+0x([0-9a-fA-F]+)\s+0x([0-9a-fA-F]+)\s+0x([0-9a-fA-F]+)(?:\s+0x([0-9a-fA-F]+)\s+(ro|rw))?\s*$`)

// parseRAMBlocks parses the output of info ramblock.
func parseRAMBlocks(out string) ([]Block, bool, error) {
	lines := strings.Split(strings.ReplaceAll(out, "\r\n", "\n"), "\n")
	if len(lines) == 0 || !strings.Contains(lines[0], "Block Name") {
		return nil, false, fmt.Errorf("no header line in %.80q", out)
	}
	hva := strings.Contains(lines[0], "HVA")
	var blocks []Block
	for i, s := range lines[1:] {
		if strings.TrimSpace(s) == "" {
			continue
		}
		m := ramblockRE.FindStringSubmatch(s)
		if m == nil || (m[7] != "") != hva {
			return nil, hva, fmt.Errorf("line %d: unexpected %q", i+2, s)
		}
		ps, err := parseSize(m[2], m[3])
		if err != nil {
			return nil, hva, fmt.Errorf("line %d: page size %q: %w", i+2, m[2]+" "+m[3]+"B", err)
		}
		b := Block{Name: m[1], PageSize: ps}
		var used, max uint64
		b.Offset, _ = strconv.ParseUint(m[4], 16, 64)
		used, err1 := strconv.ParseUint(m[5], 16, 63)
		max, err2 := strconv.ParseUint(m[6], 16, 63)
		if err1 != nil || err2 != nil || used > max {
			return nil, hva, fmt.Errorf("line %d: bad lengths in %q", i+2, s)
		}
		b.Used, b.Max = int64(used), int64(max)
		if hva {
			b.HVA, _ = strconv.ParseUint(m[7], 16, 64)
			b.ReadOnly = m[8] == "ro"
			if b.HVA != 0 {
				b.Located = "info ramblock"
			}
		}
		for _, o := range blocks {
			if o.Name == b.Name {
				return nil, hva, fmt.Errorf("line %d: block %q listed twice", i+2, b.Name)
			}
		}
		blocks = append(blocks, b)
	}
	return blocks, hva, nil
}

// parseSize turns size_to_str's "4 KiB" (number and binary prefix) into bytes.
func parseSize(num, prefix string) (int64, error) {
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f <= 0 {
		return 0, fmt.Errorf("not a size")
	}
	shift := map[string]uint{"": 0, "Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}[prefix]
	return int64(f * float64(uint64(1)<<shift)), nil
}

// flatRange is one line of a rendered flat view: [Start, End] (inclusive, as printed) shows
// region Name from byte Offset.
type flatRange struct {
	Start, End uint64 // inclusive end, as info mtree prints it
	Kind       string // "ram", "rom", "romd", "i/o", "nv-ram", …
	Name       string // the terminal memory region's name (a RAM block's name without device path)
	Offset     uint64 // offset in that region ("@…"; 0 when not printed)
}

var (
	flatHeaderRE = regexp.MustCompile(`^FlatView #\d+`)
	flatASRE     = regexp.MustCompile(`^ AS "([^"]*)"`)
	flatRangeRE  = regexp.MustCompile(`^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([^)]*)\): (.*)$`)
	// After the region's name come " @OFFSET" (16 hex digits) when the range starts inside the
	// region, and, under KVM, the accelerator's name for address spaces it maps (" KVM").
	flatNameRE = regexp.MustCompile(`^(.*?)(?: @([0-9a-f]{16}))?(?: KVM)?$`)
)

// parseFlatView returns the RAM and ROM ranges of the flat view that address space as renders
// (info mtree -f: "FlatView #N", its " AS" lines, " Root memory region", then the ranges).
func parseFlatView(out, as string) ([]flatRange, error) {
	var ranges []flatRange
	in, found := false, false
	for _, s := range strings.Split(strings.ReplaceAll(out, "\r\n", "\n"), "\n") {
		switch {
		case flatHeaderRE.MatchString(s):
			if found {
				return ranges, nil
			}
			in = false
		case flatASRE.MatchString(s):
			if flatASRE.FindStringSubmatch(s)[1] == as {
				in, found = true, true
			}
		case in:
			m := flatRangeRE.FindStringSubmatch(s)
			if m == nil {
				continue // " Root memory region: …", "No rendered FlatView", blank lines
			}
			kind := strings.TrimPrefix(m[3], "nv-")
			if kind != "ram" && kind != "rom" && kind != "romd" && kind != "ramd" {
				continue
			}
			n := flatNameRE.FindStringSubmatch(m[4])
			r := flatRange{Kind: m[3], Name: n[1]}
			r.Start, _ = strconv.ParseUint(m[1], 16, 64)
			r.End, _ = strconv.ParseUint(m[2], 16, 64)
			if n[2] != "" {
				r.Offset, _ = strconv.ParseUint(n[2], 16, 64)
			}
			if r.End < r.Start {
				return nil, fmt.Errorf("range %q ends before it starts", s)
			}
			ranges = append(ranges, r)
		}
	}
	if !found {
		return nil, fmt.Errorf("no flat view for address space %q", as)
	}
	return ranges, nil
}

// nameMatches reports whether memory region name mr is block's region: a block's idstr is the
// region's name, prefixed with the owning device's path and "/" for device memory.
func nameMatches(block, mr string) bool {
	return block == mr || strings.HasSuffix(block, "/"+mr)
}

var gpa2hvaRE = regexp.MustCompile(`Host virtual address for 0x([0-9a-f]+) \((.*)\) is 0x([0-9a-f]+)`)

// mapGuestPhysical assigns every RAM range of the flat view to its block (through the host
// address gpa2hva gives for the range's first byte) and, on QEMUs without the HVA column,
// locates the blocks the guest sees.
func (l *Layout) mapGuestPhysical(ctx context.Context, c *qmp.Client, vmas []vma) error {
	runs := dcRuns(vmas)
	for _, r := range l.flat {
		out, err := c.HMP(ctx, fmt.Sprintf("gpa2hva 0x%x", r.Start))
		if err != nil {
			var ce *qmp.CommandError
			if errors.As(err, &ce) {
				l.Notes = append(l.Notes, fmt.Sprintf("gpa2hva 0x%x (%s): %s", r.Start, r.Name, strings.TrimSpace(out)))
				continue
			}
			return fmt.Errorf("guestram: %w", err)
		}
		m := gpa2hvaRE.FindStringSubmatch(out)
		if m == nil {
			l.Notes = append(l.Notes, fmt.Sprintf("gpa2hva 0x%x: unexpected answer %q", r.Start, strings.TrimSpace(out)))
			continue
		}
		hva, _ := strconv.ParseUint(m[3], 16, 64)
		host := hva - r.Offset
		var cands []int
		for i := range l.Blocks {
			b := &l.Blocks[i]
			if l.HVAColumn {
				if b.HVA == host {
					cands = append(cands, i)
				}
			} else if nameMatches(b.Name, r.Name) && (b.HVA == 0 || b.HVA == host) {
				cands = append(cands, i)
			}
		}
		if len(cands) > 1 {
			// Several devices own a region of that name: keep those whose mapping run starts at
			// host with their size.
			var keep []int
			for _, i := range cands {
				if runAt(runs, host, mappedSize(&l.Blocks[i])) {
					keep = append(keep, i)
				}
			}
			cands = keep
		}
		if len(cands) != 1 {
			l.Notes = append(l.Notes, fmt.Sprintf("guest range 0x%x-0x%x (%s @0x%x, host 0x%x) matches %d RAM blocks: not used",
				r.Start, r.End, r.Name, r.Offset, hva, len(cands)))
			continue
		}
		b := &l.Blocks[cands[0]]
		size := r.End - r.Start + 1
		if r.Offset+size > uint64(b.Max) {
			l.Notes = append(l.Notes, fmt.Sprintf("guest range 0x%x-0x%x (%s @0x%x) runs past block %s's %d bytes: not used",
				r.Start, r.End, r.Name, r.Offset, b.Name, b.Max))
			continue
		}
		if b.HVA == 0 {
			b.HVA = host
			b.Located = fmt.Sprintf("gpa2hva 0x%x (%s @0x%x)", r.Start, r.Name, r.Offset)
		}
		b.GPA = append(b.GPA, GPARange{GPA: r.Start, Offset: r.Offset, Size: size, ReadOnly: r.Kind != "ram" && r.Kind != "nv-ram"})
	}
	for i := range l.Blocks {
		g := l.Blocks[i].GPA
		sort.Slice(g, func(a, b int) bool { return g[a].Offset < g[b].Offset })
	}
	return nil
}

// mappedSize is how many bytes QEMU maps (and advises) for b: max_length rounded up to its page.
func mappedSize(b *Block) uint64 {
	ps := max(b.PageSize, int64(os.Getpagesize()))
	return uint64((b.Max + ps - 1) / ps * ps)
}

func runAt(runs []dcRun, start, size uint64) bool {
	for _, r := range runs {
		if r.Start == start {
			return r.End-r.Start == size
		}
	}
	return false
}

// validateHVAs checks every located block against the process's mappings: its run of
// MADV_DONTFORK mappings must start at HVA and have the block's mapped size. A block that fails
// is un-located (with the reason).
func (l *Layout) validateHVAs(vmas []vma) {
	runs := dcRuns(vmas)
	for i := range l.Blocks {
		b := &l.Blocks[i]
		if b.HVA == 0 {
			continue
		}
		want := mappedSize(b)
		if runAt(runs, b.HVA, want) {
			continue
		}
		// Without the dc advice (QEMU under qtest does not advise it) accept plain mappings that
		// cover the block.
		if covered(vmas, b.HVA, b.HVA+uint64(b.Used)) && !hasDC(vmas) {
			continue
		}
		l.Notes = append(l.Notes, fmt.Sprintf("block %s: host address 0x%x (%s) is not the start of a %d-byte RAM mapping of pid %d",
			b.Name, b.HVA, b.Located, want, l.PID))
		b.Located = fmt.Sprintf("not located: %s gave 0x%x, which pid %d does not map as a RAM block", b.Located, b.HVA, l.PID)
		b.HVA = 0
	}
}

func hasDC(vmas []vma) bool {
	for _, v := range vmas {
		if v.hasFlag("dc") {
			return true
		}
	}
	return false
}

// eliminate locates the blocks still without a host address (7.2's ROM blobs) by size among the
// unclaimed runs of MADV_DONTFORK mappings, only where the match is one to one.
func (l *Layout) eliminate(vmas []vma) {
	runs := dcRuns(vmas)
	claimed := map[uint64]bool{}
	for i := range l.Blocks {
		if l.Blocks[i].HVA != 0 {
			claimed[l.Blocks[i].HVA] = true
		}
	}
	for i := range l.Blocks {
		b := &l.Blocks[i]
		if b.HVA != 0 {
			continue
		}
		size := mappedSize(b)
		var free []dcRun
		for _, r := range runs {
			if !claimed[r.Start] && r.End-r.Start == size {
				free = append(free, r)
			}
		}
		same := 0
		for j := range l.Blocks {
			if l.Blocks[j].HVA == 0 && mappedSize(&l.Blocks[j]) == size {
				same++
			}
		}
		switch {
		case len(free) == 1 && same == 1:
			b.HVA = free[0].Start
			claimed[b.HVA] = true
			b.Located = fmt.Sprintf("the only unclaimed MADV_DONTFORK mapping of 0x%x bytes in /proc/%d/smaps", size, l.PID)
		case len(free) == 0:
			b.Located = fmt.Sprintf("not located: no unclaimed RAM mapping of 0x%x bytes in pid %d", size, l.PID)
		default:
			b.Located = fmt.Sprintf("not located: %d unclaimed RAM mappings of 0x%x bytes for %d blocks of that size (this QEMU does not print host addresses)",
				len(free), size, same)
		}
		if b.HVA == 0 {
			l.Notes = append(l.Notes, "block "+b.Name+": "+b.Located)
		}
	}
}

// findFiles records, for every located block whose mapping is a shared file mapping (memfd or
// memory-backend-file with share=on), the QEMU descriptor open on that file.
func (l *Layout) findFiles(vmas []vma) {
	for i := range l.Blocks {
		b := &l.Blocks[i]
		if b.HVA == 0 {
			continue
		}
		v, ok := vmaAt(vmas, b.HVA)
		if !ok || v.Inode == 0 {
			continue // anonymous memory: no file
		}
		if !v.shared() {
			b.FileNote = fmt.Sprintf("%s is mapped privately (share=off): the file does not hold the guest's writes", v.Path)
			continue
		}
		if !covered(vmas, b.HVA, b.HVA+uint64(b.Used)) {
			b.FileNote = "the block's mapping has holes"
			continue
		}
		fd, target, err := fdFor(l.PID, v)
		if err != nil {
			b.FileNote = err.Error()
			continue
		}
		b.File = &File{FD: fd, Path: target, Offset: v.Offset + int64(b.HVA-v.Start), Inode: v.Inode}
	}
}

// readBackends lists the memory backends (query-memdev) with their QOM type and mem-path and
// attaches each to the RAM block of its name.
func (l *Layout) readBackends(ctx context.Context, c *qmp.Client) error {
	var memdevs []struct {
		ID    string `json:"id"`
		Size  int64  `json:"size"`
		Share bool   `json:"share"`
	}
	if err := c.Execute(ctx, "query-memdev", nil, &memdevs); err != nil {
		return fmt.Errorf("guestram: %w", err)
	}
	var objs []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := c.Execute(ctx, "qom-list", map[string]any{"path": "/objects"}, &objs); err != nil {
		return fmt.Errorf("guestram: %w", err)
	}
	types := map[string]string{}
	for _, o := range objs {
		types[o.Name] = strings.TrimSuffix(strings.TrimPrefix(o.Type, "child<"), ">")
	}
	for _, m := range memdevs {
		be := Backend{ID: m.ID, Size: m.Size, Share: m.Share, Type: types[m.ID]}
		if be.Type == "" {
			be.Type = "memory-backend-ram" // QEMU's own backend for -m without one (7.2+: "pc.ram")
		}
		if be.Type == "memory-backend-file" {
			var p string
			if err := c.Execute(ctx, "qom-get", map[string]any{"path": "/objects/" + m.ID, "property": "mem-path"}, &p); err == nil {
				be.MemPath = p
			}
		}
		l.Backends = append(l.Backends, be)
	}
	for i := range l.Blocks {
		for j := range l.Backends {
			id := l.Backends[j].ID
			if l.Blocks[i].Name == id || l.Blocks[i].Name == "/objects/"+id {
				l.Blocks[i].Backend = &l.Backends[j]
			}
		}
	}
	return nil
}
