package link

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"
)

// Hello is the first frame of every connection, from the sender (PROTOCOL.md §2.1).
type Hello struct {
	MinVersion, MaxVersion uint16 `json:"-"`

	Role        string    `json:"role"`              // "control" or "data"
	Session     string    `json:"session,omitempty"` // data connections: WELCOME's token
	Index       int       `json:"index,omitempty"`   // data connections: 1…N
	Connections int       `json:"connections,omitempty"`
	Compress    []string  `json:"compress,omitempty"` // codecs the sender may use (Codec names)
	Source      *Endpoint `json:"source,omitempty"`
	Sidecar     string    `json:"sidecar,omitempty"`
	// Features the sender would use if the receiver agrees (e.g. "verify"); unknown ones are
	// ignored.
	Features []string `json:"features,omitempty"`
	// Resume is, on the control connection of a postcopy recovery, the token of the session
	// that broke (PROTOCOL.md §7.2): the receiver takes it only from the same peer.
	Resume string `json:"resume,omitempty"`
}

// Welcome is the receiver's answer to HELLO (PROTOCOL.md §2.1).
type Welcome struct {
	Version uint16 `json:"-"`

	Session     string    `json:"session,omitempty"`
	Connections int       `json:"connections,omitempty"`
	Compress    []string  `json:"compress,omitempty"` // codecs the receiver decodes
	Destination *Endpoint `json:"destination,omitempty"`
	Features    []string  `json:"features,omitempty"` // the sender's features the receiver agreed to
}

// Endpoint describes one end's QEMU in HELLO and WELCOME.
type Endpoint struct {
	QEMU    string `json:"qemu,omitempty"`    // version, e.g. "7.2.22"
	Machine string `json:"machine,omitempty"` // machine type, e.g. "pc-q35-7.2"
	RAM     int64  `json:"ram,omitempty"`     // bytes
	Status  string `json:"status,omitempty"`  // run state
}

// HasFeature reports whether name is listed.
func HasFeature(list []string, name string) bool {
	for _, f := range list {
		if f == name {
			return true
		}
	}
	return false
}

// AppendHello appends HELLO's payload.
func AppendHello(dst []byte, h Hello) ([]byte, error) {
	j, err := json.Marshal(h)
	if err != nil {
		return dst, err
	}
	dst = append(dst, Magic[:]...)
	dst = binary.BigEndian.AppendUint16(dst, h.MinVersion)
	dst = binary.BigEndian.AppendUint16(dst, h.MaxVersion)
	return append(dst, j...), nil
}

// ParseHello decodes HELLO's payload.
func ParseHello(p []byte) (Hello, error) {
	var h Hello
	if len(p) < 8 || !bytes.Equal(p[:4], Magic[:]) {
		return h, errors.New("not a qemu-migrate-go link HELLO (no QMGL magic)")
	}
	h.MinVersion, h.MaxVersion = binary.BigEndian.Uint16(p[4:]), binary.BigEndian.Uint16(p[6:])
	if h.MinVersion > h.MaxVersion {
		return h, fmt.Errorf("HELLO offers versions %d to %d", h.MinVersion, h.MaxVersion)
	}
	if err := json.Unmarshal(p[8:], &h); err != nil {
		return h, fmt.Errorf("HELLO: %w", err)
	}
	switch h.Role {
	case "control":
		if h.Connections < 1 || h.Connections > MaxConnections {
			return h, fmt.Errorf("HELLO asks for %d data connections (1 to %d)", h.Connections, MaxConnections)
		}
	case "data":
		if h.Index < 1 || h.Index > MaxConnections || h.Session == "" {
			return h, fmt.Errorf("data connection HELLO with index %d and session %q", h.Index, h.Session)
		}
	default:
		return h, fmt.Errorf("HELLO with role %q", h.Role)
	}
	return h, nil
}

// MaxConnections bounds --connections (PROTOCOL.md §1).
const MaxConnections = 16

// AppendWelcome appends WELCOME's payload.
func AppendWelcome(dst []byte, w Welcome) ([]byte, error) {
	j, err := json.Marshal(w)
	if err != nil {
		return dst, err
	}
	dst = append(dst, Magic[:]...)
	dst = binary.BigEndian.AppendUint16(dst, w.Version)
	return append(dst, j...), nil
}

// ParseWelcome decodes WELCOME's payload.
func ParseWelcome(p []byte) (Welcome, error) {
	var w Welcome
	if len(p) < 6 || !bytes.Equal(p[:4], Magic[:]) {
		return w, errors.New("not a qemu-migrate-go link WELCOME (no QMGL magic)")
	}
	w.Version = binary.BigEndian.Uint16(p[4:])
	if err := json.Unmarshal(p[6:], &w); err != nil {
		return w, fmt.Errorf("WELCOME: %w", err)
	}
	return w, nil
}

// Ping is PING's payload: a nonce and the sender of the ping's view of the data flow.
type Ping struct {
	Nonce    uint64
	Received uint64 // data bytes received so far (receiver) or 0
	Applied  uint64 // highest data sequence number applied (receiver) or 0
}

func (p Ping) Append(dst []byte) []byte {
	dst = binary.BigEndian.AppendUint64(dst, p.Nonce)
	dst = binary.BigEndian.AppendUint64(dst, p.Received)
	return binary.BigEndian.AppendUint64(dst, p.Applied)
}

// ParsePing decodes PING's payload.
func ParsePing(p []byte) (Ping, error) {
	if len(p) != 24 {
		return Ping{}, fmt.Errorf("PING of %d bytes, want 24", len(p))
	}
	return Ping{binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:]), binary.BigEndian.Uint64(p[16:])}, nil
}

// ErrorCode says what kind of failure an ERROR frame reports (PROTOCOL.md §2.1).
type ErrorCode uint16

const (
	CodeProtocol    ErrorCode = 1 // a bad frame
	CodeRefused     ErrorCode = 2 // the receiver cannot take this migration
	CodeDestination ErrorCode = 3 // the destination QEMU failed
	CodeSource      ErrorCode = 4 // the source failed or the sender gave up
	CodeCancelled   ErrorCode = 5 // a signal
	CodeTimeout     ErrorCode = 6 // a peer or the stream stalled
)

var codeNames = map[ErrorCode]string{CodeProtocol: "protocol", CodeRefused: "refused",
	CodeDestination: "destination", CodeSource: "source", CodeCancelled: "cancelled", CodeTimeout: "timeout"}

func (c ErrorCode) String() string {
	if s, ok := codeNames[c]; ok {
		return s
	}
	return fmt.Sprintf("ErrorCode(%d)", uint16(c))
}

// maxErrorMessage bounds an ERROR's text.
const maxErrorMessage = 4096

// RemoteError is an ERROR frame received from the peer.
type RemoteError struct {
	Code    ErrorCode
	Message string
}

func (e *RemoteError) Error() string { return e.Message }

// AppendError appends ERROR's payload; the message is cut to 4 KiB of valid UTF-8.
func AppendError(dst []byte, code ErrorCode, msg string) []byte {
	if len(msg) > maxErrorMessage {
		msg = msg[:maxErrorMessage]
	}
	msg = string(bytes.ToValidUTF8([]byte(msg), []byte("?")))
	return append(binary.BigEndian.AppendUint16(dst, uint16(code)), msg...)
}

// ParseError decodes ERROR's payload.
func ParseError(p []byte) (*RemoteError, error) {
	if len(p) < 2 || len(p) > 2+maxErrorMessage {
		return nil, fmt.Errorf("ERROR of %d bytes", len(p))
	}
	if !utf8.Valid(p[2:]) {
		return nil, errors.New("ERROR message is not UTF-8")
	}
	return &RemoteError{Code: ErrorCode(binary.BigEndian.Uint16(p)), Message: string(p[2:])}, nil
}

// Delivered is DELIVERED's and STATUS's JSON (PROTOCOL.md §2.1, §5).
type Delivered struct {
	// State: in DELIVERED "delivered"; in STATUS the destination's run state ("running",
	// "paused") or "failed".
	State   string `json:"state"`
	Message string `json:"message,omitempty"`
	// Bytes written to the destination QEMU, and the receiver's view of the downtime's tail.
	BytesOut int64 `json:"bytes_out,omitempty"`
	// DeliveredMs: from the receiver's READY until the destination had the stream.
	DeliveredMs int64 `json:"delivered_ms,omitempty"`
}

// AppendJSON appends v as JSON.
func AppendJSON(dst []byte, v any) ([]byte, error) {
	j, err := json.Marshal(v)
	return append(dst, j...), err
}

// FeatureVerify is the HELLO/WELCOME feature of --verify (PROTOCOL.md §5.1).
const FeatureVerify = "verify"

// FeaturePostcopy is the postcopy feature (PROTOCOL.md §7): the destination's return path
// (RETURN), every postcopy command, PACKAGED, and recovery of a broken link.
const FeaturePostcopy = "postcopy"

// MaxReturnChunk is the most return-path bytes one RETURN frame carries.
const MaxReturnChunk = 60 << 10

// Verify is VERIFY's JSON: the seed of this check's hashes (drawn by the sender) and how to read.
type Verify struct {
	Seed uint64 `json:"seed,string"`
	// Methods is the sender's --verify-method order, which the receiver follows too (names it
	// does not know are ignored); empty: the receiver's default.
	Methods []string `json:"methods,omitempty"`
}

// Verdict is VERDICT's JSON: the sender's comparison of the two hash lists.
type Verdict struct {
	Equal   bool            `json:"equal"`
	Message string          `json:"message"`           // what differs, or "all N pages … are equal"
	Summary json.RawMessage `json:"summary,omitempty"` // the sender's verify summary (events.schema.json $defs.verify)
}

// MaxHashChunk is the largest HASHES payload (a control frame).
const MaxHashChunk = 60 << 10
