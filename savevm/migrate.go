package savevm

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// MigrateOptions describe one relay migration of a running VM (the CLI's flags).
type MigrateOptions struct {
	SourceQMP string        // unix socket of the source QEMU's QMP
	To        transport.URI // where the destination QEMU listens (-incoming), or a file
	DstQMP    string        // optional: the destination QEMU's QMP socket
	Options                 // policy, events, warnings
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
	fail := func(class error, phase Phase, err error) (Summary, error) {
		return Summary{}, &MigrateError{Class: class, Phase: phase, Err: err}
	}
	if err := o.Policy.Validate(); err != nil {
		return fail(ErrUsage, "", err)
	}
	unlock, err := lockSource(o.SourceQMP)
	if err != nil {
		return fail(ErrUsage, "", err)
	}
	defer unlock()

	cctx, cancel := context.WithTimeout(ctx, o.ConnectTimeout)
	defer cancel()
	src, err := qmp.DialUnix(cctx, o.SourceQMP)
	if err != nil {
		return fail(ErrSource, "", err)
	}
	defer src.Close()
	before, err := src.QueryStatus(cctx)
	if err != nil {
		return fail(ErrSource, "", err)
	}
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

	// From here on the source is changed: every failure path restores it.
	restore := func(cause error, class error, phase Phase) (Summary, error) {
		return Summary{}, &MigrateError{Class: class, Phase: phase, Err: cause,
			SourceState: recoverSource(src, before.Status, params)}
	}
	if err := Hold(cctx, src, o.Policy); err != nil {
		return restore(err, ErrSource, "")
	}
	if err := src.Migrate(cctx, "unix:"+sock); err != nil {
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
		return restore(err, classify(err, ctx), relay.Phase())
	}
	delivered = true

	// The destination has the complete stream: from now on the source is never resumed.
	wctx, wcancel := context.WithTimeout(context.Background(), o.ConnectTimeout)
	defer wcancel()
	if m, err := src.WaitMigration(wctx, 20*time.Millisecond); err == nil {
		sum.QEMUDowntimeMs = m.Downtime
	}
	if dst != nil {
		st, err := waitStatus(wctx, dst, "running", "paused")
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
	return sum, nil
}

// classify tells whose fault a relay error is.
func classify(err error, ctx context.Context) error {
	var pe *PolicyError
	switch {
	case errors.As(err, &pe), ctx.Err() != nil:
		return ErrPolicy
	case strings.Contains(err.Error(), "destination"):
		return ErrDestination
	}
	return ErrSource
}

// recoverSource cancels the source's migration and puts the VM back in the run state it had,
// with the migration parameters it had; it returns the state it ended in.
func recoverSource(src *qmp.Client, wasState string, params map[string]any) string {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if m, err := src.QueryMigrate(ctx); err == nil && !m.Finished() {
		src.MigrateCancel(ctx)
		for {
			m, err := src.QueryMigrate(ctx)
			if err != nil || m.Finished() || ctx.Err() != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	restore := map[string]any{}
	for _, k := range []string{"downtime-limit", "max-bandwidth"} {
		if v, ok := params[k]; ok {
			restore[k] = v
		}
	}
	src.SetParameters(ctx, restore)
	st, err := src.QueryStatus(ctx)
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	// The source may have stopped the guest for the switchover (finish-migrate, postmigrate)
	// while the destination never got the complete stream: it is safe — and required — to
	// resume it there and only there.
	if wasState == "running" && st.Status != "running" {
		if err := src.Cont(ctx); err != nil {
			return st.Status + " (cont failed: " + err.Error() + ")"
		}
		if st, err = src.QueryStatus(ctx); err != nil {
			return "unknown (" + err.Error() + ")"
		}
	}
	return st.Status
}

func waitStatus(ctx context.Context, c *qmp.Client, states ...string) (string, error) {
	for {
		st, err := c.QueryStatus(ctx)
		if err != nil {
			return "", err
		}
		for _, s := range states {
			if st.Status == s {
				return s, nil
			}
		}
		select {
		case <-ctx.Done():
			return st.Status, fmt.Errorf("status %q: %w", st.Status, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func acceptBefore(ctx context.Context, l net.Listener) (net.Conn, error) {
	if ul, ok := l.(*net.UnixListener); ok {
		d, _ := ctx.Deadline()
		ul.SetDeadline(d)
	}
	return l.Accept()
}

// lockSource takes an exclusive lock named after the source's QMP socket, so that a second
// sidecar started against the same VM refuses at once instead of racing the first.
func lockSource(qmpPath string) (func(), error) {
	abs, err := filepath.Abs(qmpPath)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(abs))
	path := filepath.Join(os.TempDir(), fmt.Sprintf("qemu-migrate-go-%x.lock", sum[:8]))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("another qemu-migrate-go is already migrating the VM of %s (lock %s)", qmpPath, path)
	}
	return func() { f.Close() }, nil
}
