package savevm

import (
	"bytes"
	"errors"
	"net"
	"sync/atomic"
	"testing"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

type failAfter struct {
	n   int
	buf bytes.Buffer
}

var errFull = errors.New("destination full")

func (f *failAfter) Write(p []byte) (int, error) {
	if f.buf.Len()+len(p) > f.n {
		return 0, errFull
	}
	return f.buf.Write(p)
}

// TestAsyncSinkOrder writes batches and direct writes through a stream.Writer and checks the
// destination gets every byte in order.
func TestAsyncSinkOrder(t *testing.T) {
	var want bytes.Buffer
	dst := &failAfter{n: 1 << 30}
	sink := newAsyncSink(dst)
	w := stream.NewWriter(sink, stream.WithBatchSize(256<<10))
	page := make([]byte, 4096)
	for i := 0; i < 2000; i++ {
		page[0], page[1] = byte(i), byte(i>>8)
		raw := append([]byte{0x55}, page...)
		if i%500 == 0 {
			raw = bytes.Repeat([]byte{byte(i)}, 200<<10) // large: goes around the batch
		}
		want.Write(raw)
		if err := w.WriteRaw(raw); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	sink.Close()
	if !bytes.Equal(dst.buf.Bytes(), want.Bytes()) {
		t.Fatalf("destination got %d bytes, want %d, or in another order", dst.buf.Len(), want.Len())
	}
}

// TestAsyncSinkError checks a write error reaches the encoder and Close does not hang.
func TestAsyncSinkError(t *testing.T) {
	sink := newAsyncSink(&failAfter{n: 1 << 20})
	w := stream.NewWriter(sink, stream.WithBatchSize(256<<10))
	page := make([]byte, 4096)
	var err error
	for i := 0; i < 10000 && err == nil; i++ {
		err = w.WriteRaw(page)
	}
	if err == nil {
		err = w.Flush()
	}
	if !errors.Is(err, errFull) {
		t.Fatalf("error %v, want %v", err, errFull)
	}
	sink.Close()
}

// vectorSink is a destination that takes slices in one call, as transport's sockets do.
type vectorSink struct {
	bytes.Buffer
	calls int
	fail  error
}

func (v *vectorSink) WriteBuffers(b *net.Buffers) (int64, error) {
	v.calls++
	if v.fail != nil {
		return 0, v.fail
	}
	return b.WriteTo(&v.Buffer)
}

// TestCountingWriterBuffers checks that the relay's output hands its queued slices to a
// destination that takes them in one call (writev), counts them, and says a failure is the
// destination's.
func TestCountingWriterBuffers(t *testing.T) {
	var n atomic.Int64
	sink := &vectorSink{}
	cw := &countingWriter{w: sink, n: &n}
	v := net.Buffers{[]byte("abc"), []byte("defg"), []byte("h")}
	if m, err := cw.WriteBuffers(&v); err != nil || m != 8 {
		t.Fatalf("WriteBuffers: %d, %v", m, err)
	}
	if sink.calls != 1 || sink.String() != "abcdefgh" || n.Load() != 8 {
		t.Errorf("%d calls, %q, counted %d: want 1 call, all 8 bytes counted", sink.calls, sink.String(), n.Load())
	}
	var plain bytes.Buffer // no WriteBuffers: one write per slice, the same bytes
	cw = &countingWriter{w: &plain, n: &n}
	v = net.Buffers{[]byte("ij"), []byte("k")}
	if m, err := cw.WriteBuffers(&v); err != nil || m != 3 || plain.String() != "ijk" || n.Load() != 11 {
		t.Errorf("plain writer: %d, %v, %q, counted %d", m, err, plain.String(), n.Load())
	}
	cw = &countingWriter{w: &vectorSink{fail: errors.New("reset")}, n: &n}
	v = net.Buffers{[]byte("x")}
	var de *DestinationError
	if _, err := cw.WriteBuffers(&v); !errors.As(err, &de) {
		t.Errorf("a failed writev gave %v, want a *DestinationError", err)
	}
}
