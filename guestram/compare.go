package guestram

import (
	"fmt"
	"strings"
)

// PageRange is the half-open range [First, End) of page indices of a block (page i holds the
// block's bytes [i×PageSize, (i+1)×PageSize)).
type PageRange struct{ First, End int64 }

// Pages returns the number of pages in r.
func (r PageRange) Pages() int64 { return r.End - r.First }

func (r PageRange) String() string {
	if r.Pages() == 1 {
		return fmt.Sprintf("page %d (offset 0x%x)", r.First, r.First*PageSize)
	}
	return fmt.Sprintf("pages %d-%d (offsets 0x%x-0x%x)", r.First, r.End-1, r.First*PageSize, r.End*PageSize)
}

// Exclusion is a page that may differ for a known reason (a hypervisor rewrites it when the
// destination loads, see KVMWrittenPages): it is compared, and reported, but never counts as a
// difference.
type Exclusion struct {
	Block  string
	Page   int64
	Reason string
}

// Diff is the result of comparing a source's hash list with a destination's.
type Diff struct {
	Blocks       []BlockDiff    // the blocks both sides have with the same size, in source order
	OnlySource   []string       // blocks the destination does not have
	OnlyDest     []string       // blocks the source does not have
	SizeMismatch []SizeMismatch // blocks whose used length differs
	SeedMismatch bool           // the lists were hashed with different seeds: nothing compares
	Differing    int64          // pages that differ, outside exclusions, in all blocks
	Unverified   int64          // pages not read on one side or both
	Compared     int64          // pages compared
}

// SizeMismatch is a block whose used length differs between the sides.
type SizeMismatch struct {
	Name         string
	Source, Dest int64 // used lengths in bytes
}

// BlockDiff is one block's comparison.
type BlockDiff struct {
	Name                     string
	Pages                    int64       // pages in the block
	SourceMethod, DestMethod Method      // how each side read it ("" = not read)
	Differ                   []PageRange // pages whose hashes differ (merged ranges)
	DifferPages              int64
	Unverified               []PageRange // pages one side did not read
	UnverifiedPages          int64
	Excluded                 []ExcludedPage // the exclusions that apply to this block
	SourceNote, DestNote     string         // why a side did not read (all or part of) the block
}

// ExcludedPage is an exclusion with whether the page did differ.
type ExcludedPage struct {
	Exclusion
	Differed bool
}

// Equal reports whether the destination holds exactly the source's RAM: the same blocks with the
// same sizes, every page read on both sides, and no page different outside the exclusions.
func (d *Diff) Equal() bool {
	return !d.SeedMismatch && len(d.OnlySource) == 0 && len(d.OnlyDest) == 0 && len(d.SizeMismatch) == 0 &&
		d.Differing == 0 && d.Unverified == 0
}

// String summarises the comparison in one line per problem.
func (d *Diff) String() string {
	var b strings.Builder
	if d.SeedMismatch {
		b.WriteString("the hash lists use different seeds: nothing can be compared\n")
	}
	for _, n := range d.OnlySource {
		fmt.Fprintf(&b, "block %s: only on the source\n", n)
	}
	for _, n := range d.OnlyDest {
		fmt.Fprintf(&b, "block %s: only on the destination\n", n)
	}
	for _, m := range d.SizeMismatch {
		fmt.Fprintf(&b, "block %s: %d bytes on the source, %d on the destination\n", m.Name, m.Source, m.Dest)
	}
	for _, bd := range d.Blocks {
		if bd.DifferPages > 0 {
			fmt.Fprintf(&b, "block %s: %d of %d pages differ: %s\n", bd.Name, bd.DifferPages, bd.Pages, rangesString(bd.Differ, 8))
		}
		if bd.UnverifiedPages > 0 {
			fmt.Fprintf(&b, "block %s: %d of %d pages not verified: %s\n", bd.Name, bd.UnverifiedPages, bd.Pages, rangesString(bd.Unverified, 4))
		}
		for _, e := range bd.Excluded {
			state := "equal"
			if e.Differed {
				state = "differs"
			}
			fmt.Fprintf(&b, "block %s: page %d (offset 0x%x) excluded (%s): %s\n", bd.Name, e.Page, e.Page*PageSize, e.Reason, state)
		}
	}
	if b.Len() == 0 {
		fmt.Fprintf(&b, "all %d pages of %d blocks are equal\n", d.Compared, len(d.Blocks))
	}
	return strings.TrimSuffix(b.String(), "\n")
}

func rangesString(rs []PageRange, maxN int) string {
	var parts []string
	for i, r := range rs {
		if i == maxN {
			parts = append(parts, fmt.Sprintf("… %d more ranges", len(rs)-maxN))
			break
		}
		parts = append(parts, r.String())
	}
	return strings.Join(parts, ", ")
}

// Compare compares a source's hash list with a destination's, page by page.
func Compare(src, dst *List, exclude []Exclusion) *Diff {
	d := &Diff{}
	if src.Seed != dst.Seed {
		d.SeedMismatch = true
	}
	for _, sb := range src.Blocks {
		db := dst.Block(sb.Name)
		if db == nil {
			d.OnlySource = append(d.OnlySource, sb.Name)
			continue
		}
		if sb.Used != db.Used {
			d.SizeMismatch = append(d.SizeMismatch, SizeMismatch{Name: sb.Name, Source: sb.Used, Dest: db.Used})
			continue
		}
		bd := compareBlock(&sb, db, exclude)
		d.Differing += bd.DifferPages
		d.Unverified += bd.UnverifiedPages
		d.Compared += bd.Pages - bd.UnverifiedPages
		d.Blocks = append(d.Blocks, bd)
	}
	for _, db := range dst.Blocks {
		if src.Block(db.Name) == nil {
			d.OnlyDest = append(d.OnlyDest, db.Name)
		}
	}
	return d
}

func compareBlock(sb, db *BlockHashes, exclude []Exclusion) BlockDiff {
	pages := (sb.Used + PageSize - 1) / PageSize
	bd := BlockDiff{Name: sb.Name, Pages: pages, SourceMethod: sb.Method, DestMethod: db.Method,
		SourceNote: sb.Note, DestNote: db.Note}
	excl := map[int64]int{}
	for i, e := range exclude {
		if e.Block == sb.Name && e.Page >= 0 && e.Page < pages {
			if _, dup := excl[e.Page]; !dup {
				excl[e.Page] = len(bd.Excluded)
				bd.Excluded = append(bd.Excluded, ExcludedPage{Exclusion: exclude[i]})
			}
		}
	}
	sRead := readable(sb, pages)
	dRead := readable(db, pages)
	const (
		same = iota
		differ
		unverified
	)
	state := func(p int64) int {
		if !sRead(p) || !dRead(p) {
			return unverified
		}
		if sb.Pages[p] == db.Pages[p] {
			return same
		}
		if i, ok := excl[p]; ok {
			bd.Excluded[i].Differed = true
			return same
		}
		return differ
	}
	var cur *[]PageRange
	for p := int64(0); p < pages; p++ {
		switch state(p) {
		case differ:
			cur = &bd.Differ
			bd.DifferPages++
		case unverified:
			cur = &bd.Unverified
			bd.UnverifiedPages++
		default:
			continue
		}
		if n := len(*cur); n > 0 && (*cur)[n-1].End == p {
			(*cur)[n-1].End = p + 1
		} else {
			*cur = append(*cur, PageRange{First: p, End: p + 1})
		}
	}
	return bd
}

// readable returns whether page p of b was read, in constant time per page (a decoded list may
// carry many unread ranges).
func readable(b *BlockHashes, pages int64) func(int64) bool {
	if b.Method == "" || int64(len(b.Pages)) != pages {
		return func(int64) bool { return false }
	}
	if len(b.Unread) == 0 {
		return func(int64) bool { return true }
	}
	unread := make([]bool, pages)
	for _, r := range b.Unread {
		for p := max(r.First, 0); p < min(r.End, pages); p++ {
			unread[p] = true
		}
	}
	return func(p int64) bool { return !unread[p] }
}
