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

// PostcopyDir is testdata/streams/postcopy: the postcopy captures (make testdata, or
// `go run ./compat/cmd/mktestdata -postcopy`). They are kept apart from the precopy captures of
// Dir, which every package's tests treat as complete precopy streams with a vmdesc: a postcopy
// stream has none, and a capture has several files (return path, preempt channel, the
// connections of a recovery).
func PostcopyDir() string { return filepath.Join(Dir(), "postcopy") }

// Postcopy file keys of PostcopyMeta.Files.
const (
	PostcopyMain          = "main"           // source → destination, the main connection
	PostcopyRP            = "rp"             // destination → source on it: the return path
	PostcopyPreempt       = "preempt"        // the postcopy-preempt channel
	PostcopyResume        = "resume"         // main connection opened by a postcopy recovery
	PostcopyResumeRP      = "resume-rp"      // its return path
	PostcopyResumePreempt = "resume-preempt" // the preempt channel after the recovery
)

// PostcopyRAM are the source's query-migrate ram counters of a postcopy capture.
type PostcopyRAM struct {
	Normal           int64 `json:"normal"`
	Duplicate        int64 `json:"duplicate"`
	Transferred      int64 `json:"transferred"`
	DirtySyncCount   int64 `json:"dirty-sync-count"`
	PostcopyRequests int64 `json:"postcopy-requests"`
}

// PostcopyMeta is NAME.json of a postcopy capture, written by compat/cmd/mktestdata.
type PostcopyMeta struct {
	Name                   string            `json:"name"`
	Note                   string            `json:"note"`
	QEMU                   string            `json:"qemu"`
	CommandLine            string            `json:"command_line"`
	DestinationCommandLine string            `json:"destination_command_line"`
	Capabilities           map[string]bool   `json:"capabilities"`
	Parameters             map[string]any    `json:"parameters"`
	Files                  map[string]string `json:"files"`  // key (PostcopyMain, …) → file name
	Events                 []string          `json:"events"` // what the generator did, in order
	RAM                    PostcopyRAM       `json:"ram"`    // the source's final counters
	AtCut                  *PostcopyRAM      `json:"ram_at_cut"`
	Status                 string            `json:"status"`
	DestinationStatus      string            `json:"destination_status"`
}

// PostcopyCapture is one recorded postcopy migration (see PostcopyDir).
type PostcopyCapture struct {
	Name string
	Meta PostcopyMeta
}

// Path returns the file recorded for key (PostcopyMain, PostcopyRP, …), "" if there is none.
func (c PostcopyCapture) Path(key string) string {
	if f, ok := c.Meta.Files[key]; ok {
		return filepath.Join(PostcopyDir(), f)
	}
	return ""
}

// Read returns the bytes recorded for key, nil if the capture has no such file.
func (c PostcopyCapture) Read(t testing.TB, key string) []byte {
	t.Helper()
	if p := c.Path(key); p != "" {
		return Read(t, p)
	}
	return nil
}

// PostcopyCaptures lists every postcopy capture; like Captures it fails the test when there is
// none, or when a file its .json names is missing.
func PostcopyCaptures(t testing.TB) []PostcopyCapture {
	t.Helper()
	metas, _ := filepath.Glob(filepath.Join(PostcopyDir(), "*.json"))
	var out []PostcopyCapture
	for _, m := range metas {
		b, err := os.ReadFile(m)
		if err != nil {
			t.Fatal(err)
		}
		c := PostcopyCapture{Name: strings.TrimSuffix(filepath.Base(m), ".json")}
		if err := json.Unmarshal(b, &c.Meta); err != nil {
			t.Fatalf("%s: %v", m, err)
		}
		if c.Meta.Files[PostcopyMain] == "" || c.Meta.Files[PostcopyRP] == "" {
			t.Fatalf("%s: no main stream or return path listed", m)
		}
		for _, f := range c.Meta.Files {
			if _, err := os.Stat(filepath.Join(PostcopyDir(), f)); err != nil {
				t.Fatalf("%s: %v", m, err)
			}
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		t.Fatalf("no postcopy captures in %s (make testdata)", PostcopyDir())
	}
	return out
}

// LoadPostcopy returns the postcopy capture called name ("postcopy-7.2").
func LoadPostcopy(t testing.TB, name string) PostcopyCapture {
	t.Helper()
	for _, c := range PostcopyCaptures(t) {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no postcopy capture %q in %s", name, PostcopyDir())
	return PostcopyCapture{}
}
