package inspect

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/qemu-migrate-go/qemu-migrate-go/stream"
)

// peekReader lets Inspect look at the first bytes to tell a migration stream from a multifd
// channel recording without consuming them.
type peekReader struct{ *bufio.Reader }

func newPeekReader(r io.Reader) *peekReader { return &peekReader{bufio.NewReaderSize(r, 64<<10)} }

func (p *peekReader) peek4() ([]byte, error) { return p.Peek(4) }

// inspectMultifd summarizes a multifd channel recording: the hello, then packets until the end.
// The 10.0 packet layout also reads 7.2 channels (its zero_pages field is reserved, zero, in 7.2).
func inspectMultifd(br *peekReader, cr *countReader, rep *Report) (*Report, error) {
	rep.Kind = "multifd-channel"
	m := &Multifd{}
	rep.Multifd = m
	mr := stream.NewMultifdReader(br, stream.MultifdV100, stream.MultifdLimits{})
	fail := func(err error) (*Report, error) {
		rep.Bytes = cr.n
		rep.Error = err.Error()
		var se *stream.Error
		if errors.As(err, &se) {
			rep.ErrorOffset = se.Offset
		}
		return rep, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	h, err := mr.ReadHello()
	if err != nil {
		return fail(err)
	}
	m.Channel, m.UUID = h.ChannelID, formatUUID(h.UUID)
	blocks := map[string]*Block{}
	for {
		p, err := mr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fail(err)
		}
		m.Packets++
		if p.Sync() {
			m.SyncPackets++
		}
		if p.IsDeviceState() {
			continue
		}
		m.NormalPages += int64(p.NormalPages)
		m.ZeroPages += int64(p.ZeroPages)
		if p.NormalPages+p.ZeroPages == 0 {
			continue
		}
		name := p.BlockName()
		b := blocks[name]
		if b == nil {
			b = &Block{Name: name, Distinct: -1}
			blocks[name] = b
			rep.RAMBlocks = append(rep.RAMBlocks, b)
		}
		b.Normal += int64(p.NormalPages)
		b.Zero += int64(p.ZeroPages)
	}
	rep.Bytes = cr.n
	return rep, nil
}
