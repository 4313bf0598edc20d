package guestram

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/zeebo/xxh3"
)

func appendUvarint(b []byte, v uint64) []byte { return binary.AppendUvarint(b, v) }
func appendChecksum(b []byte) []byte          { return binary.BigEndian.AppendUint64(b, xxh3.Hash(b)) }

// sampleList is a list with every kind of run: distinct hashes, zero pages, unread pages, a block
// not read, a partial last page.
func sampleList() *List {
	seed := uint64(99)
	zero := ZeroSum(seed)
	l := &List{Seed: seed}
	a := BlockHashes{Name: "pc.ram", Used: 40 * PageSize, Method: MethodProcessVM, Pages: make([]Sum, 40)}
	for i := range a.Pages {
		switch {
		case i%7 == 3, i >= 30:
			a.Pages[i] = zero
		default:
			a.Pages[i] = Sum{Hi: uint64(i) * 0x9e3779b97f4a7c15, Lo: ^uint64(i)}
		}
	}
	b := BlockHashes{Name: "pc.bios", Used: 5*PageSize + 100, Method: MethodPMemSave, Pages: make([]Sum, 6),
		Unread: []PageRange{{1, 3}}, Note: "pmemsave read what the guest sees of it: 2 of 6 pages not read"}
	for i := range b.Pages {
		if i < 1 || i >= 3 {
			b.Pages[i] = Sum{Hi: 7, Lo: uint64(i)}
		}
	}
	c := BlockHashes{Name: "/rom@etc/acpi/tables", Used: 0x20000, Note: "not read: no method"}
	l.Blocks = []BlockHashes{a, b, c}
	return l
}

func TestCodecRoundTrip(t *testing.T) {
	l := sampleList()
	enc, err := l.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(enc, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, l) {
		t.Fatalf("round trip changed the list:\n got %+v\nwant %+v", got, l)
	}
	if d := Compare(l, got, nil); d.Differing != 0 || d.Unverified != 2+32 {
		t.Errorf("compare after round trip:\n%s", d)
	}
	// The zero-page and unread runs cost a few bytes: 30 stored hashes of 46 pages.
	if max := 30*16 + 200; len(enc) > max {
		t.Errorf("encoded %d bytes, want at most %d", len(enc), max)
	}
}

// TestDecodeHostile cuts the encoding at every length and flips every byte: each must be rejected
// with a *DecodeError whose offset is inside the input.
func TestDecodeHostile(t *testing.T) {
	enc, err := sampleList().MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	check := func(what string, b []byte) {
		t.Helper()
		_, err := Decode(b, Limits{})
		var de *DecodeError
		if !errors.As(err, &de) {
			t.Fatalf("%s: error %v, want a *DecodeError", what, err)
		}
		if de.Offset < 0 || de.Offset > len(b) {
			t.Fatalf("%s: offset %d outside the %d-byte input", what, de.Offset, len(b))
		}
	}
	for n := 0; n < len(enc); n++ {
		check(fmt.Sprintf("cut at %d", n), enc[:n])
	}
	for i := range enc {
		for _, x := range []byte{0x01, 0x80, 0xff} {
			b := append([]byte(nil), enc...)
			b[i] ^= x
			check(fmt.Sprintf("byte %d ^ %#x", i, x), b)
		}
	}
	check("trailing byte", append(append([]byte(nil), enc...), 0))
}

// TestDecodeLimits: a small input that claims a huge guest is refused before anything is
// allocated, at the offset of the claim.
func TestDecodeLimits(t *testing.T) {
	// Build by hand: MarshalBinary would need the 2^28 hashes; a zero run says it in 5 bytes.
	b := []byte(listMagic)
	b = append(b, make([]byte, 8)...) // seed 0
	b = append(b, 1, 6)
	b = append(b, "pc.ram"...)
	b = appendUvarint(b, 1<<33)
	b = append(b, 1, 0)
	b = appendUvarint(b, runZero|uint64(1<<21)<<2)
	b = appendChecksum(b)
	_, err := Decode(b, Limits{MaxPages: 1 << 20})
	var de *DecodeError
	if !errors.As(err, &de) || de.Offset != len(listMagic)+8+2+6 {
		t.Fatalf("error %v, want a limit error at the used length (offset %d)", err, len(listMagic)+8+2+6)
	}
	if _, err := Decode(b, Limits{MaxPages: 1 << 21}); err != nil {
		t.Fatalf("with the limit raised: %v", err)
	}
	// Too many blocks.
	b = append([]byte(listMagic), make([]byte, 8)...)
	b = appendUvarint(b, 100000)
	b = appendChecksum(b)
	if _, err := Decode(b, Limits{}); !errors.As(err, &de) || de.Offset != 16 {
		t.Fatalf("error %v, want a block-count error at 16", err)
	}
}

// FuzzDecode: any input decodes or fails with a *DecodeError, never panics, and what decodes
// encodes back to the same bytes.
func FuzzDecode(f *testing.F) {
	enc, err := sampleList().MarshalBinary()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(enc)
	f.Add(enc[:len(enc)/2])
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := Decode(b, Limits{MaxPages: 1 << 16})
		if err != nil {
			var de *DecodeError
			if !errors.As(err, &de) || de.Offset < 0 || de.Offset > len(b) {
				t.Fatalf("bad error %v", err)
			}
			return
		}
		again, err := l.MarshalBinary()
		if err != nil {
			t.Fatalf("decoded list does not encode: %v", err)
		}
		l2, err := Decode(again, Limits{MaxPages: 1 << 16})
		if err != nil || !reflect.DeepEqual(l, l2) {
			t.Fatalf("re-encoding changed the list: %v", err)
		}
	})
}

// TestFuzzSeeds writes the seed corpus (testdata/fuzz/FuzzDecode) when QMG_WRITE_SEEDS=1, and
// otherwise checks that the committed seeds are the current encoding.
func TestFuzzSeeds(t *testing.T) {
	enc, err := sampleList().MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	seeds := map[string][]byte{"sample": enc, "cut": enc[:len(enc)/2]}
	for name, b := range seeds {
		path := filepath.Join("testdata", "fuzz", "FuzzDecode", name)
		want := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if os.Getenv("QMG_WRITE_SEEDS") == "1" {
			os.MkdirAll(filepath.Dir(path), 0o755)
			if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil || string(got) != want {
			t.Errorf("seed %s is stale or missing (QMG_WRITE_SEEDS=1 go test -run TestFuzzSeeds ./guestram/ rewrites it): %v", path, err)
		}
	}
}
