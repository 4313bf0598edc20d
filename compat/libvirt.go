package compat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// LibvirtURI is the connection the libvirt scenarios use: the system libvirtd that
// install-libvirt.sh installs and configures.
const LibvirtURI = "qemu:///system"

// libvirtDomainPrefix names every domain the suite creates, so that leftovers of a killed run
// can be recognised and destroyed.
const libvirtDomainPrefix = "qmg-test-"

var libvirtd struct {
	once    sync.Once
	err     error
	cmd     *exec.Cmd  // nil when a libvirtd was already running
	log     *os.File   // the started daemon's stderr
	exited  chan error // receives Wait's result when the started daemon exits
	started bool       // this process started it (StopLibvirtd stops it)
	mu      sync.Mutex // guards seq
	seq     int        // domain name counter
}

// Virsh runs virsh on LibvirtURI with a deadline and returns its stdout; a failure carries
// virsh's stderr.
func Virsh(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "virsh", append([]string{"-q", "-c", LibvirtURI}, args...)...)
	cmd.WaitDelay = time.Second
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("virsh %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// RequireLibvirt makes sure a libvirtd answers on LibvirtURI, starting one (as a child of the
// test process, stopped by StopLibvirtd) when none runs. libvirtd must have been installed and
// configured by compat/install-libvirt.sh (`make setup`, which `make test` runs): the test fails
// with that instruction otherwise — it never skips.
func RequireLibvirt(t testing.TB) {
	t.Helper()
	libvirtd.once.Do(func() { libvirtd.err = startLibvirtd() })
	if libvirtd.err != nil {
		t.Fatalf("libvirt: %v", libvirtd.err)
	}
}

func startLibvirtd() error {
	for _, tool := range []string{"libvirtd", "virsh"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found: run compat/install-libvirt.sh (make setup) first", tool)
		}
	}
	if libvirtAnswers() {
		cleanLeftovers(false)
		return nil
	}
	log, err := os.CreateTemp("", "qmg-libvirtd-*.log")
	if err != nil {
		return err
	}
	cmd := exec.Command("libvirtd")
	cmd.Stdout, cmd.Stderr = log, log
	// The daemon dies with the test process; the QEMUs it started are its own daemons and are
	// destroyed by each test's clean-up (or, after a crash, by cleanLeftovers next time).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		log.Close()
		return fmt.Errorf("starting libvirtd: %w", err)
	}
	libvirtd.cmd, libvirtd.log, libvirtd.started = cmd, log, true
	libvirtd.exited = make(chan error, 1)
	go func() { libvirtd.exited <- cmd.Wait(); close(libvirtd.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for !libvirtAnswers() {
		select {
		case err := <-libvirtd.exited:
			b, _ := os.ReadFile(log.Name())
			return fmt.Errorf("libvirtd exited at start (%v): %s", err, lastLine(string(b)))
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			StopLibvirtd()
			return errors.New("libvirtd did not answer within 30 s")
		}
	}
	cleanLeftovers(false)
	return nil
}

func libvirtAnswers() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := Virsh(ctx, "version")
	return err == nil
}

// cleanLeftovers destroys the suite's domains that a killed earlier run left behind, and their
// logs; with all, this run's domains too (at the end).
func cleanLeftovers(all bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ours := fmt.Sprintf("%s%d-", libvirtDomainPrefix, os.Getpid())
	stale := func(name string) bool {
		return strings.HasPrefix(name, libvirtDomainPrefix) && (all || !strings.HasPrefix(name, ours))
	}
	if out, err := Virsh(ctx, "list", "--all", "--name"); err == nil {
		for _, name := range strings.Fields(out) {
			if stale(name) {
				Virsh(ctx, "destroy", name)
				Virsh(ctx, "undefine", name)
			}
		}
	}
	hooks, _ := filepath.Glob("/etc/libvirt/hooks/qemu.d/" + libvirtDomainPrefix + "*")
	for _, h := range hooks {
		if stale(filepath.Base(h) + "-") {
			os.Remove(h)
		}
	}
	logs, _ := filepath.Glob("/var/log/libvirt/qemu/" + libvirtDomainPrefix + "*.log")
	for _, l := range logs {
		if stale(strings.TrimSuffix(filepath.Base(l), ".log")) {
			os.Remove(l)
		}
	}
}

// OwnLibvirtd reports whether the libvirtd in use is the one the suite started: only that one
// may be killed or restarted (a host's own daemon manages VMs that are not the suite's).
func OwnLibvirtd() bool { return libvirtd.started }

// KillLibvirtd kills the libvirtd the suite started with SIGKILL, as a crash would (its QEMUs
// keep running), and returns once it is gone. RestartLibvirtd brings one back.
func KillLibvirtd() error {
	if !libvirtd.started {
		return errors.New("the running libvirtd was not started by the suite")
	}
	libvirtd.started = false
	libvirtd.cmd.Process.Kill()
	<-libvirtd.exited
	libvirtd.log.Close()
	os.Remove(libvirtd.log.Name())
	return nil
}

// RestartLibvirtd starts a libvirtd after KillLibvirtd (stopped by StopLibvirtd at the end); it
// reconnects to the QEMUs of the running domains, as after a service restart.
func RestartLibvirtd() error {
	return startLibvirtd()
}

// StopLibvirtd stops the libvirtd that RequireLibvirt started, if it started one (TestMain
// calls it once every test has run).
func StopLibvirtd() {
	if !libvirtd.started {
		return
	}
	libvirtd.started = false
	cleanLeftovers(true)
	libvirtd.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-libvirtd.exited:
	case <-time.After(10 * time.Second):
		libvirtd.cmd.Process.Kill()
		<-libvirtd.exited
	}
	libvirtd.log.Close()
	os.Remove(libvirtd.log.Name())
}

// DomainConfig is a libvirt domain of the suite: a TCG q35 guest booting a test guest from a
// virtio disk, its COM1 to a file — the libvirt form of VMConfig.
type DomainConfig struct {
	Machine  string // exact machine type; default pc-q35-7.2
	MemMiB   int    // default 128
	Disk     []byte // boot sector image (GuestDirty)
	Emulator string // default /usr/bin/qemu-system-x86_64 (Debian's QEMU 7.2)
	// ExtraQMP adds a QMP socket of the suite's own (<qemu:commandline>; libvirt then also
	// taints the domain custom-argv): the benchmark compares --qmp with --libvirt on one domain.
	ExtraQMP bool
}

// Domain is a running transient libvirt domain.
type Domain struct {
	Name       string
	Config     DomainConfig
	Dir        string // disk image and serial log
	DiskPath   string
	SerialPath string
	QMPPath    string // the ExtraQMP socket, if any
	UUID       string // the UUID libvirt gave it
	XML        string // the XML it was created from
}

// StartDomain creates (virsh create: transient) and starts a domain for the test and destroys
// it when the test ends.
func StartDomain(t testing.TB, cfg DomainConfig) *Domain {
	t.Helper()
	RequireLibvirt(t)
	if cfg.Machine == "" {
		cfg.Machine = "pc-q35-7.2"
	}
	if cfg.MemMiB == 0 {
		cfg.MemMiB = 128
	}
	if cfg.Emulator == "" {
		cfg.Emulator = "/usr/bin/qemu-system-x86_64"
	}
	libvirtd.mu.Lock()
	libvirtd.seq++
	name := fmt.Sprintf("%s%d-%d", libvirtDomainPrefix, os.Getpid(), libvirtd.seq)
	libvirtd.mu.Unlock()
	// libvirt's QEMU runs as root without an LSM here (install-libvirt.sh), but it must be able
	// to reach the folder: t.TempDir's parents are 0700 for root too, which is fine.
	dir := t.TempDir()
	d := &Domain{Name: name, Config: cfg, Dir: dir, DiskPath: filepath.Join(dir, "disk.img"),
		SerialPath: filepath.Join(dir, "serial.log")}
	if cfg.ExtraQMP {
		d.QMPPath = filepath.Join(dir, "qmp.sock")
	}
	if err := os.WriteFile(d.DiskPath, cfg.Disk, 0o600); err != nil {
		t.Fatal(err)
	}
	d.XML = d.domainXML()
	xmlPath := filepath.Join(dir, "domain.xml")
	if err := os.WriteFile(xmlPath, []byte(d.XML), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := Virsh(ctx, "create", xmlPath); err != nil {
		t.Fatal(err)
	}
	uuid, err := Virsh(ctx, "domuuid", name)
	if err != nil {
		t.Fatal(err)
	}
	d.UUID = strings.TrimSpace(uuid)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		Virsh(ctx, "destroy", name)
		os.Remove("/var/log/libvirt/qemu/" + name + ".log")
	})
	return d
}

// domainXML is the domain: what an operator would write for the dirty guest.
func (d *Domain) domainXML() string {
	extra := ""
	if d.QMPPath != "" {
		extra = fmt.Sprintf(`
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:%s,server=on,wait=off'/>
  </qemu:commandline>`, d.QMPPath)
	}
	return fmt.Sprintf(`<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>%s</name>
  <memory unit='MiB'>%d</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='%s'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>%s</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='%s'/>
      <target dev='vda' bus='virtio'/>
      <geometry cyls='1' heads='1' secs='1'/>
    </disk>
    <serial type='file'><source path='%s'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>%s
</domain>
`, d.Name, d.Config.MemMiB, d.Config.Machine, d.Config.Emulator, d.DiskPath, d.SerialPath, extra)
}

// Serial returns the guest's COM1 output so far.
func (d *Domain) Serial() string {
	b, _ := os.ReadFile(d.SerialPath)
	return string(b)
}

// WaitMoreSerial waits until the guest has printed n more copies of b than it had at the call.
func (d *Domain) WaitMoreSerial(ctx context.Context, b byte, n int) error {
	start := strings.Count(d.Serial(), string(b))
	for strings.Count(d.Serial(), string(b)) < start+n {
		select {
		case <-ctx.Done():
			return fmt.Errorf("domain %s: serial never showed %d more %q: %w", d.Name, n, b, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// State returns libvirt's view of the domain: "running (unpaused)", "paused (migrating)", …
func (d *Domain) State(ctx context.Context) (string, error) {
	out, err := Virsh(ctx, "domstate", "--reason", d.Name)
	return strings.TrimSpace(out), err
}

// DumpXML returns `virsh dumpxml` of the running domain.
func (d *Domain) DumpXML(ctx context.Context) (string, error) {
	return Virsh(ctx, "dumpxml", d.Name)
}

// Destination returns the stock QEMU command line that can receive this domain's migration:
// the devices libvirt 9.0 creates for it (two pcie-root-ports, the virtio disk on the first,
// isa-serial), the same CPU model, machine type and UUID. The disk is shared, as it would be on shared
// storage.
func (d *Domain) Destination(q QEMU, incoming string) VMConfig {
	return VMConfig{
		Name: "dst", QEMU: q, Machine: d.Config.Machine, MemMiB: d.Config.MemMiB,
		Incoming: incoming, Paused: true, UUID: d.UUID,
		Extra: []string{
			"-cpu", "qemu64", "-smp", "1,sockets=1,cores=1,threads=1",
			"-rtc", "base=utc", "-no-shutdown", "-boot", "strict=on",
			"-device", "pcie-root-port,port=8,chassis=1,id=pci.1,bus=pcie.0,multifunction=on,addr=0x1",
			"-device", "pcie-root-port,port=9,chassis=2,id=pci.2,bus=pcie.0,addr=0x1.0x1",
			"-blockdev", "driver=file,filename=" + d.DiskPath + ",node-name=disk0-storage,auto-read-only=on",
			"-blockdev", "node-name=disk0,driver=raw,file=disk0-storage",
			"-device", "virtio-blk-pci,bus=pci.1,addr=0x0,drive=disk0,id=virtio-disk0,bootindex=1,cyls=1,heads=1,secs=1",
		},
	}
}
