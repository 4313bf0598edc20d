package savevm

import (
	"sync"

	"github.com/qemu-migrate-go/qemu-migrate-go/link"
)

// inFlight keeps a copy of the newest pages a link output has put into data frames since the
// switch to postcopy (feature resend, PROTOCOL.md §7.1). After the switch QEMU sends each page
// once; when the destination asks for one that is still on its way — in the sender's queues,
// the connections, the receiver's reorder window — the guest would wait for everything ahead
// of it. The copy goes again at once as URGENT instead, and the receiver writes whichever copy
// comes first and drops the other. Pages older than the ring are taken to have arrived.
//
// It is filled by the engine's goroutine and read by the return-path bridge's; one mutex, taken
// once per page sent and once per requested page.
type inFlight struct {
	s      *link.Session
	blocks map[string]int // block name → index (MEM_SIZE order); not changed after the switch

	mu    sync.Mutex
	keys  []inFlightKey // the ring: slot i holds the page keys[i], its data at data[i*PageSize:]
	data  []byte
	at    map[inFlightKey]int32
	next  int
	again int64 // pages sent again
}

type inFlightKey struct {
	block int
	entry uint64 // offset | link.KindPage or link.KindZero; 0 = a free slot
}

// inFlightPages is the ring's size: 8 MiB of pages, more than the link holds after the switch
// (64 KiB frames, the receiver's 4 MiB window and the connections' buffers).
const inFlightPages = 2048

func newInFlight(s *link.Session, blocks map[string]int) *inFlight {
	return &inFlight{s: s, blocks: blocks, keys: make([]inFlightKey, inFlightPages),
		data: make([]byte, inFlightPages*link.PageSize), at: make(map[inFlightKey]int32, inFlightPages)}
}

// put records a page put into a data frame: data is its content, nil for a zero page.
func (f *inFlight) put(b int, off uint64, data []byte) {
	k := inFlightKey{b, off | link.KindZero}
	if data != nil {
		k.entry = off | link.KindPage
	}
	f.mu.Lock()
	i := f.next
	f.next = (i + 1) % len(f.keys)
	if old := f.keys[i]; old.entry != 0 && f.at[old] == int32(i) {
		delete(f.at, old)
	}
	f.keys[i] = k
	f.at[k] = int32(i)
	delete(f.at, inFlightKey{b, k.entry ^ (link.KindPage | link.KindZero)}) // a page is one kind at a time
	if data != nil {
		copy(f.data[i*link.PageSize:(i+1)*link.PageSize], data)
	}
	f.mu.Unlock()
}

// resend sends the page at off of block again as URGENT if the ring still holds it, once. It
// reports whether it did; an error is the session's (the engine sees it too).
func (f *inFlight) resend(block string, off uint64) (bool, error) {
	payload, ok := f.take(block, off)
	if !ok {
		return false, nil
	}
	return true, f.s.SendControl(link.FrameUrgent, payload)
}

// take returns the URGENT payload of the page at off of block if the ring holds it, and
// forgets it.
func (f *inFlight) take(block string, off uint64) ([]byte, bool) {
	b, ok := f.blocks[block]
	if !ok {
		return nil, false
	}
	f.mu.Lock()
	u := link.Urgent{Block: uint16(b)}
	i, ok := f.at[inFlightKey{b, off | link.KindPage}]
	if ok {
		u.Entry = off | link.KindPage
		delete(f.at, inFlightKey{b, u.Entry})
	} else if i, ok = f.at[inFlightKey{b, off | link.KindZero}]; ok {
		u.Entry = off | link.KindZero
		delete(f.at, inFlightKey{b, u.Entry})
	}
	if !ok {
		f.mu.Unlock()
		return nil, false
	}
	if u.Entry&link.KindPage != 0 {
		u.Data = f.data[int(i)*link.PageSize : (int(i)+1)*link.PageSize]
	}
	payload := u.Append(make([]byte, 0, 10+len(u.Data))) // a copy: the slot may be reused after Unlock
	f.again++
	f.mu.Unlock()
	return payload, true
}

// sentAgain is how many pages went again.
func (f *inFlight) sentAgain() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.again
}
