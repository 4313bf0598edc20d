package stream

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
)

// Postcopy in the main stream (stream-format.md §3, §6): the Reader returns the postcopy
// commands as KindCommand records with their raw Payload; the types below decode and encode
// those payloads with the checks of QEMU's destination (savevm.c loadvm_postcopy_*), and
// PreemptReader / PreemptWriter handle the postcopy-preempt channel. Every Parse function takes
// the absolute offset of the payload's first byte (Record.Offset+5) for its errors.

// PayloadOffset returns the absolute offset of a KindCommand record's payload, the base the
// Parse functions of this file take.
func PayloadOffset(rec *Record) int64 { return rec.Offset + 5 }

// ParsePing decodes the be32 value of a PING command, which the destination echoes in a PONG.
func ParsePing(p []byte, off int64) (uint32, error) {
	if len(p) != 4 {
		return 0, &Error{Offset: off, Expected: "PING payload", Err: fmt.Errorf("PING received with bad length - expecting 4, got %d", len(p))}
	}
	return be32(p), nil
}

// AppendPing appends the payload of PING(v).
func AppendPing(dst []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(dst, v) }

// PostcopyAdvise is the payload of POSTCOPY_ADVISE (stream-format.md §3), sent before the setup
// sections by a source with postcopy-ram (16 bytes) or only dirty-bitmaps postcopy (0 bytes).
type PostcopyAdvise struct {
	RAM bool // the 16-byte form: postcopy-ram is on
	// PageSizeSummary is the OR of the page sizes of all RAM blocks (QEMU's
	// ram_pagesize_summary); 4096 for a guest without huge pages.
	PageSizeSummary uint64
	TargetPageSize  uint64 // 4096 on x86
}

// ParsePostcopyAdvise decodes a POSTCOPY_ADVISE payload.
func ParsePostcopyAdvise(p []byte, off int64) (PostcopyAdvise, error) {
	switch len(p) {
	case 0:
		return PostcopyAdvise{}, nil
	case 16:
		return PostcopyAdvise{RAM: true, PageSizeSummary: be64(p), TargetPageSize: be64(p[8:])}, nil
	}
	return PostcopyAdvise{}, &Error{Offset: off, Expected: "POSTCOPY_ADVISE payload", Err: fmt.Errorf("CMD_POSTCOPY_ADVISE invalid length (%d)", len(p))}
}

// Append appends the payload of a: 16 bytes with RAM, else none.
func (a PostcopyAdvise) Append(dst []byte) []byte {
	if !a.RAM {
		return dst
	}
	dst = binary.BigEndian.AppendUint64(dst, a.PageSizeSummary)
	return binary.BigEndian.AppendUint64(dst, a.TargetPageSize)
}

// Check applies the checks of a destination whose own postcopy-ram capability is postcopyRAM
// and whose page sizes are local (loadvm_postcopy_handle_advise), with QEMU's texts.
func (a PostcopyAdvise) Check(postcopyRAM bool, local PostcopyAdvise) error {
	switch {
	case !a.RAM && postcopyRAM:
		return fmt.Errorf("RAM postcopy is enabled but have 0 byte advise")
	case a.RAM && !postcopyRAM:
		return fmt.Errorf("RAM postcopy is disabled but have 16 byte advise")
	case !a.RAM:
		return nil
	case a.PageSizeSummary != local.PageSizeSummary:
		return fmt.Errorf("Postcopy needs matching RAM page sizes (s=%x d=%x)", a.PageSizeSummary, local.PageSizeSummary)
	case a.TargetPageSize != local.TargetPageSize:
		return fmt.Errorf("Postcopy needs matching target page sizes (s=%d d=%d)", a.TargetPageSize, local.TargetPageSize)
	}
	return nil
}

// DiscardRange is one (start, length) pair of POSTCOPY_RAM_DISCARD, in bytes inside the block.
type DiscardRange struct {
	Start, Length uint64
}

// RAMDiscard is the payload of POSTCOPY_RAM_DISCARD (stream-format.md §3): the pages of one
// block the source re-dirtied after sending them, which the destination drops before it runs.
// QEMU sends at most 12 ranges per command.
type RAMDiscard struct {
	Version uint8 // RAMDiscardVersion
	Block   string
	Ranges  []DiscardRange
}

// RAMDiscardVersion is the only POSTCOPY_RAM_DISCARD version QEMU 7.2 and 10.0 know.
const RAMDiscardVersion = 0

// ramDiscardMinLen is QEMU's lower bound: version, name length, a 1-byte name, NUL, one range.
const ramDiscardMinLen = 1 + 1 + 1 + 1 + 2*8

// ParseRAMDiscard decodes a POSTCOPY_RAM_DISCARD payload into d, reusing d.Ranges (no
// allocation once it has grown, except the block name the first time it is seen by d), with
// the destination's checks (loadvm_postcopy_ram_handle_discard).
func ParseRAMDiscard(p []byte, off int64, d *RAMDiscard) error {
	const what = "POSTCOPY_RAM_DISCARD payload"
	fail := func(at int, format string, args ...any) error {
		return &Error{Offset: off + int64(at), Expected: what, Err: fmt.Errorf(format, args...)}
	}
	if len(p) < ramDiscardMinLen {
		return fail(0, "CMD_POSTCOPY_RAM_DISCARD invalid length (%d)", len(p))
	}
	if p[0] != RAMDiscardVersion {
		return fail(0, "CMD_POSTCOPY_RAM_DISCARD invalid version (%d)", p[0])
	}
	n := int(p[1])
	if n == 0 || 2+n+1 > len(p) {
		return fail(1, "CMD_POSTCOPY_RAM_DISCARD Failed to read RAMBlock ID")
	}
	name := p[2 : 2+n]
	if bytes.IndexByte(name, 0) >= 0 {
		// QEMU measures the name with strlen and would misread the ranges.
		return fail(2, "CMD_POSTCOPY_RAM_DISCARD RAMBlock ID %q contains a NUL byte", name)
	}
	if p[2+n] != 0 {
		return fail(2+n, "CMD_POSTCOPY_RAM_DISCARD missing nil (%d)", p[2+n])
	}
	rest := p[3+n:]
	if len(rest)%16 != 0 {
		return fail(0, "CMD_POSTCOPY_RAM_DISCARD invalid length (%d)", len(rest))
	}
	d.Version = p[0]
	if d.Block != string(name) {
		d.Block = string(name)
	}
	d.Ranges = d.Ranges[:0]
	for i := 0; i < len(rest); i += 16 {
		d.Ranges = append(d.Ranges, DiscardRange{Start: be64(rest[i:]), Length: be64(rest[i+8:])})
	}
	return nil
}

// Append appends the payload of d; it fails if the block name is not 1..255 bytes or the
// payload would not fit a command (65535 bytes).
func (d *RAMDiscard) Append(dst []byte) ([]byte, error) {
	if len(d.Block) == 0 || len(d.Block) > 255 || bytes.IndexByte([]byte(d.Block), 0) >= 0 {
		return dst, encErr("POSTCOPY_RAM_DISCARD block name %q must be 1..255 bytes without NUL", d.Block)
	}
	if n := 3 + len(d.Block) + 16*len(d.Ranges); n > 0xFFFF || n < ramDiscardMinLen {
		return dst, encErr("POSTCOPY_RAM_DISCARD payload of %d bytes", n)
	}
	dst = append(dst, d.Version, byte(len(d.Block)))
	dst = append(append(dst, d.Block...), 0)
	for _, r := range d.Ranges {
		dst = binary.BigEndian.AppendUint64(dst, r.Start)
		dst = binary.BigEndian.AppendUint64(dst, r.Length)
	}
	return dst, nil
}

// CheckRanges checks every range against a block of usedLength bytes with pages of pageSize,
// as ram_block_discard_range does on the destination (aligned start and length, no overrun).
func (d *RAMDiscard) CheckRanges(usedLength, pageSize uint64) error {
	for _, r := range d.Ranges {
		switch {
		case pageSize == 0 || r.Start%pageSize != 0:
			return fmt.Errorf("ram_block_discard_range: Unaligned start address: 0x%x (block %q)", r.Start, d.Block)
		case r.Length%pageSize != 0:
			return fmt.Errorf("ram_block_discard_range: Unaligned length: 0x%x (block %q)", r.Length, d.Block)
		case r.Start > usedLength || r.Length > usedLength-r.Start:
			return fmt.Errorf("ram_block_discard_range: Overrun block '%s' (0x%x/0x%x/0x%x)", d.Block, r.Start, r.Length, usedLength)
		}
	}
	return nil
}

// ParseRecvBitmapCommand decodes the payload of the RECV_BITMAP command (stream-format.md §3),
// `u8 n, n bytes block name`, which a resuming source sends for every RAM block on the new
// connection; the destination answers each with a return-path RECV_BITMAP and the block's
// received bitmap (loadvm_handle_recv_bitmap).
func ParseRecvBitmapCommand(p []byte, off int64) (string, error) {
	const what = "RECV_BITMAP payload"
	if len(p) < 1 || p[0] == 0 || 1+int(p[0]) > len(p) {
		return "", &Error{Offset: off, Expected: what, Err: fmt.Errorf("loadvm_handle_recv_bitmap: failed to read block name")}
	}
	if len(p) != 1+int(p[0]) {
		return "", &Error{Offset: off, Expected: what, Err: fmt.Errorf("loadvm_handle_recv_bitmap: invalid payload length (%d)", len(p))}
	}
	return string(p[1:]), nil
}

// AppendRecvBitmapCommand appends the RECV_BITMAP command payload for block.
func AppendRecvBitmapCommand(dst []byte, block string) ([]byte, error) {
	if len(block) == 0 || len(block) > 255 {
		return dst, encErr("RECV_BITMAP block name %q must be 1..255 bytes", block)
	}
	return append(append(dst, byte(len(block))), block...), nil
}

// POSTCOPY_RESUME (CmdPostcopyResume) has no payload: the source sends it on the resumed
// connection once every RECV_BITMAP has been answered; the destination replies RESUME_ACK and
// re-sends its pending page requests. The Reader checks its length like every fixed-length
// command.

// Resume continues decoding on rd, the main connection a postcopy recovery opened
// (stream-format.md §3; migrate-recover on the destination, migrate resume=true on the source).
// Such a connection carries no file header: it starts with RECV_BITMAP commands, then
// POSTCOPY_RESUME, then PART sections of the ram section the first connection started, so the
// Reader keeps everything it learned there (section ids, RAM blocks, capabilities). It forgets
// the block CONTINUE refers to: QEMU's source names the block of its first page record on a
// resumed connection (ram_state_reset), and the record that last named a block may not have
// reached the destination before the cut, so a CONTINUE before a named record is refused, as
// Writer.Resume refuses to write one. Offsets start again at 0; the sticky error of the cut
// connection and any PACKAGED command left open are dropped; WithBeforeRead stays.
func (r *Reader) Resume(rd io.Reader) {
	buf := r.top.buf
	if len(buf) == 0 {
		buf = make([]byte, defaultBufferSize)
	}
	r.top = input{buf: buf, rd: rd, before: r.top.before}
	r.in = &r.top
	r.pkgs = r.pkgs[:0]
	r.err = nil
	r.state = stTop
	r.inSection = false
	r.pastEOF = false
	r.rest = nil
	r.last = -1
}

// Resume continues on w, the main connection a postcopy recovery opened: no file header is
// written, offsets start again at 0 and the CONTINUE block is forgotten (QEMU's source resets it
// on resume, so its first page record names its block). Open packages and the sticky error are
// dropped; unflushed bytes of the old connection are discarded.
func (w *Writer) Resume(wr io.Writer) {
	w.w = wr
	w.buf = w.buf[:0]
	w.pkgs = nil
	w.flushed = 0
	w.err = nil
	w.last = ""
}

// PreemptReader decodes a postcopy-preempt channel (capability postcopy-preempt; QEMU 7.2 and
// 10.0): the second connection from source to destination that carries the pages the
// destination requested urgently, so that they need not queue behind the background pages of
// the main stream. It has no magic, no header and no sections: only RAM records (PAGE and ZERO,
// CONTINUE referring to the channel's own last block), which the destination reads with
// ram_load_postcopy. A 7.2 source, and a 10.0 source on a 7.x machine type
// (x-preempt-pre-7-2), ends the channel with an EOS when the migration completes
// (postcopy_preempt_shutdown_file); a 10.0 source on a newer machine type just closes it.
// Next returns KindRAM records (Section.Idstr "ram", Depth 0), and io.EOF when the input ends
// at a record boundary (after an EOS, nothing more may follow); errors are *Error with the
// channel offset. No allocation per page.
type PreemptReader struct {
	r *Reader
}

// NewPreemptReader returns a reader of a preempt channel. blocks is the MEM_SIZE list of the
// main stream (nil if unknown): with it, block names and offsets are checked as the destination
// does. Of the options, WithLimits, WithZeroCopy, WithBufferSize and WithWarnings apply.
func NewPreemptReader(rd io.Reader, blocks []RAMBlock, opts ...Option) *PreemptReader {
	r := NewReader(rd, opts...)
	for _, b := range blocks {
		if bi, ok := r.lookupBlock([]byte(b.Name), true); ok {
			r.blocks[bi].length = b.UsedLength
		}
	}
	r.memSizeSeen = len(blocks) > 0
	r.cur = &sectionInfo{hdr: SectionHeader{Type: SectionPart, Idstr: "ram"}, ram: true}
	r.inSection = true
	r.state = stRAM
	return &PreemptReader{r: r}
}

// Offset returns the absolute offset of the next byte the reader will decode.
func (p *PreemptReader) Offset() int64 { return p.r.Offset() }

// Next returns the next RAM record of the channel. Only PAGE, ZERO (either possibly with
// CONTINUE) and the final EOS are accepted, as in ram_load_postcopy ("Unknown combination of
// migration flags: 0x%x (postcopy mode)"); after the EOS the channel must end.
func (p *PreemptReader) Next() (*Record, error) {
	r := p.r
	if r.err != nil {
		return nil, r.err
	}
	if r.state == stFooter {
		// After the EOS the destination stops reading the channel.
		in := r.in
		if in.ensure(1) {
			return nil, r.stick(r.failf(in.off(), "end of preempt channel", "%d bytes after the EOS", in.avail()))
		}
		if in.err != nil && in.err != io.EOF {
			return nil, r.stick(r.fail(in.off(), "end of preempt channel", in.err))
		}
		r.err = io.EOF
		return nil, io.EOF
	}
	in := r.in
	if !in.ensure(1) && (in.err == nil || in.err == io.EOF) {
		// A 10.0 source (machine types ≥ 8.0) ends the channel by closing it, with no EOS.
		r.err = io.EOF
		return nil, io.EOF
	}
	if in.ensure(8) {
		f := RAMFlag(be64(in.win()) & r.pageMask)
		switch f &^ RAMContinue {
		case RAMPage, RAMZero, RAMEOS:
		default:
			return nil, r.stick(r.failf(in.off(), "ram record", "unknown combination of migration flags: 0x%x (postcopy mode) (%s)", uint32(f), f))
		}
	}
	rec, err := r.Next()
	if err != nil {
		return nil, err
	}
	if rec.RAM.Flags&^RAMContinue == RAMZero && rec.RAM.Fill != 0 {
		return nil, r.stick(r.failf(rec.Offset, "ram record", "found a zero page with value %d", rec.RAM.Fill))
	}
	return rec, nil
}

// stick makes err the Reader's sticky error.
func (r *Reader) stick(err *Error) error {
	r.err = err
	return err
}

// Resume continues on rd, the preempt channel a postcopy recovery opened. As with
// Reader.Resume the block CONTINUE refers to is forgotten (the source resets it for every
// channel on resume). Offsets start again at 0.
func (p *PreemptReader) Resume(rd io.Reader) {
	p.r.Resume(rd)
	p.r.inSection = true
	p.r.state = stRAM
}

// PreemptWriter writes a postcopy-preempt channel (see PreemptReader): RAM records only, each
// handed to the underlying writer at once (the destination's vCPU waits for them).
type PreemptWriter struct {
	w *Writer
}

// NewPreemptWriter returns a writer of a preempt channel.
func NewPreemptWriter(w io.Writer, opts ...WriterOption) *PreemptWriter {
	return &PreemptWriter{w: NewWriter(w, opts...)}
}

// Offset returns the number of bytes written so far.
func (p *PreemptWriter) Offset() int64 { return p.w.Offset() }

// WriteRecord writes rec, a record PreemptReader returns (PAGE, ZERO or EOS), and flushes it.
func (p *PreemptWriter) WriteRecord(rec *Record) error {
	if rec.Kind != KindRAM {
		return encErr("preempt channel record of kind %s", rec.Kind)
	}
	switch rec.RAM.Flags &^ RAMContinue {
	case RAMPage, RAMZero, RAMEOS:
	default:
		return encErr("preempt channel record with flags %s", rec.RAM.Flags)
	}
	if err := p.w.writeRAM(&rec.RAM); err != nil {
		return err
	}
	return p.w.Flush()
}

// WritePage writes one PAGE record (CONTINUE set when block is the channel's last block) and
// flushes it.
func (p *PreemptWriter) WritePage(offset uint64, block string, data []byte) error {
	if err := p.w.WritePage(offset, block, data); err != nil {
		return err
	}
	return p.w.Flush()
}

// WriteZero writes one ZERO record (CONTINUE set automatically) and flushes it.
func (p *PreemptWriter) WriteZero(offset uint64, block string) error {
	if err := p.w.WriteZero(RAMZero|p.w.Continue(block), offset, block, 0); err != nil {
		return err
	}
	return p.w.Flush()
}

// WriteEOS writes the EOS that ends the channel and flushes it.
func (p *PreemptWriter) WriteEOS() error {
	if err := p.w.WriteEOS(); err != nil {
		return err
	}
	return p.w.Flush()
}

// Resume continues on w, the preempt channel of the connection a postcopy recovery opened,
// forgetting the CONTINUE block (the source resets it on resume).
func (p *PreemptWriter) Resume(w io.Writer) { p.w.Resume(w) }
