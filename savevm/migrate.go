package savevm

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/preflight"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// MigrateOptions describe one relay migration of a running VM (the CLI's flags).
type MigrateOptions struct {
	Source qmp.Endpoint  // the source QEMU's monitor: QMP socket or libvirt domain
	To     transport.URI // where the destination QEMU listens (-incoming), or a file
	DstQMP string        // optional: the destination QEMU's QMP socket
	// NoPreflight skips the pre-flight checks that run when DstQMP is given (the machine type
	// is still compared).
	NoPreflight bool
	Options     // policy, events, warnings
	// ConnectTimeout bounds every connection set-up (QMP handshakes, the destination, the
	// source's connection to the private socket). Default 30 s.
	ConnectTimeout time.Duration
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
	Class       error  // ErrSource, ErrDestination, ErrPolicy or ErrUsage
	Phase       Phase  // where it failed ("" before the stream started)
	SourceState string // the source VM's run state after clean-up
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

// Migrate relays a live migration from the source QEMU to the destination (design.md, safety
// contract): until the destination has the complete stream any failure or cancellation of ctx
// cancels the source's migration and leaves the source VM in the run state it had; after that,
// the source is never resumed.
func Migrate(ctx context.Context, o MigrateOptions) (Summary, error) {
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 30 * time.Second
	}
	untouched := "" // the source's state once known: failures before `migrate` leave it so
	fail := func(class error, phase Phase, err error) (Summary, error) {
		return Summary{}, &MigrateError{Class: class, Phase: phase, Err: err, SourceState: untouched}
	}
	if err := o.Policy.Validate(); err != nil {
		return fail(ErrUsage, "", err)
	}
	if err := o.Source.Validate(); err != nil {
		return fail(ErrUsage, "", err)
	}
	unlock, err := lockSource(o.Source)
	if err != nil {
		return fail(ErrUsage, "", err)
	}
	defer unlock()

	cctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout)
	defer cancel()
	src, err := o.Source.Dial(cctx)
	if err != nil {
		return fail(ErrSource, "", err)
	}
	defer src.Close()
	before, err := src.QueryStatus(cctx)
	if err != nil {
		return fail(ErrSource, "", err)
	}
	untouched = before.Status + " (untouched)"
	if m, err := src.QueryMigrate(cctx); err != nil {
		return fail(ErrSource, "", err)
	} else if m.Status != "" && !m.Finished() {
		return fail(ErrUsage, "", fmt.Errorf("the source already has a migration %s", m.Status))
	}
	switch before.Status {
	case "running", "paused":
	default:
		return fail(ErrSource, "", fmt.Errorf("source VM is %q; only a running or paused VM can be migrated", before.Status))
	}
	var dst *qmp.Client
	if o.DstQMP != "" {
		if dst, err = qmp.DialUnix(cctx, o.DstQMP); err != nil {
			return fail(ErrDestination, "", err)
		}
		defer dst.Close()
		st, err := dst.QueryStatus(cctx)
		if err != nil {
			return fail(ErrDestination, "", err)
		}
		if st.Status != "inmigrate" {
			return fail(ErrDestination, "", fmt.Errorf("destination VM is %q, not waiting for an incoming migration (-incoming)", st.Status))
		}
		v, err := dst.QueryVersion(cctx)
		if err != nil {
			return fail(ErrDestination, "", err)
		}
		o.DstSeries = fmt.Sprintf("%d.%d", v.QEMU.Major, v.QEMU.Minor)
		if o.NoPreflight {
			if err := sameMachine(cctx, src, dst); err != nil {
				return fail(ErrDestination, "", err)
			}
		} else if err := runPreflight(cctx, src, dst, o.Options); err != nil {
			return fail(ErrDestination, "", err)
		}
	}
	params, err := src.QueryParameters(cctx)
	if err != nil {
		return fail(ErrSource, "", err)
	}

	// The private socket the source QEMU migrates into: a fresh 0700 folder, removed afterwards.
	dir, err := os.MkdirTemp("", "qemu-migrate-go-")
	if err != nil {
		return fail(ErrUsage, "", err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "source.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		return fail(ErrUsage, "", err)
	}
	defer l.Close()

	// Connect to the destination before touching the source: a destination that is not
	// listening fails here with the source untouched.
	dconn, err := transport.Open(cctx, o.To)
	if err != nil {
		return fail(ErrDestination, "", err)
	}
	delivered := false
	defer func() {
		if !delivered {
			dconn.Abort()
		}
	}()

	// From here on the source is changed: every failure path restores it. The commands that
	// change it are not cut short by a cancelled ctx (a QMP call given up closes the monitor
	// connection, and the recovery would have none): a signal is acted on between them.
	restore := func(cause error, class error, phase Phase) (Summary, error) {
		if ctx.Err() != nil {
			class, cause = ErrCancelled, context.Cause(ctx)
		}
		return Summary{}, &MigrateError{Class: class, Phase: phase, Err: cause,
			SourceState: recoverSource(src, o.Source, before.Status, params)}
	}
	sctx, scancel := context.WithTimeout(context.Background(), o.ConnectTimeout)
	defer scancel()
	// Hold turns capabilities on (events, and auto-converge when asked); leave them as they
	// were. They can change only once no migration runs: this runs after the recovery's cancel,
	// or after completion.
	caps, err := src.QueryCapabilities(sctx)
	if err != nil {
		return fail(ErrSource, "", err)
	}
	off := map[string]bool{}
	for name := range holdCapabilities(o.Policy) {
		if !caps[name] {
			off[name] = false
		}
	}
	if len(off) > 0 {
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			src.SetCapabilities(ctx, off)
		}()
	}
	if err := Hold(sctx, src, o.Policy); err != nil {
		return restore(err, ErrSource, "")
	}
	if err := src.Migrate(sctx, "unix:"+sock); err != nil {
		return restore(err, ErrSource, "")
	}
	sconn, err := acceptBefore(cctx, l)
	if err != nil {
		return restore(fmt.Errorf("the source QEMU did not connect to the private socket: %w", err), ErrSource, PhaseSetup)
	}
	defer sconn.Close()

	relay := NewRelay(sconn, dconn, src, o.Options)
	sum, err := relay.Run(ctx)
	if err != nil {
		class := classify(err, ctx)
		if class == ErrCancelled {
			err = context.Cause(ctx)
		}
		state := recoverSource(src, o.Source, before.Status, params)
		if class == ErrDestination && dst != nil {
			if why := destinationSays(dst); why != "" {
				err = fmt.Errorf("%w; %s", err, why)
			}
		}
		return Summary{}, &MigrateError{Class: class, Phase: relay.Phase(), Err: err, SourceState: state}
	}
	delivered = true

	// The destination has the complete stream: from now on the source is never resumed.
	wctx, wcancel := context.WithTimeout(context.Background(), o.ConnectTimeout)
	defer wcancel()
	if m, err := src.WaitMigration(wctx, 20*time.Millisecond); err == nil {
		sum.QEMUDowntimeMs = m.Downtime
	}
	if dst != nil {
		st, err := waitDestination(wctx, dst)
		if err != nil {
			return sum, &MigrateError{Class: ErrDestination, Phase: PhaseDone, SourceState: "postmigrate",
				Err: fmt.Errorf("the destination did not start after receiving the complete stream: %w; the source stays paused in postmigrate: check the destination's log, and if it cannot run, resume the source with `cont` on its QMP", err)}
		}
		if st == "paused" && sum.PausedByPolicy {
			if err := dst.Cont(wctx); err != nil {
				return sum, &MigrateError{Class: ErrDestination, Phase: PhaseDone, SourceState: "postmigrate",
					Err: fmt.Errorf("resuming the guest on the destination: %w", err)}
			}
		}
	}
	EmitSummary(o.Options, sum)
	return sum, nil
}

// sameMachine checks, before anything is sent, that the destination runs the machine type the
// stream will name: a destination compares the received name with its own (stream-format.md §1)
// and rejects the whole migration otherwise — after the source has sent it all.
func sameMachine(ctx context.Context, src, dst *qmp.Client) error {
	sm, err := src.MachineType(ctx)
	if err != nil {
		return fmt.Errorf("reading the source's machine type: %w", err)
	}
	dm, err := dst.MachineType(ctx)
	if err != nil {
		return fmt.Errorf("reading the destination's machine type: %w", err)
	}
	if sm != dm {
		return fmt.Errorf("machine type %q on the source, %q on the destination: the destination would reject the stream; start both with the same versioned type (e.g. -machine %s)", sm, dm, sm)
	}
	return nil
}

// runPreflight compares the two QEMUs (the preflight command's checks) before anything is
// sent: errors stop the migration with the source untouched, warnings are passed on.
func runPreflight(ctx context.Context, src, dst *qmp.Client, o Options) error {
	sf, err := preflight.Gather(ctx, src)
	if err != nil {
		return fmt.Errorf("preflight: reading the source: %w", err)
	}
	df, err := preflight.Gather(ctx, dst)
	if err != nil {
		return fmt.Errorf("preflight: reading the destination: %w", err)
	}
	rep := preflight.Compare(sf, df)
	if o.Warn != nil {
		for _, c := range rep.Checks {
			if c.Severity == preflight.SeverityWarning {
				o.Warn("preflight: " + c.Name + ": " + c.Message)
			}
		}
	}
	return rep.Err()
}

// classify tells whose fault a relay error is.
func classify(err error, ctx context.Context) error {
	var pe *PolicyError
	var de *DestinationError
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

// recoverSource cancels the source's migration and puts the VM back in the run state it had,
// with the migration parameters it had; it returns the state it ended in. When the monitor
// connection is gone (a call ran past its deadline, which closes it), it tries a fresh one on
// the same endpoint, briefly; a source whose QMP does not answer is reported with what is left to do.
func recoverSource(src *qmp.Client, ep qmp.Endpoint, wasState string, params map[string]any) string {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	restore := map[string]any{}
	for _, k := range []string{"downtime-limit", "max-bandwidth"} {
		if v, ok := params[k]; ok {
			restore[k] = v
		}
	}
	manual := func(why error) string {
		b, _ := json.Marshal(restore)
		s := fmt.Sprintf("unknown: its QMP does not answer (%v); when it does: `migrate_cancel` if query-migrate shows a migration, `migrate-set-parameters` %s", why, b)
		if wasState == "running" {
			s += ", and `cont` if it is not running"
		}
		return s
	}
	m, err := src.QueryMigrate(ctx)
	if err != nil {
		c, derr := redial(ctx, ep)
		if derr != nil {
			return manual(derr)
		}
		defer c.Close()
		src = c
		if m, err = src.QueryMigrate(ctx); err != nil {
			return manual(err)
		}
	}
	if !m.Finished() {
		src.MigrateCancel(ctx)
		src.WaitMigration(ctx, 20*time.Millisecond) // until cancelled (or, too late, completed)
	}
	if err := src.SetParameters(ctx, restore); err != nil {
		return manual(err)
	}
	st, err := src.QueryStatus(ctx)
	if err != nil {
		return manual(err)
	}
	// The source may have stopped the guest for the switchover (finish-migrate, postmigrate)
	// while the destination never got the complete stream: it is safe — and required — to
	// resume it there and only there.
	if wasState == "running" && st.Status != "running" {
		if err := src.Cont(ctx); err != nil {
			return st.Status + " (cont failed: " + err.Error() + ")"
		}
		if st, err = src.QueryStatus(ctx); err != nil {
			return manual(err)
		}
	}
	return st.Status
}

// redial opens a fresh monitor connection for the recovery. A QMP socket gets one try of 3 s:
// a QEMU that does not answer its socket is not coming back. libvirtd is a daemon that its
// service manager restarts (upgrades do it too), so a libvirt endpoint is retried for 20 s.
func redial(ctx context.Context, ep qmp.Endpoint) (*qmp.Client, error) {
	limit := 3 * time.Second
	if ep.Socket == "" {
		limit = 20 * time.Second
	}
	rctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for {
		dctx, dcancel := context.WithTimeout(rctx, 3*time.Second)
		c, err := ep.Dial(dctx)
		dcancel()
		if err == nil || ep.Socket != "" {
			return c, err
		}
		select {
		case <-rctx.Done():
			return nil, err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// waitDestination waits until the destination has loaded the stream and runs (or stays paused,
// -S). It stops early when the destination's own migration failed or QEMU exited.
func waitDestination(ctx context.Context, dst *qmp.Client) (string, error) {
	for {
		st, err := dst.QueryStatus(ctx)
		if err != nil {
			if ctx.Err() == nil {
				return "", errors.New(dstExited)
			}
			return "", err
		}
		switch st.Status {
		case "running", "paused":
			return st.Status, nil
		}
		if m, err := dst.QueryMigrate(ctx); err == nil && m.Status == "failed" {
			return "", fmt.Errorf("the destination QEMU failed to load it: %s", orUnknown(m.ErrorDesc))
		}
		select {
		case <-ctx.Done():
			return st.Status, fmt.Errorf("status %q: %w", st.Status, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

const dstExited = "its QMP connection closed: the destination QEMU has exited (its own error is in its log)"

// destinationSays asks the destination QEMU, after the relay failed on the destination side,
// what it makes of it. QEMU exits when it fails to load a stream (its error goes to its own
// stderr, which the sidecar cannot read), unless it was started with `-incoming defer` and
// `migrate-incoming` with exit-on-error=false (QEMU ≥ 9.1): then it stays up and reports the
// error in query-migrate's error-desc. Bounded: "" when it says nothing within 2 s.
func destinationSays(dst *qmp.Client) string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for {
		m, err := dst.QueryMigrate(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			return dstExited
		case err != nil:
			return ""
		case m.Status == "failed":
			return "the destination QEMU says: " + orUnknown(m.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return ""
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func orUnknown(s string) string {
	if s == "" {
		return "migration failed (no error-desc)"
	}
	return s
}

func acceptBefore(ctx context.Context, l net.Listener) (net.Conn, error) {
	if ul, ok := l.(*net.UnixListener); ok {
		d, _ := ctx.Deadline()
		ul.SetDeadline(d)
	}
	return l.Accept()
}

// lockSource takes an exclusive lock named after the source's monitor (QMP socket, or libvirt
// URI and domain), so that a second sidecar started against the same VM refuses at once instead
// of racing the first.
func lockSource(ep qmp.Endpoint) (func(), error) {
	key := "libvirt\x00" + ep.LibvirtURI + "\x00" + ep.Domain
	if ep.Socket != "" {
		abs, err := filepath.Abs(ep.Socket)
		if err != nil {
			return nil, err
		}
		key = abs
	}
	sum := sha256.Sum256([]byte(key))
	path := filepath.Join(os.TempDir(), fmt.Sprintf("qemu-migrate-go-%x.lock", sum[:8]))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("another qemu-migrate-go is already migrating the VM of %s (lock %s)", ep, path)
	}
	return func() { f.Close() }, nil
}
