package savevm

import (
	"fmt"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// liveHandler is a live (iterative) state entry, like QEMU's SaveStateEntry with
// save_setup / save_live_iterate / save_live_complete: in relay mode each phase is fed the
// records of the source's START, PART and END sections, and decides what the destination gets.
type liveHandler interface {
	setup(rec *stream.Record) error    // START header
	iterate(rec *stream.Record) error  // PART header
	complete(rec *stream.Record) error // END header
	record(rec *stream.Record) error   // a record of the section body
	footer(rec *stream.Record) error   // the section footer
}

// recordOut is what a handler does with a record: pass it on exactly as it came, replace it
// with what it writes to a Writer, or drop it.
type recordOut interface {
	pass(rec *stream.Record) error
	// replace puts what write writes instead of rec; the Writer's CONTINUE block is reset, so a
	// replacement names its block (the destination then resolves later CONTINUE records to
	// the same block as the original would have made it).
	replace(rec *stream.Record, write func(w *stream.Writer) error) error
	drop(rec *stream.Record)
	// offset is the number of bytes produced for the destination so far.
	offset() int64
}

// handlers routes the records of the source stream to the state entry of their section and
// keeps the per-section statistics.
type handlers struct {
	r       *Relay
	out     recordOut
	live    map[uint32]liveHandler // by section id, from the START header
	current liveHandler            // handler of the section being read
	curName string
	curFrom int64
	dst72   bool // the destination is QEMU 7.2 (design.md compatibility rules)
	dst10   bool // the destination is QEMU 10.0 or newer
}

func newHandlers(r *Relay, out recordOut) *handlers {
	h := &handlers{r: r, out: out, live: map[uint32]liveHandler{},
		dst72: r.opt.DstSeries == "7.2", dst10: r.opt.DstSeries != "" && r.opt.DstSeries != "7.2"}
	if r.sections == nil {
		r.sections = map[uint32]string{}
	}
	// A resumed relay (postcopy recovery) keeps the sections the first connection started:
	// the resumed source goes on with their PART and END records.
	for id, idstr := range r.sections {
		h.live[id] = h.newLive(idstr)
	}
	return h
}

// newLive is the state entry for a live section with this idstr.
func (h *handlers) newLive(idstr string) liveHandler {
	if idstr == "ram" {
		return &ramRelay{h: h}
	}
	return &passLive{h: h}
}

func (h *handlers) handle(rec *stream.Record) error {
	switch rec.Kind {
	case stream.KindSectionStart, stream.KindSectionPart, stream.KindSectionEnd:
		id := rec.Section.ID
		if rec.Kind == stream.KindSectionStart {
			if id == 0 {
				return fmt.Errorf("section %q: %w", rec.Section.Idstr, errSectionZero)
			}
			h.live[id] = h.newLive(rec.Section.Idstr)
			if len(h.r.sections) < 1<<16 { // live sections are a handful; the map stays bounded
				h.r.sections[id] = rec.Section.Idstr
			}
		}
		lh := h.live[id]
		if lh == nil {
			return fmt.Errorf("section id %d: %s without START", id, rec.Kind)
		}
		h.current, h.curName, h.curFrom = lh, rec.Section.Idstr, h.out.offset()
		switch rec.Kind {
		case stream.KindSectionStart:
			return lh.setup(rec)
		case stream.KindSectionPart:
			return lh.iterate(rec)
		default:
			return lh.complete(rec)
		}
	case stream.KindRAM:
		if h.current == nil {
			return fmt.Errorf("RAM record outside a section at offset %d", rec.Offset)
		}
		return h.current.record(rec)
	case stream.KindFooter:
		var err error
		if h.current != nil {
			err = h.current.footer(rec)
			h.current = nil
		} else {
			err = h.out.pass(rec) // footer of a FULL section
		}
		h.account(rec.Section.Idstr)
		return err
	case stream.KindSectionFull:
		// Device state is serialized by QEMU itself and forwarded exactly (design.md).
		h.curName, h.curFrom = rec.Section.Idstr, h.out.offset()
		return h.out.pass(rec)
	case stream.KindCommand:
		if rec.Cmd == stream.CmdSwitchoverStart && h.dst72 {
			h.rewritten("dropped COMMAND 11 (SWITCHOVER_START): QEMU 7.2 rejects it")
			h.out.drop(rec)
			return nil
		}
	}
	return h.out.pass(rec)
}

// account adds the bytes produced since the section header to its idstr.
func (h *handlers) account(idstr string) {
	if idstr == "" {
		idstr = h.curName
	}
	h.r.mu.Lock()
	h.r.sum.Sections[idstr] += h.out.offset() - h.curFrom
	h.r.mu.Unlock()
}

func (h *handlers) rewritten(why string) {
	h.r.mu.Lock()
	first := h.r.sum.Rewritten == 0
	h.r.sum.Rewritten++
	h.r.mu.Unlock()
	if first {
		h.r.warn(why)
	}
}

// passLive forwards an iterative section the engine does not interpret (dirty-bitmap, block).
type passLive struct{ h *handlers }

func (p *passLive) setup(rec *stream.Record) error    { return p.h.out.pass(rec) }
func (p *passLive) iterate(rec *stream.Record) error  { return p.h.out.pass(rec) }
func (p *passLive) complete(rec *stream.Record) error { return p.h.out.pass(rec) }
func (p *passLive) record(rec *stream.Record) error   { return p.h.out.pass(rec) }
func (p *passLive) footer(rec *stream.Record) error   { return p.h.out.pass(rec) }

// ramRelay is the `ram` handler of relay mode: its pages come from the source's stream and go
// on as they came, except where the destination's version needs them rewritten.
type ramRelay struct {
	h       *handlers
	page    [4096]byte // scratch for rewritten pages (fill ≠ 0, inflated COMPRESS_PAGE)
	inflate stream.Inflater
}

func (m *ramRelay) setup(rec *stream.Record) error    { return m.h.out.pass(rec) }
func (m *ramRelay) iterate(rec *stream.Record) error  { return m.h.out.pass(rec) }
func (m *ramRelay) complete(rec *stream.Record) error { return m.h.out.pass(rec) }
func (m *ramRelay) footer(rec *stream.Record) error   { return m.h.out.pass(rec) }

func (m *ramRelay) record(rec *stream.Record) error {
	r := &rec.RAM
	switch r.Flags &^ stream.RAMContinue {
	case stream.RAMZero:
		if r.Fill != 0 {
			// 10.0 rejects a non-zero fill (stream-format.md §4): send the same content as a page.
			for i := range m.page {
				m.page[i] = r.Fill
			}
			m.h.rewritten("rewrote ZERO records with a non-zero fill byte as PAGE records")
			return m.h.out.replace(rec, func(w *stream.Writer) error { return w.WritePage(r.Offset, r.Block, m.page[:]) })
		}
	case stream.RAMCompressPage:
		if m.h.dst10 {
			// 10.0 has no COMPRESS_PAGE (0x100): inflate and send the page itself.
			n, err := m.inflate.Inflate(m.page[:], r.Data)
			if err != nil || n != len(m.page) {
				return fmt.Errorf("ram: COMPRESS_PAGE at offset %d of %q: inflating: %v", r.Offset, r.Block, err)
			}
			m.h.rewritten("inflated COMPRESS_PAGE records for a QEMU 10.0 destination")
			return m.h.out.replace(rec, func(w *stream.Writer) error { return w.WritePage(r.Offset, r.Block, m.page[:]) })
		}
	case stream.RAMMultifdFlush:
		if m.h.dst72 {
			m.h.rewritten("dropped MULTIFD_FLUSH (0x200) records: QEMU 7.2 rejects them")
			m.h.out.drop(rec)
			return nil
		}
	}
	return m.h.out.pass(rec)
}
