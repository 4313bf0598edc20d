package main

import (
	"errors"
	"fmt"
	"github.com/qemu-migrate-go/qemu-migrate-go/migration"

	"github.com/urfave/cli/v2"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

func restoreCommand() *cli.Command {
	return &cli.Command{
		Name:      "restore",
		Usage:     "replay a saved stream into a destination QEMU (checked by the decoder on the way)",
		ArgsUsage: " ",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "from", Required: true, Usage: "stream file, or - for standard input"},
			&cli.StringFlag{Name: "to", Required: true, Usage: "destination: tcp:HOST:PORT or unix:PATH (also file:, exec:)"},
			&cli.StringFlag{Name: "dst-version", Usage: "destination QEMU series (7.2, 10.0) to apply its compatibility rules"},
			&cli.BoolFlag{Name: "json", Usage: "write JSON-lines events to stdout"},
		},
		Action: func(c *cli.Context) error {
			to, err := transport.Parse(c.String("to"))
			if err != nil {
				return &exitError{exitUsage, err}
			}
			ui := newProgress(c.Bool("json"), false)
			sum, err := migration.Restore(c.Context, migration.RestoreOptions{From: c.String("from"), To: to,
				Options: savevm.Options{DstSeries: c.String("dst-version"), Events: ui.event, Warn: ui.warn}})
			ui.close()
			var se *stream.Error
			if errors.As(err, &se) {
				return &exitError{exitInvalid, err} // the file is not a valid stream
			}
			if err != nil {
				return err
			}
			if !c.Bool("json") {
				fmt.Printf("restored: %s in %v\n", human(sum.BytesOut), ms(sum.TotalTimeMs))
			}
			return nil
		},
	}
}
