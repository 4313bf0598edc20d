package link

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"

	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// Config configures one end of a link.
type Config struct {
	// TLS is the side's TLS configuration (ClientTLS, ServerTLS); nil means plain text, which
	// both sides must ask for (--no-tls).
	TLS *tls.Config
	// Timeout: a peer silent this long on the control connection is dead (default 5 s). Each
	// side sends PING every second.
	Timeout time.Duration
	// HandshakeTimeout bounds each connection's set-up: TCP, TLS, HELLO and its answer
	// (default 30 s).
	HandshakeTimeout time.Duration
	// Bandwidth caps the sender's data connections together, bytes/s; 0 = none.
	Bandwidth int64
	// Window is how many bytes of buffers (own's size classes, not payload bytes) early data
	// frames may take while the receiver waits for an earlier one (default 16 MiB); a frame
	// beyond it waits on its connection.
	Window int
	// QueueFrames is how many encoded data frames the sender queues for its connections
	// (default 8).
	QueueFrames int
}

func (c Config) withDefaults() Config {
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = 30 * time.Second
	}
	if c.Window <= 0 {
		c.Window = 16 << 20
	}
	if c.QueueFrames <= 0 {
		c.QueueFrames = 8
	}
	return c
}

// ErrTimeout is wrapped when a peer stayed silent past Config.Timeout: it is dead, or the link.
var ErrTimeout = errors.New("link timeout")

// ErrStalled is wrapped when NextData's deadline passed while the peer is alive: the stream
// itself stalled.
var ErrStalled = errors.New("link stalled")

var errEOF = io.EOF

// conn is one TCP (or TLS) connection of a link.
type conn struct {
	name string
	nc   net.Conn
	fr   *Framer
	cert []byte // the peer's leaf certificate (TLS), for "the same peer" checks
}

// Session is an established link: the control connection and the data connections, with the
// heartbeat running. The sender sends data frames with SendData; the receiver reads them in
// sequence order with NextData. Either side sends and receives control frames (SendControl,
// Control). Any error ends the whole session (Done, Err).
type Session struct {
	cfg  Config
	side string // "sender" or "receiver"
	ctl  *conn
	data []*conn

	// Hello and Welcome are what the two sides agreed (the control connection's).
	Hello   Hello
	Welcome Welcome

	ctlMu   sync.Mutex // one control frame at a time
	control chan Frame
	done    chan struct{}
	once    sync.Once
	errMu   sync.Mutex
	err     error
	wg      sync.WaitGroup

	// ctx ends with the session: waits that must not outlive it (the bandwidth limiter) use it.
	ctx    context.Context
	cancel context.CancelFunc

	// The destination's return path (feature "postcopy"): RETURN payloads as they arrived, and
	// what ReadReturn has not yet given out of the current one.
	returns chan []byte
	// urgent holds the URGENT frames (receiver, feature postcopy) not yet taken by NextFrame,
	// under rmu.
	urgent     []Frame
	urgentSent atomic.Uint64 // sender: URGENT frames written
	retMu      sync.Mutex
	retBuf     []byte
	retEOF     bool

	lastHeard atomic.Int64             // unix ns of the last control frame from the peer
	received  atomic.Int64             // data bytes read
	sent      atomic.Int64             // data bytes written
	peer      atomic.Pointer[peerPing] // the peer's latest PING; only the control reader stores it

	// Sender.
	out     chan []byte
	lim     *rate.Limiter
	release func([]byte)
	lastSeq uint64
	ledger  ledger // bytes queued up to each recent sequence number

	// Receiver: the reorder window.
	rmu     sync.Mutex
	rcond   *sync.Cond
	pending map[uint64]Frame
	next    uint64
	held    int
	applied atomic.Uint64
	pool    [numBufClasses]sync.Pool // own's buffers, by size class
}

func newSession(cfg Config, side string) *Session {
	s := &Session{cfg: cfg.withDefaults(), side: side, control: make(chan Frame, 16), done: make(chan struct{}),
		returns: make(chan []byte, 256)}
	s.rcond = sync.NewCond(&s.rmu)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.lastHeard.Store(time.Now().UnixNano())
	return s
}

// Done is closed when the session has ended (error, Abort or Close).
func (s *Session) Done() <-chan struct{} { return s.done }

// Err is why the session ended (nil while it runs, or after Close).
func (s *Session) Err() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.err
}

// fail ends the session with err (the first error wins) and closes every connection, which
// unblocks every reader and writer.
func (s *Session) fail(err error) {
	s.once.Do(func() {
		s.setErr(err)
		close(s.done)
		s.cancel()
		s.closeConns(false)
		s.rmu.Lock()
		s.rcond.Broadcast()
		s.rmu.Unlock()
	})
}

func (s *Session) closeConns(graceful bool) {
	for _, c := range append([]*conn{s.ctl}, s.data...) {
		if c == nil {
			continue
		}
		if tc, ok := c.nc.(*net.TCPConn); ok && !graceful {
			tc.SetLinger(0)
		}
		c.nc.Close()
	}
}

// setErr records why the session ends, unless a reason was recorded first.
func (s *Session) setErr(err error) {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	if s.err == nil {
		s.err = err
	}
}

// ErrClosed is returned by SendData and Drain after Close.
var ErrClosed = errors.New("link: the session is closed")

// ended is the error of an operation on a session that has ended.
func (s *Session) ended() error {
	if err := s.Err(); err != nil {
		return err
	}
	return ErrClosed
}

// refuse ends the session for a frame the peer should not have sent, and tells the peer which
// (PROTOCOL.md §2: an ERROR naming the connection, the offset and the frame type).
func (s *Session) refuse(err error) {
	select {
	case <-s.done:
		return
	default:
	}
	s.setErr(err)
	s.writeControl(FrameError, AppendError(nil, CodeProtocol, err.Error()), 2*time.Second)
	s.fail(err)
}

// prefixed makes sure an error of this package says "link:" once.
func prefixed(err error) error {
	if strings.HasPrefix(err.Error(), "link: ") {
		return err
	}
	return fmt.Errorf("link: %w", err)
}

// failSoon ends the session with err unless the control connection explains the failure
// first: a peer that gives up sends ERROR on the control connection and then closes every
// connection, and its data connections may close here before the ERROR is read. The control
// connection closes too, first, so its reader ends the session at once with the ERROR or the
// close; only a data connection that broke alone waits the link timeout (as a dead peer would).
func (s *Session) failSoon(err error) {
	t := time.NewTimer(s.cfg.Timeout)
	defer t.Stop()
	select {
	case <-s.done:
	case <-t.C:
		s.fail(err)
	}
}

// Abort tells the peer why (an ERROR frame, bounded by a short deadline) and ends the session.
func (s *Session) Abort(code ErrorCode, msg string) {
	select {
	case <-s.done:
		return
	default:
	}
	// The reason is recorded before the ERROR leaves: the peer closes its connections on it,
	// and this side's readers must not take that for why the session ended.
	err := fmt.Errorf("link aborted: %s", msg)
	s.setErr(err)
	s.writeControl(FrameError, AppendError(nil, code, msg), 2*time.Second)
	s.fail(err)
}

// Close ends a session that completed: its connections are closed without an ERROR.
func (s *Session) Close() {
	s.once.Do(func() {
		close(s.done)
		s.cancel()
		s.closeConns(true)
		s.rmu.Lock()
		s.rcond.Broadcast()
		s.rmu.Unlock()
	})
	s.wg.Wait()
}

// SendControl writes one control frame.
func (s *Session) SendControl(t FrameType, payload []byte) error {
	if err := s.writeControl(t, payload, s.cfg.Timeout); err != nil {
		s.fail(fmt.Errorf("link: writing %s on the control connection: %w", t, err))
		return s.Err()
	}
	return nil
}

func (s *Session) writeControl(t FrameType, payload []byte, timeout time.Duration) error {
	s.ctlMu.Lock()
	defer s.ctlMu.Unlock()
	s.ctl.nc.SetWriteDeadline(time.Now().Add(timeout))
	defer s.ctl.nc.SetWriteDeadline(time.Time{})
	return s.ctl.fr.WriteFrame(t, payload)
}

// Control delivers the control frames the application handles (READY, COMMIT, DELIVERED,
// STATUS, and VERIFY, HASHES, VERDICT); their payloads are copies. PING, PONG and ERROR are handled by the session.
func (s *Session) Control() <-chan Frame { return s.control }

// peerPing is the peer's latest PING, when it came, the data bytes it had applied (by the
// sender's ledger), and the smoothed rate (data bytes/s) at which the receiver has been
// applying them, from it and the PINGs before.
type peerPing struct {
	Ping
	at      time.Time
	applied int64
	rate    float64
}

// notePeer keeps the peer's latest PING (the control reader is its only writer).
func (s *Session) notePeer(p Ping) {
	cur := &peerPing{Ping: p, at: time.Now(), applied: s.ledger.upTo(p.Applied, int64(p.Received))}
	if prev := s.peer.Load(); prev != nil && cur.applied >= prev.applied {
		cur.rate = prev.rate
		if dt := cur.at.Sub(prev.at).Seconds(); dt > 0 {
			inst := float64(cur.applied-prev.applied) / dt
			if cur.rate == 0 {
				cur.rate = inst
			} else {
				cur.rate = 0.5*cur.rate + 0.5*inst
			}
		}
	}
	s.peer.Store(cur)
}

// ledger is the sender's running total of data bytes queued, by sequence number, for the
// last ledgerSize frames: a receiver's PING says which frame it has applied, and the ledger
// turns that into bytes.
type ledger struct {
	mu    sync.Mutex
	total int64
	last  uint64
	upto  [ledgerSize]int64 // by seq % ledgerSize: the total up to and including seq
}

// ledgerSize covers every frame that can wait at a receiver: its window holds at most 1,024
// (4 MiB of 4 KiB buffers), its sockets a few MiB.
const ledgerSize = 4096

func (l *ledger) note(seq uint64, n int64) {
	l.mu.Lock()
	l.total += n
	l.last = seq
	l.upto[seq%ledgerSize] = l.total
	l.mu.Unlock()
}

// upTo is the bytes queued up to and including frame seq; for a frame the ledger no longer
// holds (or a receiver that reports none applied), orElse.
func (l *ledger) upTo(seq uint64, orElse int64) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if seq == 0 || seq > l.last || l.last-seq >= ledgerSize {
		return orElse
	}
	return l.upto[seq%ledgerSize]
}

// Backlog is how long the receiver needs to apply what the sender has written to its
// connections and it has not applied yet — in the kernels' buffers and the network, and in
// the receiver's reorder window — at the rate it has been applying: time a switchover would
// add to the downtime. It counts from the receiver's PINGs (every 100 ms; the frame applied,
// by the ledger), allowing for what it applied since the latest; ok is false before it has
// sent two, or when it applies nothing while data waits.
func (s *Session) Backlog() (time.Duration, bool) {
	p := s.peer.Load()
	if p == nil {
		return 0, false
	}
	waiting := float64(s.sent.Load()) - float64(p.applied) - p.rate*time.Since(p.at).Seconds()
	switch {
	case waiting <= 0:
		return 0, true
	case p.rate <= 0:
		return 0, false
	}
	return time.Duration(waiting / p.rate * float64(time.Second)), true
}

// receiverPing is how often the receiver sends PING: often enough for the sender's policy to
// see its backlog (Backlog) at a dirty sync. The sender's are for liveness only.
const (
	receiverPing = 100 * time.Millisecond
	senderPing   = time.Second
)

// PeerPing is the peer's latest PING (the receiver's view of the data flow), if any.
func (s *Session) PeerPing() (Ping, bool) {
	p := s.peer.Load()
	if p == nil {
		return Ping{}, false
	}
	return p.Ping, true
}

// SendUrgent sends a page the destination asked for ahead of the queued data (URGENT).
func (s *Session) SendUrgent(u Urgent) error {
	if err := s.SendControl(FrameUrgent, u.Append(make([]byte, 0, 10+len(u.Data)))); err != nil {
		return err
	}
	s.urgentSent.Add(1)
	return nil
}

// UrgentSent is how many URGENT frames this session has written: what a postcopy's END says
// (PROTOCOL.md §7.1).
func (s *Session) UrgentSent() uint64 { return s.urgentSent.Load() }

// SendReturn sends return-path bytes of the destination to the sender (RETURN frames of at most
// MaxReturnChunk bytes); an empty b says that the destination closed its return path.
func (s *Session) SendReturn(b []byte) error {
	for {
		n := min(len(b), MaxReturnChunk)
		if err := s.SendControl(FrameReturn, b[:n]); err != nil {
			return err
		}
		b = b[n:]
		if len(b) == 0 {
			return nil
		}
	}
}

// ReadReturn reads the destination's return path as the receiver sent it (RETURN frames): it
// is the io.Reader the sender's engine decodes the return path from. io.EOF once the
// destination closed it; the session's error once the session ended.
func (s *Session) ReadReturn(p []byte) (int, error) {
	s.retMu.Lock()
	defer s.retMu.Unlock()
	for len(s.retBuf) == 0 {
		if s.retEOF {
			return 0, io.EOF
		}
		select {
		case b := <-s.returns:
			s.retBuf, s.retEOF = b, len(b) == 0
		case <-s.done:
			select { // bytes that came before the end still count
			case b := <-s.returns:
				s.retBuf, s.retEOF = b, len(b) == 0
			default:
				return 0, s.ended()
			}
		}
	}
	n := copy(p, s.retBuf)
	s.retBuf = s.retBuf[n:]
	return n, nil
}

// PeerCertificate is the peer's leaf certificate on the control connection (nil without TLS).
func (s *Session) PeerCertificate() []byte { return s.ctl.cert }

// Token is the session token WELCOME gave.
func (s *Session) Token() string { return s.Welcome.Session }

// BytesSent and BytesReceived count data frame bytes on the data connections.
func (s *Session) BytesSent() int64     { return s.sent.Load() }
func (s *Session) BytesReceived() int64 { return s.received.Load() }

// Connections is the number of data connections.
func (s *Session) Connections() int { return len(s.data) }

// WidenReceiveBuffers lifts the bound the receiver put on its data connections' receive buffers
// (transport.BoundReceiveBuffer), for the rest of a postcopy: the bound keeps a switchover
// short, and after the switch there is none left, while the small frames of postcopy made a
// bounded buffer drop packets (transport.WidenReceiveBuffer).
func (s *Session) WidenReceiveBuffers() {
	for _, c := range s.data {
		transport.WidenReceiveBuffer(c.nc) // best effort, as the bound itself
	}
}

// start runs the control reader and the heartbeat.
func (s *Session) start() {
	// The peer's silence counts from now: Accept may have waited long for the sender, and
	// Dial for its data connections.
	s.lastHeard.Store(time.Now().UnixNano())
	s.wg.Add(2)
	go s.readControl()
	go s.heartbeat()
}

func (s *Session) readControl() {
	defer s.wg.Done()
	for {
		f, err := s.ctl.fr.ReadFrame()
		if err != nil {
			select {
			case <-s.done:
			default:
				switch {
				case err == io.EOF:
					s.fail(errors.New("link: the peer closed the control connection"))
				case badFrame(err):
					s.refuse(err)
				default:
					s.fail(prefixed(err))
				}
			}
			return
		}
		s.lastHeard.Store(time.Now().UnixNano())
		switch f.Type {
		case FramePing:
			p, err := ParsePing(f.Payload)
			if err != nil {
				s.refuse(&ProtocolError{Conn: s.ctl.name, Offset: f.Offset, Type: f.Type, Err: err})
				return
			}
			s.notePeer(p)
			s.writeControl(FramePong, p.Append(nil)[:8], s.cfg.Timeout)
		case FramePong:
		case FrameError:
			re, err := ParseError(f.Payload)
			if err != nil {
				s.refuse(&ProtocolError{Conn: s.ctl.name, Offset: f.Offset, Type: f.Type, Err: err})
				return
			}
			s.fail(re)
			return
		case FrameReturn:
			if s.side != "sender" || !HasFeature(s.Welcome.Features, FeaturePostcopy) {
				s.refuse(&ProtocolError{Conn: s.ctl.name, Offset: f.Offset, Type: f.Type, Err: errors.New("RETURN without the postcopy feature, or towards the receiver")})
				return
			}
			if len(f.Payload) > MaxReturnChunk {
				s.refuse(&ProtocolError{Conn: s.ctl.name, Offset: f.Offset, Type: f.Type, Err: fmt.Errorf("%d return-path bytes, more than %d", len(f.Payload), MaxReturnChunk)})
				return
			}
			select {
			case s.returns <- bytes.Clone(f.Payload):
			case <-s.done:
				return
			}
		case FrameUrgent:
			if s.side != "receiver" || !HasFeature(s.Welcome.Features, FeaturePostcopy) {
				s.refuse(&ProtocolError{Conn: s.ctl.name, Offset: f.Offset, Type: f.Type, Err: errors.New("URGENT without the postcopy feature, or towards the sender")})
				return
			}
			if _, err := ParseUrgent(f.Payload); err != nil {
				s.refuse(&ProtocolError{Conn: s.ctl.name, Offset: f.Offset, Type: f.Type, Err: err})
				return
			}
			s.rmu.Lock()
			if len(s.urgent) >= maxUrgent {
				s.rmu.Unlock()
				s.refuse(&ProtocolError{Conn: s.ctl.name, Offset: f.Offset, Type: f.Type, Err: fmt.Errorf("more than %d urgent pages waiting", maxUrgent)})
				return
			}
			f.Payload = bytes.Clone(f.Payload)
			s.urgent = append(s.urgent, f)
			s.rcond.Broadcast()
			s.rmu.Unlock()
		case FrameReady, FrameCommit, FrameDelivered, FrameStatus, FrameVerify, FrameHashes, FrameVerdict:
			f.Payload = bytes.Clone(f.Payload)
			select {
			case s.control <- f:
			case <-s.done:
				return
			}
		default:
			s.refuse(&ProtocolError{Conn: s.ctl.name, Offset: f.Offset, Type: f.Type, Err: errors.New("not allowed on the control connection now")})
			return
		}
	}
}

func (s *Session) heartbeat() {
	defer s.wg.Done()
	every := senderPing
	if s.side == "receiver" {
		every = receiverPing
	}
	t := time.NewTicker(every)
	defer t.Stop()
	var nonce uint64
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		if since := time.Since(time.Unix(0, s.lastHeard.Load())); since > s.cfg.Timeout {
			s.fail(fmt.Errorf("%w: no word from the peer for %v (the link is down or the peer is stuck)", ErrTimeout, since.Round(100*time.Millisecond)))
			return
		}
		nonce++
		p := Ping{Nonce: nonce, Received: uint64(s.received.Load()), Applied: s.applied.Load()}
		if err := s.writeControl(FramePing, p.Append(nil), s.cfg.Timeout); err != nil {
			// A peer that gave up sent ERROR before closing: let the control reader read it.
			s.failSoon(fmt.Errorf("link: sending a heartbeat: %w", err))
			return
		}
	}
}

// ---------------------------------------------------------------------------------------------
// The sender.

// Dial connects to a receiver at addr (HOST:PORT): the control connection and its HELLO, then
// the data connections. Nothing of the VM has crossed when it fails; the error says why (a
// refused certificate, a receiver that cannot take the migration: *RemoteError).
func Dial(ctx context.Context, addr string, cfg Config, hello Hello) (*Session, error) {
	s := newSession(cfg, "sender")
	if hello.Connections < 1 {
		hello.Connections = 1
	}
	hello.Role, hello.MinVersion, hello.MaxVersion = "control", MinProtocolVersion, ProtocolVersion
	ctl, w, err := s.dialOne(ctx, addr, "control", hello)
	if err != nil {
		return nil, err
	}
	s.ctl = ctl
	if w.Version < MinProtocolVersion || w.Version > ProtocolVersion {
		ctl.nc.Close()
		return nil, fmt.Errorf("link: the receiver chose protocol version %d; this sender speaks %d to %d", w.Version, MinProtocolVersion, ProtocolVersion)
	}
	s.Hello, s.Welcome = hello, w
	n := hello.Connections
	if w.Connections > 0 && w.Connections < n {
		n = w.Connections
	}
	for i := 1; i <= n; i++ {
		dh := Hello{Role: "data", Session: w.Session, Index: i, MinVersion: w.Version, MaxVersion: w.Version}
		c, _, err := s.dialOne(ctx, addr, fmt.Sprintf("data %d", i), dh)
		if err != nil {
			s.closeConns(false)
			return nil, err
		}
		s.data = append(s.data, c)
	}
	s.out = make(chan []byte, s.cfg.QueueFrames)
	if s.cfg.Bandwidth > 0 {
		s.lim = rate.NewLimiter(rate.Limit(s.cfg.Bandwidth), MaxPayload+HeaderSize)
	}
	s.start()
	for _, c := range s.data {
		s.wg.Add(1)
		go s.writeData(c)
	}
	return s, nil
}

// dialOne opens one connection, sends hello and reads the WELCOME (or ERROR).
// maxUnsent bounds what the kernel holds unsent per sender connection (TCP_NOTSENT_LOWAT).
// Without it TCP's autotuning buffers megabytes per connection: at the switchover all of it
// must drain before the device state that follows it, and the sender's queue — what
// --compress auto reads — looks empty while the link is in fact the bottleneck. Measured on a
// 1 Gbit/s link (compat TestBenchLink).
const maxUnsent = 256 << 10

// dataPathRate is the rate, bytes/s, each connection's receive buffer is sized for on the
// receiver (transport.BoundReceiveBuffer): 1 Gbit/s, so N Gbit/s over --connections N.
const dataPathRate = 125e6

func (s *Session) dialOne(ctx context.Context, addr, name string, hello Hello) (*conn, Welcome, error) {
	var w Welcome
	dctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, w, fmt.Errorf("link: connecting to the receiver at %s: %w", addr, err)
	}
	transport.LimitUnsent(nc, maxUnsent) // best effort: other kernels lack it
	dl, _ := dctx.Deadline()
	nc.SetDeadline(dl)
	stop := context.AfterFunc(dctx, func() { nc.SetDeadline(time.Now()) })
	defer stop()
	c := &conn{name: name, nc: nc}
	if s.cfg.TLS != nil {
		tc := tls.Client(nc, s.cfg.TLS)
		if err := tc.HandshakeContext(dctx); err != nil {
			nc.Close()
			return nil, w, fmt.Errorf("link: TLS with the receiver at %s: %w", addr, explainHandshake("sender", err))
		}
		c.nc = tc
	}
	c.fr = NewFramer(name, c.nc, c.nc)
	p, err := AppendHello(nil, hello)
	if err == nil {
		err = c.fr.WriteFrame(FrameHello, p)
	}
	var f Frame
	if err == nil {
		f, err = c.fr.ReadFrame()
	}
	if err != nil {
		c.nc.Close()
		if s.cfg.TLS != nil {
			err = explainHandshake("sender", err)
		} else if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isReset(err) {
			err = fmt.Errorf("the receiver closed the connection without answering (does it require TLS? this side has --no-tls): %w", err)
		}
		return nil, w, fmt.Errorf("link: %s connection to %s: %w", name, addr, err)
	}
	switch f.Type {
	case FrameWelcome:
		if w, err = ParseWelcome(f.Payload); err != nil {
			c.nc.Close()
			return nil, w, &ProtocolError{Conn: name, Offset: f.Offset, Type: f.Type, Err: err}
		}
	case FrameError:
		c.nc.Close()
		re, err := ParseError(f.Payload)
		if err != nil {
			return nil, w, &ProtocolError{Conn: name, Offset: f.Offset, Type: f.Type, Err: err}
		}
		return nil, w, re
	default:
		c.nc.Close()
		return nil, w, &ProtocolError{Conn: name, Offset: f.Offset, Type: f.Type, Err: errors.New("expected WELCOME or ERROR")}
	}
	nc.SetDeadline(time.Time{})
	return c, w, nil
}

func isReset(err error) bool {
	return err != nil && (errors.Is(err, net.ErrClosed) || bytes.Contains([]byte(err.Error()), []byte("connection reset")))
}

// SetRelease sets a function that gets every buffer passed to SendData back once it has been
// written (or dropped), for reuse.
func (s *Session) SetRelease(fn func([]byte)) { s.release = fn }

// SendData queues an encoded data frame (header included, as the Append functions make it).
// Frames must be passed in increasing sequence order; each goes to the first data connection
// that is free, so every connection carries an increasing subsequence (PROTOCOL.md §2.2).
// It blocks while the queue is full and fails once the session has ended.
func (s *Session) SendData(b []byte) error {
	f := Frame{Type: FrameType(b[0]), Payload: b[HeaderSize:]}
	if seq := f.Seq(); seq <= s.lastSeq {
		return fmt.Errorf("link: data frame %d sent after %d", seq, s.lastSeq)
	} else {
		s.lastSeq = seq
		s.ledger.note(seq, int64(len(b)))
	}
	select {
	case <-s.done: // checked first: a queue with room must not hide that the session ended
	default:
		select {
		case s.out <- b:
			return nil
		case <-s.done:
		}
	}
	if s.release != nil {
		s.release(b)
	}
	return s.ended()
}

// FramesHeld is how many data frames a sender's session can hold at once: queued, and one
// being written on each data connection. Their buffers come back through SetRelease's function.
func (s *Session) FramesHeld() int { return s.cfg.QueueFrames + s.Connections() }

// Busy is how full the sender's queue is, 0 to 1: near 1 the connections are the bottleneck.
func (s *Session) Busy() float64 { return float64(len(s.out)) / float64(cap(s.out)) }

func (s *Session) writeData(c *conn) {
	defer s.wg.Done()
	for {
		var b []byte
		select {
		case b = <-s.out:
		case <-s.done:
			return
		}
		if s.lim != nil {
			if err := s.waitBandwidth(len(b)); err != nil {
				if s.release != nil {
					s.release(b)
				}
				select {
				case <-s.done:
				default:
					s.fail(fmt.Errorf("link: bandwidth limiter: %w", err))
				}
				return
			}
		}
		err := c.fr.WriteEncoded(b)
		s.sent.Add(int64(len(b)))
		if s.release != nil {
			s.release(b)
		}
		if err != nil {
			// A receiver that gave up sent ERROR before closing: let the control reader read it.
			s.failSoon(fmt.Errorf("link: writing on the %s connection: %w", c.name, err))
			return
		}
	}
}

// waitBandwidth takes n bytes from the limiter, at most a burst at a time (an END frame may be
// larger than the burst), and gives up when the session ends.
func (s *Session) waitBandwidth(n int) error {
	for n > 0 {
		k := min(n, s.lim.Burst())
		if err := s.lim.WaitN(s.ctx, k); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// SetBandwidth changes the cap of a session made with one (Config.Bandwidth); 0 lifts it. A
// postcopy's link follows --postcopy-bandwidth after the switch, as the source does.
func (s *Session) SetBandwidth(bps int64) {
	if s.lim == nil {
		return
	}
	if bps <= 0 {
		s.lim.SetLimit(rate.Inf)
		return
	}
	s.lim.SetLimit(rate.Limit(bps))
}

// Drain waits until every queued data frame has been handed to its connection. Once none is
// left queued it returns nil even if the session has ended since: whether the frames arrived
// is what the peer's answer says (READY, the destination's SHUT), and a receiver that has its
// END may finish and close before this end looks again (a recovered postcopy took that close
// for a broken link).
func (s *Session) Drain(ctx context.Context) error {
	for len(s.out) > 0 {
		select {
		case <-s.done:
			if len(s.out) == 0 {
				return nil
			}
			return s.ended()
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}

// ---------------------------------------------------------------------------------------------
// The receiver.

// Listener is a receiver's listening socket. It serves one link.
type Listener struct {
	l   net.Listener
	cfg Config
	// peer, when set, is the only client certificate the control connection may present (a
	// postcopy recovery takes only the sender of the session that broke).
	peer []byte
}

// RequirePeer makes Accept take only a sender presenting cert (PeerCertificate of an earlier
// session).
func (l *Listener) RequirePeer(cert []byte) { l.peer = cert }

// Listen listens on addr (HOST:PORT), and nowhere else.
func Listen(addr string, cfg Config) (*Listener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("link: listening on %s: %w", addr, err)
	}
	return &Listener{l: l, cfg: cfg.withDefaults()}, nil
}

// Addr is the address the listener is bound to.
func (l *Listener) Addr() net.Addr { return l.l.Addr() }

// Close stops listening.
func (l *Listener) Close() error { return l.l.Close() }

// Accept waits (until ctx ends) for the sender's control connection, asks check whether the
// migration its HELLO describes can be taken (an error is sent back as ERROR, code refused
// unless the error has a LinkCode() ErrorCode method),
// then accepts the data connections — only from the same certificate, with the session token
// WELCOME gave — and closes the listener. A connection that fails its handshake ends Accept with
// the reason: the receiver serves one authenticated peer.
func (l *Listener) Accept(ctx context.Context, check func(Hello) (Welcome, error)) (*Session, error) {
	defer l.l.Close()
	s := newSession(l.cfg, "receiver")
	stop := context.AfterFunc(ctx, func() { l.l.Close() })
	defer stop()
	ctl, h, err := s.acceptOne(ctx, l.l, "control")
	if err != nil {
		return nil, err
	}
	s.ctl = ctl
	if l.peer != nil && !bytes.Equal(ctl.cert, l.peer) {
		ctl.fr.WriteFrame(FrameError, AppendError(nil, CodeRefused, "another certificate than the sender of the migration being recovered"))
		ctl.nc.Close()
		return nil, fmt.Errorf("link: %s presented another certificate than the sender of the migration being recovered", ctl.nc.RemoteAddr())
	}
	if h.Role != "control" {
		ctl.fr.WriteFrame(FrameError, AppendError(nil, CodeProtocol, "the first connection must be the control connection"))
		ctl.nc.Close()
		return nil, fmt.Errorf("link: the first connection from %s is a %s connection", ctl.nc.RemoteAddr(), h.Role)
	}
	if h.MaxVersion < MinProtocolVersion || h.MinVersion > ProtocolVersion {
		msg := fmt.Sprintf("the sender speaks link protocol versions %d to %d, this receiver %d to %d", h.MinVersion, h.MaxVersion, MinProtocolVersion, ProtocolVersion)
		ctl.fr.WriteFrame(FrameError, AppendError(nil, CodeRefused, msg))
		ctl.nc.Close()
		return nil, errors.New("link: " + msg)
	}
	w, err := check(h)
	if err != nil {
		code := CodeRefused
		var c interface{ LinkCode() ErrorCode }
		if errors.As(err, &c) {
			code = c.LinkCode() // e.g. CodeDestination: the destination of a recovery is gone
		}
		ctl.fr.WriteFrame(FrameError, AppendError(nil, code, err.Error()))
		ctl.nc.Close()
		return nil, err
	}
	w.Version = min(h.MaxVersion, ProtocolVersion)
	var tok [16]byte
	rand.Read(tok[:])
	w.Session = hex.EncodeToString(tok[:])
	if w.Connections <= 0 || w.Connections > h.Connections {
		w.Connections = h.Connections
	}
	p, err := AppendWelcome(nil, w)
	if err == nil {
		err = ctl.fr.WriteFrame(FrameWelcome, p)
	}
	if err != nil {
		ctl.nc.Close()
		return nil, fmt.Errorf("link: answering the sender: %w", err)
	}
	s.Hello, s.Welcome = h, w
	// The sender opens its data connections right after WELCOME.
	if tl, ok := l.l.(*net.TCPListener); ok {
		tl.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	}
	seen := map[int]bool{}
	for len(s.data) < w.Connections {
		c, dh, err := s.acceptOne(ctx, l.l, fmt.Sprintf("data %d", len(s.data)+1))
		if err == nil {
			switch {
			case dh.Role != "data" || dh.Session != w.Session:
				err = fmt.Errorf("link: a second connection from %s that is not this link's data connection (role %q)", c.nc.RemoteAddr(), dh.Role)
			case !bytes.Equal(c.cert, ctl.cert):
				err = fmt.Errorf("link: a data connection from %s with another certificate than the control connection's", c.nc.RemoteAddr())
			case seen[dh.Index] || dh.Index > w.Connections:
				err = fmt.Errorf("link: data connection index %d twice or out of range", dh.Index)
			}
			if err == nil {
				c.name = fmt.Sprintf("data %d", dh.Index)
				c.fr.name = c.name
				seen[dh.Index] = true
				wp, _ := AppendWelcome(nil, Welcome{Version: w.Version})
				err = c.fr.WriteFrame(FrameWelcome, wp)
			}
			if err != nil {
				c.nc.Close()
			}
		}
		if err != nil {
			code := CodeProtocol
			if ctx.Err() != nil {
				code = CodeCancelled
			}
			ctl.fr.WriteFrame(FrameError, AppendError(nil, code, err.Error()))
			s.closeConns(false)
			return nil, err
		}
		s.data = append(s.data, c)
	}
	s.pending = map[uint64]Frame{}
	s.next = 1
	s.start()
	for _, c := range s.data {
		s.wg.Add(1)
		go s.readData(c)
	}
	return s, nil
}

// acceptOne accepts one connection, completes TLS and reads its HELLO.
func (s *Session) acceptOne(ctx context.Context, l net.Listener, name string) (*conn, Hello, error) {
	var h Hello
	nc, err := l.Accept()
	if err != nil {
		if ctx.Err() != nil {
			return nil, h, fmt.Errorf("link: waiting for the sender: %w", context.Cause(ctx))
		}
		return nil, h, fmt.Errorf("link: accepting: %w", err)
	}
	nc.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	// The context ends the wait for the HELLO too, not only the TLS handshake.
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Now()) })
	defer stop()
	c := &conn{name: name, nc: nc}
	if s.cfg.TLS != nil {
		tc := tls.Server(nc, s.cfg.TLS)
		hctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			nc.Close()
			return nil, h, fmt.Errorf("link: TLS with %s: %w", nc.RemoteAddr(), explainHandshake("receiver", err))
		}
		if pcs := tc.ConnectionState().PeerCertificates; len(pcs) > 0 {
			c.cert = pcs[0].Raw
		}
		c.nc = tc
	}
	// The receiver is often the slower end (it decompresses and writes a whole stream): what
	// it cannot take yet stays with the sender, whose policy sees it (Backlog), not in a
	// receive buffer grown to megabytes that a switchover would have to wait for.
	transport.BoundReceiveBuffer(nc, dataPathRate)
	c.fr = NewFramer(name, c.nc, c.nc)
	f, err := c.fr.ReadFrame()
	if err == nil && f.Type != FrameHello {
		err = &ProtocolError{Conn: name, Offset: f.Offset, Type: f.Type, Err: errors.New("expected HELLO")}
	}
	if err == nil {
		h, err = ParseHello(f.Payload)
	}
	if err != nil && ctx.Err() != nil {
		c.nc.Close()
		return nil, h, fmt.Errorf("link: waiting for the sender's HELLO: %w", context.Cause(ctx))
	}
	if err != nil {
		if f.Type != 0 || badFrame(err) {
			// The peer sent something, not a HELLO this side takes: tell it what (PROTOCOL.md §2).
			c.fr.WriteFrame(FrameError, AppendError(nil, CodeProtocol, err.Error()))
		}
		c.nc.Close()
		return nil, h, fmt.Errorf("link: first frame from %s: %w", nc.RemoteAddr(), err)
	}
	if !stop() {
		c.nc.Close()
		return nil, h, fmt.Errorf("link: waiting for the sender's HELLO: %w", context.Cause(ctx))
	}
	nc.SetDeadline(time.Time{})
	return c, h, nil
}

func (s *Session) readData(c *conn) {
	defer s.wg.Done()
	var last uint64
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			if badFrame(err) {
				s.refuse(err)
				return
			}
			if err == io.EOF {
				err = fmt.Errorf("link: the sender closed the %s connection", c.name)
			}
			s.failSoon(prefixed(err))
			return
		}
		if !f.Type.IsData() {
			s.refuse(&ProtocolError{Conn: c.name, Offset: f.Offset, Type: f.Type, Err: errors.New("a control frame on a data connection")})
			return
		}
		seq := f.Seq()
		if len(f.Payload) < 8 || seq <= last {
			s.refuse(&ProtocolError{Conn: c.name, Offset: f.Offset, Type: f.Type, Err: fmt.Errorf("sequence number %d after %d on this connection", seq, last)})
			return
		}
		last = seq
		s.received.Add(int64(HeaderSize + len(f.Payload)))
		f.Payload = s.own(f.Payload)
		if !s.hold(seq, f) {
			return
		}
	}
}

// bufSizes are the size classes of receive buffers (larger payloads get their own): a buffer
// is never more than twice what it holds, and a full PAGES frame of the sender's 256 KiB batches
// fits the 272 KiB class, so the reorder window, which counts the buffers' capacity, bounds the
// memory the frames hold. A window that counted payload bytes let 4 MiB of well-compressed
// frames pin ~35 MiB of 256 KiB buffers.
var bufSizes = [...]int{4 << 10, 8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 192 << 10, 272 << 10, 512 << 10, 1 << 20, 2 << 20}

const numBufClasses = len(bufSizes)

// bufClass is the size class of a buffer for n bytes (numBufClasses: none, n is too large).
func bufClass(n int) int {
	c := 0
	for c < numBufClasses && n > bufSizes[c] {
		c++
	}
	return c
}

// own copies a frame's payload out of the Framer's buffer into a pooled one of its size class.
func (s *Session) own(p []byte) []byte {
	c := bufClass(len(p))
	if c == numBufClasses {
		return append([]byte(nil), p...)
	}
	b, _ := s.pool[c].Get().([]byte)
	if b == nil {
		b = make([]byte, 0, bufSizes[c])
	}
	return append(b[:0], p...)
}

// hold puts a frame into the reorder window, waiting while the window is full unless it is
// the next frame due (which always fits: so connections cannot block each other).
func (s *Session) hold(seq uint64, f Frame) bool {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	for seq != s.next && s.held+cap(f.Payload) > s.cfg.Window {
		select {
		case <-s.done:
			return false
		default:
		}
		s.rcond.Wait()
	}
	if seq < s.next || s.pending[seq].Type != 0 {
		s.rmu.Unlock()
		s.refuse(fmt.Errorf("link: data frame %d received twice", seq))
		s.rmu.Lock()
		return false
	}
	s.pending[seq] = f
	s.held += cap(f.Payload)
	s.rcond.Broadcast()
	return true
}

// NextData returns the next data frame in sequence order, waiting for it until deadline (zero:
// no deadline beyond the session's). The payload is the caller's until it passes the frame to
// ReleaseData.
func (s *Session) NextData(deadline time.Time) (Frame, error) { return s.NextFrame(deadline, false) }

// maxUrgent bounds the URGENT frames a receiver holds (16 MiB of pages): the destination asks
// for few pages at a time, so more is a misbehaving peer.
const maxUrgent = 4096

// NextFrame is NextData, except that with urgent an URGENT frame that has arrived comes first,
// out of sequence (PROTOCOL.md §7.1). Its payload is the caller's (not for ReleaseData).
func (s *Session) NextFrame(deadline time.Time, urgent bool) (Frame, error) {
	return s.nextFrame(deadline, urgent, true)
}

// nextFrame waits for an URGENT frame (urgent) or the next data frame (data).
func (s *Session) nextFrame(deadline time.Time, urgent, data bool) (Frame, error) {
	var timer *time.Timer
	if !deadline.IsZero() {
		timer = time.AfterFunc(time.Until(deadline), func() {
			s.rmu.Lock()
			s.rcond.Broadcast()
			s.rmu.Unlock()
		})
		defer timer.Stop()
	}
	s.rmu.Lock()
	defer s.rmu.Unlock()
	for {
		if urgent && len(s.urgent) > 0 {
			f := s.urgent[0]
			s.urgent = s.urgent[1:]
			return f, nil
		}
		if f, ok := s.pending[s.next]; ok && data {
			delete(s.pending, s.next)
			s.held -= cap(f.Payload)
			s.applied.Store(s.next)
			s.next++
			s.rcond.Broadcast()
			return f, nil
		}
		select {
		case <-s.done:
			if err := s.Err(); err != nil {
				return Frame{}, err
			}
			return Frame{}, errors.New("link: closed")
		default:
		}
		if !deadline.IsZero() && !time.Now().Before(deadline) {
			if !data {
				return Frame{}, fmt.Errorf("%w: an URGENT frame that END counts did not arrive in time", ErrStalled)
			}
			return Frame{}, fmt.Errorf("%w: data frame %d did not arrive in time (%d frames held)", ErrStalled, s.next, len(s.pending))
		}
		s.rcond.Wait()
	}
}

// NextUrgent waits for the next URGENT frame until deadline: the ones a postcopy's END counts
// that have not arrived yet (PROTOCOL.md §7.1). Its payload is the caller's.
func (s *Session) NextUrgent(deadline time.Time) (Frame, error) {
	return s.nextFrame(deadline, true, false)
}

// DataWaiting reports whether the next data frame in sequence order has arrived (NextData
// would not wait).
func (s *Session) DataWaiting() bool {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	_, ok := s.pending[s.next]
	return ok || len(s.urgent) > 0
}

// ReleaseData gives a frame's payload back for reuse.
func (s *Session) ReleaseData(f Frame) {
	if c := bufClass(cap(f.Payload)); c < numBufClasses && bufSizes[c] == cap(f.Payload) {
		s.pool[c].Put(f.Payload[:0])
	}
}
