package compat

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// This file generates the compatibility suite's test guests: raw 512-byte
// x86 boot sectors that SeaBIOS loads at 0x7c00 and that switch to 32-bit
// flat protected mode (no paging, interrupts off) before touching memory.
// They are booted from a one-sector raw disk (virtio-blk-pci with
// cyls=1,heads=1,secs=1) and report progress on COM1 (I/O port 0x3f8).
//
// The code is emitted by a tiny x86 encoder (guestAsm) with label fix-ups so
// that the image can be reviewed instruction by instruction and new guests
// can reuse the same helpers; no assembler is needed at build or test time.

// Memory layout shared by the guests.
const (
	// GuestOrg is the address the BIOS loads the boot sector at.
	GuestOrg = 0x7c00
	// GuestPageSize is the page granularity the guests dirty and the
	// checks in memcheck.go compare at.
	GuestPageSize = 4096
	// DirtyStart and DirtyEnd bound the range [1 MiB, 100 MiB) whose pages
	// the dirty guest increments (byte 0 of each 4 KiB page).
	DirtyStart = 1 << 20
	DirtyEnd   = 100 << 20
	// FillStart is the first address the fill guest writes.
	FillStart = 1 << 20
	// FillMaxEnd caps the fill range: the guest runs 32-bit flat without
	// paging and a q35 machine maps at most 2-2.75 GiB of RAM below 4 GiB,
	// so memory above 2 GiB is neither filled nor dirtied.
	FillMaxEnd = 2 << 30
	// guestCOM1 is the I/O port of the first serial port.
	guestCOM1 = 0x3f8
)

// Serial markers written by the guests on COM1.
const (
	// GuestMarkStart ('A') is printed once, when the guest reaches 32-bit code.
	GuestMarkStart = 'A'
	// GuestMarkFilled ('F') is printed by the fill guest when phase 1 is done.
	GuestMarkFilled = 'F'
	// GuestMarkPass ('B') is printed after every full dirtying pass.
	GuestMarkPass = 'B'
)

// 32-bit general purpose register numbers as used in ModRM encodings.
const (
	guestEAX = iota
	guestECX
	guestEDX
	guestEBX
	guestESP
	guestEBP
	guestESI
	guestEDI
)

// guestALU* are the /digit extensions of the 0x81/0x83 immediate ALU group.
const (
	guestALUAdd = 0
	guestALUOr  = 1
	guestALUAnd = 4
	guestALUSub = 5
	guestALUXor = 6
	guestALUCmp = 7
)

// Condition codes for short conditional jumps (0x70+cc).
const (
	guestCCB  = 0x2 // jb / jc: unsigned below
	guestCCAE = 0x3 // jae: unsigned above or equal
	guestCCZ  = 0x4 // jz / je
	guestCCNZ = 0x5 // jnz / jne
	guestCCL  = 0xc // jl: signed less
)

type guestFixKind int

const (
	guestFixRel8  guestFixKind = iota // signed 8-bit displacement from the end of the field
	guestFixAbs16                     // 16-bit absolute address (org + offset)
	guestFixAbs32                     // 32-bit absolute address (org + offset)
	guestFixRel32                     // signed 32-bit displacement from the end of the field
)

type guestFixup struct {
	at    int
	label string
	kind  guestFixKind
}

// guestAsm is a minimal x86 encoder: a byte buffer, named labels and
// fix-ups resolved by finish. Methods emit one instruction each, in the
// encoding GNU as would choose, and say in their name which operand size
// they use; anything not covered can be emitted with raw.
type guestAsm struct {
	org    uint32
	code   []byte
	labels map[string]int
	fixups []guestFixup
	err    error
}

func newGuestAsm(org uint32) *guestAsm {
	return &guestAsm{org: org, labels: map[string]int{}}
}

// raw appends bytes verbatim.
func (a *guestAsm) raw(b ...byte) { a.code = append(a.code, b...) }

func (a *guestAsm) imm16(v uint16) { a.code = binary.LittleEndian.AppendUint16(a.code, v) }
func (a *guestAsm) imm32(v uint32) { a.code = binary.LittleEndian.AppendUint32(a.code, v) }

// label defines name at the current position.
func (a *guestAsm) label(name string) {
	if _, dup := a.labels[name]; dup && a.err == nil {
		a.err = fmt.Errorf("guest asm: duplicate label %q", name)
	}
	a.labels[name] = len(a.code)
}

// ref emits a placeholder of the given kind to be resolved to label.
func (a *guestAsm) ref(label string, kind guestFixKind) {
	a.fixups = append(a.fixups, guestFixup{at: len(a.code), label: label, kind: kind})
	switch kind {
	case guestFixRel8:
		a.raw(0)
	case guestFixAbs16:
		a.raw(0, 0)
	case guestFixAbs32, guestFixRel32:
		a.raw(0, 0, 0, 0)
	}
}

// align pads to a multiple of n with the filler GNU as uses in code
// sections (nop, or lea 0(%esi),%esi for 3 bytes).
func (a *guestAsm) align(n int) {
	pad := (n - len(a.code)%n) % n
	if pad == 3 {
		a.raw(0x8d, 0x76, 0x00)
		return
	}
	for range pad {
		a.raw(0x90)
	}
}

// finish resolves the fix-ups and returns the code.
func (a *guestAsm) finish() ([]byte, error) {
	if a.err != nil {
		return nil, a.err
	}
	for _, f := range a.fixups {
		off, ok := a.labels[f.label]
		if !ok {
			return nil, fmt.Errorf("guest asm: undefined label %q", f.label)
		}
		switch f.kind {
		case guestFixRel8:
			d := off - (f.at + 1)
			if d < -128 || d > 127 {
				return nil, fmt.Errorf("guest asm: jump to %q out of rel8 range (%d)", f.label, d)
			}
			a.code[f.at] = byte(int8(d))
		case guestFixAbs16:
			binary.LittleEndian.PutUint16(a.code[f.at:], uint16(a.org+uint32(off)))
		case guestFixAbs32:
			binary.LittleEndian.PutUint32(a.code[f.at:], a.org+uint32(off))
		case guestFixRel32:
			binary.LittleEndian.PutUint32(a.code[f.at:], uint32(int32(off-(f.at+4))))
		}
	}
	return a.code, nil
}

// --- 16-bit real mode ---

// cli disables interrupts.
func (a *guestAsm) cli() { a.raw(0xfa) }

// lgdt16 loads the GDTR from the 6-byte descriptor at label (16-bit addressing).
func (a *guestAsm) lgdt16(label string) {
	a.raw(0x0f, 0x01, 0x16)
	a.ref(label, guestFixAbs16)
}

// movEAXImm16 is "mov $imm,%eax" in 16-bit code (operand-size prefix).
func (a *guestAsm) movEAXImm16(imm uint32) {
	a.raw(0x66, 0xb8)
	a.imm32(imm)
}

// movCR0EAX is "mov %eax,%cr0".
func (a *guestAsm) movCR0EAX() { a.raw(0x0f, 0x22, 0xc0) }

// ljmpl16 is "ljmpl $sel,$label" from 16-bit code into 32-bit code.
func (a *guestAsm) ljmpl16(sel uint16, label string) {
	a.raw(0x66, 0xea)
	a.ref(label, guestFixAbs32)
	a.imm16(sel)
}

// --- 32-bit protected mode ---

// movImm32 is "mov $imm,%reg".
func (a *guestAsm) movImm32(reg int, imm uint32) {
	a.raw(0xb8 + byte(reg))
	a.imm32(imm)
}

// movImmLabel32 is "mov $label,%reg" (absolute address of label).
func (a *guestAsm) movImmLabel32(reg int, label string) {
	a.raw(0xb8 + byte(reg))
	a.ref(label, guestFixAbs32)
}

// movSregEAX is "mov %ax,%sreg" for sreg in es=0,cs=1,ss=2,ds=3,fs=4,gs=5.
func (a *guestAsm) movSregEAX(sreg int) { a.raw(0x8e, 0xc0|byte(sreg)<<3) }

// movDXImm16 is "mov $imm,%dx" in 32-bit code.
func (a *guestAsm) movDXImm16(imm uint16) {
	a.raw(0x66, 0xba)
	a.imm16(imm)
}

// movALImm is "mov $imm,%al".
func (a *guestAsm) movALImm(imm byte) { a.raw(0xb0, imm) }

// outDXAL is "out %al,(%dx)".
func (a *guestAsm) outDXAL() { a.raw(0xee) }

// modrmReg emits a register-direct ModRM byte.
func (a *guestAsm) modrmReg(reg, rm int) { a.raw(0xc0 | byte(reg)<<3 | byte(rm)) }

// movRR is "mov %src,%dst".
func (a *guestAsm) movRR(dst, src int) {
	a.raw(0x89)
	a.modrmReg(src, dst)
}

// aluRR is a register-register ALU op ("op %src,%dst"), op being a guestALU* code.
func (a *guestAsm) aluRR(op, dst, src int) {
	a.raw(byte(op)<<3 | 0x01)
	a.modrmReg(src, dst)
}

// aluImm32 is "op $imm,%reg" with GNU as' choice of encoding: the sign-extended
// imm8 form when it fits, else the short %eax form, else 0x81 /op imm32.
func (a *guestAsm) aluImm32(op, reg int, imm uint32) {
	switch {
	case int32(imm) >= -128 && int32(imm) <= 127:
		a.raw(0x83)
		a.modrmReg(op, reg)
		a.raw(byte(imm))
	case reg == guestEAX:
		a.raw(byte(op)<<3 | 0x05)
		a.imm32(imm)
	default:
		a.raw(0x81)
		a.modrmReg(op, reg)
		a.imm32(imm)
	}
}

// cmpALImm is "cmp $imm,%al".
func (a *guestAsm) cmpALImm(imm byte) { a.raw(0x3c, imm) }

// shift32 is "shl/shr $n,%reg" (ext 4 = shl, 5 = shr).
func (a *guestAsm) shift32(ext, reg int, n byte) {
	if n == 1 {
		a.raw(0xd1)
		a.modrmReg(ext, reg)
		return
	}
	a.raw(0xc1)
	a.modrmReg(ext, reg)
	a.raw(n)
}

func (a *guestAsm) shl32(reg int, n byte) { a.shift32(4, reg, n) }
func (a *guestAsm) shr32(reg int, n byte) { a.shift32(5, reg, n) }

// imulImm32 is "imul $imm,%src,%dst".
func (a *guestAsm) imulImm32(dst, src int, imm uint32) {
	a.raw(0x69)
	a.modrmReg(dst, src)
	a.imm32(imm)
}

// incR32 / decR32 are "inc %reg" / "dec %reg" (one-byte forms).
func (a *guestAsm) incR32(reg int) { a.raw(0x40 + byte(reg)) }
func (a *guestAsm) decR32(reg int) { a.raw(0x48 + byte(reg)) }

// incbMem is "incb (%reg)" (reg not esp/ebp).
func (a *guestAsm) incbMem(reg int) { a.raw(0xfe, byte(reg)) }

// inclMem is "incl (%reg)" (reg not esp/ebp).
func (a *guestAsm) inclMem(reg int) { a.raw(0xff, byte(reg)) }

// movMemDisp8R is "mov %src,disp8(%base)" (base not esp).
func (a *guestAsm) movMemDisp8R(base int, disp int8, src int) {
	a.raw(0x89, 0x40|byte(src)<<3|byte(base), byte(disp))
}

// movRMemDisp8 is "mov disp8(%base),%dst" (base not esp).
func (a *guestAsm) movRMemDisp8(dst, base int, disp int8) {
	a.raw(0x8b, 0x40|byte(dst)<<3|byte(base), byte(disp))
}

// movMemDisp32R is "mov %src,disp32(%base)" (base not esp).
func (a *guestAsm) movMemDisp32R(base int, disp int32, src int) {
	a.raw(0x89, 0x80|byte(src)<<3|byte(base))
	a.imm32(uint32(disp))
}

// cld clears the direction flag; stosl is "stos %eax,%es:(%edi)";
// repMovsl is "rep movsl"; hlt halts.
func (a *guestAsm) cld()      { a.raw(0xfc) }
func (a *guestAsm) stosl()    { a.raw(0xab) }
func (a *guestAsm) repMovsl() { a.raw(0xf3, 0xa5) }
func (a *guestAsm) hlt()      { a.raw(0xf4) }

// jcc8 is a short conditional jump to label.
func (a *guestAsm) jcc8(cc byte, label string) {
	a.raw(0x70 + cc)
	a.ref(label, guestFixRel8)
}

// jcc32 is a near conditional jump to label (rel32).
func (a *guestAsm) jcc32(cc byte, label string) {
	a.raw(0x0f, 0x80+cc)
	a.ref(label, guestFixRel32)
}

// jmp8 is a short unconditional jump to label.
func (a *guestAsm) jmp8(label string) {
	a.raw(0xeb)
	a.ref(label, guestFixRel8)
}

// guestEnterPM32 emits the common real-mode prologue: load the flat GDT
// emitted by guestGDT, set CR0.PE, far-jump to 32-bit code and load the
// data segment registers with the flat data selector. Interrupts stay off.
func guestEnterPM32(a *guestAsm) {
	a.cli()
	a.lgdt16("gdtdesc")
	a.movEAXImm16(1)
	a.movCR0EAX()
	a.ljmpl16(8, "pm32")
	a.label("pm32")
	a.movImm32(guestEAX, 16)
	for _, sreg := range []int{3, 0, 4, 5, 2} { // ds, es, fs, gs, ss
		a.movSregEAX(sreg)
	}
}

// guestGDT emits the 8-byte aligned flat GDT (null, 4 GiB code at
// selector 8, 4 GiB data at selector 16) and its descriptor.
func guestGDT(a *guestAsm) {
	a.align(8)
	a.label("gdt")
	for _, d := range []uint64{0, 0x00cf9a000000ffff, 0x00cf92000000ffff} {
		a.code = binary.LittleEndian.AppendUint64(a.code, d)
	}
	a.label("gdtdesc")
	a.imm16(23)
	a.ref("gdt", guestFixAbs32)
}

// guestBootSector pads code to 510 bytes and appends the 0x55AA signature.
func guestBootSector(code []byte) ([]byte, error) {
	if len(code) > 510 {
		return nil, fmt.Errorf("guest code is %d bytes, more than the 510 a boot sector holds", len(code))
	}
	img := make([]byte, 512)
	copy(img, code)
	img[510], img[511] = 0x55, 0xaa
	return img, nil
}

// GuestDirty returns the `dirty` guest: a 512-byte boot sector that enters
// 32-bit protected mode, prints 'A' on COM1 and then loops forever
// incrementing byte 0 of every 4 KiB page in [DirtyStart, DirtyEnd),
// printing 'B' after every full pass (like QEMU's migration-test guest).
// Memory dumps of it are verified with CheckDirty. It needs at least
// 100 MiB of guest RAM (use 128 MiB). The bytes are identical to those of
// shared/tools/mkguest.py.
func GuestDirty() []byte {
	a := newGuestAsm(GuestOrg)
	guestEnterPM32(a)
	a.movDXImm16(guestCOM1)
	a.movALImm(GuestMarkStart)
	a.outDXAL()
	a.label("mainloop")
	a.movImm32(guestEAX, DirtyStart)
	a.label("inner")
	a.incbMem(guestEAX)
	a.aluImm32(guestALUAdd, guestEAX, GuestPageSize)
	a.aluImm32(guestALUCmp, guestEAX, DirtyEnd)
	a.jcc8(guestCCL, "inner")
	a.movALImm(GuestMarkPass)
	a.outDXAL()
	a.jmp8("mainloop")
	guestGDT(a)
	code, err := a.finish()
	if err != nil {
		panic(err) // fixed program: cannot happen
	}
	img, err := guestBootSector(code)
	if err != nil {
		panic(err)
	}
	return img
}

// FillOptions configures GuestFill.
type FillOptions struct {
	// MemBytes is the guest RAM size. The fill covers
	// [FillStart, min(MemBytes, FillMaxEnd)): the guest runs 32-bit flat
	// without paging and q35 maps at most 2-2.75 GiB below 4 GiB.
	MemBytes uint64
	// DirtyEvery N > 0 makes the guest, once filled, increment the 32-bit
	// word at offset 0 of every Nth page of the fill range (pages
	// FillStart/4096 + k*N) in a loop, printing 'B' after each pass.
	// 0 means no dirtying: the guest halts after printing 'F'.
	DirtyEvery int
	// Seed varies the page kinds and the pseudo-random contents.
	Seed uint32
}

// FillEnd returns the end (exclusive) of the fill range for opt.
func (opt FillOptions) FillEnd() uint64 { return min(opt.MemBytes, FillMaxEnd) }

// fillPages returns the first page index and the end page index of the
// fill range.
func (opt FillOptions) fillPages() (first, end int) {
	return FillStart / GuestPageSize, int(opt.FillEnd() / GuestPageSize)
}

// FillTouched reports whether the phase-2 loop of the fill guest increments
// the counter of page i (an absolute page number, address/4096).
func (opt FillOptions) FillTouched(i int) bool {
	first, end := opt.fillPages()
	return opt.DirtyEvery > 0 && i >= first && i < end && (i-first)%opt.DirtyEvery == 0
}

// FillKind is what the fill guest writes into a page.
type FillKind int

const (
	// FillZero pages are written with zeros. (They are written rather than
	// left untouched because SeaBIOS leaves data in some pages above
	// 1 MiB, near the top of RAM, which would make dumps unpredictable.)
	FillZero FillKind = iota
	// FillText pages hold a repeated ASCII phrase, rotated by the page
	// index, with the page index as a little-endian word at offset 4.
	FillText
	// FillRandom pages hold xorshift32 output seeded from Seed ^ index.
	FillRandom
)

func (k FillKind) String() string {
	switch k {
	case FillZero:
		return "zero"
	case FillText:
		return "text"
	case FillRandom:
		return "random"
	}
	return fmt.Sprintf("FillKind(%d)", int(k))
}

// Constants of the fill algorithm, shared by the guest and the Go model.
const (
	guestFillHashMul = 0x9e3779b1
	// guestFillPhrase is the text pattern: 32 bytes, i.e. 8 words.
	guestFillPhrase = "The quick brown fox jumps over. "
)

// guestFillTemplate is the phrase repeated over a page and one more phrase,
// as the guest builds it: text pages are 4096-byte windows of it.
var guestFillTemplate = func() []byte {
	t := make([]byte, 0, GuestPageSize+len(guestFillPhrase))
	for len(t) < cap(t) {
		t = append(t, guestFillPhrase...)
	}
	return t
}()

// guestFillHash is the page-kind hash: h = (i ^ seed) * golden; h ^= h >> 16.
func guestFillHash(i int, seed uint32) uint32 {
	h := (uint32(i) ^ seed) * guestFillHashMul
	return h ^ h>>16
}

// FillPageKind is the Go model of the kind the fill guest gives page i
// (absolute page number): h&7 in {0,1} zero (1/4), {2,3,4} text (3/8),
// {5,6,7} random (3/8), h being guestFillHash.
func FillPageKind(i int, seed uint32) FillKind {
	switch k := guestFillHash(i, seed) & 7; {
	case k < 2:
		return FillZero
	case k < 5:
		return FillText
	default:
		return FillRandom
	}
}

// FillPage is the Go model of the content the fill guest's phase 1 writes to
// page i (absolute page number); dst must hold at least 4096 bytes and is
// overwritten (zeroed for zero pages).
func FillPage(i int, seed uint32, dst []byte) {
	dst = dst[:GuestPageSize]
	switch FillPageKind(i, seed) {
	case FillZero:
		clear(dst)
	case FillText:
		rot := (i & 7) * 4
		copy(dst, guestFillTemplate[rot:])
		binary.LittleEndian.PutUint32(dst[4:], uint32(i))
	case FillRandom:
		x := uint32(i) ^ seed
		if x == 0 {
			x = 1
		}
		for j := 0; j < GuestPageSize; j += 4 {
			x ^= x << 13
			x ^= x >> 17
			x ^= x << 5
			binary.LittleEndian.PutUint32(dst[j:], x)
		}
	}
}

// GuestFill returns the `fill` guest, used for throughput figures: a boot
// sector that enters the same 32-bit protected mode as GuestDirty, prints
// 'A', fills every 4 KiB page of [FillStart, opt.FillEnd()) as FillPage
// describes (a mix of zero, text-like and pseudo-random pages standing in
// for a real VM's memory), prints 'F', then either halts (DirtyEvery 0) or
// loops incrementing the 32-bit word at offset 0 of every DirtyEvery-th page
// and printing 'B' after each pass. Memory dumps of it are verified with
// CheckFill.
//
// Below 1 MiB the guest also writes its text template, the phrase
// replicated over [GuestOrg+0x200, GuestOrg+0x1220). It needs no stack and
// runs with interrupts off; with DirtyEvery 0 it ends in hlt.
func GuestFill(opt FillOptions) ([]byte, error) {
	end := opt.FillEnd()
	if end < FillStart+GuestPageSize {
		return nil, fmt.Errorf("fill guest: MemBytes %d leaves nothing above 1 MiB to fill", opt.MemBytes)
	}
	if end%GuestPageSize != 0 {
		return nil, fmt.Errorf("fill guest: MemBytes %d is not a multiple of 4 KiB", opt.MemBytes)
	}
	if opt.DirtyEvery < 0 || opt.DirtyEvery > 1<<19 {
		return nil, errors.New("fill guest: DirtyEvery must be in [0, 2^19]")
	}
	first, last := opt.fillPages()
	const tmpl = GuestOrg + 0x200 // text template: phrase replicated over 4096+32 bytes

	a := newGuestAsm(GuestOrg)
	guestEnterPM32(a)
	a.cld()
	a.movDXImm16(guestCOM1)
	a.movALImm(GuestMarkStart)
	a.outDXAL()

	// Text template: copy the phrase to tmpl, then an overlapping forward
	// rep movsl replicates it over the following 4096 bytes.
	a.movImmLabel32(guestESI, "phrase")
	a.movImm32(guestEDI, tmpl)
	a.movImm32(guestECX, 8)
	a.repMovsl()
	a.movImm32(guestESI, tmpl)
	a.movImm32(guestECX, GuestPageSize/4)
	a.repMovsl()

	// Phase 1. %ebp = page index, %edi = page address.
	a.movImm32(guestEBP, uint32(first))
	a.label("fill")
	a.movRR(guestEDI, guestEBP)
	a.shl32(guestEDI, 12)
	a.movRR(guestEAX, guestEBP)
	a.aluImm32(guestALUXor, guestEAX, opt.Seed)
	a.movRR(guestEBX, guestEAX) // keep i ^ seed: the xorshift seed
	a.imulImm32(guestEAX, guestEAX, guestFillHashMul)
	a.movRR(guestECX, guestEAX)
	a.shr32(guestECX, 16)
	a.aluRR(guestALUXor, guestEAX, guestECX)
	a.aluImm32(guestALUAnd, guestEAX, 7)
	a.cmpALImm(2)
	a.jcc32(guestCCB, "zero")
	a.cmpALImm(5)
	a.jcc8(guestCCB, "text")

	// Random page: xorshift32 from %eax = i ^ seed (0 -> 1; the hash makes
	// such pages zero pages anyway), unrolled to 4 words per iteration.
	a.movRR(guestEAX, guestEBX)
	a.aluRR(guestALUOr, guestEAX, guestEAX) // test for zero
	a.jcc8(guestCCNZ, "seeded")
	a.incR32(guestEAX)
	a.label("seeded")
	a.movImm32(guestECX, GuestPageSize/16)
	a.label("rnd")
	for range 4 {
		for _, s := range []struct {
			left bool
			n    byte
		}{{true, 13}, {false, 17}, {true, 5}} {
			a.movRR(guestEBX, guestEAX)
			if s.left {
				a.shl32(guestEBX, s.n)
			} else {
				a.shr32(guestEBX, s.n)
			}
			a.aluRR(guestALUXor, guestEAX, guestEBX)
		}
		a.stosl()
	}
	a.decR32(guestECX)
	a.jcc8(guestCCNZ, "rnd")
	a.jmp8("next")

	// Text page: copy the template rotated by (i&7) words, then store i at
	// offset 4 (%edi has advanced past the page).
	a.label("text")
	a.movRR(guestESI, guestEBP)
	a.aluImm32(guestALUAnd, guestESI, 7)
	a.shl32(guestESI, 2)
	a.aluImm32(guestALUAdd, guestESI, tmpl)
	// Unrolled 32-bit moves rather than rep movsl, which QEMU 7.2's TCG
	// runs one iteration per translation-block execution (~3x slower).
	a.movImm32(guestECX, GuestPageSize/32)
	a.label("tcopy")
	for j := range 8 {
		a.movRMemDisp8(guestEAX, guestESI, int8(4*j))
		a.movMemDisp8R(guestEDI, int8(4*j), guestEAX)
	}
	a.aluImm32(guestALUAdd, guestESI, 32)
	a.aluImm32(guestALUAdd, guestEDI, 32)
	a.decR32(guestECX)
	a.jcc8(guestCCNZ, "tcopy")
	a.movMemDisp32R(guestEDI, -(GuestPageSize - 4), guestEBP)
	a.jmp8("next")

	// Zero page: written with zeros, as firmware leaves data in some pages
	// (SeaBIOS: ~40 pages just below the top of RAM and of RAM-16 MiB).
	a.label("zero")
	a.aluRR(guestALUXor, guestEAX, guestEAX)
	a.movImm32(guestECX, GuestPageSize/32)
	a.label("zloop")
	for j := range 8 {
		a.movMemDisp8R(guestEDI, int8(4*j), guestEAX)
	}
	a.aluImm32(guestALUAdd, guestEDI, 32)
	a.decR32(guestECX)
	a.jcc8(guestCCNZ, "zloop")

	a.label("next")
	a.incR32(guestEBP)
	a.aluImm32(guestALUCmp, guestEBP, uint32(last))
	a.jcc32(guestCCB, "fill")
	a.movALImm(GuestMarkFilled)
	a.outDXAL()

	if opt.DirtyEvery == 0 {
		a.label("halt")
		a.hlt()
		a.jmp8("halt")
	} else {
		// Phase 2: increment the word at offset 0 of pages first, first+N, ...
		a.label("pass")
		a.movImm32(guestEAX, FillStart)
		a.label("dirty")
		a.inclMem(guestEAX)
		a.aluImm32(guestALUAdd, guestEAX, uint32(opt.DirtyEvery)*GuestPageSize)
		a.aluImm32(guestALUCmp, guestEAX, uint32(end))
		a.jcc8(guestCCB, "dirty")
		a.movALImm(GuestMarkPass)
		a.outDXAL()
		a.jmp8("pass")
	}

	guestGDT(a)
	a.label("phrase")
	a.raw([]byte(guestFillPhrase)...)
	code, err := a.finish()
	if err != nil {
		return nil, err
	}
	return guestBootSector(code)
}
