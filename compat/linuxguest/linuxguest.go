// Package linuxguest is what the compat suite's Linux test guest and its host side share:
// the guest's options as they travel on the kernel command line, the lines the guest prints
// on its serial console, the page pattern of its dirtied memory, the manifest of the files
// its initramfs holds (with their checksums), and a writer of the newc cpio archives the
// initramfs is made of. The guest's init program is in ./init; the host side (kernel,
// initramfs, launching and waiting) is compat/linuxguest.go.
package linuxguest

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Options are the guest's workload settings, passed as "qmg.*" kernel parameters (which the
// kernel ignores: a dotted name is a module parameter of a module that does not exist) and
// read by the init from /proc/cmdline.
type Options struct {
	// DirtyMiB > 0 makes the guest allocate that much anonymous memory, fill it with the page
	// pattern and then dirty it continuously, one page after another in passes over the
	// region, each visit checking the page before rewriting its header. 0: no workload.
	DirtyMiB int
	// RateMiBs is the dirtying rate in MiB/s of pages visited (each visit dirties one
	// 4 KiB page); 0 dirties as fast as the vCPU can.
	RateMiBs int
	// TickMs is the period of the TICK progress lines (default DefaultTickMs).
	TickMs int
	// VerifySec > 0 makes the guest checksum its files every VerifySec seconds (a FILES line
	// each time); 0 checks only when asked on the control port.
	VerifySec int
	// BodyEvery > 0 makes every BodyEvery-th visit of a page also check its whole body
	// (spread so that each pass checks 1/BodyEvery of the pages); 0 checks headers only.
	BodyEvery int
	// Seed varies the page pattern.
	Seed uint64
	// Control is the tty the guest reads commands from ("ttyS1"); "" for none.
	Control string
}

// DefaultTickMs is the TICK period when Options.TickMs is 0.
const DefaultTickMs = 1000

// Cmdline returns the options as kernel parameters.
func (o Options) Cmdline() string {
	p := []string{
		"qmg.dirty=" + strconv.Itoa(o.DirtyMiB),
		"qmg.rate=" + strconv.Itoa(o.RateMiBs),
		"qmg.tick=" + strconv.Itoa(o.TickMs),
		"qmg.verify=" + strconv.Itoa(o.VerifySec),
		"qmg.bodyevery=" + strconv.Itoa(o.BodyEvery),
		"qmg.seed=" + strconv.FormatUint(o.Seed, 10),
	}
	if o.Control != "" {
		p = append(p, "qmg.ctl="+o.Control)
	}
	return strings.Join(p, " ")
}

// Limits of the options: what a 32-bit page index and a sane test can use.
const (
	MaxDirtyMiB = 1 << 20 // 1 TiB
	MaxRateMiBs = 1 << 20
	MaxTickMs   = 3600_000
	MaxVerify   = 86400
)

// ParseCmdline reads the "qmg.*" parameters of a kernel command line (other parameters are
// ignored); unset ones keep their zero value, TickMs its default.
func ParseCmdline(cmdline string) (Options, error) {
	var o Options
	ints := map[string]struct {
		p   *int
		max int
	}{
		"qmg.dirty": {&o.DirtyMiB, MaxDirtyMiB}, "qmg.rate": {&o.RateMiBs, MaxRateMiBs},
		"qmg.tick": {&o.TickMs, MaxTickMs}, "qmg.verify": {&o.VerifySec, MaxVerify},
		"qmg.bodyevery": {&o.BodyEvery, 1 << 30},
	}
	for _, f := range strings.Fields(cmdline) {
		k, v, _ := strings.Cut(f, "=")
		if !strings.HasPrefix(k, "qmg.") {
			continue
		}
		switch k {
		case "qmg.seed":
			s, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return o, fmt.Errorf("kernel parameter %s: %v", f, err)
			}
			o.Seed = s
		case "qmg.ctl":
			if v == "" || strings.ContainsAny(v, "/.") {
				return o, fmt.Errorf("kernel parameter %s: want a tty name like ttyS1", f)
			}
			o.Control = v
		default:
			d, ok := ints[k]
			if !ok {
				return o, fmt.Errorf("unknown kernel parameter %s", f)
			}
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > d.max {
				return o, fmt.Errorf("kernel parameter %s: want an integer in [0, %d]", f, d.max)
			}
			*d.p = n
		}
	}
	if o.TickMs == 0 {
		o.TickMs = DefaultTickMs
	}
	return o, nil
}

// Serial lines. The guest prints every report as one line "QMG KIND key=value …" on its
// console (COM1), written with a single write so that lines stay whole.
const (
	LinePrefix = "QMG "
	// KindBoot: init started (uptime, kernel release).
	KindBoot = "BOOT"
	// KindReady: files counted, dirty region filled, workload about to start (the guest's
	// memory is in its steady state from here on).
	KindReady = "READY"
	// KindLayout: a summary of physical memory by use, one line per region of guest RAM.
	KindLayout = "LAYOUT"
	// KindTick: periodic progress (seq, uptime, pages dirtied, passes, rate, bad pages).
	KindTick = "TICK"
	// KindCorrupt: a dirtied page did not hold what the guest last wrote into it.
	KindCorrupt = "CORRUPT"
	// KindFiles: a checksum run over the initramfs files; the first word is OK or BAD.
	KindFiles = "FILES"
	// KindRate: the control port changed the dirtying rate.
	KindRate = "RATE"
	// KindInjected: a fault the control port asked for was made (what=stale|spoil), so that
	// a test can see the guest's own checks catch it.
	KindInjected = "INJECTED"
	// KindControl: a line on the control port that is not a command (word BAD).
	KindControl = "CTL"
	// KindError: init failed; it powers the guest off after printing this.
	KindError = "ERROR"
)

// Line is one parsed guest line.
type Line struct {
	Kind   string            // KindReady, …
	Word   string            // the first value-less word after the kind ("OK", "BAD"), if any
	Fields map[string]string // key=value pairs
	Text   string            // the whole line
}

// Int returns field k as an integer, and whether it was there and numeric.
func (l Line) Int(k string) (int64, bool) {
	v, ok := l.Fields[k]
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(v, 0, 64)
	return n, err == nil
}

// Float returns field k as a float, and whether it was there and numeric.
func (l Line) Float(k string) (float64, bool) {
	v, ok := l.Fields[k]
	if !ok {
		return 0, false
	}
	f, err := strconv.ParseFloat(v, 64)
	return f, err == nil
}

// MaxLineLen caps the lines ParseLine accepts: longer ones are not the guest's.
const MaxLineLen = 4096

// ParseLine parses one line of serial output; ok is false for anything that is not a
// guest report (kernel messages, partial lines, garbage).
func ParseLine(s string) (l Line, ok bool) {
	s = strings.TrimRight(s, "\r\n")
	i := strings.Index(s, LinePrefix)
	if i < 0 || len(s) > MaxLineLen {
		return l, false
	}
	s = s[i:] // a kernel message may have been printed in front of it
	words := strings.Fields(s[len(LinePrefix):])
	if len(words) == 0 {
		return l, false
	}
	l = Line{Kind: words[0], Fields: map[string]string{}, Text: s}
	for j, w := range words[1:] {
		k, v, found := strings.Cut(w, "=")
		if !found {
			if j == 0 {
				l.Word = w
			}
			continue
		}
		if k != "" {
			l.Fields[k] = v
		}
	}
	return l, true
}

// ParseLines returns the guest reports among serial output, in order.
func ParseLines(out string) []Line {
	var ls []Line
	for _, s := range strings.Split(out, "\n") {
		if l, ok := ParseLine(s); ok {
			ls = append(ls, l)
		}
	}
	return ls
}

// The dirtied region: PageSize pages of 64-bit little-endian words. Word 0 identifies the
// page (PageMagic ^ index), word 1 holds the generation (the pass that last wrote it), word
// 2 the check word of (index, generation), and words 3.. the body, written once.
const (
	PageSize     = 4096
	PageWords    = PageSize / 8
	PageMagic    = 0x514d47506167652e // "QMGPage."
	WordID       = 0
	WordGen      = 1
	WordCheck    = 2
	FirstBody    = 3
	golden       = 0x9e3779b97f4a7c15
	checkSalt    = 0x6a09e667f3bcc908
	bodySaltSeed = 0xbb67ae8584caa73b
)

// mix64 is SplitMix64's finalizer: a bijective scramble of a 64-bit word.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// CheckWord is word 2 of page index at generation gen.
func CheckWord(seed, index, gen uint64) uint64 {
	return mix64(seed ^ checkSalt ^ index*golden ^ gen<<32 ^ gen)
}

// BodyBase is the value body word j of page index is built from: word j holds
// BodyBase + j*golden, a sequence without repeated bytes that stands in for
// incompressible data.
func BodyBase(seed, index uint64) uint64 { return mix64(seed ^ bodySaltSeed ^ index) }

// FillPage writes page index at generation gen into p (PageWords words).
func FillPage(p []uint64, seed, index, gen uint64) {
	p = p[:PageWords]
	p[WordID] = PageMagic ^ index
	p[WordGen] = gen
	p[WordCheck] = CheckWord(seed, index, gen)
	b := BodyBase(seed, index)
	for j := FirstBody; j < PageWords; j++ {
		p[j] = b + uint64(j)*golden
	}
}

// ErrPage is returned by CheckPage for a page that is not what it should be.
var ErrPage = errors.New("page does not hold its pattern")

// CheckPage verifies page index expected at generation gen; body also checks the body. The
// error names the first wrong word with what it holds and what it should.
func CheckPage(p []uint64, seed, index, gen uint64, body bool) error {
	p = p[:PageWords]
	if w := PageMagic ^ index; p[WordID] != w {
		return fmt.Errorf("%w: word %d is %#x, want %#x (id)", ErrPage, WordID, p[WordID], w)
	}
	if p[WordGen] != gen {
		return fmt.Errorf("%w: word %d is %#x, want %#x (generation)", ErrPage, WordGen, p[WordGen], gen)
	}
	if w := CheckWord(seed, index, gen); p[WordCheck] != w {
		return fmt.Errorf("%w: word %d is %#x, want %#x (check)", ErrPage, WordCheck, p[WordCheck], w)
	}
	if body {
		b := BodyBase(seed, index)
		for j := FirstBody; j < PageWords; j++ {
			if w := b + uint64(j)*golden; p[j] != w {
				return fmt.Errorf("%w: word %d is %#x, want %#x (body)", ErrPage, j, p[j], w)
			}
		}
	}
	return nil
}
