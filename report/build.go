package report

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Page is everything the HTML template writes: built from a Run by NewPage.
type Page struct {
	Title    string
	Source   string // the log's name, as given
	Started  string // the first event's time
	Side     string
	Schema   int
	Status   string // migrated | failed | incomplete
	Headline string
	// Where and Why explain a run that did not migrate.
	Where, Why string
	Rows       []Row
	// RowCols are Rows in two columns.
	RowCols [][]Row
	// Timeline … Sections are the figures; a nil one is not drawn.
	Timeline  *Chart
	Rates     *Chart
	Remaining *Chart
	IterBytes *Chart
	IterDown  *Chart
	Downtime  *Chart
	Sections  *Chart
	// Missing names what the log lacks for a figure (a receiver's log has no iterations).
	Missing  []string
	Warnings []Note
	Skipped  []Note
	LogNotes []string
}

// Row is one line of the summary table.
type Row struct {
	Name, Text string
	Key, Value string // data-key, data-value: the raw figure (bytes, ms, count)
}

// Page geometry: every time chart shares the same x axis.
const (
	pageW   = 1000.0
	halfW   = 492.0
	marginL = 72.0
	marginR = 20.0
	marginT = 18.0
	marginB = 30.0
)

// NewPage lays out the figures of run. name is how the log is called on the page.
func NewPage(run *Run, name string) *Page {
	p := &Page{Title: "Migration report", Source: name, Side: run.Side, Schema: run.Schema, Status: run.Status(),
		Warnings: run.Warnings, Skipped: run.Skipped}
	if !run.Start.IsZero() {
		p.Started = run.Start.UTC().Format("2006-01-02 15:04:05.000 UTC")
	}
	if p.Side == "" {
		p.Side = "source"
	}
	p.headline(run)
	p.rows(run)
	half := (len(p.Rows) + 1) / 2
	p.RowCols = [][]Row{p.Rows[:half], p.Rows[half:]}
	end := run.Duration()
	if end <= 0 {
		end = time.Millisecond
	}
	p.Timeline = timelineChart(run, end)
	p.Rates = ratesChart(run, end)
	p.Remaining = remainingChart(run, end)
	p.IterBytes, p.IterDown = iterationCharts(run)
	p.Downtime = downtimeChart(run)
	p.Sections = sectionsChart(run)
	if len(run.Iterations) == 0 {
		why := "the migration stopped before QEMU's first dirty sync"
		switch {
		case run.Side == "receiver":
			why = "a receiver sees no passes over RAM"
		case ramTotal(run) == 0:
			why = "the log has no RAM counters of a source QEMU: restore replays a file"
		}
		p.Missing = append(p.Missing, "per-iteration figures and dirty RAM: the log has no \"iteration\" events ("+why+")")
	}
	if run.Summary == nil {
		p.Missing = append(p.Missing, "downtime split and bytes per section: the log has no \"summary\" event (only a completed migration writes one)")
	}
	p.logNotes(run)
	return p
}

func (p *Page) headline(run *Run) {
	budget := ""
	if run.BudgetMs > 0 {
		budget = fmt.Sprintf(" (budget %s)", fmtMs(run.BudgetMs))
	}
	switch p.Status {
	case "migrated":
		if s := run.Summary; s != nil {
			p.Headline = fmt.Sprintf("Migrated in %s: downtime %s%s, %s sent", fmtMs(s.TotalTimeMs), fmtMs(s.DowntimeMs), budget, fmtBytes(s.BytesOut))
			if s.Iterations > 0 {
				p.Headline += fmt.Sprintf(" in %d iteration(s)", s.Iterations)
			}
		} else {
			p.Headline = fmt.Sprintf("Finished after %s (exit 0)", fmtDur(run.End))
		}
	case "failed":
		e := run.Exit
		p.Headline = fmt.Sprintf("Failed in %s phase after %s — exit %d (%s)", phaseWord(run.LastPhase()), fmtDur(run.Duration()), e.Code, ExitMeaning(e.Code))
		p.Why = e.Message
		if p.Why == "" {
			p.Why = "the exit event carries no message"
		}
	default:
		p.Headline = fmt.Sprintf("Incomplete: the log stops in %s phase after %s, without a summary or exit event (still running, or the process was killed)",
			phaseWord(run.LastPhase()), fmtDur(run.End))
	}
	if p.Status == "migrated" {
		return
	}
	// Where: the last thing the log knew about the migration.
	var parts []string
	parts = append(parts, fmt.Sprintf("last phase %s (from %s)", orDash(run.LastPhase()), fmtDur(lastPhaseStart(run))))
	if s, ok := lastLive(run); ok {
		parts = append(parts, fmt.Sprintf("iteration %d", s.Iteration))
		if s.Total > 0 {
			parts = append(parts, fmt.Sprintf("%s of %s RAM still dirty", fmtBytes(s.Remaining), fmtBytes(s.Total)))
		}
		if s.ExpectedMs > 0 || run.BudgetMs > 0 {
			parts = append(parts, fmt.Sprintf("expected downtime %s%s", fmtMs(s.ExpectedMs), budget))
		}
		parts = append(parts, fmt.Sprintf("%s sent", fmtBytes(s.Transferred)))
	}
	if n := len(run.Decisions); n > 0 {
		d := run.Decisions[n-1]
		parts = append(parts, fmt.Sprintf("policy: %s at %s (%s)", d.Decision, fmtDur(d.At), d.Message))
	}
	p.Where = strings.Join(parts, "; ")
}

func orDash(s string) string {
	if s == "" {
		return "—"
	}
	return s
}

func lastPhaseStart(run *Run) time.Duration {
	if n := len(run.Phases); n > 0 {
		return run.Phases[n-1].Start
	}
	return 0
}

// lastLive is the last sample with QEMU's RAM counters.
func lastLive(run *Run) (Sample, bool) {
	for i := len(run.Samples) - 1; i >= 0; i-- {
		if s := run.Samples[i]; s.Kind != "phase" {
			return s, true
		}
	}
	return Sample{}, false
}

func (p *Page) rows(run *Run) {
	add := func(name, key string, value int64, text string) {
		p.Rows = append(p.Rows, Row{Name: name, Text: text, Key: key, Value: strconv.FormatInt(value, 10)})
	}
	status := p.Status
	if run.Exit != nil {
		status = fmt.Sprintf("%s (exit %d: %s)", p.Status, run.Exit.Code, ExitMeaning(run.Exit.Code))
		add("result", "exit_code", int64(run.Exit.Code), status)
	} else {
		p.Rows = append(p.Rows, Row{Name: "result", Text: status, Key: "result", Value: p.Status})
	}
	if run.BudgetMs > 0 {
		add("downtime budget (--downtime)", "downtime_budget_ms", run.BudgetMs, fmtMs(run.BudgetMs))
	}
	if s := run.Summary; s != nil {
		add("total time", "total_time_ms", s.TotalTimeMs, fmtMs(s.TotalTimeMs))
		dt := fmtMs(s.DowntimeMs)
		if run.BudgetMs > 0 {
			verdict := "within"
			if s.DowntimeMs > run.BudgetMs {
				verdict = "over"
			}
			dt += fmt.Sprintf(" (%s the budget)", verdict)
		}
		add("downtime (the sidecar's: guest stopped → destination has everything)", "downtime_ms", s.DowntimeMs, dt)
		qd := fmtMs(s.QEMUDowntimeMs)
		if s.QEMUDowntimeMs == 0 {
			qd = "— (not read)"
		}
		add("downtime (the source QEMU's own figure)", "qemu_downtime_ms", s.QEMUDowntimeMs, qd)
		if text, ok := switchoverBy[s.Switchover]; ok {
			p.Rows = append(p.Rows, Row{Name: "switchover decided by", Text: text, Key: "switchover", Value: s.Switchover})
		}
		add("device state tail: time", "tail_ms", s.TailMs, fmtMs(s.TailMs))
		add("device state tail: size", "tail_bytes", s.TailBytes, fmtBytes(s.TailBytes))
		add("iterations (passes over RAM)", "iterations", int64(s.Iterations), fmtInt(int64(s.Iterations)))
		add("bytes read from the source", "bytes_in", s.BytesIn, fmtBytes(s.BytesIn))
		add("bytes written to the destination", "bytes_out", s.BytesOut, fmtBytes(s.BytesOut))
		add("normal pages", "normal_pages", s.NormalPages, fmtInt(s.NormalPages))
		add("zero pages", "zero_pages", s.ZeroPages, fmtInt(s.ZeroPages))
		add("XBZRLE pages", "xbzrle_pages", s.XBZRLEPages, fmtInt(s.XBZRLEPages))
		add("compressed pages", "compressed_pages", s.CompressedPages, fmtInt(s.CompressedPages))
		if s.Rewritten > 0 {
			add("records rewritten for the destination's version", "rewritten", s.Rewritten, fmtInt(s.Rewritten))
		}
		if s.PeakRSSBytes > 0 {
			add("the sidecar's peak memory (RSS)", "peak_rss_bytes", s.PeakRSSBytes, fmtBytes(s.PeakRSSBytes))
		}
		if s.PausedByPolicy {
			add("guest paused by the policy (--timeout-action pause)", "paused_by_policy", 1, "yes")
		}
		var secBytes int64
		for _, v := range s.Sections {
			secBytes += v
		}
		add("sections", "sections", int64(len(s.Sections)), fmt.Sprintf("%d, %s", len(s.Sections), fmtBytes(secBytes)))
		if l := s.Link; l != nil {
			add("link: connections", "link.connections", int64(l.Connections), fmtInt(int64(l.Connections)))
			add("link: bytes on the link", "link.bytes_on_link", l.BytesOnLink, fmtBytes(l.BytesOnLink))
			add("link: pages the destination already held", "link.pages_skipped", l.PagesSkipped, fmtInt(l.PagesSkipped))
			add("link: zero pages the destination already held", "link.zero_skipped", l.ZeroSkipped, fmtInt(l.ZeroSkipped))
			add("link: page data batched", "link.page_bytes", l.PageBytes, fmtBytes(l.PageBytes))
			codecs := make([]string, 0, len(l.Frames))
			for k := range l.Frames {
				codecs = append(codecs, k)
			}
			sort.Strings(codecs)
			for _, k := range codecs {
				add("link: frames "+k, "link.frames."+k, l.Frames[k], fmtInt(l.Frames[k]))
			}
		}
	} else {
		add("elapsed", "elapsed_ms", run.End.Milliseconds(), fmtDur(run.End))
		if s, ok := lastLive(run); ok {
			add("bytes sent", "transferred", s.Transferred, fmtBytes(s.Transferred))
			if s.Total > 0 {
				add("RAM still dirty at the end", "remaining", s.Remaining, fmtBytes(s.Remaining))
				add("expected downtime at the end", "expected_downtime_ms", s.ExpectedMs, fmtMs(s.ExpectedMs))
			}
			if s.Iteration > 0 {
				add("iteration at the end", "iteration", int64(s.Iteration), fmtInt(int64(s.Iteration)))
			}
		}
	}
	if tot := ramTotal(run); tot > 0 {
		add("guest RAM (QEMU's total)", "ram_total", tot, fmtBytes(tot))
	}
	if mx := maxThrottle(run); mx > 0 {
		add("highest vCPU throttle (auto-converge)", "max_throttle_percent", mx, fmt.Sprintf("%d%%", mx))
	}
	for _, d := range run.Decisions {
		p.Rows = append(p.Rows, Row{Name: "policy decision at " + fmtDur(d.At), Text: d.Decision + ": " + d.Message, Key: "decision", Value: d.Decision})
	}
}

func ramTotal(run *Run) int64 {
	for i := len(run.Samples) - 1; i >= 0; i-- {
		if run.Samples[i].Total > 0 {
			return run.Samples[i].Total
		}
	}
	return 0
}

func maxThrottle(run *Run) int64 {
	var mx int64
	for _, s := range run.Samples {
		mx = max(mx, s.Throttle)
	}
	return mx
}

func (p *Page) logNotes(run *Run) {
	p.LogNotes = append(p.LogNotes, fmt.Sprintf("%d events (schema %d, side %s)", run.Events, run.Schema, p.Side))
	if run.Schema > 2 {
		p.LogNotes = append(p.LogNotes, fmt.Sprintf("the log was written with event schema %d; this report knows schema 2 and draws the fields it knows", run.Schema))
	}
	if run.Runs > 1 {
		p.LogNotes = append(p.LogNotes, fmt.Sprintf("the log holds %d migrations; this page shows the last", run.Runs))
	}
	types := make([]string, 0, len(run.Ignored))
	for t := range run.Ignored {
		types = append(types, t)
	}
	sort.Strings(types)
	for _, t := range types {
		p.LogNotes = append(p.LogNotes, fmt.Sprintf("%d %q event(s) not drawn", run.Ignored[t], t))
	}
	kinds := make([]string, 0, len(run.Dropped))
	for k := range run.Dropped {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		which := "the latest"
		if k == "iteration" {
			which = "the oldest"
		}
		p.LogNotes = append(p.LogNotes, fmt.Sprintf("%d %q event(s) not drawn (%s, beyond the %d a figure shows)", run.Dropped[k], k, which, DefaultMaxMarks))
	}
	if run.SkippedLines > 0 {
		p.LogNotes = append(p.LogNotes, fmt.Sprintf("%d line(s) that are not events (the first %d below)", run.SkippedLines, len(run.Skipped)))
	}
}

// timeX is the x scale of the time charts.
func timeX(end time.Duration, w float64) (linear, []Tick) {
	secs, ticks := timeAxis(end, int(w/90))
	x := linear{0, secs, marginL, w - marginR}
	var ts []Tick
	for _, t := range ticks {
		ts = append(ts, Tick{Pos: x.at(t), Label: fmtSeconds(t)})
	}
	return x, ts
}

func sx(x linear, d time.Duration) float64 { return x.at(d.Seconds()) }

func phaseClass(p string) string {
	switch p {
	case "setup", "iterate", "complete", "devices", "done":
		return p
	}
	return "other"
}

// phaseBands are the phases as rectangles from y to y+h.
func phaseBands(run *Run, x linear, y, h float64, prefix string, labels bool) []Mark {
	var out []Mark
	for _, ph := range run.Phases {
		x0, x1 := sx(x, ph.Start), sx(x, ph.End)
		w := math.Max(x1-x0, 1)
		m := Mark{X: x0, Y: y, W: w, H: h, Class: prefix + phaseClass(ph.Phase), Key: "phase:" + ph.Phase,
			Value: strconv.FormatInt(ph.Start.Milliseconds(), 10),
			Title: fmt.Sprintf("%s: %s → %s (%s), %s sent at its start", ph.Phase, fmtDur(ph.Start), fmtDur(ph.End), fmtDur(ph.End-ph.Start), fmtBytes(ph.Transferred))}
		if labels && w > float64(7*len(ph.Phase)+6) {
			m.Label, m.LX, m.LY, m.Anchor = ph.Phase, x0+w/2, y+h/2+4, "middle"
		}
		out = append(out, m)
	}
	return out
}

func decisionRules(run *Run, x linear, y0, y1 float64, labelY float64) []Rule {
	var out []Rule
	for _, d := range run.Decisions {
		X := sx(x, d.At)
		r := Rule{X1: X, Y1: y0, X2: X, Y2: y1, Class: "decision " + decisionClass(d.Decision), Key: "decision:" + d.Decision,
			Value: strconv.FormatInt(d.At.Milliseconds(), 10),
			Title: fmt.Sprintf("%s at %s: %s", d.Decision, fmtDur(d.At), d.Message)}
		if labelY > 0 {
			r.Label, r.LX, r.LY, r.Anchor = d.Decision, X+4, labelY, "start"
			if X > pageW-120 {
				r.LX, r.Anchor = X-4, "end"
			}
		}
		out = append(out, r)
	}
	return out
}

func decisionClass(d string) string {
	switch d {
	case "release", "force", "pause", "abort":
		return "d-" + d
	}
	return "d-other"
}

func timelineChart(run *Run, end time.Duration) *Chart {
	c := &Chart{Key: "timeline", Title: "Phases and the policy's decisions",
		Note: "phase events on a time axis; release, force (--max-iterations), pause (--timeout-action pause) and abort as flags; the auto-converge throttle and warnings below",
		W:    pageW, H: 132}
	c.Plot = Rect{marginL, 6, pageW - marginL - marginR, c.H - 6 - marginB}
	x, ticks := timeX(end, pageW)
	c.XTicks = ticks
	c.XLabel = "time since the first event"
	rowPh, rowDec, rowThr := Rect{0, 12, 0, 30}, 58.0, Rect{0, 72, 0, 20}
	c.Labels = append(c.Labels, Label{X: marginL - 6, Y: rowPh.Y + 19, Text: "phases", Anchor: "end", Class: "rowname"},
		Label{X: marginL - 6, Y: rowDec + 4, Text: "decisions", Anchor: "end", Class: "rowname"},
		Label{X: marginL - 6, Y: rowThr.Y + 14, Text: "throttle", Anchor: "end", Class: "rowname"})
	c.Bands = phaseBands(run, x, rowPh.Y, rowPh.H, "ph-", true)
	if len(run.Phases) == 0 {
		c.Labels = append(c.Labels, Label{X: marginL + 4, Y: rowPh.Y + 19, Text: "no phase events in the log", Class: "muted"})
	}
	c.Rules = decisionRules(run, x, rowPh.Y-4, c.Plot.Bottom(), rowDec+4)
	// Throttle: the step of throttle_percent, full height = 100 %.
	var last int64 = -1
	var from time.Duration
	flush := func(to time.Duration) {
		if last > 0 {
			x0, x1 := sx(x, from), sx(x, to)
			if n := len(c.Bars); n > 0 && x1-c.Bars[n-1].X < 1 {
				return // narrower than a pixel after the previous step: that one shows it
			}
			h := rowThr.H * float64(min(max(last, 0), 100)) / 100
			c.Bars = append(c.Bars, Mark{X: x0, Y: rowThr.Y + rowThr.H - h, W: math.Max(x1-x0, 1), H: h, Class: "throttle",
				Key: "throttle", Value: strconv.FormatInt(last, 10), Title: fmt.Sprintf("vCPU throttle %d%% from %s to %s", last, fmtDur(from), fmtDur(to))})
		}
	}
	lastLabelX := -1e9
	for _, s := range run.Samples {
		if s.Kind == "phase" || s.Throttle == last {
			continue
		}
		flush(s.At)
		last, from = s.Throttle, s.At
		if X := sx(x, s.At); X-lastLabelX > 34 && s.Throttle > 0 {
			c.Labels = append(c.Labels, Label{X: X + 2, Y: rowThr.Y - 2, Text: fmt.Sprintf("%d%%", s.Throttle), Class: "small"})
			lastLabelX = X
		}
	}
	if last > 0 {
		flush(end)
	}
	if maxThrottle(run) == 0 {
		c.Labels = append(c.Labels, Label{X: marginL + 4, Y: rowThr.Y + 14, Text: "no vCPU throttle", Class: "muted"})
	}
	for _, w := range run.Warnings {
		X := sx(x, w.At)
		c.Dots = append(c.Dots, Mark{X: X, Y: rowDec, W: 4, Class: "warning", Key: "warning", Value: strconv.FormatInt(w.At.Milliseconds(), 10),
			Title: fmt.Sprintf("warning at %s (%s): %s", fmtDur(w.At), w.Phase, w.Message)})
	}
	if e := run.Exit; e != nil {
		X := sx(x, e.At)
		cls, label := "exit-ok", "exit 0"
		if e.Code != 0 {
			cls, label = "exit-failed", fmt.Sprintf("✕ exit %d", e.Code)
		}
		r := Rule{X1: X, Y1: rowPh.Y - 6, X2: X, Y2: c.Plot.Bottom(), Class: cls, Key: "exit", Value: strconv.Itoa(e.Code),
			Title: fmt.Sprintf("exit %d at %s: %s", e.Code, fmtDur(e.At), e.Message), Label: label, LX: X - 4, LY: rowDec + 4, Anchor: "end"}
		if e.Code == 0 {
			r.Label = "" // the banner says it; the rule marks the end
		}
		if len(run.Decisions) == 0 || sx(x, run.Decisions[len(run.Decisions)-1].At) < X-90 {
			c.Rules = append(c.Rules, r)
		} else {
			r.LY = rowDec + 16
			c.Rules = append(c.Rules, r)
		}
	}
	c.Legend = []Legend{{"ph-setup", "setup"}, {"ph-iterate", "iterate (guest runs)"}, {"ph-complete", "complete (guest stopped: RAM)"},
		{"ph-devices", "devices (device state)"}, {"ph-done", "done"}}
	seen := map[string]bool{}
	for _, d := range run.Decisions {
		if cls := decisionClass(d.Decision); !seen[cls] {
			seen[cls] = true
			c.Legend = append(c.Legend, Legend{"sw-" + strings.TrimPrefix(cls, "d-"), "decision: " + d.Decision})
		}
	}
	if maxThrottle(run) > 0 {
		c.Legend = append(c.Legend, Legend{"throttle", "vCPU throttle (bar height = percent)"})
	}
	if len(run.Warnings) > 0 {
		c.Legend = append(c.Legend, Legend{"warning", "warning"})
	}
	return c
}

// transferredAt is the cumulative bytes sent, interpolated linearly between the samples.
type cumulative struct {
	t []float64 // seconds
	v []float64
}

func newCumulative(run *Run) cumulative {
	var c cumulative
	hi := 0.0
	add := func(at time.Duration, v int64) {
		f := float64(v)
		if f < hi {
			f = hi // the counter only grows; a late sample must not make it fall back
		}
		hi = f
		c.t = append(c.t, at.Seconds())
		c.v = append(c.v, f)
	}
	add(0, 0)
	for _, s := range run.Samples {
		add(s.At, s.Transferred)
	}
	if run.Summary != nil && run.Summary.BytesOut > 0 {
		add(run.Duration(), run.Summary.BytesOut)
	}
	return c
}

func (c cumulative) at(t float64) float64 {
	i := sort.SearchFloat64s(c.t, t)
	switch {
	case i == 0:
		return c.v[0]
	case i >= len(c.t):
		return c.v[len(c.v)-1]
	}
	t0, t1 := c.t[i-1], c.t[i]
	if t1 == t0 {
		return c.v[i]
	}
	return c.v[i-1] + (c.v[i]-c.v[i-1])*(t-t0)/(t1-t0)
}

func ratesChart(run *Run, end time.Duration) *Chart {
	c := &Chart{Key: "rates", Title: "Transfer rate and the guest's dirty rate", W: pageW, H: 230}
	c.Plot = Rect{marginL, marginT, pageW - marginL - marginR, c.H - marginT - marginB}
	x, ticks := timeX(end, pageW)
	c.XTicks, c.XLabel = ticks, "time since the first event"
	cum := newCumulative(run)
	secs := end.Seconds()
	win := math.Max(secs/120, 0.2)
	type rp struct{ t, v float64 }
	var sent []rp
	for t0 := 0.0; t0 < secs; t0 += win {
		t1 := math.Min(t0+win, secs)
		if t1-t0 < win/4 && len(sent) > 0 {
			break
		}
		sent = append(sent, rp{(t0 + t1) / 2, (cum.at(t1) - cum.at(t0)) / (t1 - t0)})
	}
	if len(sent) == 1 {
		// A run shorter than one window: its average holds over the whole run, and a line of
		// one point would draw nothing.
		sent = []rp{{0, sent[0].v}, {secs, sent[0].v}}
	}
	// QEMU's dirty-pages-rate (measured over its own 1 s periods; 0 before the first).
	var dirty []rp
	for _, s := range run.Samples {
		if s.Kind == "progress" && s.Total > 0 {
			dirty = append(dirty, rp{s.At.Seconds(), s.DirtyRate})
		}
	}
	// Derived: the dirty set at a sync over the time of the pass that collected it.
	type seg struct{ t0, t1, v float64 }
	var perPass []seg
	for i := 1; i < len(run.Iterations); i++ {
		a, b := run.Iterations[i-1], run.Iterations[i]
		if b.N == a.N+1 && b.At > a.At {
			perPass = append(perPass, seg{a.At.Seconds(), b.At.Seconds(), float64(b.Remaining) / (b.At - a.At).Seconds()})
		}
	}
	top := 0.0
	for _, p := range sent {
		top = math.Max(top, p.v)
	}
	anyDirty := false
	for _, p := range dirty {
		top = math.Max(top, p.v)
		anyDirty = anyDirty || p.v > 0
	}
	for _, s := range perPass {
		top = math.Max(top, s.v)
	}
	if top <= 0 {
		c.Empty = "nothing was sent according to the log"
		return c
	}
	unit, uname := byteUnit(top)
	ymax, step := niceMax(top/unit, 5)
	y := linear{0, ymax * unit, c.Plot.Bottom(), c.Plot.Y}
	for _, v := range multiples(ymax, step) {
		c.YTicks = append(c.YTicks, Tick{Pos: y.at(v * unit), Label: trimFloat(v, 2)})
	}
	c.YLabel = uname + "/s"
	c.Bands = phaseBands(run, x, c.Plot.Y, c.Plot.H, "bg-", false)
	c.Rules = decisionRules(run, x, c.Plot.Y, c.Plot.Bottom(), c.Plot.Y+12)
	var pts []pt
	for _, p := range sent {
		pts = append(pts, pt{x.at(p.t), y.at(p.v)})
	}
	s, n := points(pts, c.Plot.W)
	c.Lines = append(c.Lines, Line{Class: "sent", Points: s, N: n, Key: "sent",
		Title: fmt.Sprintf("bytes sent per second, averaged over %s windows", fmtDur(time.Duration(win*float64(time.Second))))})
	c.Legend = append(c.Legend, Legend{"sent", fmt.Sprintf("sent (average over %s)", fmtDur(time.Duration(win*float64(time.Second))))})
	if anyDirty {
		pts = pts[:0]
		for i, p := range dirty {
			if i > 0 { // a step: QEMU's figure holds until its next period
				pts = append(pts, pt{x.at(p.t), y.at(dirty[i-1].v)})
			}
			pts = append(pts, pt{x.at(p.t), y.at(p.v)})
		}
		s, n := points(pts, c.Plot.W)
		c.Lines = append(c.Lines, Line{Class: "dirty", Points: s, N: n, Key: "dirty_rate", Title: "the guest's dirty rate as QEMU reports it (dirty-pages-rate × 4 KiB)"})
		c.Legend = append(c.Legend, Legend{"dirty", "guest dirty rate (QEMU)"})
	}
	if len(perPass) > 0 {
		pts = pts[:0]
		for _, sg := range perPass {
			pts = append(pts, pt{x.at(sg.t0), y.at(sg.v)}, pt{x.at(sg.t1), y.at(sg.v)})
		}
		s, n := points(pts, c.Plot.W)
		c.Lines = append(c.Lines, Line{Class: "perpass", Points: s, N: n, Key: "dirtied_per_pass",
			Title: "RAM dirtied during each pass (the dirty set at the next sync) over the pass's time"})
		c.Legend = append(c.Legend, Legend{"perpass", "dirtied per pass ÷ pass time"})
	}
	if !anyDirty && len(perPass) == 0 && len(run.Iterations) > 0 {
		c.Note = "QEMU reported no dirty rate (it measures over 1 s periods) and the log has no two consecutive passes to derive one from"
	}
	return c
}

func remainingChart(run *Run, end time.Duration) *Chart {
	var live []Sample
	for _, s := range run.Samples {
		if s.Kind != "phase" && s.Total > 0 {
			live = append(live, s)
		}
	}
	c := &Chart{Key: "remaining", Title: "Dirty RAM left on the source", W: pageW, H: 190}
	c.Plot = Rect{marginL, marginT, pageW - marginL - marginR, c.H - marginT - marginB}
	if len(live) == 0 {
		return nil
	}
	x, ticks := timeX(end, pageW)
	c.XTicks, c.XLabel = ticks, "time since the first event"
	top := 0.0
	for _, s := range live {
		top = math.Max(top, float64(max(s.Remaining, s.Total)))
	}
	unit, uname := byteUnit(top)
	ymax, step := niceMax(top/unit, 4)
	y := linear{0, ymax * unit, c.Plot.Bottom(), c.Plot.Y}
	for _, v := range multiples(ymax, step) {
		c.YTicks = append(c.YTicks, Tick{Pos: y.at(v * unit), Label: trimFloat(v, 2)})
	}
	c.YLabel = uname
	c.Bands = phaseBands(run, x, c.Plot.Y, c.Plot.H, "bg-", false)
	var pts []pt
	for _, s := range live {
		pts = append(pts, pt{sx(x, s.At), y.at(float64(s.Remaining))})
	}
	if at, ok := ramSent(run); ok && at > live[len(live)-1].At {
		// The last pass ran with the guest stopped (or the destination pulled the rest): when
		// the stream moves past it nothing is dirty any more. A run that released at its first
		// sample would otherwise draw a single point.
		pts = append(pts, pt{sx(x, at), y.at(0)})
	}
	ps, n := points(pts, c.Plot.W)
	c.Lines = append(c.Lines, Line{Class: "remaining", Points: ps, N: n, Key: "remaining", Title: "RAM still dirty on the source (query-migrate's remaining; 0 once the last pass is sent)"})
	tot := live[len(live)-1].Total
	c.Rules = append(c.Rules, Rule{X1: c.Plot.X, Y1: y.at(float64(tot)), X2: c.Plot.Right(), Y2: y.at(float64(tot)), Class: "total",
		Key: "ram_total", Value: strconv.FormatInt(tot, 10), Label: "guest RAM " + fmtBytes(tot), LX: c.Plot.Right() - 4, LY: y.at(float64(tot)) - 4, Anchor: "end"})
	for _, it := range run.Iterations {
		c.Dots = append(c.Dots, Mark{X: sx(x, it.At), Y: y.at(float64(it.Remaining)), W: 3.5, Class: "sync", Key: "sync", Value: strconv.Itoa(it.N),
			Title: fmt.Sprintf("dirty sync %d at %s: %s dirty", it.N, fmtDur(it.At), fmtBytes(it.Remaining))})
	}
	c.Rules = append(c.Rules, decisionRules(run, x, c.Plot.Y, c.Plot.Bottom(), 0)...)
	c.Legend = []Legend{{"remaining", "remaining"}, {"sync", "QEMU's dirty sync (an iteration starts)"}}
	return c
}

// ramSent is when the source's RAM was all on its way: the end of the last pass — the
// complete phase, or postcopy's — once a later phase (devices, done) followed it.
func ramSent(run *Run) (time.Duration, bool) {
	for i := len(run.Phases) - 2; i >= 0; i-- {
		if p := run.Phases[i].Phase; p == "complete" || p == "postcopy" {
			return run.Phases[i+1].Start, true
		}
	}
	return 0, false
}

// stoppedBytes is what was sent between the guest's stop and the device state: the last RAM pass.
func stoppedBytes(run *Run) (int64, bool) {
	c, ok1 := run.phaseStart("complete")
	d, ok2 := run.phaseStart("devices")
	if !ok1 || !ok2 || d.Transferred < c.Transferred {
		return 0, false
	}
	return d.Transferred - c.Transferred, true
}

func iterationCharts(run *Run) (*Chart, *Chart) {
	its := run.Iterations
	if len(its) == 0 {
		return nil, nil
	}
	stop, hasStop := stoppedBytes(run)
	ncat := len(its)
	if hasStop {
		ncat++
	}
	mk := func(key, title string) *Chart {
		c := &Chart{Key: key, Title: title, W: halfW, H: 240}
		c.Plot = Rect{marginL - 8, marginT + 8, halfW - marginL + 8 - 12, c.H - marginT - 8 - marginB}
		return c
	}
	catX := func(c *Chart, i int) (float64, float64) { // left edge and width of category i
		w := c.Plot.W / float64(ncat)
		return c.Plot.X + float64(i)*w, w
	}
	xticks := func(c *Chart) {
		every := int(math.Ceil(float64(ncat) / (c.Plot.W / 28)))
		for i, it := range its {
			if i%every == 0 || i == len(its)-1 {
				x, w := catX(c, i)
				c.XTicks = append(c.XTicks, Tick{Pos: x + w/2, Label: strconv.Itoa(it.N)})
			}
		}
		if hasStop {
			x, w := catX(c, len(its))
			c.XTicks = append(c.XTicks, Tick{Pos: x + w/2, Label: "stop"})
		}
		c.XLabel = "iteration (QEMU's dirty-sync-count)"
	}

	// RAM to send per pass.
	a := mk("iter-remaining", "RAM to send per iteration")
	top := float64(stop)
	for _, it := range its {
		top = math.Max(top, float64(it.Remaining))
	}
	if top <= 0 {
		top = 1
	}
	unit, uname := byteUnit(top)
	ymax, step := niceMax(top/unit, 4)
	y := linear{0, ymax * unit, a.Plot.Bottom(), a.Plot.Y}
	for _, v := range multiples(ymax, step) {
		a.YTicks = append(a.YTicks, Tick{Pos: y.at(v * unit), Label: trimFloat(v, 2)})
	}
	a.YLabel = uname
	xticks(a)
	for i, it := range its {
		x, w := catX(a, i)
		bw := math.Max(math.Min(w*0.7, 40), 1)
		y0 := y.at(float64(it.Remaining))
		a.Bars = append(a.Bars, Mark{X: x + (w-bw)/2, Y: y0, W: bw, H: a.Plot.Bottom() - y0, Class: "bar-remaining",
			Key: "iteration:" + strconv.Itoa(it.N), Value: strconv.FormatInt(it.Remaining, 10),
			Title: fmt.Sprintf("iteration %d (from %s): %s dirty at the sync", it.N, fmtDur(it.At), fmtBytes(it.Remaining))})
	}
	if hasStop {
		x, w := catX(a, len(its))
		bw := math.Max(math.Min(w*0.7, 40), 1)
		y0 := y.at(float64(stop))
		a.Bars = append(a.Bars, Mark{X: x + (w-bw)/2, Y: y0, W: bw, H: a.Plot.Bottom() - y0, Class: "bar-stop",
			Key: "stopped", Value: strconv.FormatInt(stop, 10),
			Title: fmt.Sprintf("sent with the guest stopped (the last RAM pass): %s", fmtBytes(stop))})
	}
	a.Legend = []Legend{{"bar-remaining", "dirty at the pass's sync"}}
	if hasStop {
		a.Legend = append(a.Legend, Legend{"bar-stop", "sent with the guest stopped"})
	}

	// Expected downtime per pass against the budget, on a log scale.
	b := mk("iter-downtime", "Expected downtime per iteration")
	xticks(b)
	lo, hi := math.Inf(1), 0.0
	vals := func(ms int64) float64 { return math.Max(float64(ms), 1) }
	known := func(it Iteration) bool { return it.ExpectedMs > 0 || it.Rate > 0 }
	for _, it := range its {
		if known(it) {
			lo, hi = math.Min(lo, vals(it.ExpectedMs)), math.Max(hi, vals(it.ExpectedMs))
		}
	}
	actual := int64(-1)
	if run.Summary != nil && hasStop {
		actual = run.Summary.DowntimeMs
		lo, hi = math.Min(lo, vals(actual)), math.Max(hi, vals(actual))
	}
	if math.IsInf(lo, 1) {
		lo, hi = 1, 1000
	}
	if run.BudgetMs > 0 {
		lo, hi = math.Min(lo, vals(run.BudgetMs)), math.Max(hi, vals(run.BudgetMs))
	}
	var rel *Decision
	for i := range run.Decisions {
		d := &run.Decisions[i]
		lo, hi = math.Min(lo, vals(d.ExpectedMs)), math.Max(hi, vals(d.ExpectedMs))
		rel = d
	}
	d0 := math.Pow(10, math.Floor(math.Log10(lo)))
	d1 := math.Pow(10, math.Ceil(math.Log10(hi)))
	if d1 <= d0 {
		d1 = d0 * 10
	}
	ly := logScale{d0, d1, b.Plot.Bottom(), b.Plot.Y}
	for v := d0; v <= d1*1.0001; v *= 10 {
		b.YTicks = append(b.YTicks, Tick{Pos: ly.at(v), Label: fmtMs(int64(v))})
	}
	b.YLabel = "log scale"
	var pts []pt
	unknown := false
	for i, it := range its {
		x, w := catX(b, i)
		if !known(it) {
			// No rate measured yet at this sync: the estimate does not exist.
			b.Labels = append(b.Labels, Label{X: x + w/2, Y: b.Plot.Bottom() - 6, Text: "?", Class: "muted", Anchor: "middle"})
			unknown = true
			continue
		}
		X, Y := x+w/2, ly.at(vals(it.ExpectedMs))
		pts = append(pts, pt{X, Y})
		cls := "dot-over"
		if run.BudgetMs > 0 && it.ExpectedMs <= run.BudgetMs {
			cls = "dot-within"
		}
		b.Dots = append(b.Dots, Mark{X: X, Y: Y, W: 4, Class: cls, Key: "iteration:" + strconv.Itoa(it.N), Value: strconv.FormatInt(it.ExpectedMs, 10),
			Title: fmt.Sprintf("iteration %d: a switchover at its sync would have cost %s", it.N, fmtMs(it.ExpectedMs))})
	}
	if actual >= 0 {
		x, w := catX(b, len(its))
		X, Y := x+w/2, ly.at(vals(actual))
		b.Dots = append(b.Dots, Mark{X: X, Y: Y, W: 5, Class: "dot-actual", Key: "downtime", Value: strconv.FormatInt(actual, 10),
			Title: fmt.Sprintf("the downtime the switchover took: %s", fmtMs(actual))})
	}
	ps, n := points(pts, b.Plot.W)
	b.Lines = append(b.Lines, Line{Class: "expected", Points: ps, N: n, Key: "expected"})
	if run.BudgetMs > 0 {
		Y := ly.at(vals(run.BudgetMs))
		b.Rules = append(b.Rules, Rule{X1: b.Plot.X, Y1: Y, X2: b.Plot.Right(), Y2: Y, Class: "budget", Key: "budget", Value: strconv.FormatInt(run.BudgetMs, 10),
			Label: "--downtime " + fmtMs(run.BudgetMs), LX: b.Plot.X + 4, LY: Y - 4, Anchor: "start", Title: "the downtime budget (--downtime)"})
	}
	if rel != nil {
		// The decision's own estimate, on the pass it was taken in.
		i := len(its) - 1
		for j, it := range its {
			if it.At <= rel.At {
				i = j
			}
		}
		x, w := catX(b, i)
		X, Y := x+w/2, ly.at(vals(rel.ExpectedMs))
		b.Dots = append(b.Dots, Mark{X: X, Y: Y, W: 6, Class: "dot-decision " + decisionClass(rel.Decision), Key: "decision:" + rel.Decision,
			Value: strconv.FormatInt(rel.ExpectedMs, 10), Title: fmt.Sprintf("%s: %s", rel.Decision, rel.Message)})
		b.Labels = append(b.Labels, Label{X: X + 8, Y: Y + 14, Text: rel.Decision, Class: "small " + decisionClass(rel.Decision), Anchor: "start"})
	}
	b.Legend = []Legend{{"dot-within", "within the budget"}, {"dot-over", "over the budget"}, {"budget", "--downtime"}}
	if actual >= 0 {
		b.Legend = append(b.Legend, Legend{"dot-actual", "the downtime it took"})
	}
	if unknown {
		b.Legend = append(b.Legend, Legend{"unknown", "? no rate measured yet"})
	}
	return a, b
}

func downtimeChart(run *Run) *Chart {
	s := run.Summary
	if s == nil || (s.DowntimeMs == 0 && s.TailMs == 0) {
		return nil
	}
	c := &Chart{Key: "downtime", Title: "Where the downtime went", W: pageW, H: 124}
	c.Plot = Rect{marginL + 110, 16, pageW - marginL - 110 - marginR, 44}
	tail := min(s.TailMs, s.DowntimeMs)
	ram := s.DowntimeMs - tail
	top := float64(max(s.DowntimeMs, run.BudgetMs, s.QEMUDowntimeMs, 1)) * 1.08
	xmax, step := niceMax(top, 8)
	x := linear{0, xmax, c.Plot.X, c.Plot.Right()}
	for _, v := range multiples(xmax, step) {
		c.XTicks = append(c.XTicks, Tick{Pos: x.at(v), Label: fmtMs(int64(math.Round(v)))})
	}
	c.XLabel = "milliseconds with the guest stopped"
	stopped, hasStop := stoppedBytes(run)
	ramTitle := fmt.Sprintf("the last RAM pass: %s", fmtMs(ram))
	if hasStop {
		ramTitle += ", " + fmtBytes(stopped)
	}
	y0, h := c.Plot.Y+6, 26.0
	c.Bars = append(c.Bars,
		Mark{X: x.at(0), Y: y0, W: math.Max(x.at(float64(ram))-x.at(0), 0.5), H: h, Class: "seg-ram", Key: "downtime:ram", Value: strconv.FormatInt(ram, 10), Title: ramTitle},
		Mark{X: x.at(float64(ram)), Y: y0, W: math.Max(x.at(float64(s.DowntimeMs))-x.at(float64(ram)), 0.5), H: h, Class: "seg-tail", Key: "downtime:tail", Value: strconv.FormatInt(tail, 10),
			Title: fmt.Sprintf("device state (FULL sections, EOF, vmdesc): %s, %s", fmtMs(tail), fmtBytes(s.TailBytes))})
	c.Labels = append(c.Labels, Label{X: c.Plot.X - 8, Y: y0 + 17, Text: "downtime " + fmtMs(s.DowntimeMs), Anchor: "end", Class: "rowname"})
	if w := x.at(float64(ram)) - x.at(0); w > 120 {
		t := "last RAM pass " + fmtMs(ram)
		if hasStop {
			t += " · " + fmtBytes(stopped)
		}
		c.Labels = append(c.Labels, Label{X: x.at(0) + 6, Y: y0 + 17, Text: t, Class: "inbar"})
	}
	tailLabel := fmt.Sprintf("device state %s · %s", fmtMs(tail), fmtBytes(s.TailBytes))
	switch end, ramEnd := x.at(float64(s.DowntimeMs)), x.at(float64(ram)); {
	case end < c.Plot.Right()-190:
		c.Labels = append(c.Labels, Label{X: end + 6, Y: y0 + 17, Text: tailLabel, Class: "small"})
	case ramEnd-x.at(0) > 440: // no room right of the bar: inside its RAM part, at the end
		c.Labels = append(c.Labels, Label{X: ramEnd - 6, Y: y0 + 17, Text: tailLabel + " →", Class: "inbar", Anchor: "end"})
	default:
		c.Labels = append(c.Labels, Label{X: end, Y: y0 - 4, Text: tailLabel, Class: "small", Anchor: "end"})
	}
	if run.BudgetMs > 0 {
		X := x.at(float64(run.BudgetMs))
		c.Rules = append(c.Rules, Rule{X1: X, Y1: c.Plot.Y - 4, X2: X, Y2: c.Plot.Bottom(), Class: "budget", Key: "budget", Value: strconv.FormatInt(run.BudgetMs, 10),
			Label: "--downtime " + fmtMs(run.BudgetMs), LX: X + 3, LY: c.Plot.Y + 2, Anchor: "start", Title: "the downtime budget"})
		if X > c.Plot.Right()-110 {
			c.Rules[len(c.Rules)-1].LX, c.Rules[len(c.Rules)-1].Anchor = X-3, "end"
		}
	}
	if s.QEMUDowntimeMs > 0 {
		X := x.at(float64(s.QEMUDowntimeMs))
		c.Rules = append(c.Rules, Rule{X1: X, Y1: y0 - 3, X2: X, Y2: y0 + h + 3, Class: "qemu", Key: "qemu_downtime", Value: strconv.FormatInt(s.QEMUDowntimeMs, 10),
			Label: "QEMU", LX: X, LY: y0 + h + 14, Anchor: "middle", Title: fmt.Sprintf("the source QEMU's own downtime figure: %s", fmtMs(s.QEMUDowntimeMs))})
	}
	c.Legend = []Legend{{"seg-ram", "last RAM pass (guest stopped)"}, {"seg-tail", "device state tail"}}
	if run.BudgetMs > 0 {
		c.Legend = append(c.Legend, Legend{"budget", "--downtime"})
	}
	if s.QEMUDowntimeMs > 0 {
		c.Legend = append(c.Legend, Legend{"qemu", "QEMU's figure"})
	}
	return c
}

// maxSectionRows caps the bars of the sections figure; the rest is one row.
const maxSectionRows = 80

func sectionsChart(run *Run) *Chart {
	s := run.Summary
	if s == nil || len(s.Sections) == 0 {
		return nil
	}
	type kv struct {
		k string
		v int64
	}
	var secs []kv
	for k, v := range s.Sections {
		secs = append(secs, kv{k, v})
	}
	sort.Slice(secs, func(i, j int) bool {
		if secs[i].v != secs[j].v {
			return secs[i].v > secs[j].v
		}
		return secs[i].k < secs[j].k
	})
	var rest kv
	if len(secs) > maxSectionRows {
		for _, e := range secs[maxSectionRows-1:] {
			rest.v += e.v
		}
		rest.k = fmt.Sprintf("%d more sections", len(secs)-maxSectionRows+1)
		secs = secs[:maxSectionRows-1]
	}
	rows := len(secs)
	if rest.k != "" {
		rows++
	}
	const rowH = 17.0
	c := &Chart{Key: "sections", Title: "Bytes per section", Note: "headers, bodies and footers of each section idstr (summary.sections), on a log scale",
		W: pageW, H: marginT + rowH*float64(rows) + marginB + 4}
	c.Plot = Rect{250, marginT, pageW - 250 - 110, rowH * float64(rows)}
	lo, hi := int64(math.MaxInt64), int64(1)
	for _, e := range secs {
		lo, hi = min(lo, max(e.v, 1)), max(hi, e.v)
	}
	hi = max(hi, rest.v)
	// Ticks at powers of 32: 1 B, 32 B, 1 KiB, 32 KiB, 1 MiB, …
	p0 := math.Floor(math.Log2(float64(lo))/5) * 5
	p1 := math.Ceil(math.Log2(float64(hi))/5) * 5
	if p1 <= p0 {
		p1 = p0 + 5
	}
	x := logScale{math.Exp2(p0), math.Exp2(p1), c.Plot.X, c.Plot.Right()}
	for p := p0; p <= p1; p += 5 {
		c.XTicks = append(c.XTicks, Tick{Pos: x.at(math.Exp2(p)), Label: fmtBytes(int64(math.Exp2(p)))})
	}
	c.XLabel = "bytes (log scale)"
	draw := func(i int, name string, v int64, cls, key string) {
		Y := c.Plot.Y + float64(i)*rowH + 2
		w := math.Max(x.at(float64(max(v, 1)))-c.Plot.X, 1)
		c.Bars = append(c.Bars, Mark{X: c.Plot.X, Y: Y, W: w, H: rowH - 4, Class: cls, Key: key, Value: strconv.FormatInt(v, 10),
			Title: fmt.Sprintf("%s: %s (%s bytes)", name, fmtBytes(v), fmtInt(v))})
		c.Labels = append(c.Labels, Label{X: c.Plot.X - 6, Y: Y + rowH - 7, Text: clip(name, 40), Anchor: "end", Class: "small"},
			Label{X: c.Plot.X + w + 5, Y: Y + rowH - 7, Text: fmtBytes(v), Class: "small"})
	}
	for i, e := range secs {
		cls := "bar-device"
		if e.k == "ram" || e.k == "block" || e.k == "dirty-bitmap" {
			cls = "bar-live"
		}
		draw(i, e.k, e.v, cls, "section:"+e.k)
	}
	if rest.k != "" {
		draw(len(secs), rest.k, rest.v, "bar-device", "sections:rest")
	}
	c.Legend = []Legend{{"bar-live", "live section (iterated while the guest runs)"}, {"bar-device", "device state"}}
	return c
}

// switchoverBy says in words what a summary's switchover value means.
var switchoverBy = map[string]string{
	"policy": "the sidecar's policy (see its policy event)",
	"qemu":   "the source QEMU's own rule, within its downtime-limit",
}
