// Package migration tells the story of one migration from start to end — lock, pre-flight,
// hold, the engine's run, recovery, and the two ends of a link — around the engine of package
// savevm, so that the safety contract of design.md reads in one place.
package migration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/guestram"
	"github.com/qemu-migrate-go/qemu-migrate-go/link"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// MigrateOptions describe one migration of a running VM (the CLI's flags).
type MigrateOptions struct {
	Source qmp.Endpoint  // the source QEMU's monitor: QMP socket or libvirt domain
	To     transport.URI // where the destination QEMU listens (-incoming), or a file
	DstQMP string        // optional: the destination QEMU's QMP socket
	// NoPreflight skips the pre-flight checks that run when DstQMP is given (the machine type
	// is still compared).
	NoPreflight    bool
	savevm.Options // policy, events, warnings
	// ConnectTimeout bounds every connection set-up (QMP handshakes, the destination, the
	// source's connection to the private socket). Default 30 s.
	ConnectTimeout time.Duration
	// Link configures the link when To is a receiving sidecar (qmg://HOST:PORT).
	Link LinkOptions
	// Multifd > 0 turns multifd on at the source with that many channels (set back
	// afterwards); a source that has multifd on already is served as it is.
	Multifd int
	// RecoverTimeout bounds the automatic recovery of a postcopy whose connections broke
	// (default DefaultRecoverTimeout).
	RecoverTimeout time.Duration
	// Verify resumes the destination only once its RAM is proven equal to the paused source's
	// (verify.go); VerifyMethods, when set, are the reading methods allowed, in order.
	Verify        bool
	VerifyMethods []guestram.Method
}

// Failure classes, for exit codes (README "Exit codes").
var (
	ErrSource      = errors.New("source")
	ErrDestination = errors.New("destination")
	ErrPolicy      = errors.New("policy")
	ErrUsage       = errors.New("usage")
	// ErrCancelled: the caller's ctx ended (the CLI: SIGINT or SIGTERM); the error wraps
	// context.Cause, which says which signal.
	ErrCancelled = errors.New("cancelled")
)

// MigrateError is a failed migration: which side failed, in which phase, why, and what state the
// source VM was left in.
type MigrateError struct {
	Class       error        // ErrSource, ErrDestination, ErrPolicy, ErrUsage or ErrCancelled
	Phase       savevm.Phase // where it failed ("" before the stream started)
	SourceState string       // the source VM's run state after clean-up
	Err         error
}

func (e *MigrateError) Error() string {
	s := e.Class.Error() + ": " + e.Err.Error()
	if e.Phase != "" {
		s = fmt.Sprintf("%s (in the %s phase)", s, e.Phase)
	}
	if e.SourceState != "" {
		s += "; source VM is " + e.SourceState
	}
	return s
}

func (e *MigrateError) Unwrap() []error { return []error{e.Class, e.Err} }

// Migrate moves a live VM from the source QEMU to the destination through the engine
// (design.md, safety contract): until the destination has the complete stream any failure or
// cancellation of ctx cancels the source's migration and leaves the source VM in the run state
// it had; after that, the source is never resumed.
func Migrate(ctx context.Context, o MigrateOptions) (Summary, error) {
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 30 * time.Second
	}
	m := &migration{o: o, ctx: ctx}
	defer m.close()

	// 1. The request makes sense and no other sidecar drives this VM.
	if err := m.lock(); err != nil {
		return m.fail(ErrUsage, err)
	}
	// 2. The source answers and can be migrated; note the state to put it back in.
	if err := m.reachSource(ctx); err != nil {
		return m.fail(classOf(err, ErrSource), err)
	}
	// 3. The destination, before the source is touched: its QMP and the pre-flight checks,
	//    then its listening socket (a destination that is not there fails with the source
	//    untouched).
	if err := m.checkDestination(ctx); err != nil {
		return m.fail(classOf(err, ErrDestination), err)
	}
	if err := m.planMultifd(ctx); err != nil {
		return m.fail(classOf(err, ErrSource), err)
	}
	if err := m.preparePostcopy(ctx); err != nil {
		return m.fail(classOf(err, ErrDestination), err)
	}
	if err := m.prepareVerify(ctx); err != nil {
		return m.fail(classOf(err, ErrDestination), err)
	}
	if err := m.openDestination(ctx); err != nil {
		return m.fail(classOf(err, ErrDestination), err)
	}
	// 4. Hold the source for the policy (HoldDowntime) and let it migrate into a
	//    private socket. From here on every failure puts the source back.
	if err := m.startSource(ctx); err != nil {
		return m.recoverFrom(ctx, err, ErrSource, m.phase)
	}
	// 5. The engine relays until the destination has the complete stream.
	sum, err := m.run(ctx)
	if err != nil {
		var ue *savevm.UncertainError
		if errors.As(err, &ue) {
			return m.uncertain(err)
		}
		if m.engine == nil {
			return m.recoverFrom(ctx, err, classOf(err, ErrSource), m.phase)
		}
		if m.engine.Started() {
			// The guest runs on the destination: never undo; repair the connection instead.
			m.resumedSum = sum
			return m.recoverPostcopy(ctx, err)
		}
		return m.recoverFrom(ctx, err, classify(err, ctx), m.engine.Phase())
	}
	// 6. The destination has it all: the source is never resumed; see the destination run.
	return m.finish(sum)
}

// Summary is what a finished migration reports (savevm.Summary).
type Summary = savevm.Summary

// migration is the state of one run of Migrate.
type migration struct {
	o       MigrateOptions
	ctx     context.Context // the caller's: cancelled by a signal
	cleanup []func()        // run in reverse order by close

	src     *qmp.Client
	before  string         // the source's run state before anything changed
	params  map[string]any // the source's migration parameters before Hold
	dst     *qmp.Client    // the destination's QMP (--dst-qmp), nil without it
	dconn   transport.Conn // the destination's stream connection
	private net.Listener   // the private socket the source migrates into
	sconn   net.Conn       // the source's connection to it
	// multifd is how the source's multifd channels are served; channels what the engine gets.
	multifd  *multifdPlan
	channels *savevm.Multifd

	session    *link.Session // the link to a receiving sidecar (To is qmg://)
	engine     *savevm.Relay
	resumedSum Summary   // what the relay reported after a postcopy recovery
	verify     *verifier // --verify: both sides located (prepareVerify)
	phase      savevm.Phase
	delivered  bool // the destination has the complete stream: never resume the source
}

func (m *migration) defer_(f func()) { m.cleanup = append(m.cleanup, f) }

func (m *migration) close() {
	for i := len(m.cleanup) - 1; i >= 0; i-- {
		m.cleanup[i]()
	}
}

// untouched is the source state a failure before startSource leaves.
func (m *migration) untouched() string {
	if m.before == "" {
		return ""
	}
	return m.before + " (untouched)"
}

// fail reports a failure before the source was changed.
func (m *migration) fail(class, err error) (Summary, error) {
	return Summary{}, &MigrateError{Class: class, Err: err, SourceState: m.untouched()}
}

// usageError marks an error of the request (exit code 2) met while reaching the source.
type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

func classOf(err error, def error) error {
	var u usageError
	if errors.As(err, &u) {
		return ErrUsage
	}
	return def
}

func (m *migration) lock() error {
	if err := m.o.Policy.Validate(); err != nil {
		return err
	}
	if err := m.o.Source.Validate(); err != nil {
		return err
	}
	unlock, err := lockSource(m.o.Source)
	if err != nil {
		return err
	}
	m.defer_(unlock)
	return nil
}

// reachSource connects to the source's monitor and checks that it can be migrated now.
func (m *migration) reachSource(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, m.o.ConnectTimeout)
	defer cancel()
	src, err := m.o.Source.Dial(cctx)
	if err != nil {
		return err
	}
	m.src = src
	m.defer_(func() { src.Close() })
	st, err := src.QueryStatus(cctx)
	if err != nil {
		return err
	}
	m.before = st.Status
	if mi, err := src.QueryMigrate(cctx); err != nil {
		return err
	} else if mi.Status != "" && !mi.Finished() {
		return usageError{fmt.Errorf("the source already has a migration %s", mi.Status)}
	}
	switch st.Status {
	case "running", "paused":
	default:
		return fmt.Errorf("source VM is %q; only a running or paused VM can be migrated", st.Status)
	}
	if m.params, err = src.QueryParameters(cctx); err != nil {
		return err
	}
	return nil
}

// checkDestination reaches the destination's QMP when it is given: it must wait for an incoming
// migration, and the pre-flight checks (or, with NoPreflight, the machine type) must pass. Its
// version selects the engine's compatibility rules.
func (m *migration) checkDestination(ctx context.Context) error {
	if m.o.DstQMP == "" {
		return nil
	}
	if m.o.To.IsLink() {
		return usageError{errors.New("--dst-qmp names the destination QEMU's monitor, which is on the receiver's host: give it to `receive` there")}
	}
	cctx, cancel := context.WithTimeout(ctx, m.o.ConnectTimeout)
	defer cancel()
	dst, err := qmp.DialUnix(cctx, m.o.DstQMP)
	if err != nil {
		return err
	}
	m.dst = dst
	m.defer_(func() { dst.Close() })
	series, err := destinationSeries(cctx, dst)
	if err != nil {
		return err
	}
	m.o.DstSeries = series
	if m.o.NoPreflight {
		return sameMachine(cctx, m.src, dst)
	}
	return runPreflight(cctx, m.src, dst, m.o.Options)
}

// openDestination connects to where the stream goes, and makes the private socket the source
// will migrate into (a fresh 0700 folder, removed afterwards).
func (m *migration) openDestination(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, m.o.ConnectTimeout)
	defer cancel()
	if m.o.To.IsLink() {
		if err := m.dialLink(cctx); err != nil {
			return err
		}
		return m.listenPrivate()
	}
	dconn, err := transport.Open(cctx, m.o.To)
	if err != nil {
		return err
	}
	m.dconn = dconn
	m.defer_(func() {
		if !m.delivered {
			dconn.Abort() // a reset, never a clean end of stream
		}
	})
	if err := m.openChannels(cctx); err != nil {
		return err
	}
	m.lowLatency()
	return m.listenPrivate()
}

// listenPrivate makes the private socket the source QEMU migrates into.
func (m *migration) listenPrivate() error {
	dir, err := os.MkdirTemp("", "qemu-migrate-go-")
	if err != nil {
		return err
	}
	m.defer_(func() { os.RemoveAll(dir) })
	l, err := net.Listen("unix", filepath.Join(dir, "source.sock"))
	if err != nil {
		return err
	}
	m.private = l
	m.defer_(func() { l.Close() })
	return nil
}

// startSource holds the source's switchover for the policy and starts its migration into the
// private socket. The capabilities Hold turns on are set back as they were once no migration
// runs (after the recovery's cancel, or after completion).
func (m *migration) startSource(ctx context.Context) error {
	sctx, cancel := context.WithTimeout(context.Background(), m.o.ConnectTimeout)
	defer cancel()
	if err := m.keepCapabilities(sctx); err != nil {
		return err
	}
	if err := savevm.Hold(sctx, m.src, m.o.Policy, m.o.To.IsLink()); err != nil {
		return err
	}
	if err := m.enableMultifd(sctx); err != nil {
		return err
	}
	if err := m.src.Migrate(sctx, "unix:"+m.private.Addr().String()); err != nil {
		return err
	}
	m.phase = savevm.PhaseSetup
	actx, acancel := context.WithTimeout(ctx, m.o.ConnectTimeout)
	defer acancel()
	return m.acceptSource(actx)
}

// keepCapabilities arranges for the capabilities Hold turns on to be set back afterwards.
func (m *migration) keepCapabilities(ctx context.Context) error {
	caps, err := m.src.QueryCapabilities(ctx)
	if err != nil {
		return err
	}
	off := map[string]bool{}
	for name := range savevm.HoldCapabilities(m.o.Policy) {
		if !caps[name] {
			off[name] = false
		}
	}
	if len(off) > 0 {
		m.defer_(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			m.src.SetCapabilities(ctx, off)
		})
	}
	return nil
}

// run is the engine's part: the relay from the private socket to the destination, or over
// the link.
func (m *migration) run(ctx context.Context) (Summary, error) {
	m.o.KeepCPUState = m.o.Verify // the pages KVM rewrites on loading come from the cpu sections
	if m.session != nil {
		return m.runLink(ctx)
	}
	m.engine = savevm.NewRelay(m.sconn, m.dconn, m.src, m.o.Options)
	if m.channels != nil {
		m.engine.SetMultifd(m.channels)
	}
	return m.engine.Run(ctx)
}

// recoverFrom puts the source back after a failure before the destination had the complete
// stream: its migration cancelled, its parameters and run state as they were.
func (m *migration) recoverFrom(ctx context.Context, cause, class error, phase savevm.Phase) (Summary, error) {
	if ctx.Err() != nil {
		class, cause = ErrCancelled, context.Cause(ctx)
	}
	state := recoverSource(m.src, m.o.Source, m.before, m.params)
	if class == ErrDestination && m.dst != nil {
		if why := destinationSays(m.dst); why != "" {
			cause = fmt.Errorf("%w; %s", cause, why)
		}
	}
	return Summary{}, &MigrateError{Class: class, Phase: phase, Err: cause, SourceState: state}
}

// finish runs once the destination has the complete stream: from now on the source is never
// resumed. It takes QEMU's own figures and, with the destination's QMP, waits until it runs
// (resuming it when the policy paused the guest).
func (m *migration) finish(sum Summary) (Summary, error) {
	m.delivered = true
	wctx, cancel := context.WithTimeout(context.Background(), m.o.ConnectTimeout)
	defer cancel()
	if mi, err := m.src.WaitMigration(wctx, 20*time.Millisecond); err == nil {
		sum.QEMUDowntimeMs = mi.Downtime
	}
	if m.session != nil {
		if err := m.awaitStatus(wctx); err != nil {
			return sum, &MigrateError{Class: ErrDestination, Phase: savevm.PhaseDone, SourceState: "postmigrate",
				Err: fmt.Errorf("%w; the source stays paused in postmigrate: check the destination's log, and if it cannot run, resume the source with `cont` on its QMP", err)}
		}
	}
	if m.dst != nil {
		st, err := waitDestination(wctx, m.dst)
		if err != nil {
			return sum, &MigrateError{Class: ErrDestination, Phase: savevm.PhaseDone, SourceState: "postmigrate",
				Err: fmt.Errorf("the destination did not start after receiving the complete stream: %w; the source stays paused in postmigrate: check the destination's log, and if it cannot run, resume the source with `cont` on its QMP", err)}
		}
		if m.verify == nil && st == "paused" && sum.PausedByPolicy {
			if err := m.dst.Cont(wctx); err != nil {
				return sum, &MigrateError{Class: ErrDestination, Phase: savevm.PhaseDone, SourceState: "postmigrate",
					Err: fmt.Errorf("resuming the guest on the destination: %w", err)}
			}
		}
	}
	if m.verify != nil {
		// The destination (here, or the receiver's) holds paused: it runs only once its RAM
		// is the source's.
		var dst verifyPeer = localPeer{m.verify.dst}
		if m.session != nil {
			dst = linkPeer{m}
		}
		if err := m.verifyRAM(&sum, dst); err != nil {
			savevm.EmitSummary(m.o.Options, &sum)
			return sum, err
		}
	}
	savevm.EmitSummary(m.o.Options, &sum)
	return sum, nil
}

// classify tells whose fault an engine error is.
func classify(err error, ctx context.Context) error {
	var pe *savevm.PolicyError
	var de *savevm.DestinationError
	switch {
	case ctx.Err() != nil:
		return ErrCancelled
	case errors.As(err, &pe):
		return ErrPolicy
	case errors.As(err, &de):
		return ErrDestination
	}
	return ErrSource
}
