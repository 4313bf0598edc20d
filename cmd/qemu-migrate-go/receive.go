package main

import (
	"fmt"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/qemu-migrate-go/qemu-migrate-go/migration"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// receiveCommand is the receiving end of a link: it takes one migration from a sending sidecar
// (--to qmg://HOST:PORT) and writes it into the local destination QEMU.
func receiveCommand() *cli.Command {
	return &cli.Command{
		Name:  "receive",
		Usage: "take one migration from a sending sidecar (--to qmg://) and write it into the local destination QEMU",
		UsageText: "qemu-migrate-go receive --listen tcp:HOST:PORT --to unix:PATH|tcp:127.0.0.1:PORT|file:PATH [--dst-qmp SOCK]\n" +
			"    (--tls-cert F --tls-key F --tls-ca F [--tls-peer NAME] | --no-tls) [--json] [-q]",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Usage: "where the sender connects: tcp:HOST:PORT (and nowhere else)"},
			&cli.StringFlag{Name: "to", Usage: "the local destination QEMU's -incoming: unix:PATH, tcp:127.0.0.1:PORT, or file:PATH"},
			&cli.StringFlag{Name: "dst-qmp", Usage: "QMP unix socket of the destination QEMU: its state is checked before and reported after"},
			&cli.DurationFlag{Name: "stall-timeout", Value: 30 * time.Second, Usage: "give up when no data arrives for this long"},
			&cli.DurationFlag{Name: "recover-timeout", Value: migration.DefaultRecoverTimeout, Usage: "when the sender asked for --postcopy: how long to keep trying to repair a link that broke during postcopy"},
			&cli.BoolFlag{Name: "json", Usage: "write JSON-lines events to stdout (README \"JSON events\"), the first a listening event"},
			&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no progress display, only errors"},
		}, linkFlags(true)...),
		Action: runReceive,
	}
}

// Soft heap limits of the two ends of a link (GOMEMLIMIT overrides them). Their heaps are
// buffers of fixed size — frames being encoded, queued and in the reorder window, the
// connections' frame buffers, the codecs: ~12 MiB live on either end — besides the sender's
// per-page hash table, which it adds to the limit once it knows the guest's RAM. A limit keeps
// the collector from letting freed buffers double that (issue 10's bound is 32 MiB + 5 MiB per
// GiB of guest RAM, ~12 MiB of a sidecar's RSS being its binary's mapped pages), and must stay
// well above the live heap plus the runtime's own: at 20 MiB the sender collected ~900 times
// per GiB and spent 3x the CPU, the receiver (which allocates less) 15 times.
const (
	receiverMemoryLimit = 20 << 20
	senderMemoryLimit   = 24 << 20
)

// limitLinkMemory sets a soft heap limit unless GOMEMLIMIT says otherwise.
func limitLinkMemory(limit int64) {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(limit)
	}
}

func runReceive(c *cli.Context) error {
	eventSide = "receiver"
	limitLinkMemory(receiverMemoryLimit)
	listen, ok := strings.CutPrefix(c.String("listen"), "tcp:")
	if !ok {
		return &exitError{exitUsage, fmt.Errorf("--listen tcp:HOST:PORT is required")}
	}
	if c.String("to") == "" {
		return &exitError{exitUsage, fmt.Errorf("--to is required: the destination QEMU's -incoming (unix:PATH, tcp:127.0.0.1:PORT or file:PATH)")}
	}
	to, err := transport.Parse(c.String("to"))
	if err != nil {
		return &exitError{exitUsage, err}
	}
	ui := newProgress(c.Bool("json"), c.Bool("quiet"))
	sum, err := migration.Receive(c.Context, migration.ReceiveOptions{
		Listen: listen, To: to, DstQMP: c.String("dst-qmp"), TLS: linkTLS(c), NoTLS: c.Bool("no-tls"),
		Timeout: c.Duration("link-timeout"), StallTimeout: c.Duration("stall-timeout"), RecoverTimeout: c.Duration("recover-timeout"),
		Events: ui.event, Warn: ui.warn,
		Listening: func(addr string) {
			ui.event(savevm.Event{Type: "listening", Time: time.Now(), Message: "tcp:" + addr})
		},
	})
	ui.close()
	if err != nil {
		if c.Context.Err() != nil {
			return &exitError{exitCancelled, fmt.Errorf("interrupted: %w", err)}
		}
		return err
	}
	if !c.Bool("json") && !c.Bool("quiet") {
		fmt.Fprintf(os.Stderr, "received: %s from the link, %s written to the destination in %v (downtime seen here %v)\n",
			human(sum.BytesIn), human(sum.BytesOut), ms(sum.TotalTimeMs), ms(sum.DowntimeMs))
	}
	return nil
}
