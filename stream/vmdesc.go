package stream

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
)

// ErrVMDescInvalid is wrapped by the *Error returned when the vmdesc JSON (stream-format.md §5.1)
// is syntactically valid but does not follow the schema (wrong value kinds, out-of-range numbers)
// or exceeds the VMDescOptions caps.
var ErrVMDescInvalid = errors.New("invalid vmdesc JSON")

// VMDesc is the parsed vmdesc JSON that QEMU appends after the EOF byte of a precopy stream
// (QEMU_VM_VMDESCRIPTION, stream-format.md §5.1). It describes the vmstate layout of every FULL
// device section, in stream order, and is what DecodeVMState walks. The destination never reads it,
// so it may be absent, minimal or wrong; callers must be ready to fall back to footer scanning.
type VMDesc struct {
	// Configuration describes the configuration vmstate (§1). Only QEMU 10.0 writes it; nil otherwise.
	Configuration *VMSD
	// PageSize is the "page_size" value (target page size, 4096 on x86); 0 if absent.
	PageSize int64
	// Devices has one entry per FULL section, in stream order.
	Devices []VMDescDevice
}

// VMDescDevice is one entry of the vmdesc "devices" array: the section's idstr and instance id
// plus the vmsd description of its body (§5.1).
type VMDescDevice struct {
	Name       string // section idstr, e.g. "kvmclock" or "0000:00:1f.0/ICH9LPC"
	InstanceID uint32 // section instance id
	VMSD       VMSD   // description of the section body
}

// VMSD is a vmsd-object of the vmdesc JSON (§5.1): the description of one vmstate body — its
// fields in wire order, then the subsections that were actually sent, in wire order.
type VMSD struct {
	Name        string        // "vmsd_name"; for subsections the full name, e.g. "cpu/tsc_khz"
	Version     int           // "version": the version written (subsection headers repeat it)
	Fields      []VMDescField // "fields"
	Subsections []VMSD        // "subsections"
	// Size is the object-level "size" that old-style (non-vmsd) handlers carry next to their
	// single "data" buffer field (§5.1 item 3); -1 when absent.
	Size int
}

// VMDescField is one entry of a vmsd-object's "fields" array (§5.1).
type VMDescField struct {
	Name string // "name"; non-unique names are suffixed "[k]" by QEMU
	Type string // "type": vmstate info name, e.g. "uint32", "int32 equal", "struct", "nullptr", "tmp"
	// Size is "size": the bytes written for one element (for struct: including nested subsection
	// headers; for tmp/qtailq/qlist/gtree: the total); -1 when absent.
	Size int
	// ArrayLen is "array_len" (≥ 2 in QEMU output): a compressed array, only element 0 described;
	// 0 when absent (a single element).
	ArrayLen int
	// Index is "index" (one entry per element of a non-compressible array); -1 when absent.
	Index int
	// Struct is "struct": the nested vmsd of a struct/vstruct field; nil when absent.
	Struct *VMSD
}

// VMDescOptions bounds the work ParseVMDescWith does on hostile input. Zero fields take the
// defaults (DefaultVMDescMaxDepth, DefaultVMDescMaxItems).
type VMDescOptions struct {
	// MaxDepth caps JSON nesting (objects and arrays); QEMU's own output nests about 20 deep.
	MaxDepth int
	// MaxItems caps the total number of vmsd objects plus field entries (a real q35 vmdesc has
	// about 800).
	MaxItems int
	// BaseOffset is the absolute stream offset of the first JSON byte, added to error offsets.
	BaseOffset int64
}

// Defaults for VMDescOptions.
const (
	DefaultVMDescMaxDepth = 128
	DefaultVMDescMaxItems = 1 << 20
)

// ParseVMDesc parses the vmdesc JSON (the bytes after `06 be32 len`, §5.1) with default limits.
// See ParseVMDescWith.
func ParseVMDesc(js []byte) (*VMDesc, error) {
	return ParseVMDescWith(js, VMDescOptions{})
}

// ParseVMDescWith parses the vmdesc JSON of §5.1. It is tolerant of what QEMU really emits:
// unknown keys are skipped, and the keys that tmp/qtailq/qlist/gtree fields flatten into their
// field object (duplicate "vmsd_name", "version", "fields" keys) are ignored, those fields being
// opaque anyway; for other duplicate keys the last one wins. Truncated, corrupt or over-limit
// input yields an *Error (wrapping ErrUnexpectedEOF, ErrVMDescInvalid or the JSON syntax error)
// whose Offset is BaseOffset plus the position in js; it never panics.
func ParseVMDescWith(js []byte, opts VMDescOptions) (*VMDesc, error) {
	if opts.MaxDepth <= 0 {
		opts.MaxDepth = DefaultVMDescMaxDepth
	}
	if opts.MaxItems <= 0 {
		opts.MaxItems = DefaultVMDescMaxItems
	}
	p := &vmdescParser{dec: json.NewDecoder(bytes.NewReader(js)), opts: opts}
	p.dec.UseNumber()
	d, err := p.top()
	if err != nil {
		return nil, err
	}
	// Anything but whitespace after the top-level object is corrupt.
	if _, err := p.dec.Token(); err != io.EOF {
		return nil, p.fail("end of vmdesc JSON", ErrVMDescInvalid)
	}
	return d, nil
}

type vmdescParser struct {
	dec   *json.Decoder
	opts  VMDescOptions
	depth int
	items int
}

func (p *vmdescParser) fail(expected string, err error) *Error {
	off := p.dec.InputOffset()
	var se *json.SyntaxError
	if errors.As(err, &se) {
		off = se.Offset
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || err == io.EOF {
		err = ErrUnexpectedEOF
	}
	return &Error{Offset: p.opts.BaseOffset + off, Expected: expected, Err: err}
}

func (p *vmdescParser) token(expected string) (json.Token, error) {
	t, err := p.dec.Token()
	if err != nil {
		return nil, p.fail(expected, err)
	}
	return t, nil
}

// open consumes the delimiter d ('{' or '[') and accounts for nesting depth.
func (p *vmdescParser) open(d json.Delim, expected string) error {
	t, err := p.token(expected)
	if err != nil {
		return err
	}
	if t != d {
		return p.fail(expected, fmt.Errorf("%w: got %v, want %v", ErrVMDescInvalid, t, d))
	}
	return p.push(expected)
}

func (p *vmdescParser) push(expected string) error {
	p.depth++
	if p.depth > p.opts.MaxDepth {
		return p.fail(expected, fmt.Errorf("%w: nesting deeper than %d", ErrVMDescInvalid, p.opts.MaxDepth))
	}
	return nil
}

// close consumes the closing delimiter that the caller saw via More() == false.
func (p *vmdescParser) close(expected string) error {
	if _, err := p.token(expected); err != nil {
		return err
	}
	p.depth--
	return nil
}

func (p *vmdescParser) item(expected string) error {
	p.items++
	if p.items > p.opts.MaxItems {
		return p.fail(expected, fmt.Errorf("%w: more than %d vmsd objects and fields", ErrVMDescInvalid, p.opts.MaxItems))
	}
	return nil
}

func (p *vmdescParser) key() (string, error) {
	t, err := p.token("object key")
	if err != nil {
		return "", err
	}
	k, ok := t.(string)
	if !ok {
		return "", p.fail("object key", ErrVMDescInvalid)
	}
	return k, nil
}

// skip consumes one value of any kind, respecting MaxDepth.
func (p *vmdescParser) skip() error {
	t, err := p.token("JSON value")
	if err != nil {
		return err
	}
	d, ok := t.(json.Delim)
	if !ok {
		return nil
	}
	if d != '{' && d != '[' {
		return p.fail("JSON value", ErrVMDescInvalid)
	}
	if err := p.push("JSON value"); err != nil {
		return err
	}
	start := p.depth
	for p.depth >= start {
		t, err := p.token("JSON value")
		if err != nil {
			return err
		}
		if d, ok := t.(json.Delim); ok {
			if d == '{' || d == '[' {
				if err := p.push("JSON value"); err != nil {
					return err
				}
			} else {
				p.depth--
			}
		}
	}
	return nil
}

func (p *vmdescParser) str(expected string) (string, error) {
	t, err := p.token(expected)
	if err != nil {
		return "", err
	}
	s, ok := t.(string)
	if !ok {
		return "", p.fail(expected, fmt.Errorf("%w: not a string", ErrVMDescInvalid))
	}
	return s, nil
}

// integer reads a JSON integer within [min, max].
func (p *vmdescParser) integer(expected string, min, max int64) (int64, error) {
	t, err := p.token(expected)
	if err != nil {
		return 0, err
	}
	n, ok := t.(json.Number)
	if !ok {
		return 0, p.fail(expected, fmt.Errorf("%w: not a number", ErrVMDescInvalid))
	}
	v, err := strconv.ParseInt(string(n), 10, 64)
	if err != nil || v < min || v > max {
		return 0, p.fail(expected, fmt.Errorf("%w: %q is not an integer in [%d, %d]", ErrVMDescInvalid, string(n), min, max))
	}
	return v, nil
}

func (p *vmdescParser) top() (*VMDesc, error) {
	if err := p.open('{', "vmdesc top-level object"); err != nil {
		return nil, err
	}
	d := &VMDesc{}
	for p.dec.More() {
		k, err := p.key()
		if err != nil {
			return nil, err
		}
		switch k {
		case "configuration":
			v := &VMSD{}
			if err := p.vmsdObject(v, "configuration vmsd"); err != nil {
				return nil, err
			}
			d.Configuration = v
		case "page_size":
			if d.PageSize, err = p.integer("page_size", 0, math.MaxInt64); err != nil {
				return nil, err
			}
		case "devices":
			if d.Devices, err = p.devices(); err != nil {
				return nil, err
			}
		default:
			if err := p.skip(); err != nil {
				return nil, err
			}
		}
	}
	return d, p.close("end of vmdesc object")
}

func (p *vmdescParser) devices() ([]VMDescDevice, error) {
	if err := p.open('[', "devices array"); err != nil {
		return nil, err
	}
	var devs []VMDescDevice
	for p.dec.More() {
		if err := p.item("device"); err != nil {
			return nil, err
		}
		var dev VMDescDevice
		dev.VMSD.Size = -1
		if err := p.open('{', "device object"); err != nil {
			return nil, err
		}
		for p.dec.More() {
			k, err := p.key()
			if err != nil {
				return nil, err
			}
			switch k {
			case "name":
				dev.Name, err = p.str("device name")
			case "instance_id":
				var v int64
				v, err = p.integer("instance_id", 0, math.MaxUint32)
				dev.InstanceID = uint32(v)
			default:
				err = p.vmsdKey(&dev.VMSD, k)
			}
			if err != nil {
				return nil, err
			}
		}
		if err := p.close("end of device object"); err != nil {
			return nil, err
		}
		devs = append(devs, dev)
	}
	return devs, p.close("end of devices array")
}

// vmsdObject parses a whole vmsd-object.
func (p *vmdescParser) vmsdObject(v *VMSD, expected string) error {
	if err := p.item(expected); err != nil {
		return err
	}
	v.Size = -1
	if err := p.open('{', expected); err != nil {
		return err
	}
	for p.dec.More() {
		k, err := p.key()
		if err != nil {
			return err
		}
		if err := p.vmsdKey(v, k); err != nil {
			return err
		}
	}
	return p.close("end of " + expected)
}

// vmsdKey parses the value of one key of a vmsd-object (shared with device objects).
func (p *vmdescParser) vmsdKey(v *VMSD, k string) error {
	var err error
	switch k {
	case "vmsd_name":
		v.Name, err = p.str("vmsd_name")
	case "version":
		var n int64
		n, err = p.integer("vmsd version", math.MinInt32, math.MaxInt32)
		v.Version = int(n)
	case "size":
		var n int64
		n, err = p.integer("vmsd size", 0, math.MaxInt32)
		v.Size = int(n)
	case "fields":
		v.Fields, err = p.fields()
	case "subsections":
		err = p.open('[', "subsections array")
		v.Subsections = v.Subsections[:0]
		for err == nil && p.dec.More() {
			var s VMSD
			if err = p.vmsdObject(&s, "subsection vmsd"); err == nil {
				v.Subsections = append(v.Subsections, s)
			}
		}
		if err == nil {
			err = p.close("end of subsections array")
		}
	default:
		err = p.skip()
	}
	return err
}

func (p *vmdescParser) fields() ([]VMDescField, error) {
	if err := p.open('[', "fields array"); err != nil {
		return nil, err
	}
	var fs []VMDescField
	for p.dec.More() {
		if err := p.item("field"); err != nil {
			return nil, err
		}
		f := VMDescField{Size: -1, Index: -1}
		if err := p.open('{', "field object"); err != nil {
			return nil, err
		}
		for p.dec.More() {
			k, err := p.key()
			if err != nil {
				return nil, err
			}
			var n int64
			switch k {
			case "name":
				f.Name, err = p.str("field name")
			case "type":
				f.Type, err = p.str("field type")
			case "size":
				n, err = p.integer("field size", 0, math.MaxInt32)
				f.Size = int(n)
			case "array_len":
				n, err = p.integer("field array_len", 1, math.MaxInt32)
				f.ArrayLen = int(n)
			case "index":
				n, err = p.integer("field index", 0, math.MaxInt32)
				f.Index = int(n)
			case "struct":
				s := &VMSD{}
				if err = p.vmsdObject(s, "struct vmsd"); err == nil {
					f.Struct = s
				}
			default:
				// Includes the flattened "vmsd_name"/"version"/"fields" of tmp, qtailq, qlist and
				// gtree fields (§5.1 item 2): unreliable, the field is opaque.
				err = p.skip()
			}
			if err != nil {
				return nil, err
			}
		}
		if err := p.close("end of field object"); err != nil {
			return nil, err
		}
		fs = append(fs, f)
	}
	return fs, p.close("end of fields array")
}

// Device returns the first device entry with the given idstr and instance id, or nil.
func (d *VMDesc) Device(name string, instanceID uint32) *VMDescDevice {
	for i := range d.Devices {
		if d.Devices[i].Name == name && d.Devices[i].InstanceID == instanceID {
			return &d.Devices[i]
		}
	}
	return nil
}
