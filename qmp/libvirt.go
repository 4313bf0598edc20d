package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"

	"github.com/digitalocean/go-libvirt"
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

	mu  sync.Mutex
	l   *libvirt.Libvirt
	dom libvirt.Domain
}

// Connect opens the libvirt connection and finds the domain, which must be running or paused
// (a shut-off domain has no QEMU).
func (m *libvirtMonitor) Connect() error {
	l, err := libvirt.ConnectToURI(m.uri)
	if err != nil {
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

// Disconnect closes the libvirt connection; a monitor never connected has nothing to close.
func (m *libvirtMonitor) Disconnect() error {
	m.mu.Lock()
	l := m.l
	m.mu.Unlock()
	if l == nil {
		return nil
	}
	return l.Disconnect()
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
	var e struct {
		Error *struct {
			Class string `json:"class"`
			Desc  string `json:"desc"`
		} `json:"error"`
	}
	if json.Unmarshal([]byte(reply), &e) == nil && e.Error != nil {
		return nil, errors.New(e.Error.Desc)
	}
	return []byte(reply), nil
}

// Events delivers the domain's QMP events until ctx ends or the connection closes.
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

// transportError marks a failure of the libvirt connection itself, so Execute reports it as
// such rather than as QEMU's reply.
type transportError struct{ err error }

func (e *transportError) Error() string { return "libvirt connection: " + e.err.Error() }
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
