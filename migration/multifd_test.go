package migration

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// TestAcceptSourceChannelNeverArrives: a source that opens its main connection and only one of
// its two multifd channels makes the sidecar give up within the deadline, saying how many came.
// A fake source stands in for QEMU here: a real QEMU always opens every channel it has, so this
// fault cannot be made with one.
func TestAcceptSourceChannelNeverArrives(t *testing.T) {
	m := &migration{multifd: &multifdPlan{channels: 2, layout: stream.MultifdV72}}
	if err := m.listenPrivate(); err != nil {
		t.Fatal(err)
	}
	defer m.close()
	addr := m.private.Addr().String()
	go func() {
		main, err := net.Dial("unix", addr)
		if err != nil {
			return
		}
		defer main.Close()
		main.Write([]byte("QEVM\x00\x00\x00\x03"))
		ch, err := net.Dial("unix", addr)
		if err != nil {
			return
		}
		defer ch.Close()
		h := stream.MultifdHello{Magic: stream.MultifdMagic, Version: stream.MultifdVersion, ChannelID: 1}
		ch.Write(h.Append(nil))
		time.Sleep(3 * time.Second)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := m.acceptSource(ctx)
	if err == nil || !strings.Contains(err.Error(), "the source opened 1 of its 2 multifd channels") {
		t.Fatalf("got %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("gave up after %v", d)
	}
	t.Log(err)
}
