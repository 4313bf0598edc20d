package main

import (
	"fmt"

	"github.com/urfave/cli/v2"
)

// reportCommand draws a migration's JSON-lines events as a self-contained HTML page (issue 13).
func reportCommand() *cli.Command {
	return &cli.Command{
		Name:      "report",
		Usage:     "draw a migration's --json events as a self-contained HTML page",
		ArgsUsage: "EVENTS.jsonl",
		Hidden:    true, // until it exists
		Action: func(c *cli.Context) error {
			return &exitError{exitUsage, fmt.Errorf("report: not built yet")}
		},
	}
}
