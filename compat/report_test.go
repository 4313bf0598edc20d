package compat

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/qemu-migrate-go/qemu-migrate-go/inspect"
	"github.com/qemu-migrate-go/qemu-migrate-go/report/reporttest"
)

// TestReport runs a real relay migration and a failed one (a --timeout that cannot be met:
// exit 5) with --json, checks every line of their logs against savevm/events.schema.json, draws
// each with `qemu-migrate-go report`, reads the page back — every figure it carries against the
// run's own events and summary (reporttest.Check) — and renders it in headless chromium: the
// screenshot must show ink, in the series' colours, inside every chart's plot area.
func TestReport(t *testing.T) {
	chromiumBinary(t) // before the migrations: a missing browser fails at once
	schema := eventSchema(t)
	cases := []struct {
		name   string
		series string
		code   int
		args   func(src, dst *VM, uri string) []string
	}{
		{"relay", "10.0", 0, func(src, dst *VM, uri string) []string {
			return []string{"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json"}
		}},
		// As TestPolicyTimeout's abort case: at 2 MB/s the first pass alone outlasts the timeout.
		{"timeout-abort", "7.2", 5, func(src, dst *VM, uri string) []string {
			return []string{"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json",
				"--downtime", "1ms", "--timeout", "2s", "--bandwidth", "2000000"}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			src, dst, uri := dirtyPair(ctx, t, requireQEMU(t, c.series))
			stdout, stderr, code, _ := runSidecar(t, time.Minute, c.args(src, dst, uri)...)
			if code != c.code {
				t.Fatalf("migration: exit %d, want %d: %s", code, c.code, stderr)
			}
			dir := t.TempDir()
			logPath := filepath.Join(dir, "events.jsonl")
			if err := os.WriteFile(logPath, []byte(stdout), 0o644); err != nil {
				t.Fatal(err)
			}
			validateEvents(t, schema, stdout)

			pagePath := filepath.Join(dir, "report.html")
			start := time.Now()
			_, rstderr, rcode, _ := runSidecar(t, 30*time.Second, "report", logPath, "-o", pagePath)
			if rcode != 0 || !strings.Contains(rstderr, "wrote "+pagePath) {
				t.Fatalf("report: exit %d: %s", rcode, rstderr)
			}
			t.Logf("report of %d events: %v, %s", strings.Count(stdout, "\n"), time.Since(start).Round(time.Millisecond), strings.TrimSpace(rstderr))
			page, err := os.ReadFile(pagePath)
			if err != nil {
				t.Fatal(err)
			}
			p, err := reporttest.Parse(bytes.NewReader(page))
			if err != nil {
				t.Fatal(err)
			}
			evs, err := reporttest.Events(strings.NewReader(stdout))
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range reporttest.Check(p, evs) {
				t.Error(e)
			}
			if len(p.Refs) > 0 || p.Tags["script"] > 0 {
				t.Errorf("the page fetches %q, has %d scripts", p.Refs, p.Tags["script"])
			}
			wantCharts := []string{"timeline", "rates", "remaining", "iter-remaining", "iter-downtime"}
			if c.code == 0 {
				wantCharts = append(wantCharts, "downtime", "sections")
			}
			if strings.Join(p.Charts, ",") != strings.Join(wantCharts, ",") {
				t.Errorf("charts %v, want %v", p.Charts, wantCharts)
			}
			// From a pipe the page goes to stdout.
			if out, errs, code, _ := runCmd(t, 30*time.Second, stdout, sidecarBinary(t), "report", "-"); code != 0 || !strings.HasPrefix(out, "<!DOCTYPE html>") {
				t.Errorf("report - (stdin): exit %d, %d bytes: %s", code, len(out), errs)
			}

			img, boxes := renderInChromium(t, pagePath, filepath.Join(dir, "report.png"))
			checkCharts(t, img, boxes, wantCharts)
		})
	}
}

// TestReportScreenshot makes the README's screenshot (docs/report.png) from a real migration
// that shows most of what a page can: several passes, the auto-converge throttle, and the
// policy pausing the guest at --timeout. It runs only with QMG_REPORT_SCREENSHOT=PATH.
func TestReportScreenshot(t *testing.T) {
	out := os.Getenv("QMG_REPORT_SCREENSHOT")
	if out == "" {
		t.Skip("QMG_REPORT_SCREENSHOT=docs/report.png makes the README's screenshot")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	src, dst, uri := dirtyPair(ctx, t, requireQEMU(t, "10.0"))
	stdout, stderr, code, _ := runSidecar(t, 2*time.Minute, "--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json",
		"--auto-converge", "--downtime", "30ms", "--timeout", "20s", "--timeout-action", "pause", "--bandwidth", "60000000")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	dir := t.TempDir()
	logPath, pagePath := filepath.Join(dir, "events.jsonl"), filepath.Join(dir, "report.html")
	os.WriteFile(logPath, []byte(stdout), 0o644)
	if _, errs, code, _ := runSidecar(t, 30*time.Second, "report", logPath, "-o", pagePath); code != 0 {
		t.Fatalf("report: %s", errs)
	}
	img, boxes := renderInChromium(t, pagePath, filepath.Join(dir, "full.png"))
	// The page down to the downtime split: outcome, summary, timeline, rates, dirty RAM, the
	// per-iteration charts and the downtime (the sections follow).
	b := img.Bounds()
	bottom := b.Dy()
	for _, bx := range boxes {
		if bx.Key == "downtime" {
			bottom = min(bottom, int(bx.Y+bx.H)+92)
		}
	}
	crop := image.NewRGBA(image.Rect(0, 0, b.Dx(), bottom))
	for y := 0; y < crop.Bounds().Dy(); y++ {
		for x := 0; x < crop.Bounds().Dx(); x++ {
			crop.Set(x, y, img.At(b.Min.X+x, b.Min.Y+y))
		}
	}
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := (&png.Encoder{CompressionLevel: png.BestCompression}).Encode(f, crop); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s (%dx%d) from %d events", out, crop.Bounds().Dx(), crop.Bounds().Dy(), strings.Count(stdout, "\n"))
}

// chromiumBinary is Debian's chromium, which make setup installs (compat/install-chromium.sh).
func chromiumBinary(t *testing.T) string {
	t.Helper()
	const bin = "/usr/bin/chromium"
	if fi, err := os.Stat(bin); err != nil || fi.Mode()&0o111 == 0 {
		t.Fatalf("%s is not installed (%v): run make setup (compat/install-chromium.sh installs Debian's chromium)", bin, err)
	}
	return bin
}

// chartBox is where a chart's plot area is on the page, in CSS pixels of the document.
type chartBox struct {
	Key string  `json:"key"`
	X   float64 `json:"x"`
	Y   float64 `json:"y"`
	W   float64 `json:"w"`
	H   float64 `json:"h"`
}

// renderInChromium loads the page in headless chromium (offline: every network feature off),
// takes a full-page screenshot (saved to pngPath) and asks the page where each chart's plot
// area is.
func renderInChromium(t *testing.T, pagePath, pngPath string) (image.Image, []chartBox) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumBinary(t)),
		chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("hide-scrollbars", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1040, 900))
	actx, acancel := chromedp.NewExecAllocator(ctx, opts...)
	defer acancel()
	bctx, bcancel := chromedp.NewContext(actx)
	defer bcancel()
	const where = `Array.from(document.querySelectorAll("figure.chart")).map(f => {
		const s = f.querySelector("svg"), r = s.getBoundingClientRect(), p = s.getAttribute("data-plot").split(" ").map(Number);
		return {key: f.dataset.chart, x: r.left + window.scrollX + p[0], y: r.top + window.scrollY + p[1], w: p[2], h: p[3]};
	})`
	if err := chromedp.Do(bctx, chromedp.Navigate("file://"+pagePath)); err != nil {
		t.Fatalf("chromium: loading the page: %v", err)
	}
	boxes, err := chromedp.Run(bctx, chromedp.Evaluate[[]chartBox](where))
	if err != nil {
		t.Fatalf("chromium: where the charts are: %v", err)
	}
	shot, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("chromium: screenshot: %v", err)
	}
	if err := os.WriteFile(pngPath, shot, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(shot))
	if err != nil {
		t.Fatalf("the screenshot is not a PNG: %v", err)
	}
	return img, boxes
}

// seriesColours are colours each chart must show somewhere in its plot area (report/page.go's
// style sheet): the marks, not the axes or the grid.
var seriesColours = map[string][][3]uint8{
	"timeline":       {{0x6f, 0xa8, 0xdc}},                     // the iterate phase
	"rates":          {{0x1f, 0x77, 0xb4}},                     // bytes sent
	"remaining":      {{0x94, 0x67, 0xbd}},                     // dirty RAM left
	"iter-remaining": {{0x6f, 0xa8, 0xdc}},                     // the bars
	"iter-downtime":  {{0xd6, 0x27, 0x28}, {0x2c, 0xa0, 0x2c}}, // dots over / within the budget
	"downtime":       {{0xf0, 0xa0, 0x4b}},                     // the last RAM pass
	"sections":       {{0x6f, 0xa8, 0xdc}, {0xb4, 0x8a, 0xd6}}, // live / device sections
}

// checkCharts: every expected chart is on the screenshot, its plot area is not blank (a share
// of its pixels is neither the background nor the grid), and the series' colours are there.
func checkCharts(t *testing.T, img image.Image, boxes []chartBox, want []string) {
	t.Helper()
	found := map[string]bool{}
	for _, bx := range boxes {
		found[bx.Key] = true
		r := image.Rect(int(bx.X)+1, int(bx.Y)+1, int(bx.X+bx.W)-1, int(bx.Y+bx.H)-1)
		if !r.In(img.Bounds()) || r.Dx() < 50 || r.Dy() < 20 {
			t.Errorf("chart %s: plot area %v outside the %v screenshot", bx.Key, r, img.Bounds())
			continue
		}
		var ink, series int
		for y := r.Min.Y; y < r.Max.Y; y++ {
			for x := r.Min.X; x < r.Max.X; x++ {
				c := rgb(img, x, y)
				if !near(c, [3]uint8{0xfb, 0xfc, 0xfd}, 6) && !near(c, [3]uint8{0xff, 0xff, 0xff}, 6) && !near(c, [3]uint8{0xe9, 0xec, 0xf0}, 6) {
					ink++
				}
				for _, s := range seriesColours[bx.Key] {
					if near(c, s, 24) {
						series++
						break
					}
				}
			}
		}
		area := r.Dx() * r.Dy()
		t.Logf("chart %-14s %4dx%-3d at (%d,%d): %5.1f%% ink, %d px of its series", bx.Key, r.Dx(), r.Dy(), r.Min.X, r.Min.Y, 100*float64(ink)/float64(area), series)
		if ink*200 < area {
			t.Errorf("chart %s is blank on the screenshot: %d of %d pixels drawn", bx.Key, ink, area)
		}
		// A dot is about 50 pixels, a line across the plot several hundred.
		if series < 40 {
			t.Errorf("chart %s: its series colours cover %d pixels", bx.Key, series)
		}
	}
	for _, k := range want {
		if !found[k] {
			t.Errorf("chart %s is not on the rendered page (%d charts found)", k, len(boxes))
		}
	}
}

func rgb(img image.Image, x, y int) [3]uint8 {
	r, g, b, _ := img.At(x, y).RGBA()
	return [3]uint8{uint8(r >> 8), uint8(g >> 8), uint8(b >> 8)}
}

func near(a, b [3]uint8, tol int) bool {
	for i := range a {
		d := int(a[i]) - int(b[i])
		if d < -tol || d > tol {
			return false
		}
	}
	return true
}

// eventSchema compiles savevm/events.schema.json.
func eventSchema(t *testing.T) *jsonschema.Schema {
	t.Helper()
	f, err := os.Open(filepath.Join(RepoRoot(), "savevm", "events.schema.json"))
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
	return s
}

// validateEvents checks every line of a --json log against the event schema.
func validateEvents(t *testing.T, schema *jsonschema.Schema, log string) {
	t.Helper()
	lines := strings.Split(strings.TrimRight(log, "\n"), "\n")
	types := map[string]int{}
	for i, line := range lines {
		v, err := jsonschema.UnmarshalJSON(strings.NewReader(line))
		if err != nil {
			t.Errorf("line %d is not JSON: %v: %s", i+1, err, line)
			continue
		}
		if err := schema.Validate(v); err != nil {
			t.Errorf("line %d does not match savevm/events.schema.json: %v\n%s", i+1, err, line)
		}
		if m, ok := v.(map[string]any); ok {
			types[fmt.Sprint(m["type"])]++
		}
	}
	t.Logf("%d event lines valid against the schema: %v", len(lines), types)
	if types["exit"] != 1 || types["phase"] == 0 {
		t.Errorf("event types %v: want phases and one exit event", types)
	}
}

// TestInspectDiff saves real QEMU 7.2 VMs (-m 64, idle) to files with QEMU's own exec:
// migration — a twin of the first, one with an extra device, one with more RAM, one with
// another machine type — and checks what `inspect --diff` (text and --json) says about each
// against the first: exactly the one difference that was made, and nothing structural between
// the twins; a capture against itself (also from a pipe) has no difference at all.
func TestInspectDiff(t *testing.T) {
	q := requireQEMU(t, "7.2")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	cfgs := []struct {
		name string
		cfg  VMConfig
	}{
		{"base", VMConfig{MemMiB: 64}},
		{"twin", VMConfig{MemMiB: 64}},
		{"watchdog", VMConfig{MemMiB: 64, Extra: []string{"-device", "i6300esb"}}},
		{"ram128", VMConfig{MemMiB: 128}},
		{"q35-7.1", VMConfig{MemMiB: 64, Machine: "pc-q35-7.1"}},
	}
	files := map[string]string{}
	for _, c := range cfgs {
		cfg := c.cfg
		cfg.Name, cfg.QEMU = c.name, q
		vm := StartVM(t, cfg)
		file := filepath.Join(dir, c.name+".bin")
		if err := vm.QMP.Migrate(ctx, "exec:cat > "+file); err != nil {
			t.Fatal(err)
		}
		m, err := vm.QMP.WaitMigration(ctx, 20*time.Millisecond)
		if err != nil || m.Status != "completed" {
			t.Fatalf("%s: saving: %s %s %v", c.name, m.Status, m.ErrorDesc, err)
		}
		vm.Kill()
		files[c.name] = file
	}
	diff := func(a, b string) (*inspect.Diff, string) {
		t.Helper()
		out, errs, code, _ := runSidecar(t, 30*time.Second, "inspect", "--diff", files[a], files[b], "--json")
		if code != 0 {
			t.Fatalf("inspect --diff %s %s --json: exit %d: %s", a, b, code, errs)
		}
		var d inspect.Diff
		if err := json.Unmarshal([]byte(out), &d); err != nil {
			t.Fatalf("--json: %v: %s", err, out)
		}
		txt, errs, code, _ := runSidecar(t, 30*time.Second, "inspect", "--diff", files[a], files[b])
		if code != 0 {
			t.Fatalf("inspect --diff %s %s: exit %d: %s", a, b, code, errs)
		}
		t.Logf("inspect --diff %s %s:\n%s", a, b, firstLines(txt, 12))
		return &d, txt
	}
	structural := func(d *inspect.Diff) int {
		n := len(d.RAMBlocks) + len(d.Devices)
		for _, c := range []bool{d.Machine != nil, d.Capabilities != nil, d.Version != nil, d.UUID != nil, d.TargetPageBits != nil} {
			if c {
				n++
			}
		}
		return n
	}

	d, txt := diff("base", "base")
	if !d.Identical || !strings.Contains(txt, "no difference") {
		t.Errorf("a capture against itself:\n%s", txt)
	}
	data, _ := os.ReadFile(files["base"])
	if out, errs, code, _ := runCmd(t, 30*time.Second, string(data), sidecarBinary(t), "inspect", "--diff", "-", files["base"]); code != 0 || !strings.Contains(out, "no difference") {
		t.Errorf("from a pipe: exit %d: %s%s", code, out, errs)
	}

	d, txt = diff("base", "twin")
	if structural(d) != 0 {
		t.Errorf("two VMs of one command line differ in structure:\n%s", txt)
	}

	d, txt = diff("base", "watchdog")
	if structural(d) != 1 || len(d.Devices) != 1 || d.Devices[0].Change != "added" || !strings.Contains(d.Devices[0].Device, "i6300esb") ||
		!strings.Contains(txt, d.Devices[0].Device+" v10000: only in B (added)") {
		t.Errorf("one device added: %+v\n%s", d.Devices, txt)
	}
	if d2, _ := diff("watchdog", "base"); len(d2.Devices) != 1 || d2.Devices[0].Change != "missing" {
		t.Errorf("the other way round: %+v", d2.Devices)
	}

	d, txt = diff("base", "ram128")
	if structural(d) != 1 || len(d.RAMBlocks) != 1 || d.RAMBlocks[0].Name != "pc.ram" || d.RAMBlocks[0].Change != "changed" ||
		d.RAMBlocks[0].A.Size != 64<<20 || d.RAMBlocks[0].B.Size != 128<<20 {
		t.Errorf("RAM size: %+v\n%s", d.RAMBlocks, txt)
	}

	d, txt = diff("base", "q35-7.1")
	if d.Machine == nil || d.Machine.A != "pc-q35-7.2" || d.Machine.B != "pc-q35-7.1" || !strings.Contains(txt, "machine        pc-q35-7.2 in A, pc-q35-7.1 in B") {
		t.Errorf("machine type: %+v\n%s", d.Machine, txt)
	}
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines[n] = "…"
	}
	return strings.Join(lines, "\n")
}
