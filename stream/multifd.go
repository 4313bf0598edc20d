package stream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
)

// Multifd wire constants (stream-format.md §4.1).
const (
	MultifdMagic   = 0x11223344 // first be32 of the channel hello and of every packet
	MultifdVersion = 1          // second be32 of the hello and of every packet

	MultifdHelloSize = 64 // be32 magic, be32 version, 16-byte uuid, u8 id, 39 reserved bytes

	// MultifdPageSize is the target page size the packet layout assumes (x86: 4 KiB).
	MultifdPageSize = 4096
	// MultifdPageSlots is the number of offset slots of a RAM packet: 512 KiB / 4 KiB.
	MultifdPageSlots = 128
	// MultifdPacketHeaderSize is the fixed size of a RAM packet header for 4 KiB pages: 64 bytes
	// of counters, 256-byte ramblock name, 128 × be64 offsets.
	MultifdPacketHeaderSize = 64 + 256 + 8*MultifdPageSlots
	// MultifdDeviceStateHeaderSize is the size of a 10.0 device-state packet header: be32 magic,
	// version, flags, 256-byte idstr, be32 instance_id, be32 next_packet_size.
	MultifdDeviceStateHeaderSize = 12 + 256 + 4 + 4

	MultifdFlagSync = 1 << 0 // SYNC: the destination waits for one on every channel
	// MultifdFlagCompressionMask72 covers QEMU 7.2's compression bits (1–3: 0 none, 1 zlib, 2 zstd).
	MultifdFlagCompressionMask72 = 7 << 1
	// MultifdFlagCompressionMask covers QEMU 10.0's compression bits (1–5; + 4 qpl, 8 uadk, 16 qatzip).
	MultifdFlagCompressionMask = 0x1f << 1
	MultifdFlagZlib            = 1 << 1  // compression: zlib (both versions)
	MultifdFlagZstd            = 2 << 1  // compression: zstd (both versions)
	MultifdFlagQPL             = 4 << 1  // compression: qpl (10.0)
	MultifdFlagUADK            = 8 << 1  // compression: uadk (10.0)
	MultifdFlagQATzip          = 16 << 1 // compression: qatzip (10.0)
	// MultifdFlagDeviceState marks a 10.0 device-state packet (different header, see MultifdPacket).
	MultifdFlagDeviceState = 0x40
)

// MultifdLayout selects the QEMU version whose multifd packet layout is read or written. The
// RAM packet header has the same size and offsets in both; they differ in what the 32 bytes after
// packet_num mean (7.2: four reserved be64; 10.0: be32 zero_pages, be32 + 3 × be64 reserved), in
// the compression mask and in 10.0's device-state packets (flag 0x40).
type MultifdLayout int

const (
	MultifdV72  MultifdLayout = 72  // QEMU 7.2
	MultifdV100 MultifdLayout = 100 // QEMU 10.0
)

func (l MultifdLayout) String() string {
	switch l {
	case MultifdV72:
		return "multifd-7.2"
	case MultifdV100:
		return "multifd-10.0"
	}
	return fmt.Sprintf("MultifdLayout(%d)", int(l))
}

func (l MultifdLayout) compressionMask() uint32 {
	if l == MultifdV72 {
		return MultifdFlagCompressionMask72
	}
	return MultifdFlagCompressionMask
}

// MultifdHello is the 64-byte message that opens every multifd channel connection (§4.1; QEMU's
// MultiFDInit_t). Reserved is kept as read so that a re-encoded hello is byte-identical.
type MultifdHello struct {
	Magic     uint32   // MultifdMagic
	Version   uint32   // MultifdVersion
	UUID      [16]byte // source -uuid; must equal the destination's (zeros when unset)
	ChannelID uint8    // 0-based channel number
	Reserved  [39]byte // zero when written by QEMU
}

// ParseMultifdHello decodes a channel hello from the first MultifdHelloSize bytes of b and checks
// magic and version. base is the stream offset of b[0], used in errors.
func ParseMultifdHello(b []byte, base int64) (*MultifdHello, error) {
	if len(b) < MultifdHelloSize {
		return nil, &Error{Offset: base, Expected: "multifd hello", Err: ErrUnexpectedEOF}
	}
	h := &MultifdHello{
		Magic:     binary.BigEndian.Uint32(b[0:]),
		Version:   binary.BigEndian.Uint32(b[4:]),
		ChannelID: b[24],
	}
	copy(h.UUID[:], b[8:24])
	copy(h.Reserved[:], b[25:64])
	if h.Magic != MultifdMagic {
		return nil, &Error{Offset: base, Expected: "multifd hello magic", Err: fmt.Errorf("got 0x%08x, want 0x%08x", h.Magic, uint32(MultifdMagic))}
	}
	if h.Version != MultifdVersion {
		return nil, &Error{Offset: base + 4, Expected: "multifd hello version", Err: fmt.Errorf("got %d, want %d", h.Version, MultifdVersion)}
	}
	return h, nil
}

// Append appends the 64-byte wire form of h to dst.
func (h *MultifdHello) Append(dst []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, h.Magic)
	dst = binary.BigEndian.AppendUint32(dst, h.Version)
	dst = append(dst, h.UUID[:]...)
	dst = append(dst, h.ChannelID)
	return append(dst, h.Reserved[:]...)
}

// MultifdPacket is one packet of a multifd channel (§4.1). A RAM packet (the only kind in 7.2)
// is the fixed MultifdPacketHeaderSize-byte header followed by its payload; a 10.0 device-state
// packet (Flags&MultifdFlagDeviceState) is a MultifdDeviceStateHeaderSize-byte header (magic,
// version, flags, Name as 256-byte idstr, InstanceID, NextPacketSize) followed by NextPacketSize
// bytes of device state. Every header byte is kept (including stale or reserved bytes: 7.2 does
// not clear the offset slots between packets) so that writing the packet back is byte-identical.
type MultifdPacket struct {
	Magic   uint32
	Version uint32
	Flags   uint32 // SYNC bit 0, compression bits 1–5, 10.0 device-state 0x40

	PagesAlloc  uint32 // pages the sender allocated per packet (≤ 128)
	NormalPages uint32 // non-zero pages whose bytes follow (≤ PagesAlloc)
	// NextPacketSize is the payload size: normal_pages × 4096 without compression, the
	// compressed size with it, the device-state size for device-state packets.
	NextPacketSize uint32
	PacketNum      uint64 // global packet counter of the source (all channels)
	// ZeroPages is 10.0's count of zero-page offsets following the normal ones. In the 7.2 layout
	// these 4 bytes are reserved; they are kept here verbatim but not interpreted.
	ZeroPages uint32
	Reserved  [28]byte // the remaining reserved bytes after packet_num (+zero_pages)
	// Name is the NUL-padded ramblock name (RAM packets) or device idstr (device-state packets).
	Name       [256]byte
	Offsets    [MultifdPageSlots]uint64 // page offsets in the block: normal ones first, then (10.0) zero ones
	InstanceID uint32                   // device-state packets only

	// Data is the payload: NormalPages × 4096 page bytes (or NextPacketSize compressed bytes
	// when a compression bit is set), empty when NormalPages is 0; for device-state packets
	// NextPacketSize bytes. From MultifdReader.Next it aliases a reused buffer.
	Data []byte
}

// IsDeviceState reports whether p is a 10.0 device-state packet (only meaningful in the V100 layout).
func (p *MultifdPacket) IsDeviceState() bool { return p.Flags&MultifdFlagDeviceState != 0 }

// Sync reports whether the SYNC flag is set.
func (p *MultifdPacket) Sync() bool { return p.Flags&MultifdFlagSync != 0 }

// BlockName returns Name up to the first NUL: the ramblock (or device idstr).
func (p *MultifdPacket) BlockName() string {
	n := p.Name[:]
	if i := bytes.IndexByte(n, 0); i >= 0 {
		n = n[:i]
	}
	return string(n)
}

// SetBlockName stores s NUL-padded into Name (truncated to 255 bytes).
func (p *MultifdPacket) SetBlockName(s string) {
	p.Name = [256]byte{}
	copy(p.Name[:255], s)
}

// NormalOffsets returns the offsets of the pages carried in Data (bounded by the slot count).
func (p *MultifdPacket) NormalOffsets() []uint64 {
	return p.Offsets[:min(int(p.NormalPages), MultifdPageSlots)]
}

// ZeroOffsets returns the 10.0 zero-page offsets (the ZeroPages slots after the normal ones).
// Meaningless for the 7.2 layout.
func (p *MultifdPacket) ZeroOffsets() []uint64 {
	s := min(int(p.NormalPages), MultifdPageSlots)
	e := min(s+int(p.ZeroPages), MultifdPageSlots)
	return p.Offsets[s:e]
}

// Page returns the bytes of normal page i of an uncompressed RAM packet.
func (p *MultifdPacket) Page(i int) []byte {
	return p.Data[i*MultifdPageSize : (i+1)*MultifdPageSize]
}

// payloadLen is the number of payload bytes the destination reads after the header (§4.1;
// QEMU reads pages only when normal_pages > 0, compressed data is next_packet_size long).
func (p *MultifdPacket) payloadLen(l MultifdLayout) int64 {
	if l == MultifdV100 && p.IsDeviceState() {
		return int64(p.NextPacketSize)
	}
	if p.NormalPages == 0 {
		return 0
	}
	if p.Flags&l.compressionMask() != 0 {
		return int64(p.NextPacketSize)
	}
	return int64(p.NormalPages) * MultifdPageSize
}

// MultifdLimits bounds the payload sizes a MultifdReader accepts (page counts are always bounded
// by the 128 slots). Zero fields take the defaults.
type MultifdLimits struct {
	// MaxCompressedSize caps NextPacketSize of compressed RAM packets (default 1 MiB; QEMU
	// compresses at most 512 KiB per packet).
	MaxCompressedSize uint32
	// MaxDeviceStateSize caps NextPacketSize of 10.0 device-state packets (default 256 MiB).
	MaxDeviceStateSize uint32
}

// Defaults for MultifdLimits.
const (
	DefaultMultifdMaxCompressedSize  = 1 << 20
	DefaultMultifdMaxDeviceStateSize = 256 << 20
)

// MultifdReader reads one multifd channel: the hello, then packets (§4.1). After warm-up Next does
// not allocate: the returned packet and its Data are reused by the following call.
type MultifdReader struct {
	r      io.Reader
	layout MultifdLayout
	limits MultifdLimits
	off    int64
	hdr    [MultifdPacketHeaderSize]byte
	pkt    MultifdPacket
	data   []byte
}

// NewMultifdReader returns a reader of channel bytes in the given layout. limits may be zero.
func NewMultifdReader(r io.Reader, layout MultifdLayout, limits MultifdLimits) *MultifdReader {
	if limits.MaxCompressedSize == 0 {
		limits.MaxCompressedSize = DefaultMultifdMaxCompressedSize
	}
	if limits.MaxDeviceStateSize == 0 {
		limits.MaxDeviceStateSize = DefaultMultifdMaxDeviceStateSize
	}
	return &MultifdReader{r: r, layout: layout, limits: limits}
}

// Offset returns the number of channel bytes consumed so far.
func (r *MultifdReader) Offset() int64 { return r.off }

// read fills b; atStart reports whether a clean EOF before the first byte is allowed (io.EOF).
func (r *MultifdReader) read(b []byte, expected string, atStart bool) error {
	n, err := io.ReadFull(r.r, b)
	r.off += int64(n)
	if err == nil {
		return nil
	}
	if err == io.EOF && atStart {
		return io.EOF
	}
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		err = ErrUnexpectedEOF
	}
	return &Error{Offset: r.off - int64(n), Expected: expected, Err: err}
}

// ReadHello reads and checks the 64-byte channel hello.
func (r *MultifdReader) ReadHello() (*MultifdHello, error) {
	base := r.off
	if err := r.read(r.hdr[:MultifdHelloSize], "multifd hello", false); err != nil {
		return nil, err
	}
	return ParseMultifdHello(r.hdr[:MultifdHelloSize], base)
}

// Next reads the next packet. It returns io.EOF when the channel ends cleanly between packets,
// and an *Error for a bad magic/version, counts beyond the slots (pages_alloc > 128,
// normal_pages > pages_alloc, 10.0 zero_pages > pages_alloc − normal_pages), a payload over the
// limits, or a truncated packet. The packet is valid until the next call.
func (r *MultifdReader) Next() (*MultifdPacket, error) {
	base := r.off
	if err := r.read(r.hdr[:12], "multifd packet header", true); err != nil {
		return nil, err
	}
	p := &r.pkt
	p.Magic = binary.BigEndian.Uint32(r.hdr[0:])
	p.Version = binary.BigEndian.Uint32(r.hdr[4:])
	p.Flags = binary.BigEndian.Uint32(r.hdr[8:])
	if p.Magic != MultifdMagic {
		return nil, &Error{Offset: base, Expected: "multifd packet magic", Err: fmt.Errorf("got 0x%08x, want 0x%08x", p.Magic, uint32(MultifdMagic))}
	}
	if p.Version != MultifdVersion {
		return nil, &Error{Offset: base + 4, Expected: "multifd packet version", Err: fmt.Errorf("got %d, want %d", p.Version, MultifdVersion)}
	}
	var limit uint32
	if r.layout == MultifdV100 && p.IsDeviceState() {
		if err := r.read(r.hdr[12:MultifdDeviceStateHeaderSize], "multifd device-state packet header", false); err != nil {
			return nil, err
		}
		if err := decodeMultifdDeviceState(p, r.hdr[:MultifdDeviceStateHeaderSize]); err != nil {
			return nil, err
		}
		limit = r.limits.MaxDeviceStateSize
	} else {
		if err := r.read(r.hdr[12:], "multifd packet header", false); err != nil {
			return nil, err
		}
		if err := decodeMultifdRAM(p, r.hdr[:], r.layout, base); err != nil {
			return nil, err
		}
		limit = r.limits.MaxCompressedSize
		if p.Flags&r.layout.compressionMask() == 0 {
			limit = MultifdPageSlots * MultifdPageSize // normal_pages ≤ 128 bounds it already
		}
	}
	n := p.payloadLen(r.layout)
	if n > int64(limit) {
		return nil, &Error{Offset: base + 20, Expected: "multifd next_packet_size", Err: fmt.Errorf("%w: %d > %d", ErrTooLarge, n, limit)}
	}
	// Grow the buffer only with the data that actually arrives: a header can announce up to
	// MaxDeviceStateSize (256 MiB by default) and be followed by nothing.
	buf := r.data[:0]
	for int64(len(buf)) < n {
		if len(buf) == cap(buf) {
			nb := make([]byte, len(buf), min(n, max(2*int64(cap(buf)), 1<<20)))
			copy(nb, buf)
			buf = nb
		}
		k := int(min(n-int64(len(buf)), int64(cap(buf)-len(buf))))
		if err := r.read(buf[len(buf):len(buf)+k], "multifd packet payload", false); err != nil {
			return nil, err
		}
		buf = buf[:len(buf)+k]
	}
	r.data = buf
	p.Data = buf
	return p, nil
}

func decodeMultifdDeviceState(p *MultifdPacket, b []byte) error {
	copy(p.Name[:], b[12:268])
	p.InstanceID = binary.BigEndian.Uint32(b[268:])
	p.NextPacketSize = binary.BigEndian.Uint32(b[272:])
	p.PagesAlloc, p.NormalPages, p.ZeroPages, p.PacketNum = 0, 0, 0, 0
	p.Reserved = [28]byte{}
	p.Offsets = [MultifdPageSlots]uint64{}
	return nil
}

// decodeMultifdRAM decodes a full RAM packet header from b and applies QEMU's count checks.
func decodeMultifdRAM(p *MultifdPacket, b []byte, l MultifdLayout, base int64) error {
	p.PagesAlloc = binary.BigEndian.Uint32(b[12:])
	p.NormalPages = binary.BigEndian.Uint32(b[16:])
	p.NextPacketSize = binary.BigEndian.Uint32(b[20:])
	p.PacketNum = binary.BigEndian.Uint64(b[24:])
	p.ZeroPages = binary.BigEndian.Uint32(b[32:])
	copy(p.Reserved[:], b[36:64])
	copy(p.Name[:], b[64:320])
	for i := range p.Offsets {
		p.Offsets[i] = binary.BigEndian.Uint64(b[320+8*i:])
	}
	p.InstanceID = 0
	if p.PagesAlloc > MultifdPageSlots {
		return &Error{Offset: base + 12, Expected: "multifd pages_alloc", Err: fmt.Errorf("%w: %d > %d slots", ErrTooLarge, p.PagesAlloc, MultifdPageSlots)}
	}
	if p.NormalPages > p.PagesAlloc {
		return &Error{Offset: base + 16, Expected: "multifd normal_pages", Err: fmt.Errorf("%w: %d > pages_alloc %d", ErrTooLarge, p.NormalPages, p.PagesAlloc)}
	}
	if l == MultifdV100 && p.ZeroPages > p.PagesAlloc-p.NormalPages {
		return &Error{Offset: base + 32, Expected: "multifd zero_pages", Err: fmt.Errorf("%w: %d > %d", ErrTooLarge, p.ZeroPages, p.PagesAlloc-p.NormalPages)}
	}
	return nil
}

var errMultifdPayload = errors.New("payload length does not match the header")

// AppendMultifdPacket appends the wire form of p in layout l to dst: the header (RAM or, for 10.0,
// device-state) followed by p.Data. It fails if len(p.Data) differs from what a reader would
// consume for this header, since that would desynchronise the channel.
func AppendMultifdPacket(dst []byte, p *MultifdPacket, l MultifdLayout) ([]byte, error) {
	dst, err := appendMultifdHeader(dst, p, l)
	if err != nil {
		return dst, err
	}
	return append(dst, p.Data...), nil
}

// appendMultifdHeader appends only the header of p, after checking len(p.Data).
func appendMultifdHeader(dst []byte, p *MultifdPacket, l MultifdLayout) ([]byte, error) {
	if want := p.payloadLen(l); int64(len(p.Data)) != want {
		return dst, &Error{Expected: "multifd packet payload", Err: fmt.Errorf("%w: have %d bytes, header implies %d", errMultifdPayload, len(p.Data), want)}
	}
	dst = binary.BigEndian.AppendUint32(dst, p.Magic)
	dst = binary.BigEndian.AppendUint32(dst, p.Version)
	dst = binary.BigEndian.AppendUint32(dst, p.Flags)
	if l == MultifdV100 && p.IsDeviceState() {
		dst = append(dst, p.Name[:]...)
		dst = binary.BigEndian.AppendUint32(dst, p.InstanceID)
		return binary.BigEndian.AppendUint32(dst, p.NextPacketSize), nil
	}
	dst = binary.BigEndian.AppendUint32(dst, p.PagesAlloc)
	dst = binary.BigEndian.AppendUint32(dst, p.NormalPages)
	dst = binary.BigEndian.AppendUint32(dst, p.NextPacketSize)
	dst = binary.BigEndian.AppendUint64(dst, p.PacketNum)
	dst = binary.BigEndian.AppendUint32(dst, p.ZeroPages)
	dst = append(dst, p.Reserved[:]...)
	dst = append(dst, p.Name[:]...)
	for _, o := range p.Offsets {
		dst = binary.BigEndian.AppendUint64(dst, o)
	}
	return dst, nil
}

// MultifdWriter writes one multifd channel (§4.1): WriteHello once, then WritePacket per packet.
type MultifdWriter struct {
	w      io.Writer
	layout MultifdLayout
	buf    []byte
	iov    net.Buffers // WritePacket's header and data (BuffersWriter)
	off    int64
}

// NewMultifdWriter returns a writer of channel bytes in the given layout.
func NewMultifdWriter(w io.Writer, layout MultifdLayout) *MultifdWriter {
	return &MultifdWriter{w: w, layout: layout}
}

// Offset returns the number of bytes written so far.
func (w *MultifdWriter) Offset() int64 { return w.off }

func (w *MultifdWriter) write(b []byte) error {
	n, err := w.w.Write(b)
	w.off += int64(n)
	return err
}

// WriteHello writes the 64-byte channel hello.
func (w *MultifdWriter) WriteHello(h *MultifdHello) error {
	w.buf = h.Append(w.buf[:0])
	return w.write(w.buf)
}

// WritePacket writes p (header and Data) in the writer's layout; see AppendMultifdPacket. To a
// BuffersWriter both go in one call (writev), else in two writes.
func (w *MultifdWriter) WritePacket(p *MultifdPacket) error {
	data := p.Data
	var err error
	w.buf, err = appendMultifdHeader(w.buf[:0], p, w.layout)
	if err != nil {
		if e, ok := err.(*Error); ok {
			e.Offset = w.off
		}
		return err
	}
	if bw, ok := w.w.(BuffersWriter); ok && len(data) > 0 {
		w.iov = append(w.iov[:0], w.buf, data)
		v := w.iov
		n, err := bw.WriteBuffers(&v)
		w.off += n
		return err
	}
	if err := w.write(w.buf); err != nil {
		return err
	}
	if len(data) == 0 {
		return nil
	}
	return w.write(data)
}

// BuffersWriter is a writer that takes several slices in one call (writev on a socket) and
// consumes v as net.Buffers.WriteTo does.
type BuffersWriter interface {
	WriteBuffers(v *net.Buffers) (int64, error)
}
