package link

// Tests of bugs found in the link's code, each failing on it as it is: they are skipped until
// the fix (the report that came with them gives each patch, which also removes the t.Skip).

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
)

// The receiver's heartbeat counts the peer's silence from when Accept began, not from when the
// link came up: a receiver started more than Timeout before its sender (the usual order: the
// receiver waits for the sender) declares the live sender dead at its first heartbeat.
func TestBugHeartbeatAfterLongAccept(t *testing.T) {
	t.Parallel()
	cfg := Config{Timeout: 2 * time.Second, HandshakeTimeout: testWait}
	l, _ := listen(t, cfg)
	res := acceptAsync(context.Background(), l, nil)
	time.Sleep(cfg.Timeout + time.Second) // the operator starts the sender a little later
	snd, err := Dial(context.Background(), l.Addr().String(), cfg, Hello{Connections: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer snd.Close()
	r := awaitAccept(t, res)
	if r.err != nil {
		t.Fatal(r.err)
	}
	// Two heartbeats with both sides alive and talking.
	select {
	case <-r.s.Done():
		t.Fatalf("receiver: %v", r.s.Err())
	case <-snd.Done():
		t.Fatalf("sender: %v", snd.Err())
	case <-time.After(2500 * time.Millisecond):
	}
}

// A side that aborts sends ERROR on the control connection and then closes every connection;
// the peer's data writers (sender), data readers or heartbeat (either side) may meet the
// closed connections (connection reset) before its control reader has read the ERROR sent
// first, and the peer then reports the reset instead of the reason. (The receiver's data readers
// wait 250 ms for the ERROR already; the sender's writers and both heartbeats do not.)
func TestBugAbortRace(t *testing.T) {
	t.Parallel()
	for _, senderAborts := range []bool{false, true} {
		want := RemoteError{Code: CodeSource, Message: "the sending sidecar gave up"}
		if !senderAborts {
			want = RemoteError{Code: CodeDestination, Message: "the receiving sidecar gave up"}
		}
		for round := range 20 {
			peerErr, _ := abortRound(t, quick, quick, senderAborts, want)
			var re *RemoteError
			if !errors.As(peerErr, &re) || *re != want {
				t.Errorf("sender aborts %v, round %d: the peer got %v, want %+v", senderAborts, round, peerErr, want)
			}
		}
	}
}

// Abort sends the ERROR and only then ends its own session: the peer, on the ERROR, closes its
// connections, and the aborting side's control reader may see that close first and end the
// session with "the peer closed the control connection" (or a reset), losing the side's own
// reason from Err() and NextData.
func TestBugAbortOwnReason(t *testing.T) {
	t.Parallel()
	for round := range 10 {
		snd, rcv, _ := linkPair(t, quick, quick, 2, false)
		rcv.Abort(CodeDestination, "the receiving sidecar gave up")
		<-snd.Done()
		_, err := rcv.NextData(time.Now().Add(testWait))
		wantErr(t, "aborting receiver, round "+strconv.Itoa(round), err, "link aborted: the receiving sidecar gave up")
		snd.Close()
		rcv.Close()
	}
}

// The bandwidth limiter's burst is MaxPayload+HeaderSize, and a WaitN for more than the burst
// fails at once: with --bandwidth, an END frame carrying a vmdesc over 2 MiB ends the link.
func TestBugBandwidthLargeEnd(t *testing.T) {
	t.Parallel()
	scfg := quick
	scfg.Bandwidth = 1 << 30
	snd, rcv, _ := linkPair(t, quick, scfg, 1, false)
	end := End{Seq: 1, HasVMDesc: true, VMDesc: make([]byte, 3<<20)}.Append(nil)
	if err := snd.SendData(end); err != nil {
		t.Fatal(err)
	}
	f, err := rcv.NextData(time.Now().Add(testWait))
	if err != nil || f.Type != FrameEnd || len(f.Payload) != len(end)-HeaderSize {
		t.Fatalf("END of a 3 MiB vmdesc: %v %d bytes, %v (sender: %v)", f.Type, len(f.Payload), err, snd.Err())
	}
}

// The limiter's wait does not end with the session: Close waits for it (here 8 s) and, after an
// Abort, the writer goroutine lives on until the wait is over.
func TestBugCloseDuringBandwidthWait(t *testing.T) {
	t.Parallel()
	scfg := quick
	scfg.Bandwidth = 128 << 10
	snd, rcv, _ := linkPair(t, quick, scfg, 1, false)
	// The first 2 MiB go at once (the burst); the next 1 MiB waits 8 s for its tokens.
	for seq, n := range []int{MaxPayload - 64, 1 << 20} {
		if err := snd.SendData(deviceFrame(uint64(seq+1), make([]byte, n))); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the first frame", func() bool { return rcv.BytesReceived() > 0 })
	time.Sleep(100 * time.Millisecond) // the writer is in its wait
	closed := make(chan struct{})
	go func() { snd.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(3 * time.Second):
		t.Error("Close waits for the bandwidth limiter")
		<-closed
	}
}

// Accept honours its context while it waits for a connection, and during TLS handshakes, but
// not while it reads a connection's HELLO: a peer that connects and says nothing holds Accept
// for the whole HandshakeTimeout after the context ended.
func TestBugAcceptCancelWhileReadingHello(t *testing.T) {
	t.Parallel()
	p := compat.NewTestPKI(t)
	for name, cfg := range map[string]Config{"plain": {}, "TLS": {TLS: serverTLS(t, p, p.Server, "")}} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			cfg.HandshakeTimeout = time.Minute
			l, _ := listen(t, cfg)
			ctx, cancel := context.WithCancel(context.Background())
			res := acceptAsync(ctx, l, nil)
			var nc net.Conn
			var err error
			if cfg.TLS != nil {
				// A sender whose TLS is fine but which never sends its HELLO.
				nc = rawTLS(t, l.Addr().String(), clientTLS(t, p, p.Client, "127.0.0.1"))
			} else if nc, err = net.Dial("tcp", l.Addr().String()); err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			time.Sleep(100 * time.Millisecond) // Accept reads the HELLO
			cancel()
			select {
			case r := <-res:
				if !errors.Is(r.err, context.Canceled) {
					t.Errorf("%v, want context.Canceled", r.err)
				}
			case <-time.After(5 * time.Second):
				t.Error("Accept still waits 5 s after its context ended")
				nc.Close()
				<-res
			}
		})
	}
}

// A receiver that refuses a frame (PROTOCOL.md §2: "ends the link with an ERROR naming the
// connection, its byte offset and the frame type") closes its connections without the ERROR:
// the session's fail sends none, and the application's Abort after it is a no-op because the
// session has already ended.
func TestBugNoErrorForBadFrame(t *testing.T) {
	t.Parallel()
	l, _ := listen(t, Config{Timeout: 30 * time.Second, HandshakeTimeout: testWait})
	res := acceptAsync(context.Background(), l, nil)
	raw := newRawSender(t, l.Addr().String(), nil, 2)
	r := awaitAccept(t, res)
	if r.err != nil {
		t.Fatal(r.err)
	}
	raw.send(2, []byte{0x42, 0, 0, 0, 0})
	_, err := r.s.NextData(time.Now().Add(testWait))
	r.s.Abort(CodeProtocol, err.Error()) // what savevm's receiver does then
	raw.ctl.nc.SetReadDeadline(time.Now().Add(testWait))
	re, rerr := raw.ctl.nextError()
	if rerr != nil || re.Code != CodeProtocol || !strings.Contains(re.Message, "data 2 connection, offset") ||
		!strings.Contains(re.Message, "unknown frame type 0x42") {
		t.Fatalf("the sender got %v, %v; want ERROR protocol naming data 2, the offset and the frame", re, rerr)
	}
}

// SendData may report success after the session ended: it selects between a queue with room
// and the closed done channel, and Go picks either at random; after Close, Err() is nil so it
// returns nil even from the done branch. The frames are dropped, never written nor released.
// Drain after Close reports success with frames still queued.
func TestBugSendDataAfterEnd(t *testing.T) {
	t.Parallel()
	scfg := quick
	scfg.QueueFrames = 64
	snd, rcv, _ := linkPair(t, quick, scfg, 1, false)
	rcv.Abort(CodeDestination, "gave up")
	<-snd.Done()
	for i := range 64 {
		if err := snd.SendData(testFrame(uint64(i + 1))); err == nil {
			t.Fatalf("SendData %d after the session failed (%v): no error", i+1, snd.Err())
		}
	}
	snd2, _, _ := linkPair(t, quick, scfg, 1, false)
	snd2.Close()
	if err := snd2.SendData(testFrame(1)); err == nil {
		t.Error("SendData after Close: no error")
	}
	ctx, cancel := context.WithTimeout(context.Background(), testWait)
	defer cancel()
	if err := snd2.Drain(ctx); err == nil && len(snd2.out) > 0 {
		t.Errorf("Drain after Close: no error, %d frames never sent", len(snd2.out))
	}
}

// A HELLO that does not parse (here: more data connections than the protocol allows) is
// answered by closing the connection, with no ERROR: the sender then says the receiver "closed
// the connection without answering (does it require TLS?)". Dial itself lets --connections 17
// through.
func TestBugBadHelloGetsNoError(t *testing.T) {
	t.Parallel()
	l, _ := listen(t, quick)
	res := acceptAsync(context.Background(), l, nil)
	_, err := Dial(context.Background(), l.Addr().String(), quick, Hello{Connections: MaxConnections + 1})
	r := awaitAccept(t, res)
	wantErr(t, "receiver", r.err, "HELLO asks for 17 data connections")
	wantErr(t, "sender", err, "17 data connections")
	var re *RemoteError
	if errors.As(err, &re) && re.Code != CodeProtocol {
		t.Errorf("ERROR code %v", re.Code)
	}
}

// Accept cancelled while it waits for the data connections tells the sender ERROR code 1
// (protocol) instead of 5 (cancelled: PROTOCOL.md §2.1).
func TestBugAcceptCancelCode(t *testing.T) {
	t.Parallel()
	l, _ := listen(t, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	res := acceptAsync(ctx, l, nil)
	c := rawDial(t, l.Addr().String(), nil, "control", controlHello(2))
	if _, err := c.readAnswer(); err != nil {
		t.Fatal(err)
	}
	cancel()
	awaitAccept(t, res)
	re, err := c.nextError()
	if err != nil || re.Code != CodeCancelled {
		t.Errorf("the sender got %v, %v; want ERROR cancelled", re, err)
	}
}

// rawTLS opens a TLS connection to addr and completes the handshake, sending nothing more.
func rawTLS(t testing.TB, addr string, cfg *tls.Config) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(nc, cfg)
	tc.SetDeadline(time.Now().Add(testWait))
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	return tc
}

// A receiver that has every frame may finish and close before the sender's Drain looks: Drain
// then has nothing left queued and must not report the close as a failure (a recovered
// postcopy took it for a broken link and retried until --recover-timeout). The peer's answer,
// not Drain, says whether the frames arrived.
func TestBugDrainAfterPeerFinished(t *testing.T) {
	t.Parallel()
	snd, rcv, _ := linkPair(t, quick, quick, 2, false)
	const n = 8
	for seq := uint64(1); seq <= n; seq++ {
		if err := snd.SendData(testFrame(seq)); err != nil {
			t.Fatalf("SendData %d: %v", seq, err)
		}
	}
	for seq := uint64(1); seq <= n; seq++ {
		f, err := rcv.NextFrame(time.Now().Add(testWait), false)
		if err != nil {
			t.Fatalf("frame %d: %v", seq, err)
		}
		rcv.ReleaseData(f)
	}
	rcv.Close()
	select {
	case <-snd.Done():
	case <-time.After(testWait):
		t.Fatal("the sender did not see the receiver close")
	}
	ctx, cancel := context.WithTimeout(context.Background(), testWait)
	defer cancel()
	if err := snd.Drain(ctx); err != nil {
		t.Errorf("Drain with every frame delivered, after the receiver closed: %v", err)
	}
}
