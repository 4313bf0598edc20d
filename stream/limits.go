package stream

// Limits caps every length read from the wire, so that no input can make the Reader allocate
// more than these amounts. A length above its cap makes Next fail with an *Error wrapping
// ErrTooLarge. Zero fields are replaced by the defaults of DefaultLimits.
type Limits struct {
	MachineName    int // configuration machine-name length (be32 on the wire)
	Capabilities   int // number of names in configuration/capabilities
	VMDesc         int // vmdesc JSON length
	Command        int // COMMAND payload length (be16 on the wire, so at most 65535)
	Packaged       int // N of a PACKAGED command (bytes of nested stream held in memory)
	Tail           int // device tail: bytes from the first FULL section to the end of input
	RAMBlocks      int // blocks in one MEM_SIZE list
	XBZRLE         int // XBZRLE delta length (QEMU: at most one page)
	CompressedPage int // COMPRESS_PAGE zlib length (QEMU: compressBound(page size))
	PackageDepth   int // nesting depth of PACKAGED commands
	Sections       int // distinct section ids remembered for PART/END routing
}

// DefaultLimits returns caps generous enough for any real QEMU 7.2/10.0 stream.
func DefaultLimits() Limits {
	return Limits{
		MachineName:    1024,
		Capabilities:   64,
		VMDesc:         16 << 20,
		Command:        65535,
		Packaged:       64 << 20,
		Tail:           64 << 20,
		RAMBlocks:      4096,
		XBZRLE:         4096,
		CompressedPage: compressBound(4096),
		PackageDepth:   4,
		Sections:       65536,
	}
}

// compressBound is zlib's compressBound(n): the worst-case zlib output size for n input bytes.
func compressBound(n int) int { return n + n>>12 + n>>14 + n>>25 + 13 }

// withDefaults fills zero fields from DefaultLimits.
func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	set := func(v *int, def int) {
		if *v <= 0 {
			*v = def
		}
	}
	set(&l.MachineName, d.MachineName)
	set(&l.Capabilities, d.Capabilities)
	set(&l.VMDesc, d.VMDesc)
	set(&l.Command, d.Command)
	set(&l.Packaged, d.Packaged)
	set(&l.Tail, d.Tail)
	set(&l.RAMBlocks, d.RAMBlocks)
	set(&l.XBZRLE, d.XBZRLE)
	set(&l.CompressedPage, d.CompressedPage)
	set(&l.PackageDepth, d.PackageDepth)
	set(&l.Sections, d.Sections)
	return l
}
