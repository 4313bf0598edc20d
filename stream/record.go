package stream

// Record is one item of a migration stream as returned by Reader.Next and accepted by
// Writer.WriteRecord. Only the fields documented for its Kind are meaningful. Records returned
// by Next, and every slice in them, are reused: they are valid only until the next call to Next.
type Record struct {
	Kind   Kind
	Offset int64 // absolute offset of the record's first byte in the outer stream
	Depth  int   // PACKAGED nesting depth: 0 at top level, 1 inside a package, …

	// KindHeader.
	Magic   uint32
	Version uint32

	// KindConfiguration.
	Config Configuration

	// KindSectionStart/Part/End/Full, KindFooter, and KindRAM (the enclosing section).
	// For PART/END and footers the reader fills Idstr/Instance/Version from the START/FULL it
	// saw for that id.
	Section SectionHeader

	// KindSectionFull: the exact vmstate body between the section header and the footer.
	// Heuristic is true when its end was found by footer scanning rather than a DeviceSizer.
	Body      []byte
	Heuristic bool

	// KindRAM.
	RAM RAMRecord

	// KindCommand. For CmdPackaged, Payload is the be32 length of the nested stream, whose
	// records follow (with Depth+1) and are closed by a KindPackageEnd record.
	Cmd     Command
	Payload []byte

	// KindVMDesc: the raw JSON text.
	JSON []byte
}

// SectionHeader identifies a section (stream-format.md §2).
type SectionHeader struct {
	Type     SectionType
	ID       uint32
	Idstr    string
	Instance uint32
	Version  uint32
}

// RAMRecord is one record of a ram section body (stream-format.md §4).
type RAMRecord struct {
	Flags RAMFlag // as on the wire, including CONTINUE
	// Offset is the page offset inside the block; for MEM_SIZE the total of all block lengths;
	// for other records whatever the offset bits held (normally 0).
	Offset uint64
	Block  string // block name, resolved through CONTINUE (ZERO, PAGE, XBZRLE, COMPRESS_PAGE)
	// Data: PAGE = the page bytes; XBZRLE = the raw delta (see XBZRLEDecode); COMPRESS_PAGE =
	// the raw zlib stream (see Inflater).
	Data   []byte
	Fill   byte       // ZERO: the fill byte (always 0 from real senders)
	Blocks []RAMBlock // MEM_SIZE: the block list
}

// RAMBlock is one entry of the MEM_SIZE block list (stream-format.md §4, §4.3).
type RAMBlock struct {
	Name       string
	UsedLength uint64

	HasPageSize  bool   // present iff postcopy-ram was advised and the block page size ≠ host's
	PageSize     uint64 // the block's page size
	HasGPA       bool   // present iff x-ignore-shared is on
	GPA          uint64 // guest physical address of the block's memory region
	HasMappedRAM bool   // present iff mapped-ram is on
	MappedRAM    MappedRAMHeader
}

// MappedRAMHeader is the per-block header of a mapped-ram file (stream-format.md §4.3). After
// it the file continues at PagesOffset+UsedLength; the bytes in between (bitmap and pages) are
// not part of the record.
type MappedRAMHeader struct {
	Version      uint32
	PageSize     uint64
	BitmapOffset uint64
	PagesOffset  uint64
}

// mappedRAMHeaderLen is the packed size of MappedRAMHeader on the wire.
const mappedRAMHeaderLen = 4 + 8 + 8 + 8

// Configuration is the CONFIGURATION section (stream-format.md §1).
type Configuration struct {
	Machine string // machine class name, e.g. "pc-q35-7.2"

	HasTargetPageBits bool
	TargetPageBits    uint32

	HasCapabilities bool     // the capabilities subsection is present (possibly empty)
	Capabilities    []string // validated capabilities that are on

	HasUUID bool
	UUID    [16]byte

	// Raw is the exact configuration body (after the 0x07 type byte) as read. Writer uses it
	// verbatim when non-nil; set it to nil after changing the fields above.
	Raw []byte
}

// HasCapability reports whether name is listed in the capabilities subsection.
func (c *Configuration) HasCapability(name string) bool {
	for _, n := range c.Capabilities {
		if n == name {
			return true
		}
	}
	return false
}

// DeviceRef identifies the FULL section whose body a DeviceSizer is asked to measure.
type DeviceRef struct {
	SectionID  uint32
	Idstr      string
	InstanceID uint32
	VersionID  uint32
	// Index is the ordinal of this FULL section (0-based) among the FULL sections at the same
	// level: outside packages it matches the order of the vmdesc "devices" array.
	Index  int
	Nested bool  // inside a PACKAGED command
	Offset int64 // absolute offset of the body's first byte
	// VMDesc is the raw vmdesc JSON found at the end of the input (nil if there is none, e.g.
	// inside a package or when the stream has no vmdesc).
	VMDesc []byte
}

// DeviceSizer returns the length of the vmstate body of dev. body holds the bytes from the
// start of the body to the end of what may belong to device sections (the footer and the
// following records are included); the reader checks that body[n:] starts with the footer.
type DeviceSizer func(dev DeviceRef, body []byte) (n int, err error)
