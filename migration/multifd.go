package migration

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// A source with multifd (what libvirt's --parallel leaves behind, or --multifd N) opens one main
// connection and N channel connections to the private socket (stream-format.md §4.1). The relay
// forwards the channels to a destination that has multifd with as many channels (seen through
// --dst-qmp), or merges their pages into one plain stream for a destination without it. What
// it cannot serve is refused before the source is touched.

// multifdPlan is how the source's channels will be served.
type multifdPlan struct {
	channels    int
	compression string
	layout      stream.MultifdLayout
	forward     bool             // to the destination's own channels
	dst         []transport.Conn // forward: the destination's channel connections
	enable      bool             // --multifd: the sidecar turns multifd on at the source
	oldChannels any              // the source's multifd-channels before --multifd, to put back
	// hellos are the channel hellos the source will send (its UUID, the channel id): forward
	// writes them to the destination's channels at once, because a destination reads each
	// channel's hello as it accepts it, in its main loop, and would accept no further channel
	// until it came.
	hellos []*stream.MultifdHello
}

// planMultifd reads the source's multifd settings (and the destination's, with --dst-qmp) and
// decides forward or merge, or refuses.
func (m *migration) planMultifd(ctx context.Context) error {
	caps, err := m.src.QueryCapabilities(ctx)
	if err != nil {
		return err
	}
	if !caps["multifd"] && m.o.Multifd <= 0 {
		return nil
	}
	p := &multifdPlan{channels: m.o.Multifd, compression: "none", enable: !caps["multifd"]}
	if v, ok := m.params["multifd-compression"].(string); ok {
		p.compression = v
	}
	p.oldChannels = m.params["multifd-channels"]
	if p.channels <= 0 {
		p.channels = 2 // QEMU's default
		if f, ok := m.params["multifd-channels"].(float64); ok {
			p.channels = int(f)
		}
	}
	if p.channels < 1 || p.channels > 255 {
		return usageError{fmt.Errorf("multifd with %d channels", p.channels)}
	}
	v, err := m.src.QueryVersion(ctx)
	if err != nil {
		return err
	}
	p.layout = stream.MultifdV100
	if !v.AtLeast(8, 0) {
		p.layout = stream.MultifdV72
	}
	refuse := func(format string, args ...any) error {
		return usageError{fmt.Errorf("the source's multifd (%d channels, compression %s) cannot be relayed here: %s",
			p.channels, p.compression, fmt.Sprintf(format, args...))}
	}
	if m.o.To.IsLink() {
		return refuse("a multifd source cannot be sent over the link yet; turn multifd off on the source, or relay it with --to tcp:")
	}
	if m.dst != nil {
		dcaps, err := m.dst.QueryCapabilities(ctx)
		if err != nil {
			return err
		}
		if dcaps["multifd"] {
			dparams, err := m.dst.QueryParameters(ctx)
			if err != nil {
				return err
			}
			dn, _ := dparams["multifd-channels"].(float64)
			dc, _ := dparams["multifd-compression"].(string)
			if dc == "" {
				dc = "none"
			}
			switch {
			case int(dn) != p.channels:
				return refuse("the destination has multifd with %d channels; give it %d (migrate-set-parameters multifd-channels)", int(dn), p.channels)
			case dc != p.compression:
				return refuse("the destination's multifd compression is %s; give it %s", dc, p.compression)
			case m.o.To.Scheme != "tcp" && m.o.To.Scheme != "unix":
				return refuse("the destination's channels need a socket: --to tcp: or unix:")
			}
			p.forward = true
			var u struct {
				UUID string `json:"UUID"`
			}
			if err := m.src.Execute(ctx, "query-uuid", nil, &u); err != nil {
				return err
			}
			uuid, err := parseUUID(u.UUID)
			if err != nil {
				return fmt.Errorf("the source's query-uuid: %w", err)
			}
			for i := 0; i < p.channels; i++ {
				p.hellos = append(p.hellos, &stream.MultifdHello{Magic: stream.MultifdMagic, Version: stream.MultifdVersion, UUID: uuid, ChannelID: uint8(i)})
			}
		}
	}
	if !p.forward && p.compression != "none" {
		return refuse("compressed channels (QEMU keeps one compression context per channel across packets) can only be forwarded to a destination with multifd and the same compression; give the destination multifd (with --dst-qmp), or set the source's multifd-compression to none")
	}
	m.multifd = p
	return nil
}

// openChannels opens the destination's channel connections (forward), after its main one: a
// 7.2 destination takes the first connection it accepts as the main channel.
func (m *migration) openChannels(ctx context.Context) error {
	p := m.multifd
	if p == nil || !p.forward {
		return nil
	}
	for i := 0; i < p.channels; i++ {
		c, err := transport.Open(ctx, m.o.To)
		if err != nil {
			return fmt.Errorf("multifd channel %d to the destination: %w", i, err)
		}
		if _, err := c.Write(p.hellos[i].Append(nil)); err != nil {
			c.Abort()
			return fmt.Errorf("multifd channel %d to the destination: %w", i, err)
		}
		p.dst = append(p.dst, c)
		m.defer_(func() {
			if !m.delivered {
				c.Abort()
			} else {
				c.Close()
			}
		})
	}
	return nil
}

// enableMultifd turns multifd on at the source for --multifd N (set back afterwards).
func (m *migration) enableMultifd(ctx context.Context) error {
	p := m.multifd
	if p == nil || !p.enable {
		return nil
	}
	if err := m.src.SetCapabilities(ctx, map[string]bool{"multifd": true}); err != nil {
		return err
	}
	m.defer_(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		m.src.SetCapabilities(ctx, map[string]bool{"multifd": false})
		if p.oldChannels != nil {
			m.src.SetParameters(ctx, map[string]any{"multifd-channels": p.oldChannels})
		}
	})
	return m.src.SetParameters(ctx, map[string]any{"multifd-channels": p.channels})
}

// acceptSource accepts the source's connections to the private socket: the main one and, with
// multifd, every channel, told apart by their first bytes ("QEVM" or the multifd magic).
func (m *migration) acceptSource(ctx context.Context) error {
	n := 1
	if m.multifd != nil {
		n += m.multifd.channels
	}
	var chans []net.Conn
	var hellos []*stream.MultifdHello
	if m.multifd != nil {
		chans = make([]net.Conn, m.multifd.channels)
		hellos = make([]*stream.MultifdHello, m.multifd.channels)
	}
	for got := 0; got < n; got++ {
		c, err := acceptBefore(ctx, m.private)
		if err != nil {
			if m.sconn == nil {
				return fmt.Errorf("the source QEMU did not connect to the private socket: %w", err)
			}
			return fmt.Errorf("the source opened %d of its %d multifd channels: %w", got-1, n-1, err)
		}
		m.defer_(func() { c.Close() })
		dl, _ := ctx.Deadline()
		c.SetReadDeadline(dl)
		var magic [4]byte
		if _, err := io.ReadFull(c, magic[:]); err != nil {
			return fmt.Errorf("a source connection sent nothing: %w", err)
		}
		switch binary.BigEndian.Uint32(magic[:]) {
		case stream.Magic:
			if m.sconn != nil {
				return errors.New("the source opened two main connections")
			}
			c.SetReadDeadline(time.Time{})
			m.sconn = &prefixConn{Conn: c, prefix: magic[:]}
		case stream.MultifdMagic:
			if m.multifd == nil {
				return errors.New("the source opened a multifd channel, but its multifd was off when the migration started")
			}
			var rest [stream.MultifdHelloSize - 4]byte
			if _, err := io.ReadFull(c, rest[:]); err != nil {
				return fmt.Errorf("a multifd channel's hello: %w", err)
			}
			h, err := stream.ParseMultifdHello(append(magic[:], rest[:]...), 0)
			if err != nil {
				return err
			}
			id := int(h.ChannelID)
			if id >= len(chans) || chans[id] != nil {
				return fmt.Errorf("the source opened multifd channel %d twice or beyond its %d channels", id, len(chans))
			}
			if m.multifd.forward && *h != *m.multifd.hellos[id] {
				return fmt.Errorf("the source's multifd channel %d hello differs from the one sent to the destination (uuid %x)", id, h.UUID)
			}
			c.SetReadDeadline(time.Time{})
			chans[id], hellos[id] = c, h
		default:
			return fmt.Errorf("a source connection starts with 0x%08x: neither a stream nor a multifd channel", binary.BigEndian.Uint32(magic[:]))
		}
	}
	if m.multifd != nil {
		m.channels = &savevm.Multifd{Layout: m.multifd.layout, Src: chans, Hellos: hellos, DstHelloSent: m.multifd.forward}
		if m.multifd.forward {
			for _, c := range m.multifd.dst {
				m.channels.Dst = append(m.channels.Dst, c)
			}
		}
	}
	return nil
}

// parseUUID reads QEMU's query-uuid ("00000000-0000-0000-0000-000000000000" when unset).
func parseUUID(s string) ([16]byte, error) {
	var u [16]byte
	h := strings.ReplaceAll(s, "-", "")
	if len(h) != 32 {
		return u, fmt.Errorf("UUID %q", s)
	}
	_, err := hex.Decode(u[:], []byte(h))
	return u, err
}

// prefixConn gives back the bytes read to classify a connection.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}
