package qmp

import (
	"bufio"
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The QMP server in these tests is a fake: the interleavings they need — an event right between
// a command's reply and the caller reading it, an event between qmp_capabilities and its
// reply — happen with real QEMU (MIGRATION events while migrating) but cannot be timed on
// purpose against it. The real monitor is exercised by TestCommandsAgainstQEMU and compat.

// fakeQMP serves one connection on a unix socket: the greeting, then script(conn, lines).
func fakeQMP(t *testing.T, script func(c net.Conn, in *bufio.Scanner)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte(`{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}` + "\n"))
		script(c, bufio.NewScanner(c))
	}()
	return path
}

func expect(t *testing.T, in *bufio.Scanner, cmd string) bool {
	if !in.Scan() || !strings.Contains(in.Text(), cmd) {
		t.Errorf("fake QMP: got %q, want %s", in.Text(), cmd)
		return false
	}
	return true
}

const event = `{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MIGRATION", "data": {"status": "active"}}`

// TestReplyNotOverwritten: a reply stays what QEMU sent while the next lines (an event, the
// next command's reply) arrive before the caller decodes it. go-qemu's SocketMonitor fails this
// (the reply aliases its scanner's buffer, go-qemu issue 226).
func TestReplyNotOverwritten(t *testing.T) {
	sent := make(chan struct{})
	path := fakeQMP(t, func(c net.Conn, in *bufio.Scanner) {
		if !expect(t, in, "qmp_capabilities") {
			return
		}
		c.Write([]byte(`{"return": {}}` + "\n"))
		if !expect(t, in, "query-migrate") {
			return
		}
		c.Write([]byte(`{"return": {"status": "active"}}` + "\n"))
		<-sent
		time.Sleep(20 * time.Millisecond) // the reply has been read and handed over
		c.Write([]byte(event + "\n" + `{"return": {"status": "running", "running": true}}` + "\n"))
		time.Sleep(200 * time.Millisecond)
	})
	m, err := newSocketMonitor("unix", path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Disconnect()
	if err := m.Connect(); err != nil {
		t.Fatal(err)
	}
	evs, _ := m.Events(context.Background())
	raw, err := m.Run([]byte(`{"execute":"query-migrate"}`))
	if err != nil {
		t.Fatal(err)
	}
	want := string(raw)
	close(sent)
	select {
	case <-evs:
	case <-time.After(5 * time.Second):
		t.Fatal("no event")
	}
	time.Sleep(50 * time.Millisecond) // the unasked-for reply is read too
	if string(raw) != want || want != `{"return": {"status": "active"}}` {
		t.Errorf("the reply changed under the caller: %q, then %q", want, raw)
	}
}

// TestEventDuringHandshake: an event between qmp_capabilities and its reply is kept as an event,
// and the next command gets its own reply (go-qemu pull request 210).
func TestEventDuringHandshake(t *testing.T) {
	path := fakeQMP(t, func(c net.Conn, in *bufio.Scanner) {
		if !expect(t, in, "qmp_capabilities") {
			return
		}
		c.Write([]byte(event + "\n"))
		time.Sleep(10 * time.Millisecond)
		c.Write([]byte(`{"return": {}}` + "\n"))
		if !expect(t, in, "query-status") {
			return
		}
		c.Write([]byte(`{"return": {"status": "paused", "running": false}}` + "\n"))
		time.Sleep(200 * time.Millisecond)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	mon, err := newSocketMonitor("unix", path, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c, err := New(ctx, mon)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	st, err := c.QueryStatus(ctx)
	if err != nil || st.Status != "paused" {
		t.Errorf("query-status: %+v, %v; want paused", st, err)
	}
}

// TestErrorsAndLimits: QEMU's error replies are command errors, a line past maxLineSize ends
// the connection instead of growing the buffer, and a monitor that closes fails the call.
func TestErrorsAndLimits(t *testing.T) {
	path := fakeQMP(t, func(c net.Conn, in *bufio.Scanner) {
		if !expect(t, in, "qmp_capabilities") {
			return
		}
		c.Write([]byte(`{"return": {}}` + "\n"))
		if !expect(t, in, "cont") {
			return
		}
		c.Write([]byte(`{"error": {"class": "GenericError", "desc": "Migration is not finalized yet"}}` + "\n"))
		if !expect(t, in, "query-status") {
			return
		}
		big := make([]byte, 1<<20)
		for i := range big {
			big[i] = ' '
		}
		for n := 0; n <= maxLineSize; n += len(big) {
			if _, err := c.Write(big); err != nil {
				return
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := DialUnix(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Cont(ctx)
	if ce, ok := err.(*CommandError); !ok || ce.Desc != "Migration is not finalized yet" {
		t.Errorf("cont: %v, want QEMU's error", err)
	}
	if _, err := c.QueryStatus(ctx); err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Errorf("query-status on an endless line: %v", err)
	}
}
