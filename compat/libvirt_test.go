package compat

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// TestLibvirtMigration migrates a libvirt-managed domain (the dirty guest, started by a real
// libvirtd) with `--libvirt qemu:///system --domain NAME` to a stock QEMU -incoming, and checks
// the guest's memory against the source's and that it runs on the destination. It also records
// what libvirt shows of the domain before and after (README, "libvirt").
func TestLibvirtMigration(t *testing.T) {
	for _, series := range []string{"7.2", "10.0"} {
		t.Run("7.2-to-"+series, func(t *testing.T) {
			dstQ := requireQEMU(t, series)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			d := StartDomain(t, DomainConfig{Disk: GuestDirty()})
			if err := d.WaitMoreSerial(ctx, 'B', 3); err != nil {
				t.Fatal(err)
			}
			before, err := d.State(ctx)
			if err != nil {
				t.Fatal(err)
			}
			port, err := FreePort()
			if err != nil {
				t.Fatal(err)
			}
			uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
			dst := StartVM(t, d.Destination(dstQ, uri))

			stdout, stderr, code, _ := runSidecar(t, 2*time.Minute, "--libvirt", LibvirtURI, "--domain", d.Name,
				"--to", uri, "--dst-qmp", dst.SidecarQMP, "--json")
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			evs := jsonEvents(t, stdout)
			if len(evs) < 2 || evs[len(evs)-2].Type != "summary" || evs[len(evs)-1].Type != "exit" {
				t.Fatalf("the events do not end with summary, exit: %s", stdout)
			}
			for _, e := range evs {
				if e.Type == "warning" && strings.Contains(e.Message, "preflight") {
					t.Errorf("the destination built for the domain differs from it: %s", e.Message)
				}
			}
			after, err := d.State(ctx)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("libvirt shows the source domain %q before, %q after", before, after)
			if !strings.HasPrefix(before, "running") || !strings.HasPrefix(after, "paused") {
				t.Errorf("libvirt state before %q, after %q; want running, then paused", before, after)
			}
			if log, _ := os.ReadFile("/var/log/libvirt/qemu/" + d.Name + ".log"); !strings.Contains(string(log), "custom-monitor") {
				t.Errorf("libvirt's domain log does not record the custom-monitor taint")
			}

			// The source, paused in postmigrate, through libvirt; the destination, paused (-S).
			src, err := qmp.DialLibvirt(ctx, LibvirtURI, d.Name)
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			if st, err := src.QueryStatus(ctx); err != nil || st.Status != "postmigrate" {
				t.Fatalf("source QEMU status %q (%v), want postmigrate", st.Status, err)
			}
			if _, err := dst.WaitStatus(ctx, "paused"); err != nil {
				t.Fatal(err)
			}
			size := int64(d.Config.MemMiB) << 20
			verifyDumps(ctx, t, func(ctx context.Context, path string) (int64, error) {
				return size, src.PMemSave(ctx, 0, size, path)
			}, dst, guestCases(d.Config.MemMiB, 0)[0])
			if err := dst.QMP.Cont(ctx); err != nil {
				t.Fatal(err)
			}
			if err := dst.WaitMoreSerial(ctx, 'B', 3); err != nil {
				t.Fatalf("guest does not run on the destination: %v", err)
			}
		})
	}
}

// TestLibvirtHook runs the hook on real domain XML from `virsh dumpxml`: the incoming side of a
// migration of a domain this host can run goes on silently; an unsupported machine type or a
// missing emulator stops it with one line; other operations always go on. It runs both as the
// `hook` subcommand and installed as a file in /etc/libvirt/hooks/qemu.d/ (a link, here in a
// temporary folder), and finishes in a few seconds each time.
func TestLibvirtHook(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d := StartDomain(t, DomainConfig{Disk: GuestDirty()})
	good, err := d.DumpXML(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(good, "machine='pc-q35-7.2'") {
		t.Fatalf("dumpxml has no pc-q35-7.2 machine: %s", good)
	}
	badMachine := strings.Replace(good, "machine='pc-q35-7.2'", "machine='pc-q35-99.0'", 1)
	badEmulator := strings.Replace(good, "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
		"<emulator>/usr/bin/qemu-system-x86_64-not-installed</emulator>", 1)
	if badEmulator == good {
		t.Fatalf("dumpxml has no /usr/bin/qemu-system-x86_64 emulator: %s", good)
	}
	bin := sidecarBinary(t)
	linkDir := filepath.Join(t.TempDir(), "qemu.d")
	if err := os.Mkdir(linkDir, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(linkDir, "qemu-migrate-go")
	if err := os.Symlink(bin, link); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, xml, op, sub string
		code               int
		stderr             string // a part of the one stderr line ("" = silent)
	}{
		{"good", good, "migrate", "begin", 0, ""},
		{"bad-machine", badMachine, "migrate", "begin", 4, "pc-q35-99.0"},
		{"bad-emulator", badEmulator, "migrate", "begin", 4, "qemu-system-x86_64-not-installed"},
		{"other-operation", badMachine, "prepare", "begin", 0, ""},
		{"migrate-end", badMachine, "release", "end", 0, ""},
	}
	for _, c := range cases {
		for _, form := range []string{"subcommand", "installed"} {
			t.Run(c.name+"/"+form, func(t *testing.T) {
				argv0, args := bin, []string{"hook", d.Name, c.op, c.sub, "-"}
				if form == "installed" {
					argv0, args = link, args[1:]
				}
				stdout, stderr, code, took := runCmd(t, 20*time.Second, c.xml, argv0, args...)
				if code != c.code {
					t.Errorf("exit %d, want %d; stderr %q", code, c.code, stderr)
				}
				if stdout != "" {
					t.Errorf("stdout %q: a hook that prints on migrate begin replaces the domain XML", stdout)
				}
				switch {
				case c.stderr == "" && stderr != "":
					t.Errorf("stderr %q, want nothing", stderr)
				case c.stderr != "" && (!strings.Contains(stderr, c.stderr) || strings.Count(strings.TrimSpace(stderr), "\n") != 0):
					t.Errorf("stderr %q, want one line naming %q", stderr, c.stderr)
				}
				if took > 3*time.Second {
					t.Errorf("took %v; libvirt waits for its hooks", took)
				}
				t.Logf("exit %d in %v: %s", code, took.Round(time.Millisecond), strings.TrimSpace(stderr))
			})
		}
	}
}

// TestLibvirtFault kills libvirtd (SIGKILL, as a crash) in the middle of the iterate phase of a
// --libvirt migration, and starts it again half a second later, as its service manager would.
// The sidecar loses its only way to the source: it must give up promptly with one line, reach
// the source again through the restarted libvirtd, cancel the migration, put the parameters
// back and leave the guest running — libvirt then shows it running.
func TestLibvirtFault(t *testing.T) {
	q := requireQEMU(t, "7.2")
	requireOwnLibvirtd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// 1 GiB, and the source capped at 100 MB/s below: the first pass takes about a second, long
	// enough for the kill to land in it (uncapped, QEMU may switch over 150 ms in).
	d := StartDomain(t, DomainConfig{MemMiB: 1024, Disk: GuestDirty()})
	if err := d.WaitMoreSerial(ctx, 'B', 3); err != nil {
		t.Fatal(err)
	}
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
	dst := StartVM(t, d.Destination(q, uri))
	c, err := qmp.DialLibvirt(ctx, LibvirtURI, d.Name)
	if err != nil {
		t.Fatal(err)
	}
	params := paramsOf(t, ctx, c)
	c.Close()

	restarted := make(chan error, 1)
	p := startSidecar(t, atPhase(savevm.PhaseIterate, func(*sidecarProc) {
		if err := KillLibvirtd(); err != nil {
			restarted <- err
			return
		}
		go func() {
			time.Sleep(500 * time.Millisecond)
			restarted <- RestartLibvirtd()
		}()
	}), "--libvirt", LibvirtURI, "--domain", d.Name, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json", "--bandwidth", "100000000")
	code, wall, stderr := p.wait(t, time.Minute)
	if err := <-restarted; err != nil {
		t.Fatalf("libvirtd: %v", err)
	}
	msg := oneLine(t, stderr, "source", "iterate phase", "source VM is running")
	if code != 3 {
		t.Errorf("exit %d, want 3", code)
	}
	if wall > 15*time.Second {
		t.Errorf("took %v after the kill to exit", wall)
	}
	t.Logf("exit %d, %v after the kill: %s", code, wall.Round(time.Millisecond), msg)

	c, err = qmp.DialLibvirt(ctx, LibvirtURI, d.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if st, err := c.QueryStatus(ctx); err != nil || st.Status != "running" {
		t.Errorf("source QEMU %q %v, want running", st.Status, err)
	}
	if m, err := c.QueryMigrate(ctx); err != nil || !m.Finished() {
		t.Errorf("source migration %q %v, want finished (cancelled)", m.Status, err)
	}
	if now := paramsOf(t, ctx, c); now != params {
		t.Errorf("parameters %s, had %s", now, params)
	}
	if err := d.WaitMoreSerial(ctx, 'B', 2); err != nil {
		t.Errorf("the guest does not run: %v", err)
	}
	if st, err := d.State(ctx); err != nil || !strings.HasPrefix(st, "running") {
		t.Errorf("libvirt shows %q (%v), want running", st, err)
	}
}

// requireOwnLibvirtd skips, saying why, when the host's own libvirtd runs: a test that kills or
// restarts the daemon must not do it to VMs that are not the suite's. In CI the suite starts it.
func requireOwnLibvirtd(t *testing.T) {
	t.Helper()
	RequireLibvirt(t)
	if !OwnLibvirtd() {
		t.Skip("a libvirtd the suite did not start is running: stop it to run this test (it restarts the daemon)")
	}
}

// TestLibvirtHookInstalled installs the sidecar as a hook in /etc/libvirt/hooks/qemu.d/ (through
// a script that records its arguments and execs it, as the README's example does), restarts the
// suite's libvirtd so it takes it, and starts and destroys a domain: libvirt calls the hook for
// each step, and the domain starts and stops as without it. (The incoming `migrate begin` call
// needs a second libvirt host; TestLibvirtHook gives the hook that call's real XML.)
func TestLibvirtHookInstalled(t *testing.T) {
	requireOwnLibvirtd(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const dir = "/etc/libvirt/hooks/qemu.d"
	if _, err := os.Stat(dir); os.IsNotExist(err) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(dir) })
	}
	calls := filepath.Join(t.TempDir(), "calls.log")
	script := filepath.Join(dir, fmt.Sprintf("qmg-test-%d", os.Getpid()))
	// A copy left behind by a killed run must not fail libvirt's operations: without the test's
	// binary it lets them go on (and cleanLeftovers removes it).
	bin := sidecarBinary(t)
	body := fmt.Sprintf("#!/bin/sh\n[ -x %s ] || { cat >/dev/null; exit 0; }\necho \"$*\" >> %s\nexec %s hook \"$@\"\n", bin, calls, bin)
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	restart := func() {
		if err := KillLibvirtd(); err != nil {
			t.Fatal(err)
		}
		if err := RestartLibvirtd(); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		os.Remove(script)
		restart() // without the hook
	})
	restart()
	d := StartDomain(t, DomainConfig{Disk: GuestDirty()})
	if err := d.WaitMoreSerial(ctx, 'B', 2); err != nil {
		t.Fatal(err)
	}
	if _, err := Virsh(ctx, "destroy", d.Name); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(calls)
	for _, want := range []string{"prepare begin", "start begin", "started begin", "stopped end", "release end"} {
		if !strings.Contains(string(b), d.Name+" "+want+" -") {
			t.Errorf("libvirt did not call the hook for %q; calls:\n%s", want, b)
		}
	}
	t.Logf("hook calls:\n%s", b)
}

// TestLibvirtClientLeaks opens a libvirt monitor, runs commands, listens to events and closes
// it: nothing of it (go-libvirt's reader, the event stream, the client's pump) may outlive it.
func TestLibvirtClientLeaks(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	d := StartDomain(t, DomainConfig{Disk: GuestDirty()})
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	for i := 0; i < 3; i++ {
		c, err := qmp.DialLibvirt(ctx, LibvirtURI, d.Name)
		if err != nil {
			t.Fatal(err)
		}
		events, unsubscribe := c.Subscribe()
		if err := c.SetCapabilities(ctx, map[string]bool{"events": true}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.QueryMigrate(ctx); err != nil {
			t.Fatal(err)
		}
		select {
		case <-events:
		default:
		}
		unsubscribe()
		if err := c.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	}
}
