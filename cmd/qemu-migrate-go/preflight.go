package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/qemu-migrate-go/qemu-migrate-go/preflight"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

func preflightCommand() *cli.Command {
	return &cli.Command{
		Name:      "preflight",
		Usage:     "report every incompatibility between a source VM and a destination before anything is sent (exit 0 only when the migration can work)",
		ArgsUsage: " ",
		Flags: append(sourceFlags(),
			&cli.StringFlag{Name: "dst-qmp", Usage: "QMP unix socket of the destination QEMU (started with -incoming)"},
			&cli.StringFlag{Name: "dst-xml", Usage: "instead of --dst-qmp: the destination's libvirt domain XML (- for stdin), checked against its local <emulator>"},
			&cli.DurationFlag{Name: "timeout", Value: 30 * time.Second, Usage: "limit on the whole check"},
			&cli.BoolFlag{Name: "json", Usage: "print the report as JSON"},
		),
		Action: runPreflight,
	}
}

func runPreflight(c *cli.Context) error {
	ep, err := sourceEndpoint(c)
	if err != nil {
		return err
	}
	dstQMP, dstXML := c.String("dst-qmp"), c.String("dst-xml")
	if (dstQMP == "") == (dstXML == "") {
		return &exitError{exitUsage, fmt.Errorf("give the destination as --dst-qmp SOCKET or --dst-xml FILE (one of them)")}
	}
	ctx, cancel := context.WithTimeout(c.Context, c.Duration("timeout"))
	defer cancel()
	var xml []byte
	if dstXML != "" {
		if xml, err = readXML(dstXML); err != nil {
			return &exitError{exitUsage, err}
		}
	}
	src, err := ep.Dial(ctx)
	if err != nil {
		return &exitError{exitSource, err}
	}
	defer src.Close()
	sf, err := preflight.Gather(ctx, src)
	if err != nil {
		return &exitError{exitSource, fmt.Errorf("source %s: %w", ep, err)}
	}
	var rep preflight.Report
	if dstQMP != "" {
		dst, err := qmp.DialUnix(ctx, dstQMP)
		if err != nil {
			return &exitError{exitDestination, err}
		}
		defer dst.Close()
		df, err := preflight.Gather(ctx, dst)
		if err != nil {
			return &exitError{exitDestination, fmt.Errorf("destination %s: %w", dstQMP, err)}
		}
		rep = preflight.Compare(sf, df)
	} else {
		d, err := preflight.ParseDomainXML(xml)
		if err != nil {
			return &exitError{exitUsage, fmt.Errorf("%s: %w", dstXML, err)}
		}
		var emu *preflight.Emulator
		if e, err := preflight.ProbeEmulator(ctx, d.Emulator); err == nil {
			emu = &e
		}
		rep = preflight.CompareDomain(sf, d, emu)
	}
	if c.Bool("json") {
		jsonOut(rep)
	} else {
		rep.WriteText(os.Stdout)
	}
	if !rep.OK {
		return &exitError{exitDestination, errSilent}
	}
	return nil
}

// readXML reads a domain XML file (or stdin for "-"), at most preflight.MaxDomainXML bytes.
func readXML(path string) ([]byte, error) {
	f := os.Stdin
	if path != "-" {
		var err error
		if f, err = os.Open(path); err != nil {
			return nil, err
		}
		defer f.Close()
	}
	b, err := io.ReadAll(io.LimitReader(f, preflight.MaxDomainXML+1))
	if err != nil {
		return nil, err
	}
	if len(b) > preflight.MaxDomainXML {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, preflight.MaxDomainXML)
	}
	return b, nil
}
