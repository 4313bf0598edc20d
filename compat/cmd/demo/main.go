// Command demo is `make demo`: it starts a source VM running the `fill` test guest and a
// destination QEMU waiting with -incoming, migrates the guest with the sidecar binary (its
// progress display and summary are what an operator sees), shows the guest running on the
// destination, and cleans up.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
)

func main() {
	bin := flag.String("bin", "bin/qemu-migrate-go", "the sidecar binary")
	series := flag.String("qemu", "10.0", "QEMU series of both VMs (7.2 or 10.0)")
	mem := flag.Int("mem", 512, "guest RAM in MiB")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("demo: ")
	if err := run(*bin, *series, *mem); err != nil {
		log.Fatal(err)
	}
}

func run(bin, series string, mem int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	q, err := compat.FindQEMU(series)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "qemu-migrate-go-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	disk, err := compat.GuestFill(compat.FillOptions{MemBytes: uint64(mem) << 20, DirtyEvery: 16, Seed: 1})
	if err != nil {
		return err
	}
	port, err := compat.FreePort()
	if err != nil {
		return err
	}
	uri := fmt.Sprintf("tcp:127.0.0.1:%d", port)
	src, err := compat.Launch(ctx, dir+"/src", compat.VMConfig{Name: "source", QEMU: q, MemMiB: mem, Disk: disk})
	if err != nil {
		return err
	}
	defer src.Kill()
	dst, err := compat.Launch(ctx, dir+"/dst", compat.VMConfig{Name: "destination", QEMU: q, MemMiB: mem, Disk: disk, Incoming: uri})
	if err != nil {
		return err
	}
	defer dst.Kill()
	log.Printf("source:      %s", src.CommandLine())
	log.Printf("destination: %s", dst.CommandLine())
	log.Printf("waiting for the fill guest to fill its %d MiB and start dirtying (serial: A, F, then B per pass)…", mem)
	if err := src.WaitSerial(ctx, "F", func(s string) bool { return strings.Contains(s, "F") }); err != nil {
		return err
	}
	if err := src.WaitMoreSerial(ctx, 'B', 3); err != nil {
		return err
	}
	args := []string{"--qmp", src.SidecarQMP, "--to", uri, "--dst-qmp", dst.SidecarQMP}
	log.Printf("$ %s %s", bin, strings.Join(args, " "))
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("sidecar: %w", err)
	}
	before := strings.Count(dst.Serial(), "B")
	if err := dst.WaitMoreSerial(ctx, 'B', 3); err != nil {
		return err
	}
	sst, _ := src.QMP.QueryStatus(ctx)
	dstSt, _ := dst.QMP.QueryStatus(ctx)
	log.Printf("source is %s; destination is %s and its guest keeps printing (%d → %d passes)",
		sst.Status, dstSt.Status, before, strings.Count(dst.Serial(), "B"))
	log.Printf("done; both VMs are stopped and their files removed")
	return nil
}
