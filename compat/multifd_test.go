package compat

import (
	"bufio"
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/migration"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// multifdSetup gives a VM multifd with n channels (a destination: before its incoming
// migration starts, as QEMU 10.0 requires).
func multifdSetup(n int) func(ctx context.Context, vm *VM) error {
	return func(ctx context.Context, vm *VM) error {
		if err := vm.QMP.SetCapabilities(ctx, map[string]bool{"multifd": true}); err != nil {
			return err
		}
		return vm.QMP.SetParameters(ctx, map[string]any{"multifd-channels": n})
	}
}

// TestMultifdRelay relays sources with multifd on (4 channels) for every version pair, to a
// destination with multifd (the channels are forwarded, each packet decoded and checked) and to
// one without (the channels are merged into the one plain stream), guest memory verified.
func TestMultifdRelay(t *testing.T) {
	for _, p := range pairs {
		for _, mode := range []string{"forward", "merge"} {
			for _, g := range guestCases(128, 256) {
				t.Run(fmt.Sprintf("%s-%s/%s/%s", p[0], p[1], mode, g.name), func(t *testing.T) {
					var pl placement
					if mode == "forward" {
						pl.dstSetup = multifdSetup(4)
					}
					var sum savevm.Summary
					checkMigratedIn(t, pl, requireQEMU(t, p[0]), requireQEMU(t, p[1]), "tcg", g, func(ctx context.Context, src, dst *VM, uri string) error {
						if err := multifdSetup(4)(ctx, src); err != nil {
							return err
						}
						to, err := transport.Parse(uri)
						if err != nil {
							return err
						}
						sum, err = migration.Migrate(ctx, migration.MigrateOptions{Source: qmp.Endpoint{Socket: src.SidecarQMP}, To: to, DstQMP: dst.SidecarQMP})
						return err
					})
					t.Logf("total %dms downtime %dms, %d B in, %d B out, pages %d zero %d", sum.TotalTimeMs, sum.DowntimeMs,
						sum.BytesIn, sum.BytesOut, sum.NormalPages, sum.ZeroPages)
					if sum.NormalPages == 0 {
						t.Error("no page went through the channels")
					}
				})
			}
		}
	}
}

// TestMultifdChannelDies: one of the destination's channel connections is reset mid-stream
// (ss -K on the connection that has carried the most data: a channel, not the main one). The
// sidecar must fail at once with a message naming the channel, and the source must run on with
// its parameters restored.
func TestMultifdChannelDies(t *testing.T) {
	sidecarBinary(t)
	for _, v := range Versions {
		t.Run(v, func(t *testing.T) {
			q := requireQEMU(t, v)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			port, _ := FreePort()
			uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
			dst := faultVM(t, ctx, VMConfig{Name: "dst", QEMU: q, Incoming: "defer", MemMiB: 256})
			if err := multifdSetup(4)(ctx, dst); err != nil {
				t.Fatal(err)
			}
			if err := dst.QMP.MigrateIncoming(ctx, uri); err != nil {
				t.Fatal(err)
			}
			src := faultVM(t, ctx, VMConfig{Name: "src", QEMU: q, MemMiB: 256})
			if err := multifdSetup(4)(ctx, src); err != nil {
				t.Fatal(err)
			}
			params := migrationParams(t, ctx, src)
			p := startSidecar(t, atPhase(savevm.PhaseIterate, func(*sidecarProc) {
				go func() {
					time.Sleep(50 * time.Millisecond)
					if err := killBusiestConn(port); err != nil {
						t.Error(err)
					}
				}()
			}), "--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP, "--json", "--bandwidth", "20000000")
			code, wall, stderr := p.wait(t, 30*time.Second)
			msg := oneLine(t, stderr, "multifd channel", "destination")
			if code != 4 {
				t.Errorf("exit %d, want 4", code)
			}
			t.Logf("exit %d after %v: %s", code, wall.Round(time.Millisecond), msg)
			t.Log(sourceRestored(t, ctx, src, params))
		})
	}
}

// killBusiestConn resets the established TCP connection to 127.0.0.1:port that has sent the
// most bytes (ss -K: the kernel's sock_diag destroy).
func killBusiestConn(port int) error {
	out, err := exec.Command("ss", "-tni", "state", "established", "dst", fmt.Sprintf("127.0.0.1:%d", port)).Output()
	if err != nil {
		return fmt.Errorf("ss: %v", err)
	}
	var best string
	var most int64 = -1
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	var local string
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 4 && strings.Contains(f[3], ":") && !strings.Contains(sc.Text(), "bytes_") {
			local = f[2]
			continue
		}
		for _, x := range f {
			if v, ok := strings.CutPrefix(x, "bytes_sent:"); ok {
				if n, _ := strconv.ParseInt(v, 10, 64); n > most {
					most, best = n, local
				}
			}
		}
	}
	if best == "" {
		return fmt.Errorf("no connection to port %d: %s", port, out)
	}
	_, lport, _ := strings.Cut(best, ":")
	if err := exec.Command("ss", "-K", "dst", fmt.Sprintf("127.0.0.1:%d", port), "sport", "=", ":"+lport).Run(); err != nil {
		return fmt.Errorf("ss -K: %v", err)
	}
	return nil
}

// TestMultifdRefused: a source whose multifd the sidecar cannot serve — compressed channels
// towards a destination without multifd — is refused before anything is sent, with a message,
// and the source is untouched.
func TestMultifdRefused(t *testing.T) {
	sidecarBinary(t)
	q := requireQEMU(t, "10.0")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src, dst, uri := faultPair(t, ctx, q)
	if err := multifdSetup(4)(ctx, src); err != nil {
		t.Fatal(err)
	}
	if err := src.QMP.SetParameters(ctx, map[string]any{"multifd-compression": "zstd"}); err != nil {
		t.Fatal(err)
	}
	params := migrationParams(t, ctx, src)
	stdout, stderr, code, wall := runSidecar(t, 30*time.Second, "--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP)
	_ = stdout
	msg := oneLine(t, stderr, "compressed channels", "untouched")
	if code != 2 {
		t.Errorf("exit %d, want 2", code)
	}
	t.Logf("exit %d after %v: %s", code, wall, msg)
	if m, err := src.QMP.QueryMigrate(ctx); err != nil || m.Status != "" {
		t.Errorf("the source was touched: %q %v", m.Status, err)
	}
	if now := migrationParams(t, ctx, src); now != params {
		t.Errorf("parameters changed: %s, had %s", now, params)
	}
}
