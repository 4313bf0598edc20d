package report

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// The charts are plain SVG built here and written by html/template (page.go): no script, no
// font and no image is fetched, and every drawn figure carries its value in data-key/data-value
// attributes, which the tests read back.

// Chart is one SVG figure: a plot area with axes, and the marks drawn in it.
type Chart struct {
	Key    string // data-chart: what the figure shows ("timeline", "rates", …)
	Title  string
	Note   string // one line under the title: what is drawn and where it comes from
	W, H   float64
	Plot   Rect // the plot area inside the SVG
	XTicks []Tick
	YTicks []Tick
	XLabel string
	YLabel string
	Bands  []Mark
	Bars   []Mark
	Lines  []Line
	Dots   []Mark
	Rules  []Rule
	Labels []Label
	Legend []Legend
	// Empty, when set, is drawn instead of marks: why the figure has nothing to show.
	Empty string
}

// Rect is an area in SVG user units.
type Rect struct{ X, Y, W, H float64 }

// Right and Bottom are the far edges.
func (r Rect) Right() float64  { return r.X + r.W }
func (r Rect) Bottom() float64 { return r.Y + r.H }

// Tick is one labelled position on an axis.
type Tick struct {
	Pos   float64
	Label string
}

// Mark is a rectangle (band, bar) or a dot (X, Y centre, W radius).
type Mark struct {
	X, Y, W, H float64
	Class      string
	Title      string // the tooltip
	Key, Value string // data-key, data-value
	Label      string // drawn inside or beside the mark
	LX, LY     float64
	Anchor     string
}

// Line is a polyline.
type Line struct {
	Class  string
	Points string
	Title  string
	Key    string // data-key
	N      int    // points drawn (data-value)
}

// Rule is a straight line across the plot (a budget, a decision) with its label.
type Rule struct {
	X1, Y1, X2, Y2 float64
	Class          string
	Title          string
	Key, Value     string
	Label          string
	LX, LY         float64
	Anchor         string
}

// Label is free text in the figure.
type Label struct {
	X, Y   float64
	Text   string
	Class  string
	Anchor string
}

// Legend is one entry of a figure's legend.
type Legend struct {
	Class string // the swatch's class
	Text  string
}

// linear maps [d0, d1] onto [r0, r1].
type linear struct{ d0, d1, r0, r1 float64 }

func (s linear) at(v float64) float64 {
	if s.d1 == s.d0 {
		return s.r0
	}
	return s.r0 + (v-s.d0)/(s.d1-s.d0)*(s.r1-s.r0)
}

// logScale maps [d0, d1] (both > 0) onto [r0, r1] logarithmically; values below d0 sit at r0.
type logScale struct{ d0, d1, r0, r1 float64 }

func (s logScale) at(v float64) float64 {
	if v < s.d0 {
		v = s.d0
	}
	if s.d1 <= s.d0 {
		return s.r0
	}
	return s.r0 + (math.Log(v)-math.Log(s.d0))/(math.Log(s.d1)-math.Log(s.d0))*(s.r1-s.r0)
}

// niceStep is the tick step of 1, 2 or 5 × 10^k that cuts [0, max] into about n steps.
func niceStep(max float64, n int) float64 {
	if max <= 0 || math.IsNaN(max) || math.IsInf(max, 0) {
		return 1
	}
	raw := max / float64(n)
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if raw <= m*mag {
			return m * mag
		}
	}
	return 10 * mag
}

// niceMax rounds max up to a whole number of steps, with the step.
func niceMax(max float64, n int) (float64, float64) {
	step := niceStep(max, n)
	top := math.Ceil(max/step-1e-9) * step
	if top <= 0 {
		top = step
	}
	return top, step
}

// timeAxis picks the time ticks for [0, end].
func timeAxis(end time.Duration, n int) (top float64, ticks []float64) {
	secs := end.Seconds()
	if secs <= 0 {
		secs = 1
	}
	steps := []float64{0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400}
	step := steps[len(steps)-1]
	for _, s := range steps {
		if secs/s <= float64(n) {
			step = s
			break
		}
	}
	for i := 0; float64(i)*step <= secs+step*1e-9; i++ {
		ticks = append(ticks, math.Round(float64(i)*step*1000)/1000)
	}
	return secs, ticks
}

// fmtSeconds labels a time tick.
func fmtSeconds(s float64) string {
	switch {
	case s == 0:
		return "0"
	case s < 60:
		return trimFloat(s, 3) + " s"
	case s < 3600:
		m, sec := int(s)/60, int(s)%60
		if sec == 0 {
			return fmt.Sprintf("%d min", m)
		}
		return fmt.Sprintf("%dm%02ds", m, sec)
	}
	h, m := int(s)/3600, int(s)%3600/60
	return fmt.Sprintf("%dh%02d", h, m)
}

// byteUnit picks the binary unit for values up to max.
func byteUnit(max float64) (float64, string) {
	switch {
	case max >= 1<<40:
		return 1 << 40, "TiB"
	case max >= 1<<30:
		return 1 << 30, "GiB"
	case max >= 1<<20:
		return 1 << 20, "MiB"
	case max >= 1<<10:
		return 1 << 10, "KiB"
	}
	return 1, "B"
}

// fmtBytes writes a size for a person: "353.1 MiB", "18.5 KiB", "312 B".
func fmtBytes(v int64) string {
	u, name := byteUnit(math.Abs(float64(v)))
	if u == 1 {
		return fmt.Sprintf("%d B", v)
	}
	return trimFloat(float64(v)/u, 1) + " " + name
}

// fmtMs writes a duration given in milliseconds.
func fmtMs(ms int64) string {
	d := time.Duration(ms) * time.Millisecond
	switch {
	case ms < 1000 && ms > -1000:
		return fmt.Sprintf("%d ms", ms)
	case d < time.Minute:
		return trimFloat(d.Seconds(), 3) + " s"
	}
	return d.Round(time.Second).String()
}

// fmtDur writes an offset on the time axis.
func fmtDur(d time.Duration) string {
	if d < time.Minute {
		return trimFloat(d.Seconds(), 3) + " s"
	}
	return d.Round(100 * time.Millisecond).String()
}

func trimFloat(v float64, prec int) string {
	s := strconv.FormatFloat(v, 'f', prec, 64)
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

// fmtInt writes an integer with thin grouping: 1 234 567.
func fmtInt(v int64) string {
	s := strconv.FormatInt(v, 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteString("\u202f")
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// num formats an SVG coordinate.
func num(v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "0"
	}
	return strconv.FormatFloat(v, 'f', 1, 64)
}

// pt is one point of a polyline in SVG units.
type pt struct{ x, y float64 }

// points writes pts as an SVG points attribute, decimated to at most about 2 points per unit
// of width: within each column the first, lowest, highest and last points are kept, which
// keeps the envelope of a series of any length.
func points(pts []pt, width float64) (string, int) {
	cols := int(width)
	if cols < 1 {
		cols = 1
	}
	if len(pts) > 4*cols {
		pts = decimate(pts, cols)
	}
	var b strings.Builder
	for i, p := range pts {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(num(p.x))
		b.WriteByte(',')
		b.WriteString(num(p.y))
	}
	return b.String(), len(pts)
}

func decimate(pts []pt, cols int) []pt {
	x0, x1 := pts[0].x, pts[len(pts)-1].x
	if x1 <= x0 {
		return []pt{pts[0], pts[len(pts)-1]}
	}
	out := make([]pt, 0, 4*cols)
	col := func(p pt) int { return int((p.x - x0) / (x1 - x0) * float64(cols-1)) }
	for i := 0; i < len(pts); {
		c := col(pts[i])
		first, lo, hi, last := i, i, i, i
		for ; i < len(pts) && col(pts[i]) == c; i++ {
			if pts[i].y < pts[lo].y {
				lo = i
			}
			if pts[i].y > pts[hi].y {
				hi = i
			}
			last = i
		}
		keep := []int{first, lo, hi, last}
		// in index order, without repeats
		for a := 0; a < len(keep); a++ {
			for b := a + 1; b < len(keep); b++ {
				if keep[b] < keep[a] {
					keep[a], keep[b] = keep[b], keep[a]
				}
			}
		}
		prev := -1
		for _, k := range keep {
			if k != prev {
				out = append(out, pts[k])
				prev = k
			}
		}
	}
	return out
}

// multiples are 0, step, 2·step, … up to top, without the drift of repeated addition.
func multiples(top, step float64) []float64 {
	var out []float64
	for i := 0; float64(i)*step <= top+step*1e-9 && i <= 1000; i++ {
		out = append(out, float64(i)*step)
	}
	return out
}
