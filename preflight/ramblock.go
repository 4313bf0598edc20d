package preflight

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// RAMBlock is one line of HMP `info ramblock`.
type RAMBlock struct {
	Name     string `json:"name"`
	PageSize uint64 `json:"page_size"` // host page size backing the block (4 KiB, 2 MiB hugepages…)
	Offset   uint64 `json:"offset"`    // ram_addr offset (not stable between QEMUs; informational)
	Used     uint64 `json:"used"`      // used length: what the stream's MEM_SIZE list carries
	Total    uint64 `json:"total"`     // max length (> used for resizable blocks)
	ReadOnly *bool  `json:"read_only,omitempty"`
}

// Resizable reports whether QEMU can resize the block to the source's length on load: the
// fw_cfg blobs ("/rom@etc/acpi/tables", "/rom@etc/table-loader", "/rom@etc/acpi/rsdp") are
// resizable RAM, everything else must match exactly.
func (b RAMBlock) Resizable() bool { return strings.HasPrefix(b.Name, "/rom@") }

// Limits of the HMP text parsers: inputs are QEMU's replies, still untrusted.
const (
	maxHMPText   = 16 << 20 // bytes of HMP output parsed
	maxRAMBlocks = 4096
)

// ParseRAMBlocks parses HMP `info ramblock`, both QEMU 7.2's five columns
//
//	Block Name    PSize              Offset               Used              Total
//	    pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000
//
// and 10.0's seven (with HVA and RO). The name column is right-aligned and may be longer than
// its header; it is everything before the page size.
func ParseRAMBlocks(text string) ([]RAMBlock, error) {
	if len(text) > maxHMPText {
		return nil, fmt.Errorf("info ramblock: output too large (%d bytes)", len(text))
	}
	var blocks []RAMBlock
	sawHeader := false
	for n, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if f[0] == "Block" && len(f) > 1 && f[1] == "Name" {
			sawHeader = true
			continue
		}
		// The offset is the first hex field right after the page size's unit; the name (which
		// may itself contain spaces or look like hex) is everything before the page size.
		i := -1
		for j := 3; j < len(f); j++ {
			if strings.HasPrefix(f[j], "0x") && sizeUnits[f[j-1]] != 0 {
				i = j
				break
			}
		}
		if i < 3 || len(f) < i+3 {
			return nil, fmt.Errorf("info ramblock: line %d: unexpected %q", n+1, clip(line, 120))
		}
		var b RAMBlock
		b.Name = strings.Join(f[:i-2], " ")
		ps, err := parseSize(f[i-2], f[i-1])
		if err != nil {
			return nil, fmt.Errorf("info ramblock: line %d: page size: %w", n+1, err)
		}
		b.PageSize = ps
		for k, dst := range []*uint64{&b.Offset, &b.Used, &b.Total} {
			v, err := strconv.ParseUint(strings.TrimPrefix(f[i+k], "0x"), 16, 64)
			if err != nil || !strings.HasPrefix(f[i+k], "0x") {
				return nil, fmt.Errorf("info ramblock: line %d: bad number %q", n+1, clip(f[i+k], 40))
			}
			*dst = v
		}
		if len(f) >= i+5 {
			switch f[i+4] {
			case "ro":
				t := true
				b.ReadOnly = &t
			case "rw":
				t := false
				b.ReadOnly = &t
			}
		}
		if len(blocks) == maxRAMBlocks {
			return nil, fmt.Errorf("info ramblock: more than %d blocks", maxRAMBlocks)
		}
		blocks = append(blocks, b)
	}
	if !sawHeader && len(blocks) == 0 {
		return nil, fmt.Errorf("info ramblock: no header and no blocks in %q", clip(text, 120))
	}
	return blocks, nil
}

// sizeUnits are the units of QEMU's size_to_str.
var sizeUnits = map[string]float64{"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
	"TiB": 1 << 40, "PiB": 1 << 50, "EiB": 1 << 60}

// parseSize parses QEMU's size_to_str output split in number and unit: "4" "KiB", "2" "MiB",
// "1.5" "GiB".
func parseSize(num, unit string) (uint64, error) {
	mult := sizeUnits[unit]
	if mult == 0 {
		return 0, fmt.Errorf("unknown unit %q", clip(unit, 20))
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
		return 0, fmt.Errorf("bad number %q", clip(num, 20))
	}
	r := v * mult
	if r >= math.MaxUint64 {
		return 0, fmt.Errorf("size %s %s too large", clip(num, 20), unit)
	}
	return uint64(math.Round(r)), nil
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
