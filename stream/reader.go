// Package stream reads and writes QEMU's live-migration ("savevm") stream as produced and
// accepted by QEMU 7.2 and 10.0 (docs/stream-format.md).
//
// Reader decodes a stream record by record from any io.Reader (no seeking), with bounded
// allocation (Limits) and errors that name the byte offset and section (*Error). Writer is its
// exact inverse: writing every record Next returns reproduces the input byte for byte.
// RAM records are decoded without copying or allocating per page.
package stream

import (
	"bytes"
	"fmt"
	"io"
)

// Reader decodes a migration stream record by record from an io.Reader, without seeking, so it
// works on pipes and sockets. It tracks the absolute byte offset of everything it reads and
// reports every problem as an *Error. Errors are sticky.
//
// RAM records are decoded as they arrive. FULL device sections are not self-delimiting
// (design.md "Device sections are not self-delimiting"): at the first top-level FULL section the
// Reader reads the rest of the input (at most Limits.Tail bytes) as "the tail", locates the
// vmdesc at its end and splits the device sections with the DeviceSizer (WithDeviceSizer) or,
// failing that, by footer scanning. The exact tail bytes are available through WithRawTail
// and Tail. Consequently a top-level FULL section makes Next block until the input ends or
// ends with a complete vmdesc (the source may keep the connection open, e.g. waiting for a
// return-path SHUT). After the KindVMDesc record, Next reads once more to check that nothing
// follows, which waits for the end of input; callers that cannot wait may stop at KindVMDesc.
type Reader struct {
	top   input
	in    *input   // current input: &top or the innermost package
	pkgs  []*input // open PACKAGED inputs
	lim   Limits
	warn  func(off int64, msg string)
	sizer DeviceSizer

	rawTail  func([]byte)
	region   func(off int64, data []byte)
	copyData bool
	psField  func(block string) bool

	rec      Record
	raw      []byte // the last record's bytes as read (Raw)
	state    readState
	err      error
	tailData func([]byte)

	// Section tracking.
	sections  map[uint32]*sectionInfo
	cur       *sectionInfo
	inSection bool
	fullTop   int
	fullPkg   int

	// Capabilities deciding optional MEM_SIZE fields.
	forced         map[string]bool
	ignoreAfterEOF bool // WithIgnoreAfterEOF
	pastEOF        bool // the top-level EOF record was returned
	xIgnoreShared  bool
	mappedRAM      bool
	postcopyRAM    bool
	adviseSummary  uint64
	advised        bool
	pageSize       int
	pageMask       uint64
	targetPageSize uint64

	// RAM block tracking for CONTINUE.
	blocks      []blockInfo
	last        int // index in blocks of the last named block, -1 if none
	memSizeSeen bool
	blockList   []RAMBlock
	caps        []string
	dataBuf     []byte
	big         []byte
	tail        []byte
	rest        io.Reader // input after a tail that ended at a complete vmdesc
}

type sectionInfo struct {
	hdr SectionHeader
	ram bool
}

type blockInfo struct {
	name   string
	length uint64 // used_length from MEM_SIZE, 0 if unknown
}

type readState uint8

const (
	stHeader readState = iota
	stConfig
	stTop
	stRAM
	stFooter
	stAfterEOF
	stDone
)

// Option configures a Reader.
type Option func(*Reader)

// WithLimits sets the caps on lengths read from the wire (zero fields keep their defaults).
func WithLimits(l Limits) Option { return func(r *Reader) { r.lim = l.withDefaults() } }

// WithWarnings sets a function called for conditions that do not stop decoding, such as a
// device-section boundary found heuristically.
func WithWarnings(fn func(offset int64, msg string)) Option { return func(r *Reader) { r.warn = fn } }

// WithDeviceSizer sets the function that measures FULL section bodies (normally driven by the
// vmdesc JSON). Without it, or when it fails, bodies are delimited by footer scanning.
func WithDeviceSizer(fn DeviceSizer) Option { return func(r *Reader) { r.sizer = fn } }

// WithRawTail sets a function called once with the exact bytes of the device tail (from the
// type byte of the first top-level FULL section to the end of the input) when it has been read.
// The slice stays valid and unmodified for the life of the Reader.
func WithRawTail(fn func(tail []byte)) Option { return func(r *Reader) { r.rawTail = fn } }

// WithCapabilities turns on capabilities that change the stream layout (CapXIgnoreShared,
// CapMappedRAM, CapPostcopyRAM) for streams whose configuration does not list them.
// Capabilities listed in the configuration are always honoured.
func WithCapabilities(names ...string) Option {
	return func(r *Reader) {
		for _, n := range names {
			r.forced[n] = true
		}
	}
}

// WithPageSizeField overrides the decision whether a MEM_SIZE block entry carries the optional
// be64 page size (stream-format.md §4). By default it is read when postcopy-ram was advised
// with a page-size summary other than the target page size, for entries whose next be64 looks
// like a huge page size present in that summary.
func WithPageSizeField(fn func(block string) bool) Option { return func(r *Reader) { r.psField = fn } }

// WithMappedRAMData sets a function receiving, in chunks, the file bytes a mapped-ram stream
// skips over (bitmaps and page areas, stream-format.md §4.3) with their absolute offsets.
// Without it those bytes are read and discarded.
func WithMappedRAMData(fn func(off int64, data []byte)) Option {
	return func(r *Reader) { r.region = fn }
}

// WithIgnoreAfterEOF makes the Reader treat what follows the top-level EOF record as a
// destination does (stream-format.md §5.1): a missing, damaged or over-long vmdesc, or bytes
// after it, give a warning (WithWarnings) and io.EOF instead of an error. The default is strict,
// for verifying streams.
func WithIgnoreAfterEOF() Option { return func(r *Reader) { r.ignoreAfterEOF = true } }

// WithBeforeRead sets a function called before every read from the underlying io.Reader (and
// before the device tail is read). Slices of earlier records (Raw, Data, Body) stay valid until
// then, however many records were returned since: a caller that forwards records as their own
// bytes writes them out in fn, and so forwards each one as soon as nothing more is available.
func WithBeforeRead(fn func()) Option { return func(r *Reader) { r.top.before = fn } }

// WithTailData sets a function called each time more of the device tail has arrived, with the
// tail so far (the slice may be reallocated between calls; it is valid during the call). A
// relay can forward the tail while it arrives: tail[:SafeTailPrefix(tail)] never holds the
// stream's EOF.
func WithTailData(fn func(tail []byte)) Option { return func(r *Reader) { r.tailData = fn } }

// SafeTailPrefix returns how much of a device tail still arriving may be forwarded without
// completing the stream: everything up to 5 bytes before its last NUL byte. The vmdesc JSON
// after EOF holds no NUL, so the last NUL of the whole tail is the EOF byte itself or one of the
// 4 length bytes after the 0x06 that follows it (stream-format.md §5.1): the EOF byte is never
// before tail's last NUL − 5, and the last NUL only moves forward as the tail grows.
func SafeTailPrefix(tail []byte) int {
	return max(0, bytes.LastIndexByte(tail, byte(SectionEOF))-5)
}

// Raw returns the bytes of the record Next last returned, exactly as they were read, when they
// lie in one piece in memory (nil otherwise: a PACKAGED command's header, a vmdesc too large
// for the buffer, a mapped-ram block list). They stay valid as WithBeforeRead says.
func (r *Reader) Raw() []byte { return r.raw }

// WithZeroCopy controls whether RAM Data and other payload slices alias the Reader's internal
// buffer (true, the default: no copy) or are copied into a buffer reused across calls (false).
// In both cases they are valid only until the next call to Next.
func WithZeroCopy(on bool) Option { return func(r *Reader) { r.copyData = !on } }

// WithBufferSize sets the size of the internal read buffer (default 1 MiB; raised if needed to
// hold the largest record the limits allow).
func WithBufferSize(n int) Option { return func(r *Reader) { r.top.buf = make([]byte, n) } }

const defaultBufferSize = 1 << 20

// maxPageBits bounds configuration/target-page-bits (64 KiB pages).
const maxPageBits = 16

// NewReader returns a Reader decoding the stream read from rd.
func NewReader(rd io.Reader, opts ...Option) *Reader {
	r := &Reader{
		lim:      DefaultLimits(),
		sections: make(map[uint32]*sectionInfo),
		forced:   make(map[string]bool),
		last:     -1,
	}
	for _, o := range opts {
		o(r)
	}
	// The largest window parsed in one piece: RAM record header with name plus payload.
	need := 2 * (8 + 1 + 255 + 4 + max(1<<maxPageBits, r.lim.XBZRLE, r.lim.CompressedPage))
	need = max(need, 2*(1+4+r.lim.MachineName+r.lim.Capabilities*256+64*1024))
	switch {
	case r.top.buf == nil:
		r.top.buf = make([]byte, max(need, defaultBufferSize))
	case len(r.top.buf) < need:
		r.top.buf = make([]byte, need)
	}
	r.top.rd = rd
	r.in = &r.top
	r.setPageBits(12)
	return r
}

func (r *Reader) setPageBits(bits uint) {
	r.pageSize = 1 << bits
	r.pageMask = uint64(r.pageSize - 1)
	r.targetPageSize = uint64(r.pageSize)
}

// Tail returns the raw device tail once it has been read (see WithRawTail), else nil.
func (r *Reader) Tail() []byte { return r.tail }

// Offset returns the absolute offset of the next byte the Reader will decode.
func (r *Reader) Offset() int64 { return r.in.off() }

// Next returns the next record. It returns io.EOF after the last record: after the vmdesc, or
// when the input ends right after the EOF record. The Record and its slices are valid only
// until the next call.
func (r *Reader) Next() (*Record, error) {
	if r.err != nil {
		return nil, r.err
	}
	in := r.in
	rec, err := r.next()
	r.raw = nil
	if rec != nil {
		r.raw = rawOf(in, rec)
	}
	if err != nil && err != io.EOF && r.ignoreAfterEOF && r.pastEOF {
		r.warnf(r.in.off(), "after EOF: %v (ignored, as a destination does)", err)
		err = io.EOF
	}
	if err != nil {
		r.err = err
		return nil, err
	}
	return rec, nil
}

// rawOf returns rec's bytes when they are in one piece in in's buffer: from the record's
// offset to where in now stands. A record that moved the Reader to another input (a PACKAGED
// command, the end of a package) or that was copied out of the buffer has none.
func rawOf(in *input, rec *Record) []byte {
	if rec.Kind == KindPackageEnd || (rec.Kind == KindCommand && rec.Cmd == CmdPackaged) {
		return nil
	}
	start, end := rec.Offset-in.base, in.off()-in.base
	if start < 0 || end < start || end > int64(in.w) {
		return nil
	}
	if rec.Kind == KindVMDesc && int64(len(rec.JSON)) != end-start-5 {
		return nil
	}
	if rec.Kind == KindRAM && rec.RAM.Flags&^RAMContinue == RAMMemSize {
		for _, b := range rec.RAM.Blocks {
			if b.HasMappedRAM {
				return nil // the file regions in between were skipped, not kept
			}
		}
	}
	return in.buf[start:end]
}

func (r *Reader) fail(off int64, expected string, err error) *Error {
	e := &Error{Offset: off, Expected: expected, Err: err}
	if r.inSection && r.cur != nil {
		e.InSection = true
		e.SectionID = r.cur.hdr.ID
		e.Idstr = r.cur.hdr.Idstr
	}
	return e
}

func (r *Reader) failf(off int64, expected, format string, args ...any) *Error {
	return r.fail(off, expected, fmt.Errorf(format, args...))
}

// short is the error for input that ended inside an item.
func (r *Reader) short(off int64, expected string) *Error {
	err := r.in.readErr()
	if r.in.pkg && err == ErrUnexpectedEOF {
		err = fmt.Errorf("end of PACKAGED data: %w", ErrUnexpectedEOF)
	}
	return r.fail(off, expected, err)
}

func (r *Reader) tooLarge(off int64, expected string, n uint64, limit int) *Error {
	return r.fail(off, expected, fmt.Errorf("%w: %d > %d", ErrTooLarge, n, limit))
}

func (r *Reader) warnf(off int64, format string, args ...any) {
	if r.warn != nil {
		r.warn(off, fmt.Sprintf(format, args...))
	}
}

func (r *Reader) newRecord(k Kind, off int64) *Record {
	r.rec = Record{Kind: k, Offset: off, Depth: len(r.pkgs)}
	return &r.rec
}

// payload returns b, or a copy of it in a reused buffer when zero-copy is off.
func (r *Reader) payload(b []byte) []byte {
	if !r.copyData {
		return b
	}
	r.dataBuf = append(r.dataBuf[:0], b...)
	return r.dataBuf
}

func (r *Reader) next() (*Record, error) {
	switch r.state {
	case stHeader:
		return r.readHeader()
	case stConfig:
		in := r.in
		if in.ensure(1) && SectionType(in.buf[in.r]) == SectionConfiguration {
			return r.readConfig()
		}
		r.warnf(in.off(), "configuration section missing (QEMU destinations of machine types >= 2.4 refuse this stream)")
		r.state = stTop
		return r.readTop()
	case stTop:
		return r.readTop()
	case stRAM:
		return r.readRAM()
	case stFooter:
		return r.readFooter()
	case stAfterEOF:
		return r.afterEOF()
	}
	in := r.in
	if in.ensure(1) {
		return nil, r.failf(in.off(), "end of stream", "trailing data after the vmdesc")
	}
	if r.rest != nil {
		// The tail was cut at a complete vmdesc before the input ended: check for more.
		var one [1]byte
		n, err := io.ReadFull(r.rest, one[:])
		r.rest = nil
		if n > 0 {
			return nil, r.failf(in.off(), "end of stream", "trailing data after the vmdesc")
		}
		if err != io.EOF {
			return nil, r.fail(in.off(), "end of stream", err)
		}
	}
	if in.err != nil && in.err != io.EOF {
		return nil, r.fail(in.off(), "end of stream", in.err)
	}
	return nil, io.EOF
}

func (r *Reader) readHeader() (*Record, error) {
	in := r.in
	off := in.off()
	if !in.ensure(8) {
		return nil, r.short(off, "file header")
	}
	b := in.win()
	magic, version := be32(b), be32(b[4:])
	if magic != Magic {
		return nil, r.failf(off, "file header", "not a migration stream (magic 0x%08x)", magic)
	}
	switch version {
	case Version:
	case versionV2:
		return nil, r.failf(off+4, "file header", "SaveVM v2 format is obsolete")
	default:
		return nil, r.failf(off+4, "file header", "unsupported migration stream version %d", version)
	}
	in.skip(8)
	rec := r.newRecord(KindHeader, off)
	rec.Magic, rec.Version = magic, version
	r.state = stConfig
	return rec, nil
}

// readConfig parses the CONFIGURATION section (stream-format.md §1). The whole section is
// parsed from one window so that Raw can alias it.
func (r *Reader) readConfig() (*Record, error) {
	in := r.in
	off := in.off()
	const what = "configuration"
	p := 1 // past the type byte
	need := func(n int) bool { return in.ensure(p + n) }
	if !need(4) {
		return nil, r.short(off+int64(p), what+" machine name length")
	}
	nl := be32(in.buf[in.r+p:])
	if nl > uint32(r.lim.MachineName) {
		return nil, r.tooLarge(off+int64(p), what+" machine name", uint64(nl), r.lim.MachineName)
	}
	p += 4
	if !need(int(nl)) {
		return nil, r.short(off+int64(p), what+" machine name")
	}
	rec := r.newRecord(KindConfiguration, off)
	c := &rec.Config
	c.Machine = string(in.buf[in.r+p : in.r+p+int(nl)])
	p += int(nl)
	r.caps = r.caps[:0]
	for nsub := 0; ; nsub++ {
		if !in.ensure(p+1) || in.buf[in.r+p] != byte(SectionSubsection) {
			break
		}
		// 0x05 cannot start a top-level record, so a truncated subsection header is a
		// truncated configuration.
		if !need(2) {
			return nil, r.short(off+int64(p), what+" subsection header")
		}
		l := int(in.buf[in.r+p+1])
		if !need(2 + l) {
			return nil, r.short(off+int64(p), what+" subsection header")
		}
		name := in.buf[in.r+p+2 : in.r+p+2+l]
		if !bytes.HasPrefix(name, []byte("configuration")) {
			break
		}
		subOff := off + int64(p)
		if nsub >= 8 {
			return nil, r.failf(subOff, what+" subsection", "too many subsections")
		}
		if !need(2 + l + 4) {
			return nil, r.short(subOff, what+" subsection header")
		}
		sv := be32(in.buf[in.r+p+2+l:])
		sname := string(name)
		p += 2 + l + 4
		if sv != 1 {
			r.warnf(subOff, "configuration subsection %q has version %d, expected 1", sname, sv)
		}
		switch sname {
		case subTargetPageBits:
			if !need(4) {
				return nil, r.short(off+int64(p), sname)
			}
			bits := be32(in.buf[in.r+p:])
			if bits < 10 || bits > maxPageBits {
				return nil, r.failf(off+int64(p), sname, "unsupported target page bits %d", bits)
			}
			p += 4
			c.HasTargetPageBits, c.TargetPageBits = true, bits
			r.setPageBits(uint(bits))
		case subCapabilities:
			if !need(4) {
				return nil, r.short(off+int64(p), sname)
			}
			n := be32(in.buf[in.r+p:])
			if n > uint32(r.lim.Capabilities) {
				return nil, r.tooLarge(off+int64(p), sname+" count", uint64(n), r.lim.Capabilities)
			}
			p += 4
			c.HasCapabilities = true
			for range n {
				if !need(1) {
					return nil, r.short(off+int64(p), "capability name")
				}
				cl := int(in.buf[in.r+p])
				if !need(1 + cl) {
					return nil, r.short(off+int64(p), "capability name")
				}
				r.caps = append(r.caps, string(in.buf[in.r+p+1:in.r+p+1+cl]))
				p += 1 + cl
			}
		case subUUID:
			if !need(16) {
				return nil, r.short(off+int64(p), sname)
			}
			c.HasUUID = true
			copy(c.UUID[:], in.buf[in.r+p:])
			p += 16
		default:
			return nil, r.failf(subOff, what+" subsection", "unknown configuration subsection %q", sname)
		}
	}
	c.Capabilities = r.caps
	c.Raw = r.payload(in.buf[in.r+1 : in.r+p])
	in.skip(p)
	r.xIgnoreShared = c.HasCapability(CapXIgnoreShared)
	r.mappedRAM = c.HasCapability(CapMappedRAM)
	r.state = stTop
	return rec, nil
}

func (r *Reader) capOn(name string, fromStream bool) bool { return fromStream || r.forced[name] }

// readTop reads a top-level record: a section header, a command, or EOF.
func (r *Reader) readTop() (*Record, error) {
	in := r.in
	off := in.off()
	if !in.ensure(1) {
		if in.pkg && in.err == nil {
			return r.popPackage(off), nil
		}
		return nil, r.short(off, "section type")
	}
	t := SectionType(in.buf[in.r])
	switch t {
	case SectionEOF:
		in.skip(1)
		r.state = stAfterEOF
		r.pastEOF = r.pastEOF || in == &r.top
		return r.newRecord(KindEOF, off), nil
	case SectionStart, SectionFull:
		if t == SectionFull && in == &r.top && in.rd != nil {
			if err := r.enterTail(); err != nil {
				return nil, err
			}
		}
		return r.readSectionHeader(t, off)
	case SectionPart, SectionEnd:
		if !in.ensure(5) {
			return nil, r.short(off, t.String()+" section header")
		}
		id := be32(in.buf[in.r+1:])
		si := r.sections[id]
		if si == nil || !si.ram {
			return nil, r.failf(off, t.String()+" section header", "section id %d was not started by a START section", id)
		}
		in.skip(5)
		r.cur, r.inSection = si, true
		rec := r.newRecord(sectionKind(t), off)
		rec.Section = si.hdr
		rec.Section.Type = t
		r.state = stRAM
		return rec, nil
	case SectionCommand:
		return r.readCommand(off)
	}
	return nil, r.failf(off, "section type", "unknown savevm section type %d (%s)", t, t)
}

// readSectionHeader reads START or FULL: type, be32 id, cstr idstr, be32 instance, be32 version.
func (r *Reader) readSectionHeader(t SectionType, off int64) (*Record, error) {
	in := r.in
	what := t.String() + " section header"
	if !in.ensure(6) {
		return nil, r.short(off, what)
	}
	id := be32(in.buf[in.r+1:])
	l := int(in.buf[in.r+5])
	if l == 0 {
		return nil, r.failf(off+5, what, "empty idstr for section id %d", id)
	}
	hl := 6 + l + 8
	if !in.ensure(hl) {
		return nil, r.short(off, what)
	}
	b := in.buf[in.r:]
	name := b[6 : 6+l]
	si := r.sections[id]
	if si == nil {
		if len(r.sections) >= r.lim.Sections {
			return nil, r.tooLarge(off, what, uint64(len(r.sections)+1), r.lim.Sections)
		}
		si = &sectionInfo{}
		r.sections[id] = si
	}
	if si.hdr.Idstr != string(name) {
		si.hdr.Idstr = string(name)
	}
	si.hdr.Type, si.hdr.ID = t, id
	si.hdr.Instance, si.hdr.Version = be32(b[6+l:]), be32(b[10+l:])
	si.ram = false
	r.cur, r.inSection = si, true
	rec := r.newRecord(sectionKind(t), off)
	rec.Section = si.hdr
	if t == SectionStart {
		if si.hdr.Idstr != "ram" {
			return nil, r.failf(off, what, "unsupported iterative section %q", si.hdr.Idstr)
		}
		if id == 0 {
			r.warnf(off, "iterative section %q uses section id 0; QEMU would route its PART/END sections elsewhere", si.hdr.Idstr)
		}
		si.ram = true
		in.skip(hl)
		r.state = stRAM
		return rec, nil
	}
	// FULL: the body is delimited within the current slice input.
	if in.rd != nil {
		return nil, r.failf(off, what, "internal error: FULL section outside a delimited input")
	}
	ref := DeviceRef{SectionID: id, Idstr: si.hdr.Idstr, InstanceID: si.hdr.Instance,
		VersionID: si.hdr.Version, Nested: in.pkg, Offset: off + int64(hl), VMDesc: in.vmdesc}
	if in.pkg {
		ref.Index = r.fullPkg
		r.fullPkg++
	} else {
		ref.Index = r.fullTop
		r.fullTop++
	}
	n, heur, err := r.delimit(in, hl, ref)
	if err != nil {
		return nil, err
	}
	rec.Body = in.buf[in.r+hl : in.r+hl+n]
	rec.Heuristic = heur
	in.skip(hl + n)
	r.state = stFooter
	return rec, nil
}

func (r *Reader) readFooter() (*Record, error) {
	in := r.in
	off := in.off()
	what := "section footer"
	if in.ensure(1) && SectionType(in.buf[in.r]) != SectionFooter {
		return nil, r.failf(off, what, "missing section footer for %s (got byte 0x%02x)", r.cur.hdr.Idstr, in.buf[in.r])
	}
	if !in.ensure(5) {
		return nil, r.short(off, what)
	}
	if id := be32(in.buf[in.r+1:]); id != r.cur.hdr.ID {
		return nil, r.failf(off, what, "mismatched section id in footer for %s - read 0x%x expected 0x%x", r.cur.hdr.Idstr, id, r.cur.hdr.ID)
	}
	in.skip(5)
	rec := r.newRecord(KindFooter, off)
	rec.Section = r.cur.hdr
	r.inSection = false
	r.state = stTop
	return rec, nil
}

func (r *Reader) readCommand(off int64) (*Record, error) {
	in := r.in
	const what = "command"
	if !in.ensure(5) {
		return nil, r.short(off, what)
	}
	cmd := Command(be16(in.buf[in.r+1:]))
	l := int(be16(in.buf[in.r+3:]))
	if !cmd.Known() {
		return nil, r.failf(off, what, "MIG_CMD 0x%x unknown (len 0x%x)", uint16(cmd), l)
	}
	if fl := cmd.fixedLen(); fl >= 0 && l != fl {
		return nil, r.failf(off, what, "%s received with bad length - expecting %d, got %d", cmd, fl, l)
	}
	if cmd == CmdPostcopyAdvise && l != 0 && l != 16 {
		return nil, r.failf(off, what, "%s received with bad length %d", cmd, l)
	}
	if l > r.lim.Command {
		return nil, r.tooLarge(off+3, what+" length", uint64(l), r.lim.Command)
	}
	if !in.ensure(5 + l) {
		return nil, r.short(off, what+" payload")
	}
	p := in.buf[in.r+5 : in.r+5+l]
	rec := r.newRecord(KindCommand, off)
	rec.Cmd = cmd
	switch cmd {
	case CmdPostcopyAdvise:
		r.postcopyRAM = l == 16
		r.advised = true
		if l == 16 {
			r.adviseSummary = be64(p)
		}
	case CmdPackaged:
		n := be32(p)
		if n > uint32(r.lim.Packaged) {
			return nil, r.tooLarge(off+5, "PACKAGED length", uint64(n), r.lim.Packaged)
		}
		if len(r.pkgs) >= r.lim.PackageDepth {
			return nil, r.failf(off, what, "%w: PACKAGED nested deeper than %d", ErrTooLarge, r.lim.PackageDepth)
		}
		var pb []byte
		if in.rd == nil {
			if !in.ensure(9 + int(n)) {
				return nil, r.short(off+9, "PACKAGED data")
			}
			pb = in.buf[in.r+9 : in.r+9+int(n)]
			in.skip(9 + int(n))
		} else {
			in.skip(9)
			var ok bool
			pb, ok = in.readGrow(int(n), nil)
			if !ok {
				return nil, r.short(off+9, "PACKAGED data")
			}
		}
		r.dataBuf = append(r.dataBuf[:0], byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
		rec.Payload = r.dataBuf
		pin := &input{buf: pb, w: len(pb), base: off + 9, end: len(pb), pkg: true}
		r.pkgs = append(r.pkgs, pin)
		r.in = pin
		return rec, nil
	}
	rec.Payload = r.payload(p)
	in.skip(5 + l)
	return rec, nil
}

func (r *Reader) popPackage(off int64) *Record {
	r.pkgs = r.pkgs[:len(r.pkgs)-1]
	if len(r.pkgs) > 0 {
		r.in = r.pkgs[len(r.pkgs)-1]
	} else {
		r.in = &r.top
	}
	r.state = stTop
	return r.newRecord(KindPackageEnd, off)
}

// afterEOF handles what follows an EOF record: the vmdesc (top level) or the package end.
func (r *Reader) afterEOF() (*Record, error) {
	in := r.in
	off := in.off()
	if in.pkg {
		if in.avail() > 0 {
			return nil, r.failf(off, "end of PACKAGED data", "%d bytes after EOF inside a package", in.avail())
		}
		return r.popPackage(off), nil
	}
	if !in.ensure(1) {
		if in.err != nil && in.err != io.EOF {
			return nil, r.fail(off, "vmdesc", in.err)
		}
		r.state = stDone
		return nil, io.EOF
	}
	if t := SectionType(in.buf[in.r]); t != SectionVMDescription {
		return nil, r.failf(off, "vmdesc", "expected vmdescription section, but got %d", t)
	}
	if !in.ensure(5) {
		return nil, r.short(off, "vmdesc length")
	}
	n := be32(in.buf[in.r+1:])
	if n > uint32(r.lim.VMDesc) {
		return nil, r.tooLarge(off+1, "vmdesc length", uint64(n), r.lim.VMDesc)
	}
	rec := r.newRecord(KindVMDesc, off)
	if in.rd == nil || 5+int(n) <= len(in.buf) {
		if !in.ensure(5 + int(n)) {
			return nil, r.short(off+5, "vmdesc JSON")
		}
		rec.JSON = r.payload(in.buf[in.r+5 : in.r+5+int(n)])
		in.skip(5 + int(n))
	} else {
		in.skip(5)
		var ok bool
		r.big, ok = in.readGrow(int(n), r.big)
		if !ok {
			return nil, r.short(off+5, "vmdesc JSON")
		}
		rec.JSON = r.big
	}
	r.state = stDone
	return rec, nil
}

// enterTail reads the rest of the top-level input into memory (bounded by Limits.Tail),
// switches the top input to slice mode over it, and locates the vmdesc at its end.
func (r *Reader) enterTail() error {
	in := &r.top
	off := in.off()
	tail := make([]byte, 0, max(min(r.lim.Tail, 4*in.avail()), min(r.lim.Tail, 1<<20)))
	tail = append(tail, in.win()...)
	if in.before != nil {
		in.before()
	}
	if r.tailData != nil {
		r.tailData(tail)
	}
	for in.err == nil {
		if vmdescComplete(tail) {
			// The source has sent everything; do not wait for it to close the connection
			// (it may be waiting for the destination's SHUT on a return path).
			r.rest = in.rd
			break
		}
		if len(tail) == cap(tail) {
			if len(tail) >= r.lim.Tail {
				// One more byte decides whether the limit is exceeded.
				var one [1]byte
				n, err := io.ReadFull(in.rd, one[:])
				if n > 0 {
					return r.tooLarge(off, "device tail (first FULL section to end of input)", uint64(len(tail)+1), r.lim.Tail)
				}
				in.err = err
				break
			}
			nt := make([]byte, len(tail), min(2*cap(tail), r.lim.Tail))
			copy(nt, tail)
			tail = nt
		}
		n, err := in.rd.Read(tail[len(tail):cap(tail)])
		tail = tail[:len(tail)+n]
		if n > 0 && r.tailData != nil {
			r.tailData(tail)
		}
		if err != nil {
			in.err = err
		}
	}
	if in.err != nil && in.err != io.EOF && in.err != io.ErrUnexpectedEOF {
		return r.fail(off+int64(len(tail)), "device tail", in.err)
	}
	*in = input{buf: tail, w: len(tail), base: off, end: len(tail)}
	// Locate "EOF, 0x06, be32 len, JSON" ending exactly at the end of input; the JSON has no
	// NUL bytes, so the last candidate is the real one.
	for p := len(tail) - 6; p >= 0; p-- {
		if tail[p] == byte(SectionEOF) && tail[p+1] == byte(SectionVMDescription) &&
			uint64(be32(tail[p+2:])) == uint64(len(tail)-p-6) {
			in.end = p
			in.vmdesc = tail[p+6:]
			break
		}
	}
	r.tail = tail
	if r.rawTail != nil {
		r.rawTail(tail)
	}
	return nil
}

// vmdescComplete reports whether tail ends with a complete "EOF, 0x06, be32 len, JSON" where
// the JSON is an object. JSON text holds no NUL byte, so the last NUL of the tail is the EOF
// byte or one of the length bytes after it.
func vmdescComplete(tail []byte) bool {
	if len(tail) < 8 || tail[len(tail)-1] != '}' {
		return false
	}
	q := bytes.LastIndexByte(tail, byte(SectionEOF))
	for p := q; p >= 0 && p >= q-5; p-- {
		if tail[p] == byte(SectionEOF) && p+8 <= len(tail) && tail[p+1] == byte(SectionVMDescription) &&
			uint64(be32(tail[p+2:])) == uint64(len(tail)-p-6) && tail[p+6] == '{' {
			return true
		}
	}
	return false
}

// delimit finds the length of the FULL body starting at in.r+hl.
func (r *Reader) delimit(in *input, hl int, ref DeviceRef) (int, bool, error) {
	start := in.r + hl
	end := max(in.end, start)
	body := in.buf[start:end]
	id := ref.SectionID
	isFooter := func(n int) bool {
		return n >= 0 && n+5 <= in.w-start && in.buf[start+n] == byte(SectionFooter) && be32(in.buf[start+n+1:]) == id
	}
	quiet := false
	if in.pkg && len(ref.VMDesc) == 0 {
		// A PACKAGED stream (postcopy) carries no vmdesc by design: footer scanning, bounded
		// by the package's length, is how its sections are delimited. Say so once.
		quiet = true
		if !in.scanNoted {
			in.scanNoted = true
			r.warnf(ref.Offset, "the PACKAGED data has no vmdesc (postcopy sends none): its device sections are delimited by footer scan")
		}
	}
	if r.sizer != nil && !quiet {
		n, err := r.sizer(ref, body)
		if err == nil && n <= len(body) && isFooter(n) {
			return n, false, nil
		}
		if err == nil {
			err = fmt.Errorf("no footer after %d body bytes", n)
		}
		r.warnf(ref.Offset, "device sizer failed for section %q id %d: %v; falling back to footer scan", ref.Idstr, id, err)
	}
	pat := [5]byte{byte(SectionFooter), byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id)}
	for i := 0; ; {
		j := bytes.Index(body[i:], pat[:])
		if j < 0 {
			break
		}
		n := i + j
		if r.wellFormedNext(in, start+n+5) {
			if quiet {
				return n, true, nil
			}
			r.warnf(ref.Offset, "end of device section %q id %d found heuristically by footer scan (body %d bytes)", ref.Idstr, id, n)
			return n, true, nil
		}
		i = n + 1
	}
	err := fmt.Errorf("cannot find the end of device section %q id %d (no footer followed by a well-formed record)", ref.Idstr, id)
	if in.vmdesc == nil && !in.pkg {
		// No vmdesc at the end of the input: most likely the stream is truncated.
		err = fmt.Errorf("%w; no vmdesc at the end of the input: %w", err, ErrUnexpectedEOF)
	}
	return 0, false, r.fail(ref.Offset, "FULL section body", err)
}

// wellFormedNext reports whether a plausible record (or the end of the input) starts at in.buf[p].
func (r *Reader) wellFormedNext(in *input, p int) bool {
	rest := in.buf[p:in.w]
	if len(rest) == 0 {
		return true
	}
	switch t := SectionType(rest[0]); t {
	case SectionEOF:
		// EOF ends the input, or is followed by the located vmdesc, or — at top level, in an
		// input without a complete vmdesc (truncated or damaged, which a destination ignores:
		// stream-format.md §5.1) — by anything.
		return len(rest) == 1 || p == in.end || (in.vmdesc == nil && !in.pkg)
	case SectionStart, SectionFull:
		if len(rest) < 6 {
			return false
		}
		l := int(rest[5])
		if l == 0 || len(rest) < 6+l+8 {
			return false
		}
		for _, c := range rest[6 : 6+l] {
			if c < 0x20 || c > 0x7e {
				return false
			}
		}
		return true
	case SectionPart, SectionEnd:
		if len(rest) < 5 {
			return false
		}
		si := r.sections[be32(rest[1:])]
		return si != nil && si.ram
	case SectionCommand:
		if len(rest) < 5 {
			return false
		}
		cmd, l := Command(be16(rest[1:])), int(be16(rest[3:]))
		if !cmd.Known() || len(rest) < 5+l {
			return false
		}
		fl := cmd.fixedLen()
		return fl < 0 || fl == l
	}
	return false
}

// lookupBlock resolves a block name to its index in r.blocks, without allocating for known
// names. Named page records must name a block of the MEM_SIZE list once one was seen.
func (r *Reader) lookupBlock(name []byte, fromList bool) (int, bool) {
	if r.last >= 0 && r.blocks[r.last].name == string(name) {
		return r.last, true
	}
	for i := range r.blocks {
		if r.blocks[i].name == string(name) {
			return i, true
		}
	}
	if (r.memSizeSeen && !fromList) || len(r.blocks) >= r.lim.RAMBlocks {
		return -1, false
	}
	r.blocks = append(r.blocks, blockInfo{name: string(name)})
	return len(r.blocks) - 1, true
}

// readRAM reads one record of a ram section body (stream-format.md §4). The whole record is
// parsed from one window of the buffer, so Data can alias it.
func (r *Reader) readRAM() (*Record, error) {
	in := r.in
	off := in.off()
	if !in.ensure(8) {
		return nil, r.short(off, "ram record flags")
	}
	v := be64(in.buf[in.r:])
	flags := RAMFlag(v & r.pageMask)
	addr := v &^ r.pageMask
	rec := r.newRecord(KindRAM, off)
	rec.Section = r.cur.hdr
	rec.RAM.Flags = flags
	rec.RAM.Offset = addr
	n := 8
	switch flags &^ RAMContinue {
	case RAMPage, RAMZero, RAMXBZRLE, RAMCompressPage:
		bi := r.last
		if flags&RAMContinue == 0 {
			if !in.ensure(9) {
				return nil, r.short(off+8, "ram block name")
			}
			l := int(in.buf[in.r+8])
			if l == 0 {
				return nil, r.failf(off+8, "ram block name", "empty block name")
			}
			if !in.ensure(9 + l) {
				return nil, r.short(off+8, "ram block name")
			}
			var ok bool
			bi, ok = r.lookupBlock(in.buf[in.r+9:in.r+9+l], false)
			if !ok {
				if len(r.blocks) >= r.lim.RAMBlocks {
					return nil, r.tooLarge(off+8, "ram block name", uint64(len(r.blocks)+1), r.lim.RAMBlocks)
				}
				return nil, r.failf(off+8, "ram block name", "can't find block %q", in.buf[in.r+9:in.r+9+l])
			}
			r.last = bi
			n = 9 + l
		} else if bi < 0 {
			return nil, r.failf(off, "ram record", "CONTINUE flag without a previous block (flags %s)", flags)
		}
		b := &r.blocks[bi]
		rec.RAM.Block = b.name
		if b.length != 0 && addr >= b.length {
			return nil, r.failf(off, "ram record", "illegal RAM offset 0x%x for block %q of length 0x%x", addr, b.name, b.length)
		}
		switch flags &^ RAMContinue {
		case RAMPage:
			if !in.ensure(n + r.pageSize) {
				return nil, r.short(off+int64(n), "ram page data")
			}
			rec.RAM.Data = r.payload(in.buf[in.r+n : in.r+n+r.pageSize])
			n += r.pageSize
		case RAMZero:
			if !in.ensure(n + 1) {
				return nil, r.short(off+int64(n), "zero page fill byte")
			}
			rec.RAM.Fill = in.buf[in.r+n]
			n++
		case RAMXBZRLE:
			if !in.ensure(n + 3) {
				return nil, r.short(off+int64(n), "XBZRLE header")
			}
			if enc := in.buf[in.r+n]; enc != 1 {
				return nil, r.failf(off+int64(n), "XBZRLE header", "wrong XBZRLE encoding flag 0x%02x", enc)
			}
			l := int(be16(in.buf[in.r+n+1:]))
			if l > r.lim.XBZRLE {
				return nil, r.tooLarge(off+int64(n+1), "XBZRLE length", uint64(l), r.lim.XBZRLE)
			}
			n += 3
			if !in.ensure(n + l) {
				return nil, r.short(off+int64(n), "XBZRLE data")
			}
			rec.RAM.Data = r.payload(in.buf[in.r+n : in.r+n+l])
			n += l
		case RAMCompressPage:
			if !in.ensure(n + 4) {
				return nil, r.short(off+int64(n), "compressed page length")
			}
			l := be32(in.buf[in.r+n:])
			if l > uint32(r.lim.CompressedPage) {
				return nil, r.tooLarge(off+int64(n), "compressed page length", uint64(l), r.lim.CompressedPage)
			}
			n += 4
			if !in.ensure(n + int(l)) {
				return nil, r.short(off+int64(n), "compressed page data")
			}
			rec.RAM.Data = r.payload(in.buf[in.r+n : in.r+n+int(l)])
			n += int(l)
		}
	case RAMEOS:
		r.state = stFooter
	case RAMMultifdFlush:
	case RAMMemSize:
		if err := r.readMemSize(rec, off); err != nil {
			return nil, err
		}
		return rec, nil
	case RAMHook:
		return nil, r.failf(off, "ram record", "RAM_SAVE_FLAG_HOOK (RDMA) is not supported in a plain stream (flags %s)", flags)
	case RAMFull:
		return nil, r.failf(off, "ram record", "obsolete RAM_SAVE_FLAG_FULL (flags %s)", flags)
	default:
		return nil, r.failf(off, "ram record", "unknown combination of migration flags: 0x%x (%s)", uint32(flags), flags)
	}
	in.skip(n)
	return rec, nil
}

// readMemSize reads the MEM_SIZE block list (stream-format.md §4, §4.3) and consumes it.
func (r *Reader) readMemSize(rec *Record, off int64) error {
	in := r.in
	total := rec.RAM.Offset
	remaining := total
	p := 8
	r.blockList = r.blockList[:0]
	gpa := r.capOn(CapXIgnoreShared, r.xIgnoreShared)
	mapped := r.capOn(CapMappedRAM, r.mappedRAM)
	for remaining > 0 {
		eoff := in.off() + int64(p)
		if len(r.blockList) >= r.lim.RAMBlocks {
			return r.tooLarge(eoff, "MEM_SIZE block list", uint64(len(r.blockList)+1), r.lim.RAMBlocks)
		}
		if !in.ensure(p + 1) {
			return r.short(eoff, "MEM_SIZE block name")
		}
		l := int(in.buf[in.r+p])
		if l == 0 {
			return r.failf(eoff, "MEM_SIZE block name", "empty block name")
		}
		if !in.ensure(p + 1 + l + 8) {
			return r.short(eoff, "MEM_SIZE block entry")
		}
		bi, ok := r.lookupBlock(in.buf[in.r+p+1:in.r+p+1+l], true)
		if !ok {
			return r.tooLarge(eoff, "MEM_SIZE block list", uint64(len(r.blocks)+1), r.lim.RAMBlocks)
		}
		b := RAMBlock{Name: r.blocks[bi].name, UsedLength: be64(in.buf[in.r+p+1+l:])}
		p += 1 + l + 8
		if b.UsedLength > remaining {
			return r.failf(eoff, "MEM_SIZE block entry", "block %q length 0x%x exceeds the remaining MEM_SIZE total 0x%x", b.Name, b.UsedLength, remaining)
		}
		if b.UsedLength == 0 {
			return r.failf(eoff, "MEM_SIZE block entry", "block %q has length 0", b.Name)
		}
		r.blocks[bi].length = b.UsedLength
		remaining -= b.UsedLength
		if r.pageSizeField(b.Name, p) {
			if !in.ensure(p + 8) {
				return r.short(in.off()+int64(p), "MEM_SIZE block page size")
			}
			b.HasPageSize, b.PageSize = true, be64(in.buf[in.r+p:])
			p += 8
		}
		if gpa {
			if !in.ensure(p + 8) {
				return r.short(in.off()+int64(p), "MEM_SIZE block GPA")
			}
			b.HasGPA, b.GPA = true, be64(in.buf[in.r+p:])
			p += 8
		}
		if mapped {
			hoff := in.off() + int64(p)
			if in.pkg {
				return r.failf(hoff, "mapped-ram header", "mapped-ram block list inside a PACKAGED command")
			}
			if !in.ensure(p + mappedRAMHeaderLen) {
				return r.short(hoff, "mapped-ram header")
			}
			h := in.buf[in.r+p:]
			b.HasMappedRAM = true
			b.MappedRAM = MappedRAMHeader{Version: be32(h), PageSize: be64(h[4:]), BitmapOffset: be64(h[12:]), PagesOffset: be64(h[20:])}
			p += mappedRAMHeaderLen
			in.skip(p)
			p = 0
			target := b.MappedRAM.PagesOffset + b.UsedLength
			cur := uint64(in.off())
			if target < cur || target > 1<<62 {
				return r.failf(hoff, "mapped-ram header", "block %q continues at 0x%x, before the current offset 0x%x", b.Name, target, cur)
			}
			if !in.discard(int64(target-cur), r.region) {
				return r.short(in.off(), "mapped-ram file region")
			}
		}
		r.blockList = append(r.blockList, b)
	}
	in.skip(p)
	rec.RAM.Blocks = r.blockList
	r.memSizeSeen = true
	return nil
}

// pageSizeField decides whether the MEM_SIZE entry being read carries a page size; p is the
// window position where it would be.
func (r *Reader) pageSizeField(name string, p int) bool {
	if r.psField != nil {
		return r.psField(name)
	}
	if !r.capOn(CapPostcopyRAM, r.postcopyRAM) {
		return false
	}
	summary := r.adviseSummary
	if r.advised && summary == r.targetPageSize {
		return false
	}
	if !r.in.ensure(p + 8) {
		return false
	}
	v := be64(r.in.buf[r.in.r+p:])
	if v <= r.targetPageSize || v&(v-1) != 0 || v > 1<<40 || (r.advised && v&summary == 0) {
		return false
	}
	r.warnf(r.in.off()+int64(p), "block %q: page size field 0x%x detected heuristically", name, v)
	return true
}
