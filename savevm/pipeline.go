package savevm

import (
	"io"
	"sync"
)

// asyncSink writes the stream.Writer's batches to the destination from its own goroutine, so
// that reading and decoding the source's next records overlaps with sending the previous batch
// (a stream.BatchSink: buffers change hands, nothing is copied again). At most two batches are in
// flight besides the one being filled, which bounds memory at three batch buffers.
type asyncSink struct {
	w    io.Writer
	work chan []byte // batches to write; a nil batch asks for an acknowledgement on synced
	free chan []byte // written batches, emptied, for reuse
	done chan struct{}

	synced chan struct{}
	mu     sync.Mutex
	err    error // first write error (sticky)
	spare  int   // buffers allocated so far beyond the writer's own
}

func newAsyncSink(w io.Writer) *asyncSink {
	s := &asyncSink{w: w, work: make(chan []byte, 2), free: make(chan []byte, 2),
		done: make(chan struct{}), synced: make(chan struct{})}
	go s.loop()
	return s
}

func (s *asyncSink) loop() {
	defer close(s.done)
	for b := range s.work {
		if b == nil {
			s.synced <- struct{}{}
			continue
		}
		if s.error() == nil {
			if _, err := s.w.Write(b); err != nil {
				s.mu.Lock()
				s.err = err
				s.mu.Unlock()
			}
		}
		s.free <- b[:0]
	}
}

func (s *asyncSink) error() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// WriteBatch queues b and returns a buffer to fill next: a new one while fewer than two are
// in flight, else the next one the goroutine has finished with (waiting for it).
func (s *asyncSink) WriteBatch(b []byte) ([]byte, error) {
	if err := s.error(); err != nil {
		return nil, err
	}
	s.work <- b
	select {
	case next := <-s.free:
		return next, s.error()
	default:
	}
	if s.spare < 2 {
		s.spare++
		return make([]byte, 0, cap(b)), nil
	}
	return <-s.free, s.error()
}

// Sync waits until every queued batch has been written.
func (s *asyncSink) Sync() error {
	s.work <- nil
	<-s.synced
	return s.error()
}

// Write writes p after everything queued before it.
func (s *asyncSink) Write(p []byte) (int, error) {
	if err := s.Sync(); err != nil {
		return 0, err
	}
	n, err := s.w.Write(p)
	if err != nil {
		s.mu.Lock()
		if s.err == nil {
			s.err = err
		}
		s.mu.Unlock()
	}
	return n, err
}

// Close stops the goroutine after the queued batches (written, or dropped after an error).
// It does not close the destination.
func (s *asyncSink) Close() {
	close(s.work)
	for {
		select {
		case <-s.free: // keep the goroutine from blocking on a full free list
		case <-s.done:
			return
		}
	}
}
