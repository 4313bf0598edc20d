package savevm

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// Multifd is a source's multifd channels as the relay serves them (stream-format.md §4.1): the
// channel connections the source opened to the private socket (their hellos already read), and
// either the destination's channel connections (forward: the destination has multifd with as
// many channels) or none (merge: the pages go into the one plain stream of a destination
// without multifd).
type Multifd struct {
	Layout stream.MultifdLayout
	// Src holds the source's channels, by channel id; Hellos their hellos.
	Src    []net.Conn
	Hellos []*stream.MultifdHello
	// Dst holds the destination's channel connections in the same order (forward), or is nil
	// (merge); DstHelloSent says their hellos were written already.
	Dst          []io.WriteCloser
	DstHelloSent bool
}

// SetMultifd makes the relay serve the source's multifd channels. Call it before Run.
func (r *Relay) SetMultifd(m *Multifd) {
	r.multifd = m
	r.merge = newMerger(len(m.Src), m.Dst != nil)
}

// runChannels starts one goroutine per source channel: it forwards the channel's packets to the
// destination's channel, or inserts their pages into the plain stream (merge). A failure of any
// channel ends the relay with it (the error comes back on fail).
func (r *Relay) runChannels(out *passOutput, fail func(error)) *sync.WaitGroup {
	var wg sync.WaitGroup
	m := r.multifd
	if m == nil {
		return &wg
	}
	for i, c := range m.Src {
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			rd := stream.NewMultifdReader(&countingReader{r: c, n: &r.bytesIn}, m.Layout, stream.MultifdLimits{})
			var err error
			if m.Dst != nil {
				err = r.forwardChannel(i, rd, m.Hellos[i], m.Dst[i])
			} else {
				err = r.mergeChannel(i, rd, out)
			}
			if err != nil {
				fail(fmt.Errorf("multifd channel %d: %w", i, err))
			}
		}(i, c)
	}
	return &wg
}

// forwardChannel copies one channel packet by packet, each decoded and checked, to the
// destination's channel of the same id.
func (r *Relay) forwardChannel(i int, rd *stream.MultifdReader, hello *stream.MultifdHello, dst io.WriteCloser) error {
	w := stream.NewMultifdWriter(&countingWriter{w: dst, n: &r.bytesOut}, r.multifd.Layout)
	if !r.multifd.DstHelloSent {
		if err := w.WriteHello(hello); err != nil {
			return err
		}
	}
	for {
		p, err := rd.Next()
		if err == io.EOF {
			return nil // the source closes its channels once the migration has completed
		}
		if err != nil {
			return fmt.Errorf("source: %w", err)
		}
		if p.IsDeviceState() {
			return errors.New("device-state packets (VFIO) are not relayed")
		}
		r.normalPages.Add(int64(p.NormalPages))
		r.zeroPages.Add(int64(p.ZeroPages))
		if err := w.WritePacket(p); err != nil {
			return err
		}
		if p.Sync() {
			r.merge.synced(i)
		}
	}
}

// merger keeps the plain stream of merge mode consistent: a channel's pages may go into the
// stream only while a ram section body is open and only in the sync epoch the channel is in
// (its pages after a SYNC packet belong after the main stream's next sync point); the main
// stream waits at each sync point until every channel has delivered its SYNC for it
// (stream-format.md §4.1: 7.2 and 10.0's per-section mode sync at every EOS of the ram section,
// 10.0's per-round mode at every MULTIFD_FLUSH record).
type merger struct {
	// forward: the channels go to the destination's own channels; the merger only counts the
	// sync points, so that the relay ends only after every channel forwarded its last SYNC.
	forward   bool
	mu        sync.Mutex
	cond      *sync.Cond
	epoch     int   // sync points the main stream has passed
	chans     []int // SYNC packets each channel has delivered
	inSection bool
	perRound  int  // 0 not known yet, 1 per-round, -1 per-section
	done      bool // the relay ended: release every waiter
	eosSeen   bool // the pump read the open body's EOS (pump goroutine only)
	closed    bool // the device state began: pages can no longer go anywhere
}

func newMerger(n int, forward bool) *merger {
	m := &merger{chans: make([]int, n), forward: forward}
	m.cond = sync.NewCond(&m.mu)
	return m
}

// synced counts a SYNC packet of channel i.
func (m *merger) synced(i int) {
	m.mu.Lock()
	m.chans[i]++
	m.cond.Broadcast()
	m.mu.Unlock()
}

// drained waits until every channel has delivered the SYNC of every sync point the main stream
// passed: after that no channel holds anything the destination still needs.
func (m *merger) drained(timeout time.Duration) error {
	t := time.AfterFunc(timeout, m.stop)
	defer t.Stop()
	m.mu.Lock()
	defer m.mu.Unlock()
	for {
		behind := -1
		for i, n := range m.chans {
			if n < m.epoch {
				behind = i
			}
		}
		if behind < 0 {
			return nil
		}
		if m.done {
			return fmt.Errorf("multifd channel %d has not delivered its last SYNC (%d of %d)", behind, m.chans[behind], m.epoch)
		}
		m.cond.Wait()
	}
}

// stop releases every goroutine waiting on the merger.
func (m *merger) stop() {
	m.mu.Lock()
	m.done = true
	m.cond.Broadcast()
	m.mu.Unlock()
}

// section tells the merger whether a ram section body is open.
func (m *merger) section(open bool) {
	m.mu.Lock()
	m.inSection = open && !m.closed
	m.cond.Broadcast()
	m.mu.Unlock()
}

// closeForGood: the device state has begun, so no page may be inserted any more.
func (m *merger) closeForGood() {
	m.mu.Lock()
	m.closed, m.inSection = true, false
	m.cond.Broadcast()
	m.mu.Unlock()
}

// syncPoint is called by the main stream before a record that makes the destination sync its
// channels: it waits until every channel has delivered that epoch's SYNC packet.
func (m *merger) syncPoint() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for !m.forward {
		if m.done {
			return errors.New("merge stopped")
		}
		all := true
		for _, n := range m.chans {
			if n <= m.epoch {
				all = false
			}
		}
		if all {
			break
		}
		m.cond.Wait()
	}
	m.epoch++
	m.cond.Broadcast()
	return nil
}

// mainRecord looks at a record of the main stream before it goes out and returns whether it is
// a sync point.
func (m *merger) mainRecord(rec *stream.Record, layout stream.MultifdLayout) bool {
	if rec.Kind != stream.KindRAM {
		return false
	}
	switch rec.RAM.Flags &^ stream.RAMContinue {
	case stream.RAMMultifdFlush:
		m.perRound = 1
		return true
	case stream.RAMEOS:
		if m.perRound == 0 {
			// The setup body had no MULTIFD_FLUSH before its EOS: per-section mode (7.2, and
			// 10.0 on machine types ≤ 8.0), where every EOS syncs.
			m.perRound = -1
		}
		return m.perRound < 0 || layout == stream.MultifdV72
	}
	return false
}

// mergeChannel inserts the pages of one channel into the plain stream, each packet in its
// epoch and inside a ram section body.
func (r *Relay) mergeChannel(i int, rd *stream.MultifdReader, out *passOutput) error {
	m := r.merge
	for {
		p, err := rd.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("source: %w", err)
		}
		if p.IsDeviceState() {
			return errors.New("device-state packets (VFIO) are not relayed")
		}
		if p.Flags&stream.MultifdFlagCompressionMask != 0 {
			return errors.New("a compressed packet: compressed channels can only be forwarded to a multifd destination")
		}
		if p.NormalPages > 0 || (r.multifd.Layout == stream.MultifdV100 && p.ZeroPages > 0) {
			m.mu.Lock()
			for !m.done && !m.closed && (m.chans[i] != m.epoch || !m.inSection) {
				m.cond.Wait()
			}
			done, closed := m.done, m.closed
			var err error
			if !done && !closed {
				// Inserted under the merger's lock: the body cannot close under the insert.
				err = out.insertPacket(p, r.multifd.Layout)
			}
			m.mu.Unlock()
			if done {
				return nil
			}
			if closed {
				return fmt.Errorf("%d pages after the last sync point, once the device state had begun", p.NormalPages+p.ZeroPages)
			}
			if err != nil {
				return err
			}
			r.normalPages.Add(int64(p.NormalPages))
			if r.multifd.Layout == stream.MultifdV100 {
				r.zeroPages.Add(int64(p.ZeroPages))
			}
		}
		if p.Sync() {
			m.synced(i)
		}
	}
}
