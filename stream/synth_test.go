package stream

import (
	"bytes"
	"compress/zlib"
)

type synthStream struct {
	name string
	data []byte
	opts []Option
}

// build runs fn on a fresh Writer and returns the bytes.
func build(fn func(w *Writer)) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	fn(w)
	if err := w.Flush(); err != nil {
		panic(err)
	}
	return buf.Bytes()
}

func zlibPage(page []byte) []byte {
	var b bytes.Buffer
	zw, _ := zlib.NewWriterLevel(&b, 1)
	zw.Write(page)
	zw.Close()
	return b.Bytes()
}

// devBody is a fake vmstate body containing footer-like bytes to exercise footer scanning.
var devBody = []byte{0x00, 0x01, 0x7e, 0x00, 0x00, 0x00, 0x05, 0xff, 0x05, 0x02, 'x', 'y', 0, 0, 0, 1, 0x11}

// syntheticStreams returns small hand-built streams covering the record types the idle
// captures do not contain.
func syntheticStreams() []synthStream {
	page := bytes.Repeat([]byte{0xA5}, 4096)
	old := make([]byte, 4096)
	newp := append([]byte(nil), old...)
	copy(newp[100:], "hello")
	newp[4000] = 9
	delta := make([]byte, 4096)
	dn, _ := XBZRLEEncode(old, newp, delta)
	delta = delta[:dn]
	hdr := func(w *Writer, caps ...string) {
		w.WriteHeader()
		c := &Configuration{Machine: "pc-q35-7.2"}
		if len(caps) > 0 {
			c.HasCapabilities, c.Capabilities = true, caps
		}
		w.WriteConfiguration(c)
	}
	ramStart := func(w *Writer, blocks ...RAMBlock) {
		w.WriteSectionHeader(SectionStart, 2, "ram", 0, 4)
		w.WriteMemSize(blocks)
		w.WriteEOS()
		w.WriteFooter(2)
	}
	std := []RAMBlock{{Name: "pc.ram", UsedLength: 1 << 20}, {Name: "pc.rom", UsedLength: 0x20000}}
	tail := func(w *Writer, vmdesc bool) {
		w.WriteFullSection(5, "dev", 0, 1, devBody)
		w.WriteFullSection(6, "0000:00:1f.0/other", 1, 3, []byte{1, 2, 3})
		w.WriteEOF()
		if vmdesc {
			w.WriteVMDesc([]byte(`{"page_size": 4096, "devices": []}`))
		}
	}
	return []synthStream{
		{name: "xbzrle", data: build(func(w *Writer) {
			hdr(w)
			ramStart(w, std...)
			w.WriteSectionHeader(SectionPart, 2, "", 0, 0)
			w.WritePage(0, "pc.ram", old)
			w.WriteXBZRLE(RAMXBZRLE|RAMContinue, 0, "pc.ram", delta)
			w.WriteEOS()
			w.WriteFooter(2)
			w.WriteEOF()
		})},
		{name: "compress", data: build(func(w *Writer) {
			hdr(w)
			ramStart(w, std...)
			w.WriteSectionHeader(SectionEnd, 2, "", 0, 0)
			w.WriteCompressedPage(RAMCompressPage, 0x1000, "pc.ram", zlibPage(page))
			w.WriteCompressedPage(RAMCompressPage|RAMContinue, 0x2000, "pc.ram", zlibPage(newp))
			w.WriteEOS()
			w.WriteFooter(2)
			w.WriteEOF()
		})},
		{name: "multifd-flush", data: build(func(w *Writer) {
			hdr(w)
			w.WriteSectionHeader(SectionStart, 1, "ram", 0, 4)
			w.WriteMemSize(std)
			w.WriteMultifdFlush()
			w.WriteEOS()
			w.WriteFooter(1)
			w.WriteCommand(CmdSwitchoverStart, nil)
			w.WriteSectionHeader(SectionEnd, 1, "", 0, 0)
			w.WriteMultifdFlush()
			w.WriteEOS()
			w.WriteFooter(1)
			w.WriteEOF()
		})},
		{name: "continue-across-sections", data: build(func(w *Writer) {
			hdr(w)
			ramStart(w, std...)
			w.WriteSectionHeader(SectionPart, 2, "", 0, 0)
			w.WriteZero(RAMZero, 0, "pc.rom", 0)
			w.WriteEOS()
			w.WriteFooter(2)
			w.WriteSectionHeader(SectionEnd, 2, "", 0, 0)
			w.WriteRAMPage(RAMPage|RAMContinue, 0x1000, "pc.rom", page)
			w.WriteZero(RAMZero|RAMContinue, 0x2000, "pc.rom", 0)
			w.WriteEOS()
			w.WriteFooter(2)
			tail(w, true)
		})},
		{name: "x-ignore-shared", data: build(func(w *Writer) {
			hdr(w, CapXIgnoreShared)
			ramStart(w, RAMBlock{Name: "pc.ram", UsedLength: 1 << 20, HasGPA: true, GPA: 0},
				RAMBlock{Name: "pc.bios", UsedLength: 0x40000, HasGPA: true, GPA: 0xfffc0000})
			w.WriteSectionHeader(SectionEnd, 2, "", 0, 0)
			w.WriteEOS()
			w.WriteFooter(2)
			tail(w, true)
		})},
		{name: "packaged", data: build(func(w *Writer) {
			hdr(w)
			w.WriteCommand(CmdOpenReturnPath, nil)
			w.WriteCommand(CmdPing, []byte{0, 0, 0, 1})
			w.WriteCommand(CmdPostcopyAdvise, []byte{0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0})
			ramStart(w, std...)
			w.WriteSectionHeader(SectionPart, 2, "", 0, 0)
			w.WriteZero(RAMZero, 0, "pc.ram", 0)
			w.WriteEOS()
			w.WriteFooter(2)
			w.WriteCommand(CmdPostcopyRAMDiscard, append(append([]byte{0, 6}, "pc.ram"...), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0))
			w.BeginPackage()
			w.WriteCommand(CmdPostcopyListen, nil)
			w.WriteFullSection(5, "dev", 0, 1, devBody)
			w.WriteFullSection(6, "globalstate", 0, 1, []byte{0, 0, 0, 8, 'r', 'u', 'n', 'n', 'i', 'n', 'g', 0})
			w.WriteCommand(CmdPing, []byte{0, 0, 0, 3})
			w.WriteCommand(CmdPostcopyRun, nil)
			w.EndPackage()
			w.WriteSectionHeader(SectionEnd, 2, "", 0, 0)
			w.WriteRAMPage(RAMPage|RAMContinue, 0x1000, "pc.ram", page[:4096])
			w.WriteEOS()
			w.WriteFooter(2)
			w.WriteEOF()
		})},
		{name: "uuid-pagebits", data: build(func(w *Writer) {
			w.WriteHeader()
			w.WriteConfiguration(&Configuration{Machine: "virt", HasTargetPageBits: true, TargetPageBits: 12,
				HasUUID: true, UUID: [16]byte{0x11, 0x11, 0x11, 0x11, 0x22, 0x22, 0x33, 0x33, 0x44, 0x44, 0x55, 0x55, 0x55, 0x55, 0x55, 0x55}})
			w.WriteEOF()
		})},
		{name: "full-only-no-vmdesc", data: build(func(w *Writer) {
			hdr(w)
			tail(w, false)
		})},
	}
}
