package main

import (
	"fmt"
	"os"
	"sync"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// progress shows engine events: a progress bar on a TTY, JSON lines with --json, nothing
// otherwise (hook scripts); warnings always go to stderr.
type progress struct {
	mu    sync.Mutex
	json  bool
	quiet bool
	bar   *progressbar.ProgressBar
}

// jsonEvents is set once a command writes JSON-lines events: the run then ends with an "exit"
// event (main), so that a log always says how it ended.
var jsonEvents bool

// eventSide is the Event.Side this process's events carry ("source", or "receiver" for receive).
var eventSide = "source"

func newProgress(jsonLines, quiet bool) *progress {
	p := &progress{json: jsonLines, quiet: quiet}
	jsonEvents = jsonEvents || jsonLines
	if !jsonLines && !quiet && term.IsTerminal(int(os.Stderr.Fd())) {
		p.bar = progressbar.NewOptions64(-1,
			progressbar.OptionSetWriter(os.Stderr),
			progressbar.OptionShowBytes(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100_000_000),
			progressbar.OptionClearOnFinish(),
			progressbar.OptionSetDescription("setup"))
	}
	return p
}

func (p *progress) event(e savevm.Event) {
	if e.Phase == savevm.PhasePostcopy {
		postcopyRunning.Store(true)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.json {
		jsonOut(e)
		return
	}
	if e.Type == "verify" && !p.quiet {
		// What --verify does and finds: a line of its own, also without a terminal.
		if p.bar != nil {
			p.bar.Clear()
		}
		fmt.Fprintln(os.Stderr, "qemu-migrate-go:", e.Message)
		return
	}
	if p.bar == nil {
		return
	}
	switch e.Type {
	case "progress", "phase", "iteration":
		if e.Total > 0 {
			p.bar.ChangeMax64(e.Transferred + e.Remaining)
		}
		p.bar.Set64(e.Transferred)
		desc := fmt.Sprintf("%-8s iter %d  rate %s/s  dirty %s/s  remaining %s  exp. downtime %dms",
			e.Phase, e.Iteration, human(int64(e.Rate)), human(int64(e.DirtyRate)), human(e.Remaining), e.ExpectedDowntimeMs)
		if e.ThrottlePercent > 0 {
			desc += fmt.Sprintf("  throttle %d%%", e.ThrottlePercent)
		}
		p.bar.Describe(desc)
	case "policy":
		p.bar.Describe(string(e.Phase) + ": " + e.Message)
	}
}

func (p *progress) warn(msg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.json {
		fmt.Fprintln(os.Stderr, "qemu-migrate-go: warning:", msg)
	}
}

func (p *progress) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar != nil {
		p.bar.Finish()
	}
}
