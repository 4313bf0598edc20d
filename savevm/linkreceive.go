package savevm

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/link"
	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// ReceiveOptions configure the receiving end of a link.
type ReceiveOptions struct {
	// DstSeries is the local destination's QEMU series ("7.2", "10.0"), when known: it selects
	// the compatibility rules of design.md. "" = unknown: records are written as the sender
	// sent them.
	DstSeries string
	Events    func(Event)
	Warn      func(string)
	// StallTimeout: no data frame for this long ends the migration (default 30 s).
	StallTimeout time.Duration
	// CommitTimeout bounds the wait for COMMIT after READY (default 30 s).
	CommitTimeout time.Duration
}

// Receiver is the receiving sidecar's engine: it applies the link's data frames in sequence
// order and writes, with its own setup → iterate → complete handlers, a byte-valid stream for
// the local destination QEMU — header and configuration, ram START with MEM_SIZE, page records,
// EOS and footers, the device sections as received — and EOF only when the sender commits
// (PROTOCOL.md §5). Until then any failure resets the destination's connection.
type Receiver struct {
	s    *link.Session
	dst  io.WriteCloser
	opt  ReceiveOptions
	emit func(Event)

	phase    atomic.Value // Phase
	bytesOut atomic.Int64
	normal   atomic.Int64
	zero     atomic.Int64
	xbzrle   atomic.Int64

	w    *stream.Writer
	sink *asyncSink
	dec  *link.Decoder

	mu        sync.Mutex
	sum       Summary
	stoppedAt time.Time
	started   bool // BEGIN seen
	blocks    []link.Block
	sections  map[uint32]string // started iterative sections
	cur       uint32            // the section whose body is being written
	inSection bool
	dst72     bool
	tailStart time.Time
	tailFrom  int64
	readyAt   time.Time

	// Postcopy (feature postcopy, PROTOCOL.md §7): postcopy says the sender may send its
	// commands; switched is set at PACKAGED, from when the guest runs on the destination. The
	// destination's return path goes back to the sender (forwardReturnPath) until it closes
	// (rpClosed); closing marks the destination connection as being closed or aborted here, so
	// that the forwarder's read error is not taken for a break.
	postcopy   bool
	switched   atomic.Bool
	rpClosed   chan struct{}
	closing    atomic.Bool
	firstStart time.Time
	resumes    int
	// URGENT pages are taken once a section has been written in this run (after a recovery's
	// RESUME); ramID is the ram section that wraps one that arrives between sections.
	sectionThisRun bool
	ramID          uint32
	// urgentTaken counts the URGENT frames written in this run, for END's count (PROTOCOL.md
	// §7.1): an URGENT frame can arrive after END, on its own connection.
	urgentTaken uint64
	lateTaken   int64 // URGENT frames after END, all runs
}

// NewReceiver prepares the engine for one link session writing to dst (the local destination
// QEMU's -incoming, or a file). Closing dst is its job on success; on failure it aborts dst.
func NewReceiver(s *link.Session, dst io.WriteCloser, opt ReceiveOptions) *Receiver {
	if opt.StallTimeout <= 0 {
		opt.StallTimeout = 30 * time.Second
	}
	if opt.CommitTimeout <= 0 {
		opt.CommitTimeout = 30 * time.Second
	}
	r := &Receiver{s: s, dst: dst, opt: opt, emit: opt.Events, sections: map[uint32]string{},
		dst72: opt.DstSeries == "7.2"}
	if r.emit == nil {
		r.emit = func(Event) {}
	}
	r.phase.Store(PhaseSetup)
	r.sum.Sections = map[string]int64{}
	return r
}

// Phase is where the received migration is.
func (r *Receiver) Phase() Phase { return r.phase.Load().(Phase) }

// Started reports whether the migration has switched to postcopy: the guest then runs on the
// destination, and a broken link is recovered (package migration), never undone.
func (r *Receiver) Started() bool { return r.switched.Load() }

// Resume continues a migration whose link broke during postcopy, on the recovery's new session
// s and the destination's new connection dst (after migrate-recover). What the destination
// holds carries over; the section the break cut is gone (the source asks for the received
// bitmaps and sends the rest).
func (r *Receiver) Resume(ctx context.Context, s *link.Session, dst io.WriteCloser) (Summary, error) {
	r.s, r.dst = s, dst
	if r.switched.Load() {
		s.WidenReceiveBuffers() // the new session's connections were bounded at their accept
	}
	r.inSection = false
	r.resumes++
	r.closing.Store(false)
	return r.Run(ctx)
}

func (r *Receiver) setPhase(p Phase) {
	if r.Phase() == p {
		return
	}
	if r.switched.Load() && p != PhasePostcopy && p != PhaseDone {
		return // after the switch the pages of postcopy's sections are still postcopy
	}
	r.phase.Store(p)
	r.emit(Event{Type: "phase", Time: time.Now(), Side: "receiver", Phase: p, Transferred: r.bytesOut.Load(),
		NormalPages: r.normal.Load(), ZeroPages: r.zero.Load()})
}

// ReceiveError is a failure of the receiving side: Local says whether the local destination
// failed (writing to it) rather than the link or the sender.
type ReceiveError struct {
	Local bool
	Err   error
}

func (e *ReceiveError) Error() string { return e.Err.Error() }
func (e *ReceiveError) Unwrap() error { return e.Err }

// Run receives until the local destination has the complete stream (nil), or fails; on failure
// the peer is told why (ERROR) and the destination's connection is reset.
func (r *Receiver) Run(ctx context.Context) (Summary, error) {
	start := time.Now()
	if r.firstStart.IsZero() {
		r.firstStart = start
		r.emit(Event{Type: "phase", Time: start, Side: "receiver", Phase: PhaseSetup})
	}
	r.postcopy = link.HasFeature(r.s.Welcome.Features, link.FeaturePostcopy)
	if r.postcopy {
		rd, ok := r.dst.(io.Reader)
		if !ok {
			return r.summary(start), &ReceiveError{Local: true, Err: errors.New("postcopy needs a destination that answers on its connection (unix: or tcp:)")}
		}
		r.rpClosed = make(chan struct{})
		go r.forwardReturnPath(rd, r.s, r.rpClosed)
	}
	r.sectionThisRun, r.urgentTaken = false, 0
	r.sink = newAsyncSink(&countingWriter{w: r.dst, n: &r.bytesOut})
	r.w = stream.NewWriter(r.sink)
	r.dec = link.NewDecoder()
	defer r.dec.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); r.progress(stop) }()
	cancelled := context.AfterFunc(ctx, func() { r.s.Abort(link.CodeCancelled, "the receiving sidecar was interrupted") })
	err := r.loop()
	cancelled()
	close(stop)
	wg.Wait()
	r.sink.Close()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w: %w", context.Cause(ctx), err)
		}
		var re *ReceiveError
		code := link.CodeProtocol
		if errors.As(err, &re) && re.Local {
			code = link.CodeDestination
		}
		var rem *link.RemoteError
		if !errors.As(err, &rem) {
			r.s.Abort(code, "receiver: "+err.Error())
		}
		r.closing.Store(true)
		if a, ok := r.dst.(interface{ Abort() }); ok {
			a.Abort()
		} else {
			r.dst.Close()
		}
		return r.summary(start), err
	}
	r.setPhase(PhaseDone)
	return r.summary(start), nil
}

func (r *Receiver) summary(start time.Time) Summary {
	r.mu.Lock()
	defer r.mu.Unlock()
	sum := r.sum
	sum.TotalTimeMs = time.Since(r.firstStart).Milliseconds() // a resumed receiver counts from the first start
	sum.BytesIn, sum.BytesOut = r.s.BytesReceived(), r.bytesOut.Load()
	sum.NormalPages, sum.ZeroPages, sum.XBZRLEPages = r.normal.Load(), r.zero.Load(), r.xbzrle.Load()
	sum.Link = &LinkSummary{Connections: r.s.Connections(), BytesOnLink: r.s.BytesReceived(), LateUrgent: r.lateTaken}
	return sum
}

// progress emits a progress event every 100 ms.
func (r *Receiver) progress(stop <-chan struct{}) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	last, lastT := int64(0), time.Now()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			out := r.bytesOut.Load()
			rate := float64(out-last) / now.Sub(lastT).Seconds()
			last, lastT = out, now
			r.emit(Event{Type: "progress", Time: now, Side: "receiver", Phase: r.Phase(), Transferred: out, Rate: rate,
				NormalPages: r.normal.Load(), ZeroPages: r.zero.Load()})
		}
	}
}

func (r *Receiver) local(err error) error {
	if err == nil {
		return nil
	}
	var de *DestinationError
	if errors.As(err, &de) {
		return &ReceiveError{Local: true, Err: err}
	}
	return err
}

// loop applies the data frames in order until END, then completes.
func (r *Receiver) loop() error {
	for {
		f, err := r.s.NextFrame(time.Now().Add(r.opt.StallTimeout), r.switched.Load() && r.sectionThisRun)
		if err != nil {
			return err
		}
		if f.Type == link.FrameUrgent {
			if err := r.urgent(f); err != nil {
				return err
			}
			r.urgentTaken++
			if !r.s.DataWaiting() {
				if err := r.w.Push(); err != nil {
					return r.local(err)
				}
			}
			continue
		}
		end, err := r.apply(f)
		r.s.ReleaseData(f)
		if err != nil {
			return err
		}
		if end != nil {
			if r.switched.Load() {
				if err := r.lateUrgent(end); err != nil {
					return err
				}
				return r.completePostcopy()
			}
			return r.complete(end)
		}
		if r.switched.Load() && !r.s.DataWaiting() {
			// Postcopy: the guest may wait for a page of this frame, so nothing stays buffered
			// once no next frame is there to apply; the write overlaps with the next frame.
			if err := r.w.Push(); err != nil {
				return r.local(err)
			}
		}
	}
}

// lateUrgent writes the URGENT frames that a postcopy's END counts and that have not come yet:
// they travel on the control connection, END on a data connection, and a page the destination
// asked for just before the end would otherwise never reach it (its guest would find the page
// zero once postcopy ends, PROTOCOL.md §7.1).
func (r *Receiver) lateUrgent(end *link.End) error {
	if !end.HasUrgent {
		return errors.New("link: END after the postcopy switch without its count of URGENT frames")
	}
	if end.Urgent < r.urgentTaken {
		return fmt.Errorf("link: END counts %d URGENT frames, %d came", end.Urgent, r.urgentTaken)
	}
	deadline := time.Now().Add(r.opt.StallTimeout)
	for r.urgentTaken < end.Urgent {
		f, err := r.s.NextUrgent(deadline)
		if err != nil {
			return fmt.Errorf("after END, URGENT frame %d of %d: %w", r.urgentTaken+1, end.Urgent, err)
		}
		if err := r.urgent(f); err != nil {
			return err
		}
		r.urgentTaken++
		r.lateTaken++
	}
	return nil
}

// grammar errors name the frame.
func frameErr(f link.Frame, format string, args ...any) error {
	return fmt.Errorf("link: %s frame %d: %s", f.Type, f.Seq(), fmt.Sprintf(format, args...))
}

// apply writes one data frame's records; END is returned to complete.
func (r *Receiver) apply(f link.Frame) (*link.End, error) {
	if !r.started && f.Type != link.FrameBegin {
		return nil, frameErr(f, "before BEGIN")
	}
	switch f.Type {
	case link.FrameBegin:
		b, err := link.ParseBegin(f.Payload)
		if err != nil {
			return nil, err
		}
		if r.started {
			return nil, frameErr(f, "a second BEGIN")
		}
		r.started = true
		return nil, r.begin(b)
	case link.FrameSection:
		s, err := link.ParseSection(f.Payload)
		if err != nil {
			return nil, err
		}
		return nil, r.section(f, s)
	case link.FrameMemSize:
		m, err := link.ParseMemSize(f.Payload)
		if err != nil {
			return nil, err
		}
		if !r.inSection || r.blocks != nil {
			return nil, frameErr(f, "MEMSIZE outside the ram section's START, or twice")
		}
		r.blocks = m.Blocks
		blocks := make([]stream.RAMBlock, len(m.Blocks))
		for i, b := range m.Blocks {
			blocks[i] = stream.RAMBlock{Name: b.Name, UsedLength: b.UsedLength, HasPageSize: b.HasPageSize,
				PageSize: b.PageSize, HasGPA: b.HasGPA, GPA: b.GPA}
		}
		return nil, r.local(r.w.WriteMemSize(blocks))
	case link.FramePages:
		p, err := r.dec.ParsePages(f.Payload)
		if err != nil {
			return nil, err
		}
		return nil, r.pages(f, p)
	case link.FrameSectionEnd:
		s, err := link.ParseSectionEnd(f.Payload)
		if err != nil {
			return nil, err
		}
		if !r.inSection || s.ID != r.cur {
			return nil, frameErr(f, "SECTION_END for section %d, which is not open", s.ID)
		}
		r.inSection = false
		from := r.w.Offset()
		if err := r.w.WriteEOS(); err != nil {
			return nil, r.local(err)
		}
		if err := r.w.WriteFooter(s.ID); err != nil {
			return nil, r.local(err)
		}
		r.account(r.sections[s.ID], r.w.Offset()-from)
		return nil, nil
	case link.FrameCommand:
		c, err := link.ParseCommand(f.Payload)
		if err != nil {
			return nil, err
		}
		if r.inSection {
			return nil, frameErr(f, "a command inside a section")
		}
		if stream.Command(c.Cmd) != stream.CmdSwitchoverStart {
			if !r.postcopy || !link.PostcopyCommand(c.Cmd) {
				return nil, frameErr(f, "command %s is not carried by link protocol version 1 without the postcopy feature", stream.Command(c.Cmd))
			}
			return nil, r.local(r.w.WriteCommand(stream.Command(c.Cmd), c.Payload))
		}
		r.markStopped()
		r.setPhase(PhaseComplete)
		if r.dst72 {
			r.rewritten("dropped COMMAND 11 (SWITCHOVER_START): QEMU 7.2 rejects it")
			return nil, nil
		}
		return nil, r.local(r.w.WriteCommand(stream.Command(c.Cmd), c.Payload))
	case link.FrameDevice:
		d, err := link.ParseDevice(f.Payload)
		if err != nil {
			return nil, err
		}
		if r.inSection {
			return nil, frameErr(f, "device state inside a ram section")
		}
		if r.tailStart.IsZero() {
			r.tailStart, r.tailFrom = time.Now(), r.w.Offset()
			r.setPhase(PhaseDevices)
		}
		return nil, r.local(r.w.WriteRaw(d.Data))
	case link.FramePackaged:
		p, err := link.ParsePackaged(f.Payload)
		if err != nil {
			return nil, err
		}
		if !r.postcopy || r.inSection || r.switched.Load() {
			return nil, frameErr(f, "PACKAGED without the postcopy feature, inside a section, or twice")
		}
		if err := r.w.BeginPackage(); err != nil {
			return nil, r.local(err)
		}
		if err := r.w.WriteRaw(p.Data); err != nil {
			return nil, r.local(err)
		}
		if err := r.w.EndPackage(); err != nil {
			return nil, r.local(err)
		}
		r.markStopped()
		r.switched.Store(true)
		r.s.WidenReceiveBuffers()
		r.setPhase(PhasePostcopy)
		return nil, nil
	case link.FrameEnd:
		e, err := link.ParseEnd(f.Payload)
		if err != nil {
			return nil, err
		}
		if r.inSection {
			return nil, frameErr(f, "END inside a section")
		}
		e.VMDesc = append([]byte(nil), e.VMDesc...) // the frame's buffer is released
		return &e, nil
	}
	return nil, frameErr(f, "unexpected")
}

// begin writes the stream header and the configuration, checked by decoding them.
func (r *Receiver) begin(b link.Begin) error {
	probe := append(append([]byte{}, byte(b.Magic>>24), byte(b.Magic>>16), byte(b.Magic>>8), byte(b.Magic),
		byte(b.Version>>24), byte(b.Version>>16), byte(b.Version>>8), byte(b.Version), byte(stream.SectionConfiguration)), b.Config...)
	rd := stream.NewReader(bytes.NewReader(append(probe, byte(stream.SectionEOF))))
	if _, err := rd.Next(); err != nil {
		return fmt.Errorf("link: BEGIN: %w", err)
	}
	rec, err := rd.Next()
	if err != nil || rec.Kind != stream.KindConfiguration {
		return fmt.Errorf("link: BEGIN: the configuration does not decode: %v", err)
	}
	if rec.Config.HasCapability(stream.CapMappedRAM) {
		return errors.New("link: BEGIN: a mapped-ram configuration")
	}
	if err := r.w.WriteRecord(&stream.Record{Kind: stream.KindHeader, Magic: b.Magic, Version: b.Version}); err != nil {
		return r.local(err)
	}
	return r.local(r.w.WriteConfiguration(&stream.Configuration{Raw: b.Config}))
}

// section writes a START, PART or END header (the ram handler's setup, iterate, complete).
func (r *Receiver) section(f link.Frame, s link.Section) error {
	if r.inSection {
		return frameErr(f, "section %d starts inside section %d", s.ID, r.cur)
	}
	var t stream.SectionType
	switch s.Type {
	case link.StartSection:
		if s.ID == 0 {
			return frameErr(f, "%v", errSectionZero)
		}
		if s.Idstr != "ram" {
			return frameErr(f, "iterative section %q (only ram is carried)", s.Idstr)
		}
		if _, dup := r.sections[s.ID]; dup {
			return frameErr(f, "section %d started twice", s.ID)
		}
		r.sections[s.ID] = s.Idstr
		r.ramID = s.ID
		t = stream.SectionStart
	case link.PartSection, link.EndSection:
		if _, ok := r.sections[s.ID]; !ok {
			return frameErr(f, "section %d was not started", s.ID)
		}
		if r.blocks == nil {
			return frameErr(f, "before MEMSIZE")
		}
		t = stream.SectionPart
		r.setPhase(PhaseIterate)
		if s.Type == link.EndSection {
			t = stream.SectionEnd
			r.markStopped()
			r.setPhase(PhaseComplete)
		}
	}
	r.cur, r.inSection, r.sectionThisRun = s.ID, true, true
	from := r.w.Offset()
	err := r.w.WriteSectionHeader(t, s.ID, s.Idstr, s.Instance, s.Version)
	r.account(r.sections[s.ID], r.w.Offset()-from)
	return r.local(err)
}

// pages writes the page records of one batch.
func (r *Receiver) pages(f link.Frame, p link.Pages) error {
	if !r.inSection || r.blocks == nil {
		return frameErr(f, "pages outside a ram section")
	}
	if int(p.Block) >= len(r.blocks) {
		return frameErr(f, "block index %d of %d", p.Block, len(r.blocks))
	}
	b := r.blocks[p.Block]
	from := r.w.Offset()
	data := p.Data
	for _, e := range p.Entries {
		off := e &^ (link.PageSize - 1)
		if off >= b.UsedLength {
			return frameErr(f, "page at 0x%x beyond block %q of 0x%x bytes", off, b.Name, b.UsedLength)
		}
		var err error
		switch e & (link.PageSize - 1) {
		case link.KindPage:
			err = r.w.WritePage(off, b.Name, data[:link.PageSize])
			data = data[link.PageSize:]
			r.normal.Add(1)
		case link.KindZero:
			err = r.w.WriteZero(stream.RAMZero|r.w.Continue(b.Name), off, b.Name, 0)
			r.zero.Add(1)
		case link.KindXBZRLE:
			n := int(data[0])<<8 | int(data[1])
			err = r.w.WriteXBZRLE(stream.RAMXBZRLE|r.w.Continue(b.Name), off, b.Name, data[2:2+n])
			data = data[2+n:]
			r.xbzrle.Add(1)
		}
		if err != nil {
			return r.local(err)
		}
	}
	r.account("ram", r.w.Offset()-from)
	return nil
}

// urgent writes a page the destination asked for, ahead of the data frames (PROTOCOL.md §7.1):
// into the ram section being written, or, between sections, in a PART section of its own.
func (r *Receiver) urgent(f link.Frame) error {
	u, err := link.ParseUrgent(f.Payload)
	if err != nil {
		return err
	}
	if int(u.Block) >= len(r.blocks) {
		return frameErr(f, "block index %d of %d", u.Block, len(r.blocks))
	}
	b := r.blocks[u.Block]
	off := u.Entry &^ (link.PageSize - 1)
	if off >= b.UsedLength {
		return frameErr(f, "page at 0x%x beyond block %q of 0x%x bytes", off, b.Name, b.UsedLength)
	}
	from := r.w.Offset()
	wrap := !r.inSection
	if wrap {
		if err := r.w.WriteSectionHeader(stream.SectionPart, r.ramID, "", 0, 0); err != nil {
			return r.local(err)
		}
	}
	if u.Entry&(link.PageSize-1) == link.KindPage {
		err = r.w.WritePage(off, b.Name, u.Data)
		r.normal.Add(1)
	} else {
		err = r.w.WriteZero(stream.RAMZero|r.w.Continue(b.Name), off, b.Name, 0)
		r.zero.Add(1)
	}
	if err == nil && wrap {
		if err = r.w.WriteEOS(); err == nil {
			err = r.w.WriteFooter(r.ramID)
		}
	}
	r.account("ram", r.w.Offset()-from)
	return r.local(err)
}

func (r *Receiver) account(idstr string, n int64) {
	r.mu.Lock()
	r.sum.Sections[idstr] += n
	r.mu.Unlock()
}

func (r *Receiver) markStopped() {
	r.mu.Lock()
	if r.stoppedAt.IsZero() {
		r.stoppedAt = time.Now()
	}
	r.mu.Unlock()
}

func (r *Receiver) rewritten(why string) {
	r.mu.Lock()
	first := r.sum.Rewritten == 0
	r.sum.Rewritten++
	r.mu.Unlock()
	if first {
		if r.opt.Warn != nil {
			r.opt.Warn(why)
		}
		r.emit(Event{Type: "warning", Time: time.Now(), Side: "receiver", Phase: r.Phase(), Message: why})
	}
}

// complete is PROTOCOL.md §5 on the receiving side: everything before END is written and
// flushed, READY; on COMMIT, EOF and the vmdesc, a clean close, DELIVERED.
func (r *Receiver) complete(e *link.End) error {
	if err := r.w.Flush(); err != nil {
		return r.local(err)
	}
	r.readyAt = time.Now()
	if err := r.s.SendControl(link.FrameReady, binary.BigEndian.AppendUint64(nil, e.Seq)); err != nil {
		return fmt.Errorf("READY: %w", err)
	}
	timer := time.NewTimer(r.opt.CommitTimeout)
	defer timer.Stop()
	select {
	case f := <-r.s.Control():
		if f.Type != link.FrameCommit {
			return fmt.Errorf("link: the sender sent %s, expected COMMIT", f.Type)
		}
	case <-r.s.Done():
		return fmt.Errorf("waiting for COMMIT: %w", orClosed(r.s.Err()))
	case <-timer.C:
		return fmt.Errorf("link: no COMMIT from the sender within %v", r.opt.CommitTimeout)
	}
	// The sender committed: from here on the destination gets the complete stream.
	if err := r.w.WriteEOF(); err != nil {
		return r.local(err)
	}
	if e.HasVMDesc {
		if err := r.w.WriteVMDesc(e.VMDesc); err != nil {
			return r.local(err)
		}
	}
	if err := r.w.Flush(); err != nil {
		return r.local(err)
	}
	r.closing.Store(true)
	if err := r.dst.Close(); err != nil {
		return &ReceiveError{Local: true, Err: fmt.Errorf("finishing the stream: %w", err)}
	}
	now := time.Now()
	r.mu.Lock()
	if !r.tailStart.IsZero() {
		r.sum.TailMs = now.Sub(r.tailStart).Milliseconds()
		r.sum.TailBytes = r.w.Offset() - r.tailFrom
	}
	if !r.stoppedAt.IsZero() {
		r.sum.DowntimeMs = now.Sub(r.stoppedAt).Milliseconds()
	}
	r.mu.Unlock()
	p, _ := link.AppendJSON(nil, link.Delivered{State: "delivered", BytesOut: r.bytesOut.Load(),
		DeliveredMs: now.Sub(r.readyAt).Milliseconds()})
	if err := r.s.SendControl(link.FrameDelivered, p); err != nil {
		// The destination has the stream; only the sender's confirmation is lost.
		if r.opt.Warn != nil {
			r.opt.Warn("the destination has the complete stream, but DELIVERED did not reach the sender: " + err.Error())
		}
	}
	return nil
}

// completePostcopy ends a postcopy stream (PROTOCOL.md §7.1): END came after the source's EOF,
// which is written at once — since the switch there is nothing to commit — and the writing
// direction closed; the destination then sends SHUT and closes its return path, which the
// forwarder passes on to the sender.
func (r *Receiver) completePostcopy() error {
	if err := r.w.WriteEOF(); err != nil {
		return r.local(err)
	}
	if err := r.w.Flush(); err != nil {
		return r.local(err)
	}
	if cw, ok := r.dst.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil {
			return &ReceiveError{Local: true, Err: fmt.Errorf("finishing the stream: %w", err)}
		}
	}
	timer := time.NewTimer(postcopyShutTimeout)
	defer timer.Stop()
	select {
	case <-r.rpClosed:
	case <-r.s.Done():
		return fmt.Errorf("waiting for the destination's SHUT: %w", orClosed(r.s.Err()))
	case <-timer.C:
		return &ReceiveError{Local: true, Err: fmt.Errorf("the destination did not finish within %v of the stream's end", postcopyShutTimeout)}
	}
	r.closing.Store(true)
	r.dst.Close()
	now := time.Now()
	r.mu.Lock()
	if !r.stoppedAt.IsZero() {
		r.sum.DowntimeMs = now.Sub(r.stoppedAt).Milliseconds()
	}
	r.mu.Unlock()
	return nil
}

// postcopyShutTimeout bounds the wait for the destination to finish after a postcopy stream's
// end (the sender's wait for the SHUT is as long).
const postcopyShutTimeout = 2 * time.Minute

// forwardReturnPath passes what the destination sends back on its connection to the sender
// (RETURN frames) until it closes it, then says so (an empty RETURN) and closes done. A read
// error of a connection this side did not close breaks the session: in postcopy, a
// destination that hangs up is a broken link to recover, or gone.
func (r *Receiver) forwardReturnPath(rd io.Reader, s *link.Session, done chan struct{}) {
	buf := make([]byte, link.MaxReturnChunk)
	for {
		n, err := rd.Read(buf)
		if n > 0 {
			if s.SendReturn(buf[:n]) != nil {
				return
			}
		}
		if err == io.EOF {
			s.SendReturn(nil)
			close(done)
			return
		}
		if err != nil {
			if !r.closing.Load() {
				s.Abort(link.CodeDestination, fmt.Sprintf("the destination's connection broke: %v", err))
			}
			return
		}
	}
}

// SendStatus reports the destination's state after DELIVERED (receive --dst-qmp).
func SendStatus(s *link.Session, state, msg string) error {
	p, err := json.Marshal(link.Delivered{State: state, Message: msg})
	if err != nil {
		return err
	}
	return s.SendControl(link.FrameStatus, p)
}
