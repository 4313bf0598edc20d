package link

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"time"
)

// The postcopy feature (PROTOCOL.md §7): RETURN carries the destination's return path back as
// a byte stream, URGENT a requested page ahead of the queued data; both only when the feature
// was agreed, and each only in its own direction.

func postcopyHello() Hello {
	return Hello{Connections: 1, Compress: CodecNames(), Sidecar: "test", Features: []string{FeaturePostcopy}}
}

func agreePostcopy(h Hello) (Welcome, error) {
	w := Welcome{Compress: CodecNames()}
	if HasFeature(h.Features, FeaturePostcopy) {
		w.Features = []string{FeaturePostcopy}
	}
	return w, nil
}

func TestReturnPathBytes(t *testing.T) {
	t.Parallel()
	run := runLink(t, quick, quick, "", postcopyHello(), agreePostcopy)
	if run.sndErr != nil || run.rcvErr != nil {
		t.Fatalf("Dial %v, Accept %v", run.sndErr, run.rcvErr)
	}
	// More than one RETURN frame's worth, in odd pieces: the sender reads one byte stream.
	want := make([]byte, 3*MaxReturnChunk+123)
	for i := range want {
		want[i] = byte(i * 7)
	}
	go func() {
		for rest := want; len(rest) > 0; {
			n := min(len(rest), 5000)
			if err := run.rcv.SendReturn(rest[:n]); err != nil {
				t.Error(err)
				return
			}
			rest = rest[n:]
		}
		run.rcv.SendReturn(nil) // the destination closed its return path
	}()
	got, err := io.ReadAll(readerFunc(run.snd.ReadReturn))
	if err != nil {
		t.Fatalf("ReadReturn: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, sent %d (or different)", len(got), len(want))
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

// TestUrgentAhead: an URGENT page that arrived is taken before the data frames that wait, when
// the receiver asks for urgent ones, and not otherwise; the data frames keep their order.
func TestUrgentAhead(t *testing.T) {
	t.Parallel()
	run := runLink(t, quick, quick, "", postcopyHello(), agreePostcopy)
	if run.sndErr != nil || run.rcvErr != nil {
		t.Fatalf("Dial %v, Accept %v", run.sndErr, run.rcvErr)
	}
	snd, rcv := run.snd, run.rcv
	for seq := uint64(1); seq <= 3; seq++ {
		if err := snd.SendData(testFrame(seq)); err != nil {
			t.Fatal(err)
		}
	}
	page := Urgent{Block: 1, Entry: 0x5000 | KindPage, Data: bytes.Repeat([]byte{0xee}, PageSize)}
	if err := snd.SendUrgent(page); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the URGENT frame and the data frames", func() bool {
		rcv.rmu.Lock()
		defer rcv.rmu.Unlock()
		return len(rcv.urgent) == 1 && len(rcv.pending) == 3
	})
	f, err := rcv.NextFrame(time.Now().Add(testWait), false)
	if err != nil || f.Type == FrameUrgent || f.Seq() != 1 {
		t.Fatalf("without urgent: %v seq %d (%v), want data frame 1", f.Type, f.Seq(), err)
	}
	f, err = rcv.NextFrame(time.Now().Add(testWait), true)
	if err != nil || f.Type != FrameUrgent {
		t.Fatalf("with urgent: %v (%v), want URGENT ahead of frames 2 and 3", f.Type, err)
	}
	if u, err := ParseUrgent(f.Payload); err != nil || u.Block != page.Block || u.Entry != page.Entry || !bytes.Equal(u.Data, page.Data) {
		t.Fatalf("URGENT decodes to %d 0x%x (%v)", u.Block, u.Entry, err)
	}
	for seq := uint64(2); seq <= 3; seq++ {
		if f, err := rcv.NextFrame(time.Now().Add(testWait), true); err != nil || f.Seq() != seq {
			t.Fatalf("then data frame %d: got seq %d (%v)", seq, f.Seq(), err)
		}
	}
}

// TestPostcopyFramesRefused: RETURN and URGENT where the feature was not agreed, in the wrong
// direction, or malformed, end the session with a ProtocolError naming the frame.
func TestPostcopyFramesRefused(t *testing.T) {
	t.Parallel()
	noFeature := Hello{Connections: 1, Compress: CodecNames(), Sidecar: "test"}
	for _, tc := range []struct {
		name   string
		hello  Hello
		send   func(snd, rcv *Session)
		victim func(snd, rcv *Session) *Session
		want   string
	}{
		{"return-unagreed", noFeature, func(_, rcv *Session) { rcv.SendReturn([]byte{0, 2, 0, 4, 0, 0, 0, 1}) },
			func(snd, _ *Session) *Session { return snd }, "RETURN without the postcopy feature"},
		{"urgent-unagreed", noFeature, func(snd, _ *Session) { snd.SendUrgent(Urgent{Entry: KindZero}) },
			func(_, rcv *Session) *Session { return rcv }, "URGENT without the postcopy feature"},
		{"urgent-to-sender", postcopyHello(), func(_, rcv *Session) { rcv.SendUrgent(Urgent{Entry: KindZero}) },
			func(snd, _ *Session) *Session { return snd }, "URGENT without the postcopy feature, or towards the sender"},
		{"return-to-receiver", postcopyHello(), func(snd, _ *Session) { snd.SendReturn([]byte{1}) },
			func(_, rcv *Session) *Session { return rcv }, "RETURN without the postcopy feature, or towards the receiver"},
		{"urgent-xbzrle", postcopyHello(), func(snd, _ *Session) { snd.SendUrgent(Urgent{Entry: 0x1000 | KindXBZRLE, Data: []byte{0, 1, 2}}) },
			func(_, rcv *Session) *Session { return rcv }, "a page or a zero page only"},
		{"urgent-short-page", postcopyHello(), func(snd, _ *Session) { snd.SendUrgent(Urgent{Entry: KindPage, Data: make([]byte, 100)}) },
			func(_, rcv *Session) *Session { return rcv }, "a page of 100 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			run := runLink(t, quick, quick, "", tc.hello, agreePostcopy)
			if run.sndErr != nil || run.rcvErr != nil {
				t.Fatalf("Dial %v, Accept %v", run.sndErr, run.rcvErr)
			}
			tc.send(run.snd, run.rcv)
			v := tc.victim(run.snd, run.rcv)
			select {
			case <-v.Done():
			case <-time.After(testWait):
				t.Fatal("the frame was taken")
			}
			var pe *ProtocolError
			if err := v.Err(); !errors.As(err, &pe) || pe.Conn != "control" || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
				t.Fatalf("%v, want a ProtocolError on the control connection saying %q", err, tc.want)
			}
		})
	}
}
