package savevm

import (
	"bytes"
	"context"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
	"github.com/qemu-migrate-go/qemu-migrate-go/streamtest"
)

// multifdCapture is a recorded multifd migration: the main stream and each channel.
type multifdCapture struct {
	name     string
	main     []byte
	channels [][]byte
	layout   stream.MultifdLayout
	pages    int64 // pages the channel recordings carry
}

func multifdCaptures(t *testing.T) []multifdCapture {
	var out []multifdCapture
	for _, c := range streamtest.Captures(t) {
		if len(c.Meta.Channels) == 0 {
			continue
		}
		mc := multifdCapture{name: c.Name, main: streamtest.Read(t, c.Path), layout: stream.MultifdV100}
		if c.Meta.QEMU < "8" && c.Meta.QEMU[0] == '7' {
			mc.layout = stream.MultifdV72
		}
		for _, ch := range c.Meta.Channels {
			data := streamtest.Read(t, filepath.Join(filepath.Dir(c.Path), ch))
			mc.channels = append(mc.channels, data)
			rd := stream.NewMultifdReader(bytes.NewReader(data), mc.layout, stream.MultifdLimits{})
			if _, err := rd.ReadHello(); err != nil {
				t.Fatal(err)
			}
			for {
				p, err := rd.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				mc.pages += int64(p.NormalPages)
			}
		}
		out = append(out, mc)
	}
	return out
}

// channelConns serves each recorded channel on a connection, hello read off as the migration
// layer does, and returns the conns and hellos.
func channelConns(t *testing.T, channels [][]byte) ([]net.Conn, []*stream.MultifdHello) {
	var conns []net.Conn
	var hellos []*stream.MultifdHello
	for _, ch := range channels {
		a, b := net.Pipe()
		go func(ch []byte) { b.Write(ch); b.Close() }(ch)
		var hb [stream.MultifdHelloSize]byte
		if _, err := io.ReadFull(a, hb[:]); err != nil {
			t.Fatal(err)
		}
		h, err := stream.ParseMultifdHello(hb[:], 0)
		if err != nil {
			t.Fatal(err)
		}
		conns, hellos = append(conns, a), append(hellos, h)
	}
	return conns, hellos
}

// TestMultifdMergeCaptures relays real multifd migrations (main stream and channel recordings
// of 7.2 and 10.0, per-section and per-round modes) with their channels merged into one plain
// stream, and checks the result: it decodes and has every page the channels carried as a PAGE
// record. (QEMU 7.2's own normal counter is 41 below what its channels carried in this capture.)
func TestMultifdMergeCaptures(t *testing.T) {
	for _, c := range multifdCaptures(t) {
		t.Run(c.name, func(t *testing.T) {
			src, _ := fakeSource(c.main)
			dst := newRecDst()
			conns, hellos := channelConns(t, c.channels)
			r := NewRelay(src, dst, nil, Options{})
			r.SetMultifd(&Multifd{Layout: c.layout, Src: conns, Hellos: hellos})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			if _, err := r.Run(ctx); err != nil {
				t.Fatal(err)
			}
			out, _, _ := dst.state()
			rd := stream.NewReader(bytes.NewReader(out))
			var pages, flushes int64
			for {
				rec, err := rd.Next()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("the merged stream does not decode: %v", err)
				}
				if rec.Kind == stream.KindRAM {
					switch rec.RAM.Flags &^ stream.RAMContinue {
					case stream.RAMPage:
						pages++
					case stream.RAMMultifdFlush:
						flushes++
					}
				}
			}
			if pages != c.pages {
				t.Errorf("the merged stream has %d pages, the channels carried %d", pages, c.pages)
			}
			t.Logf("%d bytes in (main), %d out, %d pages, %d MULTIFD_FLUSH kept", len(c.main), len(out), pages, flushes)
		})
	}
}
