// Package streamtest hands the tests of every package the migration streams captured from real
// QEMU in testdata/streams (make testdata), with the counters QEMU reported for each capture —
// the oracle the decoders are checked against.
package streamtest

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
)

// Meta is NAME.json, written by compat/cmd/mktestdata beside NAME.bin.gz.
type Meta struct {
	Name         string          `json:"name"`
	Note         string          `json:"note"`
	QEMU         string          `json:"qemu"` // full version of the QEMU that made the capture
	CommandLine  string          `json:"command_line"`
	Capabilities map[string]bool `json:"capabilities"`
	Channels     []string        `json:"channels"` // multifd channel files, NAME.chN.bin.gz
	RAM          struct {
		Normal      int64 `json:"normal"`
		Duplicate   int64 `json:"duplicate"`
		Transferred int64 `json:"transferred"`
	} `json:"ram"`
	XBZRLE *struct {
		Pages int64 `json:"pages"`
	} `json:"xbzrle_cache"`
}

// Capture is one recorded migration: the main stream and its multifd channels, if any.
type Capture struct {
	Name     string // e.g. "idle-7.2"
	Path     string // the main stream, NAME.bin.gz
	Channels []string
	Meta     Meta
}

// Dir is testdata/streams of this repository.
func Dir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(filepath.Dir(file)), "testdata", "streams")
}

var channelFile = regexp.MustCompile(`\.ch[0-9]+\.bin\.gz$`)

// Captures lists every capture; it fails the test when there is none (the captures are part of
// the repository: a missing one is a broken checkout, not a reason to skip).
func Captures(t testing.TB) []Capture {
	t.Helper()
	paths, _ := filepath.Glob(filepath.Join(Dir(), "*.bin.gz"))
	var out []Capture
	for _, p := range paths {
		if channelFile.MatchString(p) {
			continue
		}
		name := strings.TrimSuffix(filepath.Base(p), ".bin.gz")
		c := Capture{Name: name, Path: p}
		b, err := os.ReadFile(filepath.Join(Dir(), name+".json"))
		if err != nil {
			t.Fatalf("capture %s has no %s.json: %v", name, name, err)
		}
		if err := json.Unmarshal(b, &c.Meta); err != nil {
			t.Fatalf("%s.json: %v", name, err)
		}
		for _, ch := range c.Meta.Channels {
			c.Channels = append(c.Channels, filepath.Join(Dir(), ch))
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		t.Fatalf("no captures in %s (make testdata)", Dir())
	}
	return out
}

// Read returns the bytes of a capture file, gunzipped when it ends in .gz.
func Read(t testing.TB, path string) []byte {
	t.Helper()
	b, err := ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ReadFile is Read for callers without a testing.TB.
func ReadFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil || !strings.HasSuffix(path, ".gz") {
		return b, err
	}
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if b, err = io.ReadAll(zr); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, nil
}

// Load returns the main stream of the capture called name ("idle-7.2").
func Load(t testing.TB, name string) []byte {
	t.Helper()
	return Read(t, filepath.Join(Dir(), name+".bin.gz"))
}
