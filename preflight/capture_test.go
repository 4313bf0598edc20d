package preflight

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
)

// rootPortArgs put a virtio-rng behind a PCIe root port: the case where query-pci differs
// between a running source and an inmigrate destination (bridge bus numbers come from the
// guest's firmware).
var rootPortArgs = []string{
	"-device", "pcie-root-port,id=rp1,chassis=1,bus=pcie.0,addr=0x2",
	"-device", "virtio-rng-pci,bus=rp1,id=rng0",
}

// TestCaptureTestdata re-captures testdata/ from the real QEMUs (QMG_CAPTURE=1 go test -run
// CaptureTestdata ./preflight/). Every file's command line is in testdata/CAPTURED.txt.
func TestCaptureTestdata(t *testing.T) {
	if os.Getenv("QMG_CAPTURE") == "" {
		t.Skip("set QMG_CAPTURE=1 to re-capture testdata from real QEMU")
	}
	var log strings.Builder
	log.WriteString("# Captured by `QMG_CAPTURE=1 go test -run CaptureTestdata ./preflight/` from real QEMU.\n")
	log.WriteString("# Not re-captured (need a libvirtd with a running domain qmg-probe, q35, 128 MiB):\n" +
		"#   domain-q35-libvirt9.xml, -inactive.xml, -migratable.xml: virsh -c qemu:///system dumpxml [--inactive|--migratable] qmg-probe\n" +
		"#   (libvirt 9.0.0 of Debian bookworm, QEMU 7.2.22)\n")
	write := func(name, content, how string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join("testdata", name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&log, "%s: %s\n", name, how)
	}
	for _, series := range compat.Versions {
		q, err := compat.FindQEMU(series)
		if err != nil {
			t.Fatal(err)
		}
		for _, args := range [][]string{{"--version"}, {"-machine", "help"}, {"-object", "help"}} {
			out, err := exec.Command(q.Binary, args...).Output()
			if err != nil {
				t.Fatal(err)
			}
			name := map[string]string{"--version": "version", "-machine": "machine-help", "-object": "object-help"}[args[0]]
			write(fmt.Sprintf("%s-%s.txt", name, series), string(out), q.String()+" "+strings.Join(args, " "))
		}
		type vmCase struct {
			tag string
			cfg compat.VMConfig
		}
		cases := []vmCase{
			{"q35", compat.VMConfig{Machine: "q35", Disk: compat.GuestDirty()}},
			{"pc-q35-7.2", compat.VMConfig{Machine: "pc-q35-7.2", Disk: compat.GuestDirty()}},
			{"rootport", compat.VMConfig{Machine: "pc-q35-7.2", Disk: compat.GuestDirty(), Extra: rootPortArgs}},
			{"rootport-inmigrate", compat.VMConfig{Machine: "pc-q35-7.2", Disk: compat.GuestDirty(), Extra: rootPortArgs, Incoming: "defer"}},
			{"memfd", compat.VMConfig{Machine: "pc-q35-7.2", SharedMem: "memfd"}},
			{"file", compat.VMConfig{Machine: "pc-q35-7.2", SharedMem: "file", MemPath: "/dev/shm/qmg-preflight-capture-" + series}},
		}
		for _, vc := range cases {
			vc.cfg.QEMU, vc.cfg.Name = q, vc.tag
			vm := compat.StartVM(t, vc.cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			if vc.cfg.Incoming == "" && vc.cfg.Disk != nil {
				// Let the firmware run (it programs the bridges' bus numbers).
				if err := vm.WaitSerial(ctx, "guest start", func(s string) bool { return strings.Contains(s, "A") }); err != nil {
					t.Fatal(err)
				}
			}
			how := strings.ReplaceAll(vm.CommandLine(), vm.Dir, "$DIR")
			for _, hmp := range []string{"info ramblock", "info qtree"} {
				out, err := vm.QMP.HMP(ctx, hmp)
				if err != nil {
					t.Fatal(err)
				}
				write(fmt.Sprintf("%s-%s-%s.txt", strings.ReplaceAll(hmp, " ", "-"), series, vc.tag), out, how)
			}
			var pci json.RawMessage
			if err := vm.QMP.Execute(ctx, "query-pci", nil, &pci); err != nil {
				t.Fatal(err)
			}
			write(fmt.Sprintf("query-pci-%s-%s.json", series, vc.tag), string(pci)+"\n", how)
			f, err := Gather(ctx, vm.QMP)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := json.MarshalIndent(f, "", " ")
			write(fmt.Sprintf("facts-%s-%s.json", series, vc.tag), string(b)+"\n", how+" (preflight.Gather)")
			cancel()
			vm.Kill()
		}
		os.Remove("/dev/shm/qmg-preflight-capture-" + series)
	}
	if err := os.WriteFile("testdata/CAPTURED.txt", []byte(log.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}
