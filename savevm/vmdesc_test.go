package savevm

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

type bufConn struct {
	bytes.Buffer
	closed, aborted bool
}

func (b *bufConn) Close() error { b.closed = true; return nil }
func (b *bufConn) Abort()       { b.aborted = true }

// TestRelayDamagedVMDesc: a destination ignores what follows EOF (stream-format.md §5.1), so a
// relay of a stream whose vmdesc is damaged completes, with a warning, and forwards everything up
// to and including EOF unchanged.
func TestRelayDamagedVMDesc(t *testing.T) {
	b := streamtest.Load(t, "idle-7.2")
	eof := bytes.LastIndex(b, []byte{0x00, 0x06})
	damaged := append(append([]byte(nil), b[:eof+1]...), 0x07, 1, 2, 3)
	var warnings []string
	dst := &bufConn{}
	_, err := NewRelay(io.NopCloser(bytes.NewReader(damaged)), dst, nil,
		Options{Warn: func(s string) { warnings = append(warnings, s) }}).Run(context.Background())
	if err != nil {
		t.Fatalf("relay of a stream with a damaged vmdesc: %v", err)
	}
	if !dst.closed || dst.aborted {
		t.Errorf("destination closed %v aborted %v, want a clean close", dst.closed, dst.aborted)
	}
	if !bytes.Equal(dst.Bytes(), b[:eof+1]) {
		t.Errorf("forwarded %d bytes, want the %d up to EOF", dst.Len(), eof+1)
	}
	if len(warnings) == 0 || !strings.Contains(strings.Join(warnings, "\n"), "after EOF") {
		t.Errorf("warnings %q", warnings)
	}
}
