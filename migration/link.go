package migration

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/link"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// LinkOptions are the sending end's link flags (--to qmg://HOST:PORT).
type LinkOptions struct {
	TLS         link.TLSFiles // --tls-cert, --tls-key, --tls-ca
	NoTLS       bool          // --no-tls: plain text (the receiver must say so too)
	Connections int           // --connections: data connections (default 2)
	Compress    string        // --compress: auto (default), none, zstd, s2, lz4
	Timeout     time.Duration // --link-timeout: a silent peer is dead after this long (default 5 s)
}

// DefaultConnections is --connections' default: two data connections spread TLS and the
// kernel's work over two cores, and keep the link busy while one connection waits for its
// window (measured: link/README, compat TestBenchLink).
const DefaultConnections = 2

// Version is this sidecar's version string, sent in HELLO.
var Version = "qemu-migrate-go (devel)"

func (l LinkOptions) connections() int {
	if l.Connections <= 0 {
		return DefaultConnections
	}
	return l.Connections
}

// linkConfig builds the sender's link configuration.
func (o MigrateOptions) linkConfig() (link.Config, error) {
	cfg := link.Config{Timeout: o.Link.Timeout, HandshakeTimeout: o.ConnectTimeout, Bandwidth: o.Policy.Bandwidth}
	if o.Link.NoTLS {
		if o.Link.TLS != (link.TLSFiles{}) {
			return cfg, usageError{errors.New("--no-tls with --tls-* flags: choose one")}
		}
		return cfg, nil
	}
	tc, err := link.ClientTLS(o.Link.TLS, o.To.Host())
	if err != nil {
		return cfg, usageError{err}
	}
	cfg.TLS = tc
	return cfg, nil
}

// dialLink opens the link to the receiving sidecar: TLS, HELLO with what the receiver needs to
// check (the source's QEMU version and machine type), the data connections. Nothing of the VM
// crosses before it succeeds; the receiver may refuse (its QEMU is not listening, has another
// machine type, …) and the source stays untouched.
func (m *migration) dialLink(ctx context.Context) error {
	cfg, err := m.o.linkConfig()
	if err != nil {
		return err
	}
	hello := link.Hello{Connections: m.o.Link.connections(), Compress: link.CodecNames(), Sidecar: Version, Source: &link.Endpoint{Status: m.before}}
	if m.verify != nil {
		hello.Features = append(hello.Features, link.FeatureVerify)
	}
	if m.o.Policy.Postcopy {
		hello.Features = append(hello.Features, link.FeaturePostcopy)
	}
	if v, err := m.src.QueryVersion(ctx); err == nil {
		hello.Source.QEMU = fmt.Sprintf("%d.%d.%d", v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro)
	}
	if mt, err := m.src.MachineType(ctx); err == nil {
		hello.Source.Machine = mt
	}
	s, err := link.Dial(ctx, m.o.To.Addr, cfg, hello)
	if err != nil {
		return err
	}
	if m.verify != nil && !link.HasFeature(s.Welcome.Features, link.FeatureVerify) {
		s.Abort(link.CodeRefused, "--verify: the receiver did not agree")
		return usageError{errors.New("--verify: the receiving sidecar does not offer the check (a version without it): run it without --verify, or upgrade the receiver")}
	}
	if m.o.Policy.Postcopy && !link.HasFeature(s.Welcome.Features, link.FeaturePostcopy) {
		s.Abort(link.CodeRefused, "--postcopy: the receiver did not agree")
		return usageError{errors.New("--postcopy: the receiving sidecar does not offer postcopy (a version without it): run it without --postcopy, or upgrade the receiver")}
	}
	m.adoptSession(s)
	return nil
}

// adoptSession makes s the migration's link, closed when it ends: cleanly once the destination
// has everything, otherwise with an ERROR that says why.
func (m *migration) adoptSession(s *link.Session) {
	m.session = s
	m.defer_(func() {
		switch {
		case m.delivered:
			s.Close()
		case m.ctx.Err() != nil:
			s.Abort(link.CodeCancelled, "the sending sidecar was interrupted ("+context.Cause(m.ctx).Error()+")")
		default:
			s.Abort(link.CodeSource, "the sending sidecar gave up")
		}
	})
}

// runLink is the engine's part over a link.
func (m *migration) runLink(ctx context.Context) (Summary, error) {
	relay, err := savevm.NewLinkRelay(m.sconn, m.session, m.src, m.o.Options,
		savevm.LinkOptions{Compress: m.o.Link.Compress})
	if err != nil {
		return Summary{}, usageError{err}
	}
	m.engine = relay
	return relay.Run(ctx)
}

// uncertain reports a link that broke after COMMIT and before DELIVERED (PROTOCOL.md §5): the
// source has been completed, not resumed, since the destination may be running the guest.
func (m *migration) uncertain(err error) (Summary, error) {
	m.delivered = true // never resume the source now
	return Summary{}, &MigrateError{Class: ErrDestination, Phase: savevm.PhaseDone, SourceState: "postmigrate",
		Err: fmt.Errorf("%w; the receiver had been told to complete the stream when the link broke, so the destination may have it: check whether the destination runs; if it does not, resume the source with `cont` on its QMP", err)}
}

// awaitStatus waits for the receiver's report of its destination (receive --dst-qmp) after
// DELIVERED: the guest must run (or stay paused) there.
func (m *migration) awaitStatus(ctx context.Context) error {
	if !link.HasFeature(m.session.Welcome.Features, "status") {
		return nil
	}
	select {
	case f := <-m.session.Control():
		if f.Type != link.FrameStatus {
			return fmt.Errorf("the receiver sent %s, expected STATUS", f.Type)
		}
		st, msg := statusOf(f.Payload)
		if st == "running" || st == "paused" {
			return nil
		}
		return fmt.Errorf("the destination did not start after receiving the complete stream: %s", msg)
	case <-m.session.Done():
		// The receiver closes the link right after STATUS: a STATUS already read wins.
		select {
		case f := <-m.session.Control():
			if f.Type == link.FrameStatus {
				if st, msg := statusOf(f.Payload); st != "running" && st != "paused" {
					return fmt.Errorf("the destination did not start after receiving the complete stream: %s", msg)
				}
				return nil
			}
		default:
		}
		return fmt.Errorf("the link closed before the receiver reported the destination's state: %v", orClosedErr(m.session.Err()))
	case <-ctx.Done():
		return fmt.Errorf("no report of the destination's state from the receiver: %w", ctx.Err())
	}
}

func orClosedErr(err error) error {
	if err == nil {
		return errors.New("closed")
	}
	return err
}
