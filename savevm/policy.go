package savevm

import (
	"fmt"
	"time"
)

// Policy is the sidecar's own convergence and switchover policy (design.md "Control").
type Policy struct {
	// Downtime is the longest stop of the guest the switchover may cause (default 300 ms).
	Downtime time.Duration
	// Bandwidth caps the source's sending rate in bytes/s; 0 = unlimited (QEMU's own default
	// would be 128 MiB/s).
	Bandwidth int64
	// MaxIterations switches over after this many passes over RAM even if the expected downtime
	// is above Downtime; 0 = no limit.
	MaxIterations int
	// Timeout bounds the live phase; 0 = none. TimeoutAction says what happens then.
	Timeout       time.Duration
	TimeoutAction TimeoutAction
	// StallTimeout aborts when no byte has moved from the source for this long (default 30 s).
	StallTimeout time.Duration
	// AutoConverge lets QEMU throttle the guest's vCPUs, increasingly, while the guest dirties
	// memory as fast as the link carries it away (QEMU's auto-converge: the bytes dirtied in a
	// pass exceed throttle-trigger-threshold, 50% by default, of the bytes sent, twice in a row).
	AutoConverge bool
	// Postcopy enables postcopy-ram: the policy may then switch to postcopy — after
	// PostcopyAfter passes, at Timeout with TimeoutPostcopy, or when the expected downtime has
	// not fallen for PostcopyStall passes (default 3) — and the guest runs on the destination,
	// which asks for the pages it still lacks.
	Postcopy      bool
	PostcopyAfter int
	PostcopyStall int
	// PostcopyBandwidth caps the source's rate after the switch (QEMU's max-postcopy-bandwidth,
	// libvirt's --postcopy-bandwidth) in bytes/s; 0 = unlimited. Requested pages share it.
	PostcopyBandwidth int64
}

// TimeoutAction is what the engine does when Policy.Timeout expires.
type TimeoutAction string

const (
	// TimeoutAbort cancels the migration; the source VM keeps running.
	TimeoutAbort TimeoutAction = "abort"
	// TimeoutPause pauses the source VM so that the migration completes (the guest is resumed on
	// the destination when the destination's QMP is known), like libvirt's --timeout-suspend.
	TimeoutPause TimeoutAction = "pause"
	// TimeoutPostcopy switches to postcopy (libvirt's --timeout-postcopy); needs Postcopy.
	TimeoutPostcopy TimeoutAction = "postcopy"
)

// withDefaults fills the zero values.
func (p Policy) withDefaults() Policy {
	if p.Downtime <= 0 {
		p.Downtime = 300 * time.Millisecond
	}
	if p.TimeoutAction == "" {
		p.TimeoutAction = TimeoutAbort
	}
	if p.StallTimeout <= 0 {
		p.StallTimeout = 30 * time.Second
	}
	if p.PostcopyStall <= 0 {
		p.PostcopyStall = 3
	}
	return p
}

// Validate reports a policy that cannot work.
func (p Policy) Validate() error {
	switch p.TimeoutAction {
	case "", TimeoutAbort, TimeoutPause:
	case TimeoutPostcopy:
		if !p.Postcopy {
			return fmt.Errorf("--timeout-action postcopy needs --postcopy")
		}
	default:
		return fmt.Errorf("timeout action %q: want abort, pause or postcopy", p.TimeoutAction)
	}
	if p.PostcopyAfter > 0 && !p.Postcopy {
		return fmt.Errorf("--postcopy-after needs --postcopy")
	}
	if p.PostcopyAfter < 0 || p.PostcopyStall < 0 {
		return fmt.Errorf("postcopy limits must not be negative")
	}
	if p.Bandwidth < 0 || p.PostcopyBandwidth < 0 || p.MaxIterations < 0 || p.Timeout < 0 {
		return fmt.Errorf("bandwidth, iterations and timeout must not be negative")
	}
	if p.Downtime > 2000*time.Second {
		return fmt.Errorf("downtime %v exceeds QEMU's limit of 2000 s", p.Downtime)
	}
	return nil
}

// decision is what the policy says at one check.
type decision int

const (
	hold     decision = iota // keep iterating
	release                  // the expected downtime fits: let QEMU switch over within Downtime
	force                    // iteration limit: switch over whatever the downtime
	pauseVM                  // timeout with action pause: stop the guest, then force
	abortNow                 // timeout with action abort, or a stall
	postcopy                 // switch to postcopy: the guest runs on the destination from now on
)

var decisionNames = [...]string{hold: "hold", release: "release", force: "force", pauseVM: "pause", abortNow: "abort", postcopy: "postcopy"}

// String is the decision's name in "policy" events (Event.Decision).
func (d decision) String() string { return decisionNames[d] }

// decide applies the policy to one observation.
func (p Policy) decide(o observation) (decision, string) {
	switch {
	case o.sinceProgress >= p.StallTimeout:
		return abortNow, fmt.Sprintf("stalled: no data from the source for %v (--stall-timeout)", o.sinceProgress.Round(time.Millisecond))
	case p.Timeout > 0 && o.elapsed >= p.Timeout && p.TimeoutAction == TimeoutAbort:
		return abortNow, fmt.Sprintf("not converged within --timeout %v (expected downtime %v > %v)", p.Timeout, o.expected.Round(time.Millisecond), p.Downtime)
	case p.Timeout > 0 && o.elapsed >= p.Timeout && p.TimeoutAction == TimeoutPostcopy:
		return postcopy, fmt.Sprintf("--timeout %v reached: switching to postcopy (expected downtime %v > %v)", p.Timeout, o.expected.Round(time.Millisecond), p.Downtime)
	case p.Timeout > 0 && o.elapsed >= p.Timeout:
		return pauseVM, fmt.Sprintf("--timeout %v reached: pausing the guest to complete", p.Timeout)
	case p.MaxIterations > 0 && o.iteration > p.MaxIterations:
		return force, fmt.Sprintf("--max-iterations %d reached: switching over (expected downtime %v)", p.MaxIterations, o.expected.Round(time.Millisecond))
	case o.fresh && o.rate > 0 && o.expected <= p.Downtime:
		return release, fmt.Sprintf("expected downtime %v ≤ %v: switching over", o.expected.Round(time.Millisecond), p.Downtime)
	case o.fresh && o.rate > 0 && o.fitFor >= backlogPatience:
		return release, fmt.Sprintf("expected downtime %v, %v of it the link's backlog, which has not drained within %v: switching over",
			o.expected.Round(time.Millisecond), o.backlog.Round(time.Millisecond), backlogPatience)
	case p.Postcopy && p.PostcopyAfter > 0 && o.iteration > p.PostcopyAfter:
		return postcopy, fmt.Sprintf("--postcopy-after %d reached: switching to postcopy (expected downtime %v)", p.PostcopyAfter, o.expected.Round(time.Millisecond))
	case p.Postcopy && p.PostcopyAfter == 0 && o.fresh && o.stalledPasses >= p.PostcopyStall:
		return postcopy, fmt.Sprintf("the expected downtime has not fallen for %d passes (%v > %v): switching to postcopy", o.stalledPasses, o.expected.Round(time.Millisecond), p.Downtime)
	}
	return hold, ""
}

// observation is what the policy loop sees at one check.
type observation struct {
	elapsed       time.Duration // since the migration started
	sinceProgress time.Duration // since the last byte from the source
	iteration     int           // passes over RAM started (QEMU's dirty-sync-count)
	// fresh: QEMU synced its dirty bitmap since the last check, so remaining is the whole dirty
	// set a switchover would have to send (later in a pass it only counts what is still unsent
	// of that pass, and would underestimate the downtime).
	fresh     bool
	remaining int64         // bytes of RAM still dirty
	rate      float64       // bytes/s the sidecar is forwarding
	expected  time.Duration // remaining / rate
	// stalledPasses counts the passes in a row whose expected downtime was not at least 10 %
	// below the best one before (the guest dirties as fast as the link carries away).
	stalledPasses int
	// backlog (over a link, included in expected) is how long the receiver needs for what is
	// already on its way; fitFor is how long the RAM's part alone has fitted Downtime.
	backlog time.Duration
	fitFor  time.Duration
}

// backlogPatience bounds the wait for a link's backlog to drain once the RAM still dirty
// would fit the downtime: a guest that keeps the link busy keeps the kernels' buffers full,
// and the policy must not hold it for ever on their account.
const backlogPatience = 2 * time.Second
