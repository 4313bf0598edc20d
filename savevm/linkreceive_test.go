package savevm

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/link"
	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// postcopyLink is a link session pair on loopback with the postcopy feature agreed.
func postcopyLink(t *testing.T) (snd, rcv *link.Session) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := link.Listen("127.0.0.1:0", link.Config{})
	if err != nil {
		t.Fatal(err)
	}
	type accepted struct {
		s   *link.Session
		err error
	}
	ac := make(chan accepted, 1)
	go func() {
		s, err := l.Accept(ctx, func(h link.Hello) (link.Welcome, error) {
			return link.Welcome{Connections: h.Connections, Compress: link.CodecNames(), Features: []string{link.FeaturePostcopy}}, nil
		})
		ac <- accepted{s, err}
	}()
	snd, err = link.Dial(ctx, l.Addr().String(), link.Config{},
		link.Hello{Connections: 1, Compress: link.CodecNames(), Sidecar: "test", Features: []string{link.FeaturePostcopy}})
	if err != nil {
		t.Fatal(err)
	}
	a := <-ac
	if a.err != nil {
		t.Fatal(a.err)
	}
	t.Cleanup(snd.Close)
	t.Cleanup(a.s.Close)
	return snd, a.s
}

// tcpPair is a connected pair on loopback: the receiver's destination connection and the end
// the test reads as the destination QEMU would.
func tcpPair(t *testing.T) (qemu, dst *net.TCPConn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return s.(*net.TCPConn), c.(*net.TCPConn)
}

// TestBugUrgentAfterEnd: a page the destination asks for just before a postcopy ends goes as
// URGENT on the control connection, and END, on a data connection, can get to the receiver
// first. The receiver must still write that page before its destination's EOF: a soak of link
// recoveries found it missing (the destination's guest found the page zero once postcopy ended,
// and only its own writes since in it). Here the sender sends END, then the URGENT frame.
func TestBugUrgentAfterEnd(t *testing.T) {
	snd, rcv := postcopyLink(t)
	qemu, dst := tcpPair(t)
	r := NewReceiver(rcv, dst, ReceiveOptions{StallTimeout: 5 * time.Second})
	ran := make(chan error, 1)
	var sum Summary
	go func() {
		var err error
		sum, err = r.Run(context.Background())
		ran <- err
	}()
	var cfg []byte
	rd := stream.NewReader(bytes.NewReader(streamtest.Load(t, "idle-7.2")))
	for cfg == nil {
		rec, err := rd.Next()
		if err != nil {
			t.Fatal(err)
		}
		if rec.Kind == stream.KindConfiguration {
			cfg = rec.Config.Raw
		}
	}
	page := bytes.Repeat([]byte{0xee}, link.PageSize)
	frames := [][]byte{
		link.Begin{Seq: 1, Magic: 0x5145564d, Version: 3, Config: cfg}.Append(nil),
		link.Section{Seq: 2, Type: link.StartSection, ID: 2, Idstr: "ram", Version: 4}.Append(nil),
		link.MemSize{Seq: 3, Blocks: []link.Block{{Name: "pc.ram", UsedLength: 1 << 20}}}.Append(nil),
		link.SectionEnd{Seq: 4, ID: 2}.Append(nil),
	}
	pkg := link.AppendPackagedHeader(nil, 5)
	pkg = append(pkg, 0x08, 0, 0x03, 0, 0) // a nested COMMAND (RUN); the receiver does not read it
	link.SetHeaderLength(pkg)
	frames = append(frames, pkg, link.End{Seq: 6, HasUrgent: true, Urgent: 1}.Append(nil))
	for _, f := range frames {
		if err := snd.SendData(f); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(200 * time.Millisecond) // END is there well before the URGENT frame
	if err := snd.SendUrgent(link.Urgent{Block: 0, Entry: 0x5000 | link.KindPage, Data: page}); err != nil {
		t.Fatal(err)
	}
	qemu.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(qemu) // up to the receiver's half-close after EOF
	if err != nil {
		t.Fatalf("reading the destination's stream: %v", err)
	}
	qemu.Close() // the destination closes its return path: the receiver finishes
	go io.Copy(io.Discard, readerFunc(snd.ReadReturn))
	select {
	case err := <-ran:
		if err != nil {
			t.Fatalf("receiver: %v", err)
		}
		if sum.Link == nil || sum.Link.LateUrgent != 1 {
			t.Errorf("summary %+v: want 1 URGENT frame after END", sum.Link)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the receiver did not finish")
	}
	at := bytes.Index(got, page)
	if at < 0 {
		t.Fatalf("the destination's stream (%d bytes) lacks the page the URGENT frame carried", len(got))
	}
	if got[len(got)-1] != byte(stream.SectionEOF) || at+len(page) > len(got)-1 {
		t.Fatalf("the destination's stream does not end with EOF after the page (%d bytes, page at %d)", len(got), at)
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }
