package report

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// syntheticLog writes a source log of n events shaped like a long auto-converge migration: a
// progress event every 25 ms, a pass over 4 GiB of RAM every 400 events with a rising
// throttle, a release, the switchover phases, a summary with 40 sections and the exit event.
func syntheticLog(n int) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	t0 := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	at := func(i int) time.Time { return t0.Add(time.Duration(i) * 25 * time.Millisecond) }
	const total = int64(4 << 30)
	emit := func(e savevm.Event) {
		e.Schema, e.Side = savevm.EventSchema, "source"
		enc.Encode(e)
	}
	emit(savevm.Event{Type: "phase", Time: at(0), Phase: savevm.PhaseSetup, DowntimeBudgetMs: 300})
	emit(savevm.Event{Type: "phase", Time: at(1), Phase: savevm.PhaseIterate})
	var sent int64
	body := n - 9 // the two phases before, the seven events after
	for i, emitted := 0, 0; emitted < body; i++ {
		pass := i/400 + 1
		left := total - int64(i%400)*(total/400)
		if pass > 1 {
			left /= 4
		}
		sent += 3 << 20
		e := savevm.Event{Type: "progress", Time: at(i + 2), Phase: savevm.PhaseIterate, Iteration: pass, Transferred: sent,
			Remaining: left, Total: total, Rate: 120e6 + float64(i%7)*1e6, DirtyRate: 40e6, ExpectedDowntimeMs: left * 1000 / 120e6,
			ThrottlePercent: int64(min(20+10*(pass-1), 99)), NormalPages: sent / 4096}
		if i%400 == 0 && emitted < body-1 {
			it := e
			it.Type = "iteration"
			emit(it)
			emitted++
		}
		emit(e)
		emitted++
	}
	end := body + 2
	emit(savevm.Event{Type: "policy", Time: at(end), Phase: savevm.PhaseIterate, Decision: "release", Message: "expected downtime 250ms ≤ 300ms: switching over",
		DowntimeBudgetMs: 300, ExpectedDowntimeMs: 250})
	emit(savevm.Event{Type: "warning", Time: at(end), Phase: savevm.PhaseIterate, Message: "a warning"})
	emit(savevm.Event{Type: "phase", Time: at(end + 2), Phase: savevm.PhaseComplete, Transferred: sent})
	emit(savevm.Event{Type: "phase", Time: at(end + 12), Phase: savevm.PhaseDevices, Transferred: sent + 30<<20})
	emit(savevm.Event{Type: "phase", Time: at(end + 13), Phase: savevm.PhaseDone, Transferred: sent + 31<<20})
	sec := map[string]int64{"ram": sent + 30<<20}
	for i := 0; i < 39; i++ {
		sec[fmt.Sprintf("0000:00:%02x.0/dev%d", i, i)] = int64(100 + 997*i)
	}
	sum := savevm.Summary{TotalTimeMs: int64(end+13) * 25, DowntimeMs: 280, QEMUDowntimeMs: 282, TailMs: 25, TailBytes: 1 << 20,
		BytesIn: sent + 31<<20, BytesOut: sent + 31<<20, NormalPages: sent / 4096, Iterations: body / 400, Sections: sec}
	emit(savevm.Event{Type: "summary", Time: at(end + 14), Phase: savevm.PhaseDone, Transferred: sum.BytesOut, Summary: &sum})
	code := 0
	emit(savevm.Event{Type: "exit", Time: at(end + 15), ExitCode: &code})
	return b.Bytes()
}

// BenchmarkReport10k is `report` on a 10,000-event log: reading the events and writing the page
// (reported as page-bytes).
func BenchmarkReport10k(b *testing.B) {
	log := syntheticLog(10000)
	lines := bytes.Count(log, []byte("\n"))
	var size int
	b.SetBytes(int64(len(log)))
	for i := 0; i < b.N; i++ {
		run, err := Read(bytes.NewReader(log), Options{})
		if err != nil {
			b.Fatal(err)
		}
		var page countWriter
		if err := WriteHTML(&page, run, "bench.jsonl"); err != nil {
			b.Fatal(err)
		}
		size = page.n
	}
	b.ReportMetric(float64(size), "page-bytes")
	b.ReportMetric(float64(lines), "events")
}

type countWriter struct{ n int }

func (c *countWriter) Write(p []byte) (int, error) { c.n += len(p); return len(p), nil }

var _ io.Writer = (*countWriter)(nil)

// TestSyntheticLog: the benchmark's log is a valid one, its page checks out, and a long log
// gives a page of bounded size (the series are decimated to the figure's width).
func TestSyntheticLog(t *testing.T) {
	schema, _ := compileEventSchema(t)
	for _, n := range []int{10000, 100000} {
		log := syntheticLog(n)
		if n == 10000 {
			validateLog(t, schema, "synthetic", log)
			if got := bytes.Count(log, []byte("\n")); got != n {
				t.Fatalf("%d lines, want %d", got, n)
			}
		}
		run, page := render(t, log)
		if run.Status() != "migrated" || len(run.Iterations) < 20 {
			t.Fatalf("status %q, %d iterations", run.Status(), len(run.Iterations))
		}
		t.Logf("%d events: %d KiB page", n, len(page)>>10)
		if len(page) > 400<<10 {
			t.Errorf("%d events make a %d KiB page", n, len(page)>>10)
		}
		if os.Getenv("QMG_REPORT_KEEP") != "" {
			os.WriteFile(fmt.Sprintf("%s/synthetic-%d.html", os.Getenv("QMG_REPORT_KEEP"), n), page, 0o644)
			os.WriteFile(fmt.Sprintf("%s/synthetic-%d.jsonl", os.Getenv("QMG_REPORT_KEEP"), n), log, 0o644)
		}
	}
}
