package report

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/qemu-migrate-go/qemu-migrate-go/report/reporttest"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// The logs in testdata: three written by real migrations (compat's relay, a --timeout abort,
// and an auto-converge run the policy paused), and two made for the reader's tolerance.
var realLogs = []string{"relay-10.0.jsonl", "timeout-abort-7.2.jsonl", "autoconverge-pause-10.0.jsonl"}

func readTestdata(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func render(t testing.TB, log []byte) (*Run, []byte) {
	t.Helper()
	run, err := Read(bytes.NewReader(log), Options{})
	if err != nil {
		t.Fatal(err)
	}
	var page bytes.Buffer
	if err := WriteHTML(&page, run, "test.jsonl"); err != nil {
		t.Fatal(err)
	}
	return run, page.Bytes()
}

// TestPageFigures renders every log of testdata and reads the page back: each figure it carries
// must be the one of the events (reporttest.Check), and the outcome must be the log's.
func TestPageFigures(t *testing.T) {
	want := map[string]string{"relay-10.0.jsonl": "migrated", "timeout-abort-7.2.jsonl": "failed",
		"autoconverge-pause-10.0.jsonl": "migrated", "receiver-synthetic.jsonl": "migrated", "future-schema3.jsonl": "failed"}
	for name, status := range want {
		t.Run(name, func(t *testing.T) {
			log := readTestdata(t, name)
			run, page := render(t, log)
			if run.Status() != status {
				t.Errorf("status %q, want %q", run.Status(), status)
			}
			p, err := reporttest.Parse(bytes.NewReader(page))
			if err != nil {
				t.Fatal(err)
			}
			evs, err := reporttest.Events(bytes.NewReader(log))
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range reporttest.Check(p, evs) {
				t.Error(e)
			}
			t.Logf("%d events → %d bytes of HTML, charts %v", len(evs), len(page), p.Charts)
		})
	}
}

// TestSelfContained: the page fetches nothing — no script, stylesheet link, image, frame,
// font, or URL anywhere in it — and every figure is inline SVG.
func TestSelfContained(t *testing.T) {
	for _, name := range realLogs {
		_, page := render(t, readTestdata(t, name))
		p, err := reporttest.Parse(bytes.NewReader(page))
		if err != nil {
			t.Fatal(err)
		}
		for _, tag := range []string{"script", "link", "img", "iframe", "object", "embed", "image", "use", "foreignobject"} {
			if p.Tags[tag] > 0 {
				t.Errorf("%s: %d <%s> elements", name, p.Tags[tag], tag)
			}
		}
		if len(p.Refs) > 0 {
			t.Errorf("%s: references %q", name, p.Refs)
		}
		for _, css := range p.Styles {
			if strings.Contains(css, "url(") || strings.Contains(css, "@import") || strings.Contains(css, "@font-face") {
				t.Errorf("%s: the style sheet loads something", name)
			}
		}
		if m := regexp.MustCompile(`(?i)(https?|ftp|file|data):`).Find(page); m != nil {
			t.Errorf("%s: the page names a URL scheme %q", name, m)
		}
		if p.Tags["svg"] < 4 {
			t.Errorf("%s: %d inline SVG figures", name, p.Tags["svg"])
		}
	}
}

// TestFailedRun: the page of a run the policy aborted says where (the phase, the iteration, the
// dirty RAM left, the expected downtime against the budget) and why (the exit message), and
// draws no downtime split or sections, which only a summary has.
func TestFailedRun(t *testing.T) {
	run, page := render(t, readTestdata(t, "timeout-abort-7.2.jsonl"))
	if run.Status() != "failed" || run.Exit == nil || run.Exit.Code != 5 || run.LastPhase() != "iterate" {
		t.Fatalf("status %q exit %+v phase %q", run.Status(), run.Exit, run.LastPhase())
	}
	p := NewPage(run, "x")
	for _, w := range []string{"last phase iterate", "iteration 1", "still dirty", "expected downtime", "budget 1 ms", "policy: abort"} {
		if !strings.Contains(p.Where, w) {
			t.Errorf("where %q does not say %q", p.Where, w)
		}
	}
	if !strings.Contains(p.Headline, "exit 5 (the policy gave up)") || !strings.Contains(p.Why, "--timeout 3s") {
		t.Errorf("headline %q why %q", p.Headline, p.Why)
	}
	if p.Downtime != nil || p.Sections != nil {
		t.Error("a downtime split or sections figure without a summary")
	}
	if !bytes.Contains(page, []byte(`class="exit-failed"`)) {
		t.Error("no failure mark on the timeline")
	}
}

// TestReceiverLog: a receiver's log has no iterations and no policy; the page draws what it has
// (phases, rate, downtime, sections, the link's figures) and says what it cannot.
func TestReceiverLog(t *testing.T) {
	run, page := render(t, readTestdata(t, "receiver-synthetic.jsonl"))
	p := NewPage(run, "x")
	if run.Side != "receiver" || p.IterBytes != nil || p.Remaining != nil || p.Rates == nil || p.Rates.Empty != "" || p.Sections == nil {
		t.Fatalf("side %q, figures iter %v remaining %v rates %+v sections %v", run.Side, p.IterBytes != nil, p.Remaining != nil, p.Rates, p.Sections != nil)
	}
	if len(p.Missing) == 0 || !strings.Contains(p.Missing[0], "receiver") {
		t.Errorf("missing %q", p.Missing)
	}
	for _, k := range []string{`data-key="link.connections" data-value="4"`, `data-key="link.frames.lz4" data-value="1200"`, `data-key="ram_total"`} {
		if want := !strings.Contains(k, "ram_total"); bytes.Contains(page, []byte(k)) != want {
			t.Errorf("page has %s: %v, want %v", k, !want, want)
		}
	}
	if len(run.Ignored) != 1 || run.Ignored["listening"] != 1 {
		t.Errorf("ignored %v", run.Ignored)
	}
}

// TestFutureLog: a newer sidecar's log (schema 3, unknown event types and members, text lines
// from --detach's stderr, a last line cut short) is drawn from what this version knows.
func TestFutureLog(t *testing.T) {
	old, _ := render(t, readTestdata(t, "timeout-abort-7.2.jsonl"))
	run, page := render(t, readTestdata(t, "future-schema3.jsonl"))
	if run.Schema != 3 || run.Ignored["verify"] == 0 || run.Ignored["postcopy"] != 1 {
		t.Errorf("schema %d ignored %v", run.Schema, run.Ignored)
	}
	if run.SkippedLines != 3 || len(run.Skipped) != 3 || run.Skipped[0].Line != 1 || run.Skipped[0].Offset != 0 {
		t.Fatalf("skipped %d: %+v", run.SkippedLines, run.Skipped)
	}
	last := run.Skipped[2]
	log := readTestdata(t, "future-schema3.jsonl")
	if !strings.HasPrefix(string(log[last.Offset:]), `{"type":"progress","schema":3`) || !strings.Contains(last.Message, "not an event") {
		t.Errorf("the cut line is reported at offset %d: %+v", last.Offset, last)
	}
	if len(run.Samples) != len(old.Samples) || len(run.Iterations) != len(old.Iterations) || run.Exit.Code != old.Exit.Code {
		t.Errorf("the known events differ: %d/%d samples, %d/%d iterations", len(run.Samples), len(old.Samples), len(run.Iterations), len(old.Iterations))
	}
	if !bytes.Contains(page, []byte("event schema 3; this report knows schema 2")) {
		t.Error("the page does not say the log is newer")
	}
}

// TestReadErrors: what is not an event log is refused with the line and its byte offset.
func TestReadErrors(t *testing.T) {
	long := `{"type":"progress"}` + "\n" + strings.Repeat("x", 100) + "\n"
	cases := []struct {
		name, in string
		opt      Options
		want     string
	}{
		{"empty", "", Options{}, "no events"},
		{"text", "hello\nworld\n", Options{}, "no events"},
		{"json without type", `{"a":1}` + "\n", Options{}, "no events"},
		{"long line", long, Options{MaxLineBytes: 64}, "line 2 at byte offset 20 is longer than 64 bytes"},
		{"too many", strings.Repeat(`{"type":"progress","time":"2026-01-01T00:00:00Z"}`+"\n", 5), Options{MaxEvents: 3}, "line 4 at byte offset 150: more than 3 events"},
	}
	for _, c := range cases {
		_, err := Read(strings.NewReader(c.in), c.opt)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	// A line just at the limit is read.
	if _, err := Read(strings.NewReader(`{"type":"exit"}`+"\n"), Options{MaxLineBytes: 15}); err != nil {
		t.Errorf("a line of exactly MaxLineBytes: %v", err)
	}
}

// TestSeveralRuns: a log with two migrations (an appended --log) shows the last one.
func TestSeveralRuns(t *testing.T) {
	log := append(readTestdata(t, "timeout-abort-7.2.jsonl"), readTestdata(t, "relay-10.0.jsonl")...)
	run, err := Read(bytes.NewReader(log), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if run.Runs != 2 || run.Status() != "migrated" || run.Summary == nil || run.Summary.TotalTimeMs != 1085 || len(run.Iterations) != 3 {
		t.Fatalf("runs %d status %q iterations %d", run.Runs, run.Status(), len(run.Iterations))
	}
	if run.End > 2*time.Second {
		t.Errorf("the time axis starts in the first run: end %v", run.End)
	}
}

// TestEventSchema: events.schema.json names every member of savevm.Event, Summary and
// LinkSummary (so that a member added to the code without the schema fails here), and every
// line of the real logs in testdata validates.
func TestEventSchema(t *testing.T) {
	schema, doc := compileEventSchema(t)
	props := func(path ...string) map[string]any {
		var v any = doc
		for _, p := range path {
			v = v.(map[string]any)[p]
		}
		return v.(map[string]any)
	}
	check := func(what string, typ reflect.Type, have map[string]any) {
		for i := 0; i < typ.NumField(); i++ {
			tag := strings.Split(typ.Field(i).Tag.Get("json"), ",")[0]
			if tag == "" || tag == "-" {
				continue
			}
			if _, ok := have[tag]; !ok {
				t.Errorf("%s.%s (json %q) is not in savevm/events.schema.json", what, typ.Field(i).Name, tag)
			}
		}
		if len(have) != countTags(typ) {
			t.Errorf("%s: the schema has %d members, the type %d", what, len(have), countTags(typ))
		}
	}
	check("savevm.Event", reflect.TypeOf(savevm.Event{}), props("properties"))
	check("savevm.Summary", reflect.TypeOf(savevm.Summary{}), props("$defs", "summary", "properties"))
	check("savevm.LinkSummary", reflect.TypeOf(savevm.LinkSummary{}), props("$defs", "link", "properties"))
	check("savevm.PostcopySummary", reflect.TypeOf(savevm.PostcopySummary{}), props("$defs", "postcopy", "properties"))
	check("savevm.VerifySummary", reflect.TypeOf(savevm.VerifySummary{}), props("$defs", "verify", "properties"))
	if c := props("properties", "schema")["const"]; c != json.Number(fmt.Sprint(savevm.EventSchema)) && c != float64(savevm.EventSchema) {
		t.Errorf("the schema describes version %v, the code writes %d", c, savevm.EventSchema)
	}
	for _, name := range append(realLogs, "receiver-synthetic.jsonl") {
		validateLog(t, schema, name, readTestdata(t, name))
	}
}

func countTags(typ reflect.Type) int {
	n := 0
	for i := 0; i < typ.NumField(); i++ {
		if tag := strings.Split(typ.Field(i).Tag.Get("json"), ",")[0]; tag != "" && tag != "-" {
			n++
		}
	}
	return n
}

func compileEventSchema(t testing.TB) (*jsonschema.Schema, any) {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "savevm", "events.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	doc, err := jsonschema.UnmarshalJSON(f)
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource("events.schema.json", doc); err != nil {
		t.Fatal(err)
	}
	s, err := c.Compile("events.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	return s, doc
}

// validateLog checks every line of log against the event schema.
func validateLog(t testing.TB, schema *jsonschema.Schema, name string, log []byte) {
	t.Helper()
	for i, line := range bytes.Split(bytes.TrimRight(log, "\n"), []byte("\n")) {
		v, err := jsonschema.UnmarshalJSON(bytes.NewReader(line))
		if err != nil {
			t.Errorf("%s line %d: %v", name, i+1, err)
			continue
		}
		if err := schema.Validate(v); err != nil {
			t.Errorf("%s line %d does not match events.schema.json: %v\n%s", name, i+1, err, line)
		}
	}
}

// TestScales: the tick and decimation helpers the figures stand on.
func TestScales(t *testing.T) {
	for _, c := range []struct{ max, step float64 }{{1, 0.2}, {7, 2}, {128.5, 50}, {353, 100}, {0.003, 0.001}, {1e9, 2e8}} {
		if got := niceStep(c.max, 5); math.Abs(got-c.step) > c.step*1e-9 {
			t.Errorf("niceStep(%v) = %v, want %v", c.max, got, c.step)
		}
	}
	_, ticks := timeAxis(20311*time.Millisecond, 12)
	if len(ticks) != 11 || ticks[10] != 20 {
		t.Errorf("time ticks for 20.3 s: %v", ticks)
	}
	_, ticks = timeAxis(1085*time.Millisecond, 12)
	if ticks[3] != 0.3 {
		t.Errorf("ticks drift: %v", ticks)
	}
	// Decimation keeps every column's extremes: a one-sample spike survives 100 000 points.
	var pts []pt
	for i := 0; i < 100000; i++ {
		y := 100.0
		if i == 54321 {
			y = 3
		}
		pts = append(pts, pt{float64(i) / 100, y})
	}
	s, n := points(pts, 800)
	if n > 4*800 || !strings.Contains(s, ",3.0") {
		t.Errorf("decimated to %d points; spike kept: %v", n, strings.Contains(s, ",3.0"))
	}
	if fmtBytes(353068884) != "336.7 MiB" || fmtMs(20311) != "20.311 s" || fmtInt(302527) != "302\u202f527" {
		t.Errorf("formats: %q %q %q", fmtBytes(353068884), fmtMs(20311), fmtInt(302527))
	}
}

// TestCheckCatchesWrongFigures: the page check fails on a page whose figures are not the log's
// (so that passing it means something).
func TestCheckCatchesWrongFigures(t *testing.T) {
	log := readTestdata(t, "relay-10.0.jsonl")
	_, page := render(t, log)
	evs, _ := reporttest.Events(bytes.NewReader(log))
	mutations := []struct{ name, from, to string }{
		{"summary downtime", `data-key="downtime_ms" data-value="143"`, `data-key="downtime_ms" data-value="142"`},
		{"a section's bytes", `data-key="section:cpu" data-value="1904"`, `data-key="section:cpu" data-value="1905"`},
		{"a missing section", `data-key="section:cpu"`, `data-key="nothing"`},
		{"an iteration's bar", `data-key="iteration:2" data-value="103809024"`, `data-key="iteration:2" data-value="1"`},
		{"the downtime split", `data-key="downtime:tail" data-value="1"`, `data-key="downtime:tail" data-value="2"`},
		{"the outcome", `data-key="status" data-value="migrated"`, `data-key="status" data-value="failed"`},
		{"a phase", `data-key="phase:complete"`, `data-key="phase:other"`},
		{"a decision", `data-key="decision:release"`, `data-key="decision:force"`},
		{"a bar's height", `height="121.4" data-key="iteration:2"`, `height="101.4" data-key="iteration:2"`},
	}
	for _, m := range mutations {
		if !bytes.Contains(page, []byte(m.from)) {
			t.Fatalf("%s: the page has no %s", m.name, m.from)
		}
		bad := bytes.Replace(page, []byte(m.from), []byte(m.to), 1)
		p, err := reporttest.Parse(bytes.NewReader(bad))
		if err != nil {
			t.Fatal(err)
		}
		if errs := reporttest.Check(p, evs); len(errs) == 0 {
			t.Errorf("%s changed, and the check found nothing", m.name)
		} else {
			t.Logf("%s: %v", m.name, errs[0])
		}
	}
}

// TestIncomplete: a log that stops without a summary or exit event (the process was killed, or
// it is still running) is drawn as far as it goes and says so.
func TestIncomplete(t *testing.T) {
	log := readTestdata(t, "relay-10.0.jsonl")
	cut := log[:bytes.Index(log, []byte(`"phase":"devices"`))]
	cut = cut[:bytes.LastIndexByte(cut, '\n')+1]
	run, page := render(t, cut)
	if run.Status() != "incomplete" || run.LastPhase() != "complete" {
		t.Fatalf("status %q phase %q", run.Status(), run.LastPhase())
	}
	p := NewPage(run, "x")
	if !strings.Contains(p.Headline, "stops in the complete phase") || !strings.Contains(p.Where, "last phase complete") {
		t.Errorf("headline %q where %q", p.Headline, p.Where)
	}
	if !bytes.Contains(page, []byte(`class="banner incomplete"`)) {
		t.Error("no incomplete banner")
	}
}

// FuzzRead: no log makes Read or WriteHTML panic, and what Read accepts renders.
func FuzzRead(f *testing.F) {
	for _, name := range []string{"relay-10.0.jsonl", "receiver-synthetic.jsonl"} {
		f.Add(readTestdata(f, name))
	}
	f.Add([]byte(`{"type":"phase","time":"2026-01-01T00:00:00Z","phase":"setup"}` + "\n" + `{"type":"exit","exit_code":3,"message":"x"}`))
	f.Fuzz(func(t *testing.T, log []byte) {
		run, err := Read(bytes.NewReader(log), Options{MaxLineBytes: 1 << 16, MaxEvents: 1 << 14})
		if err != nil {
			return
		}
		if err := WriteHTML(io.Discard, run, "fuzz"); err != nil {
			t.Fatal(err)
		}
	})
}

// TestShortRun: a migration over before the rates chart's first window ends (the whole relay
// of a small idle guest can take under 0.2 s) still draws its transfer rate — CI once rendered
// an empty rates chart for one. The real relay log, its clock sped up 50×, stands in for it.
func TestShortRun(t *testing.T) {
	var b bytes.Buffer
	var t0 time.Time
	for _, line := range bytes.Split(bytes.TrimSpace(readTestdata(t, "relay-10.0.jsonl")), []byte("\n")) {
		var e map[string]any
		if err := json.Unmarshal(line, &e); err != nil {
			t.Fatal(err)
		}
		at, err := time.Parse(time.RFC3339Nano, e["time"].(string))
		if err != nil {
			t.Fatal(err)
		}
		if t0.IsZero() {
			t0 = at
		}
		e["time"] = t0.Add(at.Sub(t0) / 50).Format(time.RFC3339Nano)
		if sum, ok := e["summary"].(map[string]any); ok {
			sum["total_time_ms"] = sum["total_time_ms"].(float64) / 50
		}
		out, _ := json.Marshal(e)
		b.Write(append(out, '\n'))
	}
	run, page := render(t, b.Bytes())
	if d := run.Duration(); d > 200*time.Millisecond {
		t.Fatalf("the sped-up run lasts %v", d)
	}
	p, err := reporttest.Parse(bytes.NewReader(page))
	if err != nil {
		t.Fatal(err)
	}
	evs, err := reporttest.Events(bytes.NewReader(b.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range reporttest.Check(p, evs) {
		t.Error(e)
	}
}

// TestMarksCapped: a log with more phases, passes, decisions and warnings than a figure can show
// (hostile, or a migration that never converged) keeps the page bounded and says what it left out.
func TestMarksCapped(t *testing.T) {
	var b bytes.Buffer
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := 0; i < 6000; i++ {
		at := t0.Add(time.Duration(i) * time.Millisecond).Format(time.RFC3339Nano)
		phase := []string{"devices", "iterate", "complete"}[i%3]
		fmt.Fprintf(&b, `{"type":"phase","time":%q,"phase":%q}`+"\n", at, phase)
		fmt.Fprintf(&b, `{"type":"iteration","time":%q,"phase":"iterate","iteration":%d,"remaining":%d,"total":1000000,"rate":5,"throttle_percent":%d}`+"\n", at, i+1, i, i%100)
		fmt.Fprintf(&b, `{"type":"progress","time":%q,"phase":"iterate","iteration":%d,"remaining":%d,"total":1000000,"rate":5,"throttle_percent":%d,"transferred":%d}`+"\n", at, i+1, i, (i*37)%100, i*1000)
		fmt.Fprintf(&b, `{"type":"policy","time":%q,"decision":"force","message":"m"}`+"\n", at)
		fmt.Fprintf(&b, `{"type":"warning","time":%q,"message":"w"}`+"\n", at)
	}
	run, page := render(t, b.Bytes())
	if len(run.Phases) != DefaultMaxMarks || len(run.Iterations) != DefaultMaxMarks || run.Iterations[0].N != 5001 ||
		len(run.Decisions) != DefaultMaxMarks || len(run.Warnings) != DefaultMaxMarks {
		t.Fatalf("kept %d phases, %d iterations (from %d), %d decisions, %d warnings", len(run.Phases), len(run.Iterations),
			run.Iterations[0].N, len(run.Decisions), len(run.Warnings))
	}
	if run.Dropped["iteration"] != 5000 || run.Dropped["policy"] != 5000 || !bytes.Contains(page, []byte(`5000 &#34;iteration&#34; event(s) not drawn (the oldest`)) {
		t.Errorf("dropped %v", run.Dropped)
	}
	t.Logf("%d events: %d KiB page", 30000, len(page)>>10)
	if len(page) > 4<<20 {
		t.Errorf("a %d KiB page", len(page)>>10)
	}
}

// TestOneSample: CI once drew a relay that the policy released at its first query-migrate
// (one iteration and one progress event, at the same instant) as a single dot on the dirty-RAM
// chart. The line goes on to 0 where the last pass ends, and a run that failed before its last
// pass does not claim it. The real relay log, cut to its first sample, stands in for that run.
func TestOneSample(t *testing.T) {
	var b bytes.Buffer
	samples := 0
	for _, line := range bytes.SplitAfter(readTestdata(t, "relay-10.0.jsonl"), []byte("\n")) {
		if bytes.Contains(line, []byte(`"type":"iteration"`)) || bytes.Contains(line, []byte(`"type":"progress"`)) {
			if samples++; samples > 2 {
				continue
			}
		}
		b.Write(line)
	}
	run, _ := render(t, b.Bytes())
	c := NewPage(run, "x").Remaining
	if c == nil || len(c.Lines) != 1 {
		t.Fatalf("remaining chart %+v", c)
	}
	devices, ok := run.phaseStart("devices")
	if !ok {
		t.Fatal("the log has no devices phase")
	}
	x, _ := timeX(run.Duration(), pageW)
	last := strings.Fields(c.Lines[0].Points)
	want := num(sx(x, devices.Start)) + "," + num(c.Plot.Bottom())
	if c.Lines[0].N != 3 || last[len(last)-1] != want {
		t.Errorf("line %q (%d points), want the two samples and an end at %s: 0 dirty when the devices phase starts", c.Lines[0].Points, c.Lines[0].N, want)
	}

	failed, _ := render(t, readTestdata(t, "timeout-abort-7.2.jsonl"))
	if _, ok := ramSent(failed); ok {
		t.Error("a run aborted while iterating has its RAM sent")
	}
}
