package guestram

import (
	"encoding/binary"
	"fmt"

	"github.com/zeebo/xxh3"
)

// The serialised form of a List, for sending it between two sidecars. All integers are unsigned
// varints (encoding/binary's uvarint) unless said otherwise:
//
//	magic     "QMGHASH1" (8 bytes; the 1 is the format version)
//	seed      8 bytes, big endian
//	blocks    count, then per block:
//	  name    length (1..MaxNameLen), bytes
//	  used    the used length in bytes
//	  method  1 byte: 0 not read, 1 file, 2 process_vm_readv, 3 proc-mem, 4 pmemsave
//	  note    length (0..MaxNoteLen), bytes
//	  runs    only when read, covering exactly ceil(used/4096) pages: a token kind|count<<2,
//	          count ≥ 1; kind 0: count hashes follow (16 bytes each: Hi then Lo, big endian),
//	          kind 1: count pages with the zero page's hash, kind 2: count pages not read
//	checksum  8 bytes, big endian: xxh3-64 of everything before it
//
// Runs of zero pages and of unread pages cost a few bytes, so an idle guest's list is small; a
// guest of distinct pages costs 16 bytes a page (4 MiB per GiB).
const listMagic = "QMGHASH1"

// Limits cap what Decode accepts (and allocates); the zero value means the defaults.
type Limits struct {
	MaxBlocks int   // default 4096
	MaxPages  int64 // pages over all blocks; default 1<<26 (a 256 GiB guest: 1 GiB of hashes)
}

// Format limits.
const (
	MaxNameLen = 256 // QEMU's RAMBlock idstr is char[256]
	MaxNoteLen = 4096
)

const (
	runHashes = 0
	runZero   = 1
	runUnread = 2
)

var methodCodes = []Method{"", MethodFile, MethodProcessVM, MethodProcMem, MethodPMemSave}

func methodCode(m Method) (byte, error) {
	for i, x := range methodCodes {
		if x == m {
			return byte(i), nil
		}
	}
	return 0, fmt.Errorf("guestram: method %q has no code", m)
}

// MarshalBinary encodes the list (format above).
func (l *List) MarshalBinary() ([]byte, error) {
	zero := ZeroSum(l.Seed)
	b := append([]byte(nil), listMagic...)
	b = binary.BigEndian.AppendUint64(b, l.Seed)
	b = binary.AppendUvarint(b, uint64(len(l.Blocks)))
	for i := range l.Blocks {
		bh := &l.Blocks[i]
		if len(bh.Name) == 0 || len(bh.Name) > MaxNameLen {
			return nil, fmt.Errorf("guestram: block name %q: length must be 1..%d", bh.Name, MaxNameLen)
		}
		if bh.Used < 0 {
			return nil, fmt.Errorf("guestram: block %s: negative length", bh.Name)
		}
		code, err := methodCode(bh.Method)
		if err != nil {
			return nil, err
		}
		note := bh.Note
		if len(note) > MaxNoteLen {
			note = note[:MaxNoteLen]
		}
		b = binary.AppendUvarint(b, uint64(len(bh.Name)))
		b = append(b, bh.Name...)
		b = binary.AppendUvarint(b, uint64(bh.Used))
		b = append(b, code)
		b = binary.AppendUvarint(b, uint64(len(note)))
		b = append(b, note...)
		if code == 0 {
			continue
		}
		pages := (bh.Used + PageSize - 1) / PageSize
		if int64(len(bh.Pages)) != pages {
			return nil, fmt.Errorf("guestram: block %s: %d hashes for %d pages", bh.Name, len(bh.Pages), pages)
		}
		unread := make([]bool, pages)
		for _, r := range bh.Unread {
			for p := max(r.First, 0); p < min(r.End, pages); p++ {
				unread[p] = true
			}
		}
		kind := func(p int64) int {
			switch {
			case unread[p]:
				return runUnread
			case bh.Pages[p] == zero:
				return runZero
			}
			return runHashes
		}
		for p := int64(0); p < pages; {
			k := kind(p)
			e := p + 1
			for e < pages && kind(e) == k {
				e++
			}
			b = binary.AppendUvarint(b, uint64(k)|uint64(e-p)<<2)
			if k == runHashes {
				for q := p; q < e; q++ {
					b = binary.BigEndian.AppendUint64(b, bh.Pages[q].Hi)
					b = binary.BigEndian.AppendUint64(b, bh.Pages[q].Lo)
				}
			}
			p = e
		}
	}
	return binary.BigEndian.AppendUint64(b, xxh3.Hash(b)), nil
}

// DecodeError is a malformed hash list: what was wrong, at which byte offset.
type DecodeError struct {
	Offset int
	Msg    string
}

func (e *DecodeError) Error() string {
	return fmt.Sprintf("guestram: hash list at byte %d: %s", e.Offset, e.Msg)
}

// decoder reads the format with a sticky error: after the first failure every read returns zero.
type decoder struct {
	b   []byte
	off int
	err *DecodeError
}

func (d *decoder) fail(at int, format string, args ...any) {
	if d.err == nil {
		d.err = &DecodeError{Offset: at, Msg: fmt.Sprintf(format, args...)}
	}
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b[d.off:])
	switch {
	case n == 0:
		d.fail(d.off, "%s: truncated", what)
		return 0
	case n < 0:
		d.fail(d.off, "%s: varint overflows 64 bits", what)
		return 0
	}
	d.off += n
	return v
}

func (d *decoder) bytes(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if n > len(d.b)-d.off {
		d.fail(d.off, "%s: %d bytes needed, %d left", what, n, len(d.b)-d.off)
		return nil
	}
	p := d.b[d.off : d.off+n]
	d.off += n
	return p
}

// Decode parses a list made by MarshalBinary, checking every length and count against the input
// and lim before allocating, and the checksum last. Errors are *DecodeError with the offset.
func Decode(b []byte, lim Limits) (*List, error) {
	if lim.MaxBlocks <= 0 {
		lim.MaxBlocks = 4096
	}
	if lim.MaxPages <= 0 {
		lim.MaxPages = 1 << 26
	}
	d := &decoder{b: b}
	if len(b) < len(listMagic)+8+1+8 {
		return nil, &DecodeError{Offset: len(b), Msg: fmt.Sprintf("truncated: %d bytes is shorter than an empty list", len(b))}
	}
	body := b[:len(b)-8]
	d.b = body
	if string(d.bytes(len(listMagic), "magic")) != listMagic {
		return nil, &DecodeError{Offset: 0, Msg: fmt.Sprintf("bad magic %q (want %q)", b[:len(listMagic)], listMagic)}
	}
	l := &List{Seed: binary.BigEndian.Uint64(d.bytes(8, "seed"))}
	zero := ZeroSum(l.Seed)
	at := d.off
	n := d.uvarint("block count")
	if n > uint64(lim.MaxBlocks) {
		d.fail(at, "%d blocks, more than the limit %d", n, lim.MaxBlocks)
	}
	budget := lim.MaxPages
	names := map[string]bool{}
	for i := uint64(0); i < n && d.err == nil; i++ {
		var bh BlockHashes
		at = d.off
		nl := d.uvarint("name length")
		if d.err == nil && (nl == 0 || nl > MaxNameLen) {
			d.fail(at, "block %d: name length %d (must be 1..%d)", i, nl, MaxNameLen)
		}
		bh.Name = string(d.bytes(int(nl), "name"))
		at = d.off
		used := d.uvarint("used length")
		if d.err == nil && (used+PageSize-1)/PageSize > uint64(lim.MaxPages) {
			d.fail(at, "block %s: %d bytes is more than the limit of %d pages", bh.Name, used, lim.MaxPages)
		}
		bh.Used = int64(used)
		at = d.off
		code := d.bytes(1, "method")
		if d.err == nil && int(code[0]) >= len(methodCodes) {
			d.fail(at, "block %s: unknown method code %d", bh.Name, code[0])
		}
		if d.err == nil {
			bh.Method = methodCodes[code[0]]
		}
		at = d.off
		ln := d.uvarint("note length")
		if d.err == nil && ln > MaxNoteLen {
			d.fail(at, "block %s: note length %d (limit %d)", bh.Name, ln, MaxNoteLen)
		}
		bh.Note = string(d.bytes(int(ln), "note"))
		if d.err == nil && names[bh.Name] {
			d.fail(at, "block %s listed twice", bh.Name)
		}
		names[bh.Name] = true
		if d.err != nil || bh.Method == "" {
			l.Blocks = append(l.Blocks, bh)
			continue
		}
		pages := (bh.Used + PageSize - 1) / PageSize
		if pages > budget {
			d.fail(at, "block %s: %d pages, more than the %d left of the limit", bh.Name, pages, budget)
			break
		}
		budget -= pages
		bh.Pages = make([]Sum, pages)
		for p := int64(0); p < pages && d.err == nil; {
			at = d.off
			tok := d.uvarint("run")
			kind, cnt := tok&3, tok>>2
			if d.err != nil {
				break
			}
			if cnt == 0 || cnt > uint64(pages-p) {
				d.fail(at, "block %s: run of %d pages at page %d, %d pages left", bh.Name, cnt, p, pages-p)
				break
			}
			switch kind {
			case runHashes:
				if cnt > uint64(len(d.b)-d.off)/16 {
					d.fail(d.off, "block %s: %d hashes need %d bytes, %d left", bh.Name, cnt, cnt*16, len(d.b)-d.off)
					break
				}
				for q := p; q < p+int64(cnt); q++ {
					h := d.bytes(16, "hash")
					bh.Pages[q] = Sum{Hi: binary.BigEndian.Uint64(h), Lo: binary.BigEndian.Uint64(h[8:])}
				}
			case runZero:
				for q := p; q < p+int64(cnt); q++ {
					bh.Pages[q] = zero
				}
			case runUnread:
				bh.Unread = append(bh.Unread, PageRange{First: p, End: p + int64(cnt)})
			default:
				d.fail(at, "block %s: unknown run kind %d", bh.Name, kind)
			}
			p += int64(cnt)
		}
		l.Blocks = append(l.Blocks, bh)
	}
	if d.err != nil {
		return nil, d.err
	}
	if d.off != len(body) {
		return nil, &DecodeError{Offset: d.off, Msg: fmt.Sprintf("%d bytes after the last block", len(body)-d.off)}
	}
	if got, want := xxh3.Hash(body), binary.BigEndian.Uint64(b[len(body):]); got != want {
		return nil, &DecodeError{Offset: len(body), Msg: fmt.Sprintf("checksum %#016x, computed %#016x", want, got)}
	}
	return l, nil
}
