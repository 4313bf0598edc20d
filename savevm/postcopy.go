package savevm

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// Postcopy (design.md "Postcopy"). With Policy.Postcopy the engine no longer serves the source's
// return path itself: OPEN_RETURN_PATH and every PING go on to the destination, and what the
// destination sends back — PONGs, page requests, the final SHUT, and after a recovery the
// received bitmaps and RESUME_ACK — is decoded (stream.RPReader) and written to the source
// (stream.RPWriter). After the switch (the PACKAGED command) the guest runs on the destination:
// the source is never resumed again, and a broken connection is recovered (recover.go in
// package migration) rather than undone.

// PostcopySummary is what postcopy did, in Summary.Postcopy.
type PostcopySummary struct {
	Started    bool  `json:"started"`     // the policy switched to postcopy
	PostcopyMs int64 `json:"postcopy_ms"` // from the switch until the destination had everything
	Requests   int64 `json:"requests"`    // pages the destination asked for
	// Latency of a request as the sidecar sees it: from the destination's request until the
	// page went to the destination (the guest's vCPU waits that long, plus the network).
	LatencyP50Us int64 `json:"latency_p50_us"`
	LatencyP99Us int64 `json:"latency_p99_us"`
	LatencyMaxUs int64 `json:"latency_max_us"`
	Recoveries   int   `json:"recoveries,omitempty"` // broken connections recovered
	// InFlight are requested pages the sidecar had already forwarded when the request came
	// (the page was on its way; QEMU does not send it again): they are not in the latencies.
	InFlight int64 `json:"in_flight"`
}

// postcopyState is the engine's side of postcopy.
type postcopyState struct {
	bridge    bool // the destination's return path is bridged to the source
	started   atomic.Bool
	startedAt time.Time

	mu       sync.Mutex
	pending  map[pageKey]time.Time // requested pages not yet sent
	latency  []time.Duration       // request → page, kept up to maxLatencies
	requests int64
	inFlight int64
	// sent has a bit for every page forwarded since the switch, per block (sized by the
	// MEM_SIZE list: 32 KiB per GiB), so that a request for a page already on its way is told
	// from one still waiting.
	sent     map[string][]uint64
	blockLen map[string]uint64
	shut     chan uint32 // the destination's SHUT
	shutOnce sync.Once
	// The return path's decoder and encoder, kept across a recovery (Resume).
	rpr *stream.RPReader
	rpw *stream.RPWriter
	// requested: the page record being handled is one the destination asked for (the pump
	// sets it before the output's handle; the link sends such a page as URGENT).
	requested bool
	// bridgeDone is closed when the run's return-path bridge has ended.
	bridgeDone chan struct{}
}

type pageKey struct {
	block string
	off   uint64
}

// maxLatencies bounds the latency samples kept (8 MiB).
const maxLatencies = 1 << 20

// Started reports whether the migration has switched to postcopy: from then on the guest runs
// on the destination and the source must never be resumed.
func (r *Relay) Started() bool { return r.pc.started.Load() }

// bridgeReturnPath forwards the destination's return path to the source until the destination
// closes it. It returns why it ended (nil after SHUT 0 and the end of input).
func (r *Relay) bridgeReturnPath(dst io.Reader, src io.Writer) error {
	pc := &r.pc
	if pc.rpr == nil {
		pc.rpr, pc.rpw = stream.NewRPReader(dst), stream.NewRPWriter(src)
	} else {
		pc.rpr.Resume(dst)
		pc.rpw.Resume(src)
	}
	rd, w := pc.rpr, pc.rpw
	for {
		m, err := rd.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return &DestinationError{Err: fmt.Errorf("the destination's return path: %w", err)}
		}
		switch m.Type {
		case stream.RPReqPages, stream.RPReqPagesID:
			pc.mu.Lock()
			pc.requests++
			if pc.pending == nil {
				pc.pending = map[pageKey]time.Time{}
			}
			now := time.Now()
			for off := m.Start; off < m.Start+uint64(m.Length); off += 4096 {
				if pc.wasSent(m.Block, off) {
					pc.inFlight++ // on its way already: no latency the sidecar could measure
					continue
				}
				if _, ok := pc.pending[pageKey{m.Block, off}]; !ok && len(pc.pending) < 1<<16 {
					pc.pending[pageKey{m.Block, off}] = now
				}
			}
			pc.mu.Unlock()
		case stream.RPShut:
			pc.shutOnce.Do(func() { pc.shut <- m.Value })
			if !pc.started.Load() {
				// Precopy that converged: the sidecar told the source itself, before the
				// destination could complete (the point of no return); this one stays here.
				continue
			}
		}
		if err := w.WriteMessage(m); err != nil {
			return fmt.Errorf("the source's return path: %w", err)
		}
	}
}

// pageSent notes a page that went to the destination while in postcopy: if it was requested,
// its latency. It reports whether the page was requested and still waited for.
func (r *Relay) pageSent(block string, off uint64) (requested bool) {
	pc := &r.pc
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if t, ok := pc.pending[pageKey{block, off}]; ok {
		delete(pc.pending, pageKey{block, off})
		pc.sample(time.Since(t))
		requested = true
	}
	n, ok := pc.blockLen[block]
	if !ok || off >= n {
		return requested // a block MEM_SIZE did not list: a request for it cannot be told as in flight
	}
	bits := pc.sent[block]
	if bits == nil {
		if pc.sent == nil {
			pc.sent = map[string][]uint64{}
		}
		bits = make([]uint64, (n/4096+63)/64)
		pc.sent[block] = bits
	}
	bits[off/4096/64] |= 1 << (off / 4096 % 64)
	return requested
}

// wasSent reports whether the page went to the destination since the switch (pc.mu held).
func (pc *postcopyState) wasSent(block string, off uint64) bool {
	bits := pc.sent[block]
	i := off / 4096 / 64
	return i < uint64(len(bits)) && bits[i]&(1<<(off/4096%64)) != 0
}

// sample keeps one request latency (pc.mu held).
func (pc *postcopyState) sample(d time.Duration) {
	if len(pc.latency) < maxLatencies {
		pc.latency = append(pc.latency, d)
	}
}

// setBlocks takes the source's RAM blocks (its MEM_SIZE record), bounding the sent bitmaps.
func (r *Relay) setBlocks(blocks []stream.RAMBlock) {
	pc := &r.pc
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.blockLen != nil {
		return
	}
	pc.blockLen = make(map[string]uint64, len(blocks))
	for _, b := range blocks {
		pc.blockLen[b.Name] = b.UsedLength
	}
}

// startPostcopyPhase is the switch as the stream shows it: the PACKAGED command.
func (r *Relay) startPostcopyPhase() {
	if r.pc.started.Swap(true) {
		return
	}
	r.pc.startedAt = time.Now()
	r.markStopped()
	r.setPhase(PhasePostcopy)
}

// awaitShut waits for the destination's SHUT after the whole stream went out: in bridge mode it
// is the destination that says it has everything (0) or failed (1).
func (r *Relay) awaitShut(timeout time.Duration, rpDone <-chan error) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case v := <-r.pc.shut:
		if v != 0 {
			return &DestinationError{Err: fmt.Errorf("the destination reports it failed to load the stream (SHUT %d)", v)}
		}
		return nil
	case err := <-rpDone:
		select {
		case v := <-r.pc.shut:
			if v == 0 {
				return nil
			}
		default:
		}
		if err == nil {
			err = errors.New("its return path closed without SHUT")
		}
		return &DestinationError{Err: fmt.Errorf("the destination did not finish the migration: %w", err)}
	case <-t.C:
		return &DestinationError{Err: fmt.Errorf("no SHUT from the destination within %v after the end of the stream", timeout)}
	}
}

// postcopySummary completes the summary's postcopy part.
func (r *Relay) postcopySummary() *PostcopySummary {
	pc := &r.pc
	if !pc.bridge {
		return nil
	}
	s := &PostcopySummary{Started: pc.started.Load()}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	s.Requests, s.InFlight = pc.requests, pc.inFlight
	if s.Started {
		s.PostcopyMs = time.Since(pc.startedAt).Milliseconds()
	}
	if n := len(pc.latency); n > 0 {
		l := append([]time.Duration(nil), pc.latency...)
		sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
		s.LatencyP50Us = l[n/2].Microseconds()
		s.LatencyP99Us = l[min(n-1, n*99/100)].Microseconds()
		s.LatencyMaxUs = l[n-1].Microseconds()
	}
	return s
}
