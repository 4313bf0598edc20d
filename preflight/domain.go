package preflight

import (
	"fmt"
	"math"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// MaxDomainXML is the largest domain XML ParseDomainXML accepts (real ones are a few KiB).
const MaxDomainXML = 4 << 20

// Domain is what a libvirt domain XML says that matters for a migration's destination.
type Domain struct {
	Name          string        `json:"name"`
	UUID          string        `json:"uuid,omitempty"`
	Type          string        `json:"type"`                 // "kvm", "qemu"
	Arch          string        `json:"arch,omitempty"`       // "x86_64"
	Machine       string        `json:"machine"`              // as written: "pc-q35-7.2", or an alias like "q35"
	Emulator      string        `json:"emulator"`             // <devices><emulator>, "" when not given
	MemoryBytes   uint64        `json:"memory_bytes"`         // <memory>
	CurrentBytes  uint64        `json:"current_bytes"`        // <currentMemory> (balloon target), 0 when absent
	MemoryBacking MemoryBacking `json:"memory_backing"`       // <memoryBacking>
	NUMASharedRAM bool          `json:"numa_shared_ram"`      // some <cpu><numa><cell memAccess='shared'>
	NUMACells     int           `json:"numa_cells"`           // number of NUMA cells (0: none)
	MemoryDevices int           `json:"memory_devices"`       // <memory> devices (DIMMs, virtio-mem …)
	MaxMemory     uint64        `json:"max_memory,omitempty"` // <maxMemory> (memory hotplug), 0 when absent
	Live          bool          `json:"live,omitempty"`       // the XML is a running domain's (has id=)
}

// MemoryBacking is <memoryBacking>: where libvirt puts guest RAM.
type MemoryBacking struct {
	Source    string     `json:"source,omitempty"` // "file", "memfd", "anonymous" or "" (libvirt's default)
	Access    string     `json:"access,omitempty"` // "shared", "private" or ""
	Hugepages []HugePage `json:"hugepages,omitempty"`
	HasHuge   bool       `json:"has_hugepages,omitempty"` // <hugepages> present (maybe without <page>)
	Locked    bool       `json:"locked,omitempty"`
	Discard   bool       `json:"discard,omitempty"`
}

// HugePage is one <hugepages><page>: size 0 means the host's default hugepage size.
type HugePage struct {
	SizeBytes uint64 `json:"size_bytes"`
	Nodeset   string `json:"nodeset,omitempty"`
}

// Shared reports whether guest RAM is mapped shared (memory access mode shared).
func (m MemoryBacking) Shared() bool { return m.Access == "shared" }

// Describe is the one-line summary used in reports.
func (d Domain) Describe() string {
	s := fmt.Sprintf("domain %s, %s", d.Name, d.Machine)
	if d.Emulator != "" {
		s += ", " + d.Emulator
	}
	return s
}

// ParseDomainXML reads a libvirt domain XML (virsh dumpxml, or what libvirt's qemu hook gets on
// stdin). It refuses input above MaxDomainXML and XML that is not a <domain>.
func ParseDomainXML(b []byte) (Domain, error) {
	var d Domain
	if len(b) > MaxDomainXML {
		return d, fmt.Errorf("domain XML: %d bytes, more than the %d a domain can reasonably have", len(b), MaxDomainXML)
	}
	if len(strings.TrimSpace(string(b))) == 0 {
		return d, fmt.Errorf("domain XML: empty input")
	}
	var x libvirtxml.Domain
	if err := x.Unmarshal(string(b)); err != nil {
		return d, fmt.Errorf("domain XML: %v", oneLine(err.Error()))
	}
	if x.XMLName.Local != "domain" {
		return d, fmt.Errorf("domain XML: root element is <%s>, not <domain>", clip(x.XMLName.Local, 40))
	}
	d.Name, d.UUID, d.Type, d.Live = x.Name, x.UUID, x.Type, x.ID != nil
	if x.OS != nil && x.OS.Type != nil {
		d.Arch, d.Machine = x.OS.Type.Arch, x.OS.Type.Machine
	}
	if x.Devices != nil {
		d.Emulator = strings.TrimSpace(x.Devices.Emulator)
		d.MemoryDevices = len(x.Devices.Memorydevs)
	}
	var err error
	if x.Memory != nil {
		if d.MemoryBytes, err = libvirtBytes(uint64(x.Memory.Value), x.Memory.Unit); err != nil {
			return d, fmt.Errorf("domain XML: <memory>: %w", err)
		}
	}
	if x.CurrentMemory != nil {
		if d.CurrentBytes, err = libvirtBytes(uint64(x.CurrentMemory.Value), x.CurrentMemory.Unit); err != nil {
			return d, fmt.Errorf("domain XML: <currentMemory>: %w", err)
		}
	}
	if x.MaximumMemory != nil {
		if d.MaxMemory, err = libvirtBytes(uint64(x.MaximumMemory.Value), x.MaximumMemory.Unit); err != nil {
			return d, fmt.Errorf("domain XML: <maxMemory>: %w", err)
		}
	}
	if mb := x.MemoryBacking; mb != nil {
		if mb.MemorySource != nil {
			d.MemoryBacking.Source = mb.MemorySource.Type
		}
		if mb.MemoryAccess != nil {
			d.MemoryBacking.Access = mb.MemoryAccess.Mode
		}
		d.MemoryBacking.Locked = mb.MemoryLocked != nil
		d.MemoryBacking.Discard = mb.MemoryDiscard != nil
		if mb.MemoryHugePages != nil {
			d.MemoryBacking.HasHuge = true
			for _, p := range mb.MemoryHugePages.Hugepages {
				unit := p.Unit
				if unit == "" {
					unit = "KiB" // libvirt's default unit for <page size>
				}
				n, err := libvirtBytes(uint64(p.Size), unit)
				if err != nil {
					return d, fmt.Errorf("domain XML: <hugepages><page>: %w", err)
				}
				d.MemoryBacking.Hugepages = append(d.MemoryBacking.Hugepages, HugePage{SizeBytes: n, Nodeset: p.Nodeset})
			}
		}
	}
	if x.CPU != nil && x.CPU.Numa != nil {
		d.NUMACells = len(x.CPU.Numa.Cell)
		for _, c := range x.CPU.Numa.Cell {
			if c.MemAccess == "shared" {
				d.NUMASharedRAM = true
			}
		}
	}
	if d.Machine == "" {
		return d, fmt.Errorf("domain XML: no <os><type machine='…'>: cannot tell the machine type")
	}
	return d, nil
}

// libvirtBytes converts a libvirt scaled integer (unit default KiB) to bytes.
func libvirtBytes(v uint64, unit string) (uint64, error) {
	var mult uint64
	switch unit {
	case "b", "bytes":
		mult = 1
	case "", "k", "K", "KiB":
		mult = 1 << 10
	case "KB":
		mult = 1000
	case "m", "M", "MiB":
		mult = 1 << 20
	case "MB":
		mult = 1000 * 1000
	case "g", "G", "GiB":
		mult = 1 << 30
	case "GB":
		mult = 1000 * 1000 * 1000
	case "t", "T", "TiB":
		mult = 1 << 40
	case "TB":
		mult = 1000 * 1000 * 1000 * 1000
	case "p", "P", "PiB":
		mult = 1 << 50
	case "PB":
		mult = 1000 * 1000 * 1000 * 1000 * 1000
	case "e", "E", "EiB":
		mult = 1 << 60
	case "EB":
		mult = 1000 * 1000 * 1000 * 1000 * 1000 * 1000
	default:
		return 0, fmt.Errorf("unknown unit %q", clip(unit, 20))
	}
	if v > math.MaxUint64/mult {
		return 0, fmt.Errorf("%d %s overflows", v, unit)
	}
	return v * mult, nil
}
