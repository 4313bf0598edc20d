package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	gqmp "github.com/digitalocean/go-qemu/qmp"
)

// DialLibvirt reaches the QEMU of a running libvirt domain through libvirtd: QMP commands go
// through virDomainQemuMonitorCommand and events through the QEMU monitor event stream, so the
// sidecar needs no socket of its own on the VM. uri is a libvirt connection URI
// ("qemu:///system", "qemu+unix:///system?socket=PATH", "qemu+tcp://HOST/system", …). The
// connection, the domain lookup and the event registration all finish before ctx's deadline
// (DefaultTimeout without one); every later command has Execute's deadline, which go-libvirt's
// calls lack.
//
// libvirt marks a domain whose monitor is used this way "custom-monitor" tainted; it keeps
// managing the domain (README, "libvirt").
func DialLibvirt(ctx context.Context, uri, domain string) (*Client, error) {
	if domain == "" {
		return nil, errors.New("qmp: libvirt: no domain name")
	}
	u, err := url.Parse(uri)
	if err != nil || u.Scheme == "" {
		return nil, fmt.Errorf("qmp: libvirt: bad connection URI %q (want e.g. qemu:///system)", uri)
	}
	if s := strings.SplitN(u.Scheme, "+", 2)[0]; s != "qemu" {
		return nil, fmt.Errorf("qmp: libvirt: URI %q is for the %q driver; only qemu domains have a QMP monitor", uri, s)
	}
	return New(ctx, &libvirtMonitor{uri: u, domain: domain})
}

// libvirtMonitor is a go-qemu Monitor over go-libvirt. go-qemu has its own
// (qmp.NewLibvirtRPCMonitor), but it can only open qemu:///system over a caller's net.Conn
// and looks the domain up again for every command: the policy loop polls every 25 ms.
type libvirtMonitor struct {
	uri    *url.URL
	domain string

	mu     sync.Mutex
	dialer *cuttableDialer // set before the connection is made
	l      *libvirt.Libvirt
	dom    libvirt.Domain
}

// Connect opens the libvirt connection and finds the domain, which must be running or paused
// (a shut-off domain has no QEMU). Disconnect, from another goroutine, cuts it short.
func (m *libvirtMonitor) Connect() error {
	inner, err := dialerFor(m.uri)
	if err != nil {
		return fmt.Errorf("libvirt %s: %w", m.uri.Redacted(), err)
	}
	d := &cuttableDialer{inner: inner}
	m.mu.Lock()
	m.dialer = d
	m.mu.Unlock()
	l := libvirt.NewWithDialer(d)
	if err := l.ConnectToURI(libvirt.RemoteURI(m.uri)); err != nil {
		d.Close()
		return fmt.Errorf("libvirt %s: %w", m.uri.Redacted(), err)
	}
	dom, err := l.DomainLookupByName(m.domain)
	if err != nil {
		l.Disconnect()
		return fmt.Errorf("libvirt %s: domain %q: %w", m.uri.Redacted(), m.domain, err)
	}
	state, _, err := l.DomainGetState(dom, 0)
	if err != nil {
		l.Disconnect()
		return fmt.Errorf("libvirt %s: domain %q: %w", m.uri.Redacted(), m.domain, err)
	}
	switch libvirt.DomainState(state) {
	case libvirt.DomainRunning, libvirt.DomainPaused, libvirt.DomainBlocked:
	default:
		l.Disconnect()
		return fmt.Errorf("libvirt %s: domain %q is %s: it has no QEMU to migrate", m.uri.Redacted(), m.domain, domainStateName(state))
	}
	m.mu.Lock()
	m.l, m.dom = l, dom
	m.mu.Unlock()
	return nil
}

// Disconnect closes the libvirt connection, politely when libvirtd answers within a second, and
// in any case by closing the socket: that also ends a Connect or Run still waiting for a reply.
func (m *libvirtMonitor) Disconnect() error {
	m.mu.Lock()
	l, d := m.l, m.dialer
	m.mu.Unlock()
	if d == nil {
		return nil
	}
	var err error
	if l != nil {
		done := make(chan error, 1)
		go func() { done <- l.Disconnect() }()
		select {
		case err = <-done:
		case <-time.After(time.Second):
			err = errors.New("libvirt: no answer to the close")
		}
	}
	d.Close()
	return err
}

// cuttableDialer remembers the connection go-libvirt's dialer made, so that Disconnect can
// close it under a call that is still waiting: go-libvirt's calls have no deadline.
type cuttableDialer struct {
	inner socket.Dialer

	mu     sync.Mutex
	conn   net.Conn
	closed bool
}

func (d *cuttableDialer) Dial() (net.Conn, error) {
	c, err := d.inner.Dial()
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		c.Close()
		return nil, ErrClosed
	}
	d.conn = c
	return c, nil
}

// Close closes the connection, and any made later.
func (d *cuttableDialer) Close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	if d.conn != nil {
		d.conn.Close()
	}
}

// localSocket is the libvirtd socket of a local URI: ?socket= when given, the user's own
// daemon for a session URI (as libvirt's client finds it), else "" for go-libvirt's default,
// the system daemon's /var/run/libvirt/libvirt-sock.
func localSocket(u *url.URL) string {
	if s := u.Query().Get("socket"); s != "" {
		return s
	}
	if u.Path != "/session" {
		return ""
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "libvirt", "libvirt-sock")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".cache", "libvirt", "libvirt-sock")
	}
	return ""
}

// dialerFor picks go-libvirt's dialer for the URI's transport, as libvirt's own client does:
// "qemu:///…" and "qemu+unix" use the local socket (?socket= moves it), "qemu+tcp" and
// "qemu+tls" (or a host without a transport) the network.
func dialerFor(u *url.URL) (socket.Dialer, error) {
	transport := "unix"
	if parts := strings.SplitN(u.Scheme, "+", 2); len(parts) == 2 {
		transport = parts[1]
	} else if u.Host != "" {
		transport = "tls"
	}
	q := u.Query()
	switch transport {
	case "unix":
		var opts []dialers.LocalOption
		if s := localSocket(u); s != "" {
			opts = append(opts, dialers.WithSocket(s))
		}
		return dialers.NewLocal(opts...), nil
	case "tcp":
		var opts []dialers.RemoteOption
		if p := u.Port(); p != "" {
			opts = append(opts, dialers.UsePort(p))
		}
		return dialers.NewRemote(u.Hostname(), opts...), nil
	case "tls":
		var opts []dialers.TLSOption
		if p := u.Port(); p != "" {
			opts = append(opts, dialers.UseTLSPort(p))
		}
		if p := q.Get("pkipath"); p != "" {
			opts = append(opts, dialers.UsePKIPath(p))
		}
		return dialers.NewTLS(u.Hostname(), opts...), nil
	}
	return nil, fmt.Errorf("transport %q is not supported: use the local socket (qemu:///system, qemu+unix), qemu+tcp or qemu+tls", transport)
}

// Run sends one QMP command through libvirtd and returns QEMU's reply; QEMU's error reply
// becomes a plain error carrying its description, as go-qemu's socket monitor does.
func (m *libvirtMonitor) Run(cmd []byte) ([]byte, error) {
	m.mu.Lock()
	l, dom := m.l, m.dom
	m.mu.Unlock()
	if l == nil {
		return nil, ErrClosed
	}
	reply, err := l.QEMUDomainMonitorCommand(dom, string(cmd), 0)
	if err != nil {
		var le libvirt.Error
		if errors.As(err, &le) {
			// libvirtd refused (domain gone, monitor busy, …): not QEMU's own reply, but not a
			// transport failure either — report libvirt's words.
			return nil, fmt.Errorf("libvirt: %s", le.Message)
		}
		return nil, &transportError{err}
	}
	if err := replyError([]byte(reply)); err != nil {
		if _, ok := err.(*json.SyntaxError); ok {
			return []byte(reply), nil // Execute reports a reply it cannot decode
		}
		return nil, err
	}
	return []byte(reply), nil
}

// Events delivers the domain's QMP events until ctx ends or the connection closes. go-libvirt
// (as of efbbdf578ac8) fails to decode an event whose data member is absent and drops it: STOP
// and RESUME never arrive this way, MIGRATION and MIGRATION_PASS (the ones the engine uses) do.
func (m *libvirtMonitor) Events(ctx context.Context) (<-chan gqmp.Event, error) {
	m.mu.Lock()
	l := m.l
	m.mu.Unlock()
	if l == nil {
		return nil, ErrClosed
	}
	in, err := l.SubscribeQEMUEvents(ctx, m.domain)
	if err != nil {
		return nil, err
	}
	out := make(chan gqmp.Event)
	go func() {
		defer close(out)
		for e := range in {
			ev := gqmp.Event{Event: e.Event}
			ev.Timestamp.Seconds = int64(e.Seconds)
			ev.Timestamp.Microseconds = int64(e.Microseconds)
			if len(e.Details) > 0 {
				// A malformed data member loses the data, not the event.
				json.Unmarshal(e.Details, &ev.Data)
			}
			out <- ev
		}
	}()
	return out, nil
}

// transportError marks a failure of the monitor connection itself (libvirt's, or a socket's), so
// Execute reports it as such rather than as QEMU's reply.
type transportError struct{ err error }

func (e *transportError) Error() string { return "monitor connection: " + e.err.Error() }
func (e *transportError) Unwrap() error { return e.err }

func domainStateName(s int32) string {
	switch libvirt.DomainState(s) {
	case libvirt.DomainNostate:
		return "in no state"
	case libvirt.DomainShutdown:
		return "shutting down"
	case libvirt.DomainShutoff:
		return "shut off"
	case libvirt.DomainCrashed:
		return "crashed"
	case libvirt.DomainPmsuspended:
		return "suspended by guest power management"
	}
	return fmt.Sprintf("in state %d", s)
}
