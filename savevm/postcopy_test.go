package savevm

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// fakeControl is a source QEMU's monitor that reports a migration setting up (the policy then
// decides nothing): enough to run the engine in bridge mode without a QEMU.
type fakeControl struct{}

func (fakeControl) QueryMigrate(context.Context) (qmp.MigrationInfo, error) {
	return qmp.MigrationInfo{Status: "setup"}, nil
}
func (fakeControl) SetParameters(context.Context, map[string]any) error { return nil }
func (fakeControl) SetCapabilities(context.Context, map[string]bool) error {
	return nil
}
func (fakeControl) Stop(context.Context) error                 { return nil }
func (fakeControl) MigrateStartPostcopy(context.Context) error { return nil }

// hostileDst is a destination whose return path sends rp; what it is sent is discarded.
type hostileDst struct {
	rp     io.Reader
	closed chan struct{}
}

func (d *hostileDst) Write(p []byte) (int, error) { return len(p), nil }
func (d *hostileDst) Read(p []byte) (int, error)  { return d.rp.Read(p) }
func (d *hostileDst) Close() error                { return nil }
func (d *hostileDst) Abort()                      {}

// TestPostcopyHostileReturnPath: in postcopy the destination's return path is decoded on its
// way to the source; bytes that are not a valid return path end the relay with an error that
// names the offset, and nothing of it reaches the source. A fake destination stands in for QEMU
// here: a real one does not send broken return paths.
func TestPostcopyHostileReturnPath(t *testing.T) {
	c := streamtest.LoadPostcopy(t, "postcopy-7.2")
	main := c.Read(t, streamtest.PostcopyMain)
	good := c.Read(t, streamtest.PostcopyRP)
	for _, tc := range []struct {
		name string
		rp   []byte
		want string
	}{
		{"unknown type", []byte{0x00, 0x63, 0x00, 0x00}, "offset 0"},
		{"REQ_PAGES without a block", []byte{0x00, 0x04, 0x00, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x10, 0}, "offset 0"},
		{"bad message after good ones", append(append([]byte{}, good[:8]...), 0x00, 0x02, 0x00, 0x09), "offset 8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			relaySide, srcSide := net.Pipe()
			go func() {
				srcSide.Write(main)
			}()
			go io.Copy(io.Discard, srcSide) // what the relay writes back to the source
			dst := &hostileDst{rp: bytes.NewReader(tc.rp), closed: make(chan struct{})}
			r := NewRelay(relaySide, dst, fakeControl{}, Options{Policy: Policy{Postcopy: true}})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := r.Run(ctx)
			srcSide.Close()
			var de *DestinationError
			if !errors.As(err, &de) || !strings.Contains(err.Error(), "return path") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want a destination error about its return path at %s", err, tc.want)
			}
			var se *stream.Error
			if !errors.As(err, &se) {
				t.Errorf("not a *stream.Error: %v", err)
			}
			t.Log(err)
		})
	}
}
