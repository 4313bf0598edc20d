package stream

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Writer encodes a migration stream. It batches output in a large buffer (written out in
// batches of at least 256 KiB unless flushed), copies each page once and allocates nothing per
// page. WriteRecord is the exact inverse of Reader.Next: writing every record Next returns
// reproduces the input byte for byte. Errors are sticky; values that cannot be encoded are
// refused with an error before anything is written.
//
// The caller decides CONTINUE by setting the flag (Continue and WritePage decide it
// automatically); the Writer refuses a CONTINUE that would resolve to another block.
type Writer struct {
	w        io.Writer
	buf      []byte   // batch buffer for the top level
	pkgs     [][]byte // open PACKAGED commands, innermost last
	flushed  int64    // bytes already handed to w
	err      error
	pageSize int
	last     string // block the destination resolves CONTINUE to; "" = none
	fill     func(off int64, dst []byte)
}

// WriterOption configures a Writer.
type WriterOption func(*Writer)

// WithBatchSize sets the size of the write batch buffer (default and minimum 256 KiB).
func WithBatchSize(n int) WriterOption {
	return func(w *Writer) { w.buf = make([]byte, 0, max(n, minBatch)) }
}

// WithMappedRAMFill sets a function that provides the file bytes between a mapped-ram block
// header and the next block entry (stream-format.md §4.3), given their absolute offset; it is
// the counterpart of Reader's WithMappedRAMData. Without it those bytes are written as zeros.
func WithMappedRAMFill(fn func(off int64, dst []byte)) WriterOption {
	return func(w *Writer) { w.fill = fn }
}

// WithPageSize sets the target page size used to validate RAM records (default 4096; also set
// by a configuration with target-page-bits).
func WithPageSize(n int) WriterOption { return func(w *Writer) { w.pageSize = n } }

const (
	minBatch     = 256 << 10
	defaultBatch = 1 << 20
)

// NewWriter returns a Writer writing to w.
func NewWriter(w io.Writer, opts ...WriterOption) *Writer {
	wr := &Writer{w: w, pageSize: 4096}
	for _, o := range opts {
		o(wr)
	}
	if wr.buf == nil {
		wr.buf = make([]byte, 0, defaultBatch)
	}
	return wr
}

// ErrEncode is wrapped by the errors Writer returns for values that cannot be encoded.
var ErrEncode = errors.New("value cannot be encoded")

func encErr(format string, args ...any) error {
	return fmt.Errorf("stream: %w: %s", ErrEncode, fmt.Sprintf(format, args...))
}

// Offset returns the number of bytes written so far at the top level (buffered included).
func (w *Writer) Offset() int64 { return w.flushed + int64(len(w.buf)) }

// Err returns the sticky error, if any.
func (w *Writer) Err() error { return w.err }

// space returns the buffer to append n more bytes to, flushing the batch if needed.
func (w *Writer) space(n int) *[]byte {
	if len(w.pkgs) > 0 {
		return &w.pkgs[len(w.pkgs)-1]
	}
	if len(w.buf)+n > cap(w.buf) && len(w.buf) > 0 {
		w.flushBuf()
	}
	return &w.buf
}

// BatchSink is a destination that takes whole batches: WriteBatch takes ownership of b and
// returns an empty buffer of at least the same capacity to fill next, so that a batch can be
// written out while the next one is encoded, without copying it again. Sync waits until every
// batch taken so far has been written and reports the first error. Writer uses these methods
// when its io.Writer implements them; Write must itself keep the order (sync, then write).
type BatchSink interface {
	io.Writer
	WriteBatch(b []byte) (next []byte, err error)
	Sync() error
}

func (w *Writer) flushBuf() {
	if w.err != nil || len(w.buf) == 0 {
		return
	}
	if sink, ok := w.w.(BatchSink); ok {
		n := len(w.buf)
		next, err := sink.WriteBatch(w.buf)
		if err != nil {
			w.err = err
			return
		}
		w.flushed += int64(n)
		w.buf = next[:0]
		return
	}
	n, err := w.w.Write(w.buf)
	w.flushed += int64(n)
	if err == nil && n < len(w.buf) {
		err = io.ErrShortWrite
	}
	if err != nil {
		w.err = err
	}
	w.buf = w.buf[:0]
}

// Flush writes the buffered bytes to the underlying writer. It fails while a package is open.
func (w *Writer) Flush() error {
	if err := w.Push(); err != nil {
		return err
	}
	if sink, ok := w.w.(BatchSink); ok {
		w.err = sink.Sync()
	}
	return w.err
}

// Push hands the buffered bytes to the underlying writer like Flush, but does not wait for a
// BatchSink to have written them: the next record is encoded while they go out (a receiver in
// postcopy, where nothing may stay buffered, but the writes should still overlap). It fails
// while a package is open.
func (w *Writer) Push() error {
	if w.err != nil {
		return w.err
	}
	if len(w.pkgs) > 0 {
		return encErr("flushing with %d PACKAGED command(s) open", len(w.pkgs))
	}
	w.flushBuf()
	return w.err
}

// WriteRaw writes b verbatim (for example the exact device tail a relay forwards). Large
// slices go straight to the underlying writer when nothing is buffered.
func (w *Writer) WriteRaw(b []byte) error {
	if w.err != nil {
		return w.err
	}
	if len(w.pkgs) == 0 && len(b) >= cap(w.buf)/2 {
		w.flushBuf()
		if w.err != nil {
			return w.err
		}
		n, err := w.w.Write(b)
		w.flushed += int64(n)
		if err == nil && n < len(b) {
			err = io.ErrShortWrite
		}
		w.err = err
		return err
	}
	p := w.space(len(b))
	*p = append(*p, b...)
	return nil
}

func (w *Writer) fail(err error) error {
	if w.err == nil {
		w.err = err
	}
	return err
}

// WriteHeader writes the file header: magic "QEVM" and version 3.
func (w *Writer) WriteHeader() error { return w.writeHeader(Magic, Version) }

func (w *Writer) writeHeader(magic, version uint32) error {
	if w.err != nil {
		return w.err
	}
	p := w.space(8)
	*p = binary.BigEndian.AppendUint32(*p, magic)
	*p = binary.BigEndian.AppendUint32(*p, version)
	return nil
}

// WriteConfiguration writes the CONFIGURATION section: c.Raw verbatim when non-nil, else the
// encoding of the fields (subsections in QEMU's order, each with version 1).
func (w *Writer) WriteConfiguration(c *Configuration) error {
	if w.err != nil {
		return w.err
	}
	if c.HasTargetPageBits {
		if c.TargetPageBits < 10 || c.TargetPageBits > maxPageBits {
			return encErr("target page bits %d", c.TargetPageBits)
		}
		w.pageSize = 1 << c.TargetPageBits
	}
	if c.Raw != nil {
		p := w.space(1 + len(c.Raw))
		*p = append(append(*p, byte(SectionConfiguration)), c.Raw...)
		return nil
	}
	if len(c.Machine) > 1<<20 {
		return encErr("machine name of %d bytes", len(c.Machine))
	}
	for _, n := range c.Capabilities {
		if len(n) > 255 {
			return encErr("capability name of %d bytes", len(n))
		}
	}
	if !c.HasCapabilities && len(c.Capabilities) > 0 {
		return encErr("capabilities listed but HasCapabilities is false")
	}
	p := w.space(1 + 4 + len(c.Machine) + 64)
	b := append(*p, byte(SectionConfiguration))
	b = binary.BigEndian.AppendUint32(b, uint32(len(c.Machine)))
	b = append(b, c.Machine...)
	sub := func(name string) {
		b = append(b, byte(SectionSubsection), byte(len(name)))
		b = append(b, name...)
		b = binary.BigEndian.AppendUint32(b, 1)
	}
	if c.HasTargetPageBits {
		sub(subTargetPageBits)
		b = binary.BigEndian.AppendUint32(b, c.TargetPageBits)
	}
	if c.HasCapabilities {
		sub(subCapabilities)
		b = binary.BigEndian.AppendUint32(b, uint32(len(c.Capabilities)))
		for _, n := range c.Capabilities {
			b = append(append(b, byte(len(n))), n...)
		}
	}
	if c.HasUUID {
		sub(subUUID)
		b = append(b, c.UUID[:]...)
	}
	*p = b
	return nil
}

// WriteSectionHeader writes a section header. For START and FULL all fields are written; for
// PART and END only the id. The body and WriteFooter(id) must follow.
func (w *Writer) WriteSectionHeader(t SectionType, id uint32, idstr string, instance, version uint32) error {
	if w.err != nil {
		return w.err
	}
	switch t {
	case SectionStart, SectionFull:
		if len(idstr) == 0 || len(idstr) > 255 {
			return encErr("section idstr %q must be 1..255 bytes", idstr)
		}
		p := w.space(14 + len(idstr))
		b := append(*p, byte(t))
		b = binary.BigEndian.AppendUint32(b, id)
		b = append(append(b, byte(len(idstr))), idstr...)
		b = binary.BigEndian.AppendUint32(b, instance)
		*p = binary.BigEndian.AppendUint32(b, version)
	case SectionPart, SectionEnd:
		p := w.space(5)
		*p = binary.BigEndian.AppendUint32(append(*p, byte(t)), id)
	default:
		return encErr("section type %s has no section header", t)
	}
	return nil
}

// WriteFullSection writes a whole FULL section: header, the vmstate body, footer.
func (w *Writer) WriteFullSection(id uint32, idstr string, instance, version uint32, body []byte) error {
	if err := w.WriteSectionHeader(SectionFull, id, idstr, instance, version); err != nil {
		return err
	}
	if err := w.WriteRaw(body); err != nil {
		return err
	}
	return w.WriteFooter(id)
}

// WriteFooter writes a section footer for section id.
func (w *Writer) WriteFooter(id uint32) error {
	if w.err != nil {
		return w.err
	}
	p := w.space(5)
	*p = binary.BigEndian.AppendUint32(append(*p, byte(SectionFooter)), id)
	return nil
}

// Continue returns RAMContinue when block is the block a CONTINUE record would refer to, else
// 0, so that WriteRAMPage(RAMPage|w.Continue(b), …) names each block only when it changes.
func (w *Writer) Continue(block string) RAMFlag {
	if w.last != "" && w.last == block {
		return RAMContinue
	}
	return 0
}

// ResetContinue forgets the CONTINUE block, as QEMU's sender does at migration start and at
// postcopy start; the next record names its block.
func (w *Writer) ResetContinue() { w.last = "" }

// ramHeader validates and appends be64(offset|flags) and the block name (unless CONTINUE).
func (w *Writer) ramHeader(flags RAMFlag, offset uint64, block string, extra int) (*[]byte, error) {
	mask := uint64(w.pageSize - 1)
	if offset&mask != 0 {
		return nil, encErr("RAM offset 0x%x is not page aligned", offset)
	}
	if uint64(flags)&^mask != 0 {
		return nil, encErr("RAM flags %s do not fit below the page size", flags)
	}
	cont := flags&RAMContinue != 0
	if cont {
		if w.last == "" || w.last != block {
			return nil, encErr("CONTINUE for block %q but the destination's last block is %q", block, w.last)
		}
	} else if len(block) == 0 || len(block) > 255 {
		return nil, encErr("RAM block name %q must be 1..255 bytes", block)
	}
	p := w.space(9 + len(block) + extra)
	b := binary.BigEndian.AppendUint64(*p, offset|uint64(flags))
	if !cont {
		b = append(append(b, byte(len(block))), block...)
		w.last = block
	}
	*p = b
	return p, nil
}

// WriteRAMPage writes a PAGE record (flags = RAMPage, optionally |RAMContinue) with one page of data.
func (w *Writer) WriteRAMPage(flags RAMFlag, offset uint64, block string, data []byte) error {
	if w.err != nil {
		return w.err
	}
	if flags&^RAMContinue != RAMPage {
		return encErr("WriteRAMPage with flags %s", flags)
	}
	if len(data) != w.pageSize {
		return encErr("page of %d bytes, page size is %d", len(data), w.pageSize)
	}
	p, err := w.ramHeader(flags, offset, block, len(data))
	if err != nil {
		return err
	}
	*p = append(*p, data...)
	return nil
}

// WritePage writes a PAGE record, setting CONTINUE automatically.
func (w *Writer) WritePage(offset uint64, block string, data []byte) error {
	return w.WriteRAMPage(RAMPage|w.Continue(block), offset, block, data)
}

// WriteZero writes a ZERO record (flags = RAMZero, optionally |RAMContinue) with fill byte fill
// (QEMU 10.0 rejects anything but 0).
func (w *Writer) WriteZero(flags RAMFlag, offset uint64, block string, fill byte) error {
	if w.err != nil {
		return w.err
	}
	if flags&^RAMContinue != RAMZero {
		return encErr("WriteZero with flags %s", flags)
	}
	p, err := w.ramHeader(flags, offset, block, 1)
	if err != nil {
		return err
	}
	*p = append(*p, fill)
	return nil
}

// WriteXBZRLE writes an XBZRLE record with the encoded delta (see XBZRLEEncode).
func (w *Writer) WriteXBZRLE(flags RAMFlag, offset uint64, block string, delta []byte) error {
	if w.err != nil {
		return w.err
	}
	if flags&^RAMContinue != RAMXBZRLE {
		return encErr("WriteXBZRLE with flags %s", flags)
	}
	if len(delta) > 0xFFFF {
		return encErr("XBZRLE delta of %d bytes", len(delta))
	}
	p, err := w.ramHeader(flags, offset, block, 3+len(delta))
	if err != nil {
		return err
	}
	*p = append(binary.BigEndian.AppendUint16(append(*p, 1), uint16(len(delta))), delta...)
	return nil
}

// WriteCompressedPage writes a COMPRESS_PAGE record with a zlib stream (QEMU 7.2 only).
func (w *Writer) WriteCompressedPage(flags RAMFlag, offset uint64, block string, zdata []byte) error {
	if w.err != nil {
		return w.err
	}
	if flags&^RAMContinue != RAMCompressPage {
		return encErr("WriteCompressedPage with flags %s", flags)
	}
	if uint64(len(zdata)) > 0xFFFFFFFF {
		return encErr("compressed page of %d bytes", len(zdata))
	}
	p, err := w.ramHeader(flags, offset, block, 4+len(zdata))
	if err != nil {
		return err
	}
	*p = append(binary.BigEndian.AppendUint32(*p, uint32(len(zdata))), zdata...)
	return nil
}

// writeRAMFlagsOnly writes a record that is just be64(offset|flags).
func (w *Writer) writeRAMFlagsOnly(flags RAMFlag, offset uint64) error {
	if w.err != nil {
		return w.err
	}
	mask := uint64(w.pageSize - 1)
	if offset&mask != 0 || uint64(flags)&^mask != 0 {
		return encErr("RAM record 0x%x|%s cannot be encoded", offset, flags)
	}
	p := w.space(8)
	*p = binary.BigEndian.AppendUint64(*p, offset|uint64(flags))
	return nil
}

// WriteEOS writes the EOS record that ends a ram section body.
func (w *Writer) WriteEOS() error { return w.writeRAMFlagsOnly(RAMEOS, 0) }

// WriteMultifdFlush writes a MULTIFD_FLUSH record (QEMU 10.0 destinations only).
func (w *Writer) WriteMultifdFlush() error { return w.writeRAMFlagsOnly(RAMMultifdFlush, 0) }

// WriteMemSize writes the MEM_SIZE record with the block list; the total is computed. Optional
// per-block fields are written as flagged in each RAMBlock (they must match the capabilities
// the destination uses). For mapped-ram blocks the file region up to PagesOffset+UsedLength
// is filled (see WithMappedRAMFill).
func (w *Writer) WriteMemSize(blocks []RAMBlock) error {
	var total uint64
	for _, b := range blocks {
		if b.UsedLength == 0 || total+b.UsedLength < total {
			return encErr("block %q length 0x%x", b.Name, b.UsedLength)
		}
		total += b.UsedLength
	}
	return w.writeMemSize(RAMMemSize, total, blocks)
}

func (w *Writer) writeMemSize(flags RAMFlag, total uint64, blocks []RAMBlock) error {
	if w.err != nil {
		return w.err
	}
	var sum uint64
	for _, b := range blocks {
		if len(b.Name) == 0 || len(b.Name) > 255 {
			return encErr("RAM block name %q must be 1..255 bytes", b.Name)
		}
		if b.UsedLength == 0 {
			return encErr("block %q has length 0", b.Name)
		}
		sum += b.UsedLength
		if b.HasMappedRAM && len(w.pkgs) > 0 {
			return encErr("mapped-ram block inside a package")
		}
	}
	if sum != total {
		return encErr("MEM_SIZE total 0x%x differs from the sum of block lengths 0x%x", total, sum)
	}
	if err := w.writeRAMFlagsOnly(flags, total); err != nil {
		return err
	}
	for _, b := range blocks {
		p := w.space(1 + len(b.Name) + 8 + 16 + mappedRAMHeaderLen)
		e := append(append(*p, byte(len(b.Name))), b.Name...)
		e = binary.BigEndian.AppendUint64(e, b.UsedLength)
		if b.HasPageSize {
			e = binary.BigEndian.AppendUint64(e, b.PageSize)
		}
		if b.HasGPA {
			e = binary.BigEndian.AppendUint64(e, b.GPA)
		}
		if b.HasMappedRAM {
			h := b.MappedRAM
			e = binary.BigEndian.AppendUint32(e, h.Version)
			e = binary.BigEndian.AppendUint64(e, h.PageSize)
			e = binary.BigEndian.AppendUint64(e, h.BitmapOffset)
			e = binary.BigEndian.AppendUint64(e, h.PagesOffset)
		}
		*p = e
		if b.HasMappedRAM {
			if err := w.fillTo(b.MappedRAM.PagesOffset + b.UsedLength); err != nil {
				return err
			}
		}
	}
	return nil
}

// fillTo writes file-region bytes up to absolute offset target.
func (w *Writer) fillTo(target uint64) error {
	cur := uint64(w.Offset())
	if target < cur {
		return w.fail(encErr("mapped-ram region ends at 0x%x, before the current offset 0x%x", target, cur))
	}
	for cur < target && w.err == nil {
		if len(w.buf) == cap(w.buf) {
			w.flushBuf()
		}
		n := int(min(uint64(cap(w.buf)-len(w.buf)), target-cur))
		start := len(w.buf)
		w.buf = w.buf[:start+n]
		chunk := w.buf[start:]
		clear(chunk)
		if w.fill != nil {
			w.fill(int64(cur), chunk)
		}
		cur += uint64(n)
	}
	return w.err
}

// WriteCommand writes a COMMAND record. PACKAGED is written with BeginPackage/EndPackage.
func (w *Writer) WriteCommand(cmd Command, payload []byte) error {
	if w.err != nil {
		return w.err
	}
	if !cmd.Known() {
		return encErr("unknown command %d", uint16(cmd))
	}
	if cmd == CmdPackaged {
		return encErr("PACKAGED must be written with BeginPackage/EndPackage")
	}
	if fl := cmd.fixedLen(); fl >= 0 && len(payload) != fl {
		return encErr("%s needs a %d-byte payload, got %d", cmd, fl, len(payload))
	}
	if cmd == CmdPostcopyAdvise && len(payload) != 0 && len(payload) != 16 {
		return encErr("%s needs a 0 or 16-byte payload, got %d", cmd, len(payload))
	}
	if len(payload) > 0xFFFF {
		return encErr("command payload of %d bytes", len(payload))
	}
	p := w.space(5 + len(payload))
	b := binary.BigEndian.AppendUint16(append(*p, byte(SectionCommand)), uint16(cmd))
	*p = append(binary.BigEndian.AppendUint16(b, uint16(len(payload))), payload...)
	return nil
}

// BeginPackage starts a PACKAGED command: everything written until the matching EndPackage is
// collected in memory and then written as the command's nested stream, with its length.
func (w *Writer) BeginPackage() error {
	if w.err != nil {
		return w.err
	}
	w.pkgs = append(w.pkgs, nil)
	return nil
}

// EndPackage ends the innermost PACKAGED command and writes it.
func (w *Writer) EndPackage() error {
	if w.err != nil {
		return w.err
	}
	if len(w.pkgs) == 0 {
		return encErr("EndPackage without BeginPackage")
	}
	pkg := w.pkgs[len(w.pkgs)-1]
	w.pkgs = w.pkgs[:len(w.pkgs)-1]
	if uint64(len(pkg)) > 0xFFFFFFFF {
		return encErr("PACKAGED data of %d bytes", len(pkg))
	}
	p := w.space(9)
	b := binary.BigEndian.AppendUint16(append(*p, byte(SectionCommand)), uint16(CmdPackaged))
	b = binary.BigEndian.AppendUint16(b, 4)
	*p = binary.BigEndian.AppendUint32(b, uint32(len(pkg)))
	return w.WriteRaw(pkg)
}

// WriteEOF writes the EOF record.
func (w *Writer) WriteEOF() error {
	if w.err != nil {
		return w.err
	}
	p := w.space(1)
	*p = append(*p, byte(SectionEOF))
	return nil
}

// WriteVMDesc writes the VMDESCRIPTION record with the JSON text (after WriteEOF).
func (w *Writer) WriteVMDesc(json []byte) error {
	if w.err != nil {
		return w.err
	}
	if uint64(len(json)) > 0xFFFFFFFF {
		return encErr("vmdesc of %d bytes", len(json))
	}
	p := w.space(5)
	*p = binary.BigEndian.AppendUint32(append(*p, byte(SectionVMDescription)), uint32(len(json)))
	return w.WriteRaw(json)
}

// WriteRecord writes rec, the exact inverse of Reader.Next. A KindCommand record for
// CmdPackaged opens a package (its length is recomputed when the matching KindPackageEnd is
// written).
func (w *Writer) WriteRecord(rec *Record) error {
	if w.err != nil {
		return w.err
	}
	switch rec.Kind {
	case KindHeader:
		return w.writeHeader(rec.Magic, rec.Version)
	case KindConfiguration:
		return w.WriteConfiguration(&rec.Config)
	case KindSectionStart, KindSectionPart, KindSectionEnd:
		s := &rec.Section
		return w.WriteSectionHeader(SectionStart+SectionType(rec.Kind-KindSectionStart), s.ID, s.Idstr, s.Instance, s.Version)
	case KindSectionFull:
		s := &rec.Section
		if err := w.WriteSectionHeader(SectionFull, s.ID, s.Idstr, s.Instance, s.Version); err != nil {
			return err
		}
		return w.WriteRaw(rec.Body)
	case KindRAM:
		return w.writeRAM(&rec.RAM)
	case KindFooter:
		return w.WriteFooter(rec.Section.ID)
	case KindCommand:
		if rec.Cmd == CmdPackaged {
			if len(rec.Payload) != 4 {
				return encErr("PACKAGED needs a 4-byte payload, got %d", len(rec.Payload))
			}
			return w.BeginPackage()
		}
		return w.WriteCommand(rec.Cmd, rec.Payload)
	case KindPackageEnd:
		return w.EndPackage()
	case KindEOF:
		return w.WriteEOF()
	case KindVMDesc:
		return w.WriteVMDesc(rec.JSON)
	}
	return encErr("record kind %s", rec.Kind)
}

func (w *Writer) writeRAM(r *RAMRecord) error {
	switch r.Flags &^ RAMContinue {
	case RAMPage:
		return w.WriteRAMPage(r.Flags, r.Offset, r.Block, r.Data)
	case RAMZero:
		return w.WriteZero(r.Flags, r.Offset, r.Block, r.Fill)
	case RAMXBZRLE:
		return w.WriteXBZRLE(r.Flags, r.Offset, r.Block, r.Data)
	case RAMCompressPage:
		return w.WriteCompressedPage(r.Flags, r.Offset, r.Block, r.Data)
	case RAMMemSize:
		return w.writeMemSize(r.Flags, r.Offset, r.Blocks)
	case RAMEOS, RAMMultifdFlush:
		return w.writeRAMFlagsOnly(r.Flags, r.Offset)
	}
	return encErr("RAM record with flags %s", r.Flags)
}
