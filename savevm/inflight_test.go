package savevm

import (
	"bytes"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/link"
)

// The ring of pages on their way: a page is found by block and offset with its content, or as
// a zero page, once; pages the ring has overwritten are not found.
func TestInFlightRing(t *testing.T) {
	f := newInFlight(nil, map[string]int{"pc.ram": 0, "other": 1})
	page := func(v byte) []byte { return bytes.Repeat([]byte{v}, link.PageSize) }
	f.put(0, 0x1000, page(7))
	f.put(1, 0x1000, nil)
	p, ok := f.take("pc.ram", 0x1000)
	if !ok {
		t.Fatal("a page just put is not found")
	}
	u, err := link.ParseUrgent(p)
	if err != nil || u.Block != 0 || u.Entry != 0x1000|link.KindPage || !bytes.Equal(u.Data, page(7)) {
		t.Fatalf("URGENT of the page: %+v %v", u, err)
	}
	if _, ok := f.take("pc.ram", 0x1000); ok {
		t.Error("a page taken once is found again")
	}
	if p, ok := f.take("other", 0x1000); !ok {
		t.Error("a zero page just put is not found")
	} else if u, err := link.ParseUrgent(p); err != nil || u.Entry != 0x1000|link.KindZero || len(u.Data) != 0 {
		t.Errorf("URGENT of the zero page: %+v %v", u, err)
	}
	if _, ok := f.take("nosuch", 0); ok {
		t.Error("a page of an unknown block is found")
	}
	for i := 0; i <= inFlightPages; i++ {
		f.put(0, uint64(i)*link.PageSize, page(byte(i)))
	}
	if _, ok := f.take("pc.ram", 0); ok {
		t.Error("the page the ring overwrote is still found")
	}
	if p, ok := f.take("pc.ram", inFlightPages*link.PageSize); !ok {
		t.Error("the newest page is not found")
	} else if u, _ := link.ParseUrgent(p); !bytes.Equal(u.Data, page(byte(inFlightPages % 256))) {
		t.Error("the newest page's copy is not its content")
	}
	if f.sentAgain() != 3 {
		t.Errorf("sentAgain = %d, want 3", f.sentAgain())
	}
}
