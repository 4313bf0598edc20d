package savevm

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeebo/xxh3"

	"github.com/qemu-migrate-go/qemu-migrate-go/link"
	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// LinkOptions configure the sending end of a link (NewLinkRelay).
type LinkOptions struct {
	// Compress is "auto" (default: per batch, by how busy the link is), "none", "zstd", "s2" or
	// "lz4".
	Compress string
	// Workers hash-and-compress goroutines (default GOMAXPROCS).
	Workers int
	// CompleteTimeout bounds each step of the completion handshake (READY, DELIVERED);
	// default 30 s.
	CompleteTimeout time.Duration
}

// LinkSummary is what the link did, in Summary.Link.
type LinkSummary struct {
	Connections int   `json:"connections"`
	BytesOnLink int64 `json:"bytes_on_link"` // data frames written to the link
	// Pages the destination already held with the same content (not sent), and zero pages it
	// already held as zero.
	PagesSkipped int64 `json:"pages_skipped"`
	ZeroSkipped  int64 `json:"zero_skipped"`
	// PageBytes: page data put into batches (before compression); Frames by codec.
	PageBytes int64            `json:"page_bytes"`
	Frames    map[string]int64 `json:"frames"`
	// UrgentPages went ahead of the queued data frames (postcopy: pages the destination asked
	// for, PROTOCOL.md §7.1).
	UrgentPages int64 `json:"urgent_pages,omitempty"`
	// LateUrgent (receiver) counts the URGENT frames that came after the END of a postcopy,
	// written before its EOF all the same (PROTOCOL.md §7.1).
	LateUrgent int64 `json:"late_urgent,omitempty"`
}

// NewLinkRelay prepares a migration from src (the source QEMU's connection) over an established
// link session: the engine's output is the link instead of a QEMU stream, and the receiving
// sidecar's engine writes the stream for its QEMU (design.md "Two sidecars"). The session is
// the caller's to close; an aborted relay aborts it.
func NewLinkRelay(src io.ReadCloser, s *link.Session, ctl Control, opt Options, lo LinkOptions) (*Relay, error) {
	chooser, err := link.NewChooser(lo.Compress)
	if err != nil {
		return nil, err
	}
	if lo.Workers <= 0 {
		lo.Workers = defaultWorkers()
	}
	if lo.CompleteTimeout <= 0 {
		lo.CompleteTimeout = 30 * time.Second
	}
	r := NewRelay(src, linkAborter{s}, ctl, opt)
	r.newLinkOutput = func(r *Relay) output { return newLinkOutput(r, s, chooser, lo) }
	r.linkBytes = s.BytesSent
	r.linkBacklog = s.Backlog
	return r, nil
}

// ResumeLink continues a link relay whose link broke during postcopy (Resume): src is the
// source's resumed migration, s the new session with the receiver, whose destination has been
// told to recover.
func (r *Relay) ResumeLink(ctx context.Context, src io.ReadCloser, s *link.Session) (Summary, error) {
	prev, ok := r.out.(*linkOutput)
	if !ok {
		return Summary{}, errors.New("internal: ResumeLink on a relay that has no link")
	}
	base := r.linkBytes()
	r.linkBytes = func() int64 { return base + s.BytesSent() }
	r.linkBacklog = s.Backlog
	r.newLinkOutput = func(*Relay) output { return prev.resumed(s) }
	return r.Resume(ctx, src, linkAborter{s})
}

// linkAborter lets the relay's abort reach the link: the receiver then resets its QEMU.
type linkAborter struct{ s *link.Session }

func (a linkAborter) Write(p []byte) (int, error) { return 0, errors.New("not a stream destination") }

// Read is the destination's return path as the receiver forwards it (RETURN frames, feature
// postcopy): the engine bridges it to the source (postcopy.go).
func (a linkAborter) Read(p []byte) (int, error) { return a.s.ReadReturn(p) }
func (a linkAborter) Close() error               { return nil }
func (a linkAborter) Abort()                     { a.s.Abort(link.CodeSource, "the sending sidecar gave up") }
func (a linkAborter) Interrupt(why error) {
	a.s.Abort(link.CodeCancelled, "the sending sidecar was interrupted ("+why.Error()+")")
}

// linkOutput turns the source's records into link frames (PROTOCOL.md §2.2): page records
// into PAGES batches — leaving out what the destination already holds (content hash per
// page) and compressed on worker goroutines —, the stream's structure into SECTION, MEMSIZE,
// SECTION_END and COMMAND frames, and the device tail exactly as QEMU made it into DEVICE
// frames. Frames leave in stream order: a dispatcher sends each one once it is encoded.
type linkOutput struct {
	r   *Relay
	s   *link.Session
	lo  LinkOptions
	seq uint64

	chooser *link.Chooser
	work    chan *slot // batches to encode
	order   chan *slot // every frame, in sequence order
	wg      sync.WaitGroup
	sendErr atomic.Pointer[error]
	slots   freeList[*slot]
	bufs    freeList[[]byte]

	hdr struct{ magic, version uint32 }
	// RAM: blocks by name (MEMSIZE order), what the destination holds per page, the batch
	// being filled.
	blocks  map[string]int
	held    []pageHashes
	batch   *slot
	seed    uint64
	zero    xxh3.Uint128
	scratch [link.PageSize]byte
	inflate stream.Inflater
	eosFor  uint32 // the ram section whose EOS was read: its footer makes SECTION_END
	eos     bool
	ended   bool // END is out
	// delivered is the receiver's DELIVERED.
	delivered link.Delivered

	// Postcopy (feature postcopy, PROTOCOL.md §7): postcopy says the receiver takes the
	// postcopy commands; switched is set at the switch (RAM_DISCARD or PACKAGED), from when the
	// destination drops the pages it is told to and gets every page the source sends, so none
	// is left out for being held already, and each batch goes out as soon as the source's
	// input pauses (a requested page must not wait for a batch to fill). pkg collects the
	// PACKAGED command's nested stream.
	postcopy bool
	switched bool
	inPkg    bool
	pkgW     *stream.Writer
	pkgBuf   devBuffer
	// Requested pages go as URGENT frames, once a section has gone on this session (so that
	// they come after a recovery's RESUME), and only for blocks of 4 KiB pages (a huge page's
	// target pages must reach the destination together).
	sectionSent bool
	smallPages  []bool

	// Device state, collected into DEVICE frames.
	devW    *stream.Writer
	devBuf  devBuffer
	devSent int64 // device bytes already in DEVICE frames

	stats struct {
		skipped, zeroSkipped, pageBytes, urgent atomic.Int64
		frames                                  [4]atomic.Int64
	}
}

// pageHashes is what the destination holds for each page of a block: a content hash, valid
// where the known bit is set.
type pageHashes struct {
	hash  []xxh3.Uint128
	known []uint64
}

// slot is one frame on its way: a ready encoding, or a batch for a worker to encode.
type slot struct {
	seq   uint64
	buf   []byte
	batch link.Batch
	pages bool // buf is to be made from batch
	ready chan struct{}
}

// Frame sizes of the sender: a batch is sent at 256 KiB of page data (64 pages; larger batches
// compress no better), device state in frames of 256 KiB. With the queues below, what is in
// flight stays a few MiB whatever the guest size.
const (
	batchBytes = 256 << 10
	// postcopyBatchBytes: after the switch a requested page waits behind every frame queued
	// before it (QueueFrames, and the connections' unsent bytes), so frames are smaller.
	postcopyBatchBytes = 64 << 10
	devFrameSize       = 256 << 10
	bigBuf             = batchBytes + 16<<10
)

func defaultWorkers() int { return max(1, min(4, runtime.GOMAXPROCS(0))) }

func newLinkOutput(r *Relay, s *link.Session, chooser *link.Chooser, lo LinkOptions) *linkOutput {
	o := &linkOutput{r: r, s: s, lo: lo, chooser: chooser, blocks: map[string]int{},
		work: make(chan *slot, lo.Workers), order: make(chan *slot, 2*lo.Workers+2)}
	var seed [8]byte
	rand.Read(seed[:])
	o.seed = binary.LittleEndian.Uint64(seed[:])
	o.zero = xxh3.Hash128Seed(make([]byte, link.PageSize), o.seed)
	// Spares for every frame that can be in flight: being filled, encoded, in order, queued
	// in the session and written by a connection.
	spare := cap(o.work) + cap(o.order) + s.FramesHeld() + 2
	o.slots = newFreeList(spare, func() *slot { return &slot{ready: make(chan struct{}, 1)} })
	o.bufs = newFreeList(spare, func() []byte { return make([]byte, 0, bigBuf) })
	s.SetRelease(func(b []byte) {
		if cap(b) >= bigBuf {
			o.bufs.put(b[:0])
		}
	})
	o.devW = stream.NewWriter(&o.devBuf, stream.WithBatchSize(devFrameSize))
	o.postcopy = link.HasFeature(s.Welcome.Features, link.FeaturePostcopy)
	for i := 0; i < lo.Workers; i++ {
		o.wg.Add(1)
		go o.encode()
	}
	o.wg.Add(1)
	go o.dispatch()
	return o
}

func (o *linkOutput) written() int64        { return o.s.BytesSent() }
func (o *linkOutput) tailData([]byte)       {}
func (o *linkOutput) attach(*stream.Reader) {}

// beforeRead runs when the source's input is about to wait: after the switch to postcopy the
// batch goes out now (a send error shows at the next record).
func (o *linkOutput) beforeRead() {
	if o.switched && !o.inPkg {
		o.flushBatch()
	}
}

// finishWrite ends a postcopy stream (PROTOCOL.md §7.1): everything up to the source's EOF,
// then END without a vmdesc, all on the link. There is no COMMIT: since the switch the guest
// runs on the destination, whose SHUT on the return path says it has everything.
func (o *linkOutput) finishWrite() error {
	if !o.switched || o.inPkg {
		return errors.New("link: the postcopy stream ended before its switch or inside its package")
	}
	if err := o.flushBatch(); err != nil {
		return err
	}
	if err := o.flushDevice(); err != nil {
		return err
	}
	// END counts the URGENT frames, which may reach the receiver after it (PROTOCOL.md §7.1).
	if err := o.submit(link.End{Seq: o.next(), HasUrgent: true, Urgent: o.s.UrgentSent()}.Append(small(24))); err != nil {
		return err
	}
	if err := o.drain(); err != nil {
		return err
	}
	o.r.mu.Lock()
	o.r.sum.Link = o.summary()
	o.r.mu.Unlock()
	return nil
}

// resumed is the output of a postcopy recovery on the new session s: what the destination
// holds (the blocks, the header) carries over; sequence numbers start again (PROTOCOL.md §7.2).
// The batch and any section the break cut are gone: the received bitmaps tell the source what
// to send again.
func (o *linkOutput) resumed(s *link.Session) *linkOutput {
	n := newLinkOutput(o.r, s, o.chooser, o.lo)
	n.hdr, n.blocks, n.held, n.seed, n.zero, n.smallPages = o.hdr, o.blocks, o.held, o.seed, o.zero, o.smallPages
	n.stats.urgent.Store(o.stats.urgent.Load())
	if o.switched {
		n.toPostcopy()
	}
	n.stats.skipped.Store(o.stats.skipped.Load())
	n.stats.zeroSkipped.Store(o.stats.zeroSkipped.Load())
	n.stats.pageBytes.Store(o.stats.pageBytes.Load())
	for i := range o.stats.frames {
		n.stats.frames[i].Store(o.stats.frames[i].Load())
	}
	return n
}

func (o *linkOutput) buf() []byte { return o.bufs.get() }

// freeList keeps up to a fixed number of spare values for reuse. A sync.Pool will not do: every
// garbage collection empties it, and under the link's soft heap limit the collector runs often,
// so each batch's buffers became fresh allocations that brought the next collection sooner —
// 1,068 collections and 312 MB allocated for a 1 GiB guest, the sender's CPU 2.6 s against
// 0.7 s without the limit.
type freeList[T any] struct {
	spare chan T
	new   func() T
}

func newFreeList[T any](n int, new func() T) freeList[T] {
	return freeList[T]{spare: make(chan T, n), new: new}
}

// get returns a spare value, or a new one.
func (f freeList[T]) get() T {
	select {
	case v := <-f.spare:
		return v
	default:
		return f.new()
	}
}

// put keeps v as a spare unless there are enough.
func (f freeList[T]) put(v T) {
	select {
	case f.spare <- v:
	default:
	}
}

// small returns a buffer for a small frame (structure).
func small(n int) []byte { return make([]byte, 0, n+32) }

// encode is a worker: it hashes nothing (the engine did) but compresses batches.
func (o *linkOutput) encode() {
	defer o.wg.Done()
	enc := link.NewEncoder()
	for sl := range o.work {
		var c link.Codec
		want := o.chooser.Pick(o.s.Busy())
		sl.buf, c = enc.AppendPages(o.buf(), sl.seq, &sl.batch, want)
		raw := 8*len(sl.batch.Entries) + len(sl.batch.Data)
		encoded := raw // the codec gave up: nothing gained
		if c != link.CodecNone {
			encoded = len(sl.buf) - link.PagesOverhead
		}
		o.chooser.Observe(want, raw, encoded)
		o.stats.frames[c].Add(1)
		sl.ready <- struct{}{}
	}
}

// dispatch sends the frames in sequence order as they become ready.
func (o *linkOutput) dispatch() {
	defer o.wg.Done()
	for sl := range o.order {
		<-sl.ready
		if o.sendErr.Load() == nil {
			if err := o.s.SendData(sl.buf); err != nil {
				o.sendErr.Store(&err)
			}
		}
		sl.buf = nil
		sl.batch.Reset(0)
		o.slots.put(sl)
	}
}

// err is the first send error, as a DestinationError.
func (o *linkOutput) err() error {
	if e := o.sendErr.Load(); e != nil {
		return &DestinationError{Err: *e}
	}
	return nil
}

// submit queues a frame that is already encoded.
func (o *linkOutput) submit(b []byte) error {
	sl := o.slots.get()
	sl.buf = b
	sl.ready <- struct{}{}
	return o.enqueue(sl)
}

func (o *linkOutput) enqueue(sl *slot) error {
	if err := o.err(); err != nil {
		return err
	}
	select {
	case o.order <- sl:
	case <-o.s.Done():
		return &DestinationError{Err: orClosed(o.s.Err())}
	}
	return nil
}

func orClosed(err error) error {
	if err == nil {
		return errors.New("link: closed")
	}
	return err
}

func (o *linkOutput) next() uint64 { o.seq++; return o.seq }

// flushBatch sends the batch being filled, if any.
func (o *linkOutput) flushBatch() error {
	sl := o.batch
	if sl == nil {
		return nil
	}
	o.batch = nil
	if sl.batch.Len() == 0 {
		o.slots.put(sl)
		return nil
	}
	sl.seq = o.next()
	o.stats.pageBytes.Add(int64(len(sl.batch.Data)))
	if err := o.enqueue(sl); err != nil {
		return err
	}
	o.work <- sl
	return nil
}

func (o *linkOutput) handle(rec *stream.Record) error {
	if rec.Depth != 0 {
		if !o.inPkg || rec.Depth != 1 {
			return fmt.Errorf("link: a nested record at offset %d outside the package of the postcopy switch", rec.Offset)
		}
		return o.pkgW.WriteRecord(rec)
	}
	switch rec.Kind {
	case stream.KindPackageEnd:
		return o.endPackage(rec)
	case stream.KindHeader:
		o.hdr.magic, o.hdr.version = rec.Magic, rec.Version
		return nil
	case stream.KindConfiguration:
		if rec.Config.HasCapability(stream.CapMappedRAM) {
			return fmt.Errorf("link: a mapped-ram stream (file: migration) cannot be sent over the link")
		}
		raw := rec.Config.Raw
		if raw == nil {
			return fmt.Errorf("link: configuration at offset %d: no raw bytes", rec.Offset)
		}
		return o.submit(link.Begin{Seq: o.next(), Magic: o.hdr.magic, Version: o.hdr.version, Config: raw}.Append(small(len(raw))))
	case stream.KindSectionStart, stream.KindSectionPart, stream.KindSectionEnd:
		if err := o.flushBatch(); err != nil {
			return err
		}
		o.sectionSent = true
		sec := link.Section{Seq: o.next(), Type: uint8(rec.Kind-stream.KindSectionStart) + link.StartSection, ID: rec.Section.ID}
		if rec.Kind == stream.KindSectionStart {
			sec.Idstr, sec.Instance, sec.Version = rec.Section.Idstr, rec.Section.Instance, rec.Section.Version
		}
		return o.submit(sec.Append(small(len(sec.Idstr) + 16)))
	case stream.KindRAM:
		return o.ram(rec)
	case stream.KindFooter:
		if o.eos && rec.Section.ID == o.eosFor {
			o.eos = false
			return o.submit(link.SectionEnd{Seq: o.next(), ID: rec.Section.ID}.Append(small(16)))
		}
		return o.device(rec)
	case stream.KindSectionFull:
		return o.device(rec)
	case stream.KindCommand:
		if err := o.flushBatch(); err != nil {
			return err
		}
		switch {
		case rec.Cmd == stream.CmdPackaged && o.postcopy:
			o.toPostcopy()
			o.inPkg = true
			o.pkgBuf.b = o.pkgBuf.b[:0]
			if o.pkgW == nil { // only a postcopy needs it (and its 1 MiB buffer)
				o.pkgW = stream.NewWriter(&o.pkgBuf)
			}
			return nil
		case rec.Cmd == stream.CmdSwitchoverStart || (o.postcopy && link.PostcopyCommand(uint16(rec.Cmd))):
			if rec.Cmd == stream.CmdPostcopyRAMDiscard {
				o.toPostcopy() // the destination drops these pages: they must all come again
			}
			return o.submit(link.Command{Seq: o.next(), Cmd: uint16(rec.Cmd), Payload: rec.Payload}.Append(small(len(rec.Payload) + 16)))
		}
		return fmt.Errorf("link: command %s at offset %d cannot be sent over the link (postcopy commands need --postcopy)", rec.Cmd, rec.Offset)
	case stream.KindEOF:
		return o.flushDevice()
	case stream.KindVMDesc:
		if err := o.flushDevice(); err != nil {
			return err
		}
		b := link.End{Seq: o.next(), HasVMDesc: true, VMDesc: rec.JSON}.Append(make([]byte, 0, len(rec.JSON)+32))
		o.ended = true
		return o.submit(b)
	}
	return fmt.Errorf("link: unexpected %s record at offset %d", rec.Kind, rec.Offset)
}

// ram handles one record of the ram section body.
func (o *linkOutput) ram(rec *stream.Record) error {
	r := &rec.RAM
	switch r.Flags &^ stream.RAMContinue {
	case stream.RAMMemSize:
		return o.memSize(rec)
	case stream.RAMEOS:
		o.eos, o.eosFor = true, rec.Section.ID
		return o.flushBatch()
	case stream.RAMMultifdFlush:
		return nil // a multifd sync of the source; the receiver writes a plain stream
	case stream.RAMPage:
		return o.page(r.Block, r.Offset, r.Data)
	case stream.RAMCompressPage:
		n, err := o.inflate.Inflate(o.scratch[:], r.Data)
		if err != nil || n != len(o.scratch) {
			return fmt.Errorf("ram: COMPRESS_PAGE at offset %d of %q: inflating: %v", r.Offset, r.Block, err)
		}
		return o.page(r.Block, r.Offset, o.scratch[:])
	case stream.RAMZero:
		if r.Fill != 0 {
			for i := range o.scratch {
				o.scratch[i] = r.Fill
			}
			return o.page(r.Block, r.Offset, o.scratch[:])
		}
		b, idx, err := o.target(r.Block, r.Offset)
		if err != nil {
			return err
		}
		if o.urgent(b) {
			return o.sendUrgent(link.Urgent{Block: uint16(b), Entry: r.Offset | link.KindZero})
		}
		if !o.switched && o.holds(b, idx, o.zero) {
			o.stats.zeroSkipped.Add(1)
			return nil
		}
		sl, err := o.batchFor(b)
		if err != nil {
			return err
		}
		sl.batch.Zero(r.Offset)
		return nil
	case stream.RAMXBZRLE:
		b, idx, err := o.target(r.Block, r.Offset)
		if err != nil {
			return err
		}
		o.held[b].known[idx/64] &^= 1 << (idx % 64) // a delta: the new content is not known here
		sl, err := o.batchFor(b)
		if err != nil {
			return err
		}
		sl.batch.XBZRLE(r.Offset, r.Data)
		return nil
	}
	return fmt.Errorf("link: ram record %s at offset %d cannot be sent over the link", r.Flags, rec.Offset)
}

// page sends a full page unless the destination holds the same content.
func (o *linkOutput) page(block string, off uint64, data []byte) error {
	b, idx, err := o.target(block, off)
	if err != nil {
		return err
	}
	if o.urgent(b) {
		return o.sendUrgent(link.Urgent{Block: uint16(b), Entry: off | link.KindPage, Data: data})
	}
	if !o.switched && o.holds(b, idx, xxh3.Hash128Seed(data, o.seed)) {
		o.stats.skipped.Add(1)
		return nil
	}
	sl, err := o.batchFor(b)
	if err != nil {
		return err
	}
	sl.batch.Page(off, data)
	return nil
}

// urgent reports whether the page being handled goes ahead of the queue as URGENT: a page of a
// block with 4 KiB pages that the destination asked for, after the switch.
func (o *linkOutput) urgent(b int) bool {
	return o.switched && o.r.pc.requested && o.sectionSent && o.smallPages[b]
}

func (o *linkOutput) sendUrgent(u link.Urgent) error {
	if err := o.s.SendUrgent(u); err != nil {
		return &DestinationError{Err: fmt.Errorf("a requested page: %w", err)}
	}
	o.stats.urgent.Add(1)
	return nil
}

// holds reports whether the destination's page idx of block b has content h, and records that
// it will have it from now on.
func (o *linkOutput) holds(b int, idx uint64, h xxh3.Uint128) bool {
	ph := &o.held[b]
	w, bit := idx/64, uint64(1)<<(idx%64)
	if ph.known[w]&bit != 0 && ph.hash[idx] == h {
		return true
	}
	ph.known[w] |= bit
	ph.hash[idx] = h
	return false
}

// target resolves a page to its block index and page number.
func (o *linkOutput) target(block string, off uint64) (int, uint64, error) {
	b, ok := o.blocks[block]
	if !ok {
		return 0, 0, fmt.Errorf("link: page of block %q, which MEM_SIZE did not list", block)
	}
	idx := off / link.PageSize
	if idx >= uint64(len(o.held[b].hash)) {
		return 0, 0, fmt.Errorf("link: page at 0x%x beyond block %q", off, block)
	}
	return b, idx, nil
}

// batchFor returns the batch being filled for block b, sending the current one first when it
// is for another block or full.
func (o *linkOutput) batchFor(b int) (*slot, error) {
	limit := batchBytes
	if o.switched {
		limit = postcopyBatchBytes
	}
	if sl := o.batch; sl != nil && (int(sl.batch.Block) != b || sl.batch.Full() || len(sl.batch.Data) >= limit) {
		if err := o.flushBatch(); err != nil {
			return nil, err
		}
	}
	if o.batch == nil {
		o.batch = o.slots.get()
		o.batch.pages = true
		o.batch.batch.Reset(uint16(b))
	}
	return o.batch, nil
}

func (o *linkOutput) memSize(rec *stream.Record) error {
	var ms link.MemSize
	ms.Seq = o.next()
	for _, b := range rec.RAM.Blocks {
		if b.HasMappedRAM {
			return fmt.Errorf("link: mapped-ram block %q cannot be sent over the link", b.Name)
		}
		if _, dup := o.blocks[b.Name]; dup {
			return fmt.Errorf("link: block %q listed twice in MEM_SIZE", b.Name)
		}
		if len(ms.Blocks) >= link.MaxBlocks {
			return fmt.Errorf("link: more than %d RAM blocks", link.MaxBlocks)
		}
		o.blocks[b.Name] = len(ms.Blocks)
		o.smallPages = append(o.smallPages, !b.HasPageSize || b.PageSize == link.PageSize)
		pages := (b.UsedLength + link.PageSize - 1) / link.PageSize
		o.held = append(o.held, pageHashes{hash: make([]xxh3.Uint128, pages), known: make([]uint64, (pages+63)/64)})
		ms.Blocks = append(ms.Blocks, link.Block{Name: b.Name, UsedLength: b.UsedLength,
			HasPageSize: b.HasPageSize, PageSize: b.PageSize, HasGPA: b.HasGPA, GPA: b.GPA})
	}
	var table int64
	for _, h := range o.held {
		table += int64(len(h.hash))*16 + int64(len(h.known))*8
	}
	reserveTableMemory(table)
	return o.submit(ms.Append(small(64 * len(ms.Blocks))))
}

// heapLimit is the process's soft heap limit as it was before a table was reserved.
var heapLimit struct {
	sync.Mutex
	base int64
	read bool
}

// reserveTableMemory makes room for the per-page hash table (bytes) in the process's soft heap
// limit, if one is set (GOMEMLIMIT, or the CLI's for a link): the limit is meant for the
// buffers of fixed size, and the table grows with the guest's RAM. A later call (a new session's
// table) replaces the earlier reservation.
func reserveTableMemory(bytes int64) {
	heapLimit.Lock()
	defer heapLimit.Unlock()
	if !heapLimit.read {
		heapLimit.base, heapLimit.read = debug.SetMemoryLimit(-1), true
	}
	if heapLimit.base < math.MaxInt64/2 {
		debug.SetMemoryLimit(heapLimit.base + bytes)
	}
}

// toPostcopy is the switch to postcopy as the link sees it: from now on every page goes, and the
// link's cap is --postcopy-bandwidth's, as the source's is (Hold).
func (o *linkOutput) toPostcopy() {
	if !o.switched {
		o.switched = true
		o.s.SetBandwidth(o.r.opt.Policy.PostcopyBandwidth)
	}
}

// endPackage sends the PACKAGED command's nested stream, as the source made it, in one
// PACKAGED frame.
func (o *linkOutput) endPackage(rec *stream.Record) error {
	if !o.inPkg {
		return fmt.Errorf("link: the end of a package at offset %d that the link did not open", rec.Offset)
	}
	o.inPkg = false
	if err := o.pkgW.Flush(); err != nil {
		return err
	}
	data := o.pkgBuf.b
	if len(data) > link.MaxPackagedPayload-8 {
		return fmt.Errorf("link: a package of %d bytes at offset %d (at most %d)", len(data), rec.Offset, link.MaxPackagedPayload-8)
	}
	b := append(link.AppendPackagedHeader(make([]byte, 0, len(data)+link.HeaderSize+8), o.next()), data...)
	link.SetHeaderLength(b)
	o.pkgBuf.b = nil // the frame's buffer is b; the package is sent once
	return o.submit(b)
}

// device adds a record of the device tail (a FULL section or its footer) to the DEVICE frame
// being filled, exactly as QEMU wrote it.
func (o *linkOutput) device(rec *stream.Record) error {
	if err := o.devW.WriteRecord(rec); err != nil {
		return err
	}
	if o.devW.Offset()-o.devSent >= devFrameSize {
		return o.flushDevice()
	}
	return nil
}

// flushDevice sends the device bytes collected so far as one or more DEVICE frames.
func (o *linkOutput) flushDevice() error {
	if err := o.devW.Flush(); err != nil {
		return err
	}
	rest := o.devBuf.b
	for len(rest) > 0 {
		n := min(len(rest), devFrameSize)
		b := append(link.AppendDeviceHeader(o.buf(), o.next()), rest[:n]...)
		link.SetHeaderLength(b)
		rest = rest[n:]
		o.devSent += int64(n)
		if err := o.submit(b); err != nil {
			return err
		}
	}
	o.devBuf.b = o.devBuf.b[:0]
	return nil
}

// devBuffer collects the device Writer's output.
type devBuffer struct{ b []byte }

func (d *devBuffer) Write(p []byte) (int, error) {
	d.b = append(d.b, p...)
	return len(p), nil
}

// finish completes the link (PROTOCOL.md §5): every frame sent, the receiver READY, COMMIT,
// and DELIVERED back. Only then may the source complete.
func (o *linkOutput) finish(shut func() error) error {
	if !o.ended {
		return fmt.Errorf("link: the source stream ended without a vmdesc after EOF")
	}
	if err := o.drain(); err != nil {
		return err
	}
	if _, err := o.await(link.FrameReady, o.lo.CompleteTimeout); err != nil {
		return err
	}
	if d := commitDelay(); d > 0 {
		// Test-only (compat TestLinkFault): hold the moment before the point of no return
		// open long enough for a fault to land in it deterministically.
		select {
		case <-time.After(d):
		case <-o.s.Done():
			return &DestinationError{Err: fmt.Errorf("before COMMIT: %w", orClosed(o.s.Err()))}
		}
	}
	// The source's SHUT goes before COMMIT: once the receiver can complete its QEMU's
	// stream, the source will never resume by itself (no split brain).
	if shut != nil {
		if err := shut(); err != nil {
			return fmt.Errorf("telling the source to complete: %w", err)
		}
	}
	if err := o.s.SendControl(link.FrameCommit, nil); err != nil {
		return &UncertainError{Err: fmt.Errorf("COMMIT: %w", err)}
	}
	f, err := o.await(link.FrameDelivered, o.lo.CompleteTimeout)
	if err != nil {
		// COMMIT is out: the receiver may have completed its QEMU's stream. The source must
		// not be resumed now (PROTOCOL.md §5, step 4).
		return &UncertainError{Err: err}
	}
	var d link.Delivered
	json.Unmarshal(f.Payload, &d)
	o.delivered = d
	o.r.mu.Lock()
	o.r.sum.Link = o.summary()
	o.r.mu.Unlock()
	return nil
}

// drain ends the encoders and hands every queued frame to the connections (within
// CompleteTimeout): the stream's end, with COMMIT (finish) or without (finishWrite).
func (o *linkOutput) drain() error {
	o.closeWorkers()
	if err := o.err(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.lo.CompleteTimeout)
	defer cancel()
	if err := o.s.Drain(ctx); err != nil {
		return &DestinationError{Err: fmt.Errorf("sending the last frames: %w", err)}
	}
	return nil
}

// await waits for one control frame from the receiver.
func (o *linkOutput) await(t link.FrameType, timeout time.Duration) (link.Frame, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case f := <-o.s.Control():
		if f.Type != t {
			return f, &DestinationError{Err: fmt.Errorf("link: the receiver sent %s, expected %s", f.Type, t)}
		}
		return f, nil
	case <-o.s.Done():
		select { // a frame the receiver sent just before it closed still counts
		case f := <-o.s.Control():
			if f.Type == t {
				return f, nil
			}
		default:
		}
		return link.Frame{}, &DestinationError{Err: fmt.Errorf("waiting for %s: %w", t, orClosed(o.s.Err()))}
	case <-timer.C:
		return link.Frame{}, &DestinationError{Err: fmt.Errorf("link: no %s from the receiver within %v", t, timeout)}
	}
}

func (o *linkOutput) summary() *LinkSummary {
	ls := &LinkSummary{Connections: o.s.Connections(), BytesOnLink: o.r.transferred(),
		PagesSkipped: o.stats.skipped.Load(), ZeroSkipped: o.stats.zeroSkipped.Load(),
		PageBytes: o.stats.pageBytes.Load(), Frames: map[string]int64{}, UrgentPages: o.stats.urgent.Load()}
	for c := range o.stats.frames {
		if n := o.stats.frames[c].Load(); n > 0 {
			ls.Frames[link.Codec(c).String()] = n
		}
	}
	return ls
}

func (o *linkOutput) closeWorkers() {
	if o.work == nil {
		return
	}
	close(o.work)
	close(o.order)
	o.wg.Wait()
	o.work = nil
}

func (o *linkOutput) close() { o.closeWorkers() }

// commitDelayEnv names the test-only delay before COMMIT (a duration).
const commitDelayEnv = "QMG_TEST_COMMIT_DELAY"

func commitDelay() time.Duration {
	d, _ := time.ParseDuration(os.Getenv(commitDelayEnv))
	return d
}

// UncertainError is a link failure after COMMIT and before DELIVERED: the receiver may or may
// not have completed its QEMU's stream. The source is completed (never resumed) and the
// operator is told to look at the destination.
type UncertainError struct{ Err error }

func (e *UncertainError) Error() string { return e.Err.Error() }
func (e *UncertainError) Unwrap() error { return e.Err }
