package compat

// A NetPair is two network namespaces — a "source host" and a "destination host" — joined by a
// veth pair, for tests and benchmarks that must cross a real network link (the sidecar pair of
// issue 10, and QEMU's own TCP, TLS and multifd migrations it is compared with).
//
// Rules it keeps (binding for the whole suite): addresses (10.77.0.1/30 and 10.77.0.2/30) exist
// only inside the two namespaces the test made; nothing is added to the host's own namespace (the
// veth ends are created directly inside the namespaces); everything is removed when the test ends,
// also after a failure (t.Cleanup), and a namespace left by a run that was killed is recognised by
// NetnsPrefix and the dead PID in its name and removed by the next NewNetPair. A process in the
// host namespace must never dial these addresses itself (they would be routed out of the
// machine): run programs with NetHost.Command and create sockets with NetHost.Listen / Dial.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	xunix "golang.org/x/sys/unix"
)

// NetnsPrefix starts the name of every namespace this suite makes:
// "qmgnet-<pid of the test process>-<sequence>-src|dst". Nothing else on a machine uses it, so a
// namespace with this prefix whose PID is dead was left by a killed run and may be removed.
const NetnsPrefix = "qmgnet-"

// netnsDir is where `ip netns` keeps its named namespaces (bind mounts of /proc/PID/ns/net).
const netnsDir = "/var/run/netns"

// The link's addresses: one /30 inside the pair's own namespaces (each pair has its own
// namespaces, so every pair may use the same subnet without seeing another).
var (
	LinkSrcAddr = netip.MustParseAddr("10.77.0.1")
	LinkDstAddr = netip.MustParseAddr("10.77.0.2")
)

const linkPrefixLen = 30

// Veth device names, one in each namespace.
const (
	linkSrcDev = "qmg-src"
	linkDstDev = "qmg-dst"
)

// NetOptions shapes a NetPair.
type NetOptions struct {
	// Rate limits each direction of the link (a token bucket, `tc qdisc … tbf`, on both veth
	// ends' egress) in tc's bit units: "1gbit", "100mbit", "500kbit". "" leaves the link
	// unshaped: a veth, as fast as the two cores can copy (several Gbit/s here).
	//
	// The bucket holds 4 ms of the rate (at least 64 KiB, the largest GSO packet a veth hands
	// tbf, so that tbf never has to split one): the qdisc is refilled by an hrtimer, but on a
	// busy 2-core machine that timer's softirq can run a few ms late, and tokens beyond the
	// bucket are lost, so a smaller bucket would shape below the rate; 4 ms lets through a
	// burst of 500 KB at 1 Gbit/s, 0.05 % of a 1 GiB migration. Its queue holds 5 ms
	// (`latency`), about a switch port's buffer: TCP's bursts are queued rather than dropped,
	// and the round trip grows by at most 5 ms.
	Rate string
}

// NetPair is two namespaces joined by a veth pair; see the file comment. Src and Dst are its ends.
type NetPair struct {
	Src, Dst *NetHost
	Options  NetOptions

	nextPort atomic.Int32
	mu       sync.Mutex
	stalled  bool
}

// NetHost is one end of a NetPair: a namespace with one veth device and one address.
type NetHost struct {
	Name string     // the namespace's name (`ip netns exec NAME`)
	Dev  string     // its veth device
	Addr netip.Addr // its address on the link
	Peer netip.Addr // the other end's address
}

var netnsSeq atomic.Int32

// netnsNameRE matches this suite's namespace names and captures the owner's PID.
var netnsNameRE = regexp.MustCompile(`^` + regexp.QuoteMeta(NetnsPrefix) + `(\d+)-\d+-(src|dst)$`)

// NewNetPair makes a fresh pair for t, shaped by opt, and removes it when t ends (before that,
// the pair's own cleanup runs after the cleanups registered later, e.g. the VMs started in it).
// It first removes namespaces that killed runs left behind. A pair that cannot be made (not
// root, no `ip`, a kernel without veth) fails t with the reason: it is never skipped.
func NewNetPair(t testing.TB, opt NetOptions) *NetPair {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("network namespaces need root (euid %d): the link tests create namespaces with veth pairs", os.Geteuid())
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("ip (iproute2) is needed for the link's network namespaces: %v", err)
	}
	var rateBits uint64
	if opt.Rate != "" {
		var err error
		if rateBits, err = ParseRate(opt.Rate); err != nil {
			t.Fatal(err)
		}
		if _, err := exec.LookPath("tc"); err != nil {
			t.Fatalf("tc (iproute2) is needed to shape the link to %s: %v", opt.Rate, err)
		}
	}
	for _, name := range RemoveStaleNetns() {
		t.Logf("removed network namespace %s left by a run that was killed", name)
	}
	seq := netnsSeq.Add(1)
	base := fmt.Sprintf("%s%d-%d-", NetnsPrefix, os.Getpid(), seq)
	p := &NetPair{
		Src:     &NetHost{Name: base + "src", Dev: linkSrcDev, Addr: LinkSrcAddr, Peer: LinkDstAddr},
		Dst:     &NetHost{Name: base + "dst", Dev: linkDstDev, Addr: LinkDstAddr, Peer: LinkSrcAddr},
		Options: opt,
	}
	p.nextPort.Store(40000)
	// Registered before anything exists, so that a half-made pair is removed too.
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("removing the link's namespaces: %v", err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Both ends are created inside their namespaces: no device ever appears on the host.
	for _, argv := range [][]string{
		{"ip", "netns", "add", p.Src.Name},
		{"ip", "netns", "add", p.Dst.Name},
		{"ip", "link", "add", p.Src.Dev, "netns", p.Src.Name, "type", "veth", "peer", "name", p.Dst.Dev, "netns", p.Dst.Name},
	} {
		if _, err := runTool(ctx, argv...); err != nil {
			t.Fatalf("making the link's namespaces: %v", err)
		}
	}
	for _, h := range []*NetHost{p.Src, p.Dst} {
		// Before the link comes up: no IPv6 on the veth (router solicitations and MLD reports
		// would cross the link and blur its byte counters).
		if err := h.disableIPv6(); err != nil {
			t.Fatal(err)
		}
		steps := [][]string{
			{"ip", "-n", h.Name, "link", "set", "lo", "up"},
			{"ip", "-n", h.Name, "addr", "add", fmt.Sprintf("%s/%d", h.Addr, linkPrefixLen), "dev", h.Dev},
			{"ip", "-n", h.Name, "link", "set", h.Dev, "up"},
		}
		if rateBits > 0 {
			burst := max(rateBits/8*4/1000, 64<<10) // 4 ms of the rate, ≥ one 64 KiB GSO packet
			steps = append(steps, []string{"tc", "-n", h.Name, "qdisc", "replace", "dev", h.Dev, "root", "tbf",
				"rate", fmt.Sprintf("%dbit", rateBits), "burst", strconv.FormatUint(burst, 10), "latency", "5ms"})
		}
		for _, argv := range steps {
			if _, err := runTool(ctx, argv...); err != nil {
				t.Fatalf("setting up the link in %s: %v", h.Name, err)
			}
		}
	}
	return p
}

var rateRE = regexp.MustCompile(`^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$`)

// ParseRate parses a rate in tc's bit units ("1gbit", "100mbit", "2.5gbit", "800kbit", "64bit";
// decimal multiples, as tc reads them) into bits per second.
func ParseRate(s string) (uint64, error) {
	m := rateRE.FindStringSubmatch(strings.ToLower(s))
	if m == nil {
		return 0, fmt.Errorf("link rate %q: want a number and one of bit, kbit, mbit, gbit, tbit (e.g. 1gbit)", s)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return 0, fmt.Errorf("link rate %q: %v", s, err)
	}
	mult := map[string]float64{"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}[m[2]]
	bits := v * mult
	if bits < 8 || bits > 1e13 {
		return 0, fmt.Errorf("link rate %q: out of range (8 bit/s to 10 tbit/s)", s)
	}
	return uint64(bits), nil
}

// RemoveStaleNetns deletes the namespaces of this suite (NetnsPrefix) whose owner process is dead
// — left by a run that was killed before its cleanup ran — and returns their names. Namespaces of
// live processes (another test run on this machine) are left alone.
func RemoveStaleNetns() []string {
	entries, err := os.ReadDir(netnsDir)
	if err != nil {
		return nil
	}
	var removed []string
	for _, e := range entries {
		m := netnsNameRE.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pid == os.Getpid() || processAlive(pid) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err = runTool(ctx, "ip", "netns", "del", e.Name())
		cancel()
		if err == nil {
			removed = append(removed, e.Name())
		}
	}
	return removed
}

// ListNetns returns the names of this suite's namespaces that exist now (any owner).
func ListNetns() []string {
	entries, _ := os.ReadDir(netnsDir)
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), NetnsPrefix) {
			names = append(names, e.Name())
		}
	}
	return names
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// Close removes both namespaces (their veth ends go with them). Processes still inside keep
// theirs until they exit; the names are gone at once. It is safe to call more than once.
func (p *NetPair) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var errs []error
	for _, h := range []*NetHost{p.Src, p.Dst} {
		if _, err := os.Stat(filepath.Join(netnsDir, h.Name)); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if _, err := runTool(ctx, "ip", "netns", "del", h.Name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// NextPort returns a TCP port number not yet handed out on this pair (from 40000 up). The pair's
// namespaces hold only what its test started, so a port not handed out is free.
func (p *NetPair) NextPort() int { return int(p.nextPort.Add(1)) }

// DstTCP returns "tcp:10.77.0.2:PORT", the URI of port on the destination host.
func (p *NetPair) DstTCP(port int) string {
	return "tcp:" + netip.AddrPortFrom(p.Dst.Addr, uint16(port)).String()
}

// LinkCounters are bytes that crossed the link, as the veth devices count them: every frame's
// length with its Ethernet, IP and TCP headers (a GSO frame is counted once, with one set of
// headers, as it crosses the veth).
type LinkCounters struct {
	SrcToDst uint64 // sent by the source host
	DstToSrc uint64 // sent by the destination host
}

// Total is both directions together.
func (c LinkCounters) Total() uint64 { return c.SrcToDst + c.DstToSrc }

// Sub returns c − o (the bytes between two readings).
func (c LinkCounters) Sub(o LinkCounters) LinkCounters {
	return LinkCounters{SrcToDst: c.SrcToDst - o.SrcToDst, DstToSrc: c.DstToSrc - o.DstToSrc}
}

// Counters reads the veth byte counters of both ends (each end's transmitted bytes: on a veth
// every frame one end transmits is received by the other).
func (p *NetPair) Counters() (LinkCounters, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var c LinkCounters
	var err error
	if c.SrcToDst, err = p.Src.txBytes(ctx); err != nil {
		return c, err
	}
	c.DstToSrc, err = p.Dst.txBytes(ctx)
	return c, err
}

// txBytes reads the device's transmitted bytes with `ip -s -j link show`.
func (h *NetHost) txBytes(ctx context.Context) (uint64, error) {
	out, err := runTool(ctx, "ip", "-n", h.Name, "-s", "-j", "link", "show", "dev", h.Dev)
	if err != nil {
		return 0, err
	}
	var links []struct {
		Stats struct {
			TX struct {
				Bytes uint64 `json:"bytes"`
			} `json:"tx"`
		} `json:"stats64"`
	}
	if err := json.Unmarshal(out, &links); err != nil || len(links) != 1 {
		return 0, fmt.Errorf("ip -s -j link show dev %s in %s: unexpected output %.200q (%v)", h.Dev, h.Name, out, err)
	}
	return links[0].Stats.TX.Bytes, nil
}

// Stall makes the link drop every packet silently in both directions, as a dead peer or a cut
// cable would: nothing is answered (no RST, no ICMP), connections stay open and their data waits
// in the senders' buffers, new connections time out. Both namespaces drop what arrives on their
// veth in netfilter's INPUT chain (iptables; the counters still count what was sent). Heal undoes
// it.
func (p *NetPair) Stall() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.stalled {
		return nil
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		return fmt.Errorf("stall: iptables not found: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, h := range []*NetHost{p.Src, p.Dst} {
		if _, err := runTool(ctx, "ip", "netns", "exec", h.Name, "iptables", "-w", "5", "-I", "INPUT", "-i", h.Dev, "-j", "DROP"); err != nil {
			return fmt.Errorf("stall: %w", err)
		}
	}
	p.stalled = true
	return nil
}

// Heal ends a Stall: packets flow again, and what the senders kept is retransmitted.
func (p *NetPair) Heal() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var errs []error
	for _, h := range []*NetHost{p.Src, p.Dst} {
		// The namespaces are the pair's own: their INPUT chain holds nothing but Stall's rule.
		if _, err := runTool(ctx, "ip", "netns", "exec", h.Name, "iptables", "-w", "5", "-F", "INPUT"); err != nil {
			errs = append(errs, fmt.Errorf("heal: %w", err))
		}
	}
	p.stalled = false
	return errors.Join(errs...)
}

// Reset aborts every TCP connection between the two hosts at once, as a middlebox that forgets
// its state would; listeners and the link stay up, so new connections work right away. It uses
// the kernel's socket-destroy (`ss -K`, CONFIG_INET_DIAG_DESTROY): first every source-host socket
// whose peer is the destination host — the kernel sends the peer an RST, so the source's end fails
// with ECONNABORTED and the destination's with ECONNRESET (Reset waits, up to a second, until the
// RSTs have landed) — then whatever destination-host socket is left: on a stalled link the RST
// cannot cross, and that end fails with ECONNABORTED too. It returns how many sockets it
// destroyed (TIME-WAIT remnants are not connections and are left alone).
func (p *NetPair) Reset() (int, error) {
	if _, err := exec.LookPath("ss"); err != nil {
		return 0, fmt.Errorf("reset: ss (iproute2) not found: %v", err)
	}
	p.mu.Lock()
	stalled := p.stalled
	p.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n, err := p.Src.killTCP(ctx, true)
	if err != nil {
		return n, err
	}
	for deadline := time.Now().Add(time.Second); !stalled && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if left, err := p.Dst.killTCP(ctx, false); err != nil || left == 0 {
			break
		}
	}
	m, err := p.Dst.killTCP(ctx, true)
	return n + m, err
}

// killTCP lists (kill false) or destroys (kill true) h's TCP sockets connected to its peer and
// returns how many there were. "dst ADDR" matches connected sockets only: listeners (peer *) are
// never touched.
func (h *NetHost) killTCP(ctx context.Context, kill bool) (int, error) {
	argv := []string{"ip", "netns", "exec", h.Name, "ss", "-t", "-n", "-H"}
	if kill {
		argv = append(argv, "-K")
	}
	argv = append(argv, "state", "connected", "exclude", "time-wait", "dst", h.Peer.String())
	out, err := runTool(ctx, argv...)
	if err != nil {
		return 0, fmt.Errorf("reset: %w", err)
	}
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) != "" {
			n++
		}
	}
	return n, nil
}

// Command returns a command that runs name with args inside h's namespace, through
// `ip netns exec` (which joins the namespace and then execs name: the process's PID is name's
// own, so signals and rusage reach it directly).
func (h *NetHost) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.Name, name}, args...)...)
}

// Do runs f on an OS thread that has joined h's namespace (setns), and puts the thread back into
// the namespace it came from before it unlocks it. Sockets f creates belong to h's namespace for
// good and may be used from any goroutine afterwards — this is how the suite listens and dials on
// the link from inside the test process.
//
// The thread is kept, not thrown away (a locked goroutine that ends makes the runtime end its
// thread): Linux sends a child's Pdeathsig when the *thread* that forked it ends, so ending a
// thread would SIGKILL every QEMU that StartVM happened to fork from it. If the way back fails,
// the goroutine stays locked and parked for good: one thread lost, never one in the wrong
// namespace.
func (h *NetHost) Do(f func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := xunix.Open("/proc/thread-self/ns/net", xunix.O_RDONLY|xunix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("this thread's namespace: %w", err)
			return
		}
		defer xunix.Close(orig)
		fd, err := xunix.Open(filepath.Join(netnsDir, h.Name), xunix.O_RDONLY|xunix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			done <- fmt.Errorf("namespace %s: %w", h.Name, err)
			return
		}
		err = xunix.Setns(fd, xunix.CLONE_NEWNET)
		xunix.Close(fd)
		if err != nil {
			runtime.UnlockOSThread() // setns failed: still in the original namespace
			done <- fmt.Errorf("setns %s: %w", h.Name, err)
			return
		}
		ferr := f()
		if err := xunix.Setns(orig, xunix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("back from namespace %s: %w (thread parked)", h.Name, err)
			select {} // locked for good, never ended: see above
		}
		runtime.UnlockOSThread()
		done <- ferr
	}()
	return <-done
}

// Listen listens on address ("10.77.0.2:0", or ":PORT" for every address of h) inside h's
// namespace.
func (h *NetHost) Listen(network, address string) (net.Listener, error) {
	var l net.Listener
	err := h.Do(func() error {
		var err error
		l, err = net.Listen(network, address)
		return err
	})
	return l, err
}

// Dial connects from inside h's namespace. Give address as an IP and port (no name lookups:
// they would run on other threads, outside the namespace).
func (h *NetHost) Dial(ctx context.Context, network, address string) (net.Conn, error) {
	if _, err := netip.ParseAddrPort(address); err != nil {
		return nil, fmt.Errorf("dial in %s: %q is not IP:PORT: %w", h.Name, address, err)
	}
	var c net.Conn
	err := h.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// disableIPv6 turns IPv6 off on h's veth (its sysctl, written from inside the namespace).
func (h *NetHost) disableIPv6() error {
	return h.Do(func() error {
		err := os.WriteFile(filepath.Join("/proc/sys/net/ipv6/conf", h.Dev, "disable_ipv6"), []byte("1"), 0)
		if errors.Is(err, os.ErrNotExist) {
			return nil // a kernel without IPv6 sends none
		}
		if err != nil {
			return fmt.Errorf("disabling IPv6 on %s in %s: %w", h.Dev, h.Name, err)
		}
		return nil
	})
}

// runTool runs an iproute2/iptables command and returns its stdout; the error carries the
// command and its stderr.
func runTool(ctx context.Context, argv ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s: %v: %s", strings.Join(argv, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}
