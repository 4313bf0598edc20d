package preflight

import (
	"fmt"
	"sort"
	"strings"
)

// Device is one device of HMP `info qtree`, placed by a path that does not depend on what the
// guest's firmware did: bus names and, for a bus that belongs to a device, that device's type and
// PCI slot.function — never the PCI bus numbers, which the firmware assigns to bridges (a
// destination waiting in inmigrate still has them all 0, so query-pci cannot even list the
// devices behind a bridge there).
type Device struct {
	Type    string `json:"type"`               // QOM type: "virtio-blk-pci", "isa-serial"
	ID      string `json:"id,omitempty"`       // qdev id ("" when none)
	Bus     string `json:"bus"`                // name of the bus it sits on: "pcie.0", "isa.0"
	Path    string `json:"path"`               // that bus's path: "main-system-bus/q35-pcihost/pcie.0"
	BusType string `json:"bus_type,omitempty"` // QOM type of that bus: "PCIE", "ISA", "System"
	Addr    string `json:"addr,omitempty"`     // PCI slot.function on its bus ("01.0")
	PCIID   string `json:"pci_id,omitempty"`   // vendor:device ("1af4:1001")
	Class   string `json:"class,omitempty"`    // PCI class as QEMU names it ("SCSI controller")
}

// Key identifies the device for comparing two QEMUs: path, type, PCI slot and ids. The qdev id
// is left out: it is not in the stream (sections are named by type and bus address), and libvirt
// names devices ("serial0") that a hand-written destination leaves unnamed.
func (d Device) Key() string {
	var b strings.Builder
	b.WriteString(d.Path)
	b.WriteByte('/')
	b.WriteString(d.Type)
	if d.Addr != "" {
		b.WriteString("@" + d.Addr)
	}
	if d.PCIID != "" {
		b.WriteString("[" + d.PCIID + "]")
	}
	return b.String()
}

// OnPCI reports whether the device sits on a PCI or PCI Express bus.
func (d Device) OnPCI() bool { return isPCIBus(d.BusType) }

func isPCIBus(t string) bool { return t == "PCI" || t == "PCIE" || t == "CXL" }

const (
	maxQtreeDepth   = 256
	maxQtreeDevices = 1 << 16
)

// ParseQtree parses HMP `info qtree` (same layout in QEMU 7.2 and 10.0: two spaces of indent per
// level, "bus: NAME" and "type T" lines, "dev: TYPE, id "ID"" lines, then the device's
// properties, then its child buses) into the devices, sorted by key.
func ParseQtree(text string) ([]Device, error) {
	if len(text) > maxHMPText {
		return nil, fmt.Errorf("info qtree: output too large (%d bytes)", len(text))
	}
	type node struct {
		indent int
		bus    bool
		path   string // bus: its own path; device: its label within the bus path
		busTyp string
		dev    int // index in devs for a device node
	}
	var (
		devs   []Device
		stack  []node
		sawBus bool
	)
	for n, line := range strings.Split(text, "\n") {
		trimmed := strings.TrimLeft(line, " ")
		if strings.TrimSpace(trimmed) == "" {
			continue
		}
		trimmed = strings.TrimRight(trimmed, " \r")
		indent := len(line) - len(strings.TrimLeft(line, " "))
		for len(stack) > 0 && stack[len(stack)-1].indent >= indent {
			stack = stack[:len(stack)-1]
		}
		var parent *node
		if len(stack) > 0 {
			parent = &stack[len(stack)-1]
		}
		switch {
		case strings.HasPrefix(trimmed, "bus: "):
			name := strings.TrimSpace(trimmed[len("bus: "):])
			path := name
			if parent != nil {
				if parent.bus {
					return nil, fmt.Errorf("info qtree: line %d: bus %q directly inside a bus", n+1, clip(name, 60))
				}
				d := devs[parent.dev]
				label := d.Type
				if d.Addr != "" {
					label += "@" + d.Addr
				}
				path = d.Path + "/" + label + "/" + name
			} else if sawBus && indent > 0 {
				return nil, fmt.Errorf("info qtree: line %d: indented bus outside any device", n+1)
			}
			sawBus = true
			if len(stack) >= maxQtreeDepth {
				return nil, fmt.Errorf("info qtree: deeper than %d levels", maxQtreeDepth)
			}
			stack = append(stack, node{indent: indent, bus: true, path: path})
		case strings.HasPrefix(trimmed, "dev: "):
			if parent == nil || !parent.bus {
				return nil, fmt.Errorf("info qtree: line %d: device outside a bus", n+1)
			}
			typ, id := parseDevLine(trimmed[len("dev: "):])
			if typ == "" {
				return nil, fmt.Errorf("info qtree: line %d: device without a type", n+1)
			}
			if len(devs) >= maxQtreeDevices {
				return nil, fmt.Errorf("info qtree: more than %d devices", maxQtreeDevices)
			}
			if len(stack) >= maxQtreeDepth {
				return nil, fmt.Errorf("info qtree: deeper than %d levels", maxQtreeDepth)
			}
			devs = append(devs, Device{Type: typ, ID: id, Path: parent.path, BusType: parent.busTyp,
				Bus: lastElem(parent.path)})
			stack = append(stack, node{indent: indent, dev: len(devs) - 1})
		default:
			if parent == nil {
				return nil, fmt.Errorf("info qtree: line %d: unexpected %q", n+1, clip(trimmed, 80))
			}
			if parent.bus {
				if t, ok := strings.CutPrefix(trimmed, "type "); ok {
					parent.busTyp = strings.TrimSpace(t)
				}
				continue
			}
			d := &devs[parent.dev]
			if v, ok := strings.CutPrefix(trimmed, "addr = "); ok && isPCIBus(d.BusType) {
				d.Addr = strings.TrimSpace(v)
			} else if strings.HasPrefix(trimmed, "class ") && strings.Contains(trimmed, ", pci id ") {
				d.Class, d.PCIID = parsePCILine(trimmed)
			}
		}
	}
	if !sawBus {
		return nil, fmt.Errorf("info qtree: no bus in %q", clip(text, 120))
	}
	sort.SliceStable(devs, func(i, j int) bool { return devs[i].Key() < devs[j].Key() })
	return devs, nil
}

// parseDevLine splits `virtio-blk-pci, id "disk0"` into type and id.
func parseDevLine(s string) (typ, id string) {
	typ, rest, found := strings.Cut(s, ",")
	typ = strings.TrimSpace(typ)
	if !found {
		return typ, ""
	}
	rest = strings.TrimSpace(rest)
	if q, ok := strings.CutPrefix(rest, "id "); ok {
		q = strings.TrimSpace(q)
		if len(q) >= 2 && q[0] == '"' && q[len(q)-1] == '"' {
			q = q[1 : len(q)-1]
		}
		id = q
	}
	return typ, id
}

// parsePCILine reads `class SCSI controller, addr 00:01.0, pci id 1af4:1001 (sub 1af4:0002)`.
func parsePCILine(s string) (class, pciID string) {
	s = strings.TrimPrefix(s, "class ")
	if i := strings.Index(s, ", addr "); i >= 0 {
		class = s[:i]
	}
	if i := strings.Index(s, ", pci id "); i >= 0 {
		f := strings.Fields(s[i+len(", pci id "):])
		if len(f) > 0 {
			pciID = f[0]
		}
	}
	return class, pciID
}

func lastElem(path string) string {
	if i := strings.LastIndexByte(path, '/'); i >= 0 {
		return path[i+1:]
	}
	return path
}
