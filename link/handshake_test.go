package link

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
)

// The link's set-up over real TCP on 127.0.0.1, Accept against Dial, in the manner of
// crypto/tls's handshake tests: for a set-up that must fail, both sides' errors must name the
// cause, from each side's point of view.

// quick bounds the set-up of the tests' links: a failing test fails in seconds, not 30.
var quick = Config{HandshakeTimeout: 10 * time.Second}

func withTLS(c Config, t *tls.Config) Config { c.TLS = t; return c }

// TestHandshakeTLS runs the sender's and the receiver's certificates of the test PKI against
// each other.
func TestHandshakeTLS(t *testing.T) {
	t.Parallel()
	p := compat.NewTestPKI(t)
	ipClient, err := p.CA.Issue(p.Dir, "client-ip", compat.CertOptions{CommonName: "ip-client", IPs: []net.IP{net.ParseIP("10.1.2.3")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		t.Fatal(err)
	}
	cnClient, err := p.CA.Issue(p.Dir, "client-cn", compat.CertOptions{CommonName: "cn-client", DNSNames: []string{"dns-client.test"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		t.Fatal(err)
	}
	// What each side says when the other refused its certificate (the TLS alert it got).
	refusedBySender := "the sender refused this side's certificate"
	refusedByReceiver := "the receiver refused this side's certificate"
	for _, tc := range []struct {
		name           string
		server, client *compat.KeyPair
		noClientCert   bool
		host, peer     string // the sender's server name; the receiver's --tls-peer
		snd, rcv       []string
	}{
		{name: "good by IP", server: p.Server, client: p.Client, host: "127.0.0.1"},
		{name: "good by name", server: p.Server, client: p.Client, host: compat.TestServerName},
		{name: "good by localhost", server: p.Server, client: p.Client, host: "localhost"},

		{name: "client from another CA", server: p.Server, client: p.ClientOtherCA, host: "127.0.0.1",
			snd: []string{refusedByReceiver, "unknown certificate authority"},
			rcv: []string{"the sender's certificate is not acceptable: not signed by --tls-ca", "unknown authority"}},
		{name: "no client certificate", server: p.Server, client: p.Client, noClientCert: true, host: "127.0.0.1",
			snd: []string{"the receiver requires a client certificate and this side sent none", "--tls-cert"},
			rcv: []string{"the sender presented no certificate", "client didn't provide a certificate"}},
		{name: "client expired", server: p.Server, client: p.ClientExpired, host: "127.0.0.1",
			snd: []string{refusedByReceiver, "expired"},
			rcv: []string{"the sender's certificate is not acceptable: expired or not yet valid", "has expired"}},
		{name: "client not yet valid", server: p.Server, client: p.ClientNotYetValid, host: "127.0.0.1",
			snd: []string{refusedByReceiver},
			rcv: []string{"the sender's certificate is not acceptable: expired or not yet valid", "not yet valid"}},
		{name: "client for servers only", server: p.Server, client: p.ClientWrongUsage, host: "127.0.0.1",
			snd: []string{refusedByReceiver},
			rcv: []string{"the sender's certificate is not acceptable", "incompatible key usage"}},

		{name: "server from another CA", server: p.ServerOtherCA, client: p.Client, host: "127.0.0.1",
			snd: []string{"the receiver's certificate is not acceptable: not signed by --tls-ca", "unknown authority"},
			rcv: []string{refusedBySender, "bad certificate"}},
		{name: "server expired", server: p.ServerExpired, client: p.Client, host: "127.0.0.1",
			snd: []string{"the receiver's certificate is not acceptable: expired or not yet valid", "has expired"},
			rcv: []string{refusedBySender}},
		{name: "server not yet valid", server: p.ServerNotYetValid, client: p.Client, host: "127.0.0.1",
			snd: []string{"the receiver's certificate is not acceptable: expired or not yet valid", "not yet valid"},
			rcv: []string{refusedBySender}},
		{name: "server wrong name by IP", server: p.ServerWrongName, client: p.Client, host: "127.0.0.1",
			snd: []string{"the receiver's certificate is not acceptable: issued for another name", "127.0.0.1"},
			rcv: []string{refusedBySender}},
		{name: "server wrong name by name", server: p.ServerWrongName, client: p.Client, host: compat.TestServerName,
			snd: []string{"the receiver's certificate is not acceptable: issued for another name", "wrong.qmg.test", compat.TestServerName},
			rcv: []string{refusedBySender}},
		{name: "dialled by a name the server lacks", server: p.Server, client: p.Client, host: "other.qmg.test",
			snd: []string{"the receiver's certificate is not acceptable: issued for another name", "other.qmg.test"},
			rcv: []string{refusedBySender}},
		{name: "server for clients only", server: p.ServerWrongUsage, client: p.Client, host: "127.0.0.1",
			snd: []string{"the receiver's certificate is not acceptable", "incompatible key usage"},
			rcv: []string{refusedBySender}},

		// --tls-peer: the receiver pins the sender's name (DNS SAN, IP SAN or CN).
		{name: "peer by DNS SAN", server: p.Server, client: p.Client, host: "127.0.0.1", peer: compat.TestClientName},
		{name: "peer by IP SAN", server: p.Server, client: ipClient, host: "127.0.0.1", peer: "10.1.2.3"},
		{name: "peer by CN", server: p.Server, client: cnClient, host: "127.0.0.1", peer: "cn-client"},
		{name: "peer by DNS SAN not CN", server: p.Server, client: cnClient, host: "127.0.0.1", peer: "dns-client.test"},
		{name: "wrong peer by DNS SAN", server: p.Server, client: p.Client, host: "127.0.0.1", peer: "qmg-other.test",
			snd: []string{refusedByReceiver},
			rcv: []string{`the sender's certificate is for qmg-src.test, CN=qmg-src.test, not --tls-peer "qmg-other.test"`}},
		{name: "wrong peer by IP SAN", server: p.Server, client: ipClient, host: "127.0.0.1", peer: "10.1.2.4",
			snd: []string{refusedByReceiver},
			rcv: []string{`the sender's certificate is for 10.1.2.3, CN=ip-client, not --tls-peer "10.1.2.4"`}},
		{name: "wrong peer by CN", server: p.Server, client: cnClient, host: "127.0.0.1", peer: "cn-other",
			snd: []string{refusedByReceiver},
			rcv: []string{`the sender's certificate is for dns-client.test, CN=cn-client, not --tls-peer "cn-other"`}},
		{name: "peer is the CN of a cert with an IP SAN", server: p.Server, client: ipClient, host: "127.0.0.1", peer: "ip-client"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ccfg := clientTLS(t, p, tc.client, tc.host)
			if tc.noClientCert {
				ccfg.Certificates, ccfg.GetClientCertificate = nil, nil
			}
			run := runLink(t, withTLS(quick, serverTLS(t, p, tc.server, tc.peer)), withTLS(quick, ccfg), "",
				Hello{Connections: 2, Compress: CodecNames(), Sidecar: "test"}, nil)
			if tc.snd == nil {
				checkGoodLink(t, run, 2)
				if cs := run.rcv.ctl.nc.(*tls.Conn).ConnectionState(); cs.Version != tls.VersionTLS13 || len(cs.PeerCertificates) == 0 ||
					cs.PeerCertificates[0].Subject.CommonName != tc.client.Cert.Subject.CommonName {
					t.Errorf("receiver's view of the TLS connection: version %x, peer %v", cs.Version, cs.PeerCertificates)
				}
				return
			}
			wantErr(t, "sender", run.sndErr, tc.snd...)
			wantErr(t, "receiver", run.rcvErr, tc.rcv...)
			checkNothingCrossed(t, run)
		})
	}
}

// checkGoodLink checks a link that set up: both sessions, agreeing on what was negotiated.
func checkGoodLink(t *testing.T, run linkRun, n int) {
	t.Helper()
	if run.sndErr != nil || run.rcvErr != nil {
		t.Fatalf("sender: %v; receiver: %v", run.sndErr, run.rcvErr)
	}
	snd, rcv := run.snd, run.rcv
	if snd.Connections() != n || rcv.Connections() != n || run.accepted != 1+n {
		t.Errorf("sender %d, receiver %d data connections, %d accepted; want %d", snd.Connections(), rcv.Connections(), run.accepted, n)
	}
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(rcv.Welcome.Session) || snd.Welcome.Session != rcv.Welcome.Session {
		t.Errorf("session tokens %q and %q", snd.Welcome.Session, rcv.Welcome.Session)
	}
	if snd.Welcome.Version != ProtocolVersion || rcv.Welcome.Version != ProtocolVersion || snd.Welcome.Connections != n {
		t.Errorf("WELCOME at the sender %+v", snd.Welcome)
	}
	if rcv.Hello.Role != "control" || rcv.Hello.MinVersion != MinProtocolVersion || rcv.Hello.MaxVersion != ProtocolVersion ||
		rcv.Hello.Sidecar != snd.Hello.Sidecar || run.checked == nil || run.checked.Sidecar != snd.Hello.Sidecar {
		t.Errorf("HELLO at the receiver %+v, the check got %+v", rcv.Hello, run.checked)
	}
	for i, c := range rcv.data {
		if c.name != "data "+strconv.Itoa(i+1) {
			t.Errorf("receiver's data connection %d is called %q", i, c.name)
		}
	}
}

// checkNothingCrossed checks a set-up that failed on the control connection: no session on
// either side, the receiver accepted that one connection and asked check nothing.
func checkNothingCrossed(t *testing.T, run linkRun) {
	t.Helper()
	if run.snd != nil || run.rcv != nil {
		t.Errorf("a session despite the error: sender %v, receiver %v", run.snd != nil, run.rcv != nil)
	}
	if run.accepted != 1 {
		t.Errorf("the receiver accepted %d connections, want the control connection alone", run.accepted)
	}
	if run.checked != nil {
		t.Errorf("the receiver's check was asked about %+v", *run.checked)
	}
}

// TestHandshakePlain: --no-tls on both sides links; on one side only, each side says what the
// other one speaks.
func TestHandshakePlain(t *testing.T) {
	t.Parallel()
	p := compat.NewTestPKI(t)
	t.Run("both", func(t *testing.T) {
		t.Parallel()
		run := runLink(t, quick, quick, "", Hello{Connections: 3}, nil)
		checkGoodLink(t, run, 3)
		if run.rcv.ctl.cert != nil {
			t.Error("a certificate on a plain connection")
		}
	})
	t.Run("sender only", func(t *testing.T) {
		t.Parallel()
		run := runLink(t, withTLS(quick, serverTLS(t, p, p.Server, "")), quick, "", Hello{Connections: 1}, nil)
		wantErr(t, "sender", run.sndErr, "control connection to 127.0.0.1:",
			"the receiver closed the connection without answering (does it require TLS? this side has --no-tls)")
		wantErr(t, "receiver", run.rcvErr, "the peer does not speak TLS: the sender connected without TLS (it has --no-tls?); this receiver requires mutual TLS")
		if !errors.Is(run.rcvErr, ErrNotTLS) {
			t.Errorf("receiver: %v does not wrap ErrNotTLS", run.rcvErr)
		}
		checkNothingCrossed(t, run)
	})
	t.Run("receiver only", func(t *testing.T) {
		t.Parallel()
		run := runLink(t, quick, withTLS(quick, clientTLS(t, p, p.Client, "127.0.0.1")), "", Hello{Connections: 1}, nil)
		// "the receiver closed the connection during the TLS handshake (…--no-tls…)", or, once
		// the receiver answers the ClientHello with an ERROR, "the receiver answered without TLS".
		wantErr(t, "sender", run.sndErr, "TLS with the receiver at 127.0.0.1:", "--no-tls")
		wantErr(t, "receiver", run.rcvErr, "control connection, offset 0",
			"the peer speaks TLS (a TLS handshake record) but this side has --no-tls")
		checkNothingCrossed(t, run)
	})
}

// TestCheckRefuses: a receiver whose check refuses the migration answers ERROR (refused) to the
// HELLO; the sender gets it as a *RemoteError, and nothing else crossed.
func TestCheckRefuses(t *testing.T) {
	t.Parallel()
	p := compat.NewTestPKI(t)
	refusal := errors.New("the destination QEMU 7.2.22 does not know machine pc-q35-10.0")
	for name, tlsOn := range map[string]bool{"TLS": true, "plain": false} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			rcfg, scfg := quick, quick
			if tlsOn {
				rcfg.TLS, scfg.TLS = serverTLS(t, p, p.Server, ""), clientTLS(t, p, p.Client, "127.0.0.1")
			}
			hello := Hello{Connections: 4, Compress: []string{"zstd"}, Source: &Endpoint{QEMU: "10.0.2", Machine: "pc-q35-10.0", RAM: 1 << 30}, Sidecar: "test"}
			run := runLink(t, rcfg, scfg, "", hello, func(Hello) (Welcome, error) { return Welcome{}, refusal })
			var re *RemoteError
			if !errors.As(run.sndErr, &re) || re.Code != CodeRefused || re.Message != refusal.Error() {
				t.Fatalf("sender: %T %v, want *RemoteError{refused, %q}", run.sndErr, run.sndErr, refusal)
			}
			if !errors.Is(run.rcvErr, refusal) {
				t.Errorf("receiver: %v", run.rcvErr)
			}
			if run.snd != nil || run.rcv != nil || run.accepted != 1 {
				t.Errorf("sessions %v %v, %d connections accepted", run.snd != nil, run.rcv != nil, run.accepted)
			}
			// The check saw the whole HELLO.
			h := run.checked
			if h == nil || h.Role != "control" || h.Connections != 4 || h.Source == nil || *h.Source != *hello.Source ||
				len(h.Compress) != 1 || h.Compress[0] != "zstd" {
				t.Errorf("the check got %+v", h)
			}
		})
	}
}

// TestReceiverFewerConnections: the receiver's WELCOME may lower the number of data connections
// (never raise it); the sender opens that many. A sender asking for none gets one.
func TestReceiverFewerConnections(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ ask, offer, want int }{{4, 2, 2}, {4, 8, 4}, {3, 0, 3}, {0, 0, 1}, {MaxConnections, 0, MaxConnections}} {
		run := runLink(t, quick, quick, "", Hello{Connections: tc.ask}, func(Hello) (Welcome, error) { return Welcome{Connections: tc.offer}, nil })
		checkGoodLink(t, run, tc.want)
	}
}

// TestVersionRanges: a sender whose versions do not overlap the receiver's is refused (code 2,
// naming both ranges) before anything is asked of the check; a range that overlaps gets the
// highest common version; a receiver that picks a version outside the sender's range is refused
// by the sender.
func TestVersionRanges(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		min, max uint16
		refused  bool
	}{{2, 3, true}, {0, 0, true}, {2, 0xffff, true}, {0, 5, false}, {1, 1, false}, {0, 1, false}} {
		l, cl := listen(t, quick)
		ctx, cancel := context.WithTimeout(context.Background(), testWait)
		checked := false
		res := acceptAsync(ctx, l, func(Hello) (Welcome, error) { checked = true; return Welcome{}, nil })
		h := controlHello(1)
		h.MinVersion, h.MaxVersion = tc.min, tc.max
		c := rawDial(t, l.Addr().String(), nil, "control", h)
		w, err := c.readAnswer()
		if !tc.refused {
			if err != nil || w.Version != ProtocolVersion {
				t.Errorf("versions %d to %d: WELCOME %+v, %v", tc.min, tc.max, w, err)
			}
			cancel() // the data connections never come
			awaitAccept(t, res)
			continue
		}
		r := awaitAccept(t, res)
		cancel()
		want := "the sender speaks link protocol versions " + strconv.Itoa(int(tc.min)) + " to " + strconv.Itoa(int(tc.max)) + ", this receiver 1 to 1"
		var re *RemoteError
		if !errors.As(err, &re) || re.Code != CodeRefused || re.Message != want {
			t.Errorf("versions %d to %d: sender got %v, want ERROR refused %q", tc.min, tc.max, err, want)
		}
		wantErr(t, "receiver", r.err, want)
		if checked || cl.n.Load() != 1 || r.s != nil {
			t.Errorf("versions %d to %d: checked %v, %d connections, session %v", tc.min, tc.max, checked, cl.n.Load(), r.s != nil)
		}
	}
	// The sender's side: a receiver choosing a version this sender does not speak.
	for _, v := range []uint16{0, 2, 0xffff} {
		addr := fakeReceiver(t, func(fr *Framer, _ net.Conn, h Hello) {
			p, _ := AppendWelcome(nil, Welcome{Version: v, Session: "ab", Connections: 1})
			fr.WriteFrame(FrameWelcome, p)
		})
		_, err := Dial(context.Background(), addr, quick, Hello{Connections: 1})
		wantErr(t, "sender", err, "the receiver chose protocol version "+strconv.Itoa(int(v))+"; this sender speaks 1 to 1")
	}
}

// fakeReceiver listens on 127.0.0.1 and, for the first connection, reads the HELLO and lets
// answer reply; it returns the address.
func fakeReceiver(t testing.TB, answer func(fr *Framer, nc net.Conn, h Hello)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		nc.SetDeadline(time.Now().Add(testWait))
		fr := NewFramer("fake", nc, nc)
		f, err := fr.ReadFrame()
		if err != nil || f.Type != FrameHello {
			return
		}
		h, _ := ParseHello(f.Payload)
		answer(fr, nc, h)
		// Keep the connection until the sender is done with it.
		nc.Read(make([]byte, 1))
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String()
}

// TestDialAnswers: what the sender makes of answers other than WELCOME.
func TestDialAnswers(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		answer func(fr *Framer, nc net.Conn, h Hello)
		want   []string
		remote *RemoteError
	}{
		{"ERROR", func(fr *Framer, _ net.Conn, h Hello) {
			fr.WriteFrame(FrameError, AppendError(nil, CodeDestination, "no -incoming"))
		}, nil,
			&RemoteError{Code: CodeDestination, Message: "no -incoming"}},
		{"READY", func(fr *Framer, _ net.Conn, h Hello) { fr.WriteFrame(FrameReady, payload(uint64(1))) },
			[]string{"control connection, offset 0: READY frame: expected WELCOME or ERROR"}, nil},
		{"bad WELCOME", func(fr *Framer, _ net.Conn, h Hello) { fr.WriteFrame(FrameWelcome, []byte("QMGL\x00\x01{")) },
			[]string{"control connection, offset 0: WELCOME frame: WELCOME:"}, nil},
		{"bad ERROR", func(fr *Framer, _ net.Conn, h Hello) { fr.WriteFrame(FrameError, []byte{0}) },
			[]string{"control connection, offset 0: ERROR frame: ERROR of 1 bytes"}, nil},
		{"garbage", func(fr *Framer, _ net.Conn, h Hello) { fr.WriteEncoded([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")) },
			[]string{"control connection, offset 0: frame header: unknown frame type 0x48"}, nil},
		{"closed", func(fr *Framer, nc net.Conn, h Hello) { nc.Close() },
			[]string{"the receiver closed the connection without answering"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			hellos := make(chan Hello, 1)
			addr := fakeReceiver(t, func(fr *Framer, nc net.Conn, h Hello) { hellos <- h; tc.answer(fr, nc, h) })
			s, err := Dial(context.Background(), addr, quick, Hello{Connections: 2})
			if s != nil {
				s.Close()
				t.Fatal("a session")
			}
			if tc.remote != nil {
				var re *RemoteError
				if !errors.As(err, &re) || *re != *tc.remote {
					t.Fatalf("%T %v, want %+v", err, err, tc.remote)
				}
			} else {
				wantErr(t, "sender", err, tc.want...)
			}
			var got Hello
			select {
			case got = <-hellos:
			case <-time.After(testWait):
			}
			if got.Role != "control" || got.Connections != 2 || got.MinVersion != MinProtocolVersion || got.MaxVersion != ProtocolVersion {
				t.Errorf("the HELLO Dial sent: %+v", got)
			}
		})
	}
	t.Run("nobody listening", func(t *testing.T) {
		t.Parallel()
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := ln.Addr().String()
		ln.Close()
		_, err := Dial(context.Background(), addr, quick, Hello{})
		wantErr(t, "sender", err, "connecting to the receiver at "+addr, "refused")
	})
	t.Run("silent receiver", func(t *testing.T) {
		t.Parallel()
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		defer ln.Close()
		cfg := quick
		cfg.HandshakeTimeout = 300 * time.Millisecond
		_, err := Dial(context.Background(), ln.Addr().String(), cfg, Hello{})
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Errorf("%v, want a timeout", err)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		t.Parallel()
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		defer ln.Close()
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(100*time.Millisecond, cancel)
		if _, err := Dial(ctx, ln.Addr().String(), Config{}, Hello{}); err == nil {
			t.Error("Dial did not fail")
		}
	})
}

// TestAcceptFirstFrames: what the receiver makes of a control connection that does not begin as
// the protocol says.
func TestAcceptFirstFrames(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		first []byte
		want  string
	}{
		{"data connection first", func() []byte {
			p, _ := AppendHello(nil, Hello{MinVersion: 1, MaxVersion: 1, Role: "data", Session: "ab", Index: 1})
			return append(AppendHeader(nil, FrameHello, len(p)), p...)
		}(), "is a data connection"},
		{"PING first", append(AppendHeader(nil, FramePing, 24), make([]byte, 24)...), "PING frame: expected HELLO"},
		{"bad HELLO", append(AppendHeader(nil, FrameHello, 4), "QMGL"...), "no QMGL magic"},
		{"17 connections", func() []byte {
			p, _ := AppendHello(nil, controlHello(17))
			return append(AppendHeader(nil, FrameHello, len(p)), p...)
		}(), "HELLO asks for 17 data connections"},
		{"QEMU stream", []byte("QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0apc-q35-7.2\x00"), "unknown frame type 0x51"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l, _ := listen(t, quick)
			res := acceptAsync(context.Background(), l, nil)
			nc, err := net.Dial("tcp", l.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			nc.Write(tc.first)
			r := awaitAccept(t, res)
			wantErr(t, "receiver", r.err, tc.want)
		})
	}
}

// TestHandshakeTimeout: a peer that connects and says nothing ends Accept after the handshake
// timeout.
func TestHandshakeTimeout(t *testing.T) {
	t.Parallel()
	p := compat.NewTestPKI(t)
	for name, cfg := range map[string]Config{"plain": {}, "TLS": {TLS: serverTLS(t, p, p.Server, "")}} {
		cfg.HandshakeTimeout = 300 * time.Millisecond
		l, _ := listen(t, cfg)
		res := acceptAsync(context.Background(), l, nil)
		nc, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		r := awaitAccept(t, res)
		nc.Close()
		var ne net.Error
		if !errors.As(r.err, &ne) || !ne.Timeout() {
			t.Errorf("%s: %v, want a timeout", name, r.err)
		}
	}
}

// TestIntruders: while the receiver waits for the data connections, a connection that is not
// one of this sender's ends Accept with an error that says which, and the sender's control
// connection gets an ERROR saying it.
func TestIntruders(t *testing.T) {
	t.Parallel()
	p := compat.NewTestPKI(t)
	other, err := p.CA.Issue(p.Dir, "client-2", compat.CertOptions{CommonName: "qmg-src-2.test", DNSNames: []string{"qmg-src-2.test"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		t.Fatal(err)
	}
	srv := serverTLS(t, p, p.Server, "")
	good := clientTLS(t, p, p.Client, "127.0.0.1")
	for _, tc := range []struct {
		name string
		// intrude, given the raw sender whose control connection the receiver welcomed, opens
		// the connection the receiver takes as data connection 1.
		intrude func(t *testing.T, r *rawSender)
		want    []string
	}{
		{"another certificate, right token", func(t *testing.T, r *rawSender) {
			rawDial(t, r.addr, clientTLS(t, p, other, "127.0.0.1"), "data", r.dataHello(1))
		}, []string{"with another certificate than the control connection's"}},
		{"wrong token", func(t *testing.T, r *rawSender) {
			h := r.dataHello(1)
			h.Session = strings.Repeat("0", 32)
			rawDial(t, r.addr, good, "data", h)
		}, []string{"not this link's data connection"}},
		{"second control connection", func(t *testing.T, r *rawSender) {
			rawDial(t, r.addr, good, "control", controlHello(1))
		}, []string{"not this link's data connection", `role "control"`}},
		{"index out of range", func(t *testing.T, r *rawSender) {
			rawDial(t, r.addr, good, "data", r.dataHello(3))
		}, []string{"data connection index 3 twice or out of range"}},
		{"no TLS", func(t *testing.T, r *rawSender) {
			rawDial(t, r.addr, nil, "data", r.dataHello(1))
		}, []string{"the sender connected without TLS"}},
		{"another CA", func(t *testing.T, r *rawSender) {
			nc, err := net.Dial("tcp", r.addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { nc.Close() })
			go tls.Client(nc, clientTLS(t, p, p.ClientOtherCA, "127.0.0.1")).Handshake()
		}, []string{"the sender's certificate is not acceptable: not signed by --tls-ca"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l, cl := listen(t, withTLS(quick, srv))
			res := acceptAsync(context.Background(), l, nil)
			r := &rawSender{t: t, addr: l.Addr().String(), tls: good}
			r.ctl = rawDial(t, r.addr, good, "control", controlHello(2))
			w, err := r.ctl.readAnswer()
			if err != nil {
				t.Fatal(err)
			}
			r.welcome = w
			tc.intrude(t, r)
			a := awaitAccept(t, res)
			wantErr(t, "receiver", a.err, tc.want...)
			if a.s != nil || cl.n.Load() != 2 {
				t.Errorf("session %v, %d connections accepted", a.s != nil, cl.n.Load())
			}
			re, err := r.ctl.nextError()
			if err != nil || re.Code != CodeProtocol || re.Message != a.err.Error() {
				t.Errorf("the control connection got %v, %v; want ERROR protocol %q", re, err, a.err)
			}
			// The listener is closed: the real data connection finds nobody.
			if nc, err := net.DialTimeout("tcp", r.addr, time.Second); err == nil {
				nc.Close()
				t.Error("the listener still accepts connections")
			}
		})
	}
	// With the real sender: an intruder already queued when the receiver starts accepting data
	// connections (it connected while the check ran) makes the whole link fail on both sides.
	t.Run("Dial", func(t *testing.T) {
		t.Parallel()
		l, _ := listen(t, withTLS(quick, srv))
		port := l.Addr().String()
		var intruder net.Conn
		check := func(Hello) (Welcome, error) {
			nc, err := net.Dial("tcp", port)
			if err != nil {
				return Welcome{}, err
			}
			intruder = nc
			go tls.Client(nc, clientTLS(t, p, p.ClientOtherCA, "127.0.0.1")).Handshake()
			return Welcome{}, nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), testWait)
		defer cancel()
		res := acceptAsync(ctx, l, check)
		s, err := Dial(ctx, port, withTLS(quick, good), Hello{Connections: 2})
		a := awaitAccept(t, res)
		if intruder != nil {
			intruder.Close()
		}
		if s != nil {
			s.Close()
		}
		wantErr(t, "receiver", a.err, "the sender's certificate is not acceptable: not signed by --tls-ca")
		if err == nil || a.s != nil {
			t.Errorf("the link set up: sender %v, receiver session %v", err, a.s != nil)
		}
		t.Logf("the sender's error: %v", err)
	})
}

// TestAcceptCancelled: Accept returns when its context ends, before the control connection and
// while it waits for the data connections.
func TestAcceptCancelled(t *testing.T) {
	t.Parallel()
	t.Run("no sender", func(t *testing.T) {
		t.Parallel()
		l, _ := listen(t, Config{})
		ctx, cancel := context.WithCancel(context.Background())
		res := acceptAsync(ctx, l, nil)
		cancel()
		r := awaitAccept(t, res)
		if !errors.Is(r.err, context.Canceled) {
			t.Errorf("%v, want context.Canceled", r.err)
		}
		wantErr(t, "receiver", r.err, "waiting for the sender")
	})
	t.Run("data phase", func(t *testing.T) {
		t.Parallel()
		l, _ := listen(t, Config{})
		ctx, cancel := context.WithCancelCause(context.Background())
		res := acceptAsync(ctx, l, nil)
		c := rawDial(t, l.Addr().String(), nil, "control", controlHello(2))
		if _, err := c.readAnswer(); err != nil {
			t.Fatal(err)
		}
		stop := errors.New("SIGTERM")
		cancel(stop)
		r := awaitAccept(t, res)
		if !errors.Is(r.err, stop) {
			t.Errorf("%v, want the cause %v", r.err, stop)
		}
		if re, err := c.nextError(); err != nil || !strings.Contains(re.Message, "SIGTERM") {
			t.Errorf("the sender got %v, %v", re, err)
		}
	})
}
