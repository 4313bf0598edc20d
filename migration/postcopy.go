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
		return usageError{errors.New("--postcopy over the link (qmg://) is not supported yet: relay it with --to tcp: and --dst-qmp")}
	case m.dst == nil:
		return usageError{errors.New("--postcopy needs --dst-qmp: the destination must have postcopy-ram too, and a recovery drives its migrate-recover")}
	case m.o.To.Scheme != "tcp" && m.o.To.Scheme != "unix":
		return usageError{fmt.Errorf("--postcopy needs a socket destination (tcp: or unix:): the destination asks for pages on the same connection, not %s", m.o.To)}
	case m.multifd != nil:
		return usageError{errors.New("--postcopy with a multifd source is not supported: turn multifd off on the source")}
	}
	// postcopy-preempt moves requested pages to a channel of their own (stream.PreemptReader
	// decodes it), which the relay does not serve yet: refuse it before anything is touched.
	for _, side := range []struct {
		name string
		c    *qmp.Client
	}{{"source", m.src}, {"destination", m.dst}} {
		caps, err := side.c.QueryCapabilities(ctx)
		if err != nil {
			return fmt.Errorf("the %s's capabilities: %w", side.name, err)
		}
		if caps["postcopy-preempt"] {
			return usageError{fmt.Errorf("--postcopy with postcopy-preempt on (the %s) is not supported: the sidecar relays postcopy on one channel; turn it off there (migrate-set-capabilities postcopy-preempt false)", side.name)}
		}
	}
	if err := m.dst.SetCapabilities(ctx, map[string]bool{"postcopy-ram": true}); err != nil {
		return fmt.Errorf("giving the destination postcopy-ram: %w (start it with -incoming defer if it refuses once listening)", err)
	}
	return nil
}

// lowLatency makes the destination connection keep little unsent data (postcopy: a requested
// page must not queue behind the background pages).
func (m *migration) lowLatency() {
	if m.o.Policy.Postcopy && m.dconn != nil {
		transport.LowLatency(m.dconn, 128<<10)
	}
}

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
	describe := func(c *qmp.Client) string {
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
	return describe(m.src), describe(m.dst)
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
	return fmt.Sprintf("If both are in postcopy-paused, recover: on the destination `migrate-recover` {\"uri\": \"%s\"}, then on the source `migrate` {\"uri\": \"%s\", \"resume\": true}; if the destination QEMU is gone, the guest is lost with it",
		m.o.To, m.o.To)
}
