package migration

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/preflight"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// The destination's side of the story, through its QMP (--dst-qmp): is it waiting, is it the
// same machine, does it run once it has the stream, and what does it say when it failed.

// destinationSeries checks that the destination waits for an incoming migration and returns its
// QEMU series ("7.2", "10.0"), which selects the engine's compatibility rules.
func destinationSeries(ctx context.Context, dst *qmp.Client) (string, error) {
	st, err := dst.QueryStatus(ctx)
	if err != nil {
		return "", err
	}
	if st.Status != "inmigrate" {
		return "", fmt.Errorf("destination VM is %q, not waiting for an incoming migration (-incoming)", st.Status)
	}
	v, err := dst.QueryVersion(ctx)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%d.%d", v.QEMU.Major, v.QEMU.Minor), nil
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
func runPreflight(ctx context.Context, src, dst *qmp.Client, o savevm.Options) error {
	sf, err := preflight.Gather(ctx, src)
	if err != nil {
		return fmt.Errorf("preflight: reading the source: %w", err)
	}
	df, err := preflight.Gather(ctx, dst)
	if err != nil {
		return fmt.Errorf("preflight: reading the destination: %w", err)
	}
	// The sidecar serves the source's multifd channels itself (forwarded to a destination
	// with multifd, merged into one stream for one without: multifd.go), so the two sides
	// need not agree on it as QEMU to QEMU would.
	delete(sf.Capabilities, "multifd")
	delete(df.Capabilities, "multifd")
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
			return "the destination QEMU failed to load it: " + orUnknown(m.ErrorDesc)
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
