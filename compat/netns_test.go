package compat

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// linkConn is one TCP connection across a pair: dialled from the source host, accepted on the
// destination host.
type linkConn struct {
	src, dst net.Conn
	l        net.Listener
}

func dialAcross(t *testing.T, p *NetPair) linkConn {
	t.Helper()
	l, err := p.Dst.Listen("tcp", netip.AddrPortFrom(p.Dst.Addr, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src, err := p.Src.Dial(ctx, "tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	var dst net.Conn
	select {
	case dst = <-accepted:
	case <-ctx.Done():
		t.Fatal("the destination host never accepted the connection")
	}
	if dst == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { dst.Close() })
	return linkConn{src: src, dst: dst, l: l}
}

// sendAcross writes n bytes from the source host to the destination host on a fresh connection
// and returns how long it took until the destination had read them all.
func sendAcross(t *testing.T, p *NetPair, n int) time.Duration {
	t.Helper()
	c := dialAcross(t, p)
	got := make(chan int64, 1)
	go func() {
		k, _ := io.Copy(io.Discard, c.dst)
		got <- k
	}()
	start := time.Now()
	buf := make([]byte, 256<<10)
	c.src.SetWriteDeadline(time.Now().Add(time.Minute))
	for left := n; left > 0; {
		k, err := c.src.Write(buf[:min(left, len(buf))])
		if err != nil {
			t.Fatal(err)
		}
		left -= k
	}
	c.src.(*net.TCPConn).CloseWrite()
	select {
	case k := <-got:
		if k != int64(n) {
			t.Fatalf("destination read %d bytes, want %d", k, n)
		}
	case <-time.After(time.Minute):
		t.Fatal("the destination never read everything")
	}
	return time.Since(start)
}

// hostAddrs returns the addresses of the host's own namespace (where the test process runs).
func hostAddrs(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "-o", "addr", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip addr: %v: %s", err, out)
	}
	return string(out)
}

// TestNetPair makes a pair and checks it: the namespaces and their veth exist, the addresses
// live only inside them (the host's own namespace gains neither a device nor an address), TCP
// crosses the link both ways and the counters count exactly that, and everything is gone after
// the test that made it.
func TestNetPair(t *testing.T) {
	var names []string
	before := hostAddrs(t)
	t.Run("pair", func(t *testing.T) {
		p := NewNetPair(t, NetOptions{})
		names = []string{p.Src.Name, p.Dst.Name}
		for _, n := range names {
			if !slices.Contains(ListNetns(), n) {
				t.Fatalf("namespace %s missing; have %v", n, ListNetns())
			}
		}
		if after := hostAddrs(t); after != before || strings.Contains(after, "10.77.") || strings.Contains(after, "qmg-") {
			t.Errorf("the host's own namespace changed:\nbefore:\n%s\nafter:\n%s", before, after)
		}
		out, err := p.Src.Command(context.Background(), "ip", "-o", "addr", "show", "dev", p.Src.Dev).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "10.77.0.1/30") {
			t.Errorf("source host's veth: %v: %s", err, out)
		}
		// Once the connection exists (ARP resolved, handshake done), count a known transfer.
		const n = 4 << 20
		c0, err := p.Counters()
		if err != nil {
			t.Fatal(err)
		}
		sendAcross(t, p, n)
		c1, err := p.Counters()
		if err != nil {
			t.Fatal(err)
		}
		d := c1.Sub(c0)
		t.Logf("%d payload bytes: %d bytes src→dst, %d dst→src on the veth", n, d.SrcToDst, d.DstToSrc)
		// Payload plus headers (at most ~5 % at 1500-byte frames) and the handshake.
		if d.SrcToDst < n || d.SrcToDst > n+n/20+64<<10 {
			t.Errorf("src→dst counted %d bytes for %d payload bytes", d.SrcToDst, n)
		}
		if d.DstToSrc == 0 || d.DstToSrc > n/10 {
			t.Errorf("dst→src counted %d bytes: want the ACKs of %d bytes", d.DstToSrc, n)
		}
		// The other way round too.
		back := dialAcross(t, p)
		go back.dst.Write([]byte("pong"))
		buf := make([]byte, 4)
		back.src.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(back.src, buf); err != nil || string(buf) != "pong" {
			t.Errorf("dst→src: %q %v", buf, err)
		}
	})
	for _, n := range names {
		if slices.Contains(ListNetns(), n) {
			t.Errorf("namespace %s outlived its test", n)
		}
		if _, err := os.Stat(filepath.Join(netnsDir, n)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s/%s still exists (%v)", netnsDir, n, err)
		}
	}
	if after := hostAddrs(t); after != before {
		t.Errorf("the host's own namespace changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestNetPairHelper is not a test: it is the child process of TestNetPairCleanup, which runs this
// test binary again with QMG_NETNS_HELPER set. It makes a pair, writes its namespaces' names to
// QMG_NETNS_HELPER_OUT, then fails ("fail") or waits to be killed ("hang").
func TestNetPairHelper(t *testing.T) {
	mode := os.Getenv("QMG_NETNS_HELPER")
	if mode == "" {
		t.Skip("helper process of TestNetPairCleanup")
	}
	p := NewNetPair(t, NetOptions{Rate: "100mbit"})
	if err := os.WriteFile(os.Getenv("QMG_NETNS_HELPER_OUT"), []byte(p.Src.Name+"\n"+p.Dst.Name+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	switch mode {
	case "fail":
		t.Fatal("failing on purpose, with the pair still up")
	case "hang":
		time.Sleep(time.Minute) // killed by the parent long before
	}
}

// TestNetPairCleanup shows that no namespace outlives a test: one whose body fails (its
// cleanup still removes the pair) and one that is killed outright (the next NewNetPair removes
// what it left: a namespace with the prefix whose PID is dead).
func TestNetPairCleanup(t *testing.T) {
	run := func(mode string) (*exec.Cmd, string) {
		out := filepath.Join(t.TempDir(), "names")
		cmd := exec.Command(os.Args[0], "-test.run=^TestNetPairHelper$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), "QMG_NETNS_HELPER="+mode, "QMG_NETNS_HELPER_OUT="+out)
		return cmd, out
	}
	readNames := func(file string) []string {
		b, _ := os.ReadFile(file)
		return strings.Fields(string(b))
	}
	t.Run("failed test", func(t *testing.T) {
		cmd, file := run("fail")
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "failing on purpose") {
			t.Fatalf("the helper did not fail as it should: %v\n%s", err, out)
		}
		names := readNames(file)
		if len(names) != 2 {
			t.Fatalf("the helper named no namespaces:\n%s", out)
		}
		for _, n := range names {
			if slices.Contains(ListNetns(), n) {
				t.Errorf("namespace %s outlived the failed test", n)
			}
		}
	})
	t.Run("killed test", func(t *testing.T) {
		cmd, file := run("hang")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for len(readNames(file)) < 2 {
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatal("the helper never made its pair")
			}
			time.Sleep(20 * time.Millisecond)
		}
		cmd.Process.Kill() // by its own PID: no cleanup runs
		cmd.Wait()
		names := readNames(file)
		for _, n := range names {
			if !slices.Contains(ListNetns(), n) {
				t.Fatalf("namespace %s vanished by itself: the killed case proves nothing", n)
			}
		}
		p := NewNetPair(t, NetOptions{}) // removes what the killed run left
		for _, n := range names {
			if slices.Contains(ListNetns(), n) {
				t.Errorf("stale namespace %s not removed", n)
			}
		}
		if !slices.Contains(ListNetns(), p.Src.Name) {
			t.Error("the new pair is missing")
		}
	})
}

// TestNetPairShaping sends 4 MB through a 50 Mbit/s pair. Only the order of magnitude is
// asserted: at most 1.5 × the rate (the token bucket cannot let more through, whatever the
// machine's speed) and at least a tenth of it.
func TestNetPairShaping(t *testing.T) {
	const rate = 50e6 // bit/s
	p := NewNetPair(t, NetOptions{Rate: "50mbit"})
	out, err := exec.Command("tc", "-n", p.Src.Name, "qdisc", "show", "dev", p.Src.Dev).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "tbf") || !strings.Contains(string(out), "50Mbit") {
		t.Fatalf("no tbf on the veth: %v: %s", err, out)
	}
	const n = 4e6
	took := sendAcross(t, p, n)
	got := n * 8 / took.Seconds()
	t.Logf("%d bytes in %v: %.1f Mbit/s through a 50 Mbit/s link", int(n), took.Round(time.Millisecond), got/1e6)
	if got > 1.5*rate || got < rate/10 {
		t.Errorf("%.1f Mbit/s through a 50 Mbit/s link", got/1e6)
	}
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]uint64{"1gbit": 1e9, "100mbit": 1e8, "2.5gbit": 25e8, "800kbit": 8e5, "64bit": 64, "1Gbit": 1e9} {
		if got, err := ParseRate(in); err != nil || got != want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "1g", "1gbps", "fast", "-1mbit", "0bit", "100tbit"} {
		if _, err := ParseRate(in); err == nil {
			t.Errorf("ParseRate(%q) accepted", in)
		}
	}
}

// isTimeout reports whether err is a deadline or timeout error.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestNetPairStall: on a stalled link data sent does not arrive and a new connection times out
// (nothing answers: no RST, no ICMP); after Heal the same connection delivers what was sent.
func TestNetPairStall(t *testing.T) {
	p := NewNetPair(t, NetOptions{})
	c := dialAcross(t, p)
	if err := p.Stall(); err != nil {
		t.Fatal(err)
	}
	msg := []byte("sent while the link was stalled")
	if _, err := c.src.Write(msg); err != nil {
		t.Fatalf("write on a stalled link: %v (the sender must not notice)", err)
	}
	c.dst.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	buf := make([]byte, len(msg))
	if k, err := c.dst.Read(buf); !isTimeout(err) {
		t.Fatalf("read on a stalled link: %d bytes, %v; want nothing until the deadline", k, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	_, err := p.Src.Dial(ctx, "tcp", c.l.Addr().String())
	cancel()
	if !isTimeout(err) && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial on a stalled link: %v; want a timeout (a dead peer answers nothing)", err)
	}
	if err := p.Heal(); err != nil {
		t.Fatal(err)
	}
	c.dst.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(c.dst, buf); err != nil || string(buf) != string(msg) {
		t.Fatalf("after Heal: %q, %v", buf, err)
	}
	sendAcross(t, p, 1<<20) // and new connections work again
}

// TestNetPairReset: Reset aborts the connections between the hosts at once — the destination's
// end gets the RST (ECONNRESET), the source's is destroyed (ECONNABORTED) — while the listener
// stays up and a new connection works. Reset on a stalled link aborts both ends all the same
// (the RST cannot cross: both are destroyed). A TIME-WAIT remnant is not counted.
func TestNetPairReset(t *testing.T) {
	readErr := func(c net.Conn) chan error {
		ch := make(chan error, 1)
		go func() {
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			_, err := bufio.NewReader(c).ReadByte()
			ch <- err
		}()
		return ch
	}
	wait := func(t *testing.T, side string, ch chan error, want ...syscall.Errno) {
		t.Helper()
		err := <-ch
		for _, w := range want {
			if errors.Is(err, w) {
				t.Logf("%s: %v", side, err)
				return
			}
		}
		t.Errorf("%s end: %v; want %v", side, err, want)
	}
	t.Run("live", func(t *testing.T) {
		p := NewNetPair(t, NetOptions{})
		old := dialAcross(t, p) // closed first by the source: its end lingers in TIME-WAIT
		oldPort := old.src.LocalAddr().(*net.TCPAddr).Port
		old.src.Close()
		old.dst.Close()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			out, err := p.Src.Command(context.Background(), "ss", "-t", "-n", "-H", "state", "time-wait", "sport", fmt.Sprint(oldPort)).Output()
			if err == nil && strings.TrimSpace(string(out)) != "" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the closed connection never reached TIME-WAIT: %v %s", err, out)
			}
		}
		c := dialAcross(t, p)
		srcErr, dstErr := readErr(c.src), readErr(c.dst)
		n, err := p.Reset()
		if err != nil || n != 1 {
			t.Fatalf("Reset: %d sockets, %v; want the source's end of the one connection", n, err)
		}
		wait(t, "destination", dstErr, syscall.ECONNRESET)
		wait(t, "source", srcErr, syscall.ECONNABORTED)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		again, err := p.Src.Dial(ctx, "tcp", c.l.Addr().String())
		if err != nil {
			t.Fatalf("dial after Reset: %v", err)
		}
		again.Close()
	})
	t.Run("stalled", func(t *testing.T) {
		p := NewNetPair(t, NetOptions{})
		c := dialAcross(t, p)
		srcErr, dstErr := readErr(c.src), readErr(c.dst)
		if err := p.Stall(); err != nil {
			t.Fatal(err)
		}
		if n, err := p.Reset(); err != nil || n != 2 {
			t.Fatalf("Reset: %d sockets, %v; want both ends", n, err)
		}
		wait(t, "destination", dstErr, syscall.ECONNABORTED, syscall.ECONNRESET)
		wait(t, "source", srcErr, syscall.ECONNABORTED)
	})
}

// TestNetHostDoStaysInside: sockets made by Do belong to the namespace, and the test process's
// other goroutines stay in the host's (the thread that joined is put back before it is reused).
func TestNetHostDoStaysInside(t *testing.T) {
	p := NewNetPair(t, NetOptions{})
	self, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	var inside string
	if err := p.Src.Do(func() error {
		inside, err = os.Readlink("/proc/thread-self/ns/net")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if inside == self {
		t.Fatalf("Do ran in the host's namespace %s", self)
	}
	for i := 0; i < 50; i++ { // goroutines on every thread the runtime has
		ch := make(chan string)
		go func() { ns, _ := os.Readlink("/proc/thread-self/ns/net"); ch <- ns }()
		if ns := <-ch; ns != self {
			t.Fatalf("a goroutine ran in %s after Do, not the host's %s", ns, self)
		}
	}
	if _, err := p.Src.Dial(context.Background(), "tcp", "dst.example:80"); err == nil || !strings.Contains(err.Error(), "not IP:PORT") {
		t.Errorf("Dial with a name: %v", err)
	}
}

// TestNetHostDoKeepsChildren: Do must not end the threads it uses. Linux sends Pdeathsig (which
// StartVM sets: SIGKILL) when the thread that forked a child ends, so a Do that let its thread
// die killed whichever QEMUs had been forked from it — found when a VM died in TestLinkDirect.
func TestNetHostDoKeepsChildren(t *testing.T) {
	p := NewNetPair(t, NetOptions{})
	var kids []*exec.Cmd
	for i := 0; i < 8; i++ {
		done := make(chan *exec.Cmd)
		go func() { // forked from whatever threads the runtime has
			cmd := exec.Command("sleep", "60")
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			if err := cmd.Start(); err != nil {
				t.Error(err)
				cmd = nil
			}
			done <- cmd
		}()
		if cmd := <-done; cmd != nil {
			kids = append(kids, cmd)
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		}
	}
	for i := 0; i < 300; i++ {
		if err := p.Src.Do(func() error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond) // a signal sent is delivered by now
	for _, k := range kids {
		var ws syscall.WaitStatus
		if pid, _ := syscall.Wait4(k.Process.Pid, &ws, syscall.WNOHANG, nil); pid != 0 {
			t.Errorf("child %d ended (signal %v) while Do ran", k.Process.Pid, ws.Signal())
		}
	}
}
