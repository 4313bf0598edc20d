package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/qemu-migrate-go/qemu-migrate-go/report"
)

// reportCommand draws a migration's JSON-lines events as a self-contained HTML page.
func reportCommand() *cli.Command {
	return &cli.Command{
		Name:      "report",
		Usage:     "draw a migration's --json events (or a --detach log) as a self-contained HTML page",
		ArgsUsage: "EVENTS.jsonl|- [-o report.html|-]",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "the page to write (- for standard output); default: EVENTS with .html"},
		},
		Action: func(c *cli.Context) error {
			args, out := c.Args().Slice(), c.String("output")
			// urfave/cli stops reading flags at the first argument: accept the documented
			// `report EVENTS.jsonl -o report.html` too.
			if len(args) == 3 && (args[1] == "-o" || args[1] == "--output") {
				args, out = args[:1], args[2]
			} else if len(args) == 2 && (strings.HasPrefix(args[1], "-o=") || strings.HasPrefix(args[1], "--output=")) {
				args, out = args[:1], args[1][strings.IndexByte(args[1], '=')+1:]
			}
			if len(args) != 1 {
				return &exitError{exitUsage, fmt.Errorf("report takes one EVENTS file (or - for standard input), then optionally -o FILE")}
			}
			name := args[0]
			var in io.Reader = os.Stdin
			if name != "-" {
				f, err := os.Open(name)
				if err != nil {
					return &exitError{exitUsage, err}
				}
				defer f.Close()
				in = f
			}
			if out == "" {
				out = "-"
				if name != "-" {
					out = strings.TrimSuffix(name, filepath.Ext(name)) + ".html"
				}
			}
			if out != "-" && out == name {
				return &exitError{exitUsage, fmt.Errorf("report: the page %s would overwrite the log", out)}
			}
			run, err := report.Read(in, report.Options{})
			if err != nil {
				return &exitError{exitUsage, err}
			}
			var page bytes.Buffer
			if err := report.WriteHTML(&page, run, filepath.Base(name)); err != nil {
				return &exitError{exitInternal, err}
			}
			if out == "-" {
				_, err = os.Stdout.Write(page.Bytes())
				return err
			}
			if err := os.WriteFile(out, page.Bytes(), 0o644); err != nil {
				return &exitError{exitUsage, err}
			}
			fmt.Fprintf(os.Stderr, "qemu-migrate-go: wrote %s (%d KiB): %s\n", out, (page.Len()+1023)>>10, run.Status())
			return nil
		},
	}
}
