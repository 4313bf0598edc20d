package preflight

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// Facts is everything preflight learns from one running QEMU through QMP.
type Facts struct {
	Version      string          `json:"version"` // "7.2.22"
	Major        int             `json:"major"`
	Minor        int             `json:"minor"`
	Micro        int             `json:"micro"`
	Package      string          `json:"package,omitempty"` // distribution's package version
	Status       string          `json:"status"`            // query-status: "running", "inmigrate", …
	Machine      string          `json:"machine"`           // exact type, never an alias: "pc-q35-7.2"
	RAMBlocks    []RAMBlock      `json:"ramblocks"`
	Devices      []Device        `json:"devices"` // from info qtree, sorted by Key
	PCI          []PCIDevice     `json:"pci"`     // from query-pci: what it can see (see PCIDevice)
	Capabilities map[string]bool `json:"capabilities"`
	UUID         string          `json:"uuid"` // "00000000-…" when QEMU has no -uuid
	// MachineMemory is the id of the backend of the machine's main RAM (qom-get /machine
	// memory-backend), "" when QEMU does not say.
	MachineMemory  string          `json:"machine_memory,omitempty"`
	MemoryBackends []MemoryBackend `json:"memory_backends"`
	// Notes are things Gather could not learn (optional queries that failed).
	Notes []string `json:"notes,omitempty"`
}

// PCIDevice is one entry of query-pci. The bus numbers are the ones the guest's firmware
// programmed: behind a bridge they are 0 on a QEMU that has not run its guest (a destination in
// inmigrate), whose query-pci then lists no device behind the bridge at all. Compare therefore
// compares Devices (from info qtree); PCI is reported for information.
type PCIDevice struct {
	Bus      int    `json:"bus"`
	Slot     int    `json:"slot"`
	Function int    `json:"function"`
	Vendor   uint16 `json:"vendor"`
	Device   uint16 `json:"device"`
	Class    uint16 `json:"class"`
	QdevID   string `json:"qdev_id,omitempty"`
}

// MemoryBackend is one memory backend object (query-memdev, with its QOM type and mem-path).
type MemoryBackend struct {
	ID      string `json:"id"`
	Type    string `json:"type,omitempty"` // "memory-backend-ram", "-file", "-memfd", "-shm"
	Size    uint64 `json:"size"`
	Share   bool   `json:"share"`
	MemPath string `json:"mem_path,omitempty"` // file backends
	HugeTLB bool   `json:"hugetlb,omitempty"`  // memfd backends with hugetlb=on
}

// NamedFile reports whether the backend is a file QEMU maps by name — the only kind a second
// QEMU can map too, and (since QEMU 8.1) the only shared kind x-ignore-shared skips.
func (m MemoryBackend) NamedFile() bool { return m.Type == "memory-backend-file" }

// String describes the backend in a few words: "memory-backend-file share=on /dev/shm/vm1".
func (m MemoryBackend) String() string {
	s := m.Type
	if s == "" {
		s = "memory backend"
	}
	if m.Share {
		s += " share=on"
	}
	if m.MemPath != "" {
		s += " " + m.MemPath
	}
	return s
}

// Describe is the one-line summary used as a Report's Source or Destination.
func (f Facts) Describe() string {
	return fmt.Sprintf("QEMU %s, %s", f.Version, f.Machine)
}

// AtLeast reports whether the QEMU is major.minor or newer.
func (f Facts) AtLeast(major, minor int) bool {
	return f.Major > major || f.Major == major && f.Minor >= minor
}

// Backend returns the memory backend whose RAM block is named block ("ram0", or
// "/objects/ram0" for machine types ≤ 4.0 that name blocks by their canonical path).
func (f Facts) Backend(block string) (MemoryBackend, bool) {
	for _, m := range f.MemoryBackends {
		if m.ID == block || "/objects/"+m.ID == block {
			return m, true
		}
	}
	return MemoryBackend{}, false
}

// Block returns the RAM block named name.
func (f Facts) Block(name string) (RAMBlock, bool) {
	for _, b := range f.RAMBlocks {
		if b.Name == name {
			return b, true
		}
	}
	return RAMBlock{}, false
}

// MainRAM returns the RAM block of the machine's main memory: the block of the machine's
// memory backend, else "pc.ram", else the largest block.
func (f Facts) MainRAM() (RAMBlock, bool) {
	if f.MachineMemory != "" {
		for _, b := range f.RAMBlocks {
			if b.Name == f.MachineMemory || b.Name == "/objects/"+f.MachineMemory {
				return b, true
			}
		}
	}
	if b, ok := f.Block("pc.ram"); ok {
		return b, true
	}
	var best RAMBlock
	for _, b := range f.RAMBlocks {
		if b.Used > best.Used {
			best = b
		}
	}
	return best, best.Name != ""
}

// Gather asks one running QEMU for everything Compare needs. Every QMP call is bounded by ctx
// (and by qmp.DefaultTimeout when ctx has no deadline). Queries that only add detail (memory
// backends' types and paths, the machine's memory backend, query-pci) are recorded in Notes
// when they fail; the others make Gather fail.
func Gather(ctx context.Context, c *qmp.Client) (Facts, error) {
	var f Facts
	v, err := c.QueryVersion(ctx)
	if err != nil {
		return f, fmt.Errorf("preflight: query-version: %w", err)
	}
	f.Version, f.Major, f.Minor, f.Micro = v.String(), v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro
	f.Package = strings.TrimSpace(v.Package)
	st, err := c.QueryStatus(ctx)
	if err != nil {
		return f, fmt.Errorf("preflight: query-status: %w", err)
	}
	f.Status = st.Status
	if f.Machine, err = c.MachineType(ctx); err != nil {
		return f, fmt.Errorf("preflight: machine type: %w", err)
	}
	out, err := c.HMP(ctx, "info ramblock")
	if err != nil {
		return f, fmt.Errorf("preflight: info ramblock: %w", err)
	}
	if f.RAMBlocks, err = ParseRAMBlocks(out); err != nil {
		return f, fmt.Errorf("preflight: %w", err)
	}
	if out, err = c.HMP(ctx, "info qtree"); err != nil {
		return f, fmt.Errorf("preflight: info qtree: %w", err)
	}
	if f.Devices, err = ParseQtree(out); err != nil {
		return f, fmt.Errorf("preflight: %w", err)
	}
	if f.Capabilities, err = c.QueryCapabilities(ctx); err != nil {
		return f, fmt.Errorf("preflight: query-migrate-capabilities: %w", err)
	}
	var uuid struct {
		UUID string `json:"UUID"`
	}
	if err := c.Execute(ctx, "query-uuid", nil, &uuid); err != nil {
		return f, fmt.Errorf("preflight: query-uuid: %w", err)
	}
	f.UUID = uuid.UUID

	note := func(what string, err error) error {
		var ce *qmp.CommandError
		if errors.As(err, &ce) {
			f.Notes = append(f.Notes, fmt.Sprintf("%s: %s", what, ce.Desc))
			return nil
		}
		return fmt.Errorf("preflight: %s: %w", what, err) // the connection failed: stop
	}
	var pci []pciBus
	if err := c.Execute(ctx, "query-pci", nil, &pci); err != nil {
		if err := note("query-pci", err); err != nil {
			return f, err
		}
	}
	f.PCI = flattenPCI(pci)

	var mm string
	if err := c.Execute(ctx, "qom-get", map[string]any{"path": "/machine", "property": "memory-backend"}, &mm); err != nil {
		if err := note("machine memory-backend", err); err != nil {
			return f, err
		}
	}
	f.MachineMemory = strings.TrimPrefix(mm, "/objects/")

	var memdevs []struct {
		ID    string `json:"id"`
		Size  uint64 `json:"size"`
		Share bool   `json:"share"`
	}
	if err := c.Execute(ctx, "query-memdev", nil, &memdevs); err != nil {
		if err := note("query-memdev", err); err != nil {
			return f, err
		}
	}
	for _, m := range memdevs {
		if len(f.MemoryBackends) == maxRAMBlocks {
			break
		}
		b := MemoryBackend{ID: m.ID, Size: m.Size, Share: m.Share}
		path := "/objects/" + m.ID
		if err := c.Execute(ctx, "qom-get", map[string]any{"path": path, "property": "type"}, &b.Type); err != nil {
			if err := note("type of "+path, err); err != nil {
				return f, err
			}
		}
		switch b.Type {
		case "memory-backend-file":
			if err := c.Execute(ctx, "qom-get", map[string]any{"path": path, "property": "mem-path"}, &b.MemPath); err != nil {
				if err := note("mem-path of "+path, err); err != nil {
					return f, err
				}
			}
		case "memory-backend-memfd":
			if err := c.Execute(ctx, "qom-get", map[string]any{"path": path, "property": "hugetlb"}, &b.HugeTLB); err != nil {
				if err := note("hugetlb of "+path, err); err != nil {
					return f, err
				}
			}
		}
		f.MemoryBackends = append(f.MemoryBackends, b)
	}
	sort.Slice(f.MemoryBackends, func(i, j int) bool { return f.MemoryBackends[i].ID < f.MemoryBackends[j].ID })
	return f, nil
}

// pciBus is query-pci's PciInfo; only the members preflight reads.
type pciBus struct {
	Bus     int         `json:"bus"`
	Devices []pciDevice `json:"devices"`
}

type pciDevice struct {
	Bus       int    `json:"bus"`
	Slot      int    `json:"slot"`
	Function  int    `json:"function"`
	QdevID    string `json:"qdev_id"`
	ClassInfo struct {
		Class uint16 `json:"class"`
	} `json:"class_info"`
	ID struct {
		Vendor uint16 `json:"vendor"`
		Device uint16 `json:"device"`
	} `json:"id"`
	Bridge *struct {
		Devices []pciDevice `json:"devices"`
	} `json:"pci_bridge"`
}

// flattenPCI lists every device of query-pci's tree (bounded in depth and count: the reply is
// untrusted input).
func flattenPCI(buses []pciBus) []PCIDevice {
	var out []PCIDevice
	var walk func(devs []pciDevice, depth int)
	walk = func(devs []pciDevice, depth int) {
		if depth > 32 {
			return
		}
		for _, d := range devs {
			if len(out) >= maxQtreeDevices {
				return
			}
			out = append(out, PCIDevice{Bus: d.Bus, Slot: d.Slot, Function: d.Function,
				Vendor: d.ID.Vendor, Device: d.ID.Device, Class: d.ClassInfo.Class, QdevID: d.QdevID})
			if d.Bridge != nil {
				walk(d.Bridge.Devices, depth+1)
			}
		}
	}
	for _, b := range buses {
		walk(b.Devices, 0)
	}
	return out
}
