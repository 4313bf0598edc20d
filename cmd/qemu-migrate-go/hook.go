package main

import (
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/qemu-migrate-go/qemu-migrate-go/hook"
)

func hookCommand() *cli.Command {
	return &cli.Command{
		Name:      "hook",
		Usage:     "libvirt hook: on `migrate begin`, refuse an incoming domain this host cannot run (README, \"libvirt\")",
		ArgsUsage: "DOMAIN OPERATION SUB-OPERATION EXTRA  (the domain XML on stdin)",
		// libvirt's arguments are positional and may look like flags ("-"): take them as they are.
		SkipFlagParsing: true,
		Action: func(c *cli.Context) error {
			return hookExit(hook.Run(c.Context, c.Args().Slice(), os.Stdin, os.Stderr))
		},
	}
}

// invokedAsHook reports whether this binary was installed as the hook itself —
// /etc/libvirt/hooks/qemu, or a file in /etc/libvirt/hooks/qemu.d/ — so that libvirt's
// arguments come straight after the program name.
func invokedAsHook(argv0 string) bool {
	return filepath.Base(argv0) == "qemu" || filepath.Base(filepath.Dir(argv0)) == "qemu.d"
}

// hookExit turns a hook status into the CLI's error: the hook has already said why on stderr.
func hookExit(code int) error {
	if code == 0 {
		return nil
	}
	return &exitError{code: code, err: errSilent}
}
