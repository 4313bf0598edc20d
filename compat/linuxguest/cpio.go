package linuxguest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// This file writes (and, for tests and checks, reads) the "newc" cpio format: the
// uncompressed archive the Linux kernel unpacks into its rootfs as an initramfs. The format
// is the kernel's own documentation, Documentation/driver-api/early-userspace/buffer-format.rst:
// every entry is a 110-byte ASCII header (the magic "070701" and thirteen 8-digit hexadecimal
// fields), the NUL-terminated name padded to a multiple of 4 bytes counted from the start of
// the header, then the data padded to a multiple of 4; the archive ends with an entry named
// "TRAILER!!!". Hard links are not used: every entry has its own inode number and nlink 1
// (2 for directories), which the kernel unpacks as independent files.

// File type bits of Header.Mode (the st_mode values the kernel's unpacker expects).
const (
	ModeType    = 0o170000 // mask of the type bits
	ModeRegular = 0o100000
	ModeDir     = 0o040000
	ModeSymlink = 0o120000
	ModeCharDev = 0o020000
	ModePerm    = 0o7777 // permission bits (with setuid, setgid, sticky)
)

const (
	cpioMagic      = "070701"
	cpioHeaderSize = 110
	cpioTrailer    = "TRAILER!!!"
	// MaxNameLen caps an entry's name (the kernel's PATH_MAX, NUL included).
	MaxNameLen = 4096
	// MaxFileSize is the largest entry the 8-hex-digit size field can describe.
	MaxFileSize = 1<<32 - 1
)

// Header is one cpio entry.
type Header struct {
	Name   string // path inside the archive, without a leading "/" ("init", "dev/console")
	Mode   uint32 // type bits (ModeRegular, …) | permission bits
	UID    uint32
	GID    uint32
	Mtime  uint32 // seconds since the epoch
	Size   int64  // data bytes: a regular file's content, a symlink's target
	Major  uint32 // device number of a character device (rdevmajor)
	Minor  uint32 // (rdevminor)
	Ino    uint32 // inode number: assigned by Writer, reported by Reader
	Offset int64  // Reader: byte offset of the header in the archive
}

// Writer writes a newc cpio archive to an io.Writer. Its methods return the first error
// met by any of them (sticky): after an error the archive is incomplete.
type Writer struct {
	w       *bufio.Writer
	off     int64 // bytes written so far (for padding)
	remain  int64 // data bytes still due for the current entry
	nextIno uint32
	err     error
	closed  bool
}

// NewWriter returns a Writer that writes an archive to w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{w: bufio.NewWriterSize(w, 1<<20), nextIno: 1}
}

func (cw *Writer) write(p []byte) {
	if cw.err != nil {
		return
	}
	n, err := cw.w.Write(p)
	cw.off += int64(n)
	cw.err = err
}

func (cw *Writer) pad() {
	var zero [4]byte
	if r := cw.off % 4; r != 0 {
		cw.write(zero[:4-r])
	}
}

// WriteHeader starts a new entry; its data (h.Size bytes) follows with Write. The previous
// entry must have received all its data.
func (cw *Writer) WriteHeader(h *Header) error {
	if cw.err != nil {
		return cw.err
	}
	if cw.closed {
		return errors.New("cpio: write after Close")
	}
	if cw.remain != 0 {
		cw.err = fmt.Errorf("cpio: entry before %q is %d bytes short", h.Name, cw.remain)
		return cw.err
	}
	if err := checkName(h.Name); err != nil {
		return err
	}
	if h.Size < 0 || h.Size > MaxFileSize {
		return fmt.Errorf("cpio: %s: size %d outside [0, %d]", h.Name, h.Size, int64(MaxFileSize))
	}
	switch h.Mode & ModeType {
	case ModeRegular, ModeSymlink:
	case ModeDir, ModeCharDev:
		if h.Size != 0 {
			return fmt.Errorf("cpio: %s: a directory or device has no data (size %d)", h.Name, h.Size)
		}
	default:
		return fmt.Errorf("cpio: %s: unsupported file type %#o", h.Name, h.Mode&ModeType)
	}
	nlink := uint32(1)
	if h.Mode&ModeType == ModeDir {
		nlink = 2
	}
	h.Ino = cw.nextIno
	cw.nextIno++
	cw.writeEntryHeader(h.Ino, h.Mode, h.UID, h.GID, nlink, h.Mtime, uint32(h.Size), h.Major, h.Minor, h.Name)
	cw.remain = h.Size
	if cw.remain == 0 {
		cw.pad()
	}
	return cw.err
}

func (cw *Writer) writeEntryHeader(ino, mode, uid, gid, nlink, mtime, size, major, minor uint32, name string) {
	b := make([]byte, 0, cpioHeaderSize+len(name)+1)
	b = append(b, cpioMagic...)
	for _, v := range []uint32{ino, mode, uid, gid, nlink, mtime, size, 0, 0, major, minor, uint32(len(name) + 1), 0} {
		b = fmt.Appendf(b, "%08x", v)
	}
	b = append(b, name...)
	b = append(b, 0)
	cw.write(b)
	cw.pad()
}

// Write writes data of the current entry; more than its Size is an error.
func (cw *Writer) Write(p []byte) (int, error) {
	if cw.err != nil {
		return 0, cw.err
	}
	if int64(len(p)) > cw.remain {
		cw.err = fmt.Errorf("cpio: %d bytes written past the entry's size", int64(len(p))-cw.remain)
		return 0, cw.err
	}
	before := cw.off
	cw.write(p)
	n := int(cw.off - before)
	cw.remain -= int64(n)
	if cw.remain == 0 {
		cw.pad()
	}
	return n, cw.err
}

// Close writes the trailer and flushes; it does not close the underlying writer.
func (cw *Writer) Close() error {
	if cw.closed {
		return cw.err
	}
	if cw.err == nil && cw.remain != 0 {
		cw.err = fmt.Errorf("cpio: last entry is %d bytes short", cw.remain)
	}
	cw.closed = true
	cw.writeEntryHeader(0, 0, 0, 0, 1, 0, 0, 0, 0, cpioTrailer)
	if cw.err == nil {
		cw.err = cw.w.Flush()
	}
	return cw.err
}

// Offset returns the number of bytes written so far.
func (cw *Writer) Offset() int64 { return cw.off }

func checkName(name string) error {
	switch {
	case name == "" || len(name)+1 > MaxNameLen:
		return fmt.Errorf("cpio: name of %d bytes outside [1, %d)", len(name), MaxNameLen)
	case strings.IndexByte(name, 0) >= 0:
		return fmt.Errorf("cpio: name %q holds a NUL byte", name)
	case name == cpioTrailer:
		return fmt.Errorf("cpio: %q is the trailer's name", name)
	}
	return nil
}

// Reader reads a newc cpio archive entry by entry. It never holds more than one header
// and name in memory: names are capped at MaxNameLen and data is streamed through Read.
type Reader struct {
	r      *bufio.Reader
	off    int64
	remain int64 // data bytes of the current entry not read yet
	pad    int   // padding after them
	err    error
}

// NewReader returns a Reader of the archive in r.
func NewReader(r io.Reader) *Reader { return &Reader{r: bufio.NewReader(r)} }

func (cr *Reader) fail(off int64, format string, args ...any) error {
	cr.err = fmt.Errorf("cpio: at byte %d: %s", off, fmt.Sprintf(format, args...))
	return cr.err
}

func (cr *Reader) skip(n int64) error {
	m, err := io.CopyN(io.Discard, cr.r, n)
	cr.off += m
	if err != nil {
		return cr.fail(cr.off, "truncated archive (%v)", err)
	}
	return nil
}

// Next advances to the next entry, skipping the rest of the current one. It returns io.EOF
// after the trailer; any other error (with the byte offset where the archive is wrong) is
// sticky.
func (cr *Reader) Next() (*Header, error) {
	if cr.err != nil {
		return nil, cr.err
	}
	if err := cr.skip(cr.remain + int64(cr.pad)); err != nil {
		return nil, err
	}
	cr.remain, cr.pad = 0, 0
	start := cr.off
	var hdr [cpioHeaderSize]byte
	n, err := io.ReadFull(cr.r, hdr[:])
	cr.off += int64(n)
	if err != nil {
		return nil, cr.fail(start, "truncated header (%d of %d bytes): no trailer", n, cpioHeaderSize)
	}
	if string(hdr[:6]) != cpioMagic {
		return nil, cr.fail(start, "magic %q, want %q (newc)", hdr[:6], cpioMagic)
	}
	var f [13]uint32
	for i := range f {
		field := hdr[6+8*i : 14+8*i]
		v, err := strconv.ParseUint(string(field), 16, 32)
		if err != nil {
			return nil, cr.fail(start+6+8*int64(i), "field %d is %q, not 8 hex digits", i, field)
		}
		f[i] = uint32(v)
	}
	namesize := f[11]
	if namesize < 2 || namesize > MaxNameLen {
		return nil, cr.fail(start+94, "name size %d outside [2, %d]", namesize, MaxNameLen)
	}
	name := make([]byte, namesize)
	n, err = io.ReadFull(cr.r, name)
	cr.off += int64(n)
	if err != nil {
		return nil, cr.fail(start+cpioHeaderSize, "truncated name")
	}
	if name[namesize-1] != 0 || strings.IndexByte(string(name[:namesize-1]), 0) >= 0 {
		return nil, cr.fail(start+cpioHeaderSize, "name is not one NUL-terminated string")
	}
	if err := cr.skip((4 - cr.off%4) % 4); err != nil {
		return nil, err
	}
	h := &Header{Name: string(name[:namesize-1]), Ino: f[0], Mode: f[1], UID: f[2], GID: f[3],
		Mtime: f[5], Size: int64(f[6]), Major: f[9], Minor: f[10], Offset: start}
	if h.Name == cpioTrailer {
		cr.err = io.EOF
		return nil, io.EOF
	}
	cr.remain = h.Size
	cr.pad = int((4 - (cr.off+h.Size)%4) % 4)
	return h, nil
}

// Read reads data of the current entry; it returns io.EOF at the entry's end.
func (cr *Reader) Read(p []byte) (int, error) {
	if cr.err != nil {
		return 0, cr.err
	}
	if cr.remain == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > cr.remain {
		p = p[:cr.remain]
	}
	n, err := cr.r.Read(p)
	cr.off += int64(n)
	cr.remain -= int64(n)
	if err == io.EOF && cr.remain > 0 {
		return n, cr.fail(cr.off, "truncated data: %d bytes missing", cr.remain)
	}
	if err != nil && err != io.EOF {
		return n, cr.fail(cr.off, "%v", err)
	}
	return n, nil
}
