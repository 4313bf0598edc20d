package compat

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// linkMigrateAndVerify is checkMigrated across a NetPair: a source running guest g in the
// source host's namespace, a paused (-S) destination in the destination host's, migrated by b;
// then the source must be in postmigrate, the destination's RAM must equal the source's and pass
// the guest's own check, and after `cont` the guest must keep running.
func linkMigrateAndVerify(t *testing.T, b *Baseline, srcQ, dstQ QEMU, g guestCase) LinkResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	machine := MachineFor(srcQ, dstQ)
	disk := g.disk(g.memMiB)
	srcCfg, dstCfg, err := b.Configure(
		VMConfig{Name: "src", QEMU: srcQ, Machine: machine, MemMiB: g.memMiB, Disk: disk},
		VMConfig{Name: "dst", QEMU: dstQ, Machine: machine, MemMiB: g.memMiB, Disk: disk, Paused: true})
	if err != nil {
		t.Fatal(err)
	}
	src, dst := StartVM(t, srcCfg), StartVM(t, dstCfg)
	if err := src.WaitMoreSerial(ctx, g.progress, 3); err != nil {
		t.Fatal(err)
	}
	res, err := b.Migrate(ctx, src, dst, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s %s→%s %s: total %v, downtime %v (QEMU %v), end %s, link %d B →, %d B ←, QEMU transferred %d B",
		b.Mode, srcQ.Version, dstQ.Version, g.name, res.Total.Round(time.Millisecond), res.Downtime.Round(time.Millisecond),
		res.QEMUDowntime, res.End, res.Link.SrcToDst, res.Link.DstToSrc, res.Source.Transferred)
	// What QEMU sent crossed the veth (the counters also hold the headers and the TLS framing).
	if res.Link.SrcToDst < uint64(res.Source.Transferred) || res.Source.Transferred < int64(g.memMiB)<<20/100 {
		t.Errorf("%d bytes crossed the link for %d bytes QEMU says it sent", res.Link.SrcToDst, res.Source.Transferred)
	}
	if res.End != "MIGRATION completed" || res.Downtime <= 0 || res.Downtime > res.Total || res.Total <= 0 {
		t.Errorf("measurement %+v: with -S the end is the destination's completion, after a positive downtime", res)
	}
	if st, err := src.WaitStatus(ctx, "postmigrate"); err != nil {
		t.Fatalf("source status %q: %v", st, err)
	}
	if _, err := dst.WaitStatus(ctx, "paused"); err != nil {
		t.Fatal(err)
	}
	verifyAgainstSource(ctx, t, src, dst, g)
	if err := dst.QMP.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	if err := dst.WaitMoreSerial(ctx, g.progress, 3); err != nil {
		t.Fatalf("guest does not run on the destination: %v", err)
	}
	return res
}

// netnsOf returns the network namespace of a process (/proc/PID/ns/net).
func netnsOf(t *testing.T, pid int) string {
	t.Helper()
	ns, err := os.Readlink("/proc/" + strconv.Itoa(pid) + "/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	return ns
}

// TestLinkDirect: QEMU 7.2 runs inside the pair's namespaces — the VM's PID is QEMU's own, in the
// namespace it was given — and migrates the dirty guest across the link by itself; memory is
// verified; killing the VM kills QEMU.
func TestLinkDirect(t *testing.T) {
	q := requireQEMU(t, "7.2")
	p := NewNetPair(t, NetOptions{})
	g := guestCases(128, 256)[0]
	b := &Baseline{Mode: ModeDirect, Pair: p}
	t.Run("namespace and PID", func(t *testing.T) {
		srcCfg, _, err := b.Configure(VMConfig{Name: "src", QEMU: q, Disk: GuestDirty()}, VMConfig{})
		if err != nil {
			t.Fatal(err)
		}
		vm := StartVM(t, srcCfg)
		exe, err := os.Readlink("/proc/" + strconv.Itoa(vm.PID) + "/exe")
		if err != nil || filepath.Base(exe) != filepath.Base(q.Binary) {
			t.Errorf("PID %d is %q (%v), not QEMU", vm.PID, exe, err)
		}
		var want string
		if err := p.Src.Do(func() error {
			var err error
			want, err = os.Readlink("/proc/thread-self/ns/net")
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if got := netnsOf(t, vm.PID); got != want || got == netnsOf(t, os.Getpid()) {
			t.Errorf("QEMU is in %s, want the source host's %s", got, want)
		}
		if !strings.HasPrefix(vm.CommandLine(), "ip netns exec "+p.Src.Name+" "+q.Binary) {
			t.Errorf("command line %q", vm.CommandLine())
		}
		vm.Kill()
		select {
		case <-vm.Exited():
		default:
			t.Fatal("Kill returned with QEMU still running")
		}
		if processAlive(vm.PID) {
			t.Errorf("PID %d still exists after Kill", vm.PID)
		}
	})
	t.Run("migrate", func(t *testing.T) {
		linkMigrateAndVerify(t, &Baseline{Mode: ModeDirect, Pair: p}, q, q, g)
	})
}

// TestLinkQEMUTLS: QEMU's own TLS migration across the link, with the test PKI: it succeeds (7.2
// and 10.0, memory verified) with good certificates, and the destination refuses a client whose
// certificate comes from another CA — the guest stays on the source and keeps running.
func TestLinkQEMUTLS(t *testing.T) {
	p := NewNetPair(t, NetOptions{})
	pki := NewTestPKI(t, p.Dst.Addr.String())
	// fill, not dirty: QEMU's TLS moves some 100 MB/s here, a pace at which the dirty guest
	// (all of its 99 MiB rewritten in every pass) never fits a 300 ms downtime.
	g := guestCases(128, 128)[1]
	// 7.2 checks the server's certificate against the address it dials (an IP SAN), 10.0 against
	// the DNS name given as tls-hostname.
	for v, hostname := range map[string]string{"7.2": "", "10.0": TestServerName} {
		t.Run("good/"+v, func(t *testing.T) {
			q := requireQEMU(t, v)
			b := &Baseline{Mode: ModeQEMUTLS, Pair: p, ServerCreds: pki.QEMUDir, ClientCreds: pki.QEMUDir, TLSHostname: hostname}
			linkMigrateAndVerify(t, b, q, q, g)
		})
	}
	t.Run("client from another CA", func(t *testing.T) {
		q := requireQEMU(t, "10.0")
		// The client trusts the right CA (it would accept the server) and holds the other CA too,
		// so that QEMU accepts its own certificate when it loads the object: only the
		// destination's verification of the client can fail.
		clientDir := filepath.Join(t.TempDir(), "client")
		if err := WriteQEMUCreds(clientDir, []*Authority{pki.CA, pki.OtherCA}, nil, pki.ClientOtherCA); err != nil {
			t.Fatal(err)
		}
		b := &Baseline{Mode: ModeQEMUTLS, Pair: p, ServerCreds: pki.QEMUDir, ClientCreds: clientDir}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		srcCfg, dstCfg, err := b.Configure(VMConfig{Name: "src", QEMU: q, Disk: g.disk(128)}, VMConfig{Name: "dst", QEMU: q, Disk: g.disk(128)})
		if err != nil {
			t.Fatal(err)
		}
		src, dst := StartVM(t, srcCfg), StartVM(t, dstCfg)
		if err := src.WaitMoreSerial(ctx, g.progress, 2); err != nil {
			t.Fatal(err)
		}
		res, err := b.Migrate(ctx, src, dst, false)
		if err == nil {
			t.Fatalf("migrated with a client certificate from another CA: %+v", res)
		}
		t.Logf("refused: %v", err)
		// GnuTLS's client sends no certificate that the server's list of CAs does not cover, so
		// the destination's words are "Verify failed: No certificate was found."
		if !strings.Contains(dst.Stderr(), "ertificate") {
			t.Errorf("the destination's error does not name the certificate: %s", dst.Stderr())
		}
		if st, err := src.WaitStatus(ctx, "running"); err != nil {
			t.Fatalf("source %q after the refused migration: %v", st, err)
		}
		if err := src.WaitMoreSerial(ctx, g.progress, 2); err != nil {
			t.Fatalf("the guest stopped on the source: %v", err)
		}
		select {
		case <-dst.Exited():
		default:
			if st, err := dst.QMP.QueryStatus(ctx); err == nil && st.Status != "inmigrate" {
				t.Errorf("destination is %q after refusing the client", st.Status)
			}
		}
	})
}

// TestLinkMultifdZstd: QEMU 10.0's multifd (4 channels, zstd) across the link, memory verified.
func TestLinkMultifdZstd(t *testing.T) {
	q := requireQEMU(t, "10.0")
	p := NewNetPair(t, NetOptions{Rate: "1gbit"})
	g := guestCases(128, 256)[1] // fill: pages zstd has something to do with
	res := linkMigrateAndVerify(t, &Baseline{Mode: ModeMultifdZstd, Pair: p}, q, q, g)
	// Of the fill pages a quarter are zero (never sent whole), three eighths text (zstd makes
	// them tiny) and three eighths random: uncompressed, more than 6/8 of the RAM would cross;
	// compressed, little more than 3/8 (plus what the guest dirties between passes).
	if limit := uint64(g.memMiB) << 20 * 5 / 8; res.Link.SrcToDst >= limit {
		t.Errorf("%d bytes crossed the link for %d MiB of fill pages (limit %d): zstd did not compress the text pages",
			res.Link.SrcToDst, g.memMiB, limit)
	}
}
