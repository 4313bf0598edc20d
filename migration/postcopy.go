package migration

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// Postcopy in the story of a migration (design.md "Postcopy", safety contract rule 5). Before
// the switch every rule of precopy holds: a failure puts the source back. After it the guest
// runs on the destination, which holds its newest state: the source is never resumed, and a
// broken connection is recovered, or reported with the exact state of both sides and the
// commands to run.

// preparePostcopy checks what --postcopy needs and gives the destination postcopy-ram (the
// source gets it with the other held capabilities).
func (m *migration) preparePostcopy(ctx context.Context) error {
	if !m.o.Policy.Postcopy {
		return nil
	}
	switch {
	case m.o.To.IsLink():
		// The receiving sidecar gives its destination postcopy-ram, and drives its side of a
		// recovery (feature postcopy in HELLO, dialLink); only the source is checked here.
		if m.multifd != nil {
			return usageError{errors.New("--postcopy with a multifd source is not supported: turn multifd off on the source")}
		}
		return refusePreempt(ctx, "source", m.src)
	case m.dst == nil:
		return usageError{errors.New("--postcopy needs --dst-qmp: the destination must have postcopy-ram too, and a recovery drives its migrate-recover")}
	case m.o.To.Scheme != "tcp" && m.o.To.Scheme != "unix":
		return usageError{fmt.Errorf("--postcopy needs a socket destination (tcp: or unix:): the destination asks for pages on the same connection, not %s", m.o.To)}
	case m.multifd != nil:
		return usageError{errors.New("--postcopy with a multifd source is not supported: turn multifd off on the source")}
	}
	if err := refusePreempt(ctx, "source", m.src); err != nil {
		return err
	}
	return givePostcopy(ctx, m.dst)
}

// refusePreempt refuses a side with postcopy-preempt on before anything is touched: it moves
// requested pages to a channel of their own (stream.PreemptReader decodes it), which the
// sidecar does not serve yet.
func refusePreempt(ctx context.Context, side string, c *qmp.Client) error {
	caps, err := c.QueryCapabilities(ctx)
	if err != nil {
		return fmt.Errorf("the %s's capabilities: %w", side, err)
	}
	if caps["postcopy-preempt"] {
		return usageError{fmt.Errorf("--postcopy with postcopy-preempt on (the %s) is not supported: the sidecar relays postcopy on one channel; turn it off there (migrate-set-capabilities postcopy-preempt false)", side)}
	}
	return nil
}

// givePostcopy checks the destination and gives it postcopy-ram (relay mode here, or the
// receiving end of a link).
func givePostcopy(ctx context.Context, dst *qmp.Client) error {
	if err := refusePreempt(ctx, "destination", dst); err != nil {
		return err
	}
	if err := dst.SetCapabilities(ctx, map[string]bool{"postcopy-ram": true}); err != nil {
		return fmt.Errorf("giving the destination postcopy-ram: %w (start it with -incoming defer if it refuses once listening)", err)
	}
	return nil
}

// lowLatency makes the destination connection keep little unsent data (postcopy: a requested
// page must not queue behind the background pages).
func (m *migration) lowLatency() {
	if m.o.Policy.Postcopy && m.dconn != nil {
		transport.LowLatency(m.dconn, postcopyUnsent)
	}
}

// postcopyUnsent is what a destination connection may hold unsent in postcopy (TCP_NOTSENT_LOWAT):
// the relay's, and the receiver's of a link.
const postcopyUnsent = 128 << 10

// postcopyFailed reports a failure after the switch to postcopy: the source is never resumed.
// It says what state each side is in and what to run.
func (m *migration) postcopyFailed(cause error) (Summary, error) {
	m.delivered = true // nothing in the clean-up may resume the source or reset as if before
	srcState, dstState := m.states()
	hint := m.recoveryHint()
	var gone *goneError
	if errors.As(cause, &gone) {
		hint = gone.hint
	}
	return Summary{}, &MigrateError{Class: ErrDestination, Phase: savevm.PhasePostcopy, SourceState: srcState,
		Err: fmt.Errorf("%w; the guest runs on the destination since the switch to postcopy and its newest memory is there: never `cont` the source. The destination is %s. %s",
			cause, dstState, hint)}
}

// states reads both sides' run and migration states, for the report (bounded).
func (m *migration) states() (src, dst string) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	dst = describeMigration(ctx, m.dst)
	if m.session != nil {
		dst = "on the receiver's host (its sidecar reports it)"
	}
	return describeMigration(ctx, m.src), dst
}

// describeMigration is c's run and migration state, for a report.
func describeMigration(ctx context.Context, c *qmp.Client) string {
	st, ok := runState(ctx, c)
	if !ok {
		return st
	}
	mi, err := c.QueryMigrate(ctx)
	if err != nil {
		return st
	}
	return fmt.Sprintf("%s, migration %s", st, mi.Status)
}

// runState is c's run state, or what stands in its place in a report when it cannot be read
// (ok false).
func runState(ctx context.Context, c *qmp.Client) (state string, ok bool) {
	if c == nil {
		return "unknown (no QMP)", false
	}
	st, err := c.QueryStatus(ctx)
	if err != nil {
		return "unknown: its QMP does not answer (" + err.Error() + ")", false
	}
	return st.Status, true
}

// recoveryHint says how to recover a paused postcopy by hand.
func (m *migration) recoveryHint() string {
	if m.session != nil {
		return fmt.Sprintf("If both are in postcopy-paused and the receiving sidecar has exited, recover by hand: on the destination's QMP `migrate-recover` {\"uri\": its -incoming address}, then on the source `migrate` {\"uri\": that address as reachable from here, \"resume\": true}; while the receiver runs, it takes a new link from `%s`", m.o.To)
	}
	return fmt.Sprintf("If both are in postcopy-paused, recover: on the destination `migrate-recover` {\"uri\": \"%s\"}, then on the source `migrate` {\"uri\": \"%s\", \"resume\": true}; if the destination QEMU is gone, the guest is lost with it",
		m.o.To, m.o.To)
}
