package migration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// Recovery of a postcopy whose connections broke (design.md "Postcopy"). Both QEMUs then wait in
// postcopy-paused: the guest runs on the destination, which cannot get the pages it still
// lacks. The sidecar repairs it by itself, step by step as QEMU's own recovery goes:
//
//  1. both sides are in postcopy-paused (the relay closed its connections when it failed);
//  2. the destination listens again where it did (migrate-recover with --to's address), once;
//  3. the sidecar reaches it — retried with backoff while the network is down;
//  4. the source resumes into a fresh private socket (migrate with resume: true);
//  5. the relay goes on over the new connections: the source asks for the received bitmaps
//     (RECV_BITMAP), the destination sends them, POSTCOPY_RESUME, RESUME_ACK, then the pages
//     still missing.
//
// All within RecoverTimeout; a failure on the way starts again at 1. If it cannot succeed — the
// destination QEMU is gone, or the time is up — the error says the state of each side and what
// to run; the source is never resumed.

// DefaultRecoverTimeout is --recover-timeout's default.
const DefaultRecoverTimeout = 5 * time.Minute

// recoverPostcopy repairs the broken postcopy and lets the relay finish.
func (m *migration) recoverPostcopy(ctx context.Context, cause error) (Summary, error) {
	timeout := m.o.RecoverTimeout
	if timeout <= 0 {
		timeout = DefaultRecoverTimeout
	}
	deadline := time.Now().Add(timeout)
	m.event("recovery", fmt.Sprintf("the connection broke during postcopy (%v): recovering", cause))
	backoff := 250 * time.Millisecond
	recovering := false // the destination listens (migrate-recover done)
	last := cause
	for attempt := 1; ; attempt++ {
		if time.Now().After(deadline) {
			return m.postcopyFailed(fmt.Errorf("could not recover within --recover-timeout %v (%d attempts; last: %w)", timeout, attempt-1, last))
		}
		var err error
		if m.session != nil {
			err = m.recoverLinkOnce(ctx, deadline)
		} else {
			err = m.recoverOnce(ctx, deadline, &recovering)
		}
		if err == nil || m.nothingToRecover(err) {
			return m.finish(m.resumedSum)
		}
		var gone *goneError
		if errors.As(err, &gone) {
			return m.postcopyFailed(err)
		}
		last = err
		m.event("recovery", fmt.Sprintf("attempt %d: %v; retrying in %v", attempt, err, backoff))
		select {
		case <-time.After(backoff):
		case <-time.After(time.Until(deadline)):
		}
		backoff = min(2*backoff, maxRecoverBackoff)
	}
}

// goneError: a QEMU is gone (or the migration ended otherwise); nothing can recover. hint says
// what the operator can do.
type goneError struct {
	error
	hint string
}

// destinationGoneHint is what is left when the destination died after the switch.
const destinationGoneHint = "The source still holds the guest as it was at the switch (postcopy-paused): resuming it would roll the guest back while its disks and network peers have moved on; treat the VM as crashed and restart it from its disks"

func (e *goneError) Unwrap() error { return e.error }

// destinationGone is a destination QEMU that died after the switch.
func destinationGone(err error) error {
	return &goneError{fmt.Errorf("the destination QEMU is gone (%v): the guest's newest state was there", err), destinationGoneHint}
}

// sourcePaused waits for the source to wait in postcopy-paused (a goneError if it died).
func sourcePaused(ctx context.Context, src *qmp.Client) error {
	if st, err := waitState(ctx, src, "postcopy-paused"); err != nil {
		if st == "completed" {
			return errSourceCompleted
		}
		if isGone(err) {
			return &goneError{fmt.Errorf("the source QEMU is gone (%v): the pages the destination still lacks were there", err),
				"The destination cannot get the pages it lacks: its guest will stay paused on them; treat the VM as crashed and restart it from its disks"}
		}
		return fmt.Errorf("the source: %w", err)
	}
	return nil
}

// errSourceCompleted: the source completed its migration, on the destination's SHUT, before
// the link's break was noticed (the break was the end): there is nothing to recover.
var errSourceCompleted = errors.New("the source completed its migration")

// nothingToRecover reports err == errSourceCompleted, with an event.
func (m *migration) nothingToRecover(err error) bool {
	if !errors.Is(err, errSourceCompleted) {
		return false
	}
	m.event("recovery", "nothing to recover: the destination had the whole stream, and the source completed on its SHUT")
	return true
}

// recoverOnce is one attempt: paused sides, the destination listening, both connected, and the
// relay resumed until the end.
func (m *migration) recoverOnce(ctx context.Context, deadline time.Time, recovering *bool) error {
	qctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if !*recovering {
		if err := pauseIfUnaware(qctx, m.dst, m.event); err != nil {
			if isGone(err) {
				return destinationGone(err)
			}
			return fmt.Errorf("the destination: %w", err)
		}
		if st, err := waitState(qctx, m.dst, "postcopy-paused"); err != nil {
			if st == "completed" {
				// The destination had everything before the connection went: nothing to
				// recover. The source completes on the SHUT the destination sent.
				if sst, serr := waitState(qctx, m.src, "completed"); serr != nil {
					return &goneError{fmt.Errorf("the destination completed the migration, but the source's migration is %s (%v)", sst, serr),
						"The guest runs on the destination with all its memory: check it there, then quit the source"}
				}
				m.event("recovery", "nothing to recover: the destination had the whole stream, and both sides completed")
				return nil
			}
			if isGone(err) {
				return destinationGone(err)
			}
			return fmt.Errorf("the destination: %w", err)
		}
	}
	if err := sourcePaused(qctx, m.src); err != nil {
		return err
	}
	if !*recovering {
		if err := m.dst.MigrateRecover(qctx, m.o.To.String()); err != nil {
			return fmt.Errorf("migrate-recover on the destination: %w", err)
		}
		*recovering = true
	}
	// A short dial: on a link that is down the kernel retransmits SYN after 1 s and then 3 s, so
	// a new attempt every 2.5 s (with the backoff) reaches a destination within 1.5 s of the
	// link coming back (compat TestBenchPostcopy measures it).
	dctx, dcancel := context.WithTimeout(ctx, min(redialTimeout, time.Until(deadline)))
	defer dcancel()
	dconn, err := transport.Open(dctx, m.o.To)
	if err != nil {
		return fmt.Errorf("reaching the destination again: %w", err)
	}
	if err := m.listenPrivate(); err != nil {
		dconn.Abort()
		return err
	}
	if err := m.src.MigrateResume(qctx, "unix:"+m.private.Addr().String()); err != nil {
		dconn.Abort()
		return fmt.Errorf("resuming the source (migrate resume): %w", err)
	}
	actx, acancel := context.WithTimeout(ctx, 10*time.Second)
	defer acancel()
	sconn, err := acceptBefore(actx, m.private)
	if err != nil {
		dconn.Abort()
		return fmt.Errorf("the source did not reconnect: %w", err)
	}
	m.defer_(func() { sconn.Close() })
	*recovering = false // from here, a new break starts again from postcopy-paused
	m.dconn = dconn
	m.defer_(func() {
		if !m.delivered {
			dconn.Abort()
		}
	})
	transport.LowLatency(dconn, postcopyUnsent)
	start := time.Now()
	m.event("recovery", "both sides connected again: resuming")
	sum, err := m.engine.Resume(context.WithoutCancel(ctx), sconn, dconn)
	if err != nil {
		return err
	}
	m.event("recovery", fmt.Sprintf("recovered: the migration finished %v after the resume", time.Since(start).Round(time.Millisecond)))
	m.resumedSum = sum
	return nil
}

// Recovery's pace (see recoverOnce).
const (
	redialTimeout     = 2 * time.Second
	maxRecoverBackoff = 500 * time.Millisecond
	// unawareAfter: a destination still in postcopy-active this long after the sidecar saw its
	// connection break has not noticed (a link that went silent rather than reset: no RST
	// reached it) and is paused with migrate-pause, so that it listens again.
	unawareAfter = time.Second
)

// pauseIfUnaware pauses a destination that has not noticed the break (see unawareAfter).
func pauseIfUnaware(ctx context.Context, dst *qmp.Client, event func(typ, msg string)) error {
	wctx, cancel := context.WithTimeout(ctx, unawareAfter)
	st, err := waitState(wctx, dst, "postcopy-paused")
	cancel()
	if err == nil || st != "postcopy-active" {
		return nil // paused by itself, or a state waitState reports next
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	event("recovery", fmt.Sprintf("the destination has not noticed the break after %v (its link went silent): pausing it with migrate-pause", unawareAfter))
	if err := dst.MigratePause(ctx); err != nil && isGone(err) {
		return err
	}
	return nil
}

// waitState waits until c's migration is in state (postcopy-paused), or returns the state it
// stayed in.
func waitState(ctx context.Context, c *qmp.Client, state string) (string, error) {
	for {
		mi, err := c.QueryMigrate(ctx)
		if err != nil {
			return "", err
		}
		if mi.Status == state {
			return state, nil
		}
		if mi.Finished() {
			return mi.Status, fmt.Errorf("its migration is %s: %s", mi.Status, mi.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return mi.Status, fmt.Errorf("migration %s, not %s: %w", mi.Status, state, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// isGone reports a QMP connection that is closed or reset: the QEMU behind it has exited (a
// live QEMU keeps its monitor connections open).
func isGone(err error) bool {
	return errors.Is(err, qmp.ErrClosed) || errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNREFUSED)
}

// event sends a recovery event to the caller.
func (m *migration) event(typ, msg string) {
	emit(m.o.Events, typ, savevm.PhasePostcopy, msg)
	if m.o.Warn != nil {
		m.o.Warn(msg)
	}
}
