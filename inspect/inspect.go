// Package inspect explains a migration stream to an operator: what it holds (header,
// configuration, RAM blocks and their page records, sections, commands, devices, vmdesc), whether
// it is structurally valid, the decoded fields of a device, and the final content of each RAM
// block. It backs `qemu-migrate-go inspect`.
package inspect

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// Report is the summary of one stream; its JSON form is the stable `inspect --json` schema
// (schema.json beside this file).
type Report struct {
	Kind           string         `json:"kind"` // "migration-stream" or "multifd-channel"
	Bytes          int64          `json:"bytes"`
	Version        uint32         `json:"version,omitempty"`
	Machine        string         `json:"machine,omitempty"`
	Capabilities   []string       `json:"capabilities"`
	UUID           string         `json:"uuid,omitempty"`
	TargetPageBits uint32         `json:"target_page_bits,omitempty"`
	RAMBlocks      []*Block       `json:"ram_blocks"`
	Sections       []*Section     `json:"sections"`
	Commands       []CommandCount `json:"commands"`
	Devices        []string       `json:"devices"`
	VMDesc         VMDesc         `json:"vmdesc"`
	Multifd        *Multifd       `json:"multifd,omitempty"`
	Warnings       []string       `json:"warnings"`
	// Error is the decode error that ended the walk ("" for a valid stream), ErrorOffset its
	// byte offset.
	Error       string `json:"error,omitempty"`
	ErrorOffset int64  `json:"error_offset,omitempty"`
}

// Block is one RAM block and the page records sent for it.
type Block struct {
	Name       string  `json:"name"`
	UsedLength uint64  `json:"used_length"`
	GPA        *uint64 `json:"gpa,omitempty"`
	Normal     int64   `json:"normal"`
	Zero       int64   `json:"zero"`
	XBZRLE     int64   `json:"xbzrle"`
	Compressed int64   `json:"compressed"`
	// Distinct is the number of different pages that received any record (-1 if the block is
	// too large to track).
	Distinct int64 `json:"distinct"`

	seen []uint64
}

// Section is one section id: a live section (START, PART…, END) or one FULL device section.
type Section struct {
	Type     string `json:"type"` // "live" or "full"
	ID       uint32 `json:"id"`
	Idstr    string `json:"idstr"`
	Instance uint32 `json:"instance"`
	Version  uint32 `json:"version"`
	Bytes    int64  `json:"bytes"` // headers, bodies and footers
	Start    int    `json:"start,omitempty"`
	Parts    int    `json:"parts,omitempty"`
	End      int    `json:"end,omitempty"`
	// Heuristic: the FULL body's end was found by footer scanning, not from the vmdesc.
	Heuristic bool `json:"heuristic,omitempty"`
}

// CommandCount is how often a COMMAND appeared.
type CommandCount struct {
	Command string `json:"command"`
	ID      uint16 `json:"id"`
	Count   int    `json:"count"`
}

// VMDesc says whether the stream carries the vmdesc JSON and whether it parses.
type VMDesc struct {
	Present bool   `json:"present"`
	Bytes   int    `json:"bytes"`
	Valid   bool   `json:"valid"`
	Error   string `json:"error,omitempty"`
}

// Multifd summarizes a multifd channel recording (stream-format.md §4.1).
type Multifd struct {
	Channel     uint8  `json:"channel"`
	UUID        string `json:"uuid"`
	Packets     int64  `json:"packets"`
	SyncPackets int64  `json:"sync_packets"`
	NormalPages int64  `json:"normal_pages"`
	ZeroPages   int64  `json:"zero_pages"`
}

// Options select the extra work Inspect does.
type Options struct {
	Limits *stream.Limits
	// Device, if set, names a device (idstr, or idstr/instance) whose decoded fields are
	// written to DeviceOut.
	Device    string
	DeviceOut io.Writer
	// ExtractRAM, if set, is a folder that receives each block's final content as a file.
	ExtractRAM string
	// MaxTrackedRAM caps the RAM size whose distinct pages are tracked (default 1 TiB: 32 MiB
	// of bitmaps).
	MaxTrackedRAM uint64
}

// ErrInvalid is wrapped by the error Inspect returns for a stream that does not decode.
var ErrInvalid = errors.New("invalid stream")

const page = 4096

// Inspect reads a whole stream from r and summarizes it. A stream that fails to decode still
// yields the report of what was read, with Error set, and an error wrapping ErrInvalid.
func Inspect(r io.Reader, opt Options) (*Report, error) {
	if opt.MaxTrackedRAM == 0 {
		opt.MaxTrackedRAM = 1 << 40
	}
	rep := &Report{Kind: "migration-stream", Capabilities: []string{}, RAMBlocks: []*Block{},
		Sections: []*Section{}, Commands: []CommandCount{}, Devices: []string{}, Warnings: []string{}}
	cr := &countReader{r: r}
	br := newPeekReader(cr)
	if magic, err := br.peek4(); err == nil && binary.BigEndian.Uint32(magic) == stream.MultifdMagic {
		return inspectMultifd(br, cr, rep)
	}
	x, err := newExtractor(opt.ExtractRAM)
	if err != nil {
		return nil, err
	}
	opts := []stream.Option{
		stream.WithWarnings(func(off int64, msg string) {
			rep.Warnings = append(rep.Warnings, fmt.Sprintf("offset %d: %s", off, msg))
		}),
		stream.WithDeviceSizer(stream.VMDescSizer()),
		stream.WithIgnoreAfterEOF(), // a destination ignores what follows EOF: so does the report
	}
	if opt.Limits != nil {
		opts = append(opts, stream.WithLimits(*opt.Limits))
	}
	rd := stream.NewReader(br, opts...)
	var (
		blocks   = map[string]*Block{}
		sections = map[uint32]*Section{}
		cmds     = map[stream.Command]int{}
		cur      *Section
		curFrom  int64
		tracked  uint64
		devBody  []byte
		devRef   stream.SectionHeader
		devIndex = -1
		fulls    int
		vmdesc   []byte
	)
	decodeErr := func() error {
		for {
			rec, err := rd.Next()
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
			switch rec.Kind {
			case stream.KindHeader:
				rep.Version = rec.Version
			case stream.KindConfiguration:
				c := &rec.Config
				rep.Machine = c.Machine
				rep.Capabilities = append(rep.Capabilities, c.Capabilities...)
				if c.HasUUID {
					rep.UUID = formatUUID(c.UUID)
				}
				if c.HasTargetPageBits {
					rep.TargetPageBits = c.TargetPageBits
				}
			case stream.KindSectionStart, stream.KindSectionPart, stream.KindSectionEnd:
				s := sections[rec.Section.ID]
				if s == nil {
					s = &Section{Type: "live", ID: rec.Section.ID, Idstr: rec.Section.Idstr, Instance: rec.Section.Instance, Version: rec.Section.Version}
					sections[rec.Section.ID] = s
					rep.Sections = append(rep.Sections, s)
				}
				switch rec.Kind {
				case stream.KindSectionStart:
					s.Start++
				case stream.KindSectionPart:
					s.Parts++
				default:
					s.End++
				}
				cur, curFrom = s, rec.Offset
			case stream.KindSectionFull:
				s := &Section{Type: "full", ID: rec.Section.ID, Idstr: rec.Section.Idstr, Instance: rec.Section.Instance,
					Version: rec.Section.Version, Heuristic: rec.Heuristic}
				rep.Sections = append(rep.Sections, s)
				rep.Devices = append(rep.Devices, fmt.Sprintf("%s/%d", s.Idstr, s.Instance))
				if rec.Depth == 0 {
					fulls++
				}
				if opt.Device != "" && devBody == nil && deviceMatches(opt.Device, &rec.Section) {
					devBody, devRef, devIndex = append([]byte(nil), rec.Body...), rec.Section, fulls-1
				}
				cur, curFrom = s, rec.Offset
			case stream.KindFooter:
				if cur != nil {
					cur.Bytes += rec.Offset + 5 - curFrom
					cur = nil
				}
			case stream.KindCommand:
				cmds[rec.Cmd]++
			case stream.KindVMDesc:
				vmdesc = append([]byte(nil), rec.JSON...)
			case stream.KindRAM:
				if err := countRAM(rec, blocks, rep, x, &tracked, opt.MaxTrackedRAM); err != nil {
					return err
				}
			}
		}
	}()
	rep.Bytes = cr.n
	for c, n := range cmds {
		rep.Commands = append(rep.Commands, CommandCount{Command: c.String(), ID: uint16(c), Count: n})
	}
	sort.Slice(rep.Commands, func(i, j int) bool { return rep.Commands[i].ID < rep.Commands[j].ID })
	for _, b := range rep.RAMBlocks {
		if b.seen != nil {
			for _, w := range b.seen {
				b.Distinct += int64(popcount(w))
			}
		}
	}
	if vmdesc != nil {
		rep.VMDesc = VMDesc{Present: true, Bytes: len(vmdesc)}
		if desc, err := stream.ParseVMDesc(vmdesc); err != nil {
			rep.VMDesc.Error = err.Error()
		} else {
			rep.VMDesc.Valid = true
			if opt.Device != "" && devBody != nil {
				printDevice(opt, desc, devRef, devIndex, devBody, rep)
			}
		}
	}
	if opt.Device != "" && devBody == nil {
		rep.Warnings = append(rep.Warnings, fmt.Sprintf("device %q is not in the stream", opt.Device))
	} else if opt.Device != "" && !rep.VMDesc.Valid {
		rep.Warnings = append(rep.Warnings, fmt.Sprintf("device %q cannot be decoded: no usable vmdesc", opt.Device))
	}
	if cerr := x.close(); cerr != nil && decodeErr == nil {
		decodeErr = cerr
	}
	if decodeErr != nil {
		rep.Error = decodeErr.Error()
		var se *stream.Error
		if errors.As(decodeErr, &se) {
			rep.ErrorOffset = se.Offset
		}
		return rep, fmt.Errorf("%w: %v", ErrInvalid, decodeErr)
	}
	return rep, nil
}

func countRAM(rec *stream.Record, blocks map[string]*Block, rep *Report, x *extractor, tracked *uint64, maxTracked uint64) error {
	r := &rec.RAM
	kind := r.Flags &^ stream.RAMContinue
	if kind == stream.RAMMemSize {
		for _, b := range r.Blocks {
			if blocks[b.Name] != nil {
				continue
			}
			blk := &Block{Name: b.Name, UsedLength: b.UsedLength}
			if b.HasGPA {
				g := b.GPA
				blk.GPA = &g
			}
			if *tracked+b.UsedLength <= maxTracked && b.UsedLength <= maxTracked {
				*tracked += b.UsedLength
				blk.seen = make([]uint64, (b.UsedLength/page+63)/64)
			} else {
				blk.Distinct = -1
			}
			blocks[b.Name] = blk
			rep.RAMBlocks = append(rep.RAMBlocks, blk)
			if err := x.addBlock(b.Name, b.UsedLength); err != nil {
				return err
			}
		}
		return nil
	}
	if r.Block == "" {
		return nil // EOS, MULTIFD_FLUSH
	}
	blk := blocks[r.Block]
	if blk == nil {
		return &stream.Error{Offset: rec.Offset, SectionID: rec.Section.ID, Idstr: rec.Section.Idstr, InSection: true,
			Expected: "ram page record", Err: fmt.Errorf("page record for block %q, which the MEM_SIZE list does not name", r.Block)}
	}
	switch kind {
	case stream.RAMPage:
		blk.Normal++
	case stream.RAMZero:
		blk.Zero++
	case stream.RAMXBZRLE:
		blk.XBZRLE++
	case stream.RAMCompressPage:
		blk.Compressed++
	}
	if idx := r.Offset / page; blk.seen != nil && idx/64 < uint64(len(blk.seen)) {
		blk.seen[idx/64] |= 1 << (idx % 64)
	}
	return x.apply(rec)
}

func deviceMatches(want string, s *stream.SectionHeader) bool {
	if want == s.Idstr {
		return true
	}
	return want == fmt.Sprintf("%s/%d", s.Idstr, s.Instance)
}

func printDevice(opt Options, desc *stream.VMDesc, s stream.SectionHeader, index int, body []byte, rep *Report) {
	var dev *stream.VMDescDevice
	if index >= 0 && index < len(desc.Devices) && desc.Devices[index].Name == s.Idstr && desc.Devices[index].InstanceID == s.Instance {
		dev = &desc.Devices[index]
	} else {
		dev = desc.Device(s.Idstr, s.Instance)
	}
	if dev == nil {
		rep.Warnings = append(rep.Warnings, fmt.Sprintf("device %q is not described in the vmdesc", opt.Device))
		return
	}
	node, _, err := stream.DecodeVMState(body, dev, &stream.VMStateOptions{SectionID: s.ID, NoFooterCheck: true})
	if err != nil {
		rep.Warnings = append(rep.Warnings, fmt.Sprintf("device %q: %v", opt.Device, err))
		return
	}
	if opt.DeviceOut != nil {
		fmt.Fprintf(opt.DeviceOut, "%s instance %d version %d (section id %d, %d bytes)\n", s.Idstr, s.Instance, s.Version, s.ID, len(body))
		stream.Format(opt.DeviceOut, node)
	}
}

func formatUUID(u [16]byte) string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func popcount(w uint64) int {
	n := 0
	for ; w != 0; w &= w - 1 {
		n++
	}
	return n
}

// extractor writes each block's final content (ExtractRAM).
type extractor struct {
	dir     string
	files   map[string]*os.File
	page    []byte
	inflate stream.Inflater
}

func newExtractor(dir string) (*extractor, error) {
	if dir == "" {
		return nil, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	return &extractor{dir: dir, files: map[string]*os.File{}, page: make([]byte, page)}, nil
}

// fileName maps a block name ("pc.ram", "/rom@etc/acpi/tables") to a file name.
func fileName(block string) string {
	n := strings.Trim(strings.NewReplacer("/", "_", "\x00", "_").Replace(block), "_.")
	if n == "" {
		n = "block"
	}
	return n + ".bin"
}

func (x *extractor) addBlock(name string, size uint64) error {
	if x == nil {
		return nil
	}
	f, err := os.Create(filepath.Join(x.dir, fileName(name)))
	if err != nil {
		return err
	}
	x.files[name] = f
	return f.Truncate(int64(size)) // sparse: pages never sent stay zero
}

func (x *extractor) apply(rec *stream.Record) error {
	if x == nil {
		return nil
	}
	r := &rec.RAM
	f := x.files[r.Block]
	off := int64(r.Offset)
	switch r.Flags &^ stream.RAMContinue {
	case stream.RAMPage:
		_, err := f.WriteAt(r.Data, off)
		return err
	case stream.RAMZero:
		for i := range x.page {
			x.page[i] = r.Fill
		}
	case stream.RAMXBZRLE:
		if _, err := f.ReadAt(x.page, off); err != nil && err != io.EOF {
			return err
		}
		if err := stream.XBZRLEDecode(x.page, r.Data); err != nil {
			return &stream.Error{Offset: rec.Offset, SectionID: rec.Section.ID, Idstr: rec.Section.Idstr, InSection: true,
				Expected: fmt.Sprintf("XBZRLE delta for page %#x of %q", r.Offset, r.Block), Err: err}
		}
	case stream.RAMCompressPage:
		if n, err := x.inflate.Inflate(x.page, r.Data); err != nil || n != page {
			if err == nil {
				err = fmt.Errorf("inflates to %d bytes, not a page", n)
			}
			return &stream.Error{Offset: rec.Offset, SectionID: rec.Section.ID, Idstr: rec.Section.Idstr, InSection: true,
				Expected: fmt.Sprintf("zlib data for page %#x of %q", r.Offset, r.Block), Err: err}
		}
	default:
		return nil
	}
	_, err := f.WriteAt(x.page, off)
	return err
}

func (x *extractor) close() error {
	if x == nil {
		return nil
	}
	var first error
	for _, f := range x.files {
		if err := f.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

type countReader struct {
	r io.Reader
	n int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
