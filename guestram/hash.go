package guestram

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeebo/xxh3"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// PageSize is the unit that is hashed: the x86 target page (TARGET_PAGE_SIZE), which is also
// the unit of the migration stream's RAM records (stream-format.md §3). Blocks on hugepages are
// hashed in 4 KiB pages too, so both sides of a migration always agree on the unit.
const PageSize = 4096

// Method is how a block's bytes are read.
type Method string

// The reading methods, fastest first (see DefaultMethods and the benchmarks).
const (
	// MethodFile maps the shared file that holds the block (memory-backend-memfd, or
	// memory-backend-file with share=on) read-only, through the QEMU's own descriptor
	// (/proc/PID/fd/N): no copy, and holes (pages never written) are skipped with SEEK_DATA.
	MethodFile Method = "file"
	// MethodProcessVM copies the block out of the QEMU process's own mapping with
	// process_vm_readv, a chunk per call.
	MethodProcessVM Method = "process_vm_readv"
	// MethodProcMem is the same through pread on /proc/PID/mem.
	MethodProcMem Method = "proc-mem"
	// MethodPMemSave has QEMU write the guest-physical ranges that show the block into a FIFO
	// (QMP pmemsave) in a private folder: it needs only QMP, and reads only what the guest sees.
	MethodPMemSave Method = "pmemsave"
)

// DefaultMethods is the order methods are tried in for each block (figures: bench_test.go). The
// file mapping first: it costs about what process_vm_readv does on memory the guest has written,
// and nothing on memory it never touched (holes are skipped), without touching the QEMU process.
// Then process_vm_readv, which measured about twice as fast as /proc/PID/mem. pmemsave last: a
// quarter of the speed or less, and it holds QEMU's main loop (its monitor) while it runs.
var DefaultMethods = []Method{MethodFile, MethodProcessVM, MethodProcMem, MethodPMemSave}

// ParseMethods reads a comma-separated method order (--verify-method).
func ParseMethods(s string) ([]Method, error) {
	var ms []Method
	for _, name := range strings.Split(s, ",") {
		m := Method(strings.TrimSpace(name))
		if !slices.Contains(DefaultMethods, m) {
			return nil, fmt.Errorf("%q is not one of file, process_vm_readv, proc-mem, pmemsave", name)
		}
		ms = append(ms, m)
	}
	return ms, nil
}

// KnownMethods keeps the names of names that are methods, in order (nil when none is).
func KnownMethods(names []string) []Method {
	var ms []Method
	for _, name := range names {
		if m := Method(name); slices.Contains(DefaultMethods, m) {
			ms = append(ms, m)
		}
	}
	return ms
}

// Options tune Hash. The zero value is valid.
type Options struct {
	// Methods are the methods allowed, in order of preference; nil means DefaultMethods. A block
	// no allowed method can read is reported (BlockHashes.Note), not an error.
	Methods []Method
	// Workers is the number of goroutines that read and hash; 0 means GOMAXPROCS.
	Workers int
	// ChunkSize is the bytes one read covers (a multiple of PageSize); 0 means 4 MiB.
	ChunkSize int
	// ReadTimeout bounds every single read (one chunk) and every QMP command; a QEMU that dies or
	// stops answering fails the hash within about this long. 0 means 10 s.
	ReadTimeout time.Duration
	// Seed is the xxh3 seed. Both sides of a comparison must use the same one; a seed chosen at
	// random for each verification keeps a guest from planting pages that collide.
	Seed uint64
	// TempDir is where pmemsave's private folder is made; "" means os.TempDir().
	TempDir string
}

func (o Options) withDefaults() Options {
	if o.Methods == nil {
		o.Methods = DefaultMethods
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	if o.ChunkSize <= 0 {
		o.ChunkSize = 4 << 20
	}
	o.ChunkSize = (o.ChunkSize + PageSize - 1) / PageSize * PageSize
	if o.ReadTimeout <= 0 {
		o.ReadTimeout = 10 * time.Second
	}
	return o
}

// Sum is the 128-bit xxh3 hash of one page.
type Sum struct{ Hi, Lo uint64 }

// HashPage returns the hash of one page's bytes with seed.
func HashPage(page []byte, seed uint64) Sum {
	h := xxh3.Hash128Seed(page, seed)
	return Sum{Hi: h.Hi, Lo: h.Lo}
}

var zeroPage [PageSize]byte

// ZeroSum returns the hash of an all-zero page with seed.
func ZeroSum(seed uint64) Sum { return HashPage(zeroPage[:], seed) }

// List is the hash of every page of every RAM block of one QEMU.
type List struct {
	Seed   uint64
	Blocks []BlockHashes
}

// BlockHashes is one block's page hashes.
type BlockHashes struct {
	Name   string
	Used   int64  // the block's used length in bytes
	Method Method // how it was read; "" when it was not read
	Note   string // why it was not read (or what was left out)
	// Pages holds one hash per page of Used (the last page may be partial: its hash covers the
	// bytes that exist); empty when the block was not read.
	Pages []Sum
	// Unread are the pages that were not read (pmemsave: the parts of the block the guest does
	// not see); their entries in Pages are zero and mean nothing.
	Unread []PageRange
}

// Block returns the hashes of the block with that name, or nil.
func (l *List) Block(name string) *BlockHashes {
	for i := range l.Blocks {
		if l.Blocks[i].Name == name {
			return &l.Blocks[i]
		}
	}
	return nil
}

// ErrRunning is returned when the VM runs before or while it is hashed: the hashes of memory that
// changes under the reader mean nothing.
var ErrRunning = errors.New("guestram: the VM is running: only a paused VM can be hashed")

// Hash reads and hashes every page of every block of l (a Layout of the QEMU behind c), which
// must stay paused: its run state is checked before and after, and its process identity while
// reading. Memory in use is bounded by Workers × ChunkSize (two more chunks for pmemsave) plus
// 16 bytes per page for the result, whatever the guest's size. Every read has ReadTimeout;
// cancelling ctx stops the work.
func Hash(ctx context.Context, c *qmp.Client, l *Layout, opt Options) (*List, error) {
	opt = opt.withDefaults()
	if err := checkPaused(ctx, c, opt.ReadTimeout, "before hashing"); err != nil {
		return nil, err
	}
	if err := l.alive(); err != nil {
		return nil, err
	}
	list := &List{Seed: opt.Seed, Blocks: make([]BlockHashes, len(l.Blocks))}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	h := &hasher{l: l, c: c, opt: opt, zero: ZeroSum(opt.Seed)}
	defer h.close()
	for i := range l.Blocks {
		b := &l.Blocks[i]
		bh := &list.Blocks[i]
		bh.Name, bh.Used = b.Name, b.Used
		if err := h.block(ctx, b, bh); err != nil {
			return nil, err
		}
	}
	if err := l.alive(); err != nil {
		return nil, err
	}
	if err := checkPaused(ctx, c, opt.ReadTimeout, "after hashing"); err != nil {
		return nil, err
	}
	return list, nil
}

// checkPaused fails when the VM runs (or the monitor does not answer in time).
func checkPaused(ctx context.Context, c *qmp.Client, timeout time.Duration, when string) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	st, err := c.QueryStatus(ctx)
	if err != nil {
		return fmt.Errorf("guestram: run state %s: %w", when, err)
	}
	if st.Running || st.Status == "running" {
		return fmt.Errorf("%w (status %q %s)", ErrRunning, st.Status, when)
	}
	return nil
}

// alive fails when the layout's process has exited (or its PID now names another process).
func (l *Layout) alive() error {
	st, err := startTime(l.PID)
	if err != nil || st != l.StartTime {
		return fmt.Errorf("guestram: QEMU pid %d has exited", l.PID)
	}
	return nil
}

// testHookChunk, when set by a test, runs after every chunk is read.
var testHookChunk func(m Method, off int64)

// hasher carries what Hash shares between blocks.
type hasher struct {
	l    *Layout
	c    *qmp.Client
	opt  Options
	zero Sum

	procMem    *procMemSource // opened on first use
	procMemErr error
	fifo       *fifoDir
	fifoErr    error
	gpaFresh   bool // the guest-physical map was read again for this Hash (pmemsave)
}

func (h *hasher) close() {
	if h.procMem != nil {
		h.procMem.close()
	}
	if h.fifo != nil {
		h.fifo.close()
	}
}

// block picks the first allowed method that can read b and hashes it into bh.
func (h *hasher) block(ctx context.Context, b *Block, bh *BlockHashes) error {
	var why []string
	for _, m := range h.opt.Methods {
		var err error
		switch m {
		case MethodFile:
			if !h.l.Usable(m, b) {
				why = append(why, "file: "+orDefault(b.FileNote, "no shared file backs it"))
				continue
			}
			var src *fileSource
			if src, err = openFileSource(h.l.PID, b); err == nil {
				err = h.random(ctx, b, bh, src)
			}
		case MethodProcessVM, MethodProcMem:
			if !h.l.Usable(m, b) {
				why = append(why, string(m)+": "+b.Located)
				continue
			}
			var src randomSource
			if m == MethodProcessVM {
				src = &vmReadvSource{pid: h.l.PID, base: b.HVA}
			} else {
				if h.procMem == nil && h.procMemErr == nil {
					h.procMem, h.procMemErr = openProcMem(h.l.PID)
				}
				if h.procMemErr != nil {
					why = append(why, string(m)+": "+h.procMemErr.Error())
					continue
				}
				src = h.procMem.at(b.HVA)
			}
			err = h.random(ctx, b, bh, src)
		case MethodPMemSave:
			if !h.gpaFresh {
				// The guest-physical map changes while a guest runs and when a destination
				// loads (RefreshGuestPhysical): read it as it is now, once per Hash.
				h.gpaFresh = true
				if err := h.l.RefreshGuestPhysical(ctx, h.c); err != nil {
					return err
				}
			}
			if !h.l.Usable(m, b) {
				why = append(why, "pmemsave: the guest does not see this block at any physical address")
				continue
			}
			if h.fifo == nil && h.fifoErr == nil {
				h.fifo, h.fifoErr = newFIFODir(h.opt.TempDir, h.l.PID)
			}
			if h.fifoErr != nil {
				why = append(why, "pmemsave: "+h.fifoErr.Error())
				continue
			}
			err = h.pmemsave(ctx, b, bh)
		default:
			return fmt.Errorf("guestram: unknown method %q", m)
		}
		var unusable *methodError
		if errors.As(err, &unusable) {
			// The method cannot be used for this block at all (nothing was read): try the next.
			why = append(why, string(m)+": "+unusable.Error())
			continue
		}
		if err != nil {
			return err
		}
		bh.Method = m
		return nil
	}
	bh.Pages, bh.Unread = nil, nil
	bh.Note = "not read: " + joinNotes(why)
	return nil
}

// methodError says a method cannot be used for a block (it failed before reading anything).
type methodError struct{ err error }

func (e *methodError) Error() string { return e.err.Error() }
func (e *methodError) Unwrap() error { return e.err }

// randomSource reads any part of a block.
type randomSource interface {
	// read returns the n bytes at block offset off, in buf (len(buf) ≥ n) or in memory of its
	// own. holes, when not nil, receives the page-aligned sub-ranges (block offsets) known to
	// be all zero without reading them.
	read(off int64, n int, buf []byte, holes func(start, end int64)) ([]byte, error)
	// release frees what the source holds. It is called once no read is in progress.
	release()
	// copies reports whether read needs buf (false: the source returns its own memory).
	copies() bool
	// probe reads the first byte to tell an unusable source from a failing read.
	probe() error
}

// inflight is one worker's current read, for the watchdog.
type inflight struct {
	since atomic.Int64 // UnixNano of the read's start; 0 when idle
	off   atomic.Int64
}

// random hashes block b through src with opt.Workers workers over chunks.
func (h *hasher) random(ctx context.Context, b *Block, bh *BlockHashes, src randomSource) error {
	if err := src.probe(); err != nil {
		src.release()
		return &methodError{err}
	}
	pages := b.Pages()
	bh.Pages = make([]Sum, pages)
	chunk := int64(h.opt.ChunkSize)
	jobs := make(chan int64)
	errc := make(chan error, h.opt.Workers)
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	slots := make([]inflight, h.opt.Workers)
	for w := 0; w < h.opt.Workers; w++ {
		wg.Add(1)
		go func(slot *inflight) {
			defer wg.Done()
			var buf []byte
			if src.copies() {
				buf = make([]byte, chunk)
			}
			for off := range jobs {
				n := int(min(chunk, b.Used-off))
				slot.off.Store(off)
				slot.since.Store(time.Now().UnixNano())
				err := hashSafely(src, bh.Pages, off, n, buf, h.opt.Seed, h.zero)
				slot.since.Store(0)
				if testHookChunk != nil {
					testHookChunk(methodOf(src), off)
				}
				if err != nil {
					errc <- fmt.Errorf("guestram: block %s at offset 0x%x (%s): %w", b.Name, off, methodOf(src), err)
					return
				}
			}
		}(&slots[w])
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	feedErr := make(chan error, 1)
	go func() {
		defer close(jobs)
		for off := int64(0); off < b.Used; off += chunk {
			select {
			case jobs <- off:
			case <-wctx.Done():
				feedErr <- wctx.Err()
				return
			}
		}
	}()
	tick := time.NewTicker(min(h.opt.ReadTimeout/4, 250*time.Millisecond))
	defer tick.Stop()
	fail := func(err error) error {
		stop()
		select {
		case <-done:
			src.release()
		case <-time.After(time.Second):
			// A worker is stuck in a read (a fault on a file that hangs, a read that never
			// returns): leave the source mapped until it comes back.
			go func() { <-done; src.release() }()
		}
		return err
	}
	for {
		select {
		case <-done:
			select {
			case err := <-errc:
				return fail(h.explain(err))
			default:
			}
			select {
			case err := <-feedErr:
				return fail(fmt.Errorf("guestram: block %s: %w", b.Name, err))
			default:
			}
			src.release()
			return nil
		case err := <-errc:
			return fail(h.explain(err))
		case <-ctx.Done():
			return fail(fmt.Errorf("guestram: block %s: %w", b.Name, ctx.Err()))
		case <-tick.C:
			now := time.Now().UnixNano()
			for i := range slots {
				if s := slots[i].since.Load(); s != 0 && time.Duration(now-s) > h.opt.ReadTimeout {
					return fail(fmt.Errorf("guestram: block %s: a read at offset 0x%x (%s) has not finished after %v",
						b.Name, slots[i].off.Load(), methodOf(src), h.opt.ReadTimeout))
				}
			}
			if err := h.l.alive(); err != nil {
				return fail(fmt.Errorf("%w while reading block %s", err, b.Name))
			}
		}
	}
}

// explain replaces a read error by "QEMU exited" when that is its cause.
func (h *hasher) explain(err error) error {
	if aerr := h.l.alive(); aerr != nil {
		return fmt.Errorf("%w during hashing (%v)", aerr, err)
	}
	return err
}

// hashChunk hashes the n bytes at block offset off into sums.
func hashChunk(src randomSource, sums []Sum, off int64, n int, buf []byte, seed uint64, zero Sum) error {
	var holes [][2]int64 // sorted, page-aligned block offsets known to be zero
	data, err := src.read(off, n, buf, func(start, end int64) { holes = append(holes, [2]int64{start, end}) })
	if err != nil {
		return err
	}
	if len(data) < n {
		return fmt.Errorf("short read: %d of %d bytes", len(data), n)
	}
	hi := 0
	for p := 0; p < n; p += PageSize {
		a := off + int64(p)
		e := min(p+PageSize, n)
		for hi < len(holes) && holes[hi][1] <= a {
			hi++
		}
		if hi < len(holes) && a >= holes[hi][0] {
			if e-p == PageSize {
				sums[a/PageSize] = zero
			} else {
				sums[a/PageSize] = HashPage(zeroPage[:e-p], seed)
			}
			continue
		}
		sums[a/PageSize] = HashPage(data[p:e], seed)
	}
	return nil
}

func methodOf(src randomSource) Method {
	switch src.(type) {
	case *fileSource:
		return MethodFile
	case *vmReadvSource:
		return MethodProcessVM
	case *procMemAt:
		return MethodProcMem
	}
	return ""
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

func joinNotes(s []string) string {
	out := ""
	for i, x := range s {
		if i > 0 {
			out += "; "
		}
		out += x
	}
	return out
}
