// Package qmp is the sidecar's QMP client: a small typed layer over go-qemu's qmp.Monitor that adds
// what go-qemu lacks — a deadline on every call, non-blocking event delivery, and structs tolerant
// of enum values this code does not know (go-qemu's generated raw package fails on newer QEMU).
package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	gqmp "github.com/digitalocean/go-qemu/qmp"
)

// DefaultTimeout bounds a call whose context has no deadline of its own.
const DefaultTimeout = 30 * time.Second

// ErrClosed is returned by calls on a client whose monitor connection has been closed, either by
// Close or because an earlier call ran past its deadline (a reply that never came leaves the
// connection unusable: later replies could no longer be matched to their commands).
var ErrClosed = errors.New("qmp: monitor connection closed")

// Event is one asynchronous QMP event.
type Event struct {
	Name string         // e.g. "MIGRATION", "STOP"
	Data map[string]any // the event's "data" member
	Time time.Time      // QEMU's timestamp
}

// CommandError is QEMU's error reply to a command.
type CommandError struct {
	Command string
	Desc    string
}

func (e *CommandError) Error() string { return fmt.Sprintf("qmp: %s: %s", e.Command, e.Desc) }

// Client runs QMP commands on one monitor. It is safe for concurrent use; commands run one at a
// time (QMP answers in order).
type Client struct {
	mon gqmp.Monitor

	mu     sync.Mutex
	closed bool
	subs   map[int]chan Event
	nextID int
	done   chan struct{}
}

// DialUnix connects to a QMP unix socket (QEMU's `-qmp unix:PATH,server=on,wait=off`) and
// completes the capabilities handshake before ctx's deadline.
func DialUnix(ctx context.Context, path string) (*Client, error) {
	ctx, cancel := withDefault(ctx)
	defer cancel()
	timeout := time.Until(deadline(ctx))
	mon, err := newSocketMonitor("unix", path, timeout)
	if err != nil {
		return nil, fmt.Errorf("qmp: connect %s: %w", path, err)
	}
	return New(ctx, mon)
}

// New completes the handshake on mon (any go-qemu Monitor: socket, or libvirt RPC) before ctx's
// deadline and starts delivering its events.
func New(ctx context.Context, mon gqmp.Monitor) (*Client, error) {
	ctx, cancel := withDefault(ctx)
	defer cancel()
	connected := make(chan error, 1)
	go func() { connected <- mon.Connect() }()
	select {
	case err := <-connected:
		if err != nil {
			mon.Disconnect()
			return nil, fmt.Errorf("qmp: handshake: %w", err)
		}
	case <-ctx.Done():
		mon.Disconnect()
		<-connected
		return nil, fmt.Errorf("qmp: handshake: no answer from the monitor: %w", ctx.Err())
	}
	c := &Client{mon: mon, subs: map[int]chan Event{}, done: make(chan struct{})}
	events, err := mon.Events(context.Background())
	if err != nil && !errors.Is(err, gqmp.ErrEventsNotSupported) {
		mon.Disconnect()
		return nil, fmt.Errorf("qmp: events: %w", err)
	}
	go c.pump(events)
	return c, nil
}

// pump moves events from the monitor to the subscribers without ever blocking: go-qemu's socket
// monitor delivers events and replies from one goroutine, so a stalled event reader would stall
// every command too. A subscriber that falls behind by more than its buffer loses events.
func (c *Client) pump(events <-chan gqmp.Event) {
	defer close(c.done)
	if events == nil {
		return
	}
	for e := range events {
		ev := Event{Name: e.Event, Data: e.Data,
			Time: time.Unix(e.Timestamp.Seconds, e.Timestamp.Microseconds*1000)}
		c.mu.Lock()
		for _, ch := range c.subs {
			select {
			case ch <- ev:
			default:
			}
		}
		c.mu.Unlock()
	}
}

// Subscribe returns a channel that receives every event from now on (buffered; a reader that
// falls more than 256 events behind loses the excess) and a function that ends the subscription.
func (c *Client) Subscribe() (<-chan Event, func()) {
	ch := make(chan Event, 256)
	c.mu.Lock()
	id := c.nextID
	c.nextID++
	c.subs[id] = ch
	c.mu.Unlock()
	return ch, func() {
		c.mu.Lock()
		delete(c.subs, id)
		c.mu.Unlock()
	}
}

// Close closes the monitor connection. It is safe to call more than once.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	return c.mon.Disconnect()
}

// Execute runs command with args (nil for none) and decodes its "return" member into out (nil to
// discard). It gives up when ctx ends (or after DefaultTimeout when ctx has no deadline); the
// connection is then closed, since the late reply could be taken for the next command's.
func (c *Client) Execute(ctx context.Context, command string, args, out any) error {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return ErrClosed
	}
	req, err := json.Marshal(gqmp.Command{Execute: command, Args: args})
	if err != nil {
		return fmt.Errorf("qmp: %s: encoding arguments: %w", command, err)
	}
	ctx, cancel := withDefault(ctx)
	defer cancel()
	type result struct {
		raw []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		raw, err := c.mon.Run(req)
		done <- result{raw, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-ctx.Done():
		c.Close()
		return fmt.Errorf("qmp: %s: no reply: %w (monitor connection closed)", command, ctx.Err())
	}
	if res.err != nil {
		if isTransport(res.err) {
			return fmt.Errorf("qmp: %s: %w", command, res.err)
		}
		return &CommandError{Command: command, Desc: res.err.Error()}
	}
	if out == nil {
		return nil
	}
	var reply struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(res.raw, &reply); err != nil {
		return fmt.Errorf("qmp: %s: bad reply %.200q: %w", command, res.raw, err)
	}
	if err := json.Unmarshal(reply.Return, out); err != nil {
		return fmt.Errorf("qmp: %s: bad return value %.200q: %w", command, reply.Return, err)
	}
	return nil
}

// isTransport tells an I/O failure of the monitor connection from QEMU's own error reply, which
// go-qemu returns as a plain errors.New(desc).
func isTransport(err error) bool {
	var netErr net.Error
	var syntax *json.SyntaxError
	var lv *transportError
	return errors.As(err, &netErr) || errors.As(err, &syntax) || errors.As(err, &lv) || errors.Is(err, io.EOF) ||
		errors.Is(err, net.ErrClosed)
}

func withDefault(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, DefaultTimeout)
}

func deadline(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}
