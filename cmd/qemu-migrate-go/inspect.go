package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/qemu-migrate-go/qemu-migrate-go/inspect"
)

func inspectCommand() *cli.Command {
	return &cli.Command{
		Name:      "inspect",
		Usage:     "summarize, verify or take apart a migration stream (a file, or - for a pipe); --diff A B compares two",
		ArgsUsage: "FILE|-  or  --diff A B",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: "print the report as JSON (schema: inspect/schema.json)"},
			&cli.BoolFlag{Name: "diff", Usage: "compare two streams A B (files, or - for one of them): machine type, capabilities, RAM blocks, devices, differing fields"},
			&cli.StringFlag{Name: "device", Usage: "print the decoded fields of this device (idstr or idstr/instance)"},
			&cli.StringFlag{Name: "extract-ram", Usage: "write each RAM block's final content to a file in this folder"},
			&cli.BoolFlag{Name: "verify", Usage: "only check the structure: exit 0 if valid, 7 if not"},
		},
		Action: func(c *cli.Context) error {
			if c.Bool("diff") {
				return runDiff(c)
			}
			if c.NArg() != 1 {
				return &exitError{exitUsage, fmt.Errorf("inspect takes one FILE (or - for standard input)")}
			}
			var in io.Reader = os.Stdin
			if name := c.Args().First(); name != "-" {
				f, err := os.Open(name)
				if err != nil {
					return &exitError{exitUsage, err}
				}
				defer f.Close()
				in = f
			}
			rep, err := inspect.Inspect(in, inspect.Options{Device: c.String("device"), DeviceOut: os.Stdout,
				ExtractRAM: c.String("extract-ram")})
			if rep == nil {
				return &exitError{exitUsage, err}
			}
			switch {
			case c.Bool("verify"):
				if err == nil {
					fmt.Printf("valid: %d bytes, %d sections, vmdesc %s\n", rep.Bytes, len(rep.Sections), map[bool]string{true: "present", false: "absent"}[rep.VMDesc.Present])
				}
			case c.Bool("json"):
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				enc.Encode(rep)
			case c.String("device") == "":
				printReport(os.Stdout, rep)
			}
			for _, w := range rep.Warnings {
				fmt.Fprintln(os.Stderr, "qemu-migrate-go: warning:", w)
			}
			if errors.Is(err, inspect.ErrInvalid) {
				return &exitError{exitInvalid, err}
			}
			return err
		},
	}
}

func printReport(w io.Writer, r *inspect.Report) {
	fmt.Fprintf(w, "%s, %d bytes\n", r.Kind, r.Bytes)
	if r.Multifd != nil {
		m := r.Multifd
		fmt.Fprintf(w, "channel %d, uuid %s: %d packets (%d sync), %d normal pages, %d zero pages\n",
			m.Channel, m.UUID, m.Packets, m.SyncPackets, m.NormalPages, m.ZeroPages)
	} else {
		fmt.Fprintf(w, "version %d, machine %q, capabilities %v", r.Version, r.Machine, r.Capabilities)
		if r.UUID != "" {
			fmt.Fprintf(w, ", uuid %s", r.UUID)
		}
		fmt.Fprintln(w)
	}
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "\nRAM block\tsize\tnormal\tzero\txbzrle\tcompressed\tdistinct\t")
	for _, b := range r.RAMBlocks {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t\n", b.Name, b.UsedLength, b.Normal, b.Zero, b.XBZRLE, b.Compressed, b.Distinct)
	}
	tw.Flush()
	if len(r.Sections) > 0 {
		tw = tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "\nsection\ttype\tid\tinstance\tversion\tbytes\tstart/part/end")
		for _, s := range r.Sections {
			parts := ""
			if s.Type == "live" {
				parts = fmt.Sprintf("%d/%d/%d", s.Start, s.Parts, s.End)
			} else if s.Heuristic {
				parts = "(boundary from footer scan)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\t%s\n", s.Idstr, s.Type, s.ID, s.Instance, s.Version, s.Bytes, parts)
		}
		tw.Flush()
	}
	if len(r.Commands) > 0 {
		fmt.Fprint(w, "\ncommands:")
		for _, c := range r.Commands {
			fmt.Fprintf(w, " %s (%d)×%d", c.Command, c.ID, c.Count)
		}
		fmt.Fprintln(w)
	}
	if r.Multifd == nil {
		fmt.Fprintf(w, "\ndevices: %d; vmdesc: ", len(r.Devices))
		switch {
		case !r.VMDesc.Present:
			fmt.Fprintln(w, "absent")
		case r.VMDesc.Valid:
			fmt.Fprintf(w, "present, %d bytes\n", r.VMDesc.Bytes)
		default:
			fmt.Fprintf(w, "present, %d bytes, unusable: %s\n", r.VMDesc.Bytes, r.VMDesc.Error)
		}
	}
	if r.Error != "" {
		fmt.Fprintf(w, "\nINVALID at offset %d: %s\n", r.ErrorOffset, r.Error)
	}
}

// runDiff is `inspect --diff A B`: exit 0 whether or not they differ ("identical" in --json
// says which), 7 if a stream does not decode (compared as far as it was read).
func runDiff(c *cli.Context) error {
	args := c.Args().Slice()
	if len(args) == 3 && args[2] == "--json" { // urfave/cli reads no flag after the arguments
		args = args[:2]
		c.Set("json", "true")
	}
	if len(args) != 2 {
		return &exitError{exitUsage, fmt.Errorf("inspect --diff takes two streams A B (files, or - for standard input)")}
	}
	if args[0] == "-" && args[1] == "-" {
		return &exitError{exitUsage, fmt.Errorf("inspect --diff: only one of A and B can be standard input")}
	}
	if c.String("device") != "" || c.String("extract-ram") != "" || c.Bool("verify") {
		return &exitError{exitUsage, fmt.Errorf("inspect --diff goes with --json only")}
	}
	open := func(name string) (io.Reader, func(), error) {
		if name == "-" {
			return os.Stdin, func() {}, nil
		}
		f, err := os.Open(name)
		if err != nil {
			return nil, nil, &exitError{exitUsage, err}
		}
		return f, func() { f.Close() }, nil
	}
	a, closeA, err := open(args[0])
	if err != nil {
		return err
	}
	defer closeA()
	b, closeB, err := open(args[1])
	if err != nil {
		return err
	}
	defer closeB()
	d, err := inspect.DiffStreams(a, args[0], b, args[1], inspect.DiffOptions{})
	if d == nil {
		return &exitError{exitUsage, err}
	}
	if c.Bool("json") {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		enc.Encode(d)
	} else {
		d.WriteText(os.Stdout)
	}
	if errors.Is(err, inspect.ErrInvalid) {
		return &exitError{exitInvalid, err}
	}
	return err
}
