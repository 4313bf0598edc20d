package migration

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/guestram"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// Verified migration (--verify, README "Verified migration"). QEMU resumes a destination as soon
// as it has loaded the stream, whatever its dirty tracking missed; with --verify the sidecar
// proves first that the destination's RAM is the paused source's, page by page:
//
//  1. before the source is touched (prepareVerify): both QEMUs' processes are found on this
//     host (across hosts each end of a link hashes its own), the destination must be held
//     paused after loading (-S, or `stop` while it waits), and both RAM layouts are located;
//  2. once the destination has the complete stream (verifyRAM): the source is in postmigrate
//     and the destination paused; both are hashed at once (guestram: every page, 128-bit
//     xxh3 with a seed drawn for this check, memory bounded whatever the guest's size) and
//     compared, with the pages KVM itself rewrites on loading allowed to differ;
//  3. all equal: the sidecar resumes the destination. Any difference: nothing is resumed, and
//     the error names the blocks and pages and says which copy to trust (the source).

// verifier is what prepareVerify found.
type verifier struct {
	src, dst verifySide
	methods  []guestram.Method // --verify-method; nil = guestram's order
}

// verifySide is one QEMU whose RAM is hashed.
type verifySide struct {
	name   string // "source", "destination"
	c      *qmp.Client
	pid    int
	layout *guestram.Layout
}

// verifyDelayEnv names a test-only pause between "both paused" and hashing (a duration), so that
// a test can change the destination's RAM in that moment.
const verifyDelayEnv = "QMG_TEST_VERIFY_DELAY"

// prepareVerify checks that --verify can work, before the source is touched.
func (m *migration) prepareVerify(ctx context.Context) error {
	if !m.o.Verify {
		return nil
	}
	switch {
	case m.o.Policy.Postcopy:
		return usageError{errors.New("--verify and --postcopy exclude each other: in postcopy the destination runs before it has all its memory")}
	case m.o.To.IsLink():
		return m.prepareVerifyLink(ctx)
	case m.dst == nil:
		return usageError{errors.New("--verify needs --dst-qmp: the destination's RAM is read through its QEMU on this host, and the sidecar resumes it only after the check")}
	}
	cctx, cancel := context.WithTimeout(ctx, m.o.ConnectTimeout)
	defer cancel()
	dst, err := locateSide(cctx, "destination", m.dst, qmp.Endpoint{Socket: m.o.DstQMP})
	if err != nil {
		return err
	}
	if err := checkHeld(cctx, dst); err != nil {
		return err
	}
	src, err := locateSide(cctx, "source", m.src, m.o.Source)
	if err != nil {
		return err
	}
	m.verify = &verifier{src: src, dst: dst, methods: m.o.VerifyMethods}
	m.note("verify", fmt.Sprintf("--verify: the destination is held paused after loading; RAM will be read from the source by %s, from the destination by %s",
		plannedMethods(src.layout, m.o.VerifyMethods), plannedMethods(dst.layout, m.o.VerifyMethods)))
	return nil
}

// locateSide finds the QEMU process behind a monitor and its RAM layout.
func locateSide(ctx context.Context, name string, c *qmp.Client, ep qmp.Endpoint) (verifySide, error) {
	s := verifySide{name: name, c: c}
	var err error
	if s.pid, err = qemuPID(ctx, ep); err != nil {
		return s, fmt.Errorf("--verify reads the %s's RAM on this host, but its QEMU process cannot be found here (%w): between hosts, use the link (qmg://), where each sidecar reads its own", name, err)
	}
	if s.layout, err = guestram.Locate(ctx, c, s.pid); err != nil {
		return s, fmt.Errorf("--verify: the %s's RAM: %w", name, err)
	}
	return s, nil
}

// qemuPID is the process of the QEMU behind a monitor on this host: the listener of its QMP
// socket, or for a libvirt domain what libvirt's pid file says (Locate then checks that the
// process holds the guest's RAM).
func qemuPID(ctx context.Context, ep qmp.Endpoint) (int, error) {
	if ep.Socket != "" {
		return guestram.PIDFromSocket(ctx, ep.Socket)
	}
	dirs := []string{"/run/libvirt/qemu"} // qemu:///system
	if x := os.Getenv("XDG_RUNTIME_DIR"); x != "" {
		dirs = append(dirs, filepath.Join(x, "libvirt/qemu/run")) // qemu:///session
	}
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, ep.Domain+".pid"))
		if err == nil {
			return strconv.Atoi(strings.TrimSpace(string(b)))
		}
	}
	return 0, fmt.Errorf("no pid file of libvirt domain %q in %s", ep.Domain, strings.Join(dirs, " or "))
}

// checkHeld refuses a destination that would run by itself after loading.
func checkHeld(ctx context.Context, dst verifySide) error {
	hp, err := guestram.CheckHeldPaused(ctx, dst.c, dst.pid)
	if err != nil {
		return err
	}
	if !hp.Held {
		return usageError{fmt.Errorf("--verify needs a destination that stays paused after loading, so that it runs only once its RAM is verified, and this one would start by itself (%s): start it with -S (as libvirt does), or send `stop` on its QMP while it waits in inmigrate",
			strings.Join(hp.Reasons, "; "))}
	}
	return nil
}

// plannedMethods says how a layout's blocks will be read (guestram's Plan).
func plannedMethods(l *guestram.Layout, order []guestram.Method) string {
	return methodList(l.Plan(order))
}

// methodList renders method counts as "process_vm_readv (12 blocks)" or "a+b".
func methodList(count map[guestram.Method]int) string {
	if len(count) == 0 {
		return "no method (no block can be read)"
	}
	var names []string
	for meth, n := range count {
		names = append(names, fmt.Sprintf("%s (%d block%s)", meth, n, plural(n)))
	}
	sort.Strings(names)
	return strings.Join(names, " + ")
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

// ErrVerify: --verify found the destination's RAM different from the source's (exit code 8).
var ErrVerify = errors.New("verify")

// verifyRAM runs the check once the destination has the complete stream and holds paused;
// it fills sum.Verify and resumes the destination only when every page matched. The
// destination is read here (relay mode) or by the receiving sidecar (the link, verifylink.go).
// Hashing has no overall deadline (every read has guestram's ReadTimeout; the link has its
// heartbeat) and stops when the caller's ctx ends (a signal): nothing is resumed then either.
func (m *migration) verifyRAM(sum *Summary, dst verifyPeer) error {
	ctx := m.ctx
	v := m.verify
	start := time.Now()
	wctx, cancel := context.WithTimeout(context.Background(), m.o.ConnectTimeout)
	defer cancel()
	if st, err := waitRunState(wctx, v.src.c, "postmigrate"); err != nil {
		return &MigrateError{Class: ErrSource, Phase: savevm.PhaseDone, SourceState: st,
			Err: fmt.Errorf("--verify: the source did not complete its migration (%w). Nothing was resumed: the destination stays paused (it has the complete stream, unverified) and the source paused", err)}
	}
	m.note("verify", "both guests are paused: comparing their RAM")
	if d, _ := time.ParseDuration(os.Getenv(verifyDelayEnv)); d > 0 {
		time.Sleep(d) // test-only: a moment in which a test changes the destination's RAM
	}
	ex, notes := m.kvmExclusions(v.src.layout)
	for _, n := range notes {
		if m.o.Warn != nil {
			m.o.Warn(n)
		}
	}
	var seed [8]byte
	rand.Read(seed[:])
	opt := guestram.Options{Methods: v.methods, Seed: binary.LittleEndian.Uint64(seed[:])}
	type result struct {
		list *guestram.List
		ms   int64
		err  error
	}
	timed := func(f func() (*guestram.List, error), out chan<- result) {
		t := time.Now()
		l, err := f()
		out <- result{l, time.Since(t).Milliseconds(), err}
	}
	sc, dc := make(chan result, 1), make(chan result, 1)
	go timed(func() (*guestram.List, error) { return guestram.Hash(ctx, v.src.c, v.src.layout, opt) }, sc)
	go timed(func() (*guestram.List, error) { return dst.hash(ctx, opt) }, dc)
	sr, dr := <-sc, <-dc
	if ctx.Err() != nil && (sr.err != nil || dr.err != nil) {
		dst.abort(ErrCancelled, "the sending sidecar was interrupted during the check")
		return &MigrateError{Class: ErrCancelled, Phase: savevm.PhaseDone, SourceState: m.sourceStateNow(),
			Err: fmt.Errorf("--verify was interrupted (%v). Nothing was resumed: the destination stays paused with the complete stream, unverified, and the source paused in postmigrate", context.Cause(ctx))}
	}
	if sr.err != nil {
		dst.abort(ErrSource, "the sending sidecar could not read the source's RAM: "+sr.err.Error())
		return &MigrateError{Class: ErrSource, Phase: savevm.PhaseDone, SourceState: m.sourceStateNow(),
			Err: fmt.Errorf("--verify could not read the source's RAM: %w. Nothing was resumed: the destination stays paused with the complete stream, unverified. If the source's QEMU is gone, the destination holds the only copy: `cont` on it; if the source still answers, quit the destination and `cont` the source", sr.err)}
	}
	if dr.err != nil {
		dst.abort(ErrDestination, "the sending sidecar did not get the destination's hashes: "+dr.err.Error())
		return &MigrateError{Class: ErrDestination, Phase: savevm.PhaseDone, SourceState: m.sourceStateNow(),
			Err: fmt.Errorf("--verify could not read the destination's RAM: %w. Nothing was resumed: the source stays paused in postmigrate and is the trustworthy copy: quit the destination (if it still runs), then `cont` on the source's QMP", dr.err)}
	}
	d := guestram.Compare(sr.list, dr.list, ex)
	vs := &savevm.VerifySummary{Equal: d.Equal(), Blocks: len(d.Blocks), Pages: d.Compared, Differing: d.Differing,
		SourceMethod: usedMethods(sr.list), DestMethod: usedMethods(dr.list), SourceMs: sr.ms, DestMs: dr.ms}
	for _, b := range d.Blocks {
		vs.Excluded += len(b.Excluded)
	}
	vs.DurationMs = time.Since(start).Milliseconds()
	sum.Verify = vs
	what := strings.ReplaceAll(strings.TrimSpace(d.String()), "\n", "; ")
	vctx, vcancel := context.WithTimeout(context.Background(), m.o.ConnectTimeout)
	defer vcancel()
	if !d.Equal() {
		dst.verdict(vctx, vs, what)
		return &MigrateError{Class: ErrVerify, Phase: savevm.PhaseDone, SourceState: "postmigrate",
			Err: fmt.Errorf("the destination's RAM is not the source's: %s. %s", what, mismatchAdvice)}
	}
	m.note("verify", fmt.Sprintf("verified: all %d pages of %d blocks are equal (%v; source read by %s in %d ms, destination by %s in %d ms)",
		d.Compared, len(d.Blocks), time.Duration(vs.DurationMs)*time.Millisecond, vs.SourceMethod, sr.ms, vs.DestMethod, dr.ms))
	if err := dst.verdict(vctx, vs, what); err != nil {
		return &MigrateError{Class: ErrDestination, Phase: savevm.PhaseDone, SourceState: "postmigrate",
			Err: fmt.Errorf("the RAM is verified, but resuming the destination failed: %w; `cont` on its QMP", err)}
	}
	return nil
}

// mismatchAdvice ends every mismatch report, on both ends of a link.
const mismatchAdvice = "The destination was not resumed and stays paused; the source, paused in postmigrate, is the trustworthy copy: quit the destination, then `cont` on the source's QMP"

// verifyPeer is where the destination's RAM is: its QEMU on this host, or a receiving sidecar.
type verifyPeer interface {
	// hash returns the destination's hash list, made with opt's seed.
	hash(ctx context.Context, opt guestram.Options) (*guestram.List, error)
	// verdict reports the comparison; when it is equal the destination is resumed.
	verdict(ctx context.Context, vs *savevm.VerifySummary, what string) error
	// abort says the check cannot be made (the other side's copy stays as it is).
	abort(class error, msg string)
}

// localPeer is a destination QEMU on this host (relay mode with --dst-qmp).
type localPeer struct{ verifySide }

func (p localPeer) hash(ctx context.Context, opt guestram.Options) (*guestram.List, error) {
	return guestram.Hash(ctx, p.c, p.layout, opt)
}

func (p localPeer) verdict(ctx context.Context, vs *savevm.VerifySummary, _ string) error {
	if !vs.Equal {
		return nil
	}
	return p.c.Cont(ctx)
}

func (localPeer) abort(error, string) {}

// usedMethods names the methods a hash list's blocks were read by.
func usedMethods(l *guestram.List) string {
	count := map[guestram.Method]int{}
	for _, b := range l.Blocks {
		if b.Method != "" {
			count[b.Method]++
		}
	}
	return methodList(count)
}

// kvmExclusions are the guest pages KVM rewrites when the destination loads the vCPUs' state
// (guestram's KVMWrites), from the cpu sections of the stream the engine kept. Under TCG the
// MSRs are 0 and nothing is excluded.
func (m *migration) kvmExclusions(l *guestram.Layout) ([]guestram.Exclusion, []string) {
	if m.engine == nil {
		return nil, nil
	}
	cpus, vmdesc := m.engine.CPUStates()
	return exclusionsFrom(cpus, vmdesc, l)
}

// exclusionsFrom decodes the MSRs of each kept cpu section and maps what KVM writes to pages.
func exclusionsFrom(cpus []savevm.CPUState, vmdesc []byte, l *guestram.Layout) ([]guestram.Exclusion, []string) {
	if len(cpus) == 0 {
		return nil, nil
	}
	var notes []string
	desc, err := stream.ParseVMDesc(vmdesc)
	if err != nil {
		return nil, []string{fmt.Sprintf("--verify: the stream's vmdesc cannot be read (%v): the vCPUs' paravirtual clock pages are not excluded; under KVM they may differ", err)}
	}
	var writes []guestram.HypervisorWrite
	for _, c := range cpus {
		dev := desc.Device("cpu", c.Instance)
		if dev == nil {
			notes = append(notes, fmt.Sprintf("--verify: cpu %d is not in the vmdesc: its paravirtual pages are not excluded", c.Instance))
			continue
		}
		node, _, err := stream.DecodeVMState(c.Body, dev, nil)
		if err != nil {
			notes = append(notes, fmt.Sprintf("--verify: cpu %d's state: %v: its paravirtual pages are not excluded", c.Instance, err))
			continue
		}
		msrs, err := guestram.PVMSRsFromVMState(node)
		if err != nil {
			notes = append(notes, err.Error())
			continue
		}
		writes = append(writes, guestram.KVMWrites(int(c.Instance), msrs)...)
	}
	ex, unmapped := l.Exclusions(writes)
	for _, w := range unmapped {
		notes = append(notes, fmt.Sprintf("--verify: cpu %d's %s names 0x%x, outside guest RAM", w.CPU, w.MSR, w.GPA))
	}
	return ex, notes
}

// waitRunState waits (bounded by ctx) until c's run state is state; it returns the last one.
func waitRunState(ctx context.Context, c *qmp.Client, state string) (string, error) {
	for {
		st, err := c.QueryStatus(ctx)
		if err != nil {
			return "unknown (" + err.Error() + ")", err
		}
		if st.Status == state {
			return state, nil
		}
		select {
		case <-ctx.Done():
			return st.Status, fmt.Errorf("it is %q, not %s: %w", st.Status, state, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// sourceStateNow is the source's run state for a report (bounded).
func (m *migration) sourceStateNow() string {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	st, _ := runState(ctx, m.src)
	return st
}

// note sends an event of its own type (verify) to the caller.
func (m *migration) note(typ, msg string) { emit(m.o.Events, typ, savevm.PhaseDone, msg) }

// emit sends an event of the orchestration's own (verify, recovery) to events, if any.
func emit(events func(savevm.Event), typ string, phase savevm.Phase, msg string) {
	if events != nil {
		events(savevm.Event{Type: typ, Time: time.Now(), Phase: phase, Message: msg})
	}
}
