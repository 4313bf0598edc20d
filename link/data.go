package link

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Data frames (PROTOCOL.md §2.2). Encoders append a whole frame (header included) to a buffer,
// so that a frame can be handed to a connection writer as one slice; decoders take a payload
// (after the header) and check every length before use.

// errShort is wrapped when a payload ends before a field.
var errShort = errors.New("payload too short")

// begin starts a data frame: header with a provisional length, and the sequence number.
func begin(dst []byte, t FrameType, seq uint64) []byte {
	dst = AppendHeader(dst, t, 0)
	return binary.BigEndian.AppendUint64(dst, seq)
}

// finish sets the length of the frame that starts at dst[start].
func finish(dst []byte, start int) []byte {
	SetHeaderLength(dst[start:])
	return dst
}

// dec is a bounds-checked payload decoder with a sticky error.
type dec struct {
	b   []byte
	p   int
	err error
	t   FrameType
}

func (d *dec) need(n int, what string) bool {
	if d.err != nil {
		return false
	}
	if n < 0 || len(d.b)-d.p < n {
		d.err = fmt.Errorf("%s at payload offset %d: %w", what, d.p, errShort)
		return false
	}
	return true
}

func (d *dec) u8(what string) uint8 {
	if !d.need(1, what) {
		return 0
	}
	d.p++
	return d.b[d.p-1]
}

func (d *dec) u16(what string) uint16 {
	if !d.need(2, what) {
		return 0
	}
	d.p += 2
	return binary.BigEndian.Uint16(d.b[d.p-2:])
}

func (d *dec) u32(what string) uint32 {
	if !d.need(4, what) {
		return 0
	}
	d.p += 4
	return binary.BigEndian.Uint32(d.b[d.p-4:])
}

func (d *dec) u64(what string) uint64 {
	if !d.need(8, what) {
		return 0
	}
	d.p += 8
	return binary.BigEndian.Uint64(d.b[d.p-8:])
}

func (d *dec) bytes(n int, what string) []byte {
	if !d.need(n, what) {
		return nil
	}
	d.p += n
	return d.b[d.p-n : d.p]
}

func (d *dec) cstr(what string) string {
	n := int(d.u8(what + " length"))
	if n == 0 && d.err == nil {
		d.err = fmt.Errorf("empty %s at payload offset %d", what, d.p-1)
	}
	return string(d.bytes(n, what))
}

func (d *dec) rest() []byte {
	if d.err != nil {
		return nil
	}
	r := d.b[d.p:]
	d.p = len(d.b)
	return r
}

// done returns the decoder's error, or an error for bytes left over.
func (d *dec) done() error {
	if d.err == nil && d.p != len(d.b) {
		d.err = fmt.Errorf("%d bytes after the last field", len(d.b)-d.p)
	}
	if d.err != nil {
		return fmt.Errorf("%s: %w", d.t, d.err)
	}
	return nil
}

func newDec(t FrameType, payload []byte) (*dec, uint64) {
	d := &dec{b: payload, t: t}
	return d, d.u64("sequence number")
}

// Begin is BEGIN: the stream header and the configuration as QEMU sent them.
type Begin struct {
	Seq     uint64
	Magic   uint32
	Version uint32
	Config  []byte // the configuration section's body (after the 0x07 type byte)
}

func (b Begin) Append(dst []byte) []byte {
	s := len(dst)
	dst = begin(dst, FrameBegin, b.Seq)
	dst = binary.BigEndian.AppendUint32(dst, b.Magic)
	dst = binary.BigEndian.AppendUint32(dst, b.Version)
	return finish(append(dst, b.Config...), s)
}

// ParseBegin decodes BEGIN's payload; Config aliases it.
func ParseBegin(p []byte) (Begin, error) {
	d, seq := newDec(FrameBegin, p)
	b := Begin{Seq: seq, Magic: d.u32("magic"), Version: d.u32("version")}
	b.Config = d.rest()
	return b, d.done()
}

// Section types in SECTION (stream-format.md §2).
const (
	StartSection uint8 = 1
	PartSection  uint8 = 2
	EndSection   uint8 = 3
)

// Section is SECTION: the header of a START, PART or END section of an iterative handler.
type Section struct {
	Seq      uint64
	Type     uint8 // StartSection, PartSection, EndSection
	ID       uint32
	Idstr    string // START only
	Instance uint32 // START only
	Version  uint32 // START only
}

func (s Section) Append(dst []byte) []byte {
	st := len(dst)
	dst = begin(dst, FrameSection, s.Seq)
	dst = binary.BigEndian.AppendUint32(append(dst, s.Type), s.ID)
	if s.Type == StartSection {
		dst = append(append(dst, byte(len(s.Idstr))), s.Idstr...)
		dst = binary.BigEndian.AppendUint32(dst, s.Instance)
		dst = binary.BigEndian.AppendUint32(dst, s.Version)
	}
	return finish(dst, st)
}

// ParseSection decodes SECTION's payload.
func ParseSection(p []byte) (Section, error) {
	d, seq := newDec(FrameSection, p)
	s := Section{Seq: seq, Type: d.u8("section type"), ID: d.u32("section id")}
	switch s.Type {
	case StartSection:
		s.Idstr = d.cstr("idstr")
		s.Instance, s.Version = d.u32("instance"), d.u32("version")
	case PartSection, EndSection:
	default:
		if d.err == nil {
			d.err = fmt.Errorf("section type %d (want 1 START, 2 PART or 3 END)", s.Type)
		}
	}
	return s, d.done()
}

// Block is one RAM block of MEMSIZE (stream-format.md §4).
type Block struct {
	Name        string
	UsedLength  uint64
	HasPageSize bool
	PageSize    uint64
	HasGPA      bool
	GPA         uint64
}

// MaxBlocks bounds the blocks of MEMSIZE.
const MaxBlocks = 1024

// MemSize is MEMSIZE: the block list of the ram section's START.
type MemSize struct {
	Seq    uint64
	Blocks []Block
}

func (m MemSize) Append(dst []byte) []byte {
	st := len(dst)
	dst = begin(dst, FrameMemSize, m.Seq)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(m.Blocks)))
	for _, b := range m.Blocks {
		dst = append(append(dst, byte(len(b.Name))), b.Name...)
		dst = binary.BigEndian.AppendUint64(dst, b.UsedLength)
		var fl byte
		if b.HasPageSize {
			fl |= 1
		}
		if b.HasGPA {
			fl |= 2
		}
		dst = append(dst, fl)
		if b.HasPageSize {
			dst = binary.BigEndian.AppendUint64(dst, b.PageSize)
		}
		if b.HasGPA {
			dst = binary.BigEndian.AppendUint64(dst, b.GPA)
		}
	}
	return finish(dst, st)
}

// ParseMemSize decodes MEMSIZE's payload.
func ParseMemSize(p []byte) (MemSize, error) {
	d, seq := newDec(FrameMemSize, p)
	m := MemSize{Seq: seq}
	n := int(d.u16("block count"))
	if n > MaxBlocks && d.err == nil {
		d.err = fmt.Errorf("%d blocks (at most %d)", n, MaxBlocks)
	}
	var total uint64
	for i := 0; i < n && d.err == nil; i++ {
		b := Block{Name: d.cstr("block name"), UsedLength: d.u64("used length")}
		fl := d.u8("block flags")
		if fl&^3 != 0 && d.err == nil {
			d.err = fmt.Errorf("block %q: unknown flags 0x%x", b.Name, fl)
		}
		if fl&1 != 0 {
			b.HasPageSize, b.PageSize = true, d.u64("page size")
		}
		if fl&2 != 0 {
			b.HasGPA, b.GPA = true, d.u64("GPA")
		}
		if d.err == nil && (b.UsedLength == 0 || b.UsedLength%4096 != 0 || total+b.UsedLength < total) {
			d.err = fmt.Errorf("block %q with length 0x%x", b.Name, b.UsedLength)
		}
		total += b.UsedLength
		m.Blocks = append(m.Blocks, b)
	}
	return m, d.done()
}

// SectionEnd is SECTION_END: the EOS of a ram body and the section's footer.
type SectionEnd struct {
	Seq uint64
	ID  uint32
}

func (s SectionEnd) Append(dst []byte) []byte {
	st := len(dst)
	dst = begin(dst, FrameSectionEnd, s.Seq)
	return finish(binary.BigEndian.AppendUint32(dst, s.ID), st)
}

// ParseSectionEnd decodes SECTION_END's payload.
func ParseSectionEnd(p []byte) (SectionEnd, error) {
	d, seq := newDec(FrameSectionEnd, p)
	s := SectionEnd{Seq: seq, ID: d.u32("section id")}
	return s, d.done()
}

// Command is COMMAND: a QEMU_VM_COMMAND (stream-format.md §3).
type Command struct {
	Seq     uint64
	Cmd     uint16
	Payload []byte
}

func (c Command) Append(dst []byte) []byte {
	st := len(dst)
	dst = begin(dst, FrameCommand, c.Seq)
	dst = binary.BigEndian.AppendUint16(dst, c.Cmd)
	return finish(append(dst, c.Payload...), st)
}

// ParseCommand decodes COMMAND's payload; Payload aliases it.
func ParseCommand(p []byte) (Command, error) {
	d, seq := newDec(FrameCommand, p)
	c := Command{Seq: seq, Cmd: d.u16("command")}
	c.Payload = d.rest()
	if len(c.Payload) > 0xFFFF && d.err == nil {
		d.err = fmt.Errorf("command payload of %d bytes", len(c.Payload))
	}
	return c, d.done()
}

// Device is DEVICE: device state bytes exactly as QEMU made them.
type Device struct {
	Seq  uint64
	Data []byte
}

// AppendDeviceHeader starts a DEVICE frame whose data the caller appends; finish it with
// SetHeaderLength on the slice from the frame's start.
func AppendDeviceHeader(dst []byte, seq uint64) []byte { return begin(dst, FrameDevice, seq) }

// ParseDevice decodes DEVICE's payload; Data aliases it.
func ParseDevice(p []byte) (Device, error) {
	seq, data, err := parseRaw(FrameDevice, p, false)
	return Device{Seq: seq, Data: data}, err
}

// parseRaw decodes a frame that carries QEMU's bytes as they are (DEVICE, PACKAGED): the
// sequence number, then the rest; Data aliases p.
func parseRaw(t FrameType, p []byte, nonEmpty bool) (uint64, []byte, error) {
	d, seq := newDec(t, p)
	data := d.rest()
	if nonEmpty && len(data) == 0 && d.err == nil {
		d.err = errors.New("no data")
	}
	return seq, data, d.done()
}

// End is END: the stream is complete up to its EOF (PROTOCOL.md §5). After a postcopy switch
// it also says how many URGENT frames the sender wrote on this session (§7.1): they travel on
// the control connection, which END's data connection can overtake, and the receiver must
// have written every one of them before its destination's stream ends.
type End struct {
	Seq       uint64
	HasVMDesc bool
	VMDesc    []byte
	HasUrgent bool
	Urgent    uint64
}

// END's flags.
const (
	endVMDesc = 1 << iota // the vmdesc follows
	endUrgent             // a be64 count of URGENT frames follows (before any vmdesc)
)

func (e End) Append(dst []byte) []byte {
	st := len(dst)
	dst = begin(dst, FrameEnd, e.Seq)
	var fl byte
	if e.HasVMDesc {
		fl |= endVMDesc
	}
	if e.HasUrgent {
		fl |= endUrgent
	}
	dst = append(dst, fl)
	if e.HasUrgent {
		dst = binary.BigEndian.AppendUint64(dst, e.Urgent)
	}
	return finish(append(dst, e.VMDesc...), st)
}

// ParseEnd decodes END's payload; VMDesc aliases it.
func ParseEnd(p []byte) (End, error) {
	d, seq := newDec(FrameEnd, p)
	e := End{Seq: seq}
	fl := d.u8("flags")
	if fl&^(endVMDesc|endUrgent) != 0 && d.err == nil {
		d.err = fmt.Errorf("unknown END flags 0x%x", fl)
	}
	e.HasVMDesc = fl&endVMDesc != 0
	if e.HasUrgent = fl&endUrgent != 0; e.HasUrgent {
		e.Urgent = d.u64("urgent count")
	}
	e.VMDesc = d.rest()
	if !e.HasVMDesc && len(e.VMDesc) > 0 && d.err == nil {
		d.err = errors.New("vmdesc bytes without the vmdesc flag")
	}
	return e, d.done()
}

// Packaged is PACKAGED: the nested stream of QEMU's PACKAGED command (the postcopy switch:
// LISTEN, the device state, RUN), exactly as QEMU made it (PROTOCOL.md §7).
type Packaged struct {
	Seq  uint64
	Data []byte
}

// AppendPackagedHeader starts a PACKAGED frame whose data the caller appends; finish it with
// SetHeaderLength on the slice from the frame's start.
func AppendPackagedHeader(dst []byte, seq uint64) []byte { return begin(dst, FramePackaged, seq) }

// ParsePackaged decodes PACKAGED's payload; Data aliases it.
func ParsePackaged(p []byte) (Packaged, error) {
	seq, data, err := parseRaw(FramePackaged, p, true)
	return Packaged{Seq: seq, Data: data}, err
}

// PostcopyCommand reports whether a QEMU command goes over the link as a COMMAND frame with the
// postcopy feature (PROTOCOL.md §7): the return path's, postcopy's and a recovery's (PACKAGED
// has its own frame; LISTEN and RUN travel inside it).
func PostcopyCommand(cmd uint16) bool {
	switch cmd {
	case 1, 2, 3, 6, 9, 10: // OPEN_RETURN_PATH, PING, POSTCOPY_ADVISE, POSTCOPY_RAM_DISCARD, POSTCOPY_RESUME, RECV_BITMAP
		return true
	}
	return false
}

// Urgent is URGENT (PROTOCOL.md §7.1): one page the destination asked for, sent on the control
// connection ahead of the data frames queued before it. Entry is a PAGES entry (offset | kind,
// KindPage or KindZero); Data the page for KindPage.
type Urgent struct {
	Block uint16
	Entry uint64
	Data  []byte
}

// Append appends URGENT's payload.
func (u Urgent) Append(dst []byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, u.Block)
	dst = binary.BigEndian.AppendUint64(dst, u.Entry)
	return append(dst, u.Data...)
}

// ParseUrgent decodes URGENT's payload; Data aliases it.
func ParseUrgent(p []byte) (Urgent, error) {
	var u Urgent
	if len(p) < 10 {
		return u, fmt.Errorf("URGENT: %d bytes, want at least 10", len(p))
	}
	u.Block, u.Entry, u.Data = binary.BigEndian.Uint16(p), binary.BigEndian.Uint64(p[2:]), p[10:]
	switch u.Entry & (PageSize - 1) {
	case KindPage:
		if len(u.Data) != PageSize {
			return u, fmt.Errorf("URGENT: a page of %d bytes", len(u.Data))
		}
	case KindZero:
		if len(u.Data) != 0 {
			return u, fmt.Errorf("URGENT: a zero page with %d bytes of data", len(u.Data))
		}
	default:
		return u, fmt.Errorf("URGENT: entry kind 0x%03x (a page or a zero page only)", u.Entry&(PageSize-1))
	}
	return u, nil
}
