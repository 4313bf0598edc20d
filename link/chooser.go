package link

import (
	"fmt"
	"math"
	"sync"
)

// Chooser picks the codec of each PAGES frame (PROTOCOL.md §3). "auto" decides per frame from
// how full the sender's queue towards the connections is (Session.Busy): a full queue means the
// link is slower than the sender can encode, so the strongest codec pays (zstd); a queue that
// empties means the link waits for the encoder, so a cheaper codec (s2), or none, keeps the link
// busy. The pair is then never slower than sending the pages raw, on any link. A fixed codec
// ("none", "zstd", "s2", "lz4") is used for every frame.
//
// zstd costs about three times s2's CPU; on pages that it shrinks little more than s2 does
// (the fill guest: 0.50 against 0.51) that CPU is taken from the QEMUs for nothing. So when
// the queue calls for zstd, auto uses it only while its measured ratio (Observe) is at least
// zstdGain better than s2's, and keeps both estimates fresh by trying each on one frame in
// sampleEvery.
type Chooser struct {
	auto  bool
	fixed Codec

	mu     sync.Mutex
	ratio  [4]float64 // per codec: moving average of encoded/raw size, NaN until observed
	strong uint64     // frames for which the queue called for the strong codec
}

// Auto's ratio rule.
const (
	zstdGain    = 0.9 // zstd when its ratio is below 0.9 × s2's
	sampleEvery = 16
	ratioWeight = 0.1 // weight of a new observation in the moving average
)

// Thresholds of the auto choice, in queue occupancy (0 empty, 1 full).
const (
	autoStrong = 0.5   // at or above: zstd
	autoFast   = 0.125 // at or above: s2; below: none
)

// NewChooser reads a --compress value ("" means auto).
func NewChooser(mode string) (*Chooser, error) {
	if mode == "" || mode == "auto" {
		c := &Chooser{auto: true}
		for i := range c.ratio {
			c.ratio[i] = math.NaN()
		}
		return c, nil
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
		return c.strongCodec()
	case busy >= autoFast:
		return CodecS2
	}
	return CodecNone
}

// strongCodec is zstd or s2 by their measured ratios.
func (c *Chooser) strongCodec() Codec {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.strong++
	z, s := c.ratio[CodecZstd], c.ratio[CodecS2]
	switch {
	case math.IsNaN(z) || c.strong%sampleEvery == 0:
		return CodecZstd
	case math.IsNaN(s) || c.strong%sampleEvery == sampleEvery/2:
		return CodecS2
	case z < zstdGain*s:
		return CodecZstd
	}
	return CodecS2
}

// Observe tells auto what a frame's codec made of raw bytes: encoded is the codec's output
// (raw when the codec gave up on the frame).
func (c *Chooser) Observe(codec Codec, raw, encoded int) {
	if !c.auto || raw <= 0 || int(codec) >= len(c.ratio) || codec == CodecNone {
		return
	}
	r := float64(encoded) / float64(raw)
	c.mu.Lock()
	defer c.mu.Unlock()
	if old := c.ratio[codec]; math.IsNaN(old) {
		c.ratio[codec] = r
	} else {
		c.ratio[codec] = old + ratioWeight*(r-old)
	}
}
