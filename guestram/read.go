package guestram

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// fileSource is a block's shared file mapped read-only into this process (MethodFile).
type fileSource struct {
	f    *os.File
	mem  []byte
	base int64 // file offset of the block's first byte
	used int64

	mu      sync.Mutex
	extents []extent // runs found by lseek, in the order found
}

// openFileSource opens the block's file through the QEMU's descriptor and maps its used length.
// It checks that the descriptor still names the file Locate found (a descriptor number can be
// reused after a backend is deleted).
func openFileSource(pid int, b *Block) (*fileSource, error) {
	p := fmt.Sprintf("/proc/%d/fd/%d", pid, b.File.FD)
	f, err := os.OpenFile(p, os.O_RDONLY, 0)
	if err != nil {
		return nil, &methodError{fmt.Errorf("opening %s (%s): %w", p, b.File.Path, err)}
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || (b.File.Inode != 0 && st.Ino != b.File.Inode) {
		f.Close()
		return nil, &methodError{fmt.Errorf("%s no longer names %s", p, b.File.Path)}
	}
	if st.Size < b.File.Offset+b.Used {
		f.Close()
		return nil, &methodError{fmt.Errorf("%s is %d bytes, the block needs %d from offset %d", b.File.Path, st.Size, b.Used, b.File.Offset)}
	}
	// Whole pages of the block's own size (hugetlbfs maps only whole huge pages).
	ps := max(b.PageSize, PageSize)
	length := int((b.Used + ps - 1) / ps * ps)
	mem, err := unix.Mmap(int(f.Fd()), b.File.Offset, length, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, &methodError{fmt.Errorf("mapping %s: %w", b.File.Path, err)}
	}
	return &fileSource{f: f, mem: mem, base: b.File.Offset, used: b.Used}, nil
}

func (s *fileSource) copies() bool { return false }

func (s *fileSource) probe() error { return nil }

func (s *fileSource) release() {
	if s.mem != nil {
		unix.Munmap(s.mem)
		s.mem = nil
	}
	s.f.Close()
}

// read returns the mapping itself; pages in the file's holes (never written: SEEK_DATA skips
// them) are reported through holes and never touched, so that reading a mostly empty guest
// neither faults pages in nor makes the kernel allocate them.
func (s *fileSource) read(off int64, n int, _ []byte, holes func(start, end int64)) ([]byte, error) {
	pos, end := s.base+off, s.base+off+int64(n)
	for pos < end {
		e, ok := s.extentAt(pos)
		if !ok {
			break // the filesystem cannot tell: hash everything that is left
		}
		stop := min(e.end, end)
		if !e.data {
			hs := (pos - s.base + PageSize - 1) / PageSize * PageSize
			he := (stop - s.base) / PageSize * PageSize
			if stop == end {
				he = end - s.base // up to the chunk's end, even a partial last page
			}
			if he > hs {
				holes(hs, he)
			}
		}
		pos = stop
	}
	return s.mem[off : off+int64(n)], nil
}

// extent is a run of the file that is all data or all hole.
type extent struct {
	start, end int64
	data       bool
}

// maxExtents bounds the extent cache (16 KiB): a file more fragmented than that costs more
// lseek calls, never more memory.
const maxExtents = 1024

// extentAt returns the data or hole run that contains file offset pos. SEEK_HOLE and SEEK_DATA
// scan the page cache up to the answer, which can be the end of a 1 GiB file: each run is asked
// once and cached, since the file does not change while the VM is paused.
func (s *fileSource) extentAt(pos int64) (extent, bool) {
	s.mu.Lock()
	for _, e := range s.extents {
		if pos >= e.start && pos < e.end {
			s.mu.Unlock()
			return e, true
		}
	}
	s.mu.Unlock()
	fd := int(s.f.Fd())
	var e extent
	d, err := unix.Seek(fd, pos, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		e = extent{start: pos, end: s.base + s.used, data: false} // a hole up to the end
	case err != nil:
		return extent{}, false
	case d > pos:
		e = extent{start: pos, end: d, data: false}
	default:
		h, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil || h <= pos {
			return extent{}, false
		}
		e = extent{start: pos, end: h, data: true}
	}
	s.mu.Lock()
	if len(s.extents) >= maxExtents {
		s.extents = s.extents[1:]
	}
	s.extents = append(s.extents, e)
	s.mu.Unlock()
	return e, true
}

// vmReadvSource copies from the QEMU process with process_vm_readv (MethodProcessVM).
type vmReadvSource struct {
	pid  int
	base uint64
}

func (s *vmReadvSource) copies() bool { return true }
func (s *vmReadvSource) release()     {}

func (s *vmReadvSource) probe() error {
	var b [1]byte
	_, err := s.read(0, 1, b[:], nil)
	return err
}

func (s *vmReadvSource) read(off int64, n int, buf []byte, _ func(int64, int64)) ([]byte, error) {
	done := 0
	for done < n {
		local := []unix.Iovec{{Base: &buf[done]}}
		local[0].SetLen(n - done)
		remote := []unix.RemoteIovec{{Base: uintptr(s.base + uint64(off) + uint64(done)), Len: n - done}}
		got, err := unix.ProcessVMReadv(s.pid, local, remote, 0)
		if err != nil {
			if errors.Is(err, unix.ESRCH) {
				return nil, fmt.Errorf("process_vm_readv: QEMU pid %d is gone", s.pid)
			}
			return nil, fmt.Errorf("process_vm_readv of pid %d at 0x%x: %w", s.pid, s.base+uint64(off)+uint64(done), err)
		}
		if got == 0 {
			return nil, fmt.Errorf("process_vm_readv of pid %d at 0x%x: nothing read", s.pid, s.base+uint64(off)+uint64(done))
		}
		done += got
	}
	return buf[:n], nil
}

// procMemSource is /proc/PID/mem, opened once per Hash (MethodProcMem).
type procMemSource struct{ f *os.File }

func openProcMem(pid int) (*procMemSource, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return nil, err
	}
	return &procMemSource{f: f}, nil
}

func (p *procMemSource) close()                    { p.f.Close() }
func (p *procMemSource) at(base uint64) *procMemAt { return &procMemAt{p: p, base: base} }

// procMemAt reads one block of /proc/PID/mem.
type procMemAt struct {
	p    *procMemSource
	base uint64
}

func (s *procMemAt) copies() bool { return true }
func (s *procMemAt) release()     {}

func (s *procMemAt) probe() error {
	var b [1]byte
	_, err := s.read(0, 1, b[:], nil)
	return err
}

func (s *procMemAt) read(off int64, n int, buf []byte, _ func(int64, int64)) ([]byte, error) {
	addr := int64(s.base) + off
	got, err := s.p.f.ReadAt(buf[:n], addr)
	if got == n {
		return buf[:n], nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF // what a process that exited gives
	}
	return nil, fmt.Errorf("pread of /proc/PID/mem at 0x%x: %w", addr+int64(got), err)
}

// hashSafely runs hashChunk, turning a fault on a mapped file (truncated under us: SIGBUS) into an
// error instead of a crash.
func hashSafely(src randomSource, sums []Sum, off int64, n int, buf []byte, seed uint64, zero Sum) (err error) {
	if _, ok := src.(*fileSource); ok {
		old := debug.SetPanicOnFault(true)
		defer debug.SetPanicOnFault(old)
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("fault reading the mapped file (truncated?): %v", r)
			}
		}()
	}
	return hashChunk(src, sums, off, n, buf, seed, zero)
}

// fifoDir is pmemsave's private folder and FIFO.
type fifoDir struct {
	dir, path string
	f         *os.File // opened read-write: opening never blocks, and QEMU's close is no EOF
	closeOnce sync.Once
}

// newFIFODir makes a 0700 folder with a FIFO that QEMU (process pid) can open for writing: when
// QEMU runs as another user, this process must be root and gives both to QEMU's user.
func newFIFODir(tmp string, pid int) (*fifoDir, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d", pid), &st); err != nil {
		return nil, err
	}
	me := os.Geteuid()
	if int(st.Uid) != me && me != 0 {
		return nil, fmt.Errorf("QEMU runs as uid %d and this process as uid %d: QEMU could not open a FIFO in this process's private folder", st.Uid, me)
	}
	dir, err := os.MkdirTemp(tmp, "guestram-")
	if err != nil {
		return nil, err
	}
	d := &fifoDir{dir: dir, path: filepath.Join(dir, "ram.fifo")}
	if err := unix.Mkfifo(d.path, 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("mkfifo: %w", err)
	}
	if int(st.Uid) != me {
		for _, p := range []string{dir, d.path} {
			if err := os.Lchown(p, int(st.Uid), int(st.Gid)); err != nil {
				os.RemoveAll(dir)
				return nil, err
			}
		}
	}
	// O_NONBLOCK puts the descriptor in Go's poller, which is what makes read deadlines work.
	if d.f, err = os.OpenFile(d.path, os.O_RDWR|syscall.O_NONBLOCK, 0); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := d.f.SetReadDeadline(time.Time{}); err != nil {
		d.close()
		return nil, fmt.Errorf("the FIFO takes no read deadline: %w", err)
	}
	// A 1 MiB pipe instead of 64 KiB: QEMU writes 4 KiB at a time, this lets it run ahead.
	unix.FcntlInt(d.f.Fd(), unix.F_SETPIPE_SZ, 1<<20)
	return d, nil
}

func (d *fifoDir) close() {
	d.closeOnce.Do(func() {
		d.f.Close()
		os.RemoveAll(d.dir)
	})
}

// readFull reads len(p) bytes, each read bounded by timeout.
func (d *fifoDir) readFull(p []byte, timeout time.Duration) error {
	for got := 0; got < len(p); {
		if err := d.f.SetReadDeadline(time.Now().Add(timeout)); err != nil {
			return err
		}
		n, err := d.f.Read(p[got:])
		got += n
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return fmt.Errorf("no data from pmemsave for %v (%d of %d bytes of this chunk)", timeout, got, len(p))
			}
			return err
		}
	}
	return nil
}

// pmemsave hashes block b from the guest-physical ranges that show it, each written by QEMU's
// pmemsave into the FIFO. Pages no range shows (or shows only in part) are left Unread.
func (h *hasher) pmemsave(ctx context.Context, b *Block, bh *BlockHashes) error {
	pages := b.Pages()
	bh.Pages = make([]Sum, pages)
	read := make([]bool, pages)
	ranges := append([]GPARange(nil), b.GPA...)
	sort.Slice(ranges, func(i, j int) bool { return ranges[i].Offset < ranges[j].Offset })
	total := int64(0)
	for _, r := range ranges {
		if r.Offset%PageSize != 0 || r.Size%PageSize != 0 {
			continue // not whole pages: left unread
		}
		first, n := int64(r.Offset/PageSize), int64(r.Size/PageSize)
		if first >= pages {
			continue // the part above used_length of a resizeable block
		}
		n = min(n, pages-first)
		if read[first] {
			continue // the same bytes seen at a second address (an alias)
		}
		if err := h.pmemsaveRange(ctx, b, bh, r.GPA, first, n, total == 0); err != nil {
			return err
		}
		for p := first; p < first+n; p++ {
			read[p] = true
		}
		total += n
	}
	if total == 0 {
		return &methodError{errors.New("no whole page of the block is in guest physical space")}
	}
	bh.Unread = rangesOf(read, false)
	if len(bh.Unread) > 0 {
		bh.Note = fmt.Sprintf("pmemsave read what the guest sees of it: %d of %d pages not read", pages-total, pages)
	}
	return nil
}

// pmemsaveRange streams n pages from guest address gpa (block page first onwards) through the FIFO
// to the hashing workers.
func (h *hasher) pmemsaveRange(ctx context.Context, b *Block, bh *BlockHashes, gpa uint64, first, n int64, firstCall bool) error {
	size := n * PageSize
	chunk := int64(h.opt.ChunkSize)
	type job struct {
		page int64
		buf  []byte
	}
	pool := make(chan []byte, h.opt.Workers+1)
	for i := 0; i < h.opt.Workers+1; i++ {
		pool <- make([]byte, chunk)
	}
	jobs := make(chan job, h.opt.Workers)
	var wg sync.WaitGroup
	for w := 0; w < h.opt.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				for p := 0; p < len(j.buf); p += PageSize {
					bh.Pages[j.page+int64(p/PageSize)] = HashPage(j.buf[p:p+PageSize], h.opt.Seed)
				}
				pool <- j.buf[:cap(j.buf)]
			}
		}()
	}
	// QEMU runs pmemsave in its main loop until the whole range is written: give the command
	// as long as the reader keeps receiving data, with the caller's ctx as the outer bound.
	qctx, qcancel := context.WithCancel(ctx)
	defer qcancel()
	qerr := make(chan error, 1)
	go func() { qerr <- h.c.PMemSave(qctx, int64(gpa), size, h.fifo.path) }()
	readErr := make(chan error, 1)
	received := int64(0)
	go func() {
		defer close(jobs)
		for got := int64(0); got < size; {
			var buf []byte
			select {
			case buf = <-pool:
			case <-ctx.Done():
				readErr <- ctx.Err()
				return
			}
			m := min(chunk, size-got)
			if err := h.fifo.readFull(buf[:m], h.opt.ReadTimeout); err != nil {
				readErr <- err
				return
			}
			jobs <- job{page: first + got/PageSize, buf: buf[:m]}
			if testHookChunk != nil {
				testHookChunk(MethodPMemSave, first*PageSize+got)
			}
			got += m
			received = got
		}
		readErr <- nil
	}()
	var rerr, cerr error
	rdone, cdone := false, false
	for !rdone || !cdone {
		select {
		case rerr = <-readErr:
			rdone = true
			if rerr != nil && !cdone {
				// Nothing more will be read: close the FIFO so that QEMU's write fails (EPIPE)
				// and pmemsave returns, then wait a bounded time for its reply.
				h.fifo.close()
				select {
				case cerr = <-qerr:
				case <-time.After(h.opt.ReadTimeout):
					qcancel()
					cerr = <-qerr
				}
				cdone = true
			}
		case cerr = <-qerr:
			cdone = true
			if cerr != nil && !rdone {
				h.fifo.f.SetReadDeadline(time.Now()) // stop the reader now
				rerr = <-readErr
				rdone = true
			}
		}
	}
	wg.Wait()
	if cerr != nil {
		var ce *qmp.CommandError
		if errors.As(cerr, &ce) && firstCall && received == 0 {
			h.fifo.close()
			h.fifoErr = cerr // the FIFO may hold a partial write: never use it again
			return &methodError{cerr}
		}
		if aerr := h.l.alive(); aerr != nil {
			return fmt.Errorf("%w during pmemsave of block %s (%v)", aerr, b.Name, cerr)
		}
		return fmt.Errorf("guestram: block %s: pmemsave of 0x%x+0x%x: %w", b.Name, gpa, size, cerr)
	}
	if rerr != nil {
		if aerr := h.l.alive(); aerr != nil {
			return fmt.Errorf("%w during pmemsave of block %s (%v)", aerr, b.Name, rerr)
		}
		return fmt.Errorf("guestram: block %s: reading pmemsave of 0x%x+0x%x from the FIFO: %w", b.Name, gpa, size, rerr)
	}
	return nil
}

// rangesOf returns the runs of pages whose flag equals want, as page ranges.
func rangesOf(flags []bool, want bool) []PageRange {
	var out []PageRange
	for i := 0; i < len(flags); i++ {
		if flags[i] != want {
			continue
		}
		j := i
		for j < len(flags) && flags[j] == want {
			j++
		}
		out = append(out, PageRange{First: int64(i), End: int64(j)})
		i = j
	}
	return out
}
