package stream

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
)

// ErrVMDescMismatch is wrapped by the *Error returned when a vmdesc description (stream-format.md
// §5.1) does not fit the bytes of a section body: a subsection header is not where the description
// puts it, a struct's recorded size differs from its fields, an undescribed subsection follows, the
// description runs past the end of the body, or the body is not followed by a section footer. The
// caller should then fall back to footer scanning.
var ErrVMDescMismatch = errors.New("vmdesc does not match the section body")

// Wire constants used by the vmstate walker (stream-format.md §2, §5).
const (
	vmstateSubsection    = 0x05 // QEMU_VM_SUBSECTION
	vmstateSectionFooter = 0x7E // QEMU_VM_SECTION_FOOTER
	vmstateNullptrByte   = 0x30 // VMS_NULLPTR_MARKER, the '0' written for a NULL array element
)

// Node types that DecodeVMState gives to non-field nodes.
const (
	NodeTypeDevice     = "device"     // the root: a whole FULL section body
	NodeTypeSubsection = "subsection" // a subsection: 05, cstr name, be32 version, body
)

// Node is one element of a decoded vmstate body (stream-format.md §5): the root (Type "device"),
// a subsection, a struct field (children = the nested vmstate), or a leaf whose Raw bytes are
// exactly the wire bytes. EncodeVMState turns a Node tree back into the identical bytes.
type Node struct {
	Name string // field name (as in vmdesc); for the root the section idstr; for a subsection its full vmsd name
	Type string // vmdesc type ("uint32", "int32 equal", "struct", "buffer", …), NodeTypeDevice or NodeTypeSubsection
	VMSD string // vmsd name of root, subsection and described struct nodes
	// Index is the array index for elements of arrays (expanded "array_len" or explicit
	// "index"); -1 otherwise.
	Index int
	// Size is the number of wire bytes the node covers (for subsections including their header).
	Size int
	// Offset is the absolute stream offset of the node's first byte (VMStateOptions.BaseOffset based).
	Offset int64
	// Raw holds a leaf's bytes exactly as on the wire. It aliases the body passed to
	// DecodeVMState. Nil for nodes with children.
	Raw []byte
	// Children are the fields (then subsections) of root, struct and subsection nodes.
	Children []*Node
	// Subsection marks subsection nodes.
	Subsection bool
	// Version is the version of root, subsection (as read from the wire) and struct nodes (from vmdesc).
	Version int
	// Opaque marks leaves whose inner structure vmdesc cannot describe (§5.1 items 1–4): tmp,
	// qtailq, qlist, gtree, old-style "data" buffers, struct entries without a "struct"
	// description, and fixed-width types whose recorded size differs from their width (e.g. 7.2's
	// NULL pointer placeholder typed as the array's element type). Raw still holds the exact bytes.
	Opaque bool
}

// VMStateOptions tunes DecodeVMState. The zero value (or nil) is valid.
type VMStateOptions struct {
	// BaseOffset is the absolute stream offset of body[0]; error and node offsets are based on it.
	BaseOffset int64
	// SectionID is reported in errors.
	SectionID uint32
	// MaxNodes caps the number of elements walked (guards against huge array_len values with
	// zero-sized elements); 0 = DefaultVMStateMaxNodes.
	MaxNodes int
	// MaxDepth caps struct/subsection nesting (guards against cyclic hand-built descriptions);
	// 0 = DefaultVMStateMaxDepth.
	MaxDepth int
	// NoFooterCheck disables the check that a byte following the vmstate in body is the section
	// footer 0x7E (for streams written without send-section-footer).
	NoFooterCheck bool
}

// Defaults for VMStateOptions.
const (
	DefaultVMStateMaxNodes = 1 << 22
	DefaultVMStateMaxDepth = 64
)

// DecodeVMState walks the vmstate body at the start of body (a FULL section body, §2/§5) following
// its vmdesc entry dev, as described in §5.1: fields in order with "array_len" expanded, "struct"
// recursed into, "nullptr" read as the single byte 0x30, anything else read as "size" opaque bytes;
// then each listed subsection, whose `05, cstr name, be32 version` header must match the
// description. It returns the tree and the number of bytes consumed. When body extends past the
// vmstate, the next byte must be the section footer 0x7E. Any inconsistency yields an *Error
// (wrapping ErrVMDescMismatch or ErrUnexpectedEOF) so the caller can fall back to footer scanning.
// opts may be nil.
func DecodeVMState(body []byte, dev *VMDescDevice, opts *VMStateOptions) (*Node, int, error) {
	w := newVMStateWalker(body, dev, opts, true)
	root := &Node{Name: dev.Name, Type: NodeTypeDevice, VMSD: dev.VMSD.Name, Index: -1,
		Version: dev.VMSD.Version, Offset: w.opts.BaseOffset}
	if err := w.vmsd(&dev.VMSD, root, 0); err != nil {
		return nil, 0, err
	}
	if err := w.footer(); err != nil {
		return nil, 0, err
	}
	root.Size = w.pos
	return root, w.pos, nil
}

// BodySize returns the length of the vmstate body at the start of body as described by dev,
// without building a tree (same rules and errors as DecodeVMState with default options). In a
// stream the section footer `7E be32 id` follows it (§2).
func (dev *VMDescDevice) BodySize(body []byte) (int, error) {
	w := newVMStateWalker(body, dev, nil, false)
	if err := w.vmsd(&dev.VMSD, nil, 0); err != nil {
		return 0, err
	}
	if err := w.footer(); err != nil {
		return 0, err
	}
	return w.pos, nil
}

type vmstateWalker struct {
	body  []byte
	pos   int
	dev   *VMDescDevice
	opts  VMStateOptions
	build bool
	nodes int
}

func newVMStateWalker(body []byte, dev *VMDescDevice, opts *VMStateOptions, build bool) *vmstateWalker {
	w := &vmstateWalker{body: body, dev: dev, build: build}
	if opts != nil {
		w.opts = *opts
	}
	if w.opts.MaxNodes <= 0 {
		w.opts.MaxNodes = DefaultVMStateMaxNodes
	}
	if w.opts.MaxDepth <= 0 {
		w.opts.MaxDepth = DefaultVMStateMaxDepth
	}
	return w
}

func (w *vmstateWalker) fail(at int, expected string, err error) *Error {
	return &Error{Offset: w.opts.BaseOffset + int64(at), SectionID: w.opts.SectionID,
		Idstr: w.dev.Name, InSection: true, Expected: expected, Err: err}
}

func (w *vmstateWalker) mismatch(at int, expected, format string, args ...any) *Error {
	return w.fail(at, expected, fmt.Errorf("%w: "+format, append([]any{ErrVMDescMismatch}, args...)...))
}

func (w *vmstateWalker) footer() error {
	if !w.opts.NoFooterCheck && w.pos < len(w.body) && w.body[w.pos] != vmstateSectionFooter {
		return w.mismatch(w.pos, "section footer", "got byte 0x%02x after the described body", w.body[w.pos])
	}
	return nil
}

// take consumes n bytes.
func (w *vmstateWalker) take(n int, expected string) ([]byte, error) {
	if n < 0 || n > len(w.body)-w.pos {
		return nil, w.fail(w.pos, expected, ErrUnexpectedEOF)
	}
	b := w.body[w.pos : w.pos+n : w.pos+n]
	w.pos += n
	return b, nil
}

// vmsd walks the fields and subsections of v, appending nodes to parent (when building).
func (w *vmstateWalker) vmsd(v *VMSD, parent *Node, depth int) error {
	if depth > w.opts.MaxDepth {
		return w.mismatch(w.pos, v.Name, "description nested deeper than %d", w.opts.MaxDepth)
	}
	start := w.pos
	for i := range v.Fields {
		f := &v.Fields[i]
		n, idx := 1, f.Index
		if f.ArrayLen > 0 {
			n = f.ArrayLen
		}
		for e := 0; e < n; e++ {
			if f.ArrayLen > 0 {
				idx = e
			}
			if err := w.field(f, idx, parent, depth); err != nil {
				return err
			}
		}
	}
	// Old-style handlers (§5.1 item 3) carry an object-level size that must cover the fields.
	if v.Size >= 0 && w.pos-start != v.Size {
		return w.mismatch(start, v.Name, "fields cover %d bytes, vmdesc size is %d", w.pos-start, v.Size)
	}
	for i := range v.Subsections {
		s := &v.Subsections[i]
		if err := w.subsection(s, parent, depth); err != nil {
			return err
		}
	}
	// An undescribed subsection of this vmsd here means the description is incomplete: QEMU's
	// loader would consume it (§5 subsection peek rule).
	if w.isSubsectionOf(v.Name) {
		return w.mismatch(w.pos, v.Name+" field or end", "undescribed subsection of %q", v.Name)
	}
	return nil
}

// isSubsectionOf reports whether the bytes at pos look like a subsection header of parent by the
// loader's peek rule: 0x05, length byte > len(parent), name starting with parent.
func (w *vmstateWalker) isSubsectionOf(parent string) bool {
	b := w.body[w.pos:]
	if len(b) < 2 || b[0] != vmstateSubsection {
		return false
	}
	l := int(b[1])
	if l <= len(parent) || len(b) < 2+l {
		return false
	}
	return string(b[2:2+len(parent)]) == parent
}

func (w *vmstateWalker) subsection(s *VMSD, parent *Node, depth int) error {
	at := w.pos
	exp := "subsection " + s.Name
	hdr, err := w.take(2, exp)
	if err != nil {
		return err
	}
	if hdr[0] != vmstateSubsection {
		return w.mismatch(at, exp, "got byte 0x%02x, want subsection marker 0x05", hdr[0])
	}
	name, err := w.take(int(hdr[1]), exp+" name")
	if err != nil {
		return err
	}
	if string(name) != s.Name {
		return w.mismatch(at, exp, "got subsection %q", name)
	}
	vb, err := w.take(4, exp+" version")
	if err != nil {
		return err
	}
	ver := int(int32(binary.BigEndian.Uint32(vb)))
	if ver != s.Version {
		return w.mismatch(at+2+len(name), exp+" version", "got version %d, vmdesc says %d", ver, s.Version)
	}
	var n *Node
	if w.build {
		if err := w.count(at); err != nil {
			return err
		}
		n = &Node{Name: s.Name, Type: NodeTypeSubsection, VMSD: s.Name, Index: -1, Subsection: true,
			Version: ver, Offset: w.opts.BaseOffset + int64(at)}
		parent.Children = append(parent.Children, n)
	}
	if err := w.vmsd(s, n, depth+1); err != nil {
		return err
	}
	if n != nil {
		n.Size = w.pos - at
	}
	return nil
}

func (w *vmstateWalker) count(at int) error {
	w.nodes++
	if w.nodes > w.opts.MaxNodes {
		return w.fail(at, "vmstate field", fmt.Errorf("%w: more than %d elements", ErrTooLarge, w.opts.MaxNodes))
	}
	return nil
}

// field walks one element of field f.
func (w *vmstateWalker) field(f *VMDescField, idx int, parent *Node, depth int) error {
	at := w.pos
	if err := w.count(at); err != nil {
		return err
	}
	var n *Node
	if w.build {
		n = &Node{Name: f.Name, Type: f.Type, Index: idx, Offset: w.opts.BaseOffset + int64(at)}
		parent.Children = append(parent.Children, n)
	}
	switch {
	case f.Type == "nullptr":
		if f.Size >= 0 && f.Size != 1 {
			return w.mismatch(at, f.Name, "nullptr with size %d", f.Size)
		}
		b, err := w.take(1, f.Name+" (nullptr)")
		if err != nil {
			return err
		}
		if b[0] != vmstateNullptrByte {
			return w.mismatch(at, f.Name+" (nullptr)", "got byte 0x%02x, want 0x30", b[0])
		}
		if n != nil {
			n.Raw, n.Size = b, 1
		}
		return nil
	case f.Struct != nil && (f.Type == "struct" || f.Type == "vstruct" || f.Type == ""):
		if n != nil {
			n.VMSD, n.Version = f.Struct.Name, f.Struct.Version
		}
		if err := w.vmsd(f.Struct, n, depth+1); err != nil {
			return err
		}
		if f.Size >= 0 && w.pos-at != f.Size {
			return w.mismatch(at, f.Name, "struct %q covers %d bytes, vmdesc size is %d", f.Struct.Name, w.pos-at, f.Size)
		}
		if n != nil {
			n.Size = w.pos - at
		}
		return nil
	}
	if f.Size < 0 {
		return w.mismatch(at, f.Name, "field of type %q without size", f.Type)
	}
	b, err := w.take(f.Size, f.Name)
	if err != nil {
		return err
	}
	if n != nil {
		n.Raw, n.Size = b, f.Size
		n.Opaque = leafOpaque(f)
	}
	return nil
}

// leafOpaque reports whether a leaf's inner structure is not described by vmdesc (§5.1 items 1–4).
func leafOpaque(f *VMDescField) bool {
	switch f.Type {
	case "tmp", "qtailq", "qlist", "gtree", "struct", "vstruct":
		return true
	case "buffer":
		return f.Name == "data" // old-style handler blob
	}
	if wd, _, ok := intType(f.Type); ok && wd != f.Size {
		return true
	}
	return false
}

// intType classifies vmdesc integer-like type names (§5 table): width in bytes, signedness.
// "int64 equal" is QEMU's name for the uint64 equality check, hence unsigned.
func intType(t string) (width int, signed, ok bool) {
	switch t {
	case "bool", "uint8", "uint8 equal":
		return 1, false, true
	case "int8":
		return 1, true, true
	case "uint16", "uint16 equal":
		return 2, false, true
	case "int16":
		return 2, true, true
	case "uint32", "uint32 equal":
		return 4, false, true
	case "int32", "int32 equal", "int32 le":
		return 4, true, true
	case "uint64", "int64 equal":
		return 8, false, true
	case "int64", "timer":
		return 8, true, true
	}
	return 0, false, false
}

// EncodeVMState appends the wire encoding of n to dst: leaves contribute Raw, subsections their
// `05, cstr name, be32 version` header followed by their children, other nodes their children.
// For a tree from DecodeVMState the output equals the decoded bytes exactly (§5.1).
func EncodeVMState(n *Node, dst []byte) []byte {
	if n == nil {
		return dst
	}
	if n.Subsection {
		name := n.Name
		if len(name) > 255 {
			name = name[:255]
		}
		dst = append(dst, vmstateSubsection, byte(len(name)))
		dst = append(dst, name...)
		dst = binary.BigEndian.AppendUint32(dst, uint32(n.Version))
	}
	if len(n.Children) == 0 {
		return append(dst, n.Raw...)
	}
	for _, c := range n.Children {
		dst = EncodeVMState(c, dst)
	}
	return dst
}

// Child returns the first direct child named name (a field name or a subsection's vmsd name),
// or nil.
func (n *Node) Child(name string) *Node {
	if n == nil {
		return nil
	}
	for _, c := range n.Children {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// Lookup follows a path of child names from n (see Child); nil if any step is missing.
func (n *Node) Lookup(path ...string) *Node {
	for _, p := range path {
		n = n.Child(p)
	}
	return n
}

var errNotInteger = errors.New("not an integer field")

// Uint returns the value of an integer-typed leaf (bool, [u]int8…[u]int64, the "equal"/"le"
// variants, timer) as its raw bits zero-extended to 64 bits.
func (n *Node) Uint() (uint64, error) {
	w, _, ok := intType(n.Type)
	if !ok || n.Opaque || len(n.Raw) != w {
		return 0, fmt.Errorf("stream: %s (%s): %w", n.Name, n.Type, errNotInteger)
	}
	var v uint64
	for _, b := range n.Raw {
		v = v<<8 | uint64(b)
	}
	return v, nil
}

// Int returns the value of an integer-typed leaf: sign-extended for signed types (int8…int64,
// "int32 equal", "int32 le", timer — whose -1 means "not armed"), and for unsigned types the
// value if it fits in an int64.
func (n *Node) Int() (int64, error) {
	v, err := n.Uint()
	if err != nil {
		return 0, err
	}
	w, signed, _ := intType(n.Type)
	if signed {
		shift := uint(64 - 8*w)
		return int64(v<<shift) >> shift, nil
	}
	if v > math.MaxInt64 {
		return 0, fmt.Errorf("stream: %s (%s): value %d overflows int64", n.Name, n.Type, v)
	}
	return int64(v), nil
}

// Bool returns a "bool" leaf's value; like QEMU's loader, any non-zero byte is true.
func (n *Node) Bool() (bool, error) {
	if n.Type != "bool" || n.Opaque || len(n.Raw) != 1 {
		return false, fmt.Errorf("stream: %s (%s): not a bool field", n.Name, n.Type)
	}
	return n.Raw[0] != 0, nil
}

// Float64 returns a "float64" leaf's value.
func (n *Node) Float64() (float64, error) {
	if n.Type != "float64" || len(n.Raw) != 8 {
		return 0, fmt.Errorf("stream: %s (%s): not a float64 field", n.Name, n.Type)
	}
	return math.Float64frombits(binary.BigEndian.Uint64(n.Raw)), nil
}

// formatMaxBytes is how many bytes of a buffer Format prints in hex.
const formatMaxBytes = 32

// Format pretty-prints a decoded tree for `inspect --device NAME`: one line per node, indented by
// depth, as `name[idx] type = value`. Integers are shown in decimal and hex, bools as true/false,
// other leaves as hex truncated to 32 bytes with the total size; struct and subsection lines
// carry the vmsd name and version.
func Format(w io.Writer, n *Node) error {
	var sb strings.Builder
	formatNode(&sb, n, 0)
	_, err := io.WriteString(w, sb.String())
	return err
}

func formatNode(sb *strings.Builder, n *Node, depth int) {
	if n == nil {
		return
	}
	for i := 0; i < depth; i++ {
		sb.WriteString("  ")
	}
	switch {
	case n.Type == NodeTypeDevice:
		fmt.Fprintf(sb, "%s (vmsd %s v%d, %d bytes)\n", n.Name, n.VMSD, n.Version, n.Size)
	case n.Subsection:
		fmt.Fprintf(sb, "subsection %s v%d (%d bytes)\n", n.Name, n.Version, n.Size)
	default:
		sb.WriteString(n.Name)
		if n.Index >= 0 {
			fmt.Fprintf(sb, "[%d]", n.Index)
		}
		sb.WriteByte(' ')
		sb.WriteString(n.Type)
		if n.Raw == nil && (n.Children != nil || n.VMSD != "") {
			fmt.Fprintf(sb, " %s v%d (%d bytes)\n", n.VMSD, n.Version, n.Size)
		} else {
			sb.WriteString(" = ")
			sb.WriteString(formatValue(n))
			sb.WriteByte('\n')
		}
	}
	for _, c := range n.Children {
		formatNode(sb, c, depth+1)
	}
}

func formatValue(n *Node) string {
	if n.Type == "bool" && !n.Opaque && len(n.Raw) == 1 && n.Raw[0] <= 1 {
		return fmt.Sprint(n.Raw[0] == 1)
	}
	if v, err := n.Uint(); err == nil {
		if n.Type == "timer" && v == math.MaxUint64 {
			return "-1 (not armed)"
		}
		w, signed, _ := intType(n.Type)
		if signed {
			iv, _ := n.Int()
			return fmt.Sprintf("%d (0x%0*x)", iv, 2*w, v)
		}
		return fmt.Sprintf("%d (0x%0*x)", v, 2*w, v)
	}
	raw := n.Raw
	suffix := ""
	if len(raw) > formatMaxBytes {
		raw = raw[:formatMaxBytes]
		suffix = "…"
	}
	op := ""
	if n.Opaque {
		op = "opaque "
	}
	return fmt.Sprintf("%s%s (%s%d bytes)", hex.EncodeToString(raw), suffix, op, len(n.Raw))
}
