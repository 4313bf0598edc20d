package inspect

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// Diff says what differs between two migration streams (`inspect --diff A B`): what decides
// whether a destination can load a stream — machine type, capabilities, RAM blocks, the device
// list and versions — and, for the devices in both, the vmstate fields whose values differ
// (named from each stream's vmdesc). Compared against a diffSide of the destination's own save,
// it shows why a load failed. Its JSON form is what `inspect --diff --json` prints.
type Diff struct {
	A DiffStream `json:"a"`
	B DiffStream `json:"b"`
	// Identical is true when nothing below reports a difference.
	Identical bool `json:"identical"`

	Version        *Change   `json:"version,omitempty"` // the header's stream version
	Machine        *Change   `json:"machine,omitempty"`
	Capabilities   *SetDiff  `json:"capabilities,omitempty"`
	UUID           *Change   `json:"uuid,omitempty"`
	TargetPageBits *Change   `json:"target_page_bits,omitempty"`
	RAMBlocks      []RAMDiff `json:"ram_blocks"`
	// Devices are the sections (live and device state) added in B, missing from B, or of
	// another version.
	Devices []DeviceDiff `json:"devices"`
	// Fields lists, for each device in both streams whose state differs, the fields that do.
	Fields []DeviceFields `json:"fields"`
}

// DiffStream describes one side of a Diff.
type DiffStream struct {
	Name    string `json:"name"`
	Bytes   int64  `json:"bytes"`
	Machine string `json:"machine,omitempty"`
	Devices int    `json:"devices"`
	VMDesc  bool   `json:"vmdesc"` // a usable vmdesc: fields can be named
	// Error is the decode error that ended this stream early ("" if it decoded whole): the
	// comparison then covers what was read before ErrorOffset.
	Error       string `json:"error,omitempty"`
	ErrorOffset int64  `json:"error_offset,omitempty"`
}

// Change is one value in A and in B.
type Change struct {
	A string `json:"a"`
	B string `json:"b"`
}

// SetDiff is what a set has only in B (added) and only in A (missing from B).
type SetDiff struct {
	Added   []string `json:"added"`
	Missing []string `json:"missing"`
}

// RAMDiff is one RAM block that differs: "added" (only in B), "missing" (only in A), or
// "changed" (size or page size).
type RAMDiff struct {
	Name   string     `json:"name"`
	Change string     `json:"change"`
	A      *BlockDesc `json:"a,omitempty"`
	B      *BlockDesc `json:"b,omitempty"`
}

// BlockDesc is a RAM block as the MEM_SIZE list describes it.
type BlockDesc struct {
	Size uint64 `json:"size"`
	// PageSize is the block's page size: the one the MEM_SIZE entry carries (postcopy with a
	// page size other than the host's), else the target page size.
	PageSize uint64 `json:"page_size"`
}

// DeviceDiff is a section that is "added" (only in B), "missing" (only in A) or whose
// "version" differs.
type DeviceDiff struct {
	Device   string `json:"device"` // idstr/instance
	Type     string `json:"type"`   // "live" or "full"
	Change   string `json:"change"`
	VersionA uint32 `json:"version_a,omitempty"`
	VersionB uint32 `json:"version_b,omitempty"`
}

// DeviceFields are the differing fields of one device present in both streams.
type DeviceFields struct {
	Device   string `json:"device"`
	VersionA uint32 `json:"version_a"`
	VersionB uint32 `json:"version_b"`
	// Fields compared: how many leaves the two decoded states have (the larger).
	Compared int         `json:"compared"`
	Fields   []FieldDiff `json:"fields"`
	More     int         `json:"more,omitempty"` // differing fields beyond MaxFields
	// Note explains a device whose fields could not be named (no vmdesc, or it does not fit
	// the body): then only the bodies' bytes were compared.
	Note string `json:"note,omitempty"`
}

// FieldDiff is one field (a path of vmdesc names: "parent.field[3]", a subsection as
// "cpu/tsc_khz") whose value differs ("value"), or that only B ("added") or only A ("missing")
// has.
type FieldDiff struct {
	Field  string `json:"field"`
	Type   string `json:"type"`
	Change string `json:"change"`
	A      string `json:"a,omitempty"`
	B      string `json:"b,omitempty"`
}

// DiffOptions tune DiffStreams.
type DiffOptions struct {
	Limits *stream.Limits
	// MaxFields caps the fields listed per device (default 64); the rest are counted in More.
	MaxFields int
	// MaxNodes caps the vmstate elements decoded per device (default 1<<18).
	MaxNodes int
}

// DiffStreams reads two whole streams and compares them. A stream that does not decode is
// compared as far as it was read, its error reported in the Diff; the error returned then wraps
// ErrInvalid (the Diff is still valid). Other errors (reading a file) return no Diff.
func DiffStreams(a io.Reader, nameA string, b io.Reader, nameB string, opt DiffOptions) (*Diff, error) {
	if opt.MaxFields <= 0 {
		opt.MaxFields = 64
	}
	if opt.MaxNodes <= 0 {
		opt.MaxNodes = 1 << 18
	}
	ca, errA := readDiffSide(a, opt)
	if ca == nil {
		return nil, fmt.Errorf("%s: %w", nameA, errA)
	}
	cb, errB := readDiffSide(b, opt)
	if cb == nil {
		return nil, fmt.Errorf("%s: %w", nameB, errB)
	}
	d := compare(ca, cb, nameA, nameB, opt)
	switch {
	case errA != nil:
		return d, fmt.Errorf("%w: %s: %v", ErrInvalid, nameA, errA)
	case errB != nil:
		return d, fmt.Errorf("%w: %s: %v", ErrInvalid, nameB, errB)
	}
	return d, nil
}

// diffSide is what one stream holds that a Diff compares.
type diffSide struct {
	bytes          int64
	version        uint32
	machine        string
	caps           []string
	uuid           string
	targetPageBits uint32
	blocks         []capBlock
	sections       []capSection
	desc           *stream.VMDesc
	descErr        string
	err            error
	errOffset      int64
}

type capBlock struct {
	name     string
	size     uint64
	pageSize uint64 // 0: the target page size
}

type capSection struct {
	typ      string // live | full
	idstr    string
	instance uint32
	version  uint32
	id       uint32
	body     []byte // full sections
	index    int    // ordinal among top-level FULL sections (the vmdesc's order); -1 nested
}

func (s *capSection) device() string { return fmt.Sprintf("%s/%d", s.idstr, s.instance) }

// readCapture walks one stream. It returns nil only for a read error of the input itself.
func readDiffSide(r io.Reader, opt DiffOptions) (*diffSide, error) {
	c := &diffSide{caps: []string{}}
	cr := &countReader{r: &ioErrReader{r: r}}
	opts := []stream.Option{stream.WithDeviceSizer(stream.VMDescSizer()), stream.WithIgnoreAfterEOF()}
	if opt.Limits != nil {
		opts = append(opts, stream.WithLimits(*opt.Limits))
	}
	rd := stream.NewReader(cr, opts...)
	live := map[uint32]bool{}
	fulls := 0
	var vmdesc []byte
	for {
		rec, err := rd.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			var se *stream.Error
			if ie := cr.r.(*ioErrReader).err; ie != nil || !errors.As(err, &se) {
				if ie != nil {
					return nil, ie // the input failed, not the stream
				}
				return nil, err
			}
			c.err, c.errOffset = err, se.Offset
			break
		}
		switch rec.Kind {
		case stream.KindHeader:
			c.version = rec.Version
		case stream.KindConfiguration:
			cfg := &rec.Config
			c.machine = cfg.Machine
			c.caps = append(c.caps, cfg.Capabilities...)
			if cfg.HasUUID {
				c.uuid = formatUUID(cfg.UUID)
			}
			if cfg.HasTargetPageBits {
				c.targetPageBits = cfg.TargetPageBits
			}
		case stream.KindSectionStart:
			if !live[rec.Section.ID] {
				live[rec.Section.ID] = true
				c.sections = append(c.sections, capSection{typ: "live", idstr: rec.Section.Idstr, instance: rec.Section.Instance,
					version: rec.Section.Version, id: rec.Section.ID, index: -1})
			}
		case stream.KindSectionFull:
			s := capSection{typ: "full", idstr: rec.Section.Idstr, instance: rec.Section.Instance, version: rec.Section.Version,
				id: rec.Section.ID, body: append([]byte(nil), rec.Body...), index: -1}
			if rec.Depth == 0 {
				s.index = fulls
				fulls++
			}
			c.sections = append(c.sections, s)
		case stream.KindRAM:
			if rec.RAM.Flags&^stream.RAMContinue == stream.RAMMemSize {
				for _, b := range rec.RAM.Blocks {
					if !hasBlock(c.blocks, b.Name) {
						cb := capBlock{name: b.Name, size: b.UsedLength}
						if b.HasPageSize {
							cb.pageSize = b.PageSize
						}
						c.blocks = append(c.blocks, cb)
					}
				}
			}
		case stream.KindVMDesc:
			vmdesc = append([]byte(nil), rec.JSON...)
		}
	}
	c.bytes = cr.n
	if vmdesc != nil {
		if desc, err := stream.ParseVMDesc(vmdesc); err != nil {
			c.descErr = err.Error()
		} else {
			c.desc = desc
		}
	}
	return c, c.err
}

// ioErrReader remembers a read error of the input (other than EOF), which the stream reader
// would report as a malformed stream.
type ioErrReader struct {
	r   io.Reader
	err error
}

func (e *ioErrReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && err != io.EOF {
		e.err = err
	}
	return n, err
}

func hasBlock(bs []capBlock, name string) bool {
	for _, b := range bs {
		if b.name == name {
			return true
		}
	}
	return false
}

// pageSize is the target page size of the stream: its configuration's target-page-bits, the
// vmdesc's page_size, or x86's 4 KiB.
func (c *diffSide) pageSize() uint64 {
	switch {
	case c.targetPageBits > 0 && c.targetPageBits < 64:
		return 1 << c.targetPageBits
	case c.desc != nil && c.desc.PageSize > 0:
		return uint64(c.desc.PageSize)
	}
	return page
}

func compare(a, b *diffSide, nameA, nameB string, opt DiffOptions) *Diff {
	d := &Diff{RAMBlocks: []RAMDiff{}, Devices: []DeviceDiff{}, Fields: []DeviceFields{},
		A: side(a, nameA), B: side(b, nameB)}
	str := func(v uint32) string { return strconv.FormatUint(uint64(v), 10) }
	if a.version != b.version {
		d.Version = &Change{str(a.version), str(b.version)}
	}
	if a.machine != b.machine {
		d.Machine = &Change{a.machine, b.machine}
	}
	if added, missing := setDiff(a.caps, b.caps); len(added)+len(missing) > 0 {
		d.Capabilities = &SetDiff{Added: added, Missing: missing}
	}
	if a.uuid != b.uuid {
		d.UUID = &Change{a.uuid, b.uuid}
	}
	if a.targetPageBits != b.targetPageBits {
		d.TargetPageBits = &Change{str(a.targetPageBits), str(b.targetPageBits)}
	}
	// RAM blocks, in A's order, then those only B has.
	desc := func(c *diffSide, blk capBlock) *BlockDesc {
		ps := blk.pageSize
		if ps == 0 {
			ps = c.pageSize()
		}
		return &BlockDesc{Size: blk.size, PageSize: ps}
	}
	for _, ba := range a.blocks {
		var bb *capBlock
		for i := range b.blocks {
			if b.blocks[i].name == ba.name {
				bb = &b.blocks[i]
			}
		}
		switch da := desc(a, ba); {
		case bb == nil:
			d.RAMBlocks = append(d.RAMBlocks, RAMDiff{Name: ba.name, Change: "missing", A: da})
		default:
			if db := desc(b, *bb); *da != *db {
				d.RAMBlocks = append(d.RAMBlocks, RAMDiff{Name: ba.name, Change: "changed", A: da, B: db})
			}
		}
	}
	for _, bb := range b.blocks {
		if !hasBlock(a.blocks, bb.name) {
			d.RAMBlocks = append(d.RAMBlocks, RAMDiff{Name: bb.name, Change: "added", B: desc(b, bb)})
		}
	}
	// Sections: matched by type, idstr and instance, the n-th with the n-th.
	type key struct {
		typ, dev string
		n        int
	}
	index := func(c *diffSide) (map[key]*capSection, []key) {
		m, seen, order := map[key]*capSection{}, map[[2]string]int{}, []key{}
		for i := range c.sections {
			s := &c.sections[i]
			k2 := [2]string{s.typ, s.device()}
			k := key{s.typ, s.device(), seen[k2]}
			seen[k2]++
			m[k] = s
			order = append(order, k)
		}
		return m, order
	}
	ma, orderA := index(a)
	mb, orderB := index(b)
	for _, k := range orderA {
		sa, sb := ma[k], mb[k]
		switch {
		case sb == nil:
			d.Devices = append(d.Devices, DeviceDiff{Device: k.dev, Type: k.typ, Change: "missing", VersionA: sa.version})
		case sa.version != sb.version:
			d.Devices = append(d.Devices, DeviceDiff{Device: k.dev, Type: k.typ, Change: "version", VersionA: sa.version, VersionB: sb.version})
		}
		if sb != nil && k.typ == "full" {
			if f := compareDevice(a, sa, b, sb, opt); f != nil {
				d.Fields = append(d.Fields, *f)
			}
		}
	}
	for _, k := range orderB {
		if ma[k] == nil {
			d.Devices = append(d.Devices, DeviceDiff{Device: k.dev, Type: k.typ, Change: "added", VersionB: mb[k].version})
		}
	}
	d.Identical = d.Version == nil && d.Machine == nil && d.Capabilities == nil && d.UUID == nil && d.TargetPageBits == nil &&
		len(d.RAMBlocks) == 0 && len(d.Devices) == 0 && len(d.Fields) == 0 && a.err == nil && b.err == nil
	return d
}

func side(c *diffSide, name string) DiffStream {
	s := DiffStream{Name: name, Bytes: c.bytes, Machine: c.machine, VMDesc: c.desc != nil}
	for _, sec := range c.sections {
		if sec.typ == "full" {
			s.Devices++
		}
	}
	if c.err != nil {
		s.Error, s.ErrorOffset = c.err.Error(), c.errOffset
	}
	return s
}

func setDiff(a, b []string) (added, missing []string) {
	in := func(xs []string, x string) bool {
		for _, v := range xs {
			if v == x {
				return true
			}
		}
		return false
	}
	added, missing = []string{}, []string{}
	for _, x := range b {
		if !in(a, x) {
			added = append(added, x)
		}
	}
	for _, x := range a {
		if !in(b, x) {
			missing = append(missing, x)
		}
	}
	sort.Strings(added)
	sort.Strings(missing)
	return added, missing
}

// decodeDevice decodes a FULL section's body with its stream's vmdesc; nil with the reason
// when it cannot.
func decodeDevice(c *diffSide, s *capSection, opt DiffOptions) (*stream.Node, string) {
	if c.desc == nil {
		if c.descErr != "" {
			return nil, "vmdesc unusable: " + c.descErr
		}
		return nil, "no vmdesc"
	}
	var dev *stream.VMDescDevice
	if s.index >= 0 && s.index < len(c.desc.Devices) && c.desc.Devices[s.index].Name == s.idstr && c.desc.Devices[s.index].InstanceID == s.instance {
		dev = &c.desc.Devices[s.index]
	} else if dev = c.desc.Device(s.idstr, s.instance); dev == nil {
		return nil, "not described in the vmdesc"
	}
	node, _, err := stream.DecodeVMState(s.body, dev, &stream.VMStateOptions{SectionID: s.id, NoFooterCheck: true, MaxNodes: opt.MaxNodes})
	if err != nil {
		return nil, "the vmdesc does not fit the body: " + err.Error()
	}
	return node, ""
}

// compareDevice lists the differing fields of one device in both streams; nil if its state is
// the same.
func compareDevice(a *diffSide, sa *capSection, b *diffSide, sb *capSection, opt DiffOptions) *DeviceFields {
	f := &DeviceFields{Device: sa.device(), VersionA: sa.version, VersionB: sb.version, Fields: []FieldDiff{}}
	if bytes.Equal(sa.body, sb.body) {
		return nil
	}
	na, whyA := decodeDevice(a, sa, opt)
	nb, whyB := decodeDevice(b, sb, opt)
	if na == nil || nb == nil {
		why := whyA
		if why == "" {
			why = whyB
			f.Note = "B: "
		} else {
			f.Note = "A: "
		}
		at := 0
		for at < len(sa.body) && at < len(sb.body) && sa.body[at] == sb.body[at] {
			at++
		}
		f.Note += fmt.Sprintf("%s; the bodies differ (%d and %d bytes, from byte %d)", why, len(sa.body), len(sb.body), at)
		return f
	}
	la, lb := flatten(na), flatten(nb)
	f.Compared = max(len(la.leaves), len(lb.leaves))
	add := func(fd FieldDiff) {
		if len(f.Fields) < opt.MaxFields {
			f.Fields = append(f.Fields, fd)
		} else {
			f.More++
		}
	}
	// A subsection one side does not have is one difference, not one per field in it.
	covered := func(path string, subs map[string]bool) bool {
		for s := range subs {
			if strings.HasPrefix(path, s+".") {
				return true
			}
		}
		return false
	}
	onlyA, onlyB := map[string]bool{}, map[string]bool{}
	for _, s := range la.subs {
		if !lb.hasSub[s.path] {
			onlyA[s.path] = true
			add(FieldDiff{Field: s.path, Type: "subsection", Change: "missing", A: fmt.Sprintf("v%d, %d bytes", s.n.Version, s.n.Size)})
		}
	}
	for _, s := range lb.subs {
		if !la.hasSub[s.path] {
			onlyB[s.path] = true
			add(FieldDiff{Field: s.path, Type: "subsection", Change: "added", B: fmt.Sprintf("v%d, %d bytes", s.n.Version, s.n.Size)})
		}
	}
	for _, l := range la.leaves {
		if covered(l.path, onlyA) {
			continue
		}
		o := lb.byPath[l.path]
		switch {
		case o == nil:
			add(FieldDiff{Field: l.path, Type: l.n.Type, Change: "missing", A: value(l.n)})
		case o.Type != l.n.Type || !bytes.Equal(o.Raw, l.n.Raw):
			typ := l.n.Type
			if o.Type != l.n.Type {
				typ += " → " + o.Type
			}
			va, vb := value(l.n), value(o)
			if len(l.n.Raw) > formatBytes && len(o.Raw) > formatBytes {
				at := firstDiff(l.n.Raw, o.Raw)
				va, vb = hexAt(l.n.Raw, at), hexAt(o.Raw, at)
			}
			add(FieldDiff{Field: l.path, Type: typ, Change: "value", A: va, B: vb})
		}
	}
	for _, l := range lb.leaves {
		if covered(l.path, onlyB) || la.byPath[l.path] != nil {
			continue
		}
		add(FieldDiff{Field: l.path, Type: l.n.Type, Change: "added", B: value(l.n)})
	}
	if len(f.Fields) == 0 && f.More == 0 {
		// Same fields, same values: the bodies differ only in bytes no field covers.
		f.Note = "the decoded fields are equal; the bodies differ outside them"
	}
	return f
}

type flatNode struct {
	path string
	n    *stream.Node
}

type flat struct {
	leaves []flatNode
	subs   []flatNode
	byPath map[string]*stream.Node
	hasSub map[string]bool
}

// flatten lists a decoded tree's leaves by path, and its subsections.
func flatten(root *stream.Node) flat {
	f := flat{byPath: map[string]*stream.Node{}, hasSub: map[string]bool{}}
	var walk func(n *stream.Node, prefix string)
	walk = func(n *stream.Node, prefix string) {
		for _, c := range n.Children {
			name := c.Name
			if c.Index >= 0 {
				name += "[" + strconv.Itoa(c.Index) + "]"
			}
			path := name
			if prefix != "" {
				path = prefix + "." + name
			}
			// Repeated names (QEMU suffixes duplicates, but be safe): keep them apart.
			for k := 2; f.byPath[path] != nil || f.hasSub[path]; k++ {
				path = fmt.Sprintf("%s#%d", strings.SplitN(path, "#", 2)[0], k)
			}
			switch {
			case c.Subsection:
				f.subs = append(f.subs, flatNode{path, c})
				f.hasSub[path] = true
				walk(c, path)
			case c.Raw == nil && len(c.Children) > 0:
				walk(c, path)
			default:
				f.leaves = append(f.leaves, flatNode{path, c})
				f.byPath[path] = c
			}
		}
	}
	walk(root, "")
	return f
}

// formatBytes is how many bytes of a buffer a value shows.
const formatBytes = 16

// value writes a leaf's value: integers in decimal and hex, bools, timers, else hex.
func value(n *stream.Node) string {
	if n.Type == "bool" && !n.Opaque && len(n.Raw) == 1 && n.Raw[0] <= 1 {
		return strconv.FormatBool(n.Raw[0] == 1)
	}
	if v, err := n.Uint(); err == nil {
		if n.Type == "timer" && v == math.MaxUint64 {
			return "-1 (not armed)"
		}
		if iv, err := n.Int(); err == nil && iv < 0 {
			return fmt.Sprintf("%d (%#x)", iv, v)
		}
		return fmt.Sprintf("%d (%#x)", v, v)
	}
	if n.Type == "float64" {
		if f, err := n.Float64(); err == nil {
			return strconv.FormatFloat(f, 'g', -1, 64)
		}
	}
	return hexAt(n.Raw, 0)
}

func firstDiff(a, b []byte) int {
	i := 0
	for i < len(a) && i < len(b) && a[i] == b[i] {
		i++
	}
	return i
}

// hexAt shows up to formatBytes bytes of raw from offset at, with the buffer's size.
func hexAt(raw []byte, at int) string {
	at = min(at, len(raw))
	end := min(at+formatBytes, len(raw))
	s := hex.EncodeToString(raw[at:end])
	if end < len(raw) {
		s += "…"
	}
	if at > 0 {
		return fmt.Sprintf("[%d:] %s (%d bytes)", at, s, len(raw))
	}
	return fmt.Sprintf("%s (%d bytes)", s, len(raw))
}

// WriteText prints the diff for a person: one line per difference, grouped.
func (d *Diff) WriteText(w io.Writer) error {
	var b strings.Builder
	for _, s := range []struct {
		tag string
		s   DiffStream
	}{{"A", d.A}, {"B", d.B}} {
		fmt.Fprintf(&b, "%s: %s: %d bytes, machine %q, %d devices, vmdesc %s", s.tag, s.s.Name, s.s.Bytes, s.s.Machine, s.s.Devices,
			map[bool]string{true: "present", false: "absent"}[s.s.VMDesc])
		if s.s.Error != "" {
			fmt.Fprintf(&b, "; INVALID at offset %d: %s (compared up to there)", s.s.ErrorOffset, s.s.Error)
		}
		b.WriteByte('\n')
	}
	if d.Identical {
		b.WriteString("no difference\n")
		_, err := io.WriteString(w, b.String())
		return err
	}
	row := func(name, format string, args ...any) {
		fmt.Fprintf(&b, "%-14s %s\n", name, fmt.Sprintf(format, args...))
	}
	if c := d.Version; c != nil {
		row("version", "%s in A, %s in B", c.A, c.B)
	}
	if c := d.Machine; c != nil {
		row("machine", "%s in A, %s in B", c.A, c.B)
	}
	if c := d.Capabilities; c != nil {
		var parts []string
		if len(c.Added) > 0 {
			parts = append(parts, "only in B: "+strings.Join(c.Added, ", "))
		}
		if len(c.Missing) > 0 {
			parts = append(parts, "only in A: "+strings.Join(c.Missing, ", "))
		}
		row("capabilities", "%s", strings.Join(parts, "; "))
	}
	if c := d.UUID; c != nil {
		row("uuid", "%q in A, %q in B", c.A, c.B)
	}
	if c := d.TargetPageBits; c != nil {
		row("page bits", "%s in A, %s in B", c.A, c.B)
	}
	name := "RAM blocks"
	for _, r := range d.RAMBlocks {
		switch r.Change {
		case "missing":
			row(name, "%s: only in A (%s)", r.Name, blockText(r.A))
		case "added":
			row(name, "%s: only in B (%s)", r.Name, blockText(r.B))
		default:
			row(name, "%s: %s in A, %s in B", r.Name, blockText(r.A), blockText(r.B))
		}
		name = ""
	}
	name = "devices"
	for _, dv := range d.Devices {
		kind := ""
		if dv.Type == "live" {
			kind = " (live section)"
		}
		switch dv.Change {
		case "missing":
			row(name, "%s%s v%d: only in A (missing from B)", dv.Device, kind, dv.VersionA)
		case "added":
			row(name, "%s%s v%d: only in B (added)", dv.Device, kind, dv.VersionB)
		default:
			row(name, "%s%s: version %d in A, %d in B", dv.Device, kind, dv.VersionA, dv.VersionB)
		}
		name = ""
	}
	name = "fields"
	for _, f := range d.Fields {
		head := fmt.Sprintf("%s (v%d", f.Device, f.VersionA)
		if f.VersionB != f.VersionA {
			head += fmt.Sprintf(" in A, v%d in B", f.VersionB)
		}
		head += ")"
		switch {
		case f.Note != "" && len(f.Fields) == 0:
			row(name, "%s: %s", head, f.Note)
		default:
			row(name, "%s: %d of %d fields differ", head, len(f.Fields)+f.More, f.Compared)
		}
		name = ""
		for _, fd := range f.Fields {
			switch fd.Change {
			case "missing":
				fmt.Fprintf(&b, "%-16s %s %s = %s: only in A\n", "", fd.Field, fd.Type, fd.A)
			case "added":
				fmt.Fprintf(&b, "%-16s %s %s = %s: only in B\n", "", fd.Field, fd.Type, fd.B)
			default:
				fmt.Fprintf(&b, "%-16s %s %s: %s → %s\n", "", fd.Field, fd.Type, fd.A, fd.B)
			}
		}
		if f.More > 0 {
			fmt.Fprintf(&b, "%-16s … and %d more\n", "", f.More)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func blockText(b *BlockDesc) string {
	if b == nil {
		return "?"
	}
	return fmt.Sprintf("%d bytes (%s), page size %d", b.Size, sizeText(b.Size), b.PageSize)
}

func sizeText(v uint64) string {
	switch {
	case v >= 1<<30 && v%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", v>>30)
	case v >= 1<<20 && v%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", v>>20)
	case v >= 1<<10 && v%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", v>>10)
	}
	return fmt.Sprintf("%d B", v)
}
