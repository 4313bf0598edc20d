package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	good := map[string]URI{
		"tcp:127.0.0.1:4444": {"tcp", "127.0.0.1:4444"},
		"tcp:[::1]:4444":     {"tcp", "[::1]:4444"},
		"tcp:dst-host:1":     {"tcp", "dst-host:1"},
		"unix:/run/x.sock":   {"unix", "/run/x.sock"},
		"file:/tmp/a:b":      {"file", "/tmp/a:b"},
		"exec:cat > /tmp/f":  {"exec", "cat > /tmp/f"},
	}
	for in, want := range good {
		got, err := Parse(in)
		if err != nil || got != want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v", in, got, err, want)
		}
		if got.String() != in {
			t.Errorf("String() = %q, want %q", got.String(), in)
		}
	}
	for _, in := range []string{"", "tcp", "tcp:host", "tcp::4444", "tcp:h:0", "tcp:h:70000", "tcp:h:x",
		"unix:", "file:", "exec:", "rdma:h:1", "/tmp/file", "file:a\x00b"} {
		if _, err := Parse(in); !errors.Is(err, ErrBadURI) {
			t.Errorf("Parse(%q) = %v, want ErrBadURI", in, err)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"tcp:127.0.0.1:4444", "unix:/x", "file:/y", "exec:cat", "tcp:[::1]:1", "x:y"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrBadURI) {
				t.Fatalf("error %v does not wrap ErrBadURI", err)
			}
			return
		}
		again, err := Parse(u.String())
		if err != nil || again != u {
			t.Fatalf("round trip %q → %+v → %+v, %v", s, u, again, err)
		}
	})
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

// TestSockets sends through tcp: and unix: to a local listener and checks the bytes and the
// clean end of stream.
func TestSockets(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		addr := "127.0.0.1:0"
		if network == "unix" {
			addr = filepath.Join(t.TempDir(), "s")
		}
		l, err := net.Listen(network, addr)
		if err != nil {
			t.Fatal(err)
		}
		got := make(chan string, 1)
		go func() {
			c, err := l.Accept()
			if err != nil {
				got <- err.Error()
				return
			}
			b, _ := io.ReadAll(c)
			c.Close()
			got <- string(b)
		}()
		u, err := Parse(network + ":" + l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c, err := Open(ctx(t), u)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "QEVM stream")
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if s := <-got; s != "QEVM stream" {
			t.Errorf("%s: received %q", network, s)
		}
		l.Close()
	}
}

func TestNotListening(t *testing.T) {
	u, _ := Parse("unix:" + filepath.Join(t.TempDir(), "none"))
	if _, err := Open(ctx(t), u); err == nil || !strings.Contains(err.Error(), "unix:"+filepath.Join(filepath.Dir(u.Addr), "none")) {
		t.Errorf("Open of a missing socket: %v", err)
	}
}

func TestFileAndExec(t *testing.T) {
	dir := t.TempDir()
	for _, uri := range []string{"file:" + filepath.Join(dir, "f"), "exec:cat > " + filepath.Join(dir, "e")} {
		u, _ := Parse(uri)
		c, err := Open(ctx(t), u)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, "payload")
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"f", "e"} {
		if b, _ := os.ReadFile(filepath.Join(dir, name)); string(b) != "payload" {
			t.Errorf("%s holds %q", name, b)
		}
	}
	u, _ := Parse("exec:exit 3")
	c, err := Open(ctx(t), u)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err == nil {
		t.Error("exec: a failing command must make Close fail")
	}
}

// TestBoundReceiveBuffer: on loopback (a round trip of microseconds) the receive buffer is
// fixed at the floor, where the kernel would grow it to megabytes; a unix socket is left alone.
func TestBoundReceiveBuffer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := BoundReceiveBuffer(s, 125e6); err != nil {
		t.Fatal(err)
	}
	raw, _ := s.(*net.TCPConn).SyscallConn()
	var got int
	raw.Control(func(fd uintptr) { got, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF) })
	if got != 2*minReceiveBuffer { // the kernel doubles what it is given
		t.Errorf("SO_RCVBUF %d, want %d", got, 2*minReceiveBuffer)
	}
	// Under TLS the option goes to the socket beneath (the link's connections; no handshake is
	// needed for that).
	if err := WidenReceiveBuffer(tls.Server(s, &tls.Config{})); err != nil {
		t.Fatal(err)
	}
	raw.Control(func(fd uintptr) { got, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF) })
	if got <= 2*minReceiveBuffer {
		t.Errorf("SO_RCVBUF %d after widening through a *tls.Conn, want more than the bound's %d", got, 2*minReceiveBuffer)
	}
	a, b, err := unixPair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	if err := BoundReceiveBuffer(a, 125e6); err != nil {
		t.Errorf("a unix socket: %v", err)
	}
}

func unixPair() (net.Conn, net.Conn, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		return nil, nil, err
	}
	a, err := net.FileConn(os.NewFile(uintptr(fds[0]), "a"))
	if err != nil {
		return nil, nil, err
	}
	b, err := net.FileConn(os.NewFile(uintptr(fds[1]), "b"))
	return a, b, err
}

// TestWriteBuffersOneCall checks that a socket destination takes several slices in one system
// call (writev): on a SOCK_SEQPACKET socket every call is one message, so the reader gets all
// slices in its first read. Written one by one (net.Buffers through the wrapper), the first read
// would hold only the first slice.
func TestWriteBuffersOneCall(t *testing.T) {
	path := filepath.Join(t.TempDir(), "seq.sock")
	l, err := net.Listen("unixpacket", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		b := make([]byte, 64)
		n, _ := c.Read(b)
		got <- b[:n]
	}()
	nc, err := net.Dial("unixpacket", path)
	if err != nil {
		t.Fatal(err)
	}
	c := &sockConn{nc}
	defer c.Close()
	v := net.Buffers{[]byte("header|"), []byte("page data|"), []byte("footer")}
	if n, err := c.WriteBuffers(&v); err != nil || n != 23 || len(v) != 0 {
		t.Fatalf("WriteBuffers: %d, %v, %d slices left", n, err, len(v))
	}
	if b := <-got; string(b) != "header|page data|footer" {
		t.Errorf("first message %q: the slices did not go in one call", b)
	}
}
