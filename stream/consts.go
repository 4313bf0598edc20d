package stream

import (
	"strconv"
	"strings"
)

// File header constants (stream-format.md §1).
const (
	// Magic is QEMU_VM_FILE_MAGIC, "QEVM", the first four bytes of every stream.
	Magic uint32 = 0x5145564D
	// Version is QEMU_VM_FILE_VERSION, the only stream version QEMU 7.2 and 10.0 accept.
	Version uint32 = 3
	// versionV2 is the obsolete version 2, refused by QEMU with its own message.
	versionV2 uint32 = 2
)

// SectionType is the one-byte type that starts every top-level record (stream-format.md §2).
type SectionType uint8

// Section types (stream-format.md §2).
const (
	SectionEOF           SectionType = 0x00 // end of the device stream; nothing follows but the vmdesc
	SectionStart         SectionType = 0x01 // first chunk of an iterative handler (ram)
	SectionPart          SectionType = 0x02 // further chunk of an iterative handler
	SectionEnd           SectionType = 0x03 // last chunk of an iterative handler
	SectionFull          SectionType = 0x04 // whole state of a non-iterative device
	SectionSubsection    SectionType = 0x05 // vmstate subsection marker; only inside bodies
	SectionVMDescription SectionType = 0x06 // vmdesc JSON, after EOF (§5.1)
	SectionConfiguration SectionType = 0x07 // configuration, right after the header (§1)
	SectionCommand       SectionType = 0x08 // QEMU_VM_COMMAND (§3)
	SectionFooter        SectionType = 0x7E // footer after every START/PART/END/FULL body
)

var sectionTypeNames = map[SectionType]string{
	SectionEOF:           "EOF",
	SectionStart:         "START",
	SectionPart:          "PART",
	SectionEnd:           "END",
	SectionFull:          "FULL",
	SectionSubsection:    "SUBSECTION",
	SectionVMDescription: "VMDESCRIPTION",
	SectionConfiguration: "CONFIGURATION",
	SectionCommand:       "COMMAND",
	SectionFooter:        "FOOTER",
}

func (t SectionType) String() string {
	if s, ok := sectionTypeNames[t]; ok {
		return s
	}
	return "SectionType(0x" + strconv.FormatUint(uint64(t), 16) + ")"
}

// Command is the be16 command number of a QEMU_VM_COMMAND record (stream-format.md §3).
type Command uint16

// Commands (stream-format.md §3).
const (
	CmdOpenReturnPath     Command = 1  // len 0: destination opens the return path
	CmdPing               Command = 2  // len 4: be32 value, answered by PONG
	CmdPostcopyAdvise     Command = 3  // len 0 or 16: be64 page size summary, be64 target page size
	CmdPostcopyListen     Command = 4  // len 0
	CmdPostcopyRun        Command = 5  // len 0
	CmdPostcopyRAMDiscard Command = 6  // variable: version, block name, ranges
	CmdPackaged           Command = 7  // len 4: be32 N, then N bytes of nested stream
	CmdEnableCOLO         Command = 8  // len 0
	CmdPostcopyResume     Command = 9  // len 0
	CmdRecvBitmap         Command = 10 // len 1+n: block name
	CmdSwitchoverStart    Command = 11 // len 0; QEMU 10.0 only
)

var commandNames = [...]string{
	CmdOpenReturnPath:     "OPEN_RETURN_PATH",
	CmdPing:               "PING",
	CmdPostcopyAdvise:     "POSTCOPY_ADVISE",
	CmdPostcopyListen:     "POSTCOPY_LISTEN",
	CmdPostcopyRun:        "POSTCOPY_RUN",
	CmdPostcopyRAMDiscard: "POSTCOPY_RAM_DISCARD",
	CmdPackaged:           "PACKAGED",
	CmdEnableCOLO:         "ENABLE_COLO",
	CmdPostcopyResume:     "POSTCOPY_RESUME",
	CmdRecvBitmap:         "RECV_BITMAP",
	CmdSwitchoverStart:    "SWITCHOVER_START",
}

// Known reports whether c is one of the commands of stream-format.md §3.
func (c Command) Known() bool { return c >= CmdOpenReturnPath && c <= CmdSwitchoverStart }

func (c Command) String() string {
	if c.Known() {
		return commandNames[c]
	}
	return "Command(" + strconv.FormatUint(uint64(c), 10) + ")"
}

// fixedLen returns the payload length a command must have, or -1 when it is variable.
func (c Command) fixedLen() int {
	switch c {
	case CmdOpenReturnPath, CmdPostcopyListen, CmdPostcopyRun, CmdEnableCOLO,
		CmdPostcopyResume, CmdSwitchoverStart:
		return 0
	case CmdPing, CmdPackaged:
		return 4
	}
	return -1
}

// RAMFlag holds the flag bits in the low bits of the be64 that starts every RAM record
// (stream-format.md §4). Several bits may be set (e.g. PAGE|CONTINUE).
type RAMFlag uint32

// RAM record flags (stream-format.md §4).
const (
	RAMFull         RAMFlag = 0x001 // obsolete since 2009, rejected
	RAMZero         RAMFlag = 0x002 // [block], u8 fill
	RAMMemSize      RAMFlag = 0x004 // block list; offset bits = total bytes
	RAMPage         RAMFlag = 0x008 // [block], one raw page
	RAMEOS          RAMFlag = 0x010 // end of the section body
	RAMContinue     RAMFlag = 0x020 // modifier: block name omitted, same block as before
	RAMXBZRLE       RAMFlag = 0x040 // [block], u8 0x01, be16 n, n bytes of XBZRLE delta
	RAMHook         RAMFlag = 0x080 // RDMA control, not supported in plain streams
	RAMCompressPage RAMFlag = 0x100 // [block], be32 n, n bytes zlib (QEMU 7.2 only)
	RAMMultifdFlush RAMFlag = 0x200 // multifd per-round sync (QEMU 10.0 only)
)

var ramFlagNames = [...]struct {
	f RAMFlag
	s string
}{
	{RAMFull, "FULL"}, {RAMZero, "ZERO"}, {RAMMemSize, "MEM_SIZE"}, {RAMPage, "PAGE"},
	{RAMEOS, "EOS"}, {RAMContinue, "CONTINUE"}, {RAMXBZRLE, "XBZRLE"}, {RAMHook, "HOOK"},
	{RAMCompressPage, "COMPRESS_PAGE"}, {RAMMultifdFlush, "MULTIFD_FLUSH"},
}

// String renders the set bits joined by "|", e.g. "PAGE|CONTINUE"; unknown bits as hex.
func (f RAMFlag) String() string {
	if f == 0 {
		return "0"
	}
	var b strings.Builder
	rest := f
	for _, n := range ramFlagNames {
		if f&n.f != 0 {
			if b.Len() > 0 {
				b.WriteByte('|')
			}
			b.WriteString(n.s)
			rest &^= n.f
		}
	}
	if rest != 0 {
		if b.Len() > 0 {
			b.WriteByte('|')
		}
		b.WriteString("0x" + strconv.FormatUint(uint64(rest), 16))
	}
	return b.String()
}

// hasBlock reports whether a record with these flags names (or continues) a RAM block.
func (f RAMFlag) hasBlock() bool {
	switch f &^ RAMContinue {
	case RAMZero, RAMPage, RAMXBZRLE, RAMCompressPage:
		return true
	}
	return false
}

// Capability names that change the layout of the stream (stream-format.md §1, §4).
const (
	CapXIgnoreShared = "x-ignore-shared" // adds a be64 GPA per MEM_SIZE block
	CapMappedRAM     = "mapped-ram"      // adds the mapped-ram header per block, pages in the file
	CapPostcopyRAM   = "postcopy-ram"    // with POSTCOPY_ADVISE, may add a per-block page size
)

// Names of the configuration subsections (stream-format.md §1).
const (
	subTargetPageBits = "configuration/target-page-bits"
	subCapabilities   = "configuration/capabilities"
	subUUID           = "configuration/uuid"
)

// Kind says what a Record returned by Reader.Next holds.
type Kind uint8

// Record kinds.
const (
	KindInvalid       Kind = iota
	KindHeader             // magic and version
	KindConfiguration      // the CONFIGURATION section
	KindSectionStart       // START section header (ram records follow)
	KindSectionPart        // PART section header
	KindSectionEnd         // END section header
	KindSectionFull        // FULL section header plus its vmstate Body
	KindRAM                // one record of a ram section body
	KindFooter             // section footer
	KindCommand            // QEMU_VM_COMMAND
	KindPackageEnd         // end of the nested stream of a PACKAGED command
	KindEOF                // EOF record
	KindVMDesc             // VMDESCRIPTION JSON
)

var kindNames = [...]string{
	KindInvalid: "Invalid", KindHeader: "Header", KindConfiguration: "Configuration",
	KindSectionStart: "SectionStart", KindSectionPart: "SectionPart", KindSectionEnd: "SectionEnd",
	KindSectionFull: "SectionFull", KindRAM: "RAM", KindFooter: "Footer", KindCommand: "Command",
	KindPackageEnd: "PackageEnd", KindEOF: "EOF", KindVMDesc: "VMDesc",
}

func (k Kind) String() string {
	if int(k) < len(kindNames) {
		return kindNames[k]
	}
	return "Kind(" + strconv.Itoa(int(k)) + ")"
}

// sectionKind maps a section type with a header to its record kind.
func sectionKind(t SectionType) Kind {
	return Kind(int(KindSectionStart) + int(t) - int(SectionStart))
}
