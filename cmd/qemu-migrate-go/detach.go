package main

import (
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// detachedEnv marks the background child of `migrate --detach`: it runs the migration itself
// and ends its log with an exit event.
const detachedEnv = "QMG_DETACHED"

// detach starts this same command again in its own session — stdin from /dev/null, stdout and
// stderr to the log file, no other descriptor inherited — prints where it went and returns at
// once, so that a libvirt hook or a script is never blocked by the migration. The child writes
// JSON-lines events (README, "JSON events") and a final {"event":"exit"} line to the log.
func detach(c *cli.Context) error {
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("--detach: finding this program: %w", err)
	}
	var log *os.File
	if p := c.String("log"); p != "" {
		log, err = os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	} else {
		log, err = os.CreateTemp("", "qemu-migrate-go-*.log")
	}
	if err != nil {
		return &exitError{exitUsage, fmt.Errorf("--detach: log file: %w", err)}
	}
	defer log.Close()
	args := append(append([]string{}, os.Args[1:]...), "--json")
	cmd := exec.Command(self, args...)
	cmd.Stdin = nil // /dev/null
	cmd.Stdout, cmd.Stderr = log, log
	cmd.Env = append(os.Environ(), detachedEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("--detach: starting the background migration: %w", err)
	}
	pid := cmd.Process.Pid
	cmd.Process.Release()
	if c.Bool("json") {
		jsonOut(savevm.Event{Type: "detached", Time: time.Now(), PID: pid, Log: log.Name()})
	} else {
		fmt.Printf("qemu-migrate-go: migrating in the background: pid %d, log %s\n", pid, log.Name())
	}
	return nil
}

// isDetachedChild reports whether this process is the background child of --detach.
func isDetachedChild() bool { return os.Getenv(detachedEnv) != "" }
