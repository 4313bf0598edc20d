package savevm

import (
	"encoding/binary"
	"fmt"
	"io"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// returnPath is the source QEMU's return path as the sidecar serves it: the sidecar is the
// source's destination, so it answers OPEN_RETURN_PATH and PING itself (stream-format.md §3)
// and sends SHUT only once the real destination has the complete stream. With the capability
// return-path on (Hold sets it), the source completes its migration only after that SHUT; if
// the sidecar dies or gives up first, the return path breaks, the source QEMU fails the
// migration and resumes the guest by itself (QEMU's migration_completion: a return-path error
// fails the completion, and a failed migration restarts a VM that was running). So the source
// VM is never left stopped by a sidecar that disappeared.
type returnPath struct {
	w    io.Writer // the source's connection; nil when there is no live source (restore)
	open bool      // the source sent OPEN_RETURN_PATH
	// bridge: postcopy — the destination's own return path is bridged to the source
	// (postcopy.go), so commands go on; after the switch the destination's SHUT goes to the
	// source (postcopyOn), before it the sidecar sends its own.
	bridge     bool
	postcopyOn func() bool
}

// Return-path message types (stream-format.md §3, "Return path").
const (
	rpShut uint16 = 1
	rpPong uint16 = 2
)

// command handles the commands that belong to the return path between the source and the
// sidecar; it reports whether rec was consumed (not to be forwarded).
func (p *returnPath) command(rec *stream.Record) bool {
	if p.w == nil || rec.Depth != 0 {
		return false
	}
	if p.bridge {
		if rec.Cmd == stream.CmdOpenReturnPath {
			p.open = true
		}
		return false
	}
	switch rec.Cmd {
	case stream.CmdOpenReturnPath:
		p.open = true
		return true
	case stream.CmdPing:
		if p.open && len(rec.Payload) == 4 {
			p.send(rpPong, rec.Payload) // the source counts PONGs (postcopy waits for them)
		}
		return p.open
	}
	return false
}

// shut tells the source that the destination has everything: SHUT with status 0.
func (p *returnPath) shut() error {
	if p.w == nil || !p.open || (p.bridge && p.postcopyOn()) {
		return nil
	}
	return p.send(rpShut, []byte{0, 0, 0, 0})
}

func (p *returnPath) send(typ uint16, payload []byte) error {
	b := binary.BigEndian.AppendUint16(nil, typ)
	b = binary.BigEndian.AppendUint16(b, uint16(len(payload)))
	if _, err := p.w.Write(append(b, payload...)); err != nil {
		return fmt.Errorf("source return path: %w", err)
	}
	return nil
}
