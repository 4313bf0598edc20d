// Package transport opens the destinations a migration stream can be sent to — tcp:, unix:,
// file: (also for QEMU 7.2, which has no file: of its own) and exec: — from a QEMU-style URI.
package transport

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	xunix "golang.org/x/sys/unix"
)

// URI is a parsed destination.
type URI struct {
	Scheme string // "tcp", "unix", "file", "exec", or "qmg" (a receiving sidecar)
	Addr   string // host:port for tcp and qmg, the path for unix and file, the shell command for exec
}

func (u URI) String() string {
	if u.Scheme == "qmg" {
		return "qmg://" + u.Addr
	}
	return u.Scheme + ":" + u.Addr
}

// IsLink reports whether u names a receiving sidecar (qmg://HOST:PORT) rather than a QEMU.
func (u URI) IsLink() bool { return u.Scheme == "qmg" }

// Host is the host part of a tcp or qmg address (what TLS checks the receiver's name against).
func (u URI) Host() string {
	h, _, err := net.SplitHostPort(u.Addr)
	if err != nil {
		return u.Addr
	}
	return h
}

// ErrBadURI is wrapped by every Parse error.
var ErrBadURI = errors.New("bad destination URI")

// Parse reads a destination URI: tcp:HOST:PORT (IPv6 as tcp:[::1]:PORT), unix:PATH, file:PATH,
// exec:COMMAND, or qmg://HOST:PORT (a receiving sidecar, link/PROTOCOL.md).
func Parse(s string) (URI, error) {
	if rest, ok := strings.CutPrefix(s, "qmg://"); ok {
		if err := checkHostPort(s, rest); err != nil {
			return URI{}, err
		}
		return URI{Scheme: "qmg", Addr: rest}, nil
	}
	scheme, rest, ok := strings.Cut(s, ":")
	if !ok {
		return URI{}, fmt.Errorf("%w %q: want tcp:HOST:PORT, unix:PATH, file:PATH or exec:COMMAND", ErrBadURI, s)
	}
	u := URI{Scheme: scheme, Addr: rest}
	switch scheme {
	case "tcp":
		if err := checkHostPort(s, rest); err != nil {
			return URI{}, err
		}
	case "unix", "file", "exec":
		if rest == "" || strings.ContainsRune(rest, 0) {
			return URI{}, fmt.Errorf("%w %q: empty or invalid %s", ErrBadURI, s, map[string]string{"unix": "path", "file": "path", "exec": "command"}[scheme])
		}
	default:
		return URI{}, fmt.Errorf("%w %q: unknown scheme %q (want tcp, unix, file, exec or qmg://)", ErrBadURI, s, scheme)
	}
	return u, nil
}

// checkHostPort checks a HOST:PORT address of URI s.
func checkHostPort(s, addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%w %q: %v", ErrBadURI, s, err)
	}
	if host == "" {
		return fmt.Errorf("%w %q: no host", ErrBadURI, s)
	}
	if p, err := strconv.Atoi(port); err != nil || p <= 0 || p > 65535 {
		return fmt.Errorf("%w %q: port %q is not 1–65535", ErrBadURI, s, port)
	}
	return nil
}

// Conn is an open destination. Close finishes the stream and reports whether everything
// reached the other side as far as this end can tell: for sockets, the write side is shut
// down and the close succeeded; for files, the data was synced; for exec, the command exited 0.
type Conn interface {
	io.Writer
	Close() error
	// Abort tears the destination down without finishing it (connection reset, file kept
	// truncated, command killed): used when the stream must not look complete.
	Abort()
}

// Open connects to u before ctx ends.
func Open(ctx context.Context, u URI) (Conn, error) {
	switch u.Scheme {
	case "tcp", "unix":
		var d net.Dialer
		c, err := d.DialContext(ctx, u.Scheme, u.Addr)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", u, err)
		}
		return &sockConn{c}, nil
	case "file":
		f, err := os.OpenFile(u.Addr, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", u, err)
		}
		return &fileConn{f}, nil
	case "exec":
		cmd := exec.Command("/bin/sh", "-c", u.Addr)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		w, err := cmd.StdinPipe()
		if err != nil {
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("%s: %w", u, err)
		}
		return &execConn{cmd: cmd, w: w}, nil
	}
	if u.IsLink() {
		return nil, fmt.Errorf("%w: %s is a receiving sidecar: reach it with package link", ErrBadURI, u)
	}
	return nil, fmt.Errorf("%w: %s", ErrBadURI, u)
}

type sockConn struct{ net.Conn }

// WriteBuffers writes v with one writev (net.Buffers finds writev only on the socket's own
// type, not through this wrapper) and consumes it.
func (c *sockConn) WriteBuffers(v *net.Buffers) (int64, error) { return v.WriteTo(c.Conn) }

func (c *sockConn) Close() error {
	type closeWriter interface{ CloseWrite() error }
	if cw, ok := c.Conn.(closeWriter); ok {
		if err := cw.CloseWrite(); err != nil {
			c.Conn.Close()
			return err
		}
	}
	return c.Conn.Close()
}

// CloseWrite ends the writing direction only: a postcopy destination still answers on the
// return path of the same connection.
func (c *sockConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// LowLatency keeps the kernel's queue of unsent bytes small (TCP_NOTSENT_LOWAT), so that a page
// a postcopy destination is waiting for does not queue behind megabytes of background pages.
func LowLatency(c Conn, bytes int) error {
	sc, ok := c.(*sockConn)
	if !ok {
		return nil
	}
	return LimitUnsent(sc.Conn, bytes)
}

// LimitUnsent sets TCP_NOTSENT_LOWAT on a TCP connection (nothing for other kinds): the kernel
// then holds at most about bytes of it unsent.
func LimitUnsent(nc net.Conn, bytes int) error {
	return onTCPSocket(nc, func(fd int) error {
		return syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, tcpNotSentLowat, bytes)
	})
}

// onTCPSocket runs fn on a TCP connection's socket; other kinds of connection are left alone.
func onTCPSocket(nc net.Conn, fn func(fd int) error) error {
	if u, ok := nc.(interface{ NetConn() net.Conn }); ok { // *tls.Conn: the socket under it
		nc = u.NetConn()
	}
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return nil
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = fn(int(fd)) }); err != nil {
		return err
	}
	return serr
}

// tcpNotSentLowat is Linux's TCP_NOTSENT_LOWAT socket option.
const tcpNotSentLowat = 25

func (c *sockConn) Abort() {
	if tc, ok := c.Conn.(*net.TCPConn); ok {
		tc.SetLinger(0) // RST: the destination sees an error, never a clean end of stream
	}
	c.Conn.Close()
}

type fileConn struct{ *os.File }

func (f *fileConn) Close() error {
	if err := f.File.Sync(); err != nil {
		f.File.Close()
		return err
	}
	return f.File.Close()
}

func (f *fileConn) Abort() { f.File.Close() }

type execConn struct {
	cmd *exec.Cmd
	w   io.WriteCloser
}

func (e *execConn) Write(p []byte) (int, error) { return e.w.Write(p) }

// execWaitLimit bounds how long Close waits for the command to exit after its stdin closed.
const execWaitLimit = 60 * time.Second

func (e *execConn) Close() error {
	werr := e.w.Close()
	done := make(chan error, 1)
	go func() { done <- e.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("destination command: %w", err)
		}
		return werr
	case <-time.After(execWaitLimit):
		syscall.Kill(-e.cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return fmt.Errorf("destination command did not exit %v after the stream ended", execWaitLimit)
	}
}

func (e *execConn) Abort() {
	e.w.Close()
	syscall.Kill(-e.cmd.Process.Pid, syscall.SIGKILL)
	e.cmd.Wait()
}

// BoundReceiveBuffer sizes a TCP connection's receive buffer for the path it has — twice what
// pathRate bytes/s carry in one round trip (the RTT the kernel measured during the handshake),
// at least minReceiveBuffer — instead of letting the kernel grow it to megabytes. The kernel
// grows it while the reading end is the slower one, and what it then holds is a queue that
// nothing upstream sees: a link's receiver behind it would make a switchover wait for it. A
// path whose round trip needs more than maxBoundedBuffer keeps the kernel's own sizing.
func BoundReceiveBuffer(nc net.Conn, pathRate float64) error {
	return onTCPSocket(nc, func(fd int) error {
		info, err := xunix.GetsockoptTCPInfo(fd, xunix.IPPROTO_TCP, xunix.TCP_INFO)
		if err != nil {
			return err
		}
		rtt := time.Duration(info.Rtt) * time.Microsecond
		want := int(2 * pathRate * rtt.Seconds())
		if want > maxBoundedBuffer {
			return nil
		}
		return syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, max(want, minReceiveBuffer))
	})
}

// WidenReceiveBuffer gives a connection that BoundReceiveBuffer sized the largest buffer
// that function would have left to the kernel (maxBoundedBuffer). The bound is for a
// switchover's sake; once a postcopy has switched, small writes fill a small buffer with more
// bookkeeping than data, and the kernel drops packets it has already advertised room for
// (TCPRcvQDrop): each such drop stalls the stream for a retransmission timeout, 150 ms and more,
// measured in compat's TestBenchPostcopy.
func WidenReceiveBuffer(nc net.Conn) error {
	return onTCPSocket(nc, func(fd int) error {
		return syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, maxBoundedBuffer)
	})
}

// The receive buffers BoundReceiveBuffer sets (the kernel doubles them for its bookkeeping).
const (
	minReceiveBuffer = 512 << 10
	maxBoundedBuffer = 4 << 20
)
