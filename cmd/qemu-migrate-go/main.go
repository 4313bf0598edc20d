// Command qemu-migrate-go live-migrates a running QEMU VM to a stock QEMU started with -incoming,
// producing the migration stream through its own engine. Flags map to engine options; the logic
// lives in the packages.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/qemu-migrate-go/qemu-migrate-go/hook"
	"github.com/qemu-migrate-go/qemu-migrate-go/migration"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// Exit codes (README "Exit codes").
const (
	exitOK          = 0
	exitInternal    = 1
	exitUsage       = 2
	exitSource      = 3
	exitDestination = 4
	exitPolicy      = 5
	exitCancelled   = 6
	exitInvalid     = 7 // inspect --verify / restore: the stream is not valid
	exitVerify      = 8 // migrate --verify: the destination's RAM differs; nothing resumed
)

// exitError carries an exit code through urfave/cli.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// errSilent is an exitError's error that has already been reported.
var errSilent = errors.New("")

func main() {
	if invokedAsHook(os.Args[0]) {
		ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
		code := hook.Run(ctx, os.Args[1:], os.Stdin, os.Stderr)
		cancel()
		os.Exit(code)
	}
	app := &cli.App{
		Name:  "qemu-migrate-go",
		Usage: "live-migrate a running QEMU VM to a QEMU started with -incoming, through the sidecar's own engine",
		UsageText: "qemu-migrate-go --qmp SOCK --to tcp:HOST:PORT [options]\n" +
			"qemu-migrate-go inspect [--json] FILE|-\n" +
			"qemu-migrate-go restore --from FILE --to tcp:HOST:PORT\n" +
			"qemu-migrate-go receive --listen tcp:HOST:PORT --to unix:PATH [--dst-qmp SOCK] --tls-cert F --tls-key F --tls-ca F\n" +
			"qemu-migrate-go --libvirt qemu:///system --domain NAME --to tcp:HOST:PORT [options]\n" +
			"qemu-migrate-go preflight (--qmp SOCK | --libvirt URI --domain NAME) (--dst-qmp SOCK | --dst-xml FILE) [--json]\n" +
			"qemu-migrate-go hook DOMAIN OPERATION SUB-OPERATION EXTRA < domain.xml",
		Flags:           migrateFlags(),
		Action:          runMigrate,
		HideHelpCommand: true,
		Commands: []*cli.Command{
			{Name: "migrate", Usage: "migrate a running VM (the default command)", Flags: migrateFlags(), Action: runMigrate},
			inspectCommand(),
			restoreCommand(),
			preflightCommand(),
			hookCommand(),
			reportCommand(),
			receiveCommand(),
		},
		ExitErrHandler: func(*cli.Context, error) {},
	}
	// --cpuprofile FILE (hidden, any command): a pprof CPU profile of the whole run, for the
	// performance work on the data path (issue 12's closing note).
	app.Flags = append(app.Flags, &cli.StringFlag{Name: "cpuprofile", Hidden: true})
	app.Before = startProfile
	ctx, stop := signalContext()
	err := app.RunContext(ctx, os.Args)
	stop()
	stopProfile()
	code := exitCode(err)
	if isDetachedChild() || jsonEvents {
		ev := savevm.Event{Type: "exit", Time: time.Now(), ExitCode: &code}
		if err != nil {
			ev.Message = err.Error()
		}
		jsonOut(ev)
	}
	os.Exit(code)
}

// postcopyRunning is set once a migration has switched to postcopy (its "postcopy" phase
// event): the guest runs on the destination from then on, so a signal must not abandon it.
var postcopyRunning atomic.Bool

// signalContext is cancelled by SIGINT or SIGTERM, with the signal as its cause — except during
// postcopy, when the signal is refused with a message and the migration goes on to its end
// (design.md, safety contract rule 5: the guest's newest state is on the destination, and
// stopping now would leave it split between the two hosts).
func signalContext() (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(context.Background())
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		for sig := range sigs {
			if postcopyRunning.Load() {
				fmt.Fprintf(os.Stderr, "qemu-migrate-go: refusing %v: the migration is in postcopy, the guest already runs on the destination and needs the pages still on the source; it finishes by itself (a broken connection is recovered)\n", sig)
				continue
			}
			cancel(fmt.Errorf("%v signal received", sig))
		}
	}()
	return ctx, func() { signal.Stop(sigs); close(sigs); cancel(nil) }
}

var stopProfile = func() {}

// startProfile starts the CPU profile --cpuprofile asks for.
func startProfile(c *cli.Context) error {
	path := c.String("cpuprofile")
	if path == "" {
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return &exitError{exitUsage, err}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return &exitError{exitUsage, err}
	}
	stopProfile = func() { pprof.StopCPUProfile(); f.Close() }
	return nil
}

// exitCode prints err as one line on stderr and maps it to the documented exit code.
func exitCode(err error) int {
	if err == nil {
		return exitOK
	}
	var ee *exitError
	if errors.As(err, &ee) && ee.err == errSilent {
		return ee.code
	}
	fmt.Fprintln(os.Stderr, "qemu-migrate-go:", err)
	if errors.As(err, &ee) {
		return ee.code
	}
	switch {
	case errors.Is(err, context.Canceled):
		return exitCancelled
	case errors.Is(err, migration.ErrUsage):
		return exitUsage
	case errors.Is(err, migration.ErrVerify):
		return exitVerify
	case errors.Is(err, migration.ErrPolicy):
		return exitPolicy
	case errors.Is(err, migration.ErrSource):
		return exitSource
	case errors.Is(err, migration.ErrDestination):
		return exitDestination
	}
	return exitUsage // flag parsing and argument errors from urfave/cli
}
