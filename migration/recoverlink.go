package migration

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/link"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// Recovery of a postcopy whose link broke (PROTOCOL.md §7.2), the two ends of it. Each end's
// engine failed and cut its QEMU's connection, so both QEMUs wait in postcopy-paused, the guest
// running on the destination. Then, as QEMU's own recovery goes but across two hosts:
//
//   - the receiver pauses a destination that did not notice (migrate-pause), makes it listen
//     again where it did (migrate-recover with receive --to), and listens on --listen for the
//     sender of the broken session only: the same certificate, HELLO naming that session;
//   - the sender redials it with backoff while the network is down; the receiver connects its
//     destination before it answers, so the link stands only when both QEMUs can go on;
//   - the sender resumes its source into a fresh private socket (migrate resume: true), and
//     both engines go on over the new link: RECV_BITMAP and RESUME as COMMAND frames, the
//     received bitmaps and RESUME_ACK back as RETURN frames, then the pages still missing.
//
// A failure on the way starts that end again from postcopy-paused, within --recover-timeout.
// If a QEMU is gone, its end says so to the other (the receiver answers the sender's HELLO
// with ERROR 3) and both report the state of their side and what to do; the source is never
// resumed.

// recoverLinkOnce is one attempt of the sending end.
func (m *migration) recoverLinkOnce(ctx context.Context, deadline time.Time) error {
	qctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := sourcePaused(qctx, m.src); err != nil {
		return err
	}
	cfg, err := m.o.linkConfig()
	if err != nil {
		return &goneError{err, "The TLS files no longer load: fix them and recover by hand"}
	}
	hello := link.Hello{Connections: m.o.Link.connections(), Compress: link.CodecNames(), Sidecar: Version,
		Features: []string{link.FeaturePostcopy}, Resume: m.session.Token()}
	// One attempt — TCP, TLS, the receiver connecting its destination before WELCOME — within
	// redialTimeout, as in relay mode: a link that comes back is reached within 1.5 s.
	dctx, dcancel := context.WithTimeout(ctx, min(redialTimeout, time.Until(deadline)))
	defer dcancel()
	s, err := link.Dial(dctx, m.o.To.Addr, cfg, hello)
	if err != nil {
		var rem *link.RemoteError
		if errors.As(err, &rem) && rem.Code == link.CodeDestination {
			return &goneError{fmt.Errorf("the receiver reports: %s", rem.Message), destinationGoneHint}
		}
		return fmt.Errorf("reaching the receiver again: %w", err)
	}
	m.adoptSession(s)
	if err := m.listenPrivate(); err != nil {
		s.Abort(link.CodeSource, "the sending sidecar could not resume its source")
		return err
	}
	if err := m.src.MigrateResume(qctx, "unix:"+m.private.Addr().String()); err != nil {
		s.Abort(link.CodeSource, "the source did not resume")
		return fmt.Errorf("resuming the source (migrate resume): %w", err)
	}
	actx, acancel := context.WithTimeout(ctx, 10*time.Second)
	defer acancel()
	sconn, err := acceptBefore(actx, m.private)
	if err != nil {
		s.Abort(link.CodeSource, "the source did not reconnect")
		return fmt.Errorf("the source did not reconnect: %w", err)
	}
	m.defer_(func() { sconn.Close() })
	start := time.Now()
	m.event("recovery", "both sides connected again: resuming")
	sum, err := m.engine.ResumeLink(context.WithoutCancel(ctx), sconn, s)
	if err != nil {
		return err
	}
	m.event("recovery", fmt.Sprintf("recovered: the migration finished %v after the resume", time.Since(start).Round(time.Millisecond)))
	m.resumedSum = sum
	return nil
}

// recoverPostcopy is the receiving end's recovery: it repairs the link and lets the engine
// finish, or reports the state of the destination and what to do.
func (r *receiving) recoverPostcopy(ctx context.Context, eng *savevm.Receiver, cfg link.Config, cause error) (Summary, error) {
	timeout := r.o.RecoverTimeout
	if timeout <= 0 {
		timeout = DefaultRecoverTimeout
	}
	deadline := time.Now().Add(timeout)
	r.event(fmt.Sprintf("the link broke during postcopy (%v): recovering", cause))
	backoff := 250 * time.Millisecond
	recovering := false // the destination listens (migrate-recover done)
	last := cause
	for attempt := 1; ; attempt++ {
		if time.Now().After(deadline) {
			return Summary{}, r.postcopyFailed(fmt.Errorf("could not recover within --recover-timeout %v (%d attempts; last: %w)", timeout, attempt-1, last), "")
		}
		sum, err := r.recoverOnce(ctx, eng, cfg, deadline, &recovering)
		if err == nil {
			return sum, nil
		}
		var gone *goneError
		if errors.As(err, &gone) {
			r.tellSender(cfg, gone.Error())
			return Summary{}, r.postcopyFailed(err, gone.hint)
		}
		last = err
		r.event(fmt.Sprintf("attempt %d: %v; retrying in %v", attempt, err, backoff))
		select {
		case <-time.After(backoff):
		case <-time.After(time.Until(deadline)):
		}
		backoff = min(2*backoff, maxRecoverBackoff)
	}
}

// recoverOnce is one attempt of the receiving end.
func (r *receiving) recoverOnce(ctx context.Context, eng *savevm.Receiver, cfg link.Config, deadline time.Time, recovering *bool) (Summary, error) {
	qctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if !*recovering {
		if err := pauseIfUnaware(qctx, r.dst, func(_, msg string) { r.event(msg) }); err != nil && isGone(err) {
			return Summary{}, destinationGone(err)
		}
		if st, err := waitState(qctx, r.dst, "postcopy-paused"); err != nil {
			if isGone(err) {
				return Summary{}, destinationGone(err)
			}
			if st == "completed" {
				return Summary{}, &goneError{errors.New("the destination completed the migration as the link broke: it has the whole stream"),
					"The guest runs on the destination with all its memory: check it there; the source completes when it gets the destination's SHUT, else quit it"}
			}
			return Summary{}, fmt.Errorf("the destination: %w", err)
		}
		if err := r.dst.MigrateRecover(qctx, r.o.To.String()); err != nil {
			return Summary{}, fmt.Errorf("migrate-recover on the destination: %w", err)
		}
		*recovering = true
	}
	l, err := link.Listen(r.o.Listen, cfg)
	if err != nil {
		return Summary{}, err
	}
	l.RequirePeer(r.session.PeerCertificate())
	if r.o.Listening != nil {
		r.o.Listening(l.Addr().String())
	}
	token := r.session.Token()
	var dconn transport.Conn
	actx, acancel := context.WithDeadline(ctx, deadline)
	defer acancel()
	s, err := l.Accept(actx, func(h link.Hello) (link.Welcome, error) {
		if h.Resume != token {
			return link.Welcome{}, refusal{errors.New("this receiver is recovering a postcopy migration and takes only its sender back")}
		}
		octx, ocancel := context.WithTimeout(context.Background(), r.o.ConnectTimeout)
		defer ocancel()
		c, err := transport.Open(octx, r.o.To)
		if err != nil {
			return link.Welcome{}, fmt.Errorf("the destination does not listen again: %w", err)
		}
		dconn = c
		return link.Welcome{Connections: h.Connections, Compress: link.CodecNames(), Features: []string{"status", link.FeaturePostcopy},
			Destination: &link.Endpoint{QEMU: r.version, Machine: r.machine}}, nil
	})
	if err != nil {
		if dconn != nil {
			dconn.Abort() // the destination saw a connection break again: recover it again
			*recovering = false
		}
		return Summary{}, err
	}
	*recovering = false // from here, a new break starts again from postcopy-paused
	r.adoptSession(s)
	r.adoptDestination(dconn)
	transport.LowLatency(dconn, postcopyUnsent)
	start := time.Now()
	r.event("both sides connected again: resuming")
	sum, err := eng.Resume(ctx, s, dconn)
	if err != nil {
		return sum, err
	}
	r.event(fmt.Sprintf("recovered: the migration finished %v after the resume", time.Since(start).Round(time.Millisecond)))
	return sum, nil
}

// tellSender answers the sender's next HELLO with why nothing can be recovered (ERROR 3), so
// that it stops retrying and reports; bounded, since the sender may be gone too.
func (r *receiving) tellSender(cfg link.Config, why string) {
	l, err := link.Listen(r.o.Listen, cfg)
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), tellSenderWithin)
	defer cancel()
	l.Accept(ctx, func(link.Hello) (link.Welcome, error) {
		return link.Welcome{}, destinationCode{errors.New(why)}
	})
}

// tellSenderWithin is how long a receiver that cannot recover waits for the sender's next
// attempt (it redials at most every 2.5 s).
const tellSenderWithin = 10 * time.Second

// destinationCode makes Accept answer ERROR 3 (destination).
type destinationCode struct{ error }

func (destinationCode) LinkCode() link.ErrorCode { return link.CodeDestination }

// postcopyFailed reports a receiving end that cannot recover: the guest runs on (or is lost
// with) the destination; the source must never be resumed.
func (r *receiving) postcopyFailed(cause error, hint string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if hint == "" {
		hint = "If both QEMUs are in postcopy-paused, recover by hand: on the destination's QMP `migrate-recover` {\"uri\": \"" + r.o.To.String() +
			"\"}, then on the source `migrate` {\"uri\": that address as reachable from the source, \"resume\": true}"
	}
	return &MigrateError{Class: ErrDestination, Phase: savevm.PhasePostcopy,
		Err: fmt.Errorf("%w; the guest runs on the destination since the switch to postcopy and its newest memory is there: never `cont` the source. The destination is %s. %s",
			cause, describeMigration(ctx, r.dst), hint)}
}

// event reports a recovery step of the receiving end.
func (r *receiving) event(msg string) {
	if r.o.Events != nil {
		r.o.Events(savevm.Event{Type: "recovery", Time: time.Now(), Side: "receiver", Phase: savevm.PhasePostcopy, Message: msg})
	}
	if r.o.Warn != nil {
		r.o.Warn(msg)
	}
}
