package stream

import (
	"errors"
	"fmt"
)

// ErrTooLarge is wrapped by every *Error caused by a length read from the wire that exceeds the
// configured Limits; test with errors.Is.
var ErrTooLarge = errors.New("length exceeds limit")

// ErrUnexpectedEOF is wrapped by every *Error caused by the input ending inside a record.
var ErrUnexpectedEOF = errors.New("unexpected end of stream")

// Error is the single error type of this package. It says where in the stream decoding failed
// (absolute byte offset of the start of the item that could not be read), in which section, and
// what was expected, so that an operator can find the bad bytes with a hex dump.
type Error struct {
	Offset    int64  // absolute offset in the stream of the item being read
	SectionID uint32 // id of the section being read (valid when Idstr != "" or InSection)
	Idstr     string // idstr of the section being read, "" outside sections or when unknown
	InSection bool   // true when the error happened inside a section body
	Expected  string // what the decoder expected at Offset, e.g. "ram record flags"
	Err       error  // the cause; may wrap ErrTooLarge or ErrUnexpectedEOF
}

func (e *Error) Error() string {
	where := fmt.Sprintf("offset %d (0x%x)", e.Offset, e.Offset)
	if e.InSection || e.Idstr != "" {
		where += fmt.Sprintf(", section %q id %d", e.Idstr, e.SectionID)
	}
	if e.Err != nil {
		return fmt.Sprintf("stream: %s: reading %s: %v", where, e.Expected, e.Err)
	}
	return fmt.Sprintf("stream: %s: reading %s", where, e.Expected)
}

func (e *Error) Unwrap() error { return e.Err }
