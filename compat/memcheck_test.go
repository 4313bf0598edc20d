package compat

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// memcheckTestDirty builds a synthetic dirty-guest dump of size bytes whose
// page bytes hold v+1 below boundary and v from it on.
func memcheckTestDirty(size int64, v byte, boundary int64) []byte {
	mem := make([]byte, size)
	for a := int64(DirtyStart); a < DirtyEnd; a += GuestPageSize {
		if boundary >= 0 && a < boundary {
			mem[a] = v + 1
		} else {
			mem[a] = v
		}
	}
	return mem
}

func TestCheckDirty(t *testing.T) {
	const size = 128 << 20
	mid := int64(50<<20 + 7*GuestPageSize)

	rep, err := CheckDirty(bytes.NewReader(memcheckTestDirty(size, 9, mid)), size)
	if err != nil {
		t.Fatal(err)
	}
	if rep.First != 10 || rep.Boundary != mid || rep.Pages != (DirtyEnd-DirtyStart)/GuestPageSize {
		t.Errorf("report %+v, want first 10, boundary %#x, %d pages", rep, mid, (DirtyEnd-DirtyStart)/GuestPageSize)
	}

	// All equal, and the value wrapping from 0 to 255 at the boundary.
	if rep, err := CheckDirty(bytes.NewReader(memcheckTestDirty(size, 3, -1)), size); err != nil || rep.Boundary != -1 || rep.First != 3 {
		t.Errorf("all-equal dump: %+v, %v", rep, err)
	}
	if rep, err := CheckDirty(bytes.NewReader(memcheckTestDirty(size, 255, mid)), size); err != nil || rep.First != 0 || rep.Boundary != mid {
		t.Errorf("wrapping dump: %+v, %v", rep, err)
	}
	// Boundary at the last page.
	last := int64(DirtyEnd - GuestPageSize)
	if rep, err := CheckDirty(bytes.NewReader(memcheckTestDirty(size, 1, last)), size); err != nil || rep.Boundary != last {
		t.Errorf("boundary at the last page: %+v, %v", rep, err)
	}
	// Bytes other than byte 0 of a page are not looked at.
	mem := memcheckTestDirty(size, 9, mid)
	mem[DirtyStart+1] = 0xee
	if _, err := CheckDirty(bytes.NewReader(mem), size); err != nil {
		t.Errorf("byte 1 of a page changed: %v", err)
	}

	bad := []struct {
		name string
		mut  func(mem []byte)
		want string
	}{
		{"wrong value", func(mem []byte) { mem[60<<20] = 42 }, "page 0x3c00000 holds 42"},
		{"wrong value before the boundary", func(mem []byte) { mem[2<<20] = 12 }, "page 0x200000 holds 12"},
		{"two boundaries (back up)", func(mem []byte) { mem[70<<20] = 10 }, "page 0x4600000 holds 10: a second boundary"},
		{"two boundaries (second drop)", func(mem []byte) {
			for a := 80 << 20; a < DirtyEnd; a += GuestPageSize {
				mem[a] = 8
			}
		}, "page 0x5000000 holds 8: a second boundary"},
		{"rise instead of drop", func(mem []byte) {
			for a := int64(DirtyStart); a < mid; a += GuestPageSize {
				mem[a] = 9
			}
			for a := mid; a < DirtyEnd; a += GuestPageSize {
				mem[a] = 10
			}
		}, "holds 10, expected 9 or 8"},
	}
	for _, b := range bad {
		mem := memcheckTestDirty(size, 9, mid)
		b.mut(mem)
		_, err := CheckDirty(bytes.NewReader(mem), size)
		if err == nil || !strings.Contains(err.Error(), b.want) {
			t.Errorf("%s: error %v, want one containing %q", b.name, err, b.want)
		}
	}
	// A dump too short.
	if _, err := CheckDirty(bytes.NewReader(make([]byte, 64<<20)), 64<<20); err == nil {
		t.Error("64 MiB dump accepted")
	}
	if _, err := CheckDirty(bytes.NewReader(make([]byte, 64<<20)), size); err == nil {
		t.Error("reader shorter than size accepted")
	}
}

func TestCompareMemory(t *testing.T) {
	const size = 8<<20 + 100 // a partial last page too
	a := make([]byte, size)
	for i := range a {
		a[i] = byte(i * 7)
	}
	b := bytes.Clone(a)
	d, err := CompareMemory(bytes.NewReader(a), bytes.NewReader(b), size, nil)
	if err != nil || d.Differing != 0 || d.Pages != 8<<8+1 {
		t.Fatalf("equal dumps: %+v, %v", d, err)
	}

	b[5<<20+17]++
	b[size-1]++
	d, err = CompareMemory(bytes.NewReader(a), bytes.NewReader(b), size, nil)
	if err == nil {
		t.Fatal("differing dumps compare equal")
	}
	if d.Differing != 2 || len(d.Offsets) != 2 || d.Offsets[0] != 5<<20 || d.Offsets[1] != 8<<20 {
		t.Errorf("diff %+v, want pages 0x500000 and 0x800000", d)
	}
	if !strings.Contains(err.Error(), "0x500000") {
		t.Errorf("error %q does not name the first differing page", err)
	}

	// Excluding the changed bytes makes them equal; excluding a range that
	// covers only part of the difference does not.
	ex := []Range{{Start: 5<<20 + 16, End: 5<<20 + 24}, {Start: size - 1, End: size}}
	if d, err := CompareMemory(bytes.NewReader(a), bytes.NewReader(b), size, ex); err != nil || d.Differing != 0 {
		t.Errorf("with exclusions: %+v, %v", d, err)
	}
	b[5<<20+30]++
	if d, err := CompareMemory(bytes.NewReader(a), bytes.NewReader(b), size, ex); err == nil || d.Differing != 1 {
		t.Errorf("difference next to an exclusion: %+v, %v", d, err)
	}

	// Many differing pages: only the first few offsets are kept.
	c := bytes.Clone(a)
	for p := 0; p < 100; p++ {
		c[p*GuestPageSize]++
	}
	d, err = CompareMemory(bytes.NewReader(a), bytes.NewReader(c), size, nil)
	if err == nil || d.Differing != 100 || len(d.Offsets) != memcheckMaxOffsets {
		t.Errorf("100 differing pages: %+v, %v", d, err)
	}

	// Dumps on disk, and one too short.
	dir := t.TempDir()
	pa, pb := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	os.WriteFile(pa, a, 0o644)
	os.WriteFile(pb, a[:size-4096], 0o644)
	fa, _ := os.Open(pa)
	defer fa.Close()
	fb, _ := os.Open(pb)
	defer fb.Close()
	if _, err := CompareMemory(fa, fa, size, nil); err != nil {
		t.Errorf("file against itself: %v", err)
	}
	if _, err := CompareMemory(fa, fb, size, nil); err == nil {
		t.Error("a truncated dump compared equal")
	}
}

// memcheckTestFill builds the memory a fill guest with opt leaves: FillPage
// for every page of the range, counters advanced by passes on touched pages.
func memcheckTestFill(opt FillOptions, size int64, passes uint32) []byte {
	mem := make([]byte, size)
	first, end := opt.fillPages()
	for i := first; i < end; i++ {
		page := mem[i*GuestPageSize : (i+1)*GuestPageSize]
		FillPage(i, opt.Seed, page)
		if opt.FillTouched(i) {
			binary.LittleEndian.PutUint32(page, binary.LittleEndian.Uint32(page)+passes)
		}
	}
	return mem
}

func TestCheckFill(t *testing.T) {
	const size = 16 << 20
	opt := FillOptions{MemBytes: size, DirtyEvery: 16, Seed: 99}
	mem := memcheckTestFill(opt, size, 5)
	rep, err := CheckFill(bytes.NewReader(mem), size, opt)
	if err != nil {
		t.Fatal(err)
	}
	pages := (size - FillStart) / GuestPageSize
	if n := rep.Pages[0] + rep.Pages[1] + rep.Pages[2]; n != pages || rep.Touched != pages/16 || rep.Bad != 0 {
		t.Errorf("report %+v, want %d pages, %d touched", rep, pages, pages/16)
	}
	for k, n := range rep.Pages {
		if n < pages/8 {
			t.Errorf("only %d %s pages", n, FillKind(k))
		}
	}

	// Memory below FillStart and above the fill range is not checked.
	mem[100] = 1
	if _, err := CheckFill(bytes.NewReader(mem), size, opt); err != nil {
		t.Errorf("byte below 1 MiB changed: %v", err)
	}

	// The bad cases: a counter on an untouched page, a changed byte after
	// the counter of a touched page, a non-zero byte in a zero page.
	first, _ := opt.fillPages()
	var zero, text int
	for i := first + 1; zero == 0 || text == 0; i++ {
		switch FillPageKind(i, opt.Seed) {
		case FillZero:
			if !opt.FillTouched(i) && zero == 0 {
				zero = i
			}
		case FillText:
			if !opt.FillTouched(i) && text == 0 {
				text = i
			}
		}
	}
	bad := []struct {
		name string
		off  int
		want string
	}{
		{"counter on an untouched page", text * GuestPageSize, "(text, index"},
		{"byte 4 of a touched page", first*GuestPageSize + 4, "byte 4"},
		{"zero page not zero", zero*GuestPageSize + 4000, "byte 4000 is 0x01, want 0x00"},
		{"last byte of the range", size - 1, "byte 4095"},
	}
	for _, b := range bad {
		m := bytes.Clone(mem)
		m[b.off]++
		rep, err := CheckFill(bytes.NewReader(m), size, opt)
		if err == nil || !strings.Contains(err.Error(), b.want) || rep.Bad != 1 || rep.BadOffsets[0] != int64(b.off&^(GuestPageSize-1)) {
			t.Errorf("%s: %+v, error %v, want one containing %q", b.name, rep, err, b.want)
		}
	}

	// A different seed does not match.
	other := opt
	other.Seed++
	if _, err := CheckFill(bytes.NewReader(mem), size, other); err == nil {
		t.Error("dump matched the model of another seed")
	}
	// With DirtyEvery 0 the advanced counters are errors.
	none := opt
	none.DirtyEvery = 0
	if rep, err := CheckFill(bytes.NewReader(mem), size, none); err == nil || rep.Bad == 0 {
		t.Error("advanced counters accepted with DirtyEvery 0")
	}
	// A dump shorter than the range.
	if _, err := CheckFill(bytes.NewReader(mem[:size/2]), size/2, opt); err == nil {
		t.Error("half a dump accepted")
	}
}
