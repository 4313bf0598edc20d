package link

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// dataFrame is one of the data frames of PROTOCOL.md §2.2 (PAGES aside: batch_test.go), as the
// tests build them.
type dataFrame interface {
	Append([]byte) []byte
}

// deviceAppender makes Device a dataFrame (DEVICE is encoded in place by its users).
type deviceAppender Device

func (d deviceAppender) Append(dst []byte) []byte {
	st := len(dst)
	dst = append(AppendDeviceHeader(dst, d.Seq), d.Data...)
	SetHeaderLength(dst[st:])
	return dst
}

// packagedAppender makes Packaged a dataFrame (PACKAGED is encoded in place by its users).
type packagedAppender Packaged

func (d packagedAppender) Append(dst []byte) []byte {
	st := len(dst)
	dst = append(AppendPackagedHeader(dst, d.Seq), d.Data...)
	SetHeaderLength(dst[st:])
	return dst
}

// parseData decodes a data frame's payload with the parser of its type.
func parseData(t FrameType, p []byte) (dataFrame, error) {
	switch t {
	case FrameBegin:
		v, err := ParseBegin(p)
		return v, err
	case FrameSection:
		v, err := ParseSection(p)
		return v, err
	case FrameMemSize:
		v, err := ParseMemSize(p)
		return v, err
	case FrameSectionEnd:
		v, err := ParseSectionEnd(p)
		return v, err
	case FrameCommand:
		v, err := ParseCommand(p)
		return v, err
	case FrameDevice:
		v, err := ParseDevice(p)
		return deviceAppender(v), err
	case FrameEnd:
		v, err := ParseEnd(p)
		return v, err
	case FramePackaged:
		v, err := ParsePackaged(p)
		return packagedAppender(v), err
	}
	return nil, fmt.Errorf("no parser for %v", t)
}

// normalize makes empty byte slices nil, so that a frame compares equal to its decoding.
func normalize(v dataFrame) dataFrame {
	z := func(b []byte) []byte {
		if len(b) == 0 {
			return nil
		}
		return b
	}
	switch x := v.(type) {
	case Begin:
		x.Config = z(x.Config)
		return x
	case Command:
		x.Payload = z(x.Payload)
		return x
	case deviceAppender:
		x.Data = z(x.Data)
		return x
	case End:
		x.VMDesc = z(x.VMDesc)
		return x
	case MemSize:
		if len(x.Blocks) == 0 {
			x.Blocks = nil
		}
		return x
	}
	return v
}

func filled(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*31)
	}
	return b
}

// name255 is the longest idstr or block name the u8 length allows.
var name255 = strings.Repeat("n", 255)

// config is the configuration section body QEMU 7.2 sends for pc-q35-7.2 (stream-format.md §1).
var config = []byte("\x00\x00\x00\x0apc-q35-7.2")

// dataFrameCases are valid data frames with edge values.
func dataFrameCases() map[string]dataFrame {
	maxBlocks := make([]Block, MaxBlocks)
	for i := range maxBlocks {
		b := Block{Name: fmt.Sprintf("%s%04d", name255[:251], i), UsedLength: 4096 * uint64(i+1)}
		if i%2 == 0 {
			b.HasPageSize, b.PageSize = true, 4096
		}
		if i%3 == 0 {
			b.HasGPA, b.GPA = true, 1<<32
		}
		maxBlocks[i] = b
	}
	return map[string]dataFrame{
		"BEGIN":                  Begin{Seq: 1, Magic: 0x5145564d, Version: 3, Config: config},
		"BEGIN empty config":     Begin{Seq: 1, Magic: 0x5145564d, Version: 3},
		"BEGIN max config":       Begin{Seq: 1<<64 - 1, Magic: 0xffffffff, Version: 0, Config: filled(MaxPayload-16, 1)},
		"SECTION START":          Section{Seq: 2, Type: StartSection, ID: 2, Idstr: "ram", Instance: 0, Version: 4},
		"SECTION START 255":      Section{Seq: 2, Type: StartSection, ID: 0xffffffff, Idstr: name255, Instance: 0xffffffff, Version: 0xffffffff},
		"SECTION START 1":        Section{Seq: 2, Type: StartSection, Idstr: "x"},
		"SECTION PART":           Section{Seq: 3, Type: PartSection, ID: 2},
		"SECTION END":            Section{Seq: 4, Type: EndSection, ID: 0xffffffff},
		"MEMSIZE empty":          MemSize{Seq: 5},
		"MEMSIZE pc.ram":         MemSize{Seq: 5, Blocks: []Block{{Name: "pc.ram", UsedLength: 1 << 30}}},
		"MEMSIZE flags":          MemSize{Seq: 5, Blocks: []Block{{Name: "a", UsedLength: 4096, HasPageSize: true, PageSize: 2 << 20}, {Name: "b", UsedLength: 8192, HasGPA: true, GPA: 0xfeed0000}, {Name: name255, UsedLength: 1 << 40, HasPageSize: true, PageSize: 4096, HasGPA: true, GPA: 1<<64 - 4096}}},
		"MEMSIZE max blocks":     MemSize{Seq: 5, Blocks: maxBlocks},
		"MEMSIZE largest":        MemSize{Seq: 5, Blocks: []Block{{Name: "x", UsedLength: 1<<64 - 4096}}},
		"SECTION_END":            SectionEnd{Seq: 6, ID: 2},
		"SECTION_END max":        SectionEnd{Seq: 1<<64 - 1, ID: 0xffffffff},
		"COMMAND empty":          Command{Seq: 7, Cmd: 1},
		"COMMAND max":            Command{Seq: 7, Cmd: 0xffff, Payload: filled(0xffff, 2)},
		"DEVICE empty":           deviceAppender{Seq: 8},
		"DEVICE":                 deviceAppender{Seq: 8, Data: filled(3000, 3)},
		"DEVICE max":             deviceAppender{Seq: 8, Data: filled(MaxPayload-8, 4)},
		"END":                    End{Seq: 9},
		"END empty vmdesc":       End{Seq: 9, HasVMDesc: true},
		"END vmdesc":             End{Seq: 9, HasVMDesc: true, VMDesc: []byte(`{"page_size":4096,"devices":[]}`)},
		"END 16 MiB vmdesc":      End{Seq: 9, HasVMDesc: true, VMDesc: filled(16<<20, 5)},
		"END urgent count":       End{Seq: 9, HasUrgent: true, Urgent: 4096},
		"END no urgent":          End{Seq: 9, HasUrgent: true},
		"SECTION START seq zero": Section{Seq: 0, Type: StartSection, ID: 1, Idstr: "timer"},
	}
}

// TestDataFrameRoundTrip: every data frame goes Append → Framer.WriteFrame → ReadFrame → Parse
// and comes back equal; WriteFrame makes the same bytes as Append.
func TestDataFrameRoundTrip(t *testing.T) {
	for name, want := range dataFrameCases() {
		t.Run(name, func(t *testing.T) {
			enc := want.Append([]byte("prefix"))[len("prefix"):]
			ft := FrameType(enc[0])
			if !ft.IsData() || int(binary.BigEndian.Uint32(enc[1:])) != len(enc)-HeaderSize {
				t.Fatalf("header % x for %d bytes", enc[:HeaderSize], len(enc))
			}
			var buf bytes.Buffer
			if err := NewFramer("w", nil, &buf).WriteFrame(ft, enc[HeaderSize:]); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf.Bytes(), enc) {
				t.Fatal("WriteFrame and Append encode differently")
			}
			f, err := NewFramer("r", &buf, nil).ReadFrame()
			if err != nil {
				t.Fatal(err)
			}
			got, err := parseData(f.Type, f.Payload)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(normalize(got), normalize(want)) {
				t.Fatalf("decoded %.300s", fmt.Sprintf("%+v", got))
			}
			if f.Seq() != reflect.ValueOf(want).FieldByName("Seq").Uint() {
				t.Errorf("Frame.Seq() = %d", f.Seq())
			}
		})
	}
}

// TestEndMaxPayload: END with a 16 MiB vmdesc is the largest frame; one more byte is refused by
// both ends of a Framer.
func TestEndMaxPayload(t *testing.T) {
	b := End{Seq: 1, HasVMDesc: true, VMDesc: make([]byte, 16<<20)}.Append(nil)
	if len(b)-HeaderSize != MaxEndPayload {
		t.Fatalf("END payload %d, MaxEndPayload %d", len(b)-HeaderSize, MaxEndPayload)
	}
	if err := NewFramer("w", nil, &bytes.Buffer{}).WriteFrame(FrameEnd, append(b[HeaderSize:], 0)); !errors.Is(err, ErrFrameTooLarge) {
		t.Errorf("WriteFrame of END + 1: %v", err)
	}
	over := End{Seq: 1, HasVMDesc: true, VMDesc: make([]byte, 16<<20+1)}.Append(nil)
	if _, err := NewFramer("r", bytes.NewReader(over), nil).ReadFrame(); !errors.Is(err, ErrFrameTooLarge) {
		t.Errorf("ReadFrame of END + 1: %v", err)
	}
}

// payload builds a data frame payload from fields: uint8, uint16, uint32, uint64, string
// (raw bytes) and []byte.
func payload(fields ...any) []byte {
	var b []byte
	for _, f := range fields {
		switch v := f.(type) {
		case uint8:
			b = append(b, v)
		case uint16:
			b = binary.BigEndian.AppendUint16(b, v)
		case uint32:
			b = binary.BigEndian.AppendUint32(b, v)
		case uint64:
			b = binary.BigEndian.AppendUint64(b, v)
		case string:
			b = append(b, v...)
		case []byte:
			b = append(b, v...)
		default:
			panic(fmt.Sprintf("payload: %T", f))
		}
	}
	return b
}

// TestDataFrameRefusals: what the decoders refuse, and that they say what and where.
func TestDataFrameRefusals(t *testing.T) {
	seq := uint64(7)
	u8, u16, u32 := func(v int) uint8 { return uint8(v) }, func(v int) uint16 { return uint16(v) }, func(v int) uint32 { return uint32(v) }
	block := func(name string, used uint64, flags uint8) []byte {
		return payload(u8(len(name)), name, used, flags)
	}
	manyBlocks := payload(seq, u16(MaxBlocks+1))
	for range MaxBlocks + 1 {
		manyBlocks = append(manyBlocks, block("b", 4096, 0)...)
	}
	for _, tc := range []struct {
		name  string
		t     FrameType
		p     []byte
		want  string
		short bool // errShort is wrapped
	}{
		// Every data frame starts with its sequence number.
		{"BEGIN no seq", FrameBegin, []byte{1, 2, 3}, "sequence number at payload offset 0", true},
		{"SECTION no seq", FrameSection, nil, "sequence number", true},
		{"MEMSIZE no seq", FrameMemSize, make([]byte, 7), "sequence number", true},
		{"SECTION_END no seq", FrameSectionEnd, nil, "sequence number", true},
		{"COMMAND no seq", FrameCommand, nil, "sequence number", true},
		{"DEVICE no seq", FrameDevice, make([]byte, 7), "sequence number", true},
		{"END no seq", FrameEnd, make([]byte, 7), "sequence number", true},

		{"BEGIN short", FrameBegin, payload(seq, u32(0x5145564d)), "version at payload offset 12", true},
		{"SECTION no type", FrameSection, payload(seq), "section type at payload offset 8", true},
		{"SECTION no id", FrameSection, payload(seq, u8(2), u16(0)), "section id at payload offset 9", true},
		{"SECTION type 0", FrameSection, payload(seq, u8(0), u32(1)), "section type 0", false},
		{"SECTION type 4", FrameSection, payload(seq, u8(4), u32(1)), "section type 4", false},
		{"SECTION empty idstr", FrameSection, payload(seq, u8(1), u32(1), u8(0), u32(0), u32(4)), "empty idstr at payload offset 13", false},
		{"SECTION idstr past end", FrameSection, payload(seq, u8(1), u32(1), u8(10), "ram"), "idstr at payload offset 14", true},
		{"SECTION START no version", FrameSection, payload(seq, u8(1), u32(1), u8(3), "ram", u32(0)), "version at payload offset", true},
		{"SECTION PART trailing", FrameSection, payload(seq, u8(2), u32(1), u8(0)), "1 bytes after the last field", false},
		{"SECTION START trailing", FrameSection, payload(seq, u8(1), u32(1), u8(3), "ram", u32(0), u32(4), "xy"), "2 bytes after the last field", false},
		{"MEMSIZE no count", FrameMemSize, payload(seq, u8(0)), "block count", true},
		{"MEMSIZE too many", FrameMemSize, manyBlocks, "1025 blocks (at most 1024)", false},
		{"MEMSIZE count past data", FrameMemSize, payload(seq, u16(2), block("pc.ram", 4096, 0)), "block name length", true},
		{"MEMSIZE empty name", FrameMemSize, payload(seq, u16(1), block("", 4096, 0)), "empty block name", false},
		{"MEMSIZE unknown flags", FrameMemSize, payload(seq, u16(1), block("pc.ram", 4096, 4)), `block "pc.ram": unknown flags 0x4`, false},
		{"MEMSIZE zero length", FrameMemSize, payload(seq, u16(1), block("pc.ram", 0, 0)), `block "pc.ram" with length 0x0`, false},
		{"MEMSIZE unaligned", FrameMemSize, payload(seq, u16(1), block("pc.ram", 0x1001, 0)), "with length 0x1001", false},
		{"MEMSIZE total overflows", FrameMemSize, payload(seq, u16(2), block("a", 1<<63, 0), block("b", 1<<63, 0)), `block "b" with length 0x8000000000000000`, false},
		{"MEMSIZE no page size", FrameMemSize, payload(seq, u16(1), block("pc.ram", 4096, 1)), "page size at payload offset", true},
		{"MEMSIZE no GPA", FrameMemSize, payload(seq, u16(1), block("pc.ram", 4096, 3), uint64(4096)), "GPA at payload offset", true},
		{"MEMSIZE trailing", FrameMemSize, payload(seq, u16(1), block("pc.ram", 4096, 0), u8(0)), "1 bytes after the last field", false},
		{"SECTION_END short", FrameSectionEnd, payload(seq, u16(1)), "section id", true},
		{"SECTION_END trailing", FrameSectionEnd, payload(seq, u32(1), u8(1)), "1 bytes after the last field", false},
		{"COMMAND no command", FrameCommand, payload(seq, u8(1)), "command at payload offset 8", true},
		{"COMMAND payload too long", FrameCommand, payload(seq, u16(2), make([]byte, 0x10000)), "command payload of 65536 bytes", false},
		{"END no flags", FrameEnd, payload(seq), "flags at payload offset 8", true},
		{"END unknown flags", FrameEnd, payload(seq, u8(4)), "unknown END flags 0x4", false},
		{"END short urgent count", FrameEnd, payload(seq, u8(2), u32(1)), "urgent count at payload offset 9", true},
		{"END vmdesc without flag", FrameEnd, payload(seq, u8(0), "{}"), "vmdesc bytes without the vmdesc flag", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseData(tc.t, tc.p)
			if err == nil {
				t.Fatalf("% x accepted", tc.p)
			}
			if !strings.HasPrefix(err.Error(), tc.t.String()+": ") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%q, want %v: …%s…", err, tc.t, tc.want)
			}
			if errors.Is(err, errShort) != tc.short {
				t.Errorf("%q: wraps errShort = %v", err, !tc.short)
			}
		})
	}
}

// TestSectionLongIdstr: QEMU's idstr is at most 255 bytes (a u8 length); Append does not check,
// but what it makes of a longer one is refused, never read as another section.
func TestSectionLongIdstr(t *testing.T) {
	for _, n := range []int{256, 257, 300, 511, 512, 1000} {
		b := Section{Seq: 1, Type: StartSection, ID: 1, Idstr: strings.Repeat("i", n)}.Append(nil)
		if s, err := ParseSection(b[HeaderSize:]); err == nil {
			t.Errorf("idstr of %d bytes decoded as %+v", n, s)
		}
	}
}
