package compat

// The baselines of the link (issue 10): QEMU migrating by itself across a NetPair — plain TCP,
// QEMU's own TLS, QEMU 10.0's multifd with zstd — measured the way every mode of the link
// benchmark is measured (Meter), so that the sidecar pair is compared with them like for like.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// BaselineMode is one of QEMU's own ways of migrating across a NetPair.
type BaselineMode string

const (
	// ModeDirect is `migrate tcp:DST:PORT`: one plain TCP stream, the destination started with
	// `-incoming tcp:DST:PORT`.
	ModeDirect BaselineMode = "direct"
	// ModeQEMUTLS is QEMU's own TLS: a tls-creds-x509 object on both ends (the destination
	// `endpoint=server,verify-peer=on`: mutual TLS), the `tls-creds` parameter on both, the
	// destination started with `-incoming defer` and given `migrate-incoming` once its parameter
	// is set. The source checks the server's certificate against the address it connects to
	// (QEMU takes the host of the URI unless `tls-hostname` is set; GnuTLS matches an IP address
	// against the certificate's IP SANs) — the same on 7.2 and 10.0 (migration/tls.c).
	ModeQEMUTLS BaselineMode = "qemu-tls"
	// ModeMultifdZstd is multifd with 4 channels and zstd: capability `multifd` and parameters
	// `multifd-channels`, `multifd-compression` on both ends, the destination's set before it
	// accepts (`-incoming defer`, then `migrate-incoming`).
	ModeMultifdZstd BaselineMode = "multifd-zstd"
)

// BaselineModes are every baseline, in the benchmark's order.
var BaselineModes = []BaselineMode{ModeDirect, ModeQEMUTLS, ModeMultifdZstd}

// tlsObjectID is the id of the tls-creds-x509 object Configure adds.
const tlsObjectID = "qmgtls0"

// Baseline is one migration of QEMU by itself from Pair.Src to Pair.Dst. Configure the two VM
// configurations with it, start the VMs, then Migrate.
type Baseline struct {
	Mode BaselineMode
	Pair *NetPair
	// Port is the destination's TCP port; Configure picks Pair.NextPort() when it is 0.
	Port int
	// ServerCreds and ClientCreds are tls-creds-x509 folders (WriteQEMUCreds; TestPKI.QEMUDir
	// serves as both) for the destination and the source, with ModeQEMUTLS.
	ServerCreds, ClientCreds string
	// TLSHostname is the source's tls-hostname; "" lets QEMU check the destination's address.
	TLSHostname string
	// Channels and Compression are multifd's; defaults 4 and "zstd".
	Channels    int
	Compression string
	// Tuning is the source's bandwidth cap and downtime limit (zero: uncapped, 300 ms).
	Tuning Tuning
}

// URI is where the source migrates to: tcp:DST:PORT on the destination host.
func (b *Baseline) URI() string { return b.Pair.DstTCP(b.Port) }

// Configure returns src and dst with what b needs: each in its host's namespace, the
// destination's -incoming, and the TLS objects. Everything else (QEMU, guest, -S) stays the
// caller's.
func (b *Baseline) Configure(src, dst VMConfig) (VMConfig, VMConfig, error) {
	if b.Pair == nil {
		return src, dst, errors.New("baseline: no NetPair")
	}
	if b.Port == 0 {
		b.Port = b.Pair.NextPort()
	}
	src.Netns, dst.Netns = b.Pair.Src.Name, b.Pair.Dst.Name
	switch b.Mode {
	case ModeDirect:
		dst.Incoming = b.URI()
	case ModeQEMUTLS:
		if b.ServerCreds == "" || b.ClientCreds == "" {
			return src, dst, errors.New("baseline qemu-tls: ServerCreds and ClientCreds are required")
		}
		dst.Incoming = "defer"
		dst.Extra = append(append([]string{}, dst.Extra...), "-object",
			fmt.Sprintf("tls-creds-x509,id=%s,dir=%s,endpoint=server,verify-peer=on", tlsObjectID, b.ServerCreds))
		src.Extra = append(append([]string{}, src.Extra...), "-object",
			fmt.Sprintf("tls-creds-x509,id=%s,dir=%s,endpoint=client,verify-peer=on", tlsObjectID, b.ClientCreds))
	case ModeMultifdZstd:
		dst.Incoming = "defer"
	default:
		return src, dst, fmt.Errorf("baseline: unknown mode %q", b.Mode)
	}
	return src, dst, nil
}

// capsAndParams are the capabilities and parameters b sets on both ends.
func (b *Baseline) capsAndParams() (map[string]bool, map[string]any) {
	caps, params := map[string]bool{}, map[string]any{}
	switch b.Mode {
	case ModeQEMUTLS:
		params["tls-creds"] = tlsObjectID
	case ModeMultifdZstd:
		ch, comp := b.Channels, b.Compression
		if ch == 0 {
			ch = 4
		}
		if comp == "" {
			comp = "zstd"
		}
		caps["multifd"] = true
		params["multifd-channels"] = ch
		params["multifd-compression"] = comp
	}
	return caps, params
}

// Migrate migrates src to dst (started from Configure's configurations) and measures it with a
// Meter. pauseSource stops the source first (`stop`): the pure data path, with the guest down
// all along (the destination then stays paused too, as QEMU keeps a paused guest paused).
func (b *Baseline) Migrate(ctx context.Context, src, dst *VM, pauseSource bool) (LinkResult, error) {
	// A QEMU in the host's namespace would route the 10.x address out of the machine.
	if src.Config.Netns != b.Pair.Src.Name || dst.Config.Netns != b.Pair.Dst.Name {
		return LinkResult{}, fmt.Errorf("baseline: the VMs must run in the pair's namespaces (source %q, destination %q; want %s, %s)",
			src.Config.Netns, dst.Config.Netns, b.Pair.Src.Name, b.Pair.Dst.Name)
	}
	m, err := NewMeter(ctx, b.Pair, src, dst)
	if err != nil {
		return LinkResult{}, err
	}
	defer m.Close()
	caps, params := b.capsAndParams()
	if len(caps) > 0 {
		if err := dst.QMP.SetCapabilities(ctx, caps); err != nil {
			return LinkResult{}, fmt.Errorf("%s: %w", dst.Config.Name, err)
		}
	}
	if len(params) > 0 {
		if err := dst.QMP.SetParameters(ctx, params); err != nil {
			return LinkResult{}, fmt.Errorf("%s: %w", dst.Config.Name, err)
		}
	}
	if dst.Config.Incoming == "defer" {
		if err := dst.QMP.MigrateIncoming(ctx, b.URI()); err != nil {
			return LinkResult{}, fmt.Errorf("%s: %w", dst.Config.Name, err)
		}
	}
	tu := b.Tuning
	tu.Capabilities = merged(tu.Capabilities, caps)
	tu.Parameters = merged(tu.Parameters, params)
	if b.TLSHostname != "" {
		tu.Parameters["tls-hostname"] = b.TLSHostname
	}
	if err := tu.Apply(ctx, src, true); err != nil {
		return LinkResult{}, err
	}
	if pauseSource {
		if err := src.QMP.Stop(ctx); err != nil {
			return LinkResult{}, fmt.Errorf("%s: %w", src.Config.Name, err)
		}
	}
	m.Start()
	if err := src.QMP.Migrate(ctx, b.URI()); err != nil {
		return LinkResult{}, fmt.Errorf("%s: %w", src.Config.Name, err)
	}
	res, err := m.Wait(ctx)
	if err != nil {
		src.QMP.MigrateCancel(context.Background())
	}
	return res, err
}

// merged returns a new map with a's entries and then b's.
func merged[V any](a, b map[string]V) map[string]V {
	m := make(map[string]V, len(a)+len(b))
	maps.Copy(m, a)
	maps.Copy(m, b)
	return m
}

// LinkResult is what one migration across a NetPair measured, the same way for every mode (the
// baselines here, the sidecar modes of the link benchmark).
type LinkResult struct {
	// Total runs from Meter.Start (the migrate command, or the sender's start) to End.
	Total time.Duration
	// Downtime runs from the source's STOP event to End (QMP timestamps: both QEMUs run on this
	// host, one clock). With a paused source it is the whole time since the `stop`.
	Downtime time.Duration
	// QEMUDowntime is the source QEMU's own downtime figure (query-migrate).
	QEMUDowntime time.Duration
	// End is the event that ended the migration: "RESUME" (the destination runs) or, when the
	// destination stays paused (-S, or a paused source), "MIGRATION completed" — QEMU emits it in
	// the same bottom half, right after it would have resumed the guest (process_incoming_migration_bh,
	// 7.2 and 10.0).
	End string
	// Link is the bytes that crossed the veth, both directions, from Start until the source
	// reported completion.
	Link LinkCounters
	// Source is the source's query-migrate after completion.
	Source Result
}

// Meter measures one migration across a NetPair. Make it before anything of the migration
// happens (before a `stop` of the source, too: it subscribes to both QEMUs' events), call Start
// right before the command that starts the migration, then Wait.
type Meter struct {
	pair       *NetPair
	src, dst   *VM
	srcEvents  <-chan qmp.Event
	dstEvents  <-chan qmp.Event
	unsub      []func()
	start      time.Time
	startCount LinkCounters
}

// NewMeter subscribes to both QEMUs' events and turns on their `events` capability (the
// destination's MIGRATION events mark the end when it stays paused, the source's tell a failure
// at once; nothing else of the migration depends on it).
func NewMeter(ctx context.Context, pair *NetPair, src, dst *VM) (*Meter, error) {
	for _, vm := range []*VM{src, dst} {
		if err := vm.QMP.SetCapabilities(ctx, map[string]bool{"events": true}); err != nil {
			return nil, fmt.Errorf("%s: %w", vm.Config.Name, err)
		}
	}
	m := &Meter{pair: pair, src: src, dst: dst}
	var u1, u2 func()
	m.srcEvents, u1 = src.QMP.Subscribe()
	m.dstEvents, u2 = dst.QMP.Subscribe()
	m.unsub = []func(){u1, u2}
	return m, nil
}

// Close ends the subscriptions.
func (m *Meter) Close() {
	for _, u := range m.unsub {
		u()
	}
	m.unsub = nil
}

// Start marks the start of the migration and reads the link counters.
func (m *Meter) Start() {
	m.startCount, _ = m.pair.Counters()
	m.start = time.Now()
}

// Wait waits until the destination runs (RESUME) or has loaded everything (its MIGRATION event
// "completed") and the source reports completion, and returns the measurement. It fails when
// either side reports a failed migration, the destination QEMU exits, or ctx ends.
func (m *Meter) Wait(ctx context.Context) (LinkResult, error) {
	var res LinkResult
	if m.start.IsZero() {
		return res, errors.New("meter: Wait before Start")
	}
	var stop, end time.Time
	// The source's state is also polled: a program on its other monitor (a sidecar) may set its
	// capabilities, and with them the events, as it likes.
	poll := time.NewTicker(250 * time.Millisecond)
	defer poll.Stop()
	for end.IsZero() {
		select {
		case <-poll.C:
			if info, err := m.src.QMP.QueryMigrate(ctx); err == nil && (info.Status == "failed" || info.Status == "cancelled") {
				return res, m.failure("source migration " + info.Status)
			}
		case e, ok := <-m.srcEvents:
			if !ok {
				return res, fmt.Errorf("%s: QMP closed during the migration", m.src.Config.Name)
			}
			switch e.Name {
			case "STOP":
				stop = e.Time
			case "MIGRATION":
				if st, _ := e.Data["status"].(string); st == "failed" || st == "cancelled" {
					return res, m.failure("source migration " + st)
				}
			}
		case e, ok := <-m.dstEvents:
			if !ok {
				return res, fmt.Errorf("%s: QMP closed during the migration: %s", m.dst.Config.Name, lastLine(m.dst.Stderr()))
			}
			switch e.Name {
			case "RESUME":
				end, res.End = e.Time, "RESUME"
			case "MIGRATION":
				switch st, _ := e.Data["status"].(string); st {
				case "completed":
					end, res.End = e.Time, "MIGRATION completed"
				case "failed":
					return res, m.failure("destination migration failed")
				}
			}
		case <-m.dst.Exited():
			return res, m.failure(fmt.Sprintf("destination QEMU exited (%v)", m.dst.ExitErr()))
		case <-ctx.Done():
			return res, m.failure(fmt.Sprintf("no end of the migration: %v", ctx.Err()))
		}
	}
	info, err := m.src.QMP.WaitMigration(ctx, 10*time.Millisecond)
	if err != nil {
		return res, fmt.Errorf("%s: %w", m.src.Config.Name, err)
	}
	if info.Status != "completed" {
		return res, m.failure("source migration " + info.Status)
	}
	// The source's STOP comes before the destination's end; a late delivery is drained here.
	for stop.IsZero() {
		select {
		case e := <-m.srcEvents:
			if e.Name == "STOP" {
				stop = e.Time
			}
		case <-time.After(time.Second):
			return res, fmt.Errorf("%s: no STOP event before the destination's %s", m.src.Config.Name, res.End)
		}
	}
	count, err := m.pair.Counters()
	if err != nil {
		return res, err
	}
	res.Total = end.Sub(m.start)
	res.Downtime = end.Sub(stop)
	res.Source = ResultFrom(info, res.Total)
	res.QEMUDowntime = res.Source.Downtime
	res.Link = count.Sub(m.startCount)
	return res, nil
}

// failure describes a failed migration with both sides' last words.
func (m *Meter) failure(what string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	msg := what
	if info, err := m.src.QMP.QueryMigrate(ctx); err == nil && info.ErrorDesc != "" {
		msg += "; source: " + info.ErrorDesc
	}
	return fmt.Errorf("%s; destination stderr: %s", msg, lastLine(m.dst.Stderr()))
}
