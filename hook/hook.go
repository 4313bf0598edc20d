// Package hook is the libvirt hook (/etc/libvirt/hooks/qemu, or a script in
// /etc/libvirt/hooks/qemu.d/): libvirt's calling convention — arguments, the domain XML on
// stdin, the exit status that lets an operation go on or stops it. It is its own folder because
// that convention is a contract with libvirtd, apart from the checks, which live in preflight.
//
// libvirt waits for the hook while it holds the domain's lock: a hook must not call back into
// libvirt (it would deadlock), must not leave a child holding stdout or stderr (libvirt reads
// them to the end), and must be quick. Run does none of the first two and bounds itself with
// Timeout.
package hook

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/preflight"
)

// Exit statuses (README, "libvirt"). libvirt stops the operation on any status but 0 and shows
// the hook's stderr in its error.
const (
	ExitOK           = 0 // let the operation go on (also: every operation the hook does not check)
	ExitUsage        = 2 // unusable arguments or XML for an operation it checks
	ExitIncompatible = 4 // the incoming domain cannot run on this host: the migration stops here
)

// Timeout bounds a whole invocation: libvirt is waiting.
const Timeout = 5 * time.Second

// MaxXML caps the domain XML read from stdin: what preflight accepts.
const MaxXML = preflight.MaxDomainXML

// Run handles one invocation: args are libvirt's (DOMAIN OPERATION SUB-OPERATION EXTRA), stdin
// carries the domain XML, problems go to stderr as one line. Only `migrate begin` — the
// incoming side of a migration, before libvirt starts the destination QEMU — is checked: the
// incoming XML against the local emulator. The XML is never rewritten (nothing is printed on
// stdout), so libvirt keeps it as it is.
func Run(ctx context.Context, args []string, stdin io.Reader, stderr io.Writer) int {
	ctx, cancel := context.WithTimeout(ctx, Timeout)
	defer cancel()
	if len(args) < 3 {
		fmt.Fprintf(stderr, "qemu-migrate-go hook: want the arguments libvirt gives (DOMAIN OPERATION SUB-OPERATION EXTRA), got %q\n", args)
		return ExitUsage
	}
	domain, op, sub := args[0], args[1], args[2]
	// libvirt writes the XML to every hook call: read it all (bounded) so that it never meets a
	// closed pipe, even for the operations not checked.
	xml, err := readAll(ctx, stdin, MaxXML)
	if op != "migrate" || sub != "begin" {
		return ExitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "qemu-migrate-go hook: migrate begin of %s: reading the domain XML from stdin: %v\n", domain, err)
		return ExitUsage
	}
	d, err := preflight.ParseDomainXML(xml)
	if err != nil {
		fmt.Fprintf(stderr, "qemu-migrate-go hook: migrate begin of %s: %v\n", domain, err)
		return ExitUsage
	}
	var problems []string
	for _, c := range preflight.CheckIncoming(ctx, d) {
		if c.Severity == preflight.SeverityError {
			problems = append(problems, c.Message)
		}
	}
	if ctx.Err() != nil {
		problems = append(problems, fmt.Sprintf("checks did not finish within %v", Timeout))
	}
	if len(problems) > 0 {
		fmt.Fprintf(stderr, "qemu-migrate-go hook: %s cannot be migrated to this host: %s\n", domain, strings.Join(problems, "; "))
		return ExitIncompatible
	}
	return ExitOK
}

// readAll reads r to the end, at most limit bytes, before ctx ends.
func readAll(ctx context.Context, r io.Reader, limit int64) ([]byte, error) {
	if r == nil {
		return nil, errors.New("no stdin")
	}
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		b, err := io.ReadAll(io.LimitReader(r, limit+1))
		done <- result{b, err}
	}()
	select {
	case res := <-done:
		if res.err != nil {
			return nil, res.err
		}
		if int64(len(res.b)) > limit {
			return nil, fmt.Errorf("more than %d bytes", limit)
		}
		return res.b, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("stdin not closed: %w", ctx.Err())
	}
}
