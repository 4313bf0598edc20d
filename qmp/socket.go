package qmp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	gqmp "github.com/digitalocean/go-qemu/qmp"
)

// socketMonitor is a go-qemu Monitor on a QMP socket, used instead of go-qemu's own
// SocketMonitor, which has two bugs that matter to a migration tool (both open upstream):
//
//   - its reader hands out bufio.Scanner's internal buffer as the reply (go-qemu issue 226): the
//     next line read — a MIGRATION event, frequent while migrating — can overwrite a reply
//     before the caller has decoded it, so query-migrate could be read as some other answer;
//   - its handshake takes whatever line follows qmp_capabilities as the answer (go-qemu pull
//     request 210), so an event sent in between shifts every later reply by one, and its JSON
//     decoder's read-ahead is lost when the reader starts.
//
// Here every line is copied before it leaves the reader, the handshake skips events (keeping
// them), one reader owns the connection from the first byte, and a line is bounded
// (maxLineSize) so a broken monitor cannot make the sidecar allocate without limit.
type socketMonitor struct {
	conn    net.Conn
	timeout time.Duration // for the handshake

	mu      sync.Mutex // one command at a time: QMP answers in order
	replies chan reply
	events  chan gqmp.Event
	done    chan struct{} // closed when the reader ends
	err     error         // why the reader ended (valid after done)
	early   []gqmp.Event  // events that came during the handshake
}

type reply struct {
	raw []byte
	err error
}

// maxLineSize bounds one QMP line (query-qmp-schema, the largest reply, is about 200 KiB).
const maxLineSize = 16 << 20

// newSocketMonitor connects to a QMP socket; Connect does the handshake.
func newSocketMonitor(network, addr string, timeout time.Duration) (*socketMonitor, error) {
	c, err := net.DialTimeout(network, addr, timeout)
	if err != nil {
		return nil, err
	}
	return &socketMonitor{conn: c, timeout: timeout}, nil
}

// Connect reads the greeting, negotiates capabilities and starts the reader.
func (m *socketMonitor) Connect() error {
	if m.timeout > 0 {
		m.conn.SetDeadline(time.Now().Add(m.timeout))
	}
	br := bufio.NewReaderSize(m.conn, 64<<10)
	if err := readGreeting(br); err != nil {
		return err
	}
	if _, err := m.conn.Write([]byte(`{"execute":"qmp_capabilities","id":"` + capsID + `"}` + "\n")); err != nil {
		return err
	}
	for stale := 0; ; {
		line, err := readLine(br)
		if err != nil {
			return fmt.Errorf("waiting for the qmp_capabilities reply: %w", err)
		}
		if ev, ok := parseEvent(line); ok {
			m.early = append(m.early, ev)
			continue
		}
		var r struct {
			ID json.RawMessage `json:"id"`
		}
		if json.Unmarshal(line, &r) == nil && string(r.ID) != `"`+capsID+`"` && stale < maxStaleLines {
			stale++
			continue // a reply for the previous client, sent after the greeting
		}
		if err := replyError(line); err != nil {
			return err
		}
		break
	}
	m.conn.SetDeadline(time.Time{})
	m.replies = make(chan reply, 1)
	m.events = make(chan gqmp.Event, 16)
	m.done = make(chan struct{})
	go m.read(br)
	return nil
}

// maxStaleLines bounds the replies and events skipped before the greeting, and the replies
// skipped before qmp_capabilities' own.
const maxStaleLines = 16

// capsID tags the handshake's qmp_capabilities so that its reply, which QEMU returns with the
// same id, is told apart from a previous client's late reply (see readGreeting).
const capsID = "qmg-caps"

// readGreeting reads up to the QMP greeting. QEMU can send a reply meant for the previous
// client first: its monitor writes replies from the main thread but runs the connection, and
// the greeting, on its own I/O thread, and it keeps unsent output across a reconnect. A client
// that gave up on a command (its context was cancelled, so it closed the connection) and
// reconnects at once — the sidecar restoring the source after an interrupt — then reads that
// command's reply before the greeting (or after it: Connect matches qmp_capabilities' reply by
// its id). Such lines, and events, are skipped (at most maxStaleLines); anything else is not a
// QMP monitor.
func readGreeting(br *bufio.Reader) error {
	for i := 0; ; i++ {
		line, err := readLine(br)
		if err != nil {
			return fmt.Errorf("reading the greeting: %w", err)
		}
		var first struct {
			QMP    *json.RawMessage `json:"QMP"`
			Return *json.RawMessage `json:"return"`
			Error  *json.RawMessage `json:"error"`
			Event  string           `json:"event"`
		}
		if err := json.Unmarshal(line, &first); err != nil {
			return fmt.Errorf("not a QMP greeting: %.100q", line)
		}
		switch {
		case first.QMP != nil:
			return nil
		case (first.Return != nil || first.Error != nil || first.Event != "") && i < maxStaleLines:
			continue // the previous client's reply, or an event, sent before the greeting
		default:
			return fmt.Errorf("not a QMP greeting: %.100q", line)
		}
	}
}

// read delivers replies and events until the connection ends.
func (m *socketMonitor) read(br *bufio.Reader) {
	defer close(m.done)
	defer close(m.events)
	for _, ev := range m.early {
		m.events <- ev
	}
	for {
		line, err := readLine(br)
		if err != nil {
			m.err = err
			return
		}
		if ev, ok := parseEvent(line); ok {
			m.events <- ev // Client.pump never blocks on its side
			continue
		}
		select {
		case m.replies <- reply{raw: line}:
		default:
			// A reply nobody asked for (its command's caller gave up and closed the
			// connection): drop it rather than hand it to the next command.
		}
	}
}

// readLine returns the next line as a fresh copy, without its newline.
func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, err := br.ReadSlice('\n')
		if len(line)+len(chunk) > maxLineSize {
			return nil, fmt.Errorf("a QMP line longer than %d bytes", maxLineSize)
		}
		line = append(line, chunk...)
		if err == bufio.ErrBufferFull {
			continue
		}
		if err != nil {
			return nil, err
		}
		line = bytes.TrimRight(line, "\r\n")
		if len(bytes.TrimSpace(line)) == 0 {
			line = line[:0]
			continue
		}
		return line, nil
	}
}

// parseEvent reports whether line is an event, and decodes it.
func parseEvent(line []byte) (gqmp.Event, bool) {
	var ev gqmp.Event
	if json.Unmarshal(line, &ev) != nil || ev.Event == "" {
		return ev, false
	}
	return ev, true
}

// replyError returns QEMU's error in a reply as go-qemu does (a plain error with its desc).
func replyError(line []byte) error {
	var r struct {
		Error *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal(line, &r); err != nil {
		return err // a *json.SyntaxError (or *json.UnmarshalTypeError): not QEMU's answer
	}
	if r.Error != nil {
		return errors.New(r.Error.Desc)
	}
	return nil
}

// Run sends one command and returns its reply line.
func (m *socketMonitor) Run(command []byte) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, err := m.conn.Write(append(command, '\n')); err != nil {
		return nil, &transportError{err}
	}
	select {
	case r := <-m.replies:
		if err := replyError(r.raw); err != nil {
			return nil, err
		}
		return r.raw, nil
	case <-m.done:
		select {
		case r := <-m.replies:
			if err := replyError(r.raw); err != nil {
				return nil, err
			}
			return r.raw, nil
		default:
		}
		if m.err != nil {
			return nil, &transportError{m.err}
		}
		return nil, net.ErrClosed
	}
}

// Events returns the event channel (one consumer: Client.pump).
func (m *socketMonitor) Events(context.Context) (<-chan gqmp.Event, error) { return m.events, nil }

// Disconnect closes the connection; the reader ends.
func (m *socketMonitor) Disconnect() error { return m.conn.Close() }
