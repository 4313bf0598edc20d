package compat

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/preflight"
)

// preflightJSON runs `preflight --json` and returns the report and the exit status.
func preflightJSON(t *testing.T, args ...string) (preflight.Report, int) {
	t.Helper()
	stdout, stderr, code, took := runSidecar(t, time.Minute, append([]string{"preflight", "--json"}, args...)...)
	var rep preflight.Report
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("exit %d, stdout is not a report (%v): %q; stderr %q", code, err, stdout, stderr)
	}
	t.Logf("preflight exit %d in %v", code, took.Round(time.Millisecond))
	return rep, code
}

// errorsOf lists the names of the checks that failed.
func errorsOf(r preflight.Report) []string {
	var names []string
	for _, c := range r.Problems() {
		names = append(names, c.Name)
	}
	return names
}

// TestPreflightCLI runs the preflight command on a compatible and an incompatible pair of real
// QEMUs (QMP on both sides), and on a libvirt domain against a domain XML (the form a libvirt
// host has before it starts the destination). Exit 0 only when the migration can work; the
// incompatible pair names each problem, and nothing was sent: the destination still waits.
func TestPreflightCLI(t *testing.T) {
	q72, q10 := requireQEMU(t, "7.2"), requireQEMU(t, "10.0")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	t.Run("compatible", func(t *testing.T) {
		machine := MachineFor(q72, q10)
		src := StartVM(t, VMConfig{Name: "src", QEMU: q72, Machine: machine, Disk: GuestDirty()})
		dst := StartVM(t, VMConfig{Name: "dst", QEMU: q10, Machine: machine, Disk: GuestDirty(), Incoming: "defer"})
		stdout, stderr, code, _ := runSidecar(t, time.Minute, "preflight", "--qmp", src.SidecarQMP, "--dst-qmp", dst.SidecarQMP)
		if code != 0 || !strings.HasSuffix(stdout, "preflight: migration can work\n") {
			t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
		}
		rep, code := preflightJSON(t, "--qmp", src.SidecarQMP, "--dst-qmp", dst.SidecarQMP)
		if code != 0 || !rep.OK || len(rep.Checks) < 6 {
			t.Fatalf("exit %d, report %+v", code, rep)
		}
	})

	t.Run("incompatible", func(t *testing.T) {
		// What `-machine q35 -m 128` on 10.0 and `-m 256` on 7.2 give: different machine types,
		// a different RAM size, and a destination older than the source.
		src := StartVM(t, VMConfig{Name: "src", QEMU: q10, MemMiB: 128, Disk: GuestDirty()})
		dst := StartVM(t, VMConfig{Name: "dst", QEMU: q72, MemMiB: 256, Disk: GuestDirty(), Incoming: "defer"})
		stdout, _, code, _ := runSidecar(t, time.Minute, "preflight", "--qmp", src.SidecarQMP, "--dst-qmp", dst.SidecarQMP)
		if code != 4 || !strings.HasSuffix(stdout, "problem(s): migration would fail\n") {
			t.Fatalf("exit %d, want 4; stdout %q", code, stdout)
		}
		rep, code := preflightJSON(t, "--qmp", src.SidecarQMP, "--dst-qmp", dst.SidecarQMP)
		got := strings.Join(errorsOf(rep), ",")
		for _, want := range []string{"machine", "version", "ramblocks"} {
			if !strings.Contains(got, want) {
				t.Errorf("no %s error; errors: %s", want, got)
			}
		}
		if code != 4 || rep.OK {
			t.Errorf("exit %d ok=%v, want 4 and false", code, rep.OK)
		}
		if st, err := dst.QMP.QueryStatus(ctx); err != nil || st.Status != "inmigrate" {
			t.Errorf("destination %q %v after preflight, want still inmigrate", st.Status, err)
		}
	})

	t.Run("libvirt-domain-xml", func(t *testing.T) {
		d := StartDomain(t, DomainConfig{Disk: GuestDirty()})
		xml, err := d.DumpXML(ctx)
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		good, bad := filepath.Join(dir, "good.xml"), filepath.Join(dir, "bad.xml")
		os.WriteFile(good, []byte(xml), 0o600)
		os.WriteFile(bad, []byte(strings.Replace(strings.Replace(xml, "machine='pc-q35-7.2'", "machine='pc-q35-99.0'", 1),
			"<memory unit='KiB'>131072</memory>", "<memory unit='KiB'>262144</memory>", 1)), 0o600)
		src := []string{"--libvirt", LibvirtURI, "--domain", d.Name}
		rep, code := preflightJSON(t, append(src, "--dst-xml", good)...)
		if code != 0 || !rep.OK {
			t.Fatalf("exit %d, errors %v: %+v", code, errorsOf(rep), rep)
		}
		rep, code = preflightJSON(t, append(src, "--dst-xml", bad)...)
		got := strings.Join(errorsOf(rep), ",")
		if code != 4 || !strings.Contains(got, "machine") || !strings.Contains(got, "memory-size") {
			t.Fatalf("exit %d, errors %s; want 4 with machine and memory-size", code, got)
		}
	})
}
