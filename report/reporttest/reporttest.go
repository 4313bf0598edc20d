// Package reporttest reads a report page back for the tests of report and compat: it parses
// the HTML (golang.org/x/net/html) and checks every figure the page carries in its data-key /
// data-value attributes against the events of the run that made it.
package reporttest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/net/html"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// Figure is one element with a data-key.
type Figure struct {
	Chart string // data-chart of the figure it is in ("" for the banner and the summary table)
	Tag   string
	Key   string
	Value string
	Text  string // the element's text (without its <title>)
	Title string // the tooltip
	// X, Y, W, H are a rect's geometry (a circle's centre in X, Y), in SVG units.
	X, Y, W, H float64
}

// Page is what a report page holds.
type Page struct {
	Figures []Figure
	Charts  []string // data-chart of each figure, in order
	// Tags counts the elements by name; Refs lists every src/href/xlink:href attribute, and
	// Styles the text of the <style> elements (the test checks they fetch nothing).
	Tags   map[string]int
	Refs   []string
	Styles []string
}

// Parse reads a page.
func Parse(r io.Reader) (*Page, error) {
	doc, err := html.Parse(r)
	if err != nil {
		return nil, err
	}
	p := &Page{Tags: map[string]int{}}
	var walk func(n *html.Node, chart string)
	walk = func(n *html.Node, chart string) {
		if n.Type == html.ElementNode {
			p.Tags[n.Data]++
			if c := attr(n, "data-chart"); c != "" {
				chart = c
				p.Charts = append(p.Charts, c)
			}
			for _, a := range n.Attr {
				if a.Key == "src" || a.Key == "href" || strings.HasSuffix(a.Key, ":href") || a.Key == "srcset" || a.Key == "action" {
					p.Refs = append(p.Refs, a.Val)
				}
			}
			if n.Data == "style" {
				p.Styles = append(p.Styles, text(n))
			}
			if k := attr(n, "data-key"); k != "" {
				f := Figure{Chart: chart, Tag: n.Data, Key: k, Value: attr(n, "data-value"), Text: strings.TrimSpace(text(n)),
					X: num(n, "x", "cx"), Y: num(n, "y", "cy"), W: num(n, "width", ""), H: num(n, "height", "")}
				for c := n.FirstChild; c != nil; c = c.NextSibling {
					if c.Type == html.ElementNode && c.Data == "title" {
						f.Title = text(c)
					}
				}
				p.Figures = append(p.Figures, f)
			}
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			walk(c, chart)
		}
	}
	walk(doc, "")
	return p, nil
}

func num(n *html.Node, key, alt string) float64 {
	v := attr(n, key)
	if v == "" && alt != "" {
		v = attr(n, alt)
	}
	f, _ := strconv.ParseFloat(v, 64)
	return f
}

func attr(n *html.Node, key string) string {
	for _, a := range n.Attr {
		if a.Key == key {
			return a.Val
		}
	}
	return ""
}

// text is the text of n without the contents of <title> elements.
func text(n *html.Node) string {
	var b strings.Builder
	var walk func(*html.Node)
	walk = func(n *html.Node) {
		if n.Type == html.TextNode {
			b.WriteString(n.Data)
		}
		for c := n.FirstChild; c != nil; c = c.NextSibling {
			if c.Type == html.ElementNode && c.Data == "title" && n.Type == html.ElementNode && n.Data != "head" {
				continue
			}
			walk(c)
		}
	}
	walk(n)
	return b.String()
}

// Find returns the figures with key in chart ("*" for any chart).
func (p *Page) Find(chart, key string) []Figure {
	var out []Figure
	for _, f := range p.Figures {
		if (chart == "*" || f.Chart == chart) && f.Key == key {
			out = append(out, f)
		}
	}
	return out
}

// One returns the single figure with key in chart, or an error.
func (p *Page) One(chart, key string) (Figure, error) {
	fs := p.Find(chart, key)
	if len(fs) != 1 {
		return Figure{}, fmt.Errorf("%d figures %q in chart %q, want 1", len(fs), key, chart)
	}
	return fs[0], nil
}

// Int is One's value as an integer.
func (p *Page) Int(chart, key string) (int64, error) {
	f, err := p.One(chart, key)
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseInt(f.Value, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("figure %q in chart %q: value %q: %v", key, chart, f.Value, err)
	}
	return v, nil
}

// Events reads a JSON-lines log the way the test's own oracle does: every line that decodes as
// an event (lines that are not JSON are left out).
func Events(r io.Reader) ([]savevm.Event, error) {
	var out []savevm.Event
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var e savevm.Event
		if err := json.Unmarshal([]byte(line), &e); err != nil || e.Type == "" {
			continue
		}
		out = append(out, e)
	}
	return out, sc.Err()
}

// Check compares the page's figures with the events of the (single) run that made it and
// returns every mismatch. It checks the outcome banner, the summary table against the summary
// event (every figure of it), the exit code, the bytes per section, the downtime split, one bar
// and one dot per iteration event with the event's remaining and expected downtime, the
// policy's decisions, the phases, and that every time chart drew its series.
func Check(p *Page, evs []savevm.Event) []error {
	var errs []error
	fail := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	var (
		sum       *savevm.Summary
		exit      *savevm.Event
		iters     []savevm.Event
		decisions []savevm.Event
		phases    []string
		budget    int64
	)
	for i := range evs {
		e := &evs[i]
		switch e.Type {
		case "summary":
			sum = e.Summary
		case "exit":
			exit = e
		case "iteration":
			iters = append(iters, *e)
		case "policy":
			decisions = append(decisions, *e)
		case "phase":
			if len(phases) == 0 || phases[len(phases)-1] != string(e.Phase) {
				phases = append(phases, string(e.Phase))
			}
		}
		if budget == 0 && e.DowntimeBudgetMs > 0 {
			budget = e.DowntimeBudgetMs
		}
	}
	want := "incomplete"
	switch {
	case exit != nil && exit.ExitCode != nil && *exit.ExitCode != 0:
		want = "failed"
	case sum != nil || exit != nil:
		want = "migrated"
	}
	if f, err := p.One("", "status"); err != nil {
		fail("banner: %v", err)
	} else if f.Value != want {
		fail("banner says %q, the log %q", f.Value, want)
	}
	eq := func(what string, got int64, err error, want int64) {
		if err != nil {
			fail("%s: %v", what, err)
		} else if got != want {
			fail("%s: page %d, log %d", what, got, want)
		}
	}
	if exit != nil && exit.ExitCode != nil {
		v, err := p.Int("", "exit_code")
		eq("exit code", v, err, int64(*exit.ExitCode))
		if *exit.ExitCode != 0 {
			if f, err := p.One("", "why"); err != nil {
				fail("failure reason: %v", err)
			} else if f.Text != exit.Message {
				fail("failure reason on the page %q, exit message %q", f.Text, exit.Message)
			}
			if f, err := p.One("", "where"); err != nil || len(phases) == 0 || !strings.Contains(f.Text, "last phase "+phases[len(phases)-1]) {
				fail("where it stopped: %q (%v), want the last phase %v", f.Text, err, phases)
			}
		}
	}
	if budget > 0 {
		v, err := p.Int("", "downtime_budget_ms")
		eq("downtime budget", v, err, budget)
	}
	if sum != nil {
		table := map[string]int64{
			"total_time_ms": sum.TotalTimeMs, "downtime_ms": sum.DowntimeMs, "qemu_downtime_ms": sum.QEMUDowntimeMs,
			"tail_ms": sum.TailMs, "tail_bytes": sum.TailBytes, "bytes_in": sum.BytesIn, "bytes_out": sum.BytesOut,
			"normal_pages": sum.NormalPages, "zero_pages": sum.ZeroPages, "xbzrle_pages": sum.XBZRLEPages,
			"compressed_pages": sum.CompressedPages, "iterations": int64(sum.Iterations), "sections": int64(len(sum.Sections)),
		}
		keys := make([]string, 0, len(table))
		for k := range table {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			v, err := p.Int("", k)
			eq("summary "+k, v, err, table[k])
		}
		// Bytes per section: one bar per idstr with its bytes, nothing else.
		bars := map[string]int64{}
		for _, f := range p.Figures {
			if f.Chart == "sections" && strings.HasPrefix(f.Key, "section:") {
				v, _ := strconv.ParseInt(f.Value, 10, 64)
				bars[strings.TrimPrefix(f.Key, "section:")] = v
			}
		}
		if len(bars) != len(sum.Sections) && len(p.Find("sections", "sections:rest")) == 0 {
			fail("sections: %d bars, the summary has %d", len(bars), len(sum.Sections))
		}
		for k, v := range bars {
			if sv, ok := sum.Sections[k]; !ok || sv != v {
				fail("section %q: bar %d bytes, summary %d (present %v)", k, v, sv, ok)
			}
		}
		// The downtime split adds up to the downtime, its tail is the summary's.
		if sum.DowntimeMs > 0 || sum.TailMs > 0 {
			ram, err1 := p.Int("downtime", "downtime:ram")
			tail, err2 := p.Int("downtime", "downtime:tail")
			if err1 != nil || err2 != nil {
				fail("downtime split: %v %v", err1, err2)
			} else {
				eq("downtime split: last RAM pass + device tail", ram+tail, nil, sum.DowntimeMs)
				eq("downtime split: device tail", tail, nil, min(sum.TailMs, sum.DowntimeMs))
			}
		}
	} else if len(p.Find("*", "downtime:ram")) > 0 || len(p.Charts) > 0 && contains(p.Charts, "sections") {
		fail("the page draws a downtime split or sections without a summary event")
	}
	// One bar per iteration event with its remaining bytes; one dot with its expected downtime
	// (unless no rate was measured yet).
	for _, it := range iters {
		k := "iteration:" + strconv.Itoa(it.Iteration)
		v, err := p.Int("iter-remaining", k)
		eq(k+" remaining", v, err, it.Remaining)
		dots := p.Find("iter-downtime", k)
		if it.ExpectedDowntimeMs == 0 && it.Rate == 0 {
			if len(dots) != 0 {
				fail("%s: a dot for an estimate that does not exist (no rate yet)", k)
			}
			continue
		}
		v, err = p.Int("iter-downtime", k)
		eq(k+" expected downtime", v, err, it.ExpectedDowntimeMs)
	}
	var nbars int
	for _, f := range p.Figures {
		if f.Chart == "iter-remaining" && strings.HasPrefix(f.Key, "iteration:") {
			nbars++
		}
	}
	if nbars != len(iters) {
		fail("per-iteration chart: %d bars, %d iteration events", nbars, len(iters))
	}
	// The drawing is the numbers: bar heights (and the downtime segments' widths) are
	// proportional to their values, and section bars grow with their bytes.
	proportional := func(what string, fs []Figure, size func(Figure) float64) {
		var k float64
		for _, f := range fs {
			v, _ := strconv.ParseFloat(f.Value, 64)
			if v <= 0 || size(f) < 1 {
				continue
			}
			if k == 0 {
				k = size(f) / v
			} else if got := size(f); math.Abs(got-k*v) > 0.15+0.002*got {
				fail("%s %s: drawn %.1f units for %v, the scale of the others says %.1f", what, f.Key, got, v, k*v)
			}
		}
	}
	var ibars, segs, sbars []Figure
	for _, f := range p.Figures {
		switch {
		case f.Chart == "iter-remaining" && f.Tag == "rect":
			ibars = append(ibars, f)
		case f.Chart == "downtime" && strings.HasPrefix(f.Key, "downtime:"):
			segs = append(segs, f)
		case f.Chart == "sections" && strings.HasPrefix(f.Key, "section"):
			sbars = append(sbars, f)
		}
	}
	proportional("iteration bar", ibars, func(f Figure) float64 { return f.H })
	proportional("downtime segment", segs, func(f Figure) float64 { return f.W })
	sort.SliceStable(sbars, func(i, j int) bool { return value(sbars[i]) < value(sbars[j]) })
	for i := 1; i < len(sbars); i++ {
		if value(sbars[i]) > value(sbars[i-1]) && sbars[i].W < sbars[i-1].W {
			fail("section bars: %s (%s bytes) is drawn shorter than %s (%s bytes)", sbars[i].Key, sbars[i].Value, sbars[i-1].Key, sbars[i-1].Value)
		}
	}
	// Decisions: in the timeline and in the summary table, in order.
	var drawn []string
	for _, f := range p.Figures {
		if f.Chart == "timeline" && strings.HasPrefix(f.Key, "decision:") {
			drawn = append(drawn, strings.TrimPrefix(f.Key, "decision:"))
		}
	}
	var logged []string
	for _, d := range decisions {
		logged = append(logged, d.Decision)
	}
	if strings.Join(drawn, ",") != strings.Join(logged, ",") {
		fail("decisions on the timeline %v, in the log %v", drawn, logged)
	}
	// Phases: one band per phase, in order.
	var bands []string
	for _, f := range p.Figures {
		if f.Chart == "timeline" && strings.HasPrefix(f.Key, "phase:") {
			bands = append(bands, strings.TrimPrefix(f.Key, "phase:"))
		}
	}
	if strings.Join(bands, ",") != strings.Join(phases, ",") {
		fail("phases on the timeline %v, in the log %v", bands, phases)
	}
	// The time series were drawn.
	var sent int64
	for _, e := range evs {
		if e.Type == "progress" || e.Type == "phase" || e.Type == "iteration" {
			sent = max(sent, e.Transferred)
		}
	}
	if sent > 0 {
		if f, err := p.One("rates", "sent"); err != nil {
			fail("rates: %v", err)
		} else if n, _ := strconv.Atoi(f.Value); n < 2 {
			fail("rates: the sent line has %d points", n)
		}
	}
	return errs
}

func value(f Figure) float64 {
	v, _ := strconv.ParseFloat(f.Value, 64)
	return v
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}
