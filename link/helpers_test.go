package link

// Shared machinery of the link's tests: the test PKI's TLS configurations, a run of Accept
// against Dial over real TCP on 127.0.0.1, a TCP proxy that can slow or freeze a connection, and a
// hand-driven sender that speaks the protocol frame by frame (to send what Dial never would).

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
)

// TestMain fails the run when a test leaves a goroutine behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testWait bounds every wait of these tests: far beyond what any step takes on a loaded machine,
// so that only a hang fails on it.
const testWait = 20 * time.Second

// serverTLS is the receiver's configuration with kp as its certificate and the test CA.
func serverTLS(t testing.TB, p *compat.TestPKI, kp *compat.KeyPair, peer string) *tls.Config {
	t.Helper()
	c, err := ServerTLS(TLSFiles{Cert: kp.CertFile, Key: kp.KeyFile, CA: p.CA.CertFile, Peer: peer})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// clientTLS is the sender's configuration with kp as its certificate, dialling host.
func clientTLS(t testing.TB, p *compat.TestPKI, kp *compat.KeyPair, host string) *tls.Config {
	t.Helper()
	c, err := ClientTLS(TLSFiles{Cert: kp.CertFile, Key: kp.KeyFile, CA: p.CA.CertFile}, host)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// countingListener counts the connections a Listener accepted.
type countingListener struct {
	net.Listener
	n atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// listen starts a receiver's Listener on 127.0.0.1 that counts what it accepts.
func listen(t testing.TB, cfg Config) (*Listener, *countingListener) {
	t.Helper()
	l, err := Listen("127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{Listener: l.l}
	l.l = cl
	t.Cleanup(func() { l.Close() })
	return l, cl
}

// acceptAll is a check callback that takes any migration.
func acceptAll(Hello) (Welcome, error) { return Welcome{Compress: CodecNames()}, nil }

// linkRun is the outcome of one Accept against one Dial.
type linkRun struct {
	snd, rcv       *Session
	sndErr, rcvErr error
	accepted       int    // connections the receiver's listener accepted
	checked        *Hello // what the check callback was given, if it was called
}

// runLink runs Accept and Dial concurrently, over TCP on 127.0.0.1 (to the listener's port on
// host, "127.0.0.1" when empty), and returns both outcomes. Sessions are closed at the end of the
// test.
func runLink(t testing.TB, rcfg, scfg Config, host string, hello Hello, check func(Hello) (Welcome, error)) linkRun {
	t.Helper()
	l, cl := listen(t, rcfg)
	if check == nil {
		check = acceptAll
	}
	var run linkRun
	var checkMu sync.Mutex
	ctx, cancel := context.WithTimeout(context.Background(), testWait)
	defer cancel()
	type result struct {
		s   *Session
		err error
	}
	rc := make(chan result, 1)
	go func() {
		s, err := l.Accept(ctx, func(h Hello) (Welcome, error) {
			checkMu.Lock()
			run.checked = &h
			checkMu.Unlock()
			return check(h)
		})
		rc <- result{s, err}
	}()
	if host == "" {
		host = "127.0.0.1"
	}
	_, port, _ := net.SplitHostPort(l.Addr().String())
	run.snd, run.sndErr = Dial(ctx, net.JoinHostPort(host, port), scfg, hello)
	select {
	case r := <-rc:
		run.rcv, run.rcvErr = r.s, r.err
	case <-time.After(testWait):
		t.Fatalf("Accept did not return (Dial: %v)", run.sndErr)
	}
	for _, s := range []*Session{run.snd, run.rcv} {
		if s != nil {
			t.Cleanup(s.Close)
		}
	}
	run.accepted = int(cl.n.Load())
	checkMu.Lock()
	defer checkMu.Unlock()
	return run
}

// wantErr fails the test unless err is an error whose text contains every one of parts.
func wantErr(t testing.TB, side string, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: no error, want one containing %q", side, parts)
		return
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("%s: error %q does not contain %q", side, err, p)
		}
	}
}

// waitFor polls cond until it holds; it fails the test after testWait.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testWait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy between a sender and its receiver.

// proxy forwards every connection it accepts to target. Each proxied connection can be slowed
// (a pause before every chunk it forwards) or frozen (nothing more crosses in either direction,
// and neither side's close reaches the other, as with a peer that hangs or a network that drops
// everything).
type proxy struct {
	ln     net.Listener
	target string

	mu sync.Mutex
	// chunk and delay, per accepted connection in order (0 = the control connection): see slow.
	chunk  map[int]int
	delay  map[int]time.Duration
	conns  []*proxyConn
	closed chan struct{}
	wg     sync.WaitGroup
}

type proxyConn struct {
	a, b   net.Conn // a: from the sender, b: to the receiver
	mu     sync.Mutex
	cond   *sync.Cond
	frozen bool
	closed bool
	// forwarded bytes: [0] sender → receiver, [1] receiver → sender.
	forwarded [2]atomic.Int64
}

func newProxy(t testing.TB, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, chunk: map[int]int{}, delay: map[int]time.Duration{}, closed: make(chan struct{})}
	p.wg.Add(1)
	go p.serve()
	t.Cleanup(p.close)
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

// slow makes the i-th connection (0: the control connection) forward at most chunk bytes at a
// time, each after a pause of delay. Call it before the sender dials.
func (p *proxy) slow(i, chunk int, delay time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.chunk[i], p.delay[i] = chunk, delay
}

func (p *proxy) serve() {
	defer p.wg.Done()
	for {
		a, err := p.ln.Accept()
		if err != nil {
			return
		}
		b, err := net.Dial("tcp", p.target)
		if err != nil {
			a.Close()
			continue
		}
		pc := &proxyConn{a: a, b: b}
		pc.cond = sync.NewCond(&pc.mu)
		p.mu.Lock()
		i := len(p.conns)
		p.conns = append(p.conns, pc)
		chunk, delay := p.chunk[i], p.delay[i]
		p.mu.Unlock()
		if chunk <= 0 {
			chunk = 64 << 10
		}
		p.wg.Add(2)
		go p.pump(pc, a, b, 0, chunk, delay)
		go p.pump(pc, b, a, 1, chunk, delay)
	}
}

// pump copies src to dst, holding every chunk while the connection is frozen.
func (p *proxy) pump(pc *proxyConn, src, dst net.Conn, dir, chunk int, delay time.Duration) {
	defer p.wg.Done()
	buf := make([]byte, chunk)
	for {
		n, err := src.Read(buf)
		if !pc.wait() {
			return
		}
		if n > 0 {
			if delay > 0 {
				time.Sleep(delay)
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				src.Close()
				return
			}
			pc.forwarded[dir].Add(int64(n))
		}
		if err != nil {
			if tc, ok := dst.(*net.TCPConn); ok && errors.Is(err, io.EOF) {
				tc.CloseWrite()
			} else {
				dst.Close()
			}
			return
		}
	}
}

// wait blocks while the connection is frozen; false once the proxy is closed.
func (pc *proxyConn) wait() bool {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	for pc.frozen && !pc.closed {
		pc.cond.Wait()
	}
	return !pc.closed
}

// conn returns the i-th connection the proxy accepted (0: the control connection).
func (p *proxy) conn(i int) *proxyConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conns[i]
}

// freeze stops every proxied connection (both directions) at once.
func (p *proxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pc := range p.conns {
		pc.mu.Lock()
		pc.frozen = true
		pc.mu.Unlock()
	}
}

func (p *proxy) close() {
	select {
	case <-p.closed:
		return
	default:
	}
	close(p.closed)
	p.ln.Close()
	p.mu.Lock()
	for _, pc := range p.conns {
		pc.a.Close()
		pc.b.Close()
		pc.mu.Lock()
		pc.closed = true
		pc.cond.Broadcast()
		pc.mu.Unlock()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// ---------------------------------------------------------------------------------------------
// A sender driven by hand.

// rawConn is one connection of a rawSender: its Framer and what it wrote so far.
type rawConn struct {
	nc net.Conn
	fr *Framer
}

// rawSender speaks the link frame by frame, so that a test can send what Dial never would.
type rawSender struct {
	t       testing.TB
	addr    string
	tls     *tls.Config
	ctl     *rawConn
	data    []*rawConn
	welcome Welcome
}

// rawDial opens one connection (TLS when cfg is set) and sends hello; it does not read.
func rawDial(t testing.TB, addr string, cfg *tls.Config, name string, hello Hello) *rawConn {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, testWait)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetDeadline(time.Now().Add(testWait))
	if cfg != nil {
		tc := tls.Client(nc, cfg)
		if err := tc.Handshake(); err != nil {
			nc.Close()
			t.Fatalf("%s: TLS: %v", name, err)
		}
		nc = tc
	}
	t.Cleanup(func() { nc.Close() })
	c := &rawConn{nc: nc, fr: NewFramer(name, nc, nc)}
	p, err := AppendHello(nil, hello)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.fr.WriteFrame(FrameHello, p); err != nil {
		t.Fatalf("%s: HELLO: %v", name, err)
	}
	return c
}

// readAnswer reads the answer to a HELLO: WELCOME, or ERROR as a *RemoteError.
func (c *rawConn) readAnswer() (Welcome, error) {
	f, err := c.fr.ReadFrame()
	if err != nil {
		return Welcome{}, err
	}
	switch f.Type {
	case FrameWelcome:
		return ParseWelcome(f.Payload)
	case FrameError:
		re, err := ParseError(f.Payload)
		if err != nil {
			return Welcome{}, err
		}
		return Welcome{}, re
	}
	return Welcome{}, errors.New("unexpected " + f.Type.String())
}

// nextError reads the control connection until an ERROR (skipping PING and PONG) and returns it;
// any other outcome is an error.
func (c *rawConn) nextError() (*RemoteError, error) {
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			return nil, err
		}
		switch f.Type {
		case FramePing, FramePong:
			continue
		case FrameError:
			return ParseError(f.Payload)
		}
		return nil, errors.New("unexpected " + f.Type.String())
	}
}

// controlHello is the HELLO of a control connection asking for n data connections.
func controlHello(n int) Hello {
	return Hello{Role: "control", MinVersion: MinProtocolVersion, MaxVersion: ProtocolVersion, Connections: n,
		Compress: CodecNames(), Sidecar: "test"}
}

// newRawSender opens the control connection and its n data connections to addr, as Dial does,
// and fails the test unless the receiver welcomes each.
func newRawSender(t testing.TB, addr string, cfg *tls.Config, n int) *rawSender {
	t.Helper()
	r := &rawSender{t: t, addr: addr, tls: cfg}
	r.ctl = rawDial(t, addr, cfg, "control", controlHello(n))
	w, err := r.ctl.readAnswer()
	if err != nil {
		t.Fatalf("control: %v", err)
	}
	r.welcome = w
	for i := 1; i <= n; i++ {
		c := rawDial(t, addr, cfg, "data", r.dataHello(i))
		if _, err := c.readAnswer(); err != nil {
			t.Fatalf("data %d: %v", i, err)
		}
		r.data = append(r.data, c)
	}
	for _, c := range append([]*rawConn{r.ctl}, r.data...) {
		c.nc.SetDeadline(time.Time{})
	}
	return r
}

func (r *rawSender) dataHello(i int) Hello {
	return Hello{Role: "data", Session: r.welcome.Session, Index: i, MinVersion: r.welcome.Version, MaxVersion: r.welcome.Version}
}

// send writes encoded frames (header included) on data connection i (1…N).
func (r *rawSender) send(i int, frames ...[]byte) {
	r.t.Helper()
	for _, b := range frames {
		if err := r.data[i-1].fr.WriteEncoded(b); err != nil {
			r.t.Fatalf("data %d: %v", i, err)
		}
	}
}

// acceptAsync runs l.Accept in the background; the result arrives on the channel.
func acceptAsync(ctx context.Context, l *Listener, check func(Hello) (Welcome, error)) <-chan acceptResult {
	c := make(chan acceptResult, 1)
	if check == nil {
		check = acceptAll
	}
	go func() {
		s, err := l.Accept(ctx, check)
		c <- acceptResult{s, err}
	}()
	return c
}

type acceptResult struct {
	s   *Session
	err error
}

// awaitAccept waits for an acceptAsync result.
func awaitAccept(t testing.TB, c <-chan acceptResult) acceptResult {
	t.Helper()
	select {
	case r := <-c:
		if r.s != nil {
			t.Cleanup(r.s.Close)
		}
		return r
	case <-time.After(testWait):
		t.Fatal("Accept did not return")
	}
	return acceptResult{}
}

// ---------------------------------------------------------------------------------------------
// Data.

// devicePayload is the deterministic content of the test DEVICE frame seq of n data bytes.
func devicePayload(seq uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seq, 0x5eed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// deviceFrame is an encoded DEVICE frame seq carrying data.
func deviceFrame(seq uint64, data []byte) []byte {
	b := append(AppendDeviceHeader(nil, seq), data...)
	SetHeaderLength(b)
	return b
}
