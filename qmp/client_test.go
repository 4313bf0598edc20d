package qmp_test

import (
	"context"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

func startVM(t *testing.T, series string) *compat.VM {
	t.Helper()
	q, err := compat.FindQEMU(series)
	if err != nil {
		t.Fatal(err)
	}
	return compat.StartVM(t, compat.VMConfig{Name: "vm", QEMU: q, MemMiB: 32})
}

// TestCommandsAgainstQEMU runs every typed command against real QEMU 7.2 and 10.0.
func TestCommandsAgainstQEMU(t *testing.T) {
	for _, series := range compat.Versions {
		t.Run(series, func(t *testing.T) {
			vm := startVM(t, series)
			c := vm.QMP
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()

			v, err := c.QueryVersion(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if v.String() != vm.Config.QEMU.Full {
				t.Errorf("query-version %s, --version said %s", v, vm.Config.QEMU.Full)
			}
			// -machine q35 is an alias: the exact name is what the stream carries.
			if m, err := c.MachineType(ctx); err != nil || m != "pc-q35-"+series {
				t.Errorf("machine type %q, %v; want pc-q35-%s", m, err, series)
			}
			events, unsubscribe := c.Subscribe()
			defer unsubscribe()
			if err := c.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := qmp.WaitEvent(ctx, events, "STOP", nil); err != nil {
				t.Fatal(err)
			}
			if st, err := c.QueryStatus(ctx); err != nil || st.Status != "paused" || st.Running {
				t.Fatalf("after stop: %+v, %v", st, err)
			}
			if err := c.Cont(ctx); err != nil {
				t.Fatal(err)
			}
			if _, err := qmp.WaitEvent(ctx, events, "RESUME", nil); err != nil {
				t.Fatal(err)
			}
			caps, err := c.QueryCapabilities(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := caps["xbzrle"]; !ok {
				t.Errorf("capabilities lack xbzrle: %v", caps)
			}
			if err := c.SetCapabilities(ctx, map[string]bool{"xbzrle": true}); err != nil {
				t.Fatal(err)
			}
			if caps, _ := c.QueryCapabilities(ctx); !caps["xbzrle"] {
				t.Error("xbzrle not on after migrate-set-capabilities")
			}
			if err := c.SetParameters(ctx, map[string]any{"downtime-limit": 1234}); err != nil {
				t.Fatal(err)
			}
			p, err := c.QueryParameters(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if p["downtime-limit"] != float64(1234) {
				t.Errorf("downtime-limit = %v", p["downtime-limit"])
			}
			m, err := c.QueryMigrate(ctx)
			if err != nil || m.Status != "" || m.Finished() {
				t.Errorf("query-migrate before any migration: %+v, %v", m, err)
			}
			out, err := c.HMP(ctx, "info status")
			if err != nil || !strings.Contains(out, "running") {
				t.Errorf("HMP info status = %q, %v", out, err)
			}
			var ce *qmp.CommandError
			if err := c.Execute(ctx, "no-such-command", nil, nil); !errors.As(err, &ce) {
				t.Errorf("unknown command: %v, want a CommandError", err)
			}
			if st, err := c.QueryStatus(ctx); err != nil || !st.Running {
				t.Errorf("client unusable after a command error: %+v %v", st, err)
			}
		})
	}
}

// TestDeadlineOnHungQEMU stops the QEMU process with SIGSTOP: a call must give up at its deadline,
// and the client must then refuse further calls instead of mixing up replies.
func TestDeadlineOnHungQEMU(t *testing.T) {
	vm := startVM(t, "7.2")
	if err := syscall.Kill(vm.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(vm.PID, syscall.SIGCONT)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := vm.QMP.QueryStatus(ctx)
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("query-status on a stopped QEMU: %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("gave up after %v, deadline was 300ms", d)
	}
	if _, err := vm.QMP.QueryStatus(context.Background()); !errors.Is(err, qmp.ErrClosed) {
		t.Errorf("call after a timed-out call: %v, want ErrClosed", err)
	}
}

// TestHandshakeDeadline connects to the socket of a stopped QEMU: the kernel accepts the
// connection but no greeting ever comes.
func TestHandshakeDeadline(t *testing.T) {
	vm := startVM(t, "7.2")
	vm.QMP.Close() // QEMU serves one QMP client per socket at a time
	time.Sleep(100 * time.Millisecond)
	if err := syscall.Kill(vm.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(vm.PID, syscall.SIGCONT)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := qmp.DialUnix(ctx, vm.QMPPath); err == nil {
		t.Fatal("handshake with a stopped QEMU succeeded")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("gave up after %v, deadline was 300ms", d)
	}
}
