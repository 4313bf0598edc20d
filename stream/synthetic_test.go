package stream

import (
	"bytes"
	"testing"
)

func TestSyntheticRoundTrip(t *testing.T) {
	for _, s := range syntheticStreams() {
		t.Run(s.name, func(t *testing.T) {
			sum, err := decodeAll(t, s.data, s.opts...)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(sum.reencoded, s.data) {
				t.Fatalf("round trip differs:\n in  %x\n out %x", s.data, sum.reencoded)
			}
			t.Logf("kinds %v cmds %v warnings %d", sum.kinds, sum.cmds, sum.warnings)
		})
	}
}
