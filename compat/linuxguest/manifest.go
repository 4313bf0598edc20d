package linuxguest

import (
	"bufio"
	"fmt"
	"hash/crc32"
	"io"
	"strconv"
	"strings"
)

// The manifest is a text file in the initramfs (ManifestPath) listing the files the guest
// holds for their memory, with the checksum of each as the host computed it when it wrote
// the archive. The guest recomputes them on demand: a FILES OK proves that the page cache
// still holds exactly what the host packed, whatever migrations happened in between.
//
//	qmg-manifest 1 crc32c
//	<crc32c, 8 hex digits> <size in bytes> <path below />
//	…

// ManifestPath is where the manifest sits in the guest's root file system.
const ManifestPath = "qmg/manifest"

const manifestHeader = "qmg-manifest 1 crc32c"

// Limits of ParseManifest.
const (
	MaxManifestEntries = 1 << 20
	maxManifestLine    = MaxNameLen + 32
)

// Castagnoli is the CRC-32C table the checksums use.
var Castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Entry is one file of the manifest.
type Entry struct {
	Path string // below the root, no leading "/"
	Size int64
	CRC  uint32 // CRC-32C of the content
}

// WriteManifest writes the manifest of entries to w.
func WriteManifest(w io.Writer, entries []Entry) error {
	bw := bufio.NewWriter(w)
	fmt.Fprintln(bw, manifestHeader)
	for _, e := range entries {
		if err := checkName(e.Path); err != nil || strings.ContainsAny(e.Path, "\n\r") || strings.HasPrefix(e.Path, "/") {
			return fmt.Errorf("manifest: path %q cannot be listed", e.Path)
		}
		fmt.Fprintf(bw, "%08x %d %s\n", e.CRC, e.Size, e.Path)
	}
	return bw.Flush()
}

// ParseManifest reads a manifest. Errors name the line and its byte offset; at most
// MaxManifestEntries entries and lines of MaxNameLen+32 bytes are accepted.
func ParseManifest(r io.Reader) ([]Entry, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	var entries []Entry
	var off int64
	for lineNo := 1; ; lineNo++ {
		line, err := readLine(br, maxManifestLine)
		start := off
		off += int64(len(line))
		if err == io.EOF && line == "" {
			if lineNo == 1 {
				return nil, fmt.Errorf("manifest: empty, want the header %q", manifestHeader)
			}
			return entries, nil
		}
		if err != nil && err != io.EOF {
			return nil, fmt.Errorf("manifest: line %d at byte %d: %w", lineNo, start, err)
		}
		if !strings.HasSuffix(line, "\n") {
			return nil, fmt.Errorf("manifest: line %d at byte %d: no newline at the end", lineNo, start)
		}
		line = line[:len(line)-1]
		if lineNo == 1 {
			if line != manifestHeader {
				return nil, fmt.Errorf("manifest: line 1 at byte 0 is %.40q, want %q", line, manifestHeader)
			}
			continue
		}
		if len(entries) == MaxManifestEntries {
			return nil, fmt.Errorf("manifest: line %d at byte %d: more than %d entries", lineNo, start, MaxManifestEntries)
		}
		crcS, rest, ok1 := strings.Cut(line, " ")
		sizeS, path, ok2 := strings.Cut(rest, " ")
		crc, err1 := strconv.ParseUint(crcS, 16, 32)
		size, err2 := strconv.ParseInt(sizeS, 10, 64)
		if !ok1 || !ok2 || len(crcS) != 8 || err1 != nil || err2 != nil || size < 0 || size > MaxFileSize ||
			path == "" || strings.HasPrefix(path, "/") || strings.IndexByte(path, 0) >= 0 || strings.Contains(path, "\r") {
			return nil, fmt.Errorf("manifest: line %d at byte %d: %.60q is not \"crc size path\"", lineNo, start, line)
		}
		entries = append(entries, Entry{Path: path, Size: size, CRC: uint32(crc)})
	}
}

// readLine reads up to and including '\n', failing on lines longer than max.
func readLine(br *bufio.Reader, max int) (string, error) {
	var b []byte
	for {
		frag, err := br.ReadSlice('\n')
		if len(b)+len(frag) > max {
			return string(b), fmt.Errorf("line longer than %d bytes", max)
		}
		b = append(b, frag...)
		if err == bufio.ErrBufferFull {
			continue
		}
		return string(b), err
	}
}
