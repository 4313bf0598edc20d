package hook

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"
)

// run calls Run with a deadline and returns its status and stderr.
func run(t *testing.T, timeout time.Duration, stdin io.Reader, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var stderr bytes.Buffer
	start := time.Now()
	code := Run(ctx, args, stdin, &stderr)
	if took := time.Since(start); took > timeout+time.Second {
		t.Fatalf("Run took %v, past its deadline %v", took, timeout)
	}
	return code, stderr.String()
}

// The operations the hook does not check go on whatever the XML — libvirt calls the hook for
// every domain start and stop.
func TestUncheckedOperations(t *testing.T) {
	for _, op := range [][2]string{{"prepare", "begin"}, {"start", "begin"}, {"started", "begin"},
		{"stopped", "end"}, {"release", "end"}, {"migrate", "end"}, {"restore", "begin"}, {"reconnect", "begin"}} {
		code, stderr := run(t, 2*time.Second, strings.NewReader("<not xml"), "vm1", op[0], op[1], "-")
		if code != ExitOK || stderr != "" {
			t.Errorf("%s %s: exit %d, stderr %q; want 0 and nothing", op[0], op[1], code, stderr)
		}
	}
}

func TestBadInput(t *testing.T) {
	cases := []struct {
		name  string
		stdin io.Reader
		args  []string
		code  int
		say   string
	}{
		{"no-arguments", strings.NewReader(""), nil, ExitUsage, "want the arguments libvirt gives"},
		{"not-xml", strings.NewReader("<domain"), []string{"vm1", "migrate", "begin", "-"}, ExitUsage, "vm1"},
		{"empty", strings.NewReader(""), []string{"vm1", "migrate", "begin", "-"}, ExitUsage, "vm1"},
		{"too-large", io.LimitReader(zeros{}, MaxXML+10), []string{"vm1", "migrate", "begin", "-"}, ExitUsage, "more than"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, stderr := run(t, 5*time.Second, c.stdin, c.args...)
			if code != c.code || !strings.Contains(stderr, c.say) || strings.Count(stderr, "\n") != 1 {
				t.Errorf("exit %d, stderr %q; want %d and one line saying %q", code, stderr, c.code, c.say)
			}
		})
	}
}

// A stdin that is never closed must not hold libvirt up past the deadline.
func TestStdinNeverClosed(t *testing.T) {
	r, w := io.Pipe()
	defer w.Close()
	code, stderr := run(t, 300*time.Millisecond, r, "vm1", "migrate", "begin", "-")
	if code != ExitUsage || !strings.Contains(stderr, "stdin not closed") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = ' '
	}
	return len(p), nil
}
