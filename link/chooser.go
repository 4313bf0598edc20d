package link

import "fmt"

// Chooser picks the codec of each PAGES frame (PROTOCOL.md §3). "auto" decides per frame from
// how full the sender's queue towards the connections is (Session.Busy): a full queue means the
// link is slower than the sender can encode, so the strongest codec pays (zstd); a queue that
// empties means the link waits for the encoder, so a cheaper codec (s2), or none, keeps the link
// busy. The pair is then never slower than sending the pages raw, on any link. A fixed codec
// ("none", "zstd", "s2", "lz4") is used for every frame.
type Chooser struct {
	auto  bool
	fixed Codec
}

// Thresholds of the auto choice, in queue occupancy (0 empty, 1 full).
const (
	autoStrong = 0.5   // at or above: zstd
	autoFast   = 0.125 // at or above: s2; below: none
)

// NewChooser reads a --compress value ("" means auto).
func NewChooser(mode string) (*Chooser, error) {
	if mode == "" || mode == "auto" {
		return &Chooser{auto: true}, nil
	}
	c, err := ParseCodec(mode)
	if err != nil {
		return nil, fmt.Errorf("--compress: %w (or auto)", err)
	}
	return &Chooser{fixed: c}, nil
}

// Pick returns the codec for the next frame given the queue occupancy busy.
func (c *Chooser) Pick(busy float64) Codec {
	if !c.auto {
		return c.fixed
	}
	switch {
	case busy >= autoStrong:
		return CodecZstd
	case busy >= autoFast:
		return CodecS2
	}
	return CodecNone
}
