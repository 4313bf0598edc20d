// Package link is the sidecar-to-sidecar protocol (PROTOCOL.md beside this file): frames,
// version negotiation, mutual TLS, page batch codecs and the connection pool that carry one
// migration from a sending sidecar to a receiving one.
package link

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// ProtocolVersion is the link protocol version this code speaks (PROTOCOL.md §6). Version 1 is
// the first: frames of §2, page data of §3, completion of §5.
const (
	ProtocolVersion    = 1
	MinProtocolVersion = 1
)

// Magic opens the payload of HELLO and WELCOME (PROTOCOL.md §2.1).
var Magic = [4]byte{'Q', 'M', 'G', 'L'}

// FrameType is the first byte of every frame (PROTOCOL.md §2).
type FrameType uint8

// Control frames (PROTOCOL.md §2.1).
const (
	FrameHello     FrameType = 0x01
	FrameWelcome   FrameType = 0x02
	FramePing      FrameType = 0x03
	FramePong      FrameType = 0x04
	FrameError     FrameType = 0x05
	FrameReady     FrameType = 0x06
	FrameCommit    FrameType = 0x07
	FrameDelivered FrameType = 0x08
	FrameStatus    FrameType = 0x09
	// --verify (feature "verify", PROTOCOL.md §5.1): only after both sides agreed in HELLO and
	// WELCOME.
	FrameVerify  FrameType = 0x0a // sender → receiver: hash the destination with this seed
	FrameHashes  FrameType = 0x0b // receiver → sender: a chunk of its hash list; empty = the end
	FrameVerdict FrameType = 0x0c // sender → receiver: equal or not, and why
	// Postcopy (feature "postcopy", PROTOCOL.md §7): the destination's return path, as bytes.
	FrameReturn FrameType = 0x0d // receiver → sender: return-path bytes; empty = it closed
	FrameUrgent FrameType = 0x0e // sender → receiver: a page the destination asked for, ahead of the data
)

// Data frames (PROTOCOL.md §2.2); every payload starts with be64 seq.
const (
	FrameBegin      FrameType = 0x10
	FrameSection    FrameType = 0x11
	FrameMemSize    FrameType = 0x12
	FramePages      FrameType = 0x13
	FrameSectionEnd FrameType = 0x14
	FrameCommand    FrameType = 0x15
	FrameDevice     FrameType = 0x16
	FrameEnd        FrameType = 0x17
	// FramePackaged carries a PACKAGED command's nested stream (feature "postcopy", §7).
	FramePackaged FrameType = 0x18
)

var frameNames = map[FrameType]string{
	FrameHello: "HELLO", FrameWelcome: "WELCOME", FramePing: "PING", FramePong: "PONG",
	FrameError: "ERROR", FrameReady: "READY", FrameCommit: "COMMIT", FrameDelivered: "DELIVERED",
	FrameStatus: "STATUS", FrameVerify: "VERIFY", FrameHashes: "HASHES", FrameVerdict: "VERDICT", FrameReturn: "RETURN", FrameUrgent: "URGENT", FrameBegin: "BEGIN", FrameSection: "SECTION", FrameMemSize: "MEMSIZE",
	FramePages: "PAGES", FrameSectionEnd: "SECTION_END", FrameCommand: "COMMAND",
	FrameDevice: "DEVICE", FrameEnd: "END", FramePackaged: "PACKAGED",
}

func (t FrameType) String() string {
	if s, ok := frameNames[t]; ok {
		return s
	}
	return "FrameType(0x" + strconv.FormatUint(uint64(t), 16) + ")"
}

// Known reports whether t is a frame type of this protocol version.
func (t FrameType) Known() bool { _, ok := frameNames[t]; return ok }

// IsData reports whether t is a data frame: it carries a sequence number and is applied in
// sequence order (PROTOCOL.md §2.2).
func (t FrameType) IsData() bool { return t >= FrameBegin && t <= FramePackaged }

// Payload limits (PROTOCOL.md §2).
const (
	HeaderSize        = 5        // u8 type, be32 length
	MaxControlPayload = 64 << 10 // any control frame
	MaxPayload        = 2 << 20  // any data frame but END
	// MaxEndPayload: END carries the whole vmdesc, which QEMU may make up to 16 MiB (the
	// stream Reader's default limit).
	MaxEndPayload = 16<<20 + 9
	// MaxPackagedPayload: PACKAGED carries the nested stream of QEMU's PACKAGED command, at
	// most 16 MiB (QEMU's MAX_VM_CMD_PACKAGED_SIZE, stream-format.md §3).
	MaxPackagedPayload = 16<<20 + 8
)

// MaxPayloadOf is the largest payload a frame of type t may have.
func MaxPayloadOf(t FrameType) int {
	switch {
	case t == FrameEnd:
		return MaxEndPayload
	case t == FramePackaged:
		return MaxPackagedPayload
	case t.IsData():
		return MaxPayload
	}
	return MaxControlPayload
}

// ErrFrameTooLarge is wrapped by a ProtocolError for a length over the type's maximum.
var ErrFrameTooLarge = errors.New("frame larger than the protocol allows")

// errUnknownType and errPeerTLS are wrapped by a ProtocolError for a frame header that is not
// one of this protocol's; with ErrFrameTooLarge they tell a frame the peer got wrong from a
// connection that failed (badFrame).
var (
	errUnknownType = errors.New("unknown frame type")
	errPeerTLS     = errors.New("the peer speaks TLS (a TLS handshake record) but this side has --no-tls: start both sides with TLS or both with --no-tls")
)

// badFrame reports whether a ReadFrame error is about what the peer sent (a header this side
// refuses), rather than the connection failing under it.
func badFrame(err error) bool {
	return errors.Is(err, ErrFrameTooLarge) || errors.Is(err, errUnknownType) || errors.Is(err, errPeerTLS)
}

// ProtocolError is a bad frame read from a connection: where (the connection's name and the byte
// offset of the frame's first byte on it), which frame, and why.
type ProtocolError struct {
	Conn   string    // "control", "data 2", …
	Offset int64     // offset of the frame's type byte on that connection
	Type   FrameType // 0 when the header itself could not be read
	Err    error
}

func (e *ProtocolError) Error() string {
	what := "frame header"
	if e.Type != 0 {
		what = e.Type.String() + " frame"
	}
	return fmt.Sprintf("link: %s connection, offset %d: %s: %v", e.Conn, e.Offset, what, e.Err)
}

func (e *ProtocolError) Unwrap() error { return e.Err }

// Frame is one frame as read: Payload aliases the Framer's buffer and is valid until the next
// ReadFrame.
type Frame struct {
	Type    FrameType
	Payload []byte
	Offset  int64 // offset of the type byte on its connection
}

// Seq returns a data frame's sequence number (0 for a control frame or a short payload).
func (f Frame) Seq() uint64 {
	if !f.Type.IsData() || len(f.Payload) < 8 {
		return 0
	}
	return binary.BigEndian.Uint64(f.Payload)
}

// Framer reads and writes frames on one connection. The length of every frame is checked
// against its type's maximum before its payload is read, so a peer cannot make it allocate more
// than MaxPayload. Read errors are sticky. A Framer is used by one reader and one writer
// goroutine at most.
type Framer struct {
	name string
	r    io.Reader
	w    io.Writer

	roff int64
	buf  []byte
	rerr error
	hdr  [HeaderSize]byte
	woff int64
}

// NewFramer returns a Framer for a connection called name in errors.
func NewFramer(name string, r io.Reader, w io.Writer) *Framer {
	return &Framer{name: name, r: r, w: w}
}

// ReadFrame reads the next frame. Unknown types and oversized lengths are errors (*ProtocolError).
func (fr *Framer) ReadFrame() (Frame, error) {
	if fr.rerr != nil {
		return Frame{}, fr.rerr
	}
	off := fr.roff
	fail := func(t FrameType, err error) (Frame, error) {
		fr.rerr = &ProtocolError{Conn: fr.name, Offset: off, Type: t, Err: err}
		return Frame{}, fr.rerr
	}
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		if err == io.EOF {
			fr.rerr = io.EOF // a clean end between frames
			return Frame{}, io.EOF
		}
		return fail(0, err)
	}
	t := FrameType(fr.hdr[0])
	n := binary.BigEndian.Uint32(fr.hdr[1:])
	if fr.hdr[0] == 0x16 && fr.hdr[1] == 0x03 {
		// A TLS handshake record (0x16, version 0x03xx). No frame can start so: 0x16 is DEVICE,
		// whose length would then be at least 48 MiB, over MaxPayload (PROTOCOL.md §1).
		return fail(0, errPeerTLS)
	}
	if !t.Known() {
		return fail(0, fmt.Errorf("%w 0x%02x (length %d)", errUnknownType, fr.hdr[0], n))
	}
	if max := MaxPayloadOf(t); n > uint32(max) {
		return fail(t, fmt.Errorf("%w: %d > %d", ErrFrameTooLarge, n, max))
	}
	if cap(fr.buf) < int(n) {
		fr.buf = make([]byte, n, max(int(n), 64<<10))
	}
	fr.buf = fr.buf[:n]
	if _, err := io.ReadFull(fr.r, fr.buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fail(t, err)
	}
	fr.roff += HeaderSize + int64(n)
	return Frame{Type: t, Payload: fr.buf, Offset: off}, nil
}

// ReadOffset is the number of bytes read so far.
func (fr *Framer) ReadOffset() int64 { return fr.roff }

// WriteFrame writes one frame (header and payload in one Write when it fits in buf).
func (fr *Framer) WriteFrame(t FrameType, payload []byte) error {
	if len(payload) > MaxPayloadOf(t) {
		return fmt.Errorf("link: %s frame of %d bytes: %w", t, len(payload), ErrFrameTooLarge)
	}
	var b []byte
	if len(payload) <= 512 {
		var small [HeaderSize + 512]byte
		b = AppendHeader(small[:0], t, len(payload))
		b = append(b, payload...)
		_, err := fr.w.Write(b)
		fr.woff += int64(len(b))
		return err
	}
	h := AppendHeader(fr.hdr[:0:HeaderSize], t, len(payload))
	if _, err := fr.w.Write(h); err != nil {
		return err
	}
	_, err := fr.w.Write(payload)
	fr.woff += int64(len(h) + len(payload))
	return err
}

// WriteEncoded writes a frame already encoded with its header (AppendHeader + payload).
func (fr *Framer) WriteEncoded(b []byte) error {
	_, err := fr.w.Write(b)
	fr.woff += int64(len(b))
	return err
}

// WriteOffset is the number of bytes written so far.
func (fr *Framer) WriteOffset() int64 { return fr.woff }

// AppendHeader appends a frame header for a payload of n bytes.
func AppendHeader(dst []byte, t FrameType, n int) []byte {
	return binary.BigEndian.AppendUint32(append(dst, byte(t)), uint32(n))
}

// SetHeaderLength rewrites the length of the frame whose header starts at b[0], for frames
// encoded in place (the payload appended after a provisional header).
func SetHeaderLength(b []byte) {
	binary.BigEndian.PutUint32(b[1:], uint32(len(b)-HeaderSize))
}
