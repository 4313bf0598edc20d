package preflight

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Compare checks a source and a destination QEMU, both running (the destination waiting with
// -incoming, in state "inmigrate"), for everything that would make the migration fail or lose
// data: machine type, version direction, run states, RAM blocks, devices, migration
// capabilities, UUID validation and memory backends.
func Compare(src, dst Facts) Report {
	r := Report{Source: src.Describe(), Destination: dst.Describe()}
	r.Checks = append(r.Checks,
		checkMachine(src.Machine, src.Major, src.Minor, dst.Machine, dst.Major, dst.Minor),
		checkVersion(src.Version, src.Major, src.Minor, dst.Version, dst.Major, dst.Minor),
		checkStatus(src.Status, dst.Status),
		checkRAMBlocks(src, dst),
		checkDevices(src.Devices, dst.Devices),
		checkCapabilities(src.Capabilities, dst.Capabilities),
		checkUUID(src, dst),
		checkMemoryBackends(src, dst),
	)
	r.finish()
	return r
}

var machineVersionRE = regexp.MustCompile(`^(.+)-(\d+)\.(\d+)(\.\d+)?$`)

// machineVersion splits a versioned machine type: "pc-q35-7.2" → "pc-q35", 7, 2.
func machineVersion(m string) (family string, major, minor int, ok bool) {
	p := machineVersionRE.FindStringSubmatch(m)
	if p == nil {
		return "", 0, 0, false
	}
	major, err1 := strconv.Atoi(p[2])
	minor, err2 := strconv.Atoi(p[3])
	if err1 != nil || err2 != nil {
		return "", 0, 0, false
	}
	return p[1], major, minor, true
}

// familyAlias is the alias QEMU gives the newest type of a family.
var familyAlias = map[string]string{"pc-q35": "q35", "pc-i440fx": "pc"}

// aliasNote says "(what -machine q35 gives on QEMU 10.0)" when machine is the newest type of its
// family on a QEMU of that version — the usual reason two sides differ.
func aliasNote(machine string, major, minor int) string {
	fam, ma, mi, ok := machineVersion(machine)
	if !ok || ma != major || mi != minor {
		return ""
	}
	if a, ok := familyAlias[fam]; ok {
		return fmt.Sprintf(" (what -machine %s gives on QEMU %d.%d)", a, major, minor)
	}
	return fmt.Sprintf(" (the newest %s type of QEMU %d.%d)", fam, major, minor)
}

func older(aMaj, aMin, bMaj, bMin int) bool { return aMaj < bMaj || aMaj == bMaj && aMin < bMin }

func checkMachine(srcM string, srcMaj, srcMin int, dstM string, dstMaj, dstMin int) Check {
	c := Check{Name: "machine", Source: srcM, Destination: dstM}
	if srcM == dstM {
		c.Severity, c.Message = SeverityOK, srcM+" on both sides"
		return c
	}
	c.Severity = SeverityError
	what := fmt.Sprintf("source runs %s%s, destination %s%s: QEMU refuses a different machine type",
		srcM, aliasNote(srcM, srcMaj, srcMin), dstM, aliasNote(dstM, dstMaj, dstMin))
	fam, ma, mi, ok := machineVersion(srcM)
	switch {
	case ok && older(dstMaj, dstMin, ma, mi):
		// The destination's QEMU predates the source's type: it cannot run it.
		c.Message = fmt.Sprintf("%s; QEMU %d.%d has no %s: start the source with a versioned type both QEMUs know (e.g. -machine %s-%d.%d) or upgrade the destination",
			what, dstMaj, dstMin, srcM, fam, dstMaj, dstMin)
	default:
		c.Message = fmt.Sprintf("%s; start the destination with -machine %s (the source's exact type; an alias like q35 means the newest type of each QEMU version)",
			what, srcM)
	}
	return c
}

func checkVersion(srcV string, srcMaj, srcMin int, dstV string, dstMaj, dstMin int) Check {
	c := Check{Name: "version", Source: srcV, Destination: dstV}
	switch {
	case older(dstMaj, dstMin, srcMaj, srcMin):
		c.Severity = SeverityError
		c.Message = fmt.Sprintf("destination QEMU %s is older than source %s: QEMU does not support migrating to an older version (a simple guest may happen to load, nothing guarantees the newer device state is understood); run the destination on QEMU %d.%d or newer",
			dstV, srcV, srcMaj, srcMin)
	case srcMaj == dstMaj && srcMin == dstMin:
		c.Severity = SeverityOK
		c.Message = fmt.Sprintf("QEMU %s to %s (same version)", srcV, dstV)
	default:
		c.Severity = SeverityOK
		c.Message = fmt.Sprintf("QEMU %s to newer %s (forward migration is supported with a versioned machine type)", srcV, dstV)
	}
	return c
}

func checkStatus(srcS, dstS string) Check {
	c := Check{Name: "status", Source: srcS, Destination: dstS}
	sev, srcMsg := sourceStatus(srcS)
	c.Severity = sev
	var dstMsg string
	if dstS == "inmigrate" {
		dstMsg = "destination waits for the stream (inmigrate)"
	} else {
		c.Severity = SeverityError
		dstMsg = fmt.Sprintf("destination is %q, not waiting for a migration: start it with -incoming (tcp:HOST:PORT, unix:PATH or defer)", dstS)
	}
	if c.Severity == SeverityOK {
		c.Message = fmt.Sprintf("source %s, destination inmigrate", srcS)
	} else {
		c.Message = srcMsg + "; " + dstMsg
	}
	return c
}

// sourceStatus judges the source's run state.
func sourceStatus(s string) (Severity, string) {
	switch s {
	case "running", "paused":
		return SeverityOK, "source " + s
	case "prelaunch":
		return SeverityInfo, "source has not started its guest yet (prelaunch, -S): it migrates as it is"
	case "postmigrate":
		return SeverityWarning, "source has already migrated (postmigrate): its guest may be running elsewhere"
	case "inmigrate":
		return SeverityError, "source is itself waiting for an incoming migration (inmigrate): give the QMP socket of the VM that runs the guest"
	case "":
		return SeverityError, "source run state unknown"
	}
	return SeverityWarning, fmt.Sprintf("source is %q: migrating a VM in this state is unusual", s)
}

func checkRAMBlocks(src, dst Facts) Check {
	c := Check{Name: "ramblocks", Source: blocksSummary(src.RAMBlocks), Destination: blocksSummary(dst.RAMBlocks)}
	var problems, notes []string
	pageSizeDiffers := false
	fatal := false // QEMU itself fails the load (not just a different configuration)
	fix := "start the destination with the same -m, memory backends and devices as the source"
	mainSrc, _ := src.MainRAM()
	for _, sb := range src.RAMBlocks {
		db, ok := dst.Block(sb.Name)
		if !ok {
			problems = append(problems, fmt.Sprintf("%s (%s) missing on destination", sb.Name, sizeString(sb.Used)))
			fatal = true
			continue
		}
		if sb.Used != db.Used {
			if sb.Resizable() && sb.Used <= db.Total {
				notes = append(notes, fmt.Sprintf("%s is resizable: %s on source, %s on destination (QEMU resizes it)",
					sb.Name, sizeString(sb.Used), sizeString(db.Used)))
			} else {
				problems = append(problems, fmt.Sprintf("%s: %s on source, %s on destination", sb.Name,
					sizeString(sb.Used), sizeString(db.Used)))
				fatal = true
				if sb.Name == mainSrc.Name {
					fix = fmt.Sprintf("start the destination with -m %dM like the source", sb.Used>>20)
				}
			}
		}
		if sb.PageSize != db.PageSize {
			pageSizeDiffers = true
			notes = append(notes, fmt.Sprintf("%s page size %s on source, %s on destination (postcopy would refuse it)",
				sb.Name, sizeString(sb.PageSize), sizeString(db.PageSize)))
		}
	}
	for _, db := range dst.RAMBlocks {
		if _, ok := src.Block(db.Name); !ok {
			problems = append(problems, fmt.Sprintf("%s (%s) only on destination", db.Name, sizeString(db.Used)))
		}
	}
	switch {
	case len(problems) > 0:
		c.Severity = SeverityError
		if fatal {
			fix = "QEMU fails the load (size mismatch or unknown RAM block); " + fix
		} else {
			fix = "QEMU would load the stream, but the destination is not the same VM; " + fix
		}
		c.Message = listSome(problems, 4) + ": " + fix
	case len(notes) > 0:
		c.Severity = SeverityInfo
		if pageSizeDiffers {
			c.Severity = SeverityWarning
		}
		c.Message = listSome(notes, 4)
	default:
		c.Severity = SeverityOK
		c.Message = fmt.Sprintf("%d blocks with the same sizes on both sides (%s %s)", len(src.RAMBlocks),
			mainSrc.Name, sizeString(mainSrc.Used))
	}
	return c
}

func blocksSummary(bs []RAMBlock) string {
	parts := make([]string, 0, len(bs))
	for _, b := range bs {
		parts = append(parts, b.Name+" "+sizeString(b.Used))
	}
	return listSome(parts, 3)
}

func checkDevices(src, dst []Device) Check {
	c := Check{Name: "devices", Source: fmt.Sprintf("%d devices", len(src)), Destination: fmt.Sprintf("%d devices", len(dst))}
	missing, extra := diffDevices(src, dst)
	if len(missing) == 0 && len(extra) == 0 {
		c.Severity = SeverityOK
		c.Message = fmt.Sprintf("the same %d devices on both sides", len(src))
		return c
	}
	c.Severity = SeverityError
	var parts []string
	if len(missing) > 0 {
		parts = append(parts, "missing on destination: "+listSome(missing, 4))
	}
	if len(extra) > 0 {
		parts = append(parts, "only on destination: "+listSome(extra, 4))
	}
	why := "QEMU would load the stream, but the guest would find devices in reset state it never set up"
	if len(missing) > 0 {
		why = "QEMU fails the load (unknown savevm section) for a device the destination lacks"
	}
	c.Message = strings.Join(parts, "; ") + ": " + why + "; start the destination with the same -device options (and machine type) as the source"
	return c
}

// diffDevices returns the keys (as short descriptions) present on one side more often than on
// the other.
func diffDevices(src, dst []Device) (missing, extra []string) {
	count := map[string]int{}
	show := map[string]string{}
	for _, d := range src {
		count[d.Key()]++
		show[d.Key()] = deviceShort(d)
	}
	for _, d := range dst {
		count[d.Key()]--
		show[d.Key()] = deviceShort(d)
	}
	keys := make([]string, 0, len(count))
	for k := range count {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		for n := count[k]; n > 0; n-- {
			missing = append(missing, show[k])
		}
		for n := count[k]; n < 0; n++ {
			extra = append(extra, show[k])
		}
	}
	return missing, extra
}

// deviceShort is how a message names a device: `virtio-rng-pci "rng0" at
// pcie.0/pcie-root-port@02.0/rp1 slot 00.0` (the last three elements of its bus path).
func deviceShort(d Device) string {
	s := d.Type
	if d.ID != "" {
		s += fmt.Sprintf(" %q", d.ID)
	}
	p := strings.Split(d.Path, "/")
	if len(p) > 3 {
		p = p[len(p)-3:]
	}
	s += " at " + strings.Join(p, "/")
	if d.Addr != "" {
		s += " slot " + d.Addr
	}
	return s
}

// validatedCaps are the capabilities the destination compares with the configuration section
// it receives (QEMU 7.2: x-ignore-shared; 10.0 adds mapped-ram).
var validatedCaps = []string{"x-ignore-shared", "mapped-ram"}

// pairedCaps change the stream's shape so that the destination must have them set too.
var pairedCaps = []string{"multifd", "postcopy-ram"}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func checkCapabilities(src, dst map[string]bool) Check {
	c := Check{Name: "capabilities", Source: capsOn(src), Destination: capsOn(dst)}
	var errs, warns []string
	for _, name := range validatedCaps {
		s, sKnown := src[name]
		d, dKnown := dst[name]
		switch {
		case s && !dKnown:
			errs = append(errs, fmt.Sprintf("%s is on on the source but the destination QEMU does not know it", name))
		case sKnown && dKnown && s != d:
			errs = append(errs, fmt.Sprintf("%s is %s on the source, %s on the destination", name, onOff(s), onOff(d)))
		case !sKnown && d:
			errs = append(errs, fmt.Sprintf("%s is on on the destination, unknown to the source", name))
		}
	}
	for _, name := range pairedCaps {
		if s, d := src[name], dst[name]; s != d {
			warns = append(warns, fmt.Sprintf("%s is %s on the source, %s on the destination: both sides must agree for QEMU to QEMU streams", name, onOff(s), onOff(d)))
		}
	}
	switch {
	case len(errs) > 0:
		c.Severity = SeverityError
		c.Message = strings.Join(errs, "; ") + ": the destination refuses the configuration section; set them the same on both sides (migrate-set-capabilities)"
	case len(warns) > 0:
		c.Severity = SeverityWarning
		c.Message = strings.Join(warns, "; ")
	default:
		c.Severity = SeverityOK
		c.Message = fmt.Sprintf("x-ignore-shared %s on both sides", onOff(src["x-ignore-shared"]))
	}
	return c
}

func capsOn(m map[string]bool) string {
	var on []string
	for k, v := range m {
		if v {
			on = append(on, k)
		}
	}
	sort.Strings(on)
	if len(on) == 0 {
		return "none on"
	}
	return strings.Join(on, ",")
}

const zeroUUID = "00000000-0000-0000-0000-000000000000"

func hasUUID(u string) bool { return u != "" && u != zeroUUID }

func checkUUID(src, dst Facts) Check {
	c := Check{Name: "uuid", Source: src.UUID, Destination: dst.UUID}
	validate := src.Capabilities["validate-uuid"]
	switch {
	case validate && hasUUID(src.UUID) && !hasUUID(dst.UUID):
		c.Severity = SeverityWarning
		c.Message = fmt.Sprintf("validate-uuid is on but the destination has no -uuid: QEMU only warns; start it with -uuid %s", src.UUID)
	case validate && hasUUID(src.UUID) && !strings.EqualFold(src.UUID, dst.UUID):
		c.Severity = SeverityError
		c.Message = fmt.Sprintf("validate-uuid is on and the UUIDs differ (source %s, destination %s): the destination refuses the stream; start it with -uuid %s",
			src.UUID, dst.UUID, src.UUID)
	case validate && hasUUID(src.UUID):
		c.Severity = SeverityOK
		c.Message = "validate-uuid on, same UUID on both sides"
	case !hasUUID(src.UUID) && !hasUUID(dst.UUID):
		c.Severity = SeverityOK
		c.Message = "no -uuid on either side"
	case !hasUUID(src.UUID):
		c.Severity = SeverityInfo
		c.Message = fmt.Sprintf("the source has no -uuid, the destination %s: the guest sees that UUID after its next reboot", dst.UUID)
	case !strings.EqualFold(src.UUID, dst.UUID):
		c.Severity = SeverityWarning
		c.Message = fmt.Sprintf("UUIDs differ (source %s, destination %s) and validate-uuid is off: the guest sees the destination's UUID after its next reboot; start the destination with -uuid %s",
			src.UUID, orNone(dst.UUID), src.UUID)
	default:
		c.Severity = SeverityOK
		c.Message = "same UUID on both sides (validate-uuid off)"
	}
	return c
}

func orNone(u string) string {
	if !hasUUID(u) {
		return "none"
	}
	return u
}

// ignoresShared reports whether a QEMU of this version with x-ignore-shared leaves the block of
// backend m out of the stream: every shared block before 8.1, only shared named files since.
func ignoresShared(f Facts, m MemoryBackend) bool {
	if !m.Share {
		return false
	}
	return m.NamedFile() || !f.AtLeast(8, 1)
}

func checkMemoryBackends(src, dst Facts) Check {
	c := Check{Name: "memory-backends", Source: backendsSummary(src), Destination: backendsSummary(dst)}
	ignore := src.Capabilities["x-ignore-shared"]
	var errs, notes []string
	for _, sb := range src.RAMBlocks {
		sm, ok := src.Backend(sb.Name)
		if !ok {
			continue
		}
		dm, dok := dst.Backend(sb.Name)
		if dok && sm.Size != dm.Size {
			errs = append(errs, fmt.Sprintf("backend %s is %s on the source, %s on the destination: give it size=%d",
				sm.ID, sizeString(sm.Size), sizeString(dm.Size), sm.Size))
		}
		switch {
		case ignore && ignoresShared(src, sm) && !sm.NamedFile():
			errs = append(errs, fmt.Sprintf("%s is %s and QEMU %s with x-ignore-shared skips it, but no other process can map it: its content would be lost; use memory-backend-file,share=on or turn x-ignore-shared off",
				sb.Name, sm, src.Version))
		case ignore && ignoresShared(src, sm):
			// The destination must map the very same file: nothing of it is sent.
			switch {
			case !dok:
				errs = append(errs, fmt.Sprintf("%s is %s and is not sent (x-ignore-shared), but the destination has no backend %s: give it memory-backend-file,id=%s,mem-path=%s,share=on",
					sb.Name, sm, sm.ID, sm.ID, sm.MemPath))
			case !dm.NamedFile() || !dm.Share:
				errs = append(errs, fmt.Sprintf("%s is not sent (x-ignore-shared) but the destination's backend is %s, not the source's file: use memory-backend-file,mem-path=%s,share=on",
					sb.Name, dm, sm.MemPath))
			case dm.MemPath != sm.MemPath:
				errs = append(errs, fmt.Sprintf("%s is not sent (x-ignore-shared) but the destination maps %s, the source %s: the destination must map the source's file (mem-path=%s)",
					sb.Name, dm.MemPath, sm.MemPath, sm.MemPath))
			default:
				notes = append(notes, fmt.Sprintf("%s shared through %s on both sides, not sent (x-ignore-shared)", sb.Name, sm.MemPath))
			}
		case ignore && sm.Share:
			notes = append(notes, fmt.Sprintf("%s is %s: sent normally (QEMU ≥ 8.1 skips only named files)", sb.Name, sm))
		case !ignore && sm.NamedFile() && sm.Share && dok && dm.NamedFile() && dm.Share && dm.MemPath == sm.MemPath:
			errs = append(errs, fmt.Sprintf("%s: both sides map %s shared and x-ignore-shared is off: the destination would write the stream's pages into the file the running source uses; turn x-ignore-shared on on both sides or give the destination its own mem-path",
				sb.Name, sm.MemPath))
		case dok && sm.Type != dm.Type:
			notes = append(notes, fmt.Sprintf("%s: %s on the source, %s on the destination (content is sent)", sb.Name, sm, dm))
		}
	}
	switch {
	case len(errs) > 0:
		c.Severity = SeverityError
		c.Message = listSome(errs, 3)
	case len(notes) > 0:
		c.Severity = SeverityInfo
		c.Message = listSome(notes, 3)
	default:
		c.Severity = SeverityOK
		c.Message = backendsSummary(src)
		if c.Message == "" {
			c.Message = "no memory backends reported"
		} else {
			c.Message += fmt.Sprintf("; x-ignore-shared %s", onOff(ignore))
		}
	}
	return c
}

func backendsSummary(f Facts) string {
	parts := make([]string, 0, len(f.MemoryBackends))
	for _, m := range f.MemoryBackends {
		parts = append(parts, fmt.Sprintf("%s: %s %s", m.ID, m, sizeString(m.Size)))
	}
	return listSome(parts, 3)
}
