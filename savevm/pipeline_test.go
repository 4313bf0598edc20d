package savevm

import (
	"bytes"
	"errors"
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
