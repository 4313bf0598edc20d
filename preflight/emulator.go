package preflight

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Emulator is what a QEMU binary says about itself: version, machine types, memory backends.
type Emulator struct {
	Path    string `json:"path"`
	Version string `json:"version"` // "10.0.2"
	Major   int    `json:"major"`
	Minor   int    `json:"minor"`
	// Machines are the names -machine accepts: every type and every alias, sorted.
	Machines []string `json:"machines"`
	// Aliases maps an alias to the type it stands for ("q35" → "pc-q35-10.0").
	Aliases map[string]string `json:"aliases,omitempty"`
	// Deprecated lists the machine types the emulator marks deprecated.
	Deprecated []string `json:"deprecated,omitempty"`
	Default    string   `json:"default,omitempty"` // the type used without -machine
	MemFD      bool     `json:"memfd"`             // has memory-backend-memfd
}

// Knows reports whether -machine m is accepted, and the exact type it gives (m itself, or what
// the alias m stands for).
func (e *Emulator) Knows(m string) (exact string, ok bool) {
	if t, ok := e.Aliases[m]; ok {
		return t, true
	}
	// Machines is sorted (setMachines): a -machine help of 1 MiB lists tens of thousands.
	if i := sort.SearchStrings(e.Machines, m); i < len(e.Machines) && e.Machines[i] == m {
		return m, true
	}
	return "", false
}

// IsDeprecated reports whether the emulator marks machine type m deprecated.
func (e *Emulator) IsDeprecated(m string) bool {
	for _, d := range e.Deprecated {
		if d == m {
			return true
		}
	}
	return false
}

// Describe is the one-line summary used in reports: "QEMU 10.0.2 (/usr/bin/qemu-system-x86_64)".
func (e *Emulator) Describe() string {
	return fmt.Sprintf("QEMU %s (%s)", e.Version, e.Path)
}

const (
	maxProbeOutput = 1 << 20                // bytes kept of each command's output
	probeWaitDelay = 500 * time.Millisecond // how long a child may keep stdout open after exit
)

// ProbeEmulator runs `PATH --version`, `PATH -machine help` and `PATH -object help` (with no
// stdin, output capped, each bounded by ctx: the process group is killed when ctx ends and no
// grandchild holding stdout can make it wait longer than a moment) and reads what they print.
// path must be absolute, as libvirt's <emulator> is.
func ProbeEmulator(ctx context.Context, path string) (Emulator, error) {
	e := Emulator{Path: path}
	if !filepath.IsAbs(path) {
		return e, fmt.Errorf("emulator %q: not an absolute path", path)
	}
	if err := executable(path); err != nil {
		return e, err
	}
	out, err := runProbe(ctx, path, "--version")
	if err != nil {
		return e, err
	}
	if e.Version, e.Major, e.Minor, err = ParseVersionOutput(out); err != nil {
		return e, fmt.Errorf("emulator %s: %w", path, err)
	}
	if out, err = runProbe(ctx, path, "-machine", "help"); err != nil {
		return e, err
	}
	ms, err := ParseMachineHelp(out)
	if err != nil {
		return e, fmt.Errorf("emulator %s: %w", path, err)
	}
	e.setMachines(ms)
	if out, err = runProbe(ctx, path, "-object", "help"); err != nil {
		return e, err
	}
	e.MemFD = hasObject(out, "memory-backend-memfd")
	return e, nil
}

// executable checks that path is a regular file someone may execute.
func executable(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("emulator %s does not exist", path)
		}
		return fmt.Errorf("emulator %s: %w", path, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("emulator %s is not a regular file", path)
	}
	if st.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("emulator %s is not executable", path)
	}
	return nil
}

// runProbe runs one probe command and returns its stdout.
func runProbe(ctx context.Context, path string, args ...string) (string, error) {
	what := path + " " + strings.Join(args, " ")
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("%s: %w", what, err)
	}
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Stdin = nil // /dev/null
	var stdout, stderr cappedBuffer
	stdout.max, stderr.max = maxProbeOutput, 4096
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Env = []string{"LC_ALL=C", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error {
		// The whole group: QEMU does not fork here, but a wrapper script might.
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	cmd.WaitDelay = probeWaitDelay
	err := cmd.Run()
	if errors.Is(err, exec.ErrWaitDelay) {
		// QEMU exited but something it started still held stdout: end that too. Its group
		// still has a member, so the group id cannot have been reused.
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return "", fmt.Errorf("%s: %w", what, ctxErr)
	}
	if err != nil && !errors.Is(err, exec.ErrWaitDelay) {
		msg := strings.TrimSpace(stderr.String())
		if msg != "" {
			return "", fmt.Errorf("%s: %v: %s", what, err, clip(oneLine(msg), 200))
		}
		return "", fmt.Errorf("%s: %w", what, err)
	}
	return stdout.String(), nil
}

// cappedBuffer keeps the first max bytes written and discards (but accepts) the rest, so the
// child never blocks on a full pipe.
type cappedBuffer struct {
	b   bytes.Buffer
	max int
}

func (c *cappedBuffer) Write(p []byte) (int, error) {
	if room := c.max - c.b.Len(); room > 0 {
		c.b.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (c *cappedBuffer) String() string { return c.b.String() }

var emulatorVersionRE = regexp.MustCompile(`version (\d+)\.(\d+)(?:\.(\d+))?`)

// ParseVersionOutput reads `qemu-system-x86_64 --version`:
// "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)".
func ParseVersionOutput(out string) (version string, major, minor int, err error) {
	first, _, _ := strings.Cut(out, "\n")
	m := emulatorVersionRE.FindStringSubmatch(first)
	if m == nil {
		return "", 0, 0, fmt.Errorf("--version printed %q, not a QEMU version", clip(strings.TrimSpace(first), 100))
	}
	major, err1 := strconv.Atoi(m[1])
	minor, err2 := strconv.Atoi(m[2])
	if err1 != nil || err2 != nil {
		return "", 0, 0, fmt.Errorf("--version: bad number in %q", clip(first, 100))
	}
	version = m[1] + "." + m[2]
	if m[3] != "" {
		version += "." + m[3]
	}
	return version, major, minor, nil
}

// MachineInfo is one line of `-machine help`.
type MachineInfo struct {
	Name       string `json:"name"`
	AliasOf    string `json:"alias_of,omitempty"` // set on alias lines: "q35 … (alias of pc-q35-7.2)"
	Default    bool   `json:"default,omitempty"`
	Deprecated bool   `json:"deprecated,omitempty"`
}

var aliasOfRE = regexp.MustCompile(`\(alias of ([^\s()]+)\)`)

// ParseMachineHelp reads `-machine help`: "Supported machines are:" then one line per name,
// `NAME  DESCRIPTION [(alias of TYPE)] [(default)] [(deprecated)]`.
func ParseMachineHelp(out string) ([]MachineInfo, error) {
	if len(out) > maxProbeOutput {
		return nil, fmt.Errorf("-machine help: output too large")
	}
	var ms []MachineInfo
	started := false
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "Supported machines are") {
			started = true
			continue
		}
		if !started || strings.TrimSpace(line) == "" || line[0] == ' ' || line[0] == '\t' {
			continue
		}
		f := strings.Fields(line)
		mi := MachineInfo{Name: f[0]}
		if m := aliasOfRE.FindStringSubmatch(line); m != nil {
			mi.AliasOf = m[1]
		}
		mi.Default = strings.Contains(line, "(default)")
		mi.Deprecated = strings.Contains(line, "(deprecated)")
		ms = append(ms, mi)
	}
	if !started {
		return nil, fmt.Errorf("-machine help printed no \"Supported machines are:\" list: %q", clip(strings.TrimSpace(out), 100))
	}
	if len(ms) == 0 {
		return nil, fmt.Errorf("-machine help listed no machine")
	}
	return ms, nil
}

func (e *Emulator) setMachines(ms []MachineInfo) {
	e.Aliases = map[string]string{}
	seen := map[string]bool{}
	add := func(n string) {
		if !seen[n] {
			seen[n] = true
			e.Machines = append(e.Machines, n)
		}
	}
	for _, m := range ms {
		add(m.Name)
		if m.AliasOf != "" {
			e.Aliases[m.Name] = m.AliasOf
			add(m.AliasOf)
		}
		if m.Default {
			e.Default = m.Name
		}
		if m.Deprecated {
			e.Deprecated = append(e.Deprecated, m.Name)
		}
	}
	sort.Strings(e.Machines)
}

// hasObject reports whether `-object help` lists type name (one indented name per line).
func hasObject(out, name string) bool {
	for _, line := range strings.Split(out, "\n") {
		if strings.TrimSpace(line) == name {
			return true
		}
	}
	return false
}
