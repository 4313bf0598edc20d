package report

import (
	"bufio"
	"html/template"
	"io"
)

// WriteHTML writes run as one self-contained HTML page: inline CSS and SVG, no script, nothing
// fetched. name is how the page calls the log (its file name).
func WriteHTML(w io.Writer, run *Run, name string) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	if err := pageTemplate.Execute(bw, NewPage(run, name)); err != nil {
		return err
	}
	return bw.Flush()
}

var pageTemplate = template.Must(template.New("page").Funcs(template.FuncMap{"n": num, "add": func(a, b float64) float64 { return a + b }, "fmtDur": fmtDur}).Parse(pageHTML))

// pageHTML is the page. Colours: phases grey/blue/orange/red/green; sent blue, dirty red,
// decisions release green, force orange, pause purple, abort red.
const pageHTML = `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="qemu-migrate-go report">
<title>{{.Title}}: {{.Source}}</title>
<style>
body{font:14px/1.4 "DejaVu Sans",Verdana,Helvetica,Arial,sans-serif;color:#1d2330;background:#fff;margin:16px auto;max-width:1000px;padding:0 12px}
h1{font-size:21px;margin:0 0 2px}
h2{font-size:16px;margin:22px 0 6px;border-bottom:1px solid #dde1e7;padding-bottom:3px}
.meta{color:#5b6474;font-size:12px}
.banner{margin:12px 0;padding:10px 14px;border-radius:5px;font-size:15px}
.banner.migrated{background:#e6f4ea;border-left:6px solid #2ca02c}
.banner.failed{background:#fdecea;border-left:6px solid #d62728}
.banner.incomplete{background:#fff6e0;border-left:6px solid #e6a000}
.banner .why{margin-top:6px;font-family:"DejaVu Sans Mono",monospace;font-size:13px;white-space:pre-wrap;word-break:break-word}
.banner .where{margin-top:4px;font-size:13px;color:#3a4150}
.cols{display:flex;gap:24px;align-items:flex-start}
table.summary{border-collapse:collapse;font-size:13px;width:50%}
table.summary th{text-align:left;font-weight:normal;color:#3a4150;padding:3px 8px;border-bottom:1px solid #eef0f3;width:58%}
table.summary td{padding:3px 8px;border-bottom:1px solid #eef0f3;font-variant-numeric:tabular-nums}
figure.chart{margin:14px 0 6px}
figcaption{font-size:13px;margin-bottom:3px}
figcaption .note{color:#5b6474;font-size:12px}
.pair{display:flex;gap:16px}
.pair figure.chart{margin:14px 0 6px}
svg{display:block;background:#fff}
svg text{font-family:"DejaVu Sans",Verdana,sans-serif;font-size:11px;fill:#3a4150}
svg text.small{font-size:10px}
svg text.rowname{font-size:11px;fill:#5b6474}
svg text.muted{fill:#98a0ad;font-style:italic}
svg text.inbar{fill:#fff;font-size:11px}
svg text.axis{font-size:11px;fill:#5b6474}
svg text.empty{font-size:13px;fill:#98a0ad}
.plotbg{fill:#fbfcfd;stroke:#dde1e7}
.grid{stroke:#e9ecf0}
.tick{stroke:#98a0ad}
.ph-setup{fill:#b9c0ca}.ph-iterate{fill:#6fa8dc}.ph-complete{fill:#f0a04b}.ph-devices{fill:#e06666}.ph-done{fill:#57bb8a}.ph-other{fill:#c9c9c9}
.ph-setup,.ph-iterate,.ph-complete,.ph-devices,.ph-done,.ph-other{stroke:#fff;stroke-width:1}
text.phlabel{fill:#fff;font-weight:bold}
.bg-setup{fill:#b9c0ca;opacity:.14}.bg-iterate{fill:#6fa8dc;opacity:.10}.bg-complete{fill:#f0a04b;opacity:.22}.bg-devices{fill:#e06666;opacity:.25}.bg-done{fill:#57bb8a;opacity:.18}.bg-other{fill:#c9c9c9;opacity:.15}
.decision{stroke-width:2;stroke-dasharray:5 3}
.d-release{stroke:#2ca02c;fill:#2ca02c}.d-force{stroke:#ff7f0e;fill:#ff7f0e}.d-pause{stroke:#9467bd;fill:#9467bd}.d-abort{stroke:#d62728;fill:#d62728}.d-other{stroke:#7f7f7f;fill:#7f7f7f}
text.d-release,text.d-force,text.d-pause,text.d-abort,text.d-other{stroke:none;font-weight:bold;font-size:11px}
.exit-failed{stroke:#d62728;stroke-width:3}.exit-ok{stroke:#2ca02c;stroke-width:1.5}
text.exit-failed{fill:#d62728;stroke:none;font-weight:bold}text.exit-ok{fill:#2ca02c;stroke:none}
.throttle{fill:#8c564b}
.warning{fill:#e6a000;stroke:#8a6000}
polyline{fill:none;stroke-linejoin:round}
.sent{stroke:#1f77b4;stroke-width:2}
.dirty{stroke:#d62728;stroke-width:1.6}
.perpass{stroke:#ff7f0e;stroke-width:2;stroke-dasharray:6 3}
.remaining{stroke:#9467bd;stroke-width:1.6}
.expected{stroke:#98a0ad;stroke-width:1}
.sync{fill:#9467bd;stroke:#fff}
.total{stroke:#5b6474;stroke-dasharray:3 3}
text.total{fill:#5b6474;stroke:none}
.budget{stroke:#d62728;stroke-width:1.6;stroke-dasharray:7 4}
text.budget{fill:#d62728;stroke:none}
.qemu{stroke:#1d2330;stroke-width:2}
text.qemu{fill:#1d2330;stroke:none}
.bar-remaining{fill:#6fa8dc}.bar-stop{fill:#f0a04b}
.dot-within{fill:#2ca02c;stroke:#fff}.dot-over{fill:#d62728;stroke:#fff}
.dot-decision{fill-opacity:0;stroke-width:2.5}.dot-actual{fill:#1d2330;stroke:#fff}
.sw.dot-actual{background:#1d2330;width:8px;height:8px;border-radius:4px}.sw.unknown{display:none}
.seg-ram{fill:#f0a04b}.seg-tail{fill:#e06666}
.bar-live{fill:#6fa8dc}.bar-device{fill:#b48ad6}
.legend{font-size:12px;color:#3a4150;margin:2px 0 0 72px}
.legend span{margin-right:14px;white-space:nowrap}
.sw{display:inline-block;width:14px;height:10px;margin-right:4px;vertical-align:-1px;border-radius:2px}
.sw.ph-setup{background:#b9c0ca}.sw.ph-iterate{background:#6fa8dc}.sw.ph-complete{background:#f0a04b}.sw.ph-devices{background:#e06666}.sw.ph-done{background:#57bb8a}
.sw.sw-release{background:#2ca02c}.sw.sw-force{background:#ff7f0e}.sw.sw-pause{background:#9467bd}.sw.sw-abort{background:#d62728}
.sw.throttle{background:#8c564b}.sw.warning{background:#e6a000}
.sw.sent{background:#1f77b4;height:3px;vertical-align:3px}.sw.dirty{background:#d62728;height:3px;vertical-align:3px}.sw.perpass{background:#ff7f0e;height:3px;vertical-align:3px}
.sw.remaining{background:#9467bd;height:3px;vertical-align:3px}.sw.sync{background:#9467bd;width:8px;height:8px;border-radius:4px}
.sw.bar-remaining{background:#6fa8dc}.sw.bar-stop{background:#f0a04b}
.sw.dot-within{background:#2ca02c;width:8px;height:8px;border-radius:4px}.sw.dot-over{background:#d62728;width:8px;height:8px;border-radius:4px}
.sw.budget{background:#d62728;height:2px;vertical-align:3px}.sw.qemu{background:#1d2330;width:3px}
.sw.seg-ram{background:#f0a04b}.sw.seg-tail{background:#e06666}.sw.bar-live{background:#6fa8dc}.sw.bar-device{background:#b48ad6}
ul.notes{font-size:13px;padding-left:20px;margin:4px 0}
ul.notes li{margin:2px 0;word-break:break-word}
.missing{color:#5b6474;font-size:13px}
code{font-family:"DejaVu Sans Mono",monospace;font-size:12px}
</style>
</head>
<body>
<h1>{{.Title}}</h1>
<div class="meta">{{.Source}}{{with .Started}} · started {{.}}{{end}} · {{.Side}} side · event schema {{.Schema}}</div>
<div class="banner {{.Status}}" data-key="status" data-value="{{.Status}}">
<div class="headline">{{.Headline}}</div>
{{with .Where}}<div class="where" data-key="where">Where: {{.}}</div>{{end}}
{{with .Why}}<div class="why" data-key="why">{{.}}</div>{{end}}
</div>

<h2>Summary</h2>
<div class="cols">{{range .RowCols}}<table class="summary" data-table="summary">
{{range .}}<tr><th>{{.Name}}</th><td data-key="{{.Key}}" data-value="{{.Value}}">{{.Text}}</td></tr>
{{end}}</table>{{end}}</div>

<h2>Timeline</h2>
{{with .Timeline}}{{template "chart" .}}{{end}}
{{with .Rates}}{{template "chart" .}}{{end}}
{{with .Remaining}}{{template "chart" .}}{{end}}

{{if or .IterBytes .IterDown .Downtime}}<h2>Convergence and downtime</h2>{{end}}
{{if .IterBytes}}<div class="pair">{{template "chart" .IterBytes}}{{template "chart" .IterDown}}</div>{{end}}
{{with .Downtime}}{{template "chart" .}}{{end}}

{{with .Sections}}<h2>Sections</h2>{{template "chart" .}}{{end}}

{{with .Missing}}<h2>Not drawn</h2><ul class="notes missing">{{range .}}<li>{{.}}</li>{{end}}</ul>{{end}}
{{with .Warnings}}<h2>Warnings</h2><ul class="notes" data-list="warnings">{{range .}}<li>{{fmtDur .At}} ({{.Phase}}): {{.Message}}</li>{{end}}</ul>{{end}}
<h2>The log</h2>
<ul class="notes">{{range .LogNotes}}<li>{{.}}</li>{{end}}
{{range .Skipped}}<li>line {{.Line}} (byte offset {{.Offset}}): <code>{{.Message}}</code></li>{{end}}</ul>
</body>
</html>
{{define "chart"}}<figure class="chart" data-chart="{{.Key}}">
<figcaption><b>{{.Title}}</b>{{with .Note}} <span class="note">— {{.}}</span>{{end}}</figcaption>
<svg width="{{n .W}}" height="{{n .H}}" viewBox="0 0 {{n .W}} {{n .H}}" role="img" aria-label="{{.Title}}" data-plot="{{n .Plot.X}} {{n .Plot.Y}} {{n .Plot.W}} {{n .Plot.H}}">
<rect class="plotbg" x="{{n .Plot.X}}" y="{{n .Plot.Y}}" width="{{n .Plot.W}}" height="{{n .Plot.H}}"/>
{{- $p := .Plot}}
{{- range .YTicks}}
<line class="grid" x1="{{n $p.X}}" y1="{{n .Pos}}" x2="{{n $p.Right}}" y2="{{n .Pos}}"/><text class="axis" x="{{n (add $p.X -6)}}" y="{{n (add .Pos 4)}}" text-anchor="end">{{.Label}}</text>
{{- end}}
{{- range .XTicks}}
<line class="tick" x1="{{n .Pos}}" y1="{{n $p.Bottom}}" x2="{{n .Pos}}" y2="{{n (add $p.Bottom 4)}}"/><text class="axis" x="{{n .Pos}}" y="{{n (add $p.Bottom 16)}}" text-anchor="middle">{{.Label}}</text>
{{- end}}
{{- with .YLabel}}<text class="axis" x="6" y="{{n (add $p.Y -2)}}">{{.}}</text>{{end}}
{{- with .XLabel}}<text class="axis" x="{{n $p.Right}}" y="{{n (add $p.Bottom 28)}}" text-anchor="end">{{.}}</text>{{end}}
{{- if .Empty}}<text class="empty" x="{{n (add $p.X 12)}}" y="{{n (add $p.Y 24)}}">{{.Empty}}</text>{{else}}
{{- range .Bands}}
<rect class="{{.Class}}" x="{{n .X}}" y="{{n .Y}}" width="{{n .W}}" height="{{n .H}}" data-key="{{.Key}}" data-value="{{.Value}}"><title>{{.Title}}</title></rect>{{if .Label}}<text class="phlabel" x="{{n .LX}}" y="{{n .LY}}" text-anchor="{{.Anchor}}">{{.Label}}</text>{{end}}
{{- end}}
{{- range .Bars}}
<rect class="{{.Class}}" x="{{n .X}}" y="{{n .Y}}" width="{{n .W}}" height="{{n .H}}" data-key="{{.Key}}" data-value="{{.Value}}"><title>{{.Title}}</title></rect>
{{- end}}
{{- range .Lines}}
<polyline class="{{.Class}}" points="{{.Points}}" data-key="{{.Key}}" data-value="{{.N}}">{{with .Title}}<title>{{.}}</title>{{end}}</polyline>
{{- end}}
{{- range .Rules}}
<line class="{{.Class}}" x1="{{n .X1}}" y1="{{n .Y1}}" x2="{{n .X2}}" y2="{{n .Y2}}" data-key="{{.Key}}" data-value="{{.Value}}">{{with .Title}}<title>{{.}}</title>{{end}}</line>{{if .Label}}<text class="{{.Class}}" x="{{n .LX}}" y="{{n .LY}}" text-anchor="{{.Anchor}}">{{.Label}}</text>{{end}}
{{- end}}
{{- range .Dots}}
<circle class="{{.Class}}" cx="{{n .X}}" cy="{{n .Y}}" r="{{n .W}}" data-key="{{.Key}}" data-value="{{.Value}}"><title>{{.Title}}</title></circle>
{{- end}}
{{- end}}
{{- range .Labels}}
<text class="{{.Class}}" x="{{n .X}}" y="{{n .Y}}"{{with .Anchor}} text-anchor="{{.}}"{{end}}>{{.Text}}</text>
{{- end}}
</svg>
{{with .Legend}}<div class="legend">{{range .}}<span><i class="sw {{.Class}}"></i>{{.Text}}</span>{{end}}</div>{{end}}
</figure>
{{end}}`
