package main

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/qemu-migrate-go/qemu-migrate-go/guestram"
	"github.com/qemu-migrate-go/qemu-migrate-go/link"
	"github.com/qemu-migrate-go/qemu-migrate-go/migration"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// sourceFlags name the source QEMU's monitor: a QMP socket, or a libvirt domain.
func sourceFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "qmp", Usage: "QMP unix socket of the source QEMU", EnvVars: []string{"QMG_QMP"}},
		&cli.StringFlag{Name: "libvirt", Usage: "reach the source through libvirtd at this URI (qemu:///system, qemu+tcp://HOST/system, …) instead of --qmp", EnvVars: []string{"QMG_LIBVIRT"}},
		&cli.StringFlag{Name: "domain", Usage: "with --libvirt: the libvirt domain to migrate"},
	}
}

// sourceEndpoint reads sourceFlags.
func sourceEndpoint(c *cli.Context) (qmp.Endpoint, error) {
	ep := qmp.Endpoint{Socket: c.String("qmp"), LibvirtURI: c.String("libvirt"), Domain: c.String("domain")}
	if err := ep.Validate(); err != nil {
		return ep, &exitError{exitUsage, err}
	}
	return ep, nil
}

func migrateFlags() []cli.Flag {
	return append(append(sourceFlags(),
		&cli.StringFlag{Name: "to", Usage: "destination: tcp:HOST:PORT, unix:PATH, file:PATH, exec:COMMAND, or qmg://HOST:PORT (a receiving sidecar: `receive`)"},
		&cli.StringFlag{Name: "dst-qmp", Usage: "QMP unix socket of the destination QEMU (optional: version, state and its own error on failure)"},
		&cli.DurationFlag{Name: "downtime", Value: 300 * time.Millisecond, Usage: "longest guest stop the switchover may cause"},
		&cli.Int64Flag{Name: "bandwidth", Usage: "cap on the source's sending rate in bytes/s (0 = unlimited)"},
		&cli.IntFlag{Name: "max-iterations", Usage: "switch over after this many passes over RAM (0 = no limit)"},
		&cli.DurationFlag{Name: "timeout", Usage: "limit on the live phase (0 = none)"},
		&cli.StringFlag{Name: "timeout-action", Value: "abort", Usage: "at --timeout: abort (source keeps running), pause (stop the guest to complete) or postcopy (switch to postcopy; needs --postcopy)"},
		&cli.BoolFlag{Name: "postcopy", Usage: "enable postcopy on both sides (needs --dst-qmp; over qmg:// the receiver's --dst-qmp): the policy switches when --postcopy-after passes, --timeout-action postcopy, or the expected downtime stops falling; after the switch the guest runs on the destination"},
		&cli.IntFlag{Name: "postcopy-after", Usage: "with --postcopy: switch to postcopy after this many passes over RAM"},
		&cli.BoolFlag{Name: "verify", Usage: "resume the destination only once its RAM is proven equal to the paused source's, page by page (needs a destination held paused: -S; README \"Verified migration\"); a difference exits 8 with nothing resumed"},
		&cli.StringFlag{Name: "verify-method", Usage: "with --verify: how guest RAM is read, comma-separated in order of preference: file, process_vm_readv, proc-mem, pmemsave (default: that order)"},
		&cli.Int64Flag{Name: "postcopy-bandwidth", Usage: "with --postcopy: cap on the source's rate after the switch in bytes/s (0 = unlimited; requested pages share it)"},
		&cli.DurationFlag{Name: "recover-timeout", Value: migration.DefaultRecoverTimeout, Usage: "with --postcopy: how long to keep trying to repair a connection that broke during postcopy"},
		&cli.DurationFlag{Name: "stall-timeout", Value: 30 * time.Second, Usage: "abort when no data moves for this long"},
		&cli.BoolFlag{Name: "auto-converge", Usage: "let QEMU throttle the guest's vCPUs, increasingly, while it dirties memory faster than the link carries it"},
		&cli.IntFlag{Name: "multifd", Usage: "turn multifd on at the source with N channels (a source with multifd on already is served as it is): forwarded to a destination with multifd (--dst-qmp), merged into one stream otherwise"},
		&cli.BoolFlag{Name: "json", Usage: "write JSON-lines events to stdout (schema: README)"},
		&cli.BoolFlag{Name: "quiet", Aliases: []string{"q"}, Usage: "no progress display, only errors"},
		&cli.BoolFlag{Name: "no-preflight", Usage: "with --dst-qmp: skip the pre-flight checks (preflight command) before sending"},
		&cli.BoolFlag{Name: "detach", Usage: "run in the background, in its own session, logging JSON-lines events to --log; print the log path and PID and exit 0 at once (for hooks and scripts)"},
		&cli.StringFlag{Name: "log", Usage: "with --detach: the log file (default: a new file in $TMPDIR)"},
	), linkFlags(false)...)
}

// linkFlags are the flags of the link between two sidecars (--to qmg://, receive).
func linkFlags(receiver bool) []cli.Flag {
	f := []cli.Flag{
		&cli.StringFlag{Name: "tls-cert", Usage: "link: this side's certificate (PEM)"},
		&cli.StringFlag{Name: "tls-key", Usage: "link: this side's private key (PEM)"},
		&cli.StringFlag{Name: "tls-ca", Usage: "link: the CA the other side's certificate must chain to (PEM)"},
		&cli.BoolFlag{Name: "no-tls", Usage: "link: plain text instead of mutual TLS (both sides must say so)"},
		&cli.DurationFlag{Name: "link-timeout", Value: 5 * time.Second, Usage: "link: a peer silent this long is dead (heartbeats every second)"},
	}
	if receiver {
		return append(f, &cli.StringFlag{Name: "tls-peer", Usage: "the name (DNS or IP SAN, or CN) the sender's certificate must carry"})
	}
	return append(f,
		&cli.IntFlag{Name: "connections", Value: migration.DefaultConnections, Usage: "link: parallel data connections (1-16)"},
		&cli.StringFlag{Name: "compress", Value: "auto", Usage: "link: auto (by how busy the link is), none, zstd, s2 or lz4"},
	)
}

// linkTLS reads the --tls-* flags.
func linkTLS(c *cli.Context) link.TLSFiles {
	return link.TLSFiles{Cert: c.String("tls-cert"), Key: c.String("tls-key"), CA: c.String("tls-ca"), Peer: c.String("tls-peer")}
}

func runMigrate(c *cli.Context) error {
	src, err := sourceEndpoint(c)
	if err != nil {
		return err
	}
	if c.String("to") == "" {
		return &exitError{exitUsage, fmt.Errorf("--to is required (see --help)")}
	}
	to, err := transport.Parse(c.String("to"))
	if err != nil {
		return &exitError{exitUsage, err}
	}
	if c.Bool("detach") && !isDetachedChild() {
		return detach(c)
	}
	if to.IsLink() {
		limitLinkMemory(senderMemoryLimit)
	}
	ui := newProgress(c.Bool("json"), c.Bool("quiet"))
	opt := migration.MigrateOptions{
		Source:      src,
		To:          to,
		DstQMP:      c.String("dst-qmp"),
		NoPreflight: c.Bool("no-preflight"),
		Options: savevm.Options{
			Policy: savevm.Policy{
				Downtime:          c.Duration("downtime"),
				Bandwidth:         c.Int64("bandwidth"),
				MaxIterations:     c.Int("max-iterations"),
				Timeout:           c.Duration("timeout"),
				TimeoutAction:     savevm.TimeoutAction(c.String("timeout-action")),
				StallTimeout:      c.Duration("stall-timeout"),
				AutoConverge:      c.Bool("auto-converge"),
				Postcopy:          c.Bool("postcopy"),
				PostcopyAfter:     c.Int("postcopy-after"),
				PostcopyBandwidth: c.Int64("postcopy-bandwidth"),
			},
			Events: ui.event,
			Warn:   ui.warn,
		},
		Multifd:        c.Int("multifd"),
		RecoverTimeout: c.Duration("recover-timeout"),
		Verify:         c.Bool("verify"),
		Link: migration.LinkOptions{TLS: linkTLS(c), NoTLS: c.Bool("no-tls"), Connections: c.Int("connections"),
			Compress: c.String("compress"), Timeout: c.Duration("link-timeout")},
	}
	if !to.IsLink() && (c.IsSet("tls-cert") || c.IsSet("no-tls") || c.IsSet("connections") || c.IsSet("compress")) {
		return &exitError{exitUsage, fmt.Errorf("--tls-*, --no-tls, --connections and --compress are for a link (--to qmg://HOST:PORT)")}
	}
	if c.IsSet("verify-method") {
		if !opt.Verify {
			return &exitError{exitUsage, fmt.Errorf("--verify-method is for --verify")}
		}
		if opt.VerifyMethods, err = guestram.ParseMethods(c.String("verify-method")); err != nil {
			return &exitError{exitUsage, fmt.Errorf("--verify-method: %w", err)}
		}
	}
	sum, err := migration.Migrate(c.Context, opt)
	ui.close()
	if err != nil {
		if c.Context.Err() != nil {
			return &exitError{exitCancelled, fmt.Errorf("interrupted: %w", err)}
		}
		return err
	}
	if !c.Bool("json") && !c.Bool("quiet") {
		printSummary(sum)
	}
	return nil
}

func printSummary(s savevm.Summary) {
	fmt.Fprintf(os.Stderr, "migrated: total %v, downtime %v (QEMU: %v; device state %d KiB in %v), %s sent, %d pages + %d zero pages, %d iterations, sidecar peak RSS %s; source is paused in postmigrate\n",
		ms(s.TotalTimeMs), ms(s.DowntimeMs), ms(s.QEMUDowntimeMs), s.TailBytes>>10, ms(s.TailMs),
		human(s.BytesOut), s.NormalPages, s.ZeroPages, s.Iterations, human(s.PeakRSSBytes))
	switch s.Switchover {
	case "policy":
		fmt.Fprintf(os.Stderr, "switchover: decided by the sidecar's policy\n")
	case "qemu":
		fmt.Fprintf(os.Stderr, "switchover: decided by the source QEMU's own rule (its downtime-limit, set to --downtime)\n")
	}
	if v := s.Verify; v != nil && v.Equal {
		fmt.Fprintf(os.Stderr, "verified: %d pages of %d RAM blocks equal before the destination ran (%v more downtime)\n", v.Pages, v.Blocks, ms(v.DurationMs))
	}
	if p := s.Postcopy; p != nil && p.Started {
		fmt.Fprintf(os.Stderr, "postcopy: %v after the switch, %d page requests (%d already on their way), latency p50 %v p99 %v, %d recoveries\n",
			ms(p.PostcopyMs), p.Requests, p.InFlight, time.Duration(p.LatencyP50Us)*time.Microsecond, time.Duration(p.LatencyP99Us)*time.Microsecond, p.Recoveries)
	}
}

func ms(v int64) time.Duration { return time.Duration(v) * time.Millisecond }

func human(b int64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%d KiB", b>>10)
}

// jsonOut writes one JSON line to stdout; events get the schema version and this side.
func jsonOut(v any) {
	if e, ok := v.(savevm.Event); ok {
		e.Schema = savevm.EventSchema
		if e.Side == "" {
			e.Side = eventSide
		}
		v = e
	}
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}
