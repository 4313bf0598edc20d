// Package savevm is the sidecar's migration engine, shaped like QEMU's savevm: registered
// handlers for the sections of the stream, the setup → iterate → complete run loop, the
// switchover policy, statistics and progress events. In relay mode the pages come from the
// decoded stream of the source QEMU, which migrates into a private socket of the sidecar.
package savevm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// Control is what the engine needs of the source QEMU; *qmp.Client implements it.
type Control interface {
	QueryMigrate(ctx context.Context) (qmp.MigrationInfo, error)
	SetParameters(ctx context.Context, params map[string]any) error
	SetCapabilities(ctx context.Context, caps map[string]bool) error
	Stop(ctx context.Context) error
	MigrateStartPostcopy(ctx context.Context) error
}

// Options configure a relay.
type Options struct {
	Policy Policy
	// DstSeries is the destination's QEMU series ("7.2", "10.0"), when known (--dst-qmp); it
	// selects the compatibility rules of design.md. "" = unknown: records are passed on as the
	// source made them.
	DstSeries string
	// Events receives progress events; nil = none. It is called from the engine's goroutines and
	// must not block for long.
	Events func(Event)
	// Warn receives warnings (heuristic boundaries, rewritten records); nil = discard.
	Warn func(string)
	// PollInterval is how often the policy looks at the source (default 25 ms: the switchover
	// decision waits for the first check after a dirty sync, so this is its latency).
	PollInterval time.Duration
	// Limits caps what the stream reader allocates.
	Limits *stream.Limits
	// KeepCPUState keeps a copy of the vCPUs' device state (the top-level "cpu" sections) and
	// of the vmdesc, for CPUStates: --verify reads the paravirtual MSRs from them.
	KeepCPUState bool
}

// CPUState is one vCPU's "cpu" section as the stream carried it.
type CPUState struct {
	Instance uint32
	Body     []byte // the vmstate body (stream.Record.Body); the vmdesc says its fields
}

// maxKeptCPUState bounds what KeepCPUState keeps of cpu sections (a vCPU's is about 2 KiB).
const maxKeptCPUState = 4 << 20

// CPUStates returns the kept cpu sections and the stream's vmdesc JSON (nil when there was
// none), after Run (Options.KeepCPUState).
func (r *Relay) CPUStates() ([]CPUState, []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cpus, r.vmdesc
}

// Phase is where a migration is.
type Phase string

// Phases, in order.
const (
	PhaseSetup    Phase = "setup"    // header, configuration, START sections
	PhaseIterate  Phase = "iterate"  // PART sections while the guest runs
	PhaseComplete Phase = "complete" // guest stopped: END sections
	PhasePostcopy Phase = "postcopy" // the guest runs on the destination, which asks for pages
	PhaseDevices  Phase = "devices"  // device state (FULL sections), EOF, vmdesc
	PhaseDone     Phase = "done"     // the destination has the complete stream
)

// EventSchema is the version of the JSON events format (README "JSON events",
// savevm/events.schema.json); every event carries it. 1 was the format before the field existed;
// 2 added schema, side, decision, downtime_budget_ms and the page counters.
const EventSchema = 2

// Event is one progress event; the JSON form is the `--json` schema (README "JSON events").
type Event struct {
	// "phase", "iteration", "progress", "policy", "warning", "summary"; the CLI adds "detached"
	// (migrate --detach: PID and Log) and, last in every --json run, "exit" (ExitCode, Message
	// the error).
	Type   string    `json:"type"`
	Schema int       `json:"schema"`
	Time   time.Time `json:"time"`
	// Side is which end wrote the event: "source" (migrate, the relay or the sending end of a
	// link) or "receiver" (receive); "" in events of schema 1.
	Side      string `json:"side,omitempty"`
	Phase     Phase  `json:"phase,omitempty"`
	Iteration int    `json:"iteration,omitempty"`
	// Bytes written to the destination so far.
	Transferred int64 `json:"transferred"`
	// RAM still dirty on the source (QEMU's estimate), bytes.
	Remaining int64 `json:"remaining"`
	// Total RAM, bytes.
	Total int64 `json:"total,omitempty"`
	// Forwarding rate and the guest's dirty rate, bytes/s.
	Rate      float64 `json:"rate"`
	DirtyRate float64 `json:"dirty_rate"`
	// Remaining / Rate: the downtime a switchover now would cost; over a link, plus
	// LinkBacklogMs, how long the receiver needs for what is already on its way.
	ExpectedDowntimeMs int64 `json:"expected_downtime_ms"`
	LinkBacklogMs      int64 `json:"link_backlog_ms,omitempty"`
	// DowntimeBudgetMs is the policy's --downtime (in the first "phase" event and in "policy"
	// events).
	DowntimeBudgetMs int64 `json:"downtime_budget_ms,omitempty"`
	// ThrottlePercent is how much auto-converge is slowing the guest's vCPUs (--auto-converge).
	ThrottlePercent int64 `json:"throttle_percent,omitempty"`
	// NormalPages and ZeroPages count the page records the engine has passed on so far (in
	// "progress", "iteration" and "phase" events); the difference between two "iteration"
	// events is what one pass sent.
	NormalPages int64 `json:"normal_pages,omitempty"`
	ZeroPages   int64 `json:"zero_pages,omitempty"`
	// Decision names a "policy" event's decision: "release" (the expected downtime fits),
	// "force" (--max-iterations), "pause" (--timeout-action pause), "abort" (--timeout with
	// abort, or a stall).
	Decision string   `json:"decision,omitempty"`
	Message  string   `json:"message,omitempty"`
	Summary  *Summary `json:"summary,omitempty"`
	PID      int      `json:"pid,omitempty"`
	Log      string   `json:"log,omitempty"`
	ExitCode *int     `json:"exit_code,omitempty"`
}

// Summary is what a finished relay reports.
type Summary struct {
	TotalTimeMs int64 `json:"total_time_ms"`
	// DowntimeMs as the sidecar saw it: from the first END section (the source had stopped the
	// guest) until the destination had the complete stream.
	DowntimeMs int64 `json:"downtime_ms"`
	// QEMUDowntimeMs is the source QEMU's own figure (0 if it could not be read).
	QEMUDowntimeMs int64 `json:"qemu_downtime_ms"`
	// TailMs is the part of the downtime spent forwarding the device state (FULL sections,
	// EOF and vmdesc), TailBytes its size.
	TailMs    int64 `json:"tail_ms"`
	TailBytes int64 `json:"tail_bytes"`
	// Bytes read from the source and written to the destination.
	BytesIn  int64 `json:"bytes_in"`
	BytesOut int64 `json:"bytes_out"`
	// Page records, by kind.
	NormalPages     int64 `json:"normal_pages"`
	ZeroPages       int64 `json:"zero_pages"`
	XBZRLEPages     int64 `json:"xbzrle_pages"`
	CompressedPages int64 `json:"compressed_pages"`
	// Iterations: passes over RAM (QEMU's dirty-sync-count).
	Iterations int `json:"iterations"`
	// Sections: bytes per section idstr (headers, bodies and footers).
	Sections map[string]int64 `json:"sections"`
	// Rewritten counts records changed for the destination's version (design.md rules).
	Rewritten int64 `json:"rewritten,omitempty"`
	// PausedByPolicy is true when --timeout-action pause stopped the guest.
	PausedByPolicy bool `json:"paused_by_policy,omitempty"`
	// Switchover says who decided when the guest stopped: "policy" when the sidecar's decision
	// (release, force or pause: a "policy" event) came before the guest stopped, "qemu" when the
	// source QEMU stopped it by its own rule (pending RAM under its bandwidth estimate × its
	// downtime-limit, which the relay sets to --downtime) before any decision. Empty when the
	// guest never stopped for a precopy switchover (postcopy, a failed migration).
	Switchover string `json:"switchover,omitempty"`
	// Link is what the link did (migrations over qmg://; receive reports its own side).
	Link *LinkSummary `json:"link,omitempty"`
	// Postcopy is what postcopy did (--postcopy).
	Postcopy *PostcopySummary `json:"postcopy,omitempty"`
	// Verify is what --verify found (package migration fills it in).
	Verify *VerifySummary `json:"verify,omitempty"`
	// PeakRSSBytes is the sidecar's own peak resident set size when it wrote the summary
	// (VmHWM of /proc/self/status, filled in by EmitSummary; omitted where it cannot be read).
	// The rusage a parent gets is no substitute: Linux carries the parent's high-water mark
	// into a child started with vfork+exec, as Go's os/exec starts one.
	PeakRSSBytes int64 `json:"peak_rss_bytes,omitempty"`
}

// PolicyError is returned when the policy ended the migration (timeout, stall).
type PolicyError struct{ Reason string }

func (e *PolicyError) Error() string { return e.Reason }

// Relay forwards one migration from a source stream to a destination through the engine.
type Relay struct {
	src  io.ReadCloser
	dst  io.WriteCloser
	ctl  Control
	opt  Options
	emit func(Event)

	bytesIn  atomic.Int64
	bytesOut atomic.Int64
	phase    atomic.Value // Phase
	// Page records passed on so far, for progress events and the summary.
	normalPages     atomic.Int64
	zeroPages       atomic.Int64
	xbzrlePages     atomic.Int64
	compressedPages atomic.Int64

	rp returnPath // the source's return path, when the source opened one

	// Multifd: the source's channels (SetMultifd), the merge state when they go into the
	// plain stream, and the first channel's failure.
	multifd *Multifd
	merge   *merger
	chanErr atomic.Pointer[error]

	pc postcopyState
	// rd is the source stream's Reader, kept across a postcopy recovery (Resume); out is the
	// output of the connection being served.
	rd         *stream.Reader
	out        output
	resumes    int
	firstStart time.Time
	sections   map[uint32]string // live sections by id (START), kept across a Resume
	cpus       []CPUState        // KeepCPUState (r.mu)
	cpuBytes   int
	vmdesc     []byte
	// newLinkOutput makes the link output instead of a QEMU stream (NewLinkRelay), linkBytes
	// counts what it sent, and linkBacklog is how long the receiver needs to take in what is
	// on its way (link.Session.Backlog).
	newLinkOutput func(*Relay) output
	linkBytes     func() int64
	linkBacklog   func() (time.Duration, bool)

	mu          sync.Mutex
	sum         Summary
	stoppedAt   time.Time // first END section
	tailAt      time.Time // the device tail began to arrive (passOutput)
	tailFrom    int64     // bytes written to the destination then
	deliveredAt time.Time // the destination had the complete stream
	iteration   int
	pausedByPol bool
	decidedAt   time.Time // when the policy released, forced or paused (zero: it never did)
}

// NewRelay prepares a relay from src (the source QEMU's migration connection) to dst. ctl
// steers the source: the relay holds QEMU's switchover until the policy allows it; with a nil
// ctl the relay replays a saved stream (restore) and only watches for stalls. Closing
// src and dst is the caller's job, except that an aborted relay closes both to unblock itself.
func NewRelay(src io.ReadCloser, dst io.WriteCloser, ctl Control, opt Options) *Relay {
	opt.Policy = opt.Policy.withDefaults()
	if opt.PollInterval <= 0 {
		opt.PollInterval = 25 * time.Millisecond
	}
	r := &Relay{src: src, dst: dst, ctl: ctl, opt: opt, emit: opt.Events}
	if w, ok := src.(io.Writer); ok && ctl != nil {
		r.rp.w = w // a live source: its connection carries the return path back to it
		r.pc.bridge = opt.Policy.Postcopy
		r.rp.bridge = r.pc.bridge
		r.rp.postcopyOn = r.pc.started.Load
	}
	r.pc.shut = make(chan uint32, 1)
	if r.emit == nil {
		r.emit = func(Event) {}
	}
	r.phase.Store(PhaseSetup)
	r.sum.Sections = map[string]int64{}
	return r
}

// Hold sets the source's parameters before `migrate`: the bandwidth cap, the capabilities of
// HoldCapabilities, and QEMU's downtime-limit (HoldDowntime).
func Hold(ctx context.Context, ctl Control, p Policy, overLink bool) error {
	bw := p.Bandwidth
	if bw == 0 {
		bw = 1 << 40
	}
	params := map[string]any{"max-bandwidth": bw, "downtime-limit": HoldDowntime(p, overLink).Milliseconds()}
	if p.Postcopy {
		params["max-postcopy-bandwidth"] = p.PostcopyBandwidth
	}
	if err := ctl.SetCapabilities(ctx, HoldCapabilities(p)); err != nil {
		return err
	}
	return ctl.SetParameters(ctx, params)
}

// HoldDowntime is the downtime-limit the source runs with until the policy decides.
//
// In relay mode it is the budget itself. QEMU then applies its own rule (pending < its bandwidth
// × limit) in the middle of a pass, as it does migrating directly, and switches over at the
// moment it would without the sidecar; the policy still releases earlier when its own estimate
// fits, and forces, pauses or aborts at its limits. Held at 1 ms, QEMU could only switch over once
// a whole pass had ended, and then up to 100 ms after the policy's release, because QEMU takes a
// new limit into its threshold only at its next bandwidth update (BUFFER_DELAY): a 1 GiB dirty
// guest took 2× QEMU's direct time through the relay.
//
// Over a link QEMU measures only its local socket and cannot see what waits on the link (the
// receiver's window, the kernels' buffers), so it is held at 1 ms and completes only when the
// policy, which counts that backlog, releases it.
func HoldDowntime(p Policy, overLink bool) time.Duration {
	if overLink {
		return time.Millisecond
	}
	return max(p.withDefaults().Downtime, time.Millisecond).Truncate(time.Millisecond)
}

// HoldCapabilities are the source capabilities Hold turns on: events (MIGRATION_PASS lets the
// policy decide right at QEMU's dirty sync instead of at its next poll), return-path (the source
// then completes only when the sidecar says the destination has everything — SHUT on the return
// path —, and resumes the guest by itself if the sidecar dies before: returnpath.go), and
// auto-converge when the policy asks for it.
func HoldCapabilities(p Policy) map[string]bool {
	caps := map[string]bool{"events": true, "return-path": true}
	if p.Postcopy {
		caps["postcopy-ram"] = true
	}
	if p.AutoConverge {
		caps["auto-converge"] = true
	}
	return caps
}

// passEvents is implemented by controls that deliver QMP events (*qmp.Client).
type passEvents interface {
	Subscribe() (<-chan qmp.Event, func())
}

// Phase returns the relay's current phase.
func (r *Relay) Phase() Phase { return r.phase.Load().(Phase) }

func (r *Relay) setPhase(p Phase) {
	if r.Phase() == p {
		return
	}
	if r.pc.started.Load() && p != PhasePostcopy && p != PhaseDone {
		return // after the switch the pages of postcopy's sections are still postcopy
	}
	r.phase.Store(p)
	r.emit(r.pages(Event{Type: "phase", Time: time.Now(), Phase: p, Transferred: r.transferred()}))
}

// Run relays until the destination has the complete stream (nil), or fails: a *stream.Error for
// a bad source stream, a *PolicyError when the policy gave up; Phase says where. The caller
// completes the summary (QEMU's own figures) and emits it (EmitSummary).
func (r *Relay) Run(ctx context.Context) (Summary, error) {
	start := time.Now()
	if r.firstStart.IsZero() {
		r.firstStart = start
	}
	outer := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if r.resumes == 0 {
		r.emit(Event{Type: "phase", Time: start, Phase: PhaseSetup, DowntimeBudgetMs: r.opt.Policy.Downtime.Milliseconds()})
	}

	pumpErr := make(chan error, 1)
	go func() { pumpErr <- r.pump() }()

	var err error
	policyErr := make(chan error, 1)
	pumpDone := make(chan struct{})
	go func() { policyErr <- r.policyLoop(ctx, start, pumpDone) }()
	// abort tears both ends down: the source's writes fail at once (a source QEMU blocked
	// writing its completion would otherwise hold its monitor until the connection closes), and
	// the destination sees a reset, never a clean end of stream.
	abort := func() {
		r.src.Close()
		if i, ok := r.dst.(interface{ Interrupt(error) }); ok && outer.Err() != nil {
			i.Interrupt(context.Cause(outer))
		} else if a, ok := r.dst.(interface{ Abort() }); ok {
			a.Abort()
		} else {
			r.dst.Close()
		}
	}
	// stopPump unblocks the pump and waits for it (bounded). A pump that delivered the complete
	// stream just before wins: the destination has it, so the migration must not be undone.
	stopPump := func(cause error) error {
		abort()
		select {
		case perr := <-pumpErr:
			if perr == nil && r.delivered() {
				return nil
			}
		case <-time.After(5 * time.Second):
		}
		return cause
	}
	select {
	case err = <-pumpErr:
		if err != nil {
			cancel()
			<-policyErr
			abort()
			break
		}
		// Let a query in flight finish rather than cutting it off: a cancelled QMP call closes
		// the monitor connection, which the caller still needs (QEMU's own figures, recovery).
		close(pumpDone)
		select {
		case <-policyErr:
		case <-time.After(5 * time.Second):
			cancel()
			<-policyErr
		}
	case err = <-policyErr:
		// The policy (or the source's QMP) gave up.
		err = stopPump(err)
	case <-ctx.Done():
		err = stopPump(ctx.Err())
	}
	r.mu.Lock()
	sum := r.sum
	sum.Sections = make(map[string]int64, len(r.sum.Sections))
	for k, v := range r.sum.Sections {
		sum.Sections[k] = v
	}
	sum.Iterations = r.iteration
	sum.NormalPages, sum.ZeroPages = r.normalPages.Load(), r.zeroPages.Load()
	sum.XBZRLEPages, sum.CompressedPages = r.xbzrlePages.Load(), r.compressedPages.Load()
	sum.Postcopy = r.postcopySummary()
	if sum.Postcopy != nil {
		sum.Postcopy.Recoveries = r.resumes
	}
	sum.PausedByPolicy = r.pausedByPol
	stoppedAt, decidedAt := r.stoppedAt, r.decidedAt
	r.mu.Unlock()
	sum.BytesIn, sum.BytesOut = r.bytesIn.Load(), r.transferred()
	sum.TotalTimeMs = time.Since(r.firstStart).Milliseconds() // a resumed relay counts from the first start
	if err != nil {
		return sum, err // the caller reports the phase (Relay.Phase)
	}
	if !stoppedAt.IsZero() && (sum.Postcopy == nil || !sum.Postcopy.Started) {
		sum.Switchover = "qemu"
		if !decidedAt.IsZero() && !decidedAt.After(stoppedAt) {
			sum.Switchover = "policy"
		}
	}
	if !stoppedAt.IsZero() && !r.deliveredAt.IsZero() {
		sum.DowntimeMs = r.deliveredAt.Sub(stoppedAt).Milliseconds()
	}
	r.setPhase(PhaseDone)
	return sum, nil
}

// transferred is the number of bytes written towards the destination: the QEMU stream, or the
// link's data frames.
func (r *Relay) transferred() int64 {
	if r.linkBytes != nil {
		return r.linkBytes()
	}
	return r.bytesOut.Load()
}

// pages fills e's page counters.
func (r *Relay) pages(e Event) Event {
	e.NormalPages, e.ZeroPages = r.normalPages.Load(), r.zeroPages.Load()
	return e
}

// Resume continues a relay whose connections broke during postcopy on the connections of a
// recovery: src, the source's resumed migration, and dst, the destination's migrate-recover.
// The decoding state carries over (stream.Reader.Resume); the source and the destination
// exchange the received bitmaps and RESUME/RESUME_ACK through the relay as any record.
func (r *Relay) Resume(ctx context.Context, src io.ReadCloser, dst io.WriteCloser) (Summary, error) {
	if d := r.pc.bridgeDone; d != nil {
		// The broken run's return-path bridge must be gone before the new one takes over its
		// decoder, or its failure would end the resumed run (the old connections are closed,
		// so it ends at once).
		select {
		case <-d:
		case <-time.After(5 * time.Second):
			return Summary{}, errors.New("the return path of the broken connection did not end")
		}
	}
	r.src, r.dst = src, dst
	if w, ok := src.(io.Writer); ok {
		r.rp.w = w
	}
	r.resumes++
	r.chanErr.Store(nil)
	r.mu.Lock()
	r.deliveredAt = time.Time{}
	r.mu.Unlock()
	return r.Run(ctx)
}

// EmitSummary completes the summary of a finished migration with the sidecar's own figures
// (PeakRSSBytes) and sends it to opt.Events as the final "summary" event.
func EmitSummary(opt Options, sum *Summary) {
	sum.PeakRSSBytes = peakRSS()
	if opt.Events != nil {
		s := *sum
		opt.Events(Event{Type: "summary", Time: time.Now(), Phase: PhaseDone, Transferred: s.BytesOut, Summary: &s})
	}
}

// policyLoop watches the source every PollInterval, reports progress, and steers QEMU's
// switchover by its downtime-limit: held (HoldDowntime) until the policy decides (expected
// downtime within Downtime, iteration limit, timeout with pause), then raised to QEMU's maximum so
// that QEMU switches over at its next check, whatever its own bandwidth estimate says.
func (r *Relay) policyLoop(ctx context.Context, start time.Time, pumpDone <-chan struct{}) error {
	p := r.opt.Policy
	t := time.NewTicker(r.opt.PollInterval)
	defer t.Stop()
	var (
		lastIn       = int64(-1)
		lastProgress = time.Now()
		lastOut      int64
		lastTick     = time.Now()
		rate         float64
		capacity     float64
		passes       <-chan qmp.Event
		best         time.Duration // the lowest expected downtime at a pass so far
		stalled      int           // passes in a row without a 10 % improvement on best
		fitSince     time.Time     // the first pass whose RAM alone fitted Downtime
	)
	if pe, ok := r.ctl.(passEvents); ok {
		ch, unsubscribe := pe.Subscribe()
		defer unsubscribe()
		passes = ch
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-pumpDone:
			return nil
		case <-t.C:
		case e, ok := <-passes:
			if !ok {
				passes = nil
				continue
			}
			if e.Name != "MIGRATION_PASS" {
				continue
			}
			// QEMU just synced its dirty bitmap: decide now, not at the next tick.
		}
		now := time.Now()
		// The rate is measured where the source's bytes are consumed: in relay mode that is
		// what is written to the destination, over a link it is what the link's encoded,
		// deduplicated, compressed frames carry per second in the source's own bytes — the
		// unit of QEMU's remaining count (bounded queues tie the two together).
		in, out := r.bytesIn.Load(), r.transferred()
		if in != lastIn {
			lastIn, lastProgress = in, now
		}
		if dt := now.Sub(lastTick).Seconds(); dt >= r.opt.PollInterval.Seconds()/2 {
			cur := float64(in-lastOut) / dt
			if rate == 0 {
				rate = cur
			} else {
				rate = 0.5*rate + 0.5*cur
			}
			// capacity is what the link carries when QEMU has full pages to send: the byte rate
			// falls while a pass walks over zero pages (9 bytes each), but the dirty set a
			// switchover sends is full pages. The peak decays so a slower link shows within
			// about a second.
			capacity = max(capacity*0.97, rate)
			lastOut, lastTick = in, now
		}
		if r.ctl == nil { // a replay (restore): no source to steer, only stalls to catch
			if since := now.Sub(lastProgress); since >= p.StallTimeout {
				return &PolicyError{Reason: fmt.Sprintf("stalled: no data moved for %v (--stall-timeout)", since.Round(time.Millisecond))}
			}
			r.emit(Event{Type: "progress", Time: now, Phase: r.Phase(), Transferred: out, Rate: rate})
			continue
		}
		if r.Phase() != PhaseSetup && r.Phase() != PhaseIterate {
			if r.Phase() == PhasePostcopy {
				r.emit(r.pages(Event{Type: "progress", Time: now, Phase: PhasePostcopy, Transferred: out, Rate: rate}))
			}
			continue // the source is switching over: nothing left to decide
		}
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		info, err := r.ctl.QueryMigrate(qctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("source QMP: %w", err)
		}
		if info.Status == "failed" || info.Status == "cancelled" {
			return fmt.Errorf("source QEMU reports migration %s: %s", info.Status, info.ErrorDesc)
		}
		if info.Status != "active" || info.RAM == nil || info.RAM.Total == 0 {
			continue // still setting up: QEMU's counters are not meaningful yet
		}
		o := observation{elapsed: now.Sub(start), sinceProgress: now.Sub(lastProgress), rate: capacity}
		ev := r.pages(Event{Type: "progress", Time: now, Phase: r.Phase(), Transferred: out, Rate: rate})
		if info.RAM != nil {
			o.remaining = info.RAM.Remaining
			o.iteration = int(info.RAM.DirtySyncCount)
			ev.Remaining, ev.Total = info.RAM.Remaining, info.RAM.Total
			ev.DirtyRate = float64(info.RAM.DirtyPagesRate) * 4096
		}
		ev.ThrottlePercent = info.CPUThrottle
		if capacity > 0 {
			o.expected = time.Duration(float64(o.remaining) / capacity * float64(time.Second))
		}
		ramExpected := o.expected
		if r.linkBacklog != nil {
			// Over a link the pages already sent may still be on their way to the receiver,
			// held in the kernels' buffers when it is the slower end: a switchover waits for them.
			if b, ok := r.linkBacklog(); ok {
				o.backlog = b
				o.expected += b
				ev.LinkBacklogMs = b.Milliseconds()
			}
		}
		ev.ExpectedDowntimeMs = o.expected.Milliseconds()
		ev.Iteration = o.iteration
		r.mu.Lock()
		newIter := o.iteration > r.iteration
		if newIter {
			r.iteration = o.iteration
		}
		r.mu.Unlock()
		o.fresh = newIter
		if newIter && o.iteration > 1 {
			// The RAM's part only: a backlog on the link is no sign that the guest outruns it.
			if best == 0 || ramExpected < best*9/10 {
				best, stalled = ramExpected, 0
			} else {
				stalled++
			}
		}
		switch {
		case newIter && capacity > 0 && ramExpected <= p.Downtime:
			if fitSince.IsZero() {
				fitSince = now
			}
			o.fitFor = now.Sub(fitSince)
		case newIter:
			fitSince = time.Time{}
		}
		o.stalledPasses = stalled
		if newIter {
			it := ev
			it.Type = "iteration"
			r.emit(it)
		}
		r.emit(ev)
		d, why := p.decide(o)
		switch d {
		case abortNow:
			r.emit(Event{Type: "policy", Time: now, Phase: r.Phase(), Decision: d.String(), Message: why,
				DowntimeBudgetMs: p.Downtime.Milliseconds(), ExpectedDowntimeMs: ev.ExpectedDowntimeMs})
			return &PolicyError{Reason: why}
		case postcopy:
			r.emit(Event{Type: "policy", Time: now, Phase: r.Phase(), Decision: d.String(), Message: why,
				DowntimeBudgetMs: p.Downtime.Milliseconds(), ExpectedDowntimeMs: ev.ExpectedDowntimeMs,
				Iteration: ev.Iteration, Remaining: ev.Remaining, Transferred: ev.Transferred})
			qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := r.ctl.MigrateStartPostcopy(qctx)
			cancel()
			if err != nil {
				return fmt.Errorf("switching the source to postcopy: %w", err)
			}
			for r.Phase() == PhaseSetup || r.Phase() == PhaseIterate {
				select {
				case <-ctx.Done():
					return nil
				case <-pumpDone:
					return nil
				case <-t.C:
				}
			}
			continue
		case release, force, pauseVM:
			r.emit(Event{Type: "policy", Time: now, Phase: r.Phase(), Decision: d.String(), Message: why,
				DowntimeBudgetMs: p.Downtime.Milliseconds(), ExpectedDowntimeMs: ev.ExpectedDowntimeMs})
			r.mu.Lock()
			if r.decidedAt.IsZero() {
				r.decidedAt = time.Now()
			}
			r.mu.Unlock()
			if d == pauseVM {
				qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				err := r.ctl.Stop(qctx)
				cancel()
				if err != nil {
					return fmt.Errorf("pausing the source: %w", err)
				}
				r.mu.Lock()
				r.pausedByPol = true
				r.mu.Unlock()
			}
			// The decision is the sidecar's: QEMU's largest downtime-limit makes it switch over
			// at its next check, whatever its own bandwidth estimate says.
			if err := r.setDowntime(ctx, 2000*time.Second); err != nil {
				return err
			}
			// Stop deciding: the switchover is under way.
			for r.Phase() == PhaseSetup || r.Phase() == PhaseIterate {
				select {
				case <-ctx.Done():
					return nil
				case <-pumpDone:
					return nil
				case <-t.C:
				}
			}
		}
	}
}

func (r *Relay) setDowntime(ctx context.Context, d time.Duration) error {
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := r.ctl.SetParameters(qctx, map[string]any{"downtime-limit": d.Milliseconds()}); err != nil {
		return fmt.Errorf("releasing the source's switchover: %w", err)
	}
	return nil
}

// pump reads every record of the source stream, counts it, answers the source's return path,
// and passes it to the output (a QEMU stream towards the destination, or the link); it ends
// when the destination has the complete stream, and only then lets the source complete (SHUT on
// its return path).
func (r *Relay) pump() error {
	counter := &countingReader{r: r.src, n: &r.bytesIn}
	opts := []stream.Option{
		stream.WithWarnings(func(off int64, msg string) { r.warn(fmt.Sprintf("source stream at offset %d: %s", off, msg)) }),
		stream.WithDeviceSizer(stream.VMDescSizer()),
		// The destination ignores what follows EOF; a damaged vmdesc must not fail the migration.
		stream.WithIgnoreAfterEOF(),
	}
	if r.opt.Limits != nil {
		opts = append(opts, stream.WithLimits(*r.opt.Limits))
	}
	out := r.newOutput()
	defer out.close()
	r.out = out
	rd := r.rd
	if rd == nil {
		// The hooks go to the output of the moment: a resumed relay has a new one.
		opts = append(opts, stream.WithBeforeRead(func() { r.out.beforeRead() }), stream.WithTailData(func(t []byte) { r.out.tailData(t) }))
		rd = stream.NewReader(counter, opts...)
		r.rd = rd
	} else {
		rd.Resume(counter)
	}
	out.attach(rd)
	if err := r.startChannels(out); err != nil {
		return err
	}
	var rpDone chan error
	if r.pc.bridge {
		dr, ok := r.dst.(io.Reader)
		if !ok {
			return &DestinationError{Err: errors.New("postcopy needs a destination that answers on the same connection (tcp: or unix:)")}
		}
		rpDone = make(chan error, 1)
		done := make(chan struct{})
		r.pc.bridgeDone = done
		go func() {
			defer close(done)
			err := r.bridgeReturnPath(dr, r.rp.w)
			if err != nil && !r.delivered() {
				r.failAsync(err) // the relay ends now, not at the end of the stream
			}
			rpDone <- err
		}()
	}
	if r.merge != nil {
		defer r.merge.stop()
	}
	var tailStart time.Time
	var tailFrom int64
	for {
		rec, err := rd.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			if ce := r.chanErr.Load(); ce != nil {
				return *ce // the source's stream broke because a channel failed first
			}
			return fmt.Errorf("source stream: %w", err)
		}
		if err := r.mergeHook(rec, true); err != nil {
			return err
		}
		switch rec.Kind {
		case stream.KindSectionPart:
			r.setPhase(PhaseIterate)
		case stream.KindSectionEnd:
			r.markStopped()
			r.setPhase(PhaseComplete)
		case stream.KindCommand:
			if rec.Cmd == stream.CmdSwitchoverStart {
				r.markStopped()
				r.setPhase(PhaseComplete)
			}
			if rec.Cmd == stream.CmdPackaged && rec.Depth == 0 && r.pc.bridge {
				r.startPostcopyPhase()
			}
			if r.rp.command(rec) {
				continue // the return path is between the source and the sidecar
			}
		case stream.KindSectionFull:
			if rec.Depth == 0 && tailStart.IsZero() {
				tailStart, tailFrom = time.Now(), out.written()
				r.setPhase(PhaseDevices)
			}
			if r.opt.KeepCPUState && rec.Section.Idstr == "cpu" {
				r.keepCPU(rec)
			}
		case stream.KindVMDesc:
			if r.opt.KeepCPUState && rec.Depth == 0 {
				r.mu.Lock()
				r.vmdesc = append([]byte(nil), rec.JSON...)
				r.mu.Unlock()
			}
		case stream.KindRAM:
			r.count(rec.RAM.Flags)
			if r.pc.bridge && rec.RAM.Flags&^stream.RAMContinue == stream.RAMMemSize {
				r.setBlocks(rec.RAM.Blocks)
			}
			r.pc.requested = false
			if f := rec.RAM.Flags &^ stream.RAMContinue; r.pc.bridge && r.pc.started.Load() && (f == stream.RAMPage || f == stream.RAMZero) {
				r.pc.requested = r.pageSent(rec.RAM.Block, rec.RAM.Offset)
			}
		}
		if err := out.handle(rec); err != nil {
			return err
		}
		if err := r.mergeHook(rec, false); err != nil {
			return err
		}
		if rec.Kind == stream.KindVMDesc && r.rp.open {
			// The source waits for SHUT before it closes its end: the stream is complete.
			break
		}
		if rec.Kind == stream.KindEOF && rec.Depth == 0 && r.pc.started.Load() {
			break // a postcopy stream ends at EOF: no vmdesc follows
		}
	}
	if r.merge != nil {
		if err := r.merge.drained(30 * time.Second); err != nil {
			if ce := r.chanErr.Load(); ce != nil {
				return *ce
			}
			return &DestinationError{Err: err}
		}
	}
	var err error
	if r.pc.bridge && r.pc.started.Load() {
		// Postcopy: the guest runs on the destination already; it says when it has everything
		// with its SHUT, which goes on to the source.
		if err := out.finishWrite(); err != nil {
			return err
		}
		if err := r.awaitShut(2*time.Minute, rpDone); err != nil {
			return err
		}
		// The destination said it has everything (and closes its end): the connection's
		// clean-up can no longer change the outcome.
		r.dst.Close()
	} else {
		// The source's SHUT goes between the stream and its final bytes: once the destination
		// can complete, the source will never resume by itself (no split brain).
		err = out.finish(r.rp.shut)
	}
	if err != nil {
		var ue *UncertainError
		if errors.As(err, &ue) {
			// The destination may have the complete stream: the source must not resume by
			// itself, so it completes (postmigrate) and the operator is told to look.
			r.rp.shut()
		}
		return err
	}
	r.mu.Lock()
	r.deliveredAt = time.Now()
	if !r.tailAt.IsZero() { // the tail went out while it arrived (passOutput)
		tailStart, tailFrom = r.tailAt, r.tailFrom
	}
	if !tailStart.IsZero() {
		r.sum.TailMs = time.Since(tailStart).Milliseconds()
		r.sum.TailBytes = out.written() - tailFrom
	}
	r.mu.Unlock()
	return nil
}

// startChannels starts serving the source's multifd channels, if it has any.
func (r *Relay) startChannels(out output) error {
	if r.multifd == nil {
		return nil
	}
	po, ok := out.(*passOutput)
	if !ok {
		return errors.New("a multifd source cannot be sent over the link (yet): migrate it without multifd, or relay it with --to tcp:")
	}
	r.runChannels(po, r.failAsync)
	return nil
}

// failAsync ends the relay from another goroutine (a multifd channel, the return-path bridge):
// the main stream's read is cut, and the pump returns err.
func (r *Relay) failAsync(err error) {
	if r.chanErr.CompareAndSwap(nil, &err) {
		r.src.Close()
		if r.merge != nil {
			r.merge.stop()
		}
	}
}

// mergeHook keeps the merge of multifd channels in step with the main stream: before a record,
// a sync point waits for every channel's SYNC and an EOS closes the section body; after a ram
// section header the body is open for the channels' pages.
func (r *Relay) mergeHook(rec *stream.Record, before bool) error {
	m := r.merge
	if m == nil || rec.Depth != 0 {
		return nil
	}
	if !before {
		switch rec.Kind {
		case stream.KindSectionStart, stream.KindSectionPart, stream.KindSectionEnd:
			if rec.Section.Idstr == "ram" {
				m.section(true)
			}
		}
		return nil
	}
	if m.mainRecord(rec, r.multifd.Layout) {
		if err := m.syncPoint(); err != nil {
			if ce := r.chanErr.Load(); ce != nil {
				return *ce
			}
			return err
		}
	}
	// A ram body stays open for the channels' pages after its EOS (passOutput holds EOS and
	// footer back) until the next top-level record.
	switch {
	case rec.Kind == stream.KindRAM && rec.RAM.Flags&^stream.RAMContinue == stream.RAMEOS:
		m.eosSeen = true
	case rec.Kind != stream.KindRAM && rec.Kind != stream.KindFooter && rec.Kind != stream.KindCommand && m.eosSeen:
		m.eosSeen = false
		if !m.forward {
			m.section(false)
		}
	}
	return nil
}

// count adds a RAM record to the page counters.
func (r *Relay) count(f stream.RAMFlag) {
	switch f &^ stream.RAMContinue {
	case stream.RAMPage:
		r.normalPages.Add(1)
	case stream.RAMZero:
		r.zeroPages.Add(1)
	case stream.RAMXBZRLE:
		r.xbzrlePages.Add(1)
	case stream.RAMCompressPage:
		r.compressedPages.Add(1)
	}
}

// output is where the engine's records go: a QEMU stream to the destination (relay mode), or
// the link to a receiving sidecar.
type output interface {
	// handle takes one record of the source stream, in order.
	handle(rec *stream.Record) error
	// finish completes the stream after its last record: nil means the destination has it.
	// shut is the source's SHUT, called once the destination has everything but the stream's
	// end (nil when the destination's own SHUT goes to the source).
	finish(shut func() error) error
	// written is the number of bytes written towards the destination so far.
	written() int64
	// close releases the output's goroutines (after finish, or on failure).
	close()
	// attach gives the output the source's Reader; beforeRead and tailData are the Reader's
	// hooks (stream.WithBeforeRead, WithTailData).
	attach(rd *stream.Reader)
	beforeRead()
	tailData(tail []byte)
	// finishWrite writes everything and closes the writing direction only (postcopy: the
	// destination still answers on the return path).
	finishWrite() error
}

// newOutput returns the output of this relay.
func (r *Relay) newOutput() output {
	if r.newLinkOutput != nil {
		return r.newLinkOutput(r)
	}
	return newPassOutput(r)
}

// delivered reports whether the destination has the complete stream.
func (r *Relay) delivered() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return !r.deliveredAt.IsZero()
}

func (r *Relay) markStopped() {
	r.mu.Lock()
	if r.stoppedAt.IsZero() {
		r.stoppedAt = time.Now()
	}
	r.mu.Unlock()
}

func (r *Relay) warn(msg string) {
	if r.opt.Warn != nil {
		r.opt.Warn(msg)
	}
	r.emit(Event{Type: "warning", Time: time.Now(), Phase: r.Phase(), Message: msg})
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	return n, c.counted(int64(n), err)
}

// WriteBuffers writes v and consumes it: one writev when the destination can do that
// (BuffersWriter: transport's sockets), else one write per slice.
func (c *countingWriter) WriteBuffers(v *net.Buffers) (int64, error) {
	var n int64
	var err error
	if bw, ok := c.w.(stream.BuffersWriter); ok {
		n, err = bw.WriteBuffers(v)
	} else {
		n, err = v.WriteTo(c.w)
	}
	return n, c.counted(n, err)
}

// counted adds n to the count and makes a write error the destination's.
func (c *countingWriter) counted(n int64, err error) error {
	c.n.Add(n)
	if err != nil {
		return &DestinationError{Err: fmt.Errorf("writing the stream: %w", err)}
	}
	return nil
}

// DestinationError is a failure of the destination end of a relay: writing the stream (reset,
// closed, full disk) or finishing it.
type DestinationError struct{ Err error }

func (e *DestinationError) Error() string { return e.Err.Error() }
func (e *DestinationError) Unwrap() error { return e.Err }

var errSectionZero = errors.New("a section that receives PART/END must not have id 0 (stream-format.md §2)")

// keepCPU copies a cpu section for CPUStates (bounded by maxKeptCPUState).
func (r *Relay) keepCPU(rec *stream.Record) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cpuBytes+len(rec.Body) > maxKeptCPUState {
		return
	}
	r.cpuBytes += len(rec.Body)
	r.cpus = append(r.cpus, CPUState{Instance: rec.Section.Instance, Body: append([]byte(nil), rec.Body...)})
}

// VerifySummary is the check of --verify: the destination's loaded RAM against the paused
// source's, page by page, before the destination runs.
type VerifySummary struct {
	Equal      bool  `json:"equal"`     // every page matched: the destination was resumed
	Blocks     int   `json:"blocks"`    // RAM blocks compared
	Pages      int64 `json:"pages"`     // pages compared
	Differing  int64 `json:"differing"` // pages that differ (outside the exclusions)
	Excluded   int   `json:"excluded"`  // pages KVM itself rewrites on loading, compared but allowed to differ
	DurationMs int64 `json:"duration_ms"`
	// How each side's RAM was read (guestram methods; "a+b" when blocks differed) and how long
	// it took; the check runs while both guests are paused, so DurationMs adds to the downtime.
	SourceMethod string `json:"source_method"`
	DestMethod   string `json:"dest_method"`
	SourceMs     int64  `json:"source_ms"`
	DestMs       int64  `json:"dest_ms"`
}

// peakRSS is this process's VmHWM in bytes, 0 if /proc/self/status does not say.
func peakRSS() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmHWM:" && f[2] == "kB" {
			if kb, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				return kb << 10
			}
		}
	}
	return 0
}
