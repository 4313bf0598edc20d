package migration

import (
	"context"
	"fmt"
	"os"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// RestoreOptions describe a replay of a saved stream into a destination QEMU.
type RestoreOptions struct {
	From string        // stream file ("-" = standard input)
	To   transport.URI // destination
	savevm.Options
}

// Restore replays a saved migration stream (from `--to file:` or QEMU's own `exec:cat > FILE`)
// into a destination QEMU through the engine, so that the stream is checked record by record on
// the way and rewritten for the destination's version like a live relay. A stream that fails to
// decode is never completed towards the destination: the connection is aborted.
func Restore(ctx context.Context, o RestoreOptions) (Summary, error) {
	in := os.Stdin
	if o.From != "-" {
		f, err := os.Open(o.From)
		if err != nil {
			return Summary{}, &MigrateError{Class: ErrUsage, Err: err}
		}
		in = f
	}
	defer in.Close()
	dconn, err := transport.Open(ctx, o.To)
	if err != nil {
		return Summary{}, &MigrateError{Class: ErrDestination, Err: err}
	}
	relay := savevm.NewRelay(in, dconn, nil, o.Options)
	sum, err := relay.Run(ctx)
	if err != nil {
		dconn.Abort()
		class := classify(err, ctx)
		if class == ErrCancelled {
			err = context.Cause(ctx)
		}
		return sum, &MigrateError{Class: class, Phase: relay.Phase(),
			Err: fmt.Errorf("restore from %s: %w; the destination got a reset, not a complete stream", o.From, err)}
	}
	savevm.EmitSummary(o.Options, &sum)
	return sum, nil
}
