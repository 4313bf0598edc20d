package compat

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"time"
)

// QEMU is one installed QEMU system emulator the suite can run.
type QEMU struct {
	Version string   // "7.2" or "10.0": the series the suite asked for
	Full    string   // full version from --version, e.g. "7.2.22"
	Binary  string   // path of qemu-system-x86_64
	Args    []string // arguments every run needs (firmware search paths for the unpacked 10.0)
}

func (q QEMU) String() string { return "QEMU " + q.Full }

// Versions are the QEMU series the suite runs against.
var Versions = []string{"7.2", "10.0"}

// RepoRoot returns the repository's top folder (where go.mod is), found from this source file.
func RepoRoot() string {
	_, file, _, ok := runtime.Caller(0)
	if ok {
		return filepath.Dir(filepath.Dir(file))
	}
	wd, _ := os.Getwd()
	for d := wd; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
	}
	return wd
}

// CacheDir is where install-qemu.sh unpacks QEMU 10.0 ($QMG_CACHE, default <repo>/.cache).
func CacheDir() string {
	if d := os.Getenv("QMG_CACHE"); d != "" {
		return d
	}
	return filepath.Join(RepoRoot(), ".cache")
}

var (
	findMu    sync.Mutex
	findCache = map[string]QEMU{}
)

var versionRE = regexp.MustCompile(`version (\d+)\.(\d+)\.(\d+)`)

// FindQEMU locates the QEMU of the given series ("7.2" or "10.0") and checks its --version.
// The error is one line saying what is missing and how to install it.
func FindQEMU(series string) (QEMU, error) {
	findMu.Lock()
	defer findMu.Unlock()
	if q, ok := findCache[series]; ok {
		return q, nil
	}
	var q QEMU
	switch series {
	case "7.2":
		bin := os.Getenv("QMG_QEMU72")
		if bin == "" {
			var err error
			if bin, err = exec.LookPath("qemu-system-x86_64"); err != nil {
				return q, fmt.Errorf("QEMU 7.2 not found: qemu-system-x86_64 is not on PATH (run compat/install-qemu.sh)")
			}
		}
		q = QEMU{Version: series, Binary: bin}
	case "10.0":
		root := filepath.Join(CacheDir(), "qemu-10.0")
		q = QEMU{Version: series, Binary: filepath.Join(root, "usr/bin/qemu-system-x86_64"),
			Args: []string{"-L", filepath.Join(root, "usr/share/qemu"), "-L", "/usr/share/seabios"}}
		if _, err := os.Stat(q.Binary); err != nil {
			return q, fmt.Errorf("QEMU 10.0 not found at %s (run compat/install-qemu.sh)", q.Binary)
		}
	default:
		return q, fmt.Errorf("unknown QEMU series %q (want one of %s)", series, strings.Join(Versions, ", "))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, q.Binary, append(append([]string{}, q.Args...), "--version")...).Output()
	if err != nil {
		return q, fmt.Errorf("QEMU %s at %s does not run: %v (run compat/install-qemu.sh)", series, q.Binary, err)
	}
	m := versionRE.FindStringSubmatch(string(out))
	if m == nil || m[1]+"."+m[2] != series {
		return q, fmt.Errorf("%s is not QEMU %s: %q", q.Binary, series, strings.TrimSpace(string(out)))
	}
	q.Full = m[1] + "." + m[2] + "." + m[3]
	findCache[series] = q
	return q, nil
}

// MachineFor returns the machine type for a migration from src to dst: the versioned type both
// know when the series differ (stream-format.md §7), else the plain alias.
func MachineFor(src, dst QEMU) string {
	if src.Version != dst.Version {
		return "pc-q35-7.2"
	}
	return "q35"
}

// KVMUsable reports whether /dev/kvm can be opened. On this project's machines it is a
// paravirtual KVM that emulates 16/32-bit guest code, so scenarios run under TCG everywhere and
// under KVM only in addition.
func KVMUsable() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}
