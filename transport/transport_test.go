package transport

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
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
