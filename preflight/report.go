package preflight

import (
	"fmt"
	"io"
	"strings"
)

// Severity says how bad a check's finding is.
type Severity string

// The severities, from harmless to fatal. Only SeverityError makes a Report not OK.
const (
	SeverityOK      Severity = "ok"
	SeverityInfo    Severity = "info"
	SeverityWarning Severity = "warning"
	SeverityError   Severity = "error"
)

func (s Severity) String() string { return string(s) }

// Check is one finding. Name is a stable id: "machine", "version", "ramblocks", "devices",
// "capabilities", "uuid", "memory-backends", "status", "emulator", "machine-supported",
// "memory-backing", "memory-size", "accelerator".
type Check struct {
	Name        string   `json:"check"`
	Severity    Severity `json:"severity"`
	Message     string   `json:"message"` // one line; for errors it says what to do
	Source      string   `json:"source,omitempty"`
	Destination string   `json:"destination,omitempty"`
}

// Report is the result of a preflight: what was compared and every check. Its JSON form is the
// stable `preflight --json` schema (schema.json beside this file).
type Report struct {
	Source      string  `json:"source"`
	Destination string  `json:"destination"`
	Checks      []Check `json:"checks"`
	OK          bool    `json:"ok"` // no check has severity error
}

// Problems returns the checks with severity error.
func (r Report) Problems() []Check {
	var p []Check
	for _, c := range r.Checks {
		if c.Severity == SeverityError {
			p = append(p, c)
		}
	}
	return p
}

// finish sets OK from the checks.
func (r *Report) finish() {
	r.OK = len(r.Problems()) == 0
}

// Err returns nil when the report is OK, else an error naming the failing checks (for callers
// that just want to stop).
func (r Report) Err() error {
	p := r.Problems()
	if len(p) == 0 {
		return nil
	}
	parts := make([]string, len(p))
	for i, c := range p {
		parts[i] = c.Name + ": " + oneLine(c.Message)
	}
	return fmt.Errorf("preflight: %d problem(s): %s", len(p), strings.Join(parts, "; "))
}

// WriteText writes the report for a human: what was compared, one aligned line per check and a
// verdict, e.g.
//
//	source:      QEMU 7.2.22, pc-q35-7.2
//	destination: QEMU 10.0.2, pc-q35-7.2
//	ok     machine   pc-q35-7.2 on both sides
//	error  version   destination QEMU 7.2.22 is older than source 10.0.2: …
//	preflight: 1 problem(s): migration would fail
func (r Report) WriteText(w io.Writer) error {
	var b strings.Builder
	if r.Source != "" {
		fmt.Fprintf(&b, "source:      %s\n", oneLine(r.Source))
	}
	if r.Destination != "" {
		fmt.Fprintf(&b, "destination: %s\n", oneLine(r.Destination))
	}
	sevW, nameW := 0, 0
	for _, c := range r.Checks {
		sevW = max(sevW, len(c.Severity))
		nameW = max(nameW, len(c.Name))
	}
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "%-*s  %-*s  %s\n", sevW, c.Severity, nameW, c.Name, oneLine(c.Message))
	}
	if n := len(r.Problems()); n == 0 {
		b.WriteString("preflight: migration can work\n")
	} else {
		fmt.Fprintf(&b, "preflight: %d problem(s): migration would fail\n", n)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// oneLine folds s onto one line (messages may quote QEMU's multi-line output).
func oneLine(s string) string {
	if !strings.ContainsAny(s, "\r\n\t") {
		return s
	}
	return strings.Join(strings.Fields(s), " ")
}

// listSome joins up to n items and says how many more there are.
func listSome(items []string, n int) string {
	if len(items) <= n {
		return strings.Join(items, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(items[:n], ", "), len(items)-n)
}

// sizeString formats a byte count the way QEMU does (binary units, exact when possible).
func sizeString(b uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	i := 0
	v := b
	for v >= 1024 && v%1024 == 0 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 && b >= 1024 {
		// Not a multiple of 1 KiB: show it with a fraction.
		f := float64(b)
		for f >= 1024 && i < len(units)-1 {
			f /= 1024
			i++
		}
		return fmt.Sprintf("%.3g %s", f, units[i])
	}
	return fmt.Sprintf("%d %s", v, units[i])
}
