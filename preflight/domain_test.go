package preflight

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
)

// The domain XMLs in testdata are `virsh dumpxml` (live, inactive and --migratable) of a q35
// domain defined on this project's libvirt 9.0 (QEMU 7.2.22).
const realDomain = "domain-q35-libvirt9-migratable.xml"

func parseTestDomain(t testing.TB, xml string) Domain {
	t.Helper()
	d, err := ParseDomainXML([]byte(xml))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestParseDomainXMLReal(t *testing.T) {
	for _, name := range []string{"domain-q35-libvirt9.xml", "domain-q35-libvirt9-inactive.xml", realDomain} {
		d := parseTestDomain(t, readTestdata(t, name))
		if d.Name != "qmg-probe" || d.Machine != "pc-q35-7.2" || d.Emulator != "/usr/bin/qemu-system-x86_64" ||
			d.MemoryBytes != 128<<20 || d.CurrentBytes != 128<<20 || d.Type != "qemu" || d.Arch != "x86_64" {
			t.Errorf("%s: %+v", name, d)
		}
		if d.MemoryBacking.Source != "" || d.MemoryBacking.HasHuge || d.MemoryBacking.Shared() {
			t.Errorf("%s: memory backing %+v", name, d.MemoryBacking)
		}
		if d.Live != (name == "domain-q35-libvirt9.xml") {
			t.Errorf("%s: Live = %v", name, d.Live)
		}
	}
}

// withBacking puts a <memoryBacking> (and other edits) into the real domain XML.
func withBacking(t testing.TB, backing string, edits ...string) string {
	t.Helper()
	x := readTestdata(t, realDomain)
	if backing != "" {
		x = strings.Replace(x, "  <vcpu ", "  <memoryBacking>"+backing+"</memoryBacking>\n  <vcpu ", 1)
	}
	for i := 0; i+1 < len(edits); i += 2 {
		if !strings.Contains(x, edits[i]) {
			t.Fatalf("domain XML has no %q", edits[i])
		}
		x = strings.ReplaceAll(x, edits[i], edits[i+1])
	}
	return x
}

func TestParseDomainXMLBacking(t *testing.T) {
	d := parseTestDomain(t, withBacking(t, `<hugepages><page size='1' unit='G' nodeset='0'/><page size='2048'/></hugepages><source type='memfd'/><access mode='shared'/><locked/>`,
		"<memory unit='KiB'>131072</memory>", "<memory unit='GiB'>4</memory>"))
	m := d.MemoryBacking
	if m.Source != "memfd" || !m.Shared() || !m.HasHuge || !m.Locked || len(m.Hugepages) != 2 ||
		m.Hugepages[0].SizeBytes != 1<<30 || m.Hugepages[0].Nodeset != "0" || m.Hugepages[1].SizeBytes != 2<<20 {
		t.Errorf("backing %+v", m)
	}
	if d.MemoryBytes != 4<<30 {
		t.Errorf("memory %d", d.MemoryBytes)
	}
	d = parseTestDomain(t, withBacking(t, "", "<memory unit='KiB'>131072</memory>", "<memory unit='bytes'>134217728</memory>"))
	if d.MemoryBytes != 128<<20 {
		t.Errorf("memory in bytes: %d", d.MemoryBytes)
	}
}

func TestParseDomainXMLBad(t *testing.T) {
	big := make([]byte, MaxDomainXML+1)
	if _, err := ParseDomainXML(big); err == nil || !strings.Contains(err.Error(), "bytes") {
		t.Errorf("oversized: %v", err)
	}
	for _, bad := range []string{
		"", "   ", "not xml", "<network><name>x</name></network>",
		"<domain type='kvm'><name>x</name></domain>", // no machine
		"<domain><name>x</name><memory unit='furlong'>1</memory><os><type machine='pc'>hvm</type></os></domain>",
		"<domain><name>x</name><memory unit='EiB'>99</memory><os><type machine='pc'>hvm</type></os></domain>",
	} {
		if d, err := ParseDomainXML([]byte(bad)); err == nil {
			t.Errorf("ParseDomainXML(%q) = %+v, want an error", bad, d)
		}
	}
}

// fakeHost writes /proc-like fixtures: mounts (with or without hugetlbfs) and meminfo.
func fakeHost(t testing.TB, hugetlbfs bool, freeHuge int) host {
	t.Helper()
	dir := t.TempDir()
	mounts := "proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\ntmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0\n"
	if hugetlbfs {
		mounts += "hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n"
	}
	meminfo := "MemTotal:       24684000 kB\nMemFree:        21000000 kB\nMemAvailable:   23000000 kB\n" +
		"HugePages_Total:     " + strconv.Itoa(freeHuge) + "\nHugePages_Free:      " + strconv.Itoa(freeHuge) + "\n" +
		"Hugepagesize:       2048 kB\n"
	h := host{mounts: filepath.Join(dir, "mounts"), meminfo: filepath.Join(dir, "meminfo"),
		hugeSysfs: filepath.Join(dir, "hugepages"), kvm: filepath.Join(dir, "kvm")}
	os.WriteFile(h.mounts, []byte(mounts), 0o644)
	os.WriteFile(h.meminfo, []byte(meminfo), 0o644)
	return h
}

func checksByName(cs []Check) map[string]Check {
	m := map[string]Check{}
	for _, c := range cs {
		m[c.Name] = c
	}
	return m
}

func wantIncoming(t *testing.T, cs []Check, name string, sev Severity, contains ...string) {
	t.Helper()
	c, ok := checksByName(cs)[name]
	if !ok {
		t.Fatalf("no %s check in %+v", name, cs)
	}
	if c.Severity != sev {
		t.Errorf("%s: %s, want %s: %s", name, c.Severity, sev, c.Message)
	}
	for _, s := range contains {
		if !strings.Contains(c.Message, s) {
			t.Errorf("%s: %q does not contain %q", name, c.Message, s)
		}
	}
}

// requireQEMU returns the QEMU of a series; a missing QEMU fails the test, as in compat (make
// test installs both).
func requireQEMU(t testing.TB, series string) compat.QEMU {
	t.Helper()
	q, err := compat.FindQEMU(series)
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func need72(t *testing.T) compat.QEMU { return requireQEMU(t, "7.2") }

func TestCheckIncomingGood(t *testing.T) {
	q := need72(t)
	d := parseTestDomain(t, withBacking(t, "", "/usr/bin/qemu-system-x86_64", q.Binary))
	start := time.Now()
	cs := CheckIncoming(context.Background(), d)
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("CheckIncoming took %v", el)
	}
	for _, c := range cs {
		if c.Severity == SeverityError || c.Severity == SeverityWarning {
			t.Errorf("%s: %s %s", c.Name, c.Severity, c.Message)
		}
	}
	wantIncoming(t, cs, "emulator", SeverityOK, "QEMU 7.2.22")
	wantIncoming(t, cs, "machine-supported", SeverityOK, "knows pc-q35-7.2")
	wantIncoming(t, cs, "memory-backing", SeverityOK, "anonymous private")
	wantIncoming(t, cs, "memory-size", SeverityOK, "128 MiB")
}

func TestCheckIncomingMachine(t *testing.T) {
	q := need72(t)
	d := parseTestDomain(t, withBacking(t, "", "/usr/bin/qemu-system-x86_64", q.Binary, "pc-q35-7.2", "pc-q35-99.0"))
	wantIncoming(t, CheckIncoming(context.Background(), d), "machine-supported", SeverityError,
		"does not know machine type pc-q35-99.0", "it knows pc-q35-2.4 … pc-q35-7.2")
	d = parseTestDomain(t, withBacking(t, "", "/usr/bin/qemu-system-x86_64", q.Binary, "pc-q35-7.2", "q35"))
	wantIncoming(t, CheckIncoming(context.Background(), d), "machine-supported", SeverityOK,
		"q35 is an alias", "resolves it to pc-q35-7.2")
	{
		q10 := requireQEMU(t, "10.0")
		d = parseTestDomain(t, withBacking(t, "", "/usr/bin/qemu-system-x86_64", q10.Binary, "pc-q35-7.2", "q35"))
		wantIncoming(t, CheckIncoming(context.Background(), d), "machine-supported", SeverityOK, "resolves it to pc-q35-10.0")
		d = parseTestDomain(t, withBacking(t, "", "/usr/bin/qemu-system-x86_64", q10.Binary, "pc-q35-7.2", "pc-q35-5.2"))
		wantIncoming(t, CheckIncoming(context.Background(), d), "machine-supported", SeverityWarning, "deprecated")
	}
}

func TestCheckIncomingMissingEmulator(t *testing.T) {
	d := parseTestDomain(t, withBacking(t, "", "/usr/bin/qemu-system-x86_64", "/nonexistent/qemu-system-x86_64"))
	cs := CheckIncoming(context.Background(), d)
	wantIncoming(t, cs, "emulator", SeverityError, "does not exist", "install QEMU")
	if _, ok := checksByName(cs)["machine-supported"]; ok {
		t.Error("machine-supported checked without an emulator")
	}
	d.Emulator = ""
	wantIncoming(t, CheckIncoming(context.Background(), d), "emulator", SeverityWarning, "no <emulator>")
}

func TestCheckIncomingHugepages(t *testing.T) {
	q := need72(t)
	xml := withBacking(t, "<hugepages/>", "/usr/bin/qemu-system-x86_64", q.Binary)
	d := parseTestDomain(t, xml)
	// No hugetlbfs mounted (as on this project's machines).
	cs := checkIncoming(context.Background(), d, fakeHost(t, false, 0))
	wantIncoming(t, cs, "memory-backing", SeverityError, "no hugetlbfs is mounted", "pagesize=2048K")
	// Mounted but too few pages: 128 MiB needs 64 pages of 2 MiB.
	wantIncoming(t, checkIncoming(context.Background(), d, fakeHost(t, true, 10)), "memory-backing", SeverityError,
		"needs 64 free 2 MiB hugepages, the host has 10")
	wantIncoming(t, checkIncoming(context.Background(), d, fakeHost(t, true, 64)), "memory-backing", SeverityOK,
		"hugetlbfs private, default-size hugepages")
	// memfd hugepages need no mount, only free pages.
	d = parseTestDomain(t, withBacking(t, "<hugepages/><source type='memfd'/>", "/usr/bin/qemu-system-x86_64", q.Binary))
	wantIncoming(t, checkIncoming(context.Background(), d, fakeHost(t, false, 64)), "memory-backing", SeverityOK, "memfd")
	// A size the host does not have.
	d = parseTestDomain(t, withBacking(t, "<hugepages><page size='1' unit='G'/></hugepages>", "/usr/bin/qemu-system-x86_64", q.Binary))
	wantIncoming(t, checkIncoming(context.Background(), d, fakeHost(t, true, 64)), "memory-backing", SeverityError, "1 GiB")
	// And the real host: on a machine without a hugetlbfs mount the default-size request fails.
	mounts, _ := os.ReadFile("/proc/mounts")
	if !strings.Contains(string(mounts), " hugetlbfs ") {
		d = parseTestDomain(t, xml)
		wantIncoming(t, CheckIncoming(context.Background(), d), "memory-backing", SeverityError, "no hugetlbfs is mounted")
	}
}

func TestCheckIncomingSharedAndKVM(t *testing.T) {
	q := need72(t)
	d := parseTestDomain(t, withBacking(t, "<source type='file'/><access mode='shared'/>", "/usr/bin/qemu-system-x86_64", q.Binary,
		"<domain type='qemu'>", "<domain type='kvm'>"))
	h := fakeHost(t, false, 0)
	cs := checkIncoming(context.Background(), d, h)
	wantIncoming(t, cs, "memory-backing", SeverityOK, "file shared", "share=on")
	wantIncoming(t, cs, "accelerator", SeverityError, "needs "+h.kvm)
	h.kvm = "/dev/null" // a character device
	wantIncoming(t, checkIncoming(context.Background(), d, h), "accelerator", SeverityOK)
	d.MemoryBytes = 1 << 50
	wantIncoming(t, checkIncoming(context.Background(), d, h), "memory-size", SeverityError, "bigger host")
}

// writeScript makes a fake emulator.
func writeScript(t testing.TB, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu-fake")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestProbeEmulatorBounded(t *testing.T) {
	// Hangs: ctx ends it.
	hang := writeScript(t, "exec sleep 30\n")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := ProbeEmulator(ctx, hang)
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Errorf("hanging emulator: %v after %v", err, time.Since(start))
	}
	// Exits but leaves a child holding stdout: Probe returns soon and the child is gone.
	pidFile := filepath.Join(t.TempDir(), "pid")
	held := writeScript(t, `case "$1" in
--version) sleep 30 & echo $! > `+pidFile+`; echo "QEMU emulator version 9.1.0";;
-machine) echo "Supported machines are:"; echo "q35   Standard PC (alias of pc-q35-9.1)"; echo "pc-q35-9.1  Standard PC";;
-object) echo "List of user creatable objects:"; echo "  memory-backend-file";;
esac
`)
	start = time.Now()
	e, err := ProbeEmulator(context.Background(), held)
	if err != nil || e.Version != "9.1.0" || e.Aliases["q35"] != "pc-q35-9.1" || e.MemFD {
		t.Errorf("probe: %+v %v", e, err)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Errorf("probe waited %v for a child holding stdout", el)
	}
	b, _ := os.ReadFile(pidFile)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if pid > 0 {
		// Gone, or a zombie waiting for init to reap it (this machine's init is slow to).
		alive := func() bool {
			st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
			if err != nil {
				return false
			}
			_, rest, _ := strings.Cut(string(st), ") ")
			return !strings.HasPrefix(rest, "Z")
		}
		deadline := time.Now().Add(2 * time.Second)
		for alive() && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if alive() {
			// Not ours to leave behind: end it (by its own pid) and fail.
			syscall.Kill(pid, syscall.SIGKILL)
			t.Errorf("the child holding stdout (pid %d) outlived the probe", pid)
		}
	} else {
		t.Error("the fake emulator wrote no pid")
	}
	// Floods stdout: capped, still parsed.
	flood := writeScript(t, `case "$1" in
--version) echo "QEMU emulator version 10.0.2"; head -c 5000000 /dev/zero;;
*) head -c 5000000 /dev/zero;;
esac
`)
	if _, err := ProbeEmulator(context.Background(), flood); err == nil || !strings.Contains(err.Error(), "-machine help") {
		t.Errorf("flood: %v", err)
	}
	// Not absolute, not executable, not a QEMU.
	if _, err := ProbeEmulator(context.Background(), "qemu-system-x86_64"); err == nil {
		t.Error("relative path accepted")
	}
	plain := filepath.Join(t.TempDir(), "plain")
	os.WriteFile(plain, []byte("x"), 0o644)
	if _, err := ProbeEmulator(context.Background(), plain); err == nil || !strings.Contains(err.Error(), "not executable") {
		t.Errorf("non-executable: %v", err)
	}
	if _, err := ProbeEmulator(context.Background(), "/bin/true"); err == nil {
		t.Error("/bin/true taken for a QEMU")
	}
}

func TestProbeEmulatorReal(t *testing.T) {
	for _, series := range compat.Versions {
		q := requireQEMU(t, series)
		e, err := ProbeEmulator(context.Background(), q.Binary)
		if err != nil {
			t.Fatal(err)
		}
		if e.Version != q.Full || !e.MemFD || e.Aliases["q35"] != "pc-q35-"+series {
			t.Errorf("%s: %+v", series, e)
		}
	}
}

func TestCompareDomain(t *testing.T) {
	src := loadFacts(t, "7.2-pc-q35-7.2")
	d := parseTestDomain(t, readTestdata(t, realDomain))
	r := CompareDomain(src, d, nil)
	wantOnlyErrors(t, r)
	wantCheck(t, r, "machine", SeverityOK, "pc-q35-7.2 on both sides")
	wantCheck(t, r, "version", SeverityInfo, "not probed")
	wantCheck(t, r, "memory-size", SeverityOK, "128 MiB")
	wantCheck(t, r, "devices", SeverityInfo, "cannot be compared from the domain XML", "--dst-qmp")
	wantCheck(t, r, "uuid", SeverityInfo, "the source has no -uuid, the destination 779b18e2-0b98-47c3-8c7c-93aced8032b0")

	// Probed emulators: 7.2 fine; an alias resolved by a 10.0 emulator differs.
	{
		q := requireQEMU(t, "7.2")
		e, err := ProbeEmulator(context.Background(), q.Binary)
		if err != nil {
			t.Fatal(err)
		}
		wantOnlyErrors(t, CompareDomain(src, d, &e))
		src10 := loadFacts(t, "10.0-pc-q35-7.2")
		r = CompareDomain(src10, d, &e)
		wantOnlyErrors(t, r, "version")
	}
	{
		q := requireQEMU(t, "10.0")
		e, err := ProbeEmulator(context.Background(), q.Binary)
		if err != nil {
			t.Fatal(err)
		}
		alias := parseTestDomain(t, withBacking(t, "", "machine='pc-q35-7.2'", "machine='q35'"))
		r = CompareDomain(src, alias, &e)
		wantOnlyErrors(t, r, "machine")
		wantCheck(t, r, "machine", SeverityError, "pc-q35-10.0 (q35 on QEMU 10.0.2)", "<type machine='pc-q35-7.2'>")
		wantOnlyErrors(t, CompareDomain(src, d, &e))
	}
	// Without an emulator an alias is only a warning.
	alias := parseTestDomain(t, withBacking(t, "", "machine='pc-q35-7.2'", "machine='q35'"))
	wantCheck(t, CompareDomain(src, alias, nil), "machine", SeverityWarning, "alias")
	// A different versioned type is an error.
	other := parseTestDomain(t, withBacking(t, "", "machine='pc-q35-7.2'", "machine='pc-q35-7.1'"))
	wantCheck(t, CompareDomain(src, other, nil), "machine", SeverityError, "set <type machine='pc-q35-7.2'>")

	// Memory size.
	big := parseTestDomain(t, withBacking(t, "", "<memory unit='KiB'>131072</memory>", "<memory unit='KiB'>262144</memory>"))
	wantCheck(t, CompareDomain(src, big, nil), "memory-size", SeverityError, "256 MiB", "<memory unit='KiB'>131072</memory>")

	// Memory backing against a shared-file source with x-ignore-shared.
	file := loadFacts(t, "7.2-file")
	file.Capabilities = map[string]bool{"x-ignore-shared": true}
	r = CompareDomain(file, d, nil)
	wantCheck(t, r, "memory-backing", SeverityError, "source type='file'", file.MemoryBackends[0].MemPath)
	shared := parseTestDomain(t, withBacking(t, "<source type='file'/><access mode='shared'/>"))
	wantCheck(t, CompareDomain(file, shared, nil), "memory-backing", SeverityWarning, "cannot show")
	m72 := loadFacts(t, "7.2-memfd")
	m72.Capabilities = map[string]bool{"x-ignore-shared": true}
	wantCheck(t, CompareDomain(m72, shared, nil), "memory-backing", SeverityError, "content would be lost")
	huge := parseTestDomain(t, withBacking(t, "<hugepages><page size='2048'/></hugepages>"))
	wantCheck(t, CompareDomain(src, huge, nil), "memory-backing", SeverityInfo, "page size 4 KiB on the source, 2 MiB")
}
