// Package report draws a migration's JSON-lines events as one offline HTML page, so an operator sees where its time went and why it stopped.
package report

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// Options bound what Read accepts. Zero fields take the defaults.
type Options struct {
	// MaxLineBytes caps one line of the log (default 1 MiB: a summary with a few thousand
	// sections is far below it).
	MaxLineBytes int
	// MaxEvents caps the events of the run kept (default 2,000,000: 14 hours of progress
	// events at their fastest rate).
	MaxEvents int
	// MaxMarks caps the phases, iterations, decisions and warnings kept, each (default 1000):
	// what one figure can show.
	MaxMarks int
}

// Defaults for Options.
const (
	DefaultMaxLineBytes = 1 << 20
	DefaultMaxEvents    = 2_000_000
	DefaultMaxMarks     = 1000
	// maxKeptNotes caps the skipped and non-JSON lines remembered for the page.
	maxKeptNotes = 20
)

// Run is what one migration's log says, in the terms the page draws. Times are offsets from
// the run's first event.
type Run struct {
	// Side is the events' side: "source" (migrate), "receiver" (receive), "" before schema 2.
	Side string
	// Schema is the highest schema version among the events (0: the format before the field).
	Schema int
	Start  time.Time
	// End is the time of the last event.
	End time.Duration
	// BudgetMs is --downtime (first "phase" event or "policy" events); 0 if the log has none.
	BudgetMs int64

	Phases     []PhaseSpan
	Iterations []Iteration
	Samples    []Sample
	Decisions  []Decision
	Warnings   []Note
	Summary    *savevm.Summary
	Exit       *Exit

	// Events is the number of events of this run; Ignored counts, by type, those the page
	// does not draw (types this version does not know, "detached"), and Dropped those beyond
	// the MaxMarks kept of one kind (the oldest iterations, the latest phases, decisions and
	// warnings).
	Events  int
	Ignored map[string]int
	Dropped map[string]int
	// Runs is how many runs the log holds (a new run starts at a "setup" phase event after a
	// finished one); the page shows the last.
	Runs int
	// Skipped are lines that are not events (text from --detach's stderr, a line cut short by a
	// killed process), the first few of them; SkippedLines counts them all.
	Skipped      []Note
	SkippedLines int
}

// PhaseSpan is one phase of the migration, from its "phase" event to the next one (or the end).
type PhaseSpan struct {
	Phase       string
	Start, End  time.Duration
	Transferred int64 // bytes sent when the phase began
	NormalPages int64 // page records passed on when it began (schema 2)
	ZeroPages   int64
}

// Iteration is one pass over RAM as its "iteration" event saw it, at QEMU's dirty sync.
type Iteration struct {
	N          int
	At         time.Duration
	Remaining  int64 // the dirty set this pass has to send
	Total      int64
	ExpectedMs int64 // what a switchover at the sync would have cost
	// Rate is the forwarding rate at the sync; 0 means none was measured yet, and then
	// ExpectedMs (0) is unknown rather than zero.
	Rate        float64
	Transferred int64
	NormalPages int64
	ZeroPages   int64
}

// Sample is one point of the time series: a "progress", "iteration" or "phase" event.
type Sample struct {
	At          time.Duration
	Kind        string // the event type
	Transferred int64
	Remaining   int64
	Total       int64
	Rate        float64
	DirtyRate   float64
	ExpectedMs  int64
	Throttle    int64
	Iteration   int
}

// Decision is a "policy" event: release, force, pause or abort.
type Decision struct {
	At         time.Duration
	Decision   string
	Phase      string
	Message    string
	ExpectedMs int64
	BudgetMs   int64
}

// Note is a warning event or a skipped line.
type Note struct {
	At      time.Duration // warnings
	Line    int           // skipped lines: 1-based line number
	Offset  int64         // skipped lines: byte offset of the line
	Phase   string
	Message string
}

// Exit is the final "exit" event of a --json run.
type Exit struct {
	At      time.Duration
	Code    int
	Message string
}

// Status says how the run ended: "migrated", "failed", or "incomplete" (the log stops without a
// summary or an exit event: still running, or the process was killed).
func (r *Run) Status() string {
	switch {
	case r.Exit != nil && r.Exit.Code != 0:
		return "failed"
	case r.Summary != nil:
		return "migrated"
	case r.Exit != nil:
		return "migrated" // exit 0 without a summary (e.g. a receiver's side)
	}
	return "incomplete"
}

// LastPhase is the phase the run was in at its end ("" if the log has no phase event).
func (r *Run) LastPhase() string {
	if len(r.Phases) == 0 {
		return ""
	}
	return r.Phases[len(r.Phases)-1].Phase
}

// Duration is how long the run took: the summary's total time when there is one, else the time
// of the last event.
func (r *Run) Duration() time.Duration {
	if r.Summary != nil && time.Duration(r.Summary.TotalTimeMs)*time.Millisecond > r.End {
		return time.Duration(r.Summary.TotalTimeMs) * time.Millisecond
	}
	return r.End
}

// phaseStart returns the start of the first span of phase p, and whether there is one.
func (r *Run) phaseStart(p string) (PhaseSpan, bool) {
	for _, s := range r.Phases {
		if s.Phase == p {
			return s, true
		}
	}
	return PhaseSpan{}, false
}

// event is one line as Read decodes it: savevm.Event, whose unknown fields encoding/json skips.
type event = savevm.Event

// Read parses a JSON-lines event log (the output of --json, or a --detach log) into the Run of
// its last migration. Unknown event types and fields are ignored; lines that are not events are
// counted and the first few kept. It fails on a line longer than MaxLineBytes, more than
// MaxEvents events, or a log without any event, naming the line and its byte offset.
func Read(rd io.Reader, opt Options) (*Run, error) {
	if opt.MaxLineBytes <= 0 {
		opt.MaxLineBytes = DefaultMaxLineBytes
	}
	if opt.MaxEvents <= 0 {
		opt.MaxEvents = DefaultMaxEvents
	}
	if opt.MaxMarks <= 0 {
		opt.MaxMarks = DefaultMaxMarks
	}
	br := bufio.NewReaderSize(rd, 64<<10)
	b := newBuilder()
	b.maxMarks = opt.MaxMarks
	var (
		off      int64
		line     int
		buf      []byte
		skipped  []Note
		nskipped int
		total    int
	)
	skip := func(n Note) {
		nskipped++
		if len(skipped) < maxKeptNotes {
			skipped = append(skipped, n)
		}
	}
	for {
		start := off
		buf = buf[:0]
		var err error
		for {
			var chunk []byte
			chunk, err = br.ReadSlice('\n')
			off += int64(len(chunk))
			if len(buf)+len(chunk) > opt.MaxLineBytes+1 {
				return nil, fmt.Errorf("report: line %d at byte offset %d is longer than %d bytes: not an event log", line+1, start, opt.MaxLineBytes)
			}
			buf = append(buf, chunk...)
			if err != bufio.ErrBufferFull {
				break
			}
		}
		if err != nil && err != io.EOF {
			return nil, fmt.Errorf("report: reading line %d at byte offset %d: %w", line+1, start, err)
		}
		if len(buf) > 0 {
			line++
			text := bytes.TrimSpace(buf)
			switch {
			case len(text) == 0:
			case text[0] != '{':
				skip(Note{Line: line, Offset: start, Message: "not JSON: " + clip(string(text), 200)})
			default:
				var e event
				if jerr := json.Unmarshal(text, &e); jerr != nil {
					skip(Note{Line: line, Offset: start, Message: "not an event (" + clip(jerr.Error(), 120) + "): " + clip(string(text), 120)})
				} else if e.Type == "" {
					skip(Note{Line: line, Offset: start, Message: "a JSON object without \"type\": " + clip(string(text), 120)})
				} else {
					total++
					if b.run.Events >= opt.MaxEvents {
						return nil, fmt.Errorf("report: line %d at byte offset %d: more than %d events in one run", line, start, opt.MaxEvents)
					}
					b.add(&e)
				}
			}
		}
		if err == io.EOF {
			break
		}
	}
	if total == 0 {
		return nil, errors.New("report: no events in the log (want the JSON lines of --json or a --detach log)")
	}
	run := b.finish()
	run.Skipped, run.SkippedLines = skipped, nskipped
	return run, nil
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && cut < len(s) && (s[cut]&0xC0) == 0x80 { // do not split a UTF-8 sequence
		cut--
	}
	return s[:cut] + "…"
}

// builder accumulates the events of the current run.
type builder struct {
	run      *Run
	runs     int
	done     bool // the current run has a summary or exit event: a later "setup" starts a new one
	maxMarks int
}

func newBuilder() *builder {
	return &builder{run: newRun()}
}

func newRun() *Run { return &Run{Ignored: map[string]int{}, Dropped: map[string]int{}} }

// full reports whether a list of marks has reached the cap, counting what it drops.
func (b *builder) full(n int, kind string) bool {
	if n < b.maxMarks {
		return false
	}
	b.run.Dropped[kind]++
	return true
}

func (b *builder) at(t time.Time) time.Duration {
	if b.run.Start.IsZero() {
		b.run.Start = t
	}
	d := t.Sub(b.run.Start)
	if d < 0 {
		d = 0 // clocks of goroutines may disagree by a hair; keep the axis monotone
	}
	if d > b.run.End {
		b.run.End = d
	}
	return d
}

func (b *builder) add(e *event) {
	if e.Type == "phase" && e.Phase == savevm.PhaseSetup && (b.done || len(b.run.Phases) > 0) {
		// A second migration in the same log (appended --log, concatenated files).
		b.runs++
		b.run = newRun()
		b.done = false
	}
	r := b.run
	r.Events++
	if e.Schema > r.Schema {
		r.Schema = e.Schema
	}
	if e.Side != "" && r.Side == "" {
		r.Side = e.Side
	}
	if e.Time.IsZero() && e.Type != "exit" && e.Type != "summary" {
		r.Ignored[e.Type+" (without time)"]++
		return
	}
	var at time.Duration
	if !e.Time.IsZero() {
		at = b.at(e.Time)
	} else {
		at = r.End
	}
	if e.DowntimeBudgetMs > 0 && r.BudgetMs == 0 {
		r.BudgetMs = e.DowntimeBudgetMs
	}
	switch e.Type {
	case "phase":
		p := string(e.Phase)
		if n := len(r.Phases); n > 0 {
			if r.Phases[n-1].Phase == p || b.full(n, "phase") {
				break
			}
			r.Phases[n-1].End = at
		}
		r.Phases = append(r.Phases, PhaseSpan{Phase: p, Start: at, End: at, Transferred: e.Transferred,
			NormalPages: e.NormalPages, ZeroPages: e.ZeroPages})
		r.Samples = append(r.Samples, sample(at, e))
	case "iteration":
		if len(r.Iterations) >= 2*b.maxMarks { // keep the latest passes: the ones that decided
			r.Dropped["iteration"] += len(r.Iterations) - b.maxMarks + 1
			r.Iterations = append(r.Iterations[:0], r.Iterations[len(r.Iterations)-b.maxMarks+1:]...)
		}
		r.Iterations = append(r.Iterations, Iteration{N: e.Iteration, At: at, Remaining: e.Remaining, Total: e.Total,
			ExpectedMs: e.ExpectedDowntimeMs, Rate: e.Rate, Transferred: e.Transferred, NormalPages: e.NormalPages, ZeroPages: e.ZeroPages})
		r.Samples = append(r.Samples, sample(at, e))
	case "progress":
		r.Samples = append(r.Samples, sample(at, e))
	case "policy":
		if b.full(len(r.Decisions), "policy") {
			break
		}
		r.Decisions = append(r.Decisions, Decision{At: at, Decision: e.Decision, Phase: string(e.Phase), Message: e.Message,
			ExpectedMs: e.ExpectedDowntimeMs, BudgetMs: e.DowntimeBudgetMs})
	case "warning":
		if b.full(len(r.Warnings), "warning") {
			break
		}
		r.Warnings = append(r.Warnings, Note{At: at, Phase: string(e.Phase), Message: e.Message})
	case "summary":
		if e.Summary != nil {
			s := *e.Summary
			r.Summary = &s
			b.done = true
		}
	case "exit":
		code := 0
		if e.ExitCode != nil {
			code = *e.ExitCode
		}
		r.Exit = &Exit{At: at, Code: code, Message: e.Message}
		b.done = true
	default:
		r.Ignored[e.Type]++
	}
}

func sample(at time.Duration, e *event) Sample {
	return Sample{At: at, Kind: e.Type, Transferred: e.Transferred, Remaining: e.Remaining, Total: e.Total,
		Rate: e.Rate, DirtyRate: e.DirtyRate, ExpectedMs: e.ExpectedDowntimeMs, Throttle: e.ThrottlePercent,
		Iteration: e.Iteration}
}

func (b *builder) finish() *Run {
	r := b.run
	r.Runs = b.runs + 1
	if n := len(r.Iterations); n > b.maxMarks {
		r.Dropped["iteration"] += n - b.maxMarks
		r.Iterations = r.Iterations[n-b.maxMarks:]
	}
	if n := len(r.Phases); n > 0 {
		last := &r.Phases[n-1]
		if end := r.Duration(); end > last.Start {
			last.End = end
		}
	}
	// Events are written by several goroutines: put the series in time order.
	sort.SliceStable(r.Samples, func(i, j int) bool { return r.Samples[i].At < r.Samples[j].At })
	if r.Summary != nil && r.Summary.Sections == nil {
		r.Summary.Sections = map[string]int64{}
	}
	return r
}

// exitMeanings are the CLI's exit codes (README "Exit codes").
var exitMeanings = map[int]string{
	0: "migrated",
	1: "internal error",
	2: "usage",
	3: "the source failed",
	4: "the destination failed",
	5: "the policy gave up",
	6: "interrupted",
	7: "the stream is not valid",
}

// ExitMeaning names an exit code as the README's table does.
func ExitMeaning(code int) string {
	if m, ok := exitMeanings[code]; ok {
		return m
	}
	return "exit code " + fmt.Sprint(code)
}

// phaseWord names a phase in a sentence: "the iterate" (phase).
func phaseWord(p string) string {
	if p == "" {
		return "an unknown"
	}
	return "the " + strings.ReplaceAll(p, "_", " ")
}
