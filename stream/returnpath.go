package stream

import (
	"encoding/binary"
	"fmt"
	"io"
	"strconv"
)

// RPType is the be16 type of a return-path message, the destination → source direction of the
// migration connection (stream-format.md §3, "Return path"): `be16 type, be16 len, payload`.
type RPType uint16

// Return-path message types (stream-format.md §3). QEMU's names are MIG_RP_MSG_*.
const (
	RPShut          RPType = 1 // len 4: be32 0 ok / non-zero error; the destination sends no more
	RPPong          RPType = 2 // len 4: be32 value of the PING it answers
	RPReqPagesID    RPType = 3 // len 13+n: be64 start, be32 length, u8 n, n bytes block name
	RPReqPages      RPType = 4 // len 12: be64 start, be32 length; block of the previous REQ_PAGES_ID
	RPRecvBitmap    RPType = 5 // len 1+n: u8 n, block name; then the bitmap outside the message
	RPResumeAck     RPType = 6 // len 4: be32 1 (RPResumeAckValue)
	RPSwitchoverAck RPType = 7 // len 0; QEMU 10.0 only (capability switchover-ack)
)

// Return-path constants (stream-format.md §3).
const (
	// RPBitmapEndMark is the be64 that ends the bitmap following a RECV_BITMAP message
	// (QEMU's RAMBLOCK_RECV_BITMAP_ENDING).
	RPBitmapEndMark uint64 = 0x0123456789ABCDEF
	// RPResumeAckValue is the only value of RESUME_ACK a source accepts (MIGRATION_RESUME_ACK_VALUE).
	RPResumeAckValue uint32 = 1
	// RPMaxMessage is the longest message payload a QEMU source reads (its 512-byte buffer).
	RPMaxMessage = 512

	rpHeaderLen = 4
)

var rpTypeNames = [...]string{
	RPShut: "SHUT", RPPong: "PONG", RPReqPagesID: "REQ_PAGES_ID", RPReqPages: "REQ_PAGES",
	RPRecvBitmap: "RECV_BITMAP", RPResumeAck: "RESUME_ACK", RPSwitchoverAck: "SWITCHOVER_ACK",
}

// Known reports whether t is one of the message types of stream-format.md §3 (7.2 knows 1–6).
func (t RPType) Known() bool { return t >= RPShut && t <= RPSwitchoverAck }

func (t RPType) String() string {
	if t.Known() {
		return rpTypeNames[t]
	}
	return "RPType(" + strconv.FormatUint(uint64(t), 10) + ")"
}

// fixedLen is QEMU's rp_cmd_args length of t, or -1 for the variable-length messages.
func (t RPType) fixedLen() int {
	switch t {
	case RPShut, RPPong, RPResumeAck:
		return 4
	case RPReqPages:
		return 12
	case RPSwitchoverAck:
		return 0
	}
	return -1
}

// RPMessage is one return-path message as returned by RPReader.Next and accepted by
// RPWriter.WriteMessage. Only the fields documented for its Type are meaningful. Messages
// returned by Next, and Bitmap, are reused: they are valid only until the next call.
type RPMessage struct {
	Type   RPType
	Offset int64 // absolute offset of the message's first byte in the return path

	// SHUT, PONG, RESUME_ACK: the be32 payload.
	Value uint32

	// REQ_PAGES_ID and REQ_PAGES: the page range requested, an offset inside the block and a
	// length in bytes (the block's page size, as QEMU's destination sends it).
	Start  uint64
	Length uint32
	// Block: REQ_PAGES_ID and RECV_BITMAP the block named in the message; REQ_PAGES the block of
	// the previous REQ_PAGES_ID, as the source resolves it.
	Block string

	// RECV_BITMAP: the received bitmap that follows the message: little-endian 64-bit words,
	// bit i = target page i of the block has arrived on the destination. Its length is the be64
	// size QEMU writes before it (a multiple of 8); the end mark after it is RPBitmapEndMark.
	Bitmap []byte
}

// Received reports whether target page i is marked in a RECV_BITMAP message's bitmap.
func (m *RPMessage) Received(i uint64) bool {
	if i/8 >= uint64(len(m.Bitmap)) {
		return false
	}
	return m.Bitmap[i/8]>>(i%8)&1 != 0
}

// RPLimits bounds what an RPReader accepts. Zero fields take the defaults.
type RPLimits struct {
	// Message caps a message's payload length (default and QEMU's maximum: RPMaxMessage).
	Message int
	// MaxRAM is the largest RAM block, in bytes, a RECV_BITMAP bitmap may describe: the bitmap
	// is at most MaxRAM/PageSize/8 bytes (default 1 TiB, a 32 MiB bitmap). The bitmap buffer
	// grows only with the bytes that actually arrive.
	MaxRAM uint64
	// PageSize is the target page size: one bitmap bit per page, and page requests must be
	// aligned to it (default 4096).
	PageSize int
}

// Defaults for RPLimits.
const (
	DefaultRPMaxRAM   = 1 << 40
	DefaultRPPageSize = 4096
)

func (l RPLimits) withDefaults() RPLimits {
	if l.Message <= 0 || l.Message > RPMaxMessage {
		l.Message = RPMaxMessage
	}
	if l.MaxRAM == 0 {
		l.MaxRAM = DefaultRPMaxRAM
	}
	if l.PageSize <= 0 || l.PageSize&(l.PageSize-1) != 0 {
		l.PageSize = DefaultRPPageSize
	}
	return l
}

// maxBitmap is the largest bitmap the limits allow, in bytes (rounded up to 8 as QEMU does).
func (l RPLimits) maxBitmap() uint64 {
	pages := l.MaxRAM / uint64(l.PageSize)
	return (pages + 63) / 64 * 8
}

// RPOption configures an RPReader.
type RPOption func(*RPReader)

// WithRPLimits sets the caps of an RPReader (zero fields keep their defaults).
func WithRPLimits(l RPLimits) RPOption { return func(r *RPReader) { r.lim = l.withDefaults() } }

// WithRPBlocks gives the RPReader the source's RAM blocks (the MEM_SIZE list of the main
// stream) so that it applies the checks a QEMU source makes against them: a request for an
// unknown block ("has no block"), a range past the block's end ("request overrun"), a bitmap
// whose size does not match the block ("bitmap size mismatch"). Without it only the limits are
// checked.
func WithRPBlocks(blocks []RAMBlock) RPOption {
	return func(r *RPReader) {
		r.blocks = make(map[string]uint64, len(blocks))
		for _, b := range blocks {
			r.blocks[b.Name] = b.UsedLength
		}
	}
}

// RPReader decodes the return path (stream-format.md §3) message by message from an io.Reader,
// with the checks QEMU's source_return_path_thread makes and the texts of its errors. Every
// problem is an *Error with the absolute offset of the message (or of the bitmap field) that
// could not be read. Errors are sticky. REQ_PAGES resolves to the block of the previous
// REQ_PAGES_ID. Next does not allocate for page requests of blocks it has seen.
type RPReader struct {
	rd     io.Reader
	off    int64
	lim    RPLimits
	blocks map[string]uint64 // WithRPBlocks: used_length by name; nil = unknown
	names  []string          // block names seen, to resolve without allocating
	last   string            // block of the last REQ_PAGES_ID; "" none
	err    error
	msg    RPMessage
	buf    [rpHeaderLen + RPMaxMessage]byte
	bitmap []byte
}

// NewRPReader returns an RPReader decoding the return path read from rd.
func NewRPReader(rd io.Reader, opts ...RPOption) *RPReader {
	r := &RPReader{rd: rd, lim: RPLimits{}.withDefaults()}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Offset returns the absolute offset of the next byte the RPReader will decode.
func (r *RPReader) Offset() int64 { return r.off }

// Resume continues decoding on rd, the return path of the connection a postcopy recovery
// opened (stream-format.md §3; QEMU's migrate-recover / migrate resume=true). The block of the
// last REQ_PAGES_ID is forgotten: the destination resets it on POSTCOPY_RESUME (its last_rb), so
// its first request names the block, and a REQ_PAGES before any REQ_PAGES_ID is refused, as
// RPWriter.Resume refuses to write one (a QEMU source would still resolve it with its
// last_req_rb). Offsets start again at 0 and the sticky error is cleared.
func (r *RPReader) Resume(rd io.Reader) {
	r.rd, r.off, r.err, r.last = rd, 0, nil, ""
}

func (r *RPReader) fail(off int64, expected string, err error) error {
	r.err = &Error{Offset: off, Expected: expected, Err: err}
	return r.err
}

func (r *RPReader) failf(off int64, expected, format string, args ...any) error {
	return r.fail(off, expected, fmt.Errorf(format, args...))
}

// read fills b from the input; at a clean end before the first byte of a message (atStart) it
// returns io.EOF.
func (r *RPReader) read(b []byte, start int64, expected string, atStart bool) error {
	n, err := io.ReadFull(r.rd, b)
	r.off += int64(n)
	if err == nil {
		return nil
	}
	if err == io.EOF && atStart {
		r.err = io.EOF
		return io.EOF
	}
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		err = ErrUnexpectedEOF
	}
	return r.fail(start, expected, err)
}

// intern returns the block name b as a string, allocating only for a name not seen before.
func (r *RPReader) intern(b []byte) string {
	for _, n := range r.names {
		if n == string(b) {
			return n
		}
	}
	s := string(b)
	if len(r.names) < 4096 {
		r.names = append(r.names, s)
	}
	return s
}

// Next returns the next message. It returns io.EOF when the input ends cleanly between
// messages. A destination sends nothing after SHUT; callers reading a live connection stop
// there. The message is valid until the next call.
func (r *RPReader) Next() (*RPMessage, error) {
	if r.err != nil {
		return nil, r.err
	}
	off := r.off
	if err := r.read(r.buf[:rpHeaderLen], off, "return-path message header", true); err != nil {
		return nil, err
	}
	t := RPType(be16(r.buf[:]))
	l := int(be16(r.buf[2:]))
	const what = "return-path message"
	if !t.Known() {
		return nil, r.failf(off, what, "received invalid message 0x%04x length 0x%04x", uint16(t), l)
	}
	// QEMU: "Received '%s' message (0x%04x) with incorrect length %d expecting %zu" (7.2 and
	// 10.0 lack the space after "with").
	if fl := t.fixedLen(); fl >= 0 && l != fl {
		return nil, r.failf(off, what, "received '%s' message (0x%04x) with incorrect length %d expecting %d", t, uint16(t), l, fl)
	}
	if l > r.lim.Message {
		return nil, r.fail(off, what, fmt.Errorf("%w: received '%s' message (0x%04x) with incorrect length %d, at most %d", ErrTooLarge, t, uint16(t), l, r.lim.Message))
	}
	p := r.buf[rpHeaderLen : rpHeaderLen+l]
	if err := r.read(p, off, "return-path message payload", false); err != nil {
		return nil, err
	}
	m := &r.msg
	*m = RPMessage{Type: t, Offset: off}
	switch t {
	case RPShut, RPPong, RPResumeAck:
		m.Value = be32(p)
		if t == RPResumeAck && m.Value != RPResumeAckValue {
			return nil, r.failf(off, what, "illegal resume_ack value %d", m.Value)
		}
	case RPReqPagesID:
		if l < 13 || l != 13+int(p[12]) {
			exp := 13
			if l >= 13 {
				exp += int(p[12])
			}
			return nil, r.failf(off, what, "Req_Page_id with length %d expecting %d", l, exp)
		}
		if p[12] == 0 {
			return nil, r.failf(off+4+12, what, "MIG_RP_MSG_REQ_PAGES has no block ''")
		}
		m.Block = r.intern(p[13:l])
		r.last = m.Block
		m.Start, m.Length = be64(p), be32(p[8:])
		if err := r.checkRequest(m, off); err != nil {
			return nil, err
		}
	case RPReqPages:
		if r.last == "" {
			return nil, r.failf(off, what, "MIG_RP_MSG_REQ_PAGES has no previous block")
		}
		m.Block = r.last
		m.Start, m.Length = be64(p), be32(p[8:])
		if err := r.checkRequest(m, off); err != nil {
			return nil, err
		}
	case RPRecvBitmap:
		if l < 1 {
			return nil, r.failf(off, what, "MIG_RP_MSG_RECV_BITMAP missing block name")
		}
		if int(p[0]) != l-1 || p[0] == 0 {
			return nil, r.failf(off, what, "RECV_BITMAP block name of %d bytes in a %d-byte message", p[0], l)
		}
		m.Block = r.intern(p[1:l])
		if err := r.readBitmap(m); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// checkRequest applies the source's checks to a page request (migrate_handle_rp_req_pages and
// ram_save_queue_pages).
func (r *RPReader) checkRequest(m *RPMessage, off int64) error {
	const what = "return-path page request"
	ps := uint64(r.lim.PageSize)
	if m.Start%ps != 0 || uint64(m.Length)%ps != 0 || m.Length == 0 {
		return r.failf(off+4, what, "MIG_RP_MSG_REQ_PAGES: Misaligned page request, start: 0x%x len: %d", m.Start, m.Length)
	}
	if r.blocks == nil {
		return nil
	}
	bl, ok := r.blocks[m.Block]
	if !ok {
		return r.failf(off, what, "MIG_RP_MSG_REQ_PAGES has no block '%s'", m.Block)
	}
	if m.Start >= bl || uint64(m.Length) > bl-m.Start {
		return r.failf(off+4, what, "MIG_RP_MSG_REQ_PAGES request overrun, start=0x%x len=0x%x blocklen=0x%x", m.Start, m.Length, bl)
	}
	return nil
}

// readBitmap reads the be64 size, the bitmap and the end mark that follow RECV_BITMAP
// (ramblock_recv_bitmap_send / ram_dirty_bitmap_reload).
func (r *RPReader) readBitmap(m *RPMessage) error {
	var b [8]byte
	soff := r.off
	if err := r.read(b[:], soff, "RECV_BITMAP bitmap size", false); err != nil {
		return err
	}
	size := binary.BigEndian.Uint64(b[:])
	if r.blocks != nil {
		bl, ok := r.blocks[m.Block]
		if !ok {
			return r.failf(m.Offset, "RECV_BITMAP", "MIG_RP_MSG_RECV_BITMAP has invalid block name '%s'", m.Block)
		}
		pages := bl / uint64(r.lim.PageSize)
		if local := (pages + 63) / 64 * 8; size != local {
			return r.failf(soff, "RECV_BITMAP bitmap size", "ramblock '%s' bitmap size mismatch (0x%x != 0x%x)", m.Block, size, local)
		}
	}
	if max := r.lim.maxBitmap(); size > max {
		return r.fail(soff, "RECV_BITMAP bitmap size", fmt.Errorf("%w: ramblock '%s' bitmap of 0x%x bytes, at most 0x%x (RPLimits.MaxRAM)", ErrTooLarge, m.Block, size, max))
	}
	if size%8 != 0 {
		return r.failf(soff, "RECV_BITMAP bitmap size", "ramblock '%s' bitmap size 0x%x is not a multiple of 8", m.Block, size)
	}
	// Grow with the bytes that arrive: a size field can claim the whole limit and be followed
	// by nothing.
	boff := r.off
	buf := r.bitmap[:0]
	for uint64(len(buf)) < size {
		if len(buf) == cap(buf) {
			nc := min(size, max(2*uint64(cap(buf)), 64<<10))
			nb := make([]byte, len(buf), nc)
			copy(nb, buf)
			buf = nb
		}
		k := int(min(size-uint64(len(buf)), uint64(cap(buf)-len(buf))))
		if err := r.read(buf[len(buf):len(buf)+k], boff, "RECV_BITMAP bitmap", false); err != nil {
			r.bitmap = buf
			return err
		}
		buf = buf[:len(buf)+k]
	}
	r.bitmap = buf
	m.Bitmap = buf
	eoff := r.off
	if err := r.read(b[:], eoff, "RECV_BITMAP end mark", false); err != nil {
		return err
	}
	if mark := binary.BigEndian.Uint64(b[:]); mark != RPBitmapEndMark {
		return r.failf(eoff, "RECV_BITMAP end mark", "ramblock '%s' end mark incorrect: 0x%x", m.Block, mark)
	}
	return nil
}

// RPWriter encodes the return path (stream-format.md §3), the exact inverse of RPReader: writing
// every message Next returns reproduces the input byte for byte. Each message is handed to the
// underlying writer in one Write (the source waits for them: nothing is held back). Errors are
// sticky; messages that cannot be encoded are refused before anything is written.
type RPWriter struct {
	w    io.Writer
	off  int64
	last string // block of the last REQ_PAGES_ID written
	err  error
	buf  []byte
}

// NewRPWriter returns an RPWriter writing to w.
func NewRPWriter(w io.Writer) *RPWriter { return &RPWriter{w: w} }

// Offset returns the number of bytes written so far.
func (w *RPWriter) Offset() int64 { return w.off }

// Err returns the sticky error, if any.
func (w *RPWriter) Err() error { return w.err }

// Resume continues on w, the return path of the connection a postcopy recovery opened. The
// block REQ_PAGES refers to is forgotten, as the destination does on POSTCOPY_RESUME (QEMU
// resets its last_rb), so the next request names its block.
func (w *RPWriter) Resume(wr io.Writer) {
	w.w, w.off, w.err, w.last = wr, 0, nil, ""
}

func (w *RPWriter) flush() error {
	n, err := w.w.Write(w.buf)
	w.off += int64(n)
	if err == nil && n < len(w.buf) {
		err = io.ErrShortWrite
	}
	if err != nil {
		w.err = err
	}
	return err
}

func (w *RPWriter) header(t RPType, l int) {
	w.buf = binary.BigEndian.AppendUint16(w.buf[:0], uint16(t))
	w.buf = binary.BigEndian.AppendUint16(w.buf, uint16(l))
}

// WriteMessage writes m, the exact inverse of RPReader.Next. A REQ_PAGES message must refer to
// the block of the last REQ_PAGES_ID written (m.Block may be empty).
func (w *RPWriter) WriteMessage(m *RPMessage) error {
	if w.err != nil {
		return w.err
	}
	switch m.Type {
	case RPShut, RPPong, RPResumeAck:
		w.header(m.Type, 4)
		w.buf = binary.BigEndian.AppendUint32(w.buf, m.Value)
	case RPSwitchoverAck:
		w.header(m.Type, 0)
	case RPReqPagesID:
		if len(m.Block) == 0 || len(m.Block) > 255 {
			return encErr("REQ_PAGES_ID block name %q must be 1..255 bytes", m.Block)
		}
		w.header(m.Type, 13+len(m.Block))
		w.buf = binary.BigEndian.AppendUint64(w.buf, m.Start)
		w.buf = binary.BigEndian.AppendUint32(w.buf, m.Length)
		w.buf = append(append(w.buf, byte(len(m.Block))), m.Block...)
		w.last = m.Block
	case RPReqPages:
		if w.last == "" || m.Block != "" && m.Block != w.last {
			return encErr("REQ_PAGES for block %q, but the last REQ_PAGES_ID named %q", m.Block, w.last)
		}
		w.header(m.Type, 12)
		w.buf = binary.BigEndian.AppendUint64(w.buf, m.Start)
		w.buf = binary.BigEndian.AppendUint32(w.buf, m.Length)
	case RPRecvBitmap:
		if len(m.Block) == 0 || len(m.Block) > 255 {
			return encErr("RECV_BITMAP block name %q must be 1..255 bytes", m.Block)
		}
		if len(m.Bitmap)%8 != 0 {
			return encErr("RECV_BITMAP bitmap of %d bytes is not a multiple of 8", len(m.Bitmap))
		}
		w.header(m.Type, 1+len(m.Block))
		w.buf = append(append(w.buf, byte(len(m.Block))), m.Block...)
		w.buf = binary.BigEndian.AppendUint64(w.buf, uint64(len(m.Bitmap)))
		w.buf = append(w.buf, m.Bitmap...)
		w.buf = binary.BigEndian.AppendUint64(w.buf, RPBitmapEndMark)
	default:
		return encErr("return-path message type %s", m.Type)
	}
	return w.flush()
}

// WriteShut writes SHUT: 0 = the destination finished cleanly, non-zero = it failed.
func (w *RPWriter) WriteShut(value uint32) error {
	return w.WriteMessage(&RPMessage{Type: RPShut, Value: value})
}

// WritePong writes PONG answering PING(value).
func (w *RPWriter) WritePong(value uint32) error {
	return w.WriteMessage(&RPMessage{Type: RPPong, Value: value})
}

// WriteReqPages requests length bytes at start of block, as QEMU's destination does: REQ_PAGES_ID
// when the block differs from the last request's, else REQ_PAGES.
func (w *RPWriter) WriteReqPages(block string, start uint64, length uint32) error {
	t := RPReqPagesID
	if block == w.last {
		t = RPReqPages
	}
	return w.WriteMessage(&RPMessage{Type: t, Block: block, Start: start, Length: length})
}

// WriteRecvBitmap writes RECV_BITMAP for block followed by its received bitmap (little-endian
// 64-bit words) and the end mark.
func (w *RPWriter) WriteRecvBitmap(block string, bitmap []byte) error {
	return w.WriteMessage(&RPMessage{Type: RPRecvBitmap, Block: block, Bitmap: bitmap})
}

// WriteResumeAck writes RESUME_ACK(RPResumeAckValue), the destination's answer to POSTCOPY_RESUME.
func (w *RPWriter) WriteResumeAck() error {
	return w.WriteMessage(&RPMessage{Type: RPResumeAck, Value: RPResumeAckValue})
}

// WriteSwitchoverAck writes SWITCHOVER_ACK (QEMU 10.0 sources only).
func (w *RPWriter) WriteSwitchoverAck() error {
	return w.WriteMessage(&RPMessage{Type: RPSwitchoverAck})
}
