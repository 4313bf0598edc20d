package compat

import (
	"bytes"
	"context"

	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// VMConfig describes one QEMU process of a scenario: a source, or a destination with Incoming.
type VMConfig struct {
	Name      string   // label used in file names and messages ("src", "dst")
	QEMU      QEMU     // which emulator
	Machine   string   // machine type; default "q35" (use MachineFor across versions)
	Accel     string   // "tcg" (default) or "kvm"
	MemMiB    int      // guest RAM; default 128
	Disk      []byte   // boot sector image (GuestDirty, GuestFill); nil boots nothing
	Incoming  string   // -incoming URI ("tcp:127.0.0.1:PORT", "defer", …); "" for a source
	Paused    bool     // -S: do not start the vCPUs (a destination then stays paused after loading)
	SharedMem string   // "" (anonymous RAM), "file" (memory-backend-file,share=on) or "memfd"
	MemPath   string   // backing file for SharedMem "file"; default <dir>/ram
	UUID      string   // -uuid
	Extra     []string // further arguments
	// Netns runs QEMU inside that network namespace (a NetHost's Name) through
	// `ip netns exec`, which execs QEMU: the PID stays QEMU's own. Its QMP and serial files
	// are paths, which every namespace shares.
	Netns string
}

// VM is a running QEMU with its QMP client, serial log and stderr.
type VM struct {
	Config     VMConfig
	Dir        string // private folder: QMP socket, serial log, disk, RAM file
	QMPPath    string // the suite's own monitor (VM.QMP is connected to it)
	SidecarQMP string // a second, free monitor socket for the sidecar under test
	SerialPath string
	QMP        *qmp.Client
	PID        int

	cmd      *exec.Cmd
	stderr   lockedBuffer
	exited   chan struct{}
	exitErr  error
	killOnce sync.Once
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() < 1<<20 {
		l.b.Write(p)
	}
	return len(p), nil
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Args returns the QEMU command line (without the binary) for cfg with its files in dir.
func (cfg VMConfig) Args(dir string) []string {
	machine := cfg.Machine
	if machine == "" {
		machine = "q35"
	}
	accel := cfg.Accel
	if accel == "" {
		accel = "tcg"
	}
	mem := cfg.MemMiB
	if mem == 0 {
		mem = 128
	}
	args := append([]string{}, cfg.QEMU.Args...)
	machineOpt := machine
	switch cfg.SharedMem {
	case "file":
		path := cfg.MemPath
		if path == "" {
			path = filepath.Join(dir, "ram")
		}
		args = append(args, "-object", fmt.Sprintf("memory-backend-file,id=ram0,size=%dM,mem-path=%s,share=on", mem, path))
		machineOpt += ",memory-backend=ram0"
	case "memfd":
		args = append(args, "-object", fmt.Sprintf("memory-backend-memfd,id=ram0,size=%dM,share=on", mem))
		machineOpt += ",memory-backend=ram0"
	}
	args = append(args,
		"-machine", machineOpt, "-accel", accel, "-m", strconv.Itoa(mem),
		"-nodefaults", "-display", "none", "-no-user-config",
		"-qmp", "unix:"+filepath.Join(dir, "qmp.sock")+",server=on,wait=off",
		// A second monitor for the sidecar (or any other client): QEMU serves one client per socket.
		"-qmp", "unix:"+filepath.Join(dir, "sidecar.sock")+",server=on,wait=off",
		"-serial", "file:"+filepath.Join(dir, "serial.log"))
	if cfg.Disk != nil {
		// virtio-blk with a 1/1/1 geometry: QEMU 10.0's AHCI stalls ~30 s with Debian's SeaBIOS.
		args = append(args,
			"-drive", "file="+filepath.Join(dir, "disk.img")+",format=raw,if=none,id=disk0",
			"-device", "virtio-blk-pci,drive=disk0,cyls=1,heads=1,secs=1")
	}
	if cfg.UUID != "" {
		args = append(args, "-uuid", cfg.UUID)
	}
	if cfg.Paused {
		args = append(args, "-S")
	}
	if cfg.Incoming != "" {
		args = append(args, "-incoming", cfg.Incoming)
	}
	return append(args, cfg.Extra...)
}

// CommandLine returns the full command line as a shell-readable string (for logs and testdata).
func (vm *VM) CommandLine() string {
	return strings.Join(vm.Config.argv(vm.Dir), " ")
}

// argv is the whole command: QEMU and its arguments, behind `ip netns exec NAME` with Netns.
func (cfg VMConfig) argv(dir string) []string {
	argv := append([]string{cfg.QEMU.Binary}, cfg.Args(dir)...)
	if cfg.Netns != "" {
		argv = append([]string{"ip", "netns", "exec", cfg.Netns}, argv...)
	}
	return argv
}

// Launch starts QEMU with its files in dir and connects to its QMP socket before ctx ends.
// The process gets SIGKILL if the calling process dies (Pdeathsig, which `ip netns exec`'s exec
// keeps), so no QEMU outlives a test.
func Launch(ctx context.Context, dir string, cfg VMConfig) (*VM, error) {
	if cfg.Name == "" {
		cfg.Name = "vm"
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if cfg.Disk != nil {
		if err := os.WriteFile(filepath.Join(dir, "disk.img"), cfg.Disk, 0o600); err != nil {
			return nil, err
		}
	}
	vm := &VM{Config: cfg, Dir: dir, QMPPath: filepath.Join(dir, "qmp.sock"), SidecarQMP: filepath.Join(dir, "sidecar.sock"),
		SerialPath: filepath.Join(dir, "serial.log"), exited: make(chan struct{})}
	argv := cfg.argv(dir)
	vm.cmd = exec.Command(argv[0], argv[1:]...)
	vm.cmd.Stdout = &vm.stderr
	vm.cmd.Stderr = &vm.stderr
	vm.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := vm.cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: start %s: %w", cfg.Name, cfg.QEMU.Binary, err)
	}
	vm.PID = vm.cmd.Process.Pid
	go func() {
		vm.exitErr = vm.cmd.Wait()
		close(vm.exited)
	}()
	for {
		c, err := qmp.DialUnix(ctx, vm.QMPPath)
		if err == nil {
			vm.QMP = c
			return vm, nil
		}
		select {
		case <-vm.exited:
			return nil, fmt.Errorf("%s: QEMU exited at start (%v): %s", cfg.Name, vm.exitErr, lastLine(vm.stderr.String()))
		case <-ctx.Done():
			vm.Kill()
			return nil, fmt.Errorf("%s: QMP socket not ready: %w", cfg.Name, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// StartVM launches a VM for a test in a fresh temporary folder and kills it when the test ends.
func StartVM(t testing.TB, cfg VMConfig) *VM {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	vm, err := Launch(ctx, t.TempDir(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(vm.Kill)
	return vm
}

// Kill closes QMP and kills the process by its own PID, waiting (bounded) for it to be reaped.
func (vm *VM) Kill() {
	vm.killOnce.Do(func() {
		if vm.QMP != nil {
			vm.QMP.Close()
		}
		select {
		case <-vm.exited:
			return
		default:
		}
		vm.cmd.Process.Signal(syscall.SIGCONT) // a SIGSTOPped QEMU must still die
		vm.cmd.Process.Kill()
		select {
		case <-vm.exited:
		case <-time.After(10 * time.Second):
		}
	})
}

// Exited is closed when the QEMU process has ended.
func (vm *VM) Exited() <-chan struct{} { return vm.exited }

// ExitErr is the process's exit status once Exited is closed.
func (vm *VM) ExitErr() error { return vm.exitErr }

// Stderr returns what QEMU wrote to stdout and stderr so far (first MiB).
func (vm *VM) Stderr() string { return vm.stderr.String() }

// Serial returns the guest's COM1 output so far.
func (vm *VM) Serial() string {
	b, _ := os.ReadFile(vm.SerialPath)
	return string(b)
}

// WaitSerial waits until the serial output satisfies ok (polled every 20 ms) or ctx ends.
func (vm *VM) WaitSerial(ctx context.Context, what string, ok func(string) bool) error {
	for {
		if ok(vm.Serial()) {
			return nil
		}
		select {
		case <-ctx.Done():
			out := vm.Serial()
			if len(out) > 80 {
				out = "…" + out[len(out)-80:]
			}
			return fmt.Errorf("%s: serial never showed %s (have %q): %w", vm.Config.Name, what, out, ctx.Err())
		case <-vm.exited:
			return fmt.Errorf("%s: QEMU exited (%v) waiting for %s: %s", vm.Config.Name, vm.exitErr, what, lastLine(vm.Stderr()))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// WaitMoreSerial waits until the guest has printed n more copies of b than it had at the call.
func (vm *VM) WaitMoreSerial(ctx context.Context, b byte, n int) error {
	start := strings.Count(vm.Serial(), string(b))
	return vm.WaitSerial(ctx, fmt.Sprintf("%d more %q", n, b), func(s string) bool {
		return strings.Count(s, string(b)) >= start+n
	})
}

// WaitStatus waits until query-status reports one of the given run states.
func (vm *VM) WaitStatus(ctx context.Context, states ...string) (string, error) {
	for {
		st, err := vm.QMP.QueryStatus(ctx)
		if err != nil {
			return "", fmt.Errorf("%s: %w", vm.Config.Name, err)
		}
		for _, s := range states {
			if st.Status == s {
				return s, nil
			}
		}
		select {
		case <-ctx.Done():
			return st.Status, fmt.Errorf("%s: status %q, want %v: %w", vm.Config.Name, st.Status, states, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// DumpRAM writes the guest's RAM from physical address 0 (the low RAM below the PCI hole: the
// whole RAM for the ≤ 2 GiB guests of the suite) to path with pmemsave and returns its size.
func (vm *VM) DumpRAM(ctx context.Context, path string) (int64, error) {
	mem := int64(vm.Config.MemMiB)
	if mem == 0 {
		mem = 128
	}
	size := mem << 20
	if size > 2<<30 {
		size = 2 << 30
	}
	if err := vm.QMP.PMemSave(ctx, 0, size, path); err != nil {
		return 0, fmt.Errorf("%s: %w", vm.Config.Name, err)
	}
	return size, nil
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if s == "" {
		return "(no output)"
	}
	return s
}
