package savevm

import (
	"encoding/binary"
	"fmt"
	"net"
	"sync"
	"time"
	"unsafe"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// passOutput is relay mode's output. Every record the handlers pass on unchanged goes to the
// destination as its own bytes, straight from the Reader's buffer (stream.Reader.Raw: decode →
// encode is byte-identical, so those are the bytes a Writer would make): no copy in user space,
// and consecutive records merge into one slice. Records the handlers rewrite are encoded into a
// small buffer in between. What has been decoded is written — one writev — whenever the Reader
// is about to read more from the source (stream.WithBeforeRead): data leaves as soon as it is
// decoded and nothing else is waiting, never later for a batch to fill. The device tail is
// forwarded while it arrives, up to where it cannot yet hold the stream's EOF
// (stream.SafeTailPrefix), and the rest once its records have been checked.
type passOutput struct {
	r  *Relay
	rd *stream.Reader
	w  *countingWriter // the destination

	iov      net.Buffers
	pending  int64 // bytes in iov
	produced int64 // bytes written to the destination
	err      error // sticky write error

	h *handlers

	// Replacements: the scratch Writer encodes into repl.
	rw        *stream.Writer
	repl      replBuffer
	replacing bool
	replFrom  int

	tailStart int64 // source offset of the tail's first byte; -1 before the tail
	fwd       int64 // source offset up to which the arriving tail was forwarded

	// Merge mode (multifd channels into this stream): mu guards the queue and the writes,
	// which channel goroutines share with the pump; destLast is the block the destination
	// resolves CONTINUE to, which inserted pages change.
	mu       sync.Mutex
	locking  bool
	destLast string
	ins      replBuffer
	insW     *stream.Writer
	// held is a ram body's EOS with what follows it up to the next section (its footer,
	// commands such as SWITCHOVER_START), kept back (merge): QEMU keeps the next section's
	// header in its buffer while its channels already send that section's pages, which must
	// still find a section body open in this stream.
	held    []byte
	holding bool

	// final is the stream's EOF and what follows it (the vmdesc), kept back until finish:
	// the destination must not get a complete stream before the source was told to complete
	// (its SHUT is the point of no return, design.md safety contract).
	final []byte
}

func newPassOutput(r *Relay) *passOutput {
	o := &passOutput{r: r, w: &countingWriter{w: r.dst, n: &r.bytesOut}, tailStart: -1, fwd: -1}
	o.rw = stream.NewWriter(&o.repl)
	o.insW = stream.NewWriter(&o.ins)
	o.h = newHandlers(r, o)
	o.locking = r.merge != nil && !r.merge.forward
	return o
}

func (o *passOutput) lock() {
	if o.locking {
		o.mu.Lock()
	}
}

func (o *passOutput) unlock() {
	if o.locking {
		o.mu.Unlock()
	}
}

func (o *passOutput) beforeRead()          { o.flush() }
func (o *passOutput) tailData(tail []byte) { o.tailArrived(tail) }

func (o *passOutput) attach(rd *stream.Reader) { o.rd = rd }
func (o *passOutput) handle(rec *stream.Record) error {
	if o.err != nil {
		return o.err // a write in the last flush failed
	}
	return o.h.handle(rec)
}
func (o *passOutput) written() int64 { return o.produced + o.pending + int64(len(o.final)) }
func (o *passOutput) offset() int64  { o.endReplace(); return o.produced + o.pending }
func (o *passOutput) close()         {}

// add queues b, merging it with the previous slice when it continues it in memory.
func (o *passOutput) add(b []byte) {
	if len(b) == 0 {
		return
	}
	if n := len(o.iov); n > 0 {
		prev := o.iov[n-1]
		if cap(prev) > len(prev) && unsafe.SliceData(prev[len(prev):cap(prev)]) == unsafe.SliceData(b) {
			o.iov[n-1] = prev[:len(prev)+len(b)]
			o.pending += int64(len(b))
			return
		}
	}
	o.iov = append(o.iov, b)
	o.pending += int64(len(b))
}

// pass queues rec's own bytes.
func (o *passOutput) pass(rec *stream.Record) error {
	o.lock()
	defer o.unlock()
	o.endReplace()
	raw := o.rd.Raw()
	if rec.Depth == 0 && (rec.Kind == stream.KindEOF || (o.final != nil && rec.Kind == stream.KindVMDesc)) {
		o.releaseHeld()
		if raw == nil { // a vmdesc larger than the buffer
			var b replBuffer
			w := stream.NewWriter(&b)
			if err := w.WriteRecord(rec); err != nil {
				return err
			}
			if err := w.Flush(); err != nil {
				return err
			}
			raw = b.b
		}
		o.final = append(o.final, raw...) // a copy: the buffer may move before finish
		return nil
	}
	if o.locking && rec.Depth == 0 && raw != nil {
		switch {
		case rec.Kind == stream.KindRAM && rec.RAM.Flags&^stream.RAMContinue == stream.RAMEOS:
			o.held, o.holding = append(o.held[:0], raw...), true
			return nil
		case (rec.Kind == stream.KindFooter || rec.Kind == stream.KindCommand) && o.holding:
			o.held = append(o.held, raw...)
			return nil
		}
	}
	o.releaseHeld()
	if rec.Kind == stream.KindRAM && rec.RAM.Block != "" {
		if rec.RAM.Flags&stream.RAMContinue != 0 && o.destLast != rec.RAM.Block && o.locking {
			// Pages inserted from a multifd channel named another block since: this record
			// must name its own.
			named := *rec
			named.RAM.Flags &^= stream.RAMContinue
			return o.replaceLocked(&named).WriteRecord(&named)
		}
		o.destLast = rec.RAM.Block
	}
	switch {
	case rec.Kind == stream.KindPackageEnd:
		return nil // the PACKAGED header counted every byte of the package
	case rec.Kind == stream.KindCommand && rec.Cmd == stream.CmdPackaged:
		// Its header is not in the buffer any more (the nested stream was read after it); the
		// nested records pass on unchanged, so the length is the one it came with.
		h := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16([]byte{byte(stream.SectionCommand)}, uint16(stream.CmdPackaged)), 4)
		o.add(append(h, rec.Payload...))
		return nil
	case raw == nil:
		// Not in one piece in memory (a vmdesc larger than the buffer): encode it.
		w := o.replaceLocked(rec)
		return w.WriteRecord(rec)
	}
	if rec.Depth > 0 && o.tailStart >= 0 && rec.Offset < o.fwd {
		return fmt.Errorf("internal: a packaged record at %d inside the forwarded tail", rec.Offset)
	}
	if o.tailStart >= 0 && rec.Offset < o.fwd {
		// Part or all of it went out while the tail arrived.
		skip := o.fwd - rec.Offset
		if skip >= int64(len(raw)) {
			return nil
		}
		raw = raw[skip:]
	}
	o.add(raw)
	return nil
}

// replace puts what write makes instead of rec.
func (o *passOutput) replace(rec *stream.Record, write func(*stream.Writer) error) error {
	o.lock()
	defer o.unlock()
	err := write(o.replaceLocked(rec))
	o.endReplace()
	return err
}

// releaseHeld queues a held EOS and footer.
func (o *passOutput) releaseHeld() {
	if !o.holding {
		return
	}
	o.holding = false
	o.endReplace()
	from := len(o.repl.b)
	o.repl.b = append(o.repl.b, o.held...)
	o.add(o.repl.b[from:len(o.repl.b):len(o.repl.b)])
}

func (o *passOutput) replaceLocked(rec *stream.Record) *stream.Writer {
	o.releaseHeld()
	if rec.Kind == stream.KindRAM && rec.RAM.Block != "" {
		o.destLast = rec.RAM.Block // a replacement names its block
	}
	o.endReplace()
	o.noTail(rec)
	o.replacing = true
	o.replFrom = len(o.repl.b)
	o.rw.ResetContinue()
	return o.rw
}

// drop leaves rec out.
func (o *passOutput) drop(rec *stream.Record) {
	o.lock()
	defer o.unlock()
	o.endReplace() // a dropped record leaves a held EOS held: nothing goes out for it
	o.noTail(rec)
}

// noTail records an error for a record that is changed after it went out with the tail (only
// device state is in the tail, and the handlers never change it).
func (o *passOutput) noTail(rec *stream.Record) {
	if o.tailStart >= 0 && rec.Offset < o.fwd && o.err == nil {
		o.err = fmt.Errorf("internal: the %s record at %d went out with the tail before it could be changed", rec.Kind, rec.Offset)
	}
}

// endReplace queues what the scratch Writer made for the last replaced record.
func (o *passOutput) endReplace() {
	if !o.replacing {
		return
	}
	o.replacing = false
	if err := o.rw.Flush(); err != nil && o.err == nil {
		o.err = err
	}
	o.add(o.repl.b[o.replFrom:len(o.repl.b):len(o.repl.b)])
}

// flush writes everything queued (one writev). It runs before the Reader reads again.
func (o *passOutput) flush() {
	o.lock()
	defer o.unlock()
	o.flushLocked()
}

func (o *passOutput) flushLocked() {
	o.endReplace()
	if o.err != nil || len(o.iov) == 0 {
		return
	}
	v := o.iov // WriteBuffers consumes v; o.iov keeps its array
	n, err := o.w.WriteBuffers(&v)
	o.produced += n
	o.pending = 0
	o.iov = o.iov[:0]
	o.repl.b = o.repl.b[:0]
	if err != nil {
		o.err = err
	}
}

// tailArrived forwards the device tail while it arrives, up to its safe prefix.
func (o *passOutput) tailArrived(tail []byte) {
	if o.tailStart < 0 {
		o.tailStart = o.rd.Offset()
		o.fwd = o.tailStart
		o.r.markTail(o.written())
		if m := o.r.merge; m != nil && !m.forward {
			// The device state begins: no ram body is open from here on, and every channel
			// must have delivered its last SYNC (a page after it would have nowhere to go).
			m.section(false)
			if err := m.drained(10 * time.Second); err != nil && o.err == nil {
				o.err = err
			}
			m.closeForGood()
		}
	}
	o.lock()
	defer o.unlock()
	o.releaseHeld()
	o.flushLocked()
	n := int64(stream.SafeTailPrefix(tail))
	if from := o.fwd - o.tailStart; n > from && o.err == nil {
		m, err := o.w.Write(tail[from:n])
		o.produced += int64(m)
		o.fwd += int64(m)
		if err != nil {
			o.err = err
		}
	}
}

// finish writes the rest of the stream, tells the source to complete (shut: its SHUT, the
// point of no return) and only then writes the stream's EOF and vmdesc and closes the
// destination cleanly. If the final bytes cannot be written at all, the destination never got a
// complete stream (a *DestinationError: the source may be resumed); if they went out in part,
// or the close fails, nobody can tell (an *UncertainError: the source is not resumed).
func (o *passOutput) finish(shut func() error) error {
	o.lock()
	o.releaseHeld()
	o.unlock()
	o.flush()
	if o.err != nil {
		return o.err // a write error is already a *DestinationError
	}
	if shut != nil {
		if d := commitDelay(); d > 0 {
			time.Sleep(d) // test-only: hold the moment before the point of no return open
		}
		if err := shut(); err != nil {
			return fmt.Errorf("telling the source to complete: %w", err)
		}
	}
	var n int
	var err error
	if len(o.final) > 0 { // an empty write on a socket shut for writing fails with EPIPE
		n, err = o.w.Write(o.final)
	}
	o.produced += int64(n)
	if err != nil {
		if n == 0 {
			return err // already a *DestinationError: the destination never got EOF
		}
		return &UncertainError{Err: fmt.Errorf("the stream's end went out only in part: %w", err)}
	}
	if err := o.r.dst.Close(); err != nil {
		return &UncertainError{Err: fmt.Errorf("finishing the stream: %w", err)}
	}
	return nil
}

// insertPacket writes the pages of a multifd packet into the stream, after everything queued
// (merge mode; the caller has checked that a ram section body is open and that the packet's
// epoch is the stream's).
func (o *passOutput) insertPacket(p *stream.MultifdPacket, layout stream.MultifdLayout) error {
	o.lock()
	defer o.unlock()
	o.flushLocked()
	if o.err != nil {
		return o.err
	}
	block := p.BlockName()
	o.insW.ResetContinue()
	o.ins.b = o.ins.b[:0]
	for i, off := range p.NormalOffsets() {
		if err := o.insW.WritePage(off, block, p.Page(i)); err != nil {
			return err
		}
	}
	if layout == stream.MultifdV100 {
		for _, off := range p.ZeroOffsets() {
			if err := o.insW.WriteZero(stream.RAMZero|o.insW.Continue(block), off, block, 0); err != nil {
				return err
			}
		}
	}
	if err := o.insW.Flush(); err != nil {
		return err
	}
	n, err := o.w.Write(o.ins.b)
	o.produced += int64(n)
	o.destLast = block
	if err != nil {
		o.err = err
	}
	return err
}

// finishWrite writes the rest and closes only the writing direction (postcopy: the
// destination's return path still runs on the connection).
func (o *passOutput) finishWrite() error {
	o.lock()
	o.releaseHeld()
	o.unlock()
	o.flush()
	if o.err != nil {
		return o.err
	}
	if len(o.final) > 0 {
		n, err := o.w.Write(o.final)
		o.produced += int64(n)
		o.final = o.final[:0]
		if err != nil {
			return err
		}
	}
	if cw, ok := o.r.dst.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil {
			return &DestinationError{Err: fmt.Errorf("finishing the stream: %w", err)}
		}
	}
	return nil
}

// replBuffer collects the scratch Writer's output.
type replBuffer struct{ b []byte }

func (r *replBuffer) Write(p []byte) (int, error) {
	r.b = append(r.b, p...)
	return len(p), nil
}

// markTail notes when the device tail began to arrive and how much had been written then.
func (r *Relay) markTail(at int64) {
	r.mu.Lock()
	if r.tailAt.IsZero() {
		r.tailAt, r.tailFrom = time.Now(), at
	}
	r.mu.Unlock()
}
