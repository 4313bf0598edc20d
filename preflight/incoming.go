package preflight

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// IncomingTimeout bounds CheckIncoming as a whole: libvirt waits for its hook.
const IncomingTimeout = 5 * time.Second

// host is where CheckIncoming reads the machine's state (tests point it at fixtures).
type host struct {
	mounts    string // /proc/mounts
	meminfo   string // /proc/meminfo
	hugeSysfs string // /sys/kernel/mm/hugepages
	kvm       string // /dev/kvm
}

var realHost = host{mounts: "/proc/mounts", meminfo: "/proc/meminfo",
	hugeSysfs: "/sys/kernel/mm/hugepages", kvm: "/dev/kvm"}

// CheckIncoming checks, on the destination host (libvirt's qemu hook, `migrate begin`), that
// the incoming domain d can start here: its emulator exists and runs, knows the machine type,
// supports the memory backing, the host has the hugepages and memory it needs, and /dev/kvm for
// a kvm domain. It finishes within IncomingTimeout (or ctx, if sooner).
func CheckIncoming(ctx context.Context, d Domain) []Check {
	return checkIncoming(ctx, d, realHost)
}

func checkIncoming(ctx context.Context, d Domain, h host) []Check {
	ctx, cancel := context.WithTimeout(ctx, IncomingTimeout)
	defer cancel()
	var checks []Check
	var e *Emulator
	switch {
	case d.Emulator == "":
		checks = append(checks, Check{Name: "emulator", Severity: SeverityWarning,
			Message: "the domain XML names no <emulator>: libvirt picks its default; emulator, machine type and memfd support not checked"})
	default:
		em, err := ProbeEmulator(ctx, d.Emulator)
		if err != nil {
			checks = append(checks, Check{Name: "emulator", Severity: SeverityError, Destination: d.Emulator,
				Message: oneLine(err.Error()) + ": install QEMU at that path on this host or fix <emulator> in the domain XML"})
		} else {
			e = &em
			checks = append(checks, Check{Name: "emulator", Severity: SeverityOK, Destination: em.Version,
				Message: fmt.Sprintf("%s runs: QEMU %s", em.Path, em.Version)})
		}
	}
	if e != nil {
		checks = append(checks, checkMachineSupported(d, e))
	}
	if d.Type == "kvm" {
		checks = append(checks, checkKVM(h))
	}
	checks = append(checks, checkMemoryBacking(d, e, h), checkHostMemory(d, h))
	return checks
}

func checkMachineSupported(d Domain, e *Emulator) Check {
	c := Check{Name: "machine-supported", Source: d.Machine}
	exact, ok := e.Knows(d.Machine)
	switch {
	case !ok:
		c.Severity = SeverityError
		c.Message = fmt.Sprintf("QEMU %s (%s) does not know machine type %s%s: migrate to a host whose QEMU has it, or start the source with a type this QEMU knows",
			e.Version, e.Path, d.Machine, knownLike(e, d.Machine))
	case exact != d.Machine:
		c.Severity = SeverityOK
		c.Destination = exact
		c.Message = fmt.Sprintf("%s is an alias: QEMU %s resolves it to %s; the stream's machine type must be exactly %s",
			d.Machine, e.Version, exact, exact)
	case e.IsDeprecated(exact):
		c.Severity = SeverityWarning
		c.Destination = exact
		c.Message = fmt.Sprintf("QEMU %s knows %s but marks it deprecated: it works now, later QEMUs may drop it", e.Version, exact)
	default:
		c.Severity = SeverityOK
		c.Destination = exact
		c.Message = fmt.Sprintf("QEMU %s knows %s", e.Version, exact)
	}
	return c
}

// knownLike lists the types of the same family the emulator does know: " (it knows
// pc-q35-2.4 … pc-q35-10.0)".
func knownLike(e *Emulator, m string) string {
	fam, _, _, ok := machineVersion(m)
	if !ok {
		return ""
	}
	type mv struct {
		name         string
		major, minor int
	}
	var same []mv
	for _, n := range e.Machines {
		if f, ma, mi, ok := machineVersion(n); ok && f == fam {
			same = append(same, mv{n, ma, mi})
		}
	}
	if len(same) == 0 {
		return ""
	}
	sort.Slice(same, func(i, j int) bool { return older(same[i].major, same[i].minor, same[j].major, same[j].minor) })
	if len(same) == 1 {
		return fmt.Sprintf(" (it knows %s)", same[0].name)
	}
	return fmt.Sprintf(" (it knows %s … %s)", same[0].name, same[len(same)-1].name)
}

func checkKVM(h host) Check {
	c := Check{Name: "accelerator", Destination: h.kvm}
	st, err := os.Stat(h.kvm)
	if err != nil || st.Mode()&os.ModeCharDevice == 0 {
		c.Severity = SeverityError
		c.Message = fmt.Sprintf("domain type kvm needs %s, which this host does not have: load the kvm module (or change the domain to type qemu on both hosts)", h.kvm)
		return c
	}
	c.Severity = SeverityOK
	c.Message = "domain type kvm: " + h.kvm + " present"
	return c
}

// backingKind is what libvirt makes of <memoryBacking>: "memfd", "file", "hugetlbfs" (file on
// a hugetlbfs mount) or "anonymous".
func backingKind(m MemoryBacking) string {
	switch {
	case m.Source == "memfd":
		return "memfd"
	case m.HasHuge:
		return "hugetlbfs"
	case m.Source == "file":
		return "file"
	}
	return "anonymous"
}

func checkMemoryBacking(d Domain, e *Emulator, h host) Check {
	c := Check{Name: "memory-backing", Destination: describeBacking(d)}
	var errs, notes []string
	kind := backingKind(d.MemoryBacking)
	if d.MemoryBacking.Source == "memfd" {
		switch {
		case e == nil:
			notes = append(notes, "memfd source not checked (no emulator probed)")
		case !e.MemFD:
			errs = append(errs, fmt.Sprintf("memfd source but QEMU %s has no memory-backend-memfd: use <source type='file'/> or anonymous memory", e.Version))
		}
	}
	if d.MemoryBacking.HasHuge {
		errs = append(errs, hugepageProblems(d, h, kind == "memfd")...)
	}
	if d.MemoryBacking.Shared() || d.NUMASharedRAM {
		notes = append(notes, "shared access: guest RAM is mapped share=on (vhost-user, or x-ignore-shared with a file source)")
	}
	switch {
	case len(errs) > 0:
		c.Severity = SeverityError
		c.Message = strings.Join(errs, "; ")
	default:
		c.Severity = SeverityOK
		c.Message = describeBacking(d)
		if len(notes) > 0 {
			c.Message += "; " + strings.Join(notes, "; ")
		}
	}
	return c
}

func describeBacking(d Domain) string {
	m := d.MemoryBacking
	s := backingKind(m)
	if m.Shared() || d.NUMASharedRAM {
		s += " shared"
	} else {
		s += " private"
	}
	for _, p := range m.Hugepages {
		if p.SizeBytes > 0 {
			s += ", " + sizeString(p.SizeBytes) + " pages"
		}
	}
	if m.HasHuge && len(m.Hugepages) == 0 {
		s += ", default-size hugepages"
	}
	return s + " RAM"
}

// hugepageProblems checks that every hugepage size the domain asks for has a hugetlbfs mount
// (not needed for memfd, which uses the kernel's internal mount) and enough free pages for the
// domain's memory.
func hugepageProblems(d Domain, h host, memfd bool) []string {
	meminfo, err := readMeminfo(h.meminfo)
	if err != nil {
		return []string{fmt.Sprintf("hugepages requested but %v", err)}
	}
	defSize := meminfo["Hugepagesize"]
	sizes := map[uint64]bool{}
	for _, p := range d.MemoryBacking.Hugepages {
		s := p.SizeBytes
		if s == 0 {
			s = defSize
		}
		sizes[s] = true
	}
	if len(sizes) == 0 {
		sizes[defSize] = true
	}
	mounts, err := hugetlbfsMounts(h.mounts, defSize)
	if err != nil {
		return []string{fmt.Sprintf("hugepages requested but %v", err)}
	}
	var out []string
	for size := range sizes {
		if size == 0 {
			out = append(out, "hugepages requested but the host reports no hugepage size (no hugetlb support)")
			continue
		}
		if !memfd && !mounts[size] {
			out = append(out, fmt.Sprintf("hugepages of %s requested but no hugetlbfs is mounted for that size (/proc/mounts): mount one, e.g. mount -t hugetlbfs -o pagesize=%dK none /dev/hugepages",
				sizeString(size), size>>10))
			continue
		}
		free, err := freeHugepages(h, meminfo, size, defSize)
		if err != nil {
			out = append(out, err.Error())
			continue
		}
		need := (d.MemoryBytes + size - 1) / size
		if free < need {
			out = append(out, fmt.Sprintf("the domain needs %d free %s hugepages, the host has %d: reserve more (sysctl vm.nr_hugepages or /sys/kernel/mm/hugepages/hugepages-%dkB/nr_hugepages)",
				need, sizeString(size), free, size>>10))
		}
	}
	sort.Strings(out)
	return out
}

// readMeminfo returns /proc/meminfo's values in bytes (kB lines) or counts (HugePages_*).
func readMeminfo(path string) (map[string]uint64, error) {
	b, err := readSmall(path)
	if err != nil {
		return nil, err
	}
	m := map[string]uint64{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			continue
		}
		if len(f) > 1 && f[1] == "kB" {
			n <<= 10
		}
		m[strings.TrimSpace(k)] = n
	}
	return m, nil
}

// hugetlbfsMounts returns the page sizes that have a hugetlbfs mount.
func hugetlbfsMounts(path string, defSize uint64) (map[uint64]bool, error) {
	b, err := readSmall(path)
	if err != nil {
		return nil, err
	}
	sizes := map[uint64]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || f[2] != "hugetlbfs" {
			continue
		}
		size := defSize
		for _, o := range strings.Split(f[3], ",") {
			if v, ok := strings.CutPrefix(o, "pagesize="); ok {
				if n, err := parseMountSize(v); err == nil {
					size = n
				}
			}
		}
		sizes[size] = true
	}
	return sizes, nil
}

// parseMountSize reads hugetlbfs's pagesize option: "2M", "1G", "2048k".
func parseMountSize(v string) (uint64, error) {
	if v == "" {
		return 0, fmt.Errorf("empty size")
	}
	mult := uint64(1)
	switch v[len(v)-1] {
	case 'k', 'K':
		mult = 1 << 10
	case 'm', 'M':
		mult = 1 << 20
	case 'g', 'G':
		mult = 1 << 30
	}
	if mult != 1 {
		v = v[:len(v)-1]
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil || n > (1<<63)/mult {
		return 0, fmt.Errorf("bad size %q", v)
	}
	return n * mult, nil
}

// freeHugepages returns the free pages of one size: /proc/meminfo for the default size, sysfs
// for the others.
func freeHugepages(h host, meminfo map[string]uint64, size, defSize uint64) (uint64, error) {
	if size == defSize {
		return meminfo["HugePages_Free"], nil
	}
	p := filepath.Join(h.hugeSysfs, fmt.Sprintf("hugepages-%dkB", size>>10), "free_hugepages")
	b, err := readSmall(p)
	if err != nil {
		return 0, fmt.Errorf("hugepages of %s requested but the host does not support that size (%v)", sizeString(size), err)
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %q is not a number", p, clip(string(b), 20))
	}
	return n, nil
}

// readSmall reads up to 1 MiB of a (proc) file.
func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(bufio.NewReader(f), 1<<20))
}

func checkHostMemory(d Domain, h host) Check {
	c := Check{Name: "memory-size", Source: sizeString(d.MemoryBytes)}
	if d.MemoryBytes == 0 {
		c.Severity = SeverityWarning
		c.Message = "the domain XML gives no <memory>"
		return c
	}
	mi, err := readMeminfo(h.meminfo)
	if err != nil {
		c.Severity = SeverityWarning
		c.Message = fmt.Sprintf("guest RAM %s; host memory not checked: %v", sizeString(d.MemoryBytes), err)
		return c
	}
	avail, total := mi["MemAvailable"], mi["MemTotal"]
	c.Destination = sizeString(avail) + " available"
	switch {
	case d.MemoryBacking.HasHuge:
		c.Severity = SeverityOK
		c.Message = fmt.Sprintf("guest RAM %s comes from hugepages (see memory-backing)", sizeString(d.MemoryBytes))
	case total > 0 && d.MemoryBytes > total:
		c.Severity = SeverityError
		c.Message = fmt.Sprintf("guest RAM %s is more than this host's %s: migrate to a bigger host", sizeString(d.MemoryBytes), sizeString(total))
	case avail > 0 && d.MemoryBytes > avail:
		c.Severity = SeverityWarning
		c.Message = fmt.Sprintf("guest RAM %s is more than the %s available now: the host will swap or the OOM killer may end QEMU", sizeString(d.MemoryBytes), sizeString(avail))
	default:
		c.Severity = SeverityOK
		c.Message = fmt.Sprintf("guest RAM %s, host has %s available", sizeString(d.MemoryBytes), sizeString(avail))
	}
	return c
}

// CompareDomain checks a running source against a destination described by a libvirt domain
// XML (and the destination's emulator, probed, when it exists on this host; e may be nil):
// machine type, version direction, RAM size, memory backing, UUID. The device set cannot be
// compared from the XML; an info check says so.
func CompareDomain(src Facts, d Domain, e *Emulator) Report {
	r := Report{Source: src.Describe(), Destination: d.Describe()}
	if e != nil {
		r.Destination += ", QEMU " + e.Version
	}
	r.Checks = append(r.Checks, domainMachine(src, d, e))
	if e != nil {
		r.Checks = append(r.Checks, checkVersion(src.Version, src.Major, src.Minor, e.Version, e.Major, e.Minor))
	} else {
		r.Checks = append(r.Checks, Check{Name: "version", Severity: SeverityInfo, Source: src.Version,
			Message: fmt.Sprintf("destination emulator %s not probed (not on this host): version direction not checked", orDefault(d.Emulator))})
	}
	sev, msg := sourceStatus(src.Status)
	r.Checks = append(r.Checks, Check{Name: "status", Severity: sev, Source: src.Status,
		Message: msg + "; libvirt starts the destination with -incoming"})
	r.Checks = append(r.Checks, domainMemorySize(src, d), domainMemoryBacking(src, d, e))
	u := checkUUID(src, Facts{UUID: d.UUID})
	r.Checks = append(r.Checks, u)
	r.Checks = append(r.Checks, Check{Name: "devices", Severity: SeverityInfo,
		Source:  fmt.Sprintf("%d devices", len(src.Devices)),
		Message: "the device set cannot be compared from the domain XML alone: give --dst-qmp (the destination QEMU's QMP socket) to compare it"})
	r.finish()
	return r
}

func orDefault(p string) string {
	if p == "" {
		return "(libvirt's default)"
	}
	return p
}

func domainMachine(src Facts, d Domain, e *Emulator) Check {
	c := Check{Name: "machine", Source: src.Machine, Destination: d.Machine}
	dstM := d.Machine
	note := ""
	if e != nil {
		if _, ok := e.Knows(src.Machine); !ok {
			c.Severity = SeverityError
			c.Message = fmt.Sprintf("the destination's QEMU %s does not know the source's machine type %s%s: migrate to a host with a newer QEMU",
				e.Version, src.Machine, knownLike(e, src.Machine))
			return c
		}
		exact, ok := e.Knows(d.Machine)
		if !ok {
			c.Severity = SeverityError
			c.Message = fmt.Sprintf("the destination's QEMU %s does not know machine type %s%s: set <type machine='%s'> in the domain XML",
				e.Version, d.Machine, knownLike(e, d.Machine), src.Machine)
			return c
		}
		if exact != d.Machine {
			dstM, note = exact, fmt.Sprintf(" (%s on QEMU %s)", d.Machine, e.Version)
			c.Destination = exact
		}
	} else if _, _, _, ok := machineVersion(d.Machine); !ok && d.Machine != src.Machine {
		c.Severity = SeverityWarning
		c.Message = fmt.Sprintf("the domain XML says %s, an alias whose meaning depends on the destination's QEMU (not probed here): set <type machine='%s'> to be sure",
			d.Machine, src.Machine)
		return c
	}
	if dstM == src.Machine {
		c.Severity = SeverityOK
		c.Message = src.Machine + " on both sides" + note
		return c
	}
	c.Severity = SeverityError
	c.Message = fmt.Sprintf("source runs %s, the domain XML gives %s%s: QEMU refuses a different machine type; set <type machine='%s'> in the domain XML",
		src.Machine, dstM, note, src.Machine)
	return c
}

func domainMemorySize(src Facts, d Domain) Check {
	c := Check{Name: "memory-size", Destination: sizeString(d.MemoryBytes)}
	main, ok := src.MainRAM()
	if !ok {
		c.Severity = SeverityWarning
		c.Message = "the source reports no RAM block: memory size not checked"
		return c
	}
	c.Source = sizeString(main.Used)
	var total uint64
	for _, m := range src.MemoryBackends {
		if _, ok := src.Block(m.ID); ok {
			total += m.Size
		} else if _, ok := src.Block("/objects/" + m.ID); ok {
			total += m.Size
		}
	}
	switch {
	case d.MemoryBytes == main.Used:
		c.Severity = SeverityOK
		c.Message = fmt.Sprintf("%s on both sides (source block %s)", sizeString(main.Used), main.Name)
	case total > 0 && d.MemoryBytes == total:
		c.Severity = SeverityOK
		c.Message = fmt.Sprintf("%s on both sides (source: %d memory backends)", sizeString(total), len(src.MemoryBackends))
	default:
		c.Severity = SeverityError
		c.Message = fmt.Sprintf("the domain XML gives %s, the source's RAM (%s) is %s: QEMU fails the load with a length mismatch; set <memory unit='KiB'>%d</memory>",
			sizeString(d.MemoryBytes), main.Name, sizeString(main.Used), main.Used>>10)
	}
	return c
}

func domainMemoryBacking(src Facts, d Domain, e *Emulator) Check {
	c := Check{Name: "memory-backing", Destination: describeBacking(d)}
	main, _ := src.MainRAM()
	sm, hasSM := src.Backend(main.Name)
	if hasSM {
		c.Source = fmt.Sprintf("%s %s, %s pages", sm, sizeString(sm.Size), sizeString(main.PageSize))
	}
	ignore := src.Capabilities["x-ignore-shared"]
	dstShared := d.MemoryBacking.Shared() || d.NUMASharedRAM
	kind := backingKind(d.MemoryBacking)
	var errs, warns, notes []string
	if ignore && hasSM && ignoresShared(src, sm) {
		switch {
		case !sm.NamedFile():
			errs = append(errs, fmt.Sprintf("%s is %s and QEMU %s with x-ignore-shared skips it, but no other process can map it: its content would be lost; use memory-backend-file,share=on or turn x-ignore-shared off",
				main.Name, sm, src.Version))
		case kind != "file" && kind != "hugetlbfs" || !dstShared:
			errs = append(errs, fmt.Sprintf("the source's RAM is not sent (x-ignore-shared, shared file %s) but the domain's RAM is %s: give the domain <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking> mapping that file",
				sm.MemPath, describeBacking(d)))
		default:
			warns = append(warns, fmt.Sprintf("the source's RAM is not sent (x-ignore-shared): the destination must map the very file %s, which the domain XML cannot show (libvirt puts it under memory_backing_dir)",
				sm.MemPath))
		}
	}
	if d.MemoryBacking.Source == "memfd" && e != nil && !e.MemFD {
		errs = append(errs, fmt.Sprintf("memfd source but the destination's QEMU %s has no memory-backend-memfd", e.Version))
	}
	for _, p := range d.MemoryBacking.Hugepages {
		if p.SizeBytes != 0 && main.PageSize != 0 && p.SizeBytes != main.PageSize {
			notes = append(notes, fmt.Sprintf("page size %s on the source, %s on the destination (fine for precopy; postcopy refuses it)",
				sizeString(main.PageSize), sizeString(p.SizeBytes)))
		}
	}
	switch {
	case len(errs) > 0:
		c.Severity = SeverityError
		c.Message = strings.Join(errs, "; ")
	case len(warns) > 0:
		c.Severity = SeverityWarning
		c.Message = strings.Join(append(warns, notes...), "; ")
	case len(notes) > 0:
		c.Severity = SeverityInfo
		c.Message = strings.Join(notes, "; ")
	default:
		c.Severity = SeverityOK
		c.Message = fmt.Sprintf("source %s; destination %s", orUnknown(c.Source), describeBacking(d))
	}
	return c
}

func orUnknown(s string) string {
	if s == "" {
		return "backend unknown"
	}
	return s
}
