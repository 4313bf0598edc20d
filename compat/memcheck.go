package compat

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// This file verifies guest memory dumps (raw guest-physical memory from
// address 0, as written by QMP pmemsave or dump-guest-memory's raw form)
// taken from the test guests in guest.go. Dumps are read through
// io.ReaderAt a bounded chunk at a time, so a 1 GiB dump on disk (*os.File)
// is checked without holding it in memory; bytes.Reader works for
// in-memory dumps.

// memcheckChunk is how many bytes are read per ReadAt: a multiple of the page size.
const memcheckChunk = 256 * GuestPageSize

// memcheckMaxOffsets is how many differing/bad offsets reports keep.
const memcheckMaxOffsets = 8

// memcheckRead fills buf from mem at off, failing on a short read.
func memcheckRead(mem io.ReaderAt, buf []byte, off int64) error {
	n, err := mem.ReadAt(buf, off)
	if n == len(buf) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("reading dump at %#x: %w", off, err)
}

// DirtyReport summarises a dump of the dirty guest (GuestDirty).
type DirtyReport struct {
	// First is byte 0 of the first page (DirtyStart).
	First byte
	// Boundary is the address of the first page holding First-1, where the
	// guest's pass stopped when the snapshot was taken; -1 if all pages
	// hold First.
	Boundary int64
	// Pages is the number of pages checked.
	Pages int
}

// CheckDirty verifies a memory dump of the dirty guest as QEMU's own
// migration test does: byte 0 of the pages in [DirtyStart, DirtyEnd) must
// all be v+1 up to one boundary and v after it (mod 256), because the guest
// increments pages in address order and the snapshot froze it mid-pass;
// all-equal is also accepted. The error names the first page that breaks
// this (a value other than v or v+1, or a second boundary) and its value.
// size is the dump's length, which must cover DirtyEnd.
func CheckDirty(mem io.ReaderAt, size int64) (DirtyReport, error) {
	rep := DirtyReport{Boundary: -1}
	if size < DirtyEnd {
		return rep, fmt.Errorf("dirty check: dump is %d bytes, must cover [%#x, %#x)", size, DirtyStart, DirtyEnd)
	}
	var b [1]byte
	var last byte
	for addr := int64(DirtyStart); addr < DirtyEnd; addr += GuestPageSize {
		if err := memcheckRead(mem, b[:], addr); err != nil {
			return rep, fmt.Errorf("dirty check: %w", err)
		}
		v := b[0]
		if addr == DirtyStart {
			rep.First, last = v, v
		}
		switch {
		case v == last:
		case v == last-1 && rep.Boundary < 0:
			rep.Boundary = addr
		case rep.Boundary >= 0 && (v == last-1 || v == rep.First):
			return rep, fmt.Errorf("dirty check: page %#x holds %d: a second boundary (first page %d, dropped to %d at %#x)",
				addr, v, rep.First, last, rep.Boundary)
		default:
			return rep, fmt.Errorf("dirty check: page %#x holds %d, expected %d or %d (first page holds %d)",
				addr, v, last, last-1, rep.First)
		}
		last = v
		rep.Pages++
	}
	return rep, nil
}

// Range is a half-open range [Start, End) of guest-physical addresses.
type Range struct {
	Start, End int64
}

// MemDiff is the result of CompareMemory.
type MemDiff struct {
	// Pages is the number of pages compared (partly excluded ones included).
	Pages int
	// Differing is the number of pages with a difference outside the
	// excluded ranges.
	Differing int
	// Offsets holds the addresses of the first few differing pages.
	Offsets []int64
}

// CompareMemory compares two memory dumps of the same guest page by page,
// typically the source paused in postmigrate against the destination after
// migration, ignoring bytes inside exclude (e.g. a kvmclock structure that
// KVM rewrites). Both readers must hold at least size bytes. It returns an
// error if any page differs.
func CompareMemory(a, b io.ReaderAt, size int64, exclude []Range) (MemDiff, error) {
	var d MemDiff
	bufA := make([]byte, memcheckChunk)
	bufB := make([]byte, memcheckChunk)
	for off := int64(0); off < size; off += memcheckChunk {
		n := int(min(memcheckChunk, size-off))
		ca, cb := bufA[:n], bufB[:n]
		if err := memcheckRead(a, ca, off); err != nil {
			return d, fmt.Errorf("compare memory: first dump: %w", err)
		}
		if err := memcheckRead(b, cb, off); err != nil {
			return d, fmt.Errorf("compare memory: second dump: %w", err)
		}
		for p := 0; p < n; p += GuestPageSize {
			e := min(p+GuestPageSize, n)
			d.Pages++
			if bytes.Equal(ca[p:e], cb[p:e]) {
				continue
			}
			if memcheckExcludedEqual(ca[p:e], cb[p:e], off+int64(p), exclude) {
				continue
			}
			d.Differing++
			if len(d.Offsets) < memcheckMaxOffsets {
				d.Offsets = append(d.Offsets, off+int64(p))
			}
		}
	}
	if d.Differing > 0 {
		return d, fmt.Errorf("compare memory: %d of %d pages differ, first at %#x", d.Differing, d.Pages, d.Offsets)
	}
	return d, nil
}

// memcheckExcludedEqual reports whether pa and pb (the page at base) differ
// only inside excluded ranges.
func memcheckExcludedEqual(pa, pb []byte, base int64, exclude []Range) bool {
	for i := range pa {
		if pa[i] == pb[i] {
			continue
		}
		addr := base + int64(i)
		excluded := false
		for _, r := range exclude {
			if addr >= r.Start && addr < r.End {
				excluded = true
				break
			}
		}
		if !excluded {
			return false
		}
	}
	return true
}

// FillReport summarises a dump of the fill guest (GuestFill).
type FillReport struct {
	// Pages counts the pages checked by kind (indexed by FillKind).
	Pages [3]int
	// Touched is the number of pages the phase-2 loop dirties.
	Touched int
	// Bad is the number of pages that do not match; BadOffsets holds the
	// addresses of the first few.
	Bad        int
	BadOffsets []int64
}

// CheckFill verifies a memory dump of the fill guest built with opt, taken
// after it printed 'F': every page of [FillStart, opt.FillEnd()) must equal
// FillPage exactly, except that pages the phase-2 loop increments
// (opt.FillTouched) may hold any value in their first 32-bit word. size is
// the dump's length, which must cover the fill range. The error names the
// first bad page.
func CheckFill(mem io.ReaderAt, size int64, opt FillOptions) (FillReport, error) {
	var rep FillReport
	end := int64(opt.FillEnd())
	if size < end {
		return rep, fmt.Errorf("fill check: dump is %d bytes, must cover [%#x, %#x)", size, FillStart, end)
	}
	buf := make([]byte, memcheckChunk)
	want := make([]byte, GuestPageSize)
	var firstErr error
	for off := int64(FillStart); off < end; off += memcheckChunk {
		n := int(min(memcheckChunk, end-off))
		chunk := buf[:n]
		if err := memcheckRead(mem, chunk, off); err != nil {
			return rep, fmt.Errorf("fill check: %w", err)
		}
		for p := 0; p+GuestPageSize <= n; p += GuestPageSize {
			addr := off + int64(p)
			i := int(addr / GuestPageSize)
			kind := FillPageKind(i, opt.Seed)
			rep.Pages[kind]++
			FillPage(i, opt.Seed, want)
			got := chunk[p : p+GuestPageSize]
			from := 0
			if opt.FillTouched(i) {
				rep.Touched++
				from = 4
			}
			if bytes.Equal(got[from:], want[from:]) {
				continue
			}
			rep.Bad++
			if len(rep.BadOffsets) < memcheckMaxOffsets {
				rep.BadOffsets = append(rep.BadOffsets, addr)
			}
			if firstErr == nil {
				j := from
				for got[j] == want[j] {
					j++
				}
				firstErr = fmt.Errorf("fill check: page %#x (%s, index %d): byte %d is %#02x, want %#02x (word %#08x, want %#08x)",
					addr, kind, i, j, got[j], want[j],
					binary.LittleEndian.Uint32(got[j&^3:]), binary.LittleEndian.Uint32(want[j&^3:]))
			}
		}
	}
	if firstErr != nil {
		return rep, fmt.Errorf("%w; %d bad pages in all", firstErr, rep.Bad)
	}
	return rep, nil
}
