package linuxguest

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
	"testing"
)

// testArchive writes the entries (name → content; a name ending in "/" is a directory,
// "@" in front a symlink "@name=target", "!" a character device) and returns the archive.
func testArchive(t testing.TB, entries ...string) []byte {
	t.Helper()
	var b bytes.Buffer
	w := NewWriter(&b)
	for _, e := range entries {
		var h Header
		var data string
		switch {
		case strings.HasSuffix(e, "/"):
			h = Header{Name: strings.TrimSuffix(e, "/"), Mode: ModeDir | 0o755}
		case strings.HasPrefix(e, "@"):
			name, target, _ := strings.Cut(e[1:], "=")
			h, data = Header{Name: name, Mode: ModeSymlink | 0o777, Size: int64(len(target))}, target
		case strings.HasPrefix(e, "!"):
			h = Header{Name: e[1:], Mode: ModeCharDev | 0o600, Major: 5, Minor: 1}
		default:
			name, content, _ := strings.Cut(e, "=")
			h, data = Header{Name: name, Mode: ModeRegular | 0o644, Size: int64(len(content)), Mtime: 1700000000}, content
		}
		if err := w.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(w, data); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if int64(b.Len()) != w.Offset() || b.Len()%4 != 0 {
		t.Fatalf("archive is %d bytes, writer counted %d (must be a multiple of 4)", b.Len(), w.Offset())
	}
	return b.Bytes()
}

func TestCpioRoundTrip(t *testing.T) {
	arch := testArchive(t, "dev/", "!dev/console", "init=\x7fELF...", "a/", "a/b=", "a/c=xyz", "@a/l=c",
		"a/long-name-of-odd-length="+strings.Repeat("q", 4097))
	r := NewReader(bytes.NewReader(arch))
	var got []string
	for {
		h, err := r.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Offset%4 != 0 {
			t.Errorf("%s: header at %d, not 4-aligned", h.Name, h.Offset)
		}
		data, err := io.ReadAll(r)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, fmt.Sprintf("%s %o %d:%d %d %q", h.Name, h.Mode, h.Major, h.Minor, h.Ino, trim(string(data))))
	}
	want := []string{
		`dev 40755 0:0 1 ""`, `dev/console 20600 5:1 2 ""`, `init 100644 0:0 3 "\x7fELF..."`, `a 40755 0:0 4 ""`,
		`a/b 100644 0:0 5 ""`, `a/c 100644 0:0 6 "xyz"`, `a/l 120777 0:0 7 "c"`,
		`a/long-name-of-odd-length 100644 0:0 8 "qqqq…(4097)"`,
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("read back:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func trim(s string) string {
	if len(s) > 8 {
		return fmt.Sprintf("%s…(%d)", s[:4], len(s))
	}
	return s
}

// TestCpioBytes pins the exact encoding of one entry and the trailer against the format of
// the kernel's buffer-format.rst (as GNU cpio -H newc writes it).
func TestCpioBytes(t *testing.T) {
	got := string(testArchive(t, "ab=xyz"))
	want := "070701" + "00000001" + "000081a4" + "00000000" + "00000000" + "00000001" + "6553f100" + "00000003" +
		"00000000" + "00000000" + "00000000" + "00000000" + "00000003" + "00000000" + "ab\x00" + // 113 bytes: pad to 116
		"\x00\x00\x00" + "xyz\x00" +
		"070701" + strings.Repeat("0", 8*4) + "00000001" + strings.Repeat("0", 8*6) + "0000000b" + "00000000" + "TRAILER!!!\x00" + "\x00\x00\x00"
	if got != want {
		t.Errorf("archive\n%q\nwant\n%q", got, want)
	}
}

func TestCpioWriterErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(w *Writer) error
		want string
	}{
		{"empty name", func(w *Writer) error { return w.WriteHeader(&Header{Mode: ModeRegular}) }, "name of 0 bytes"},
		{"NUL", func(w *Writer) error { return w.WriteHeader(&Header{Name: "a\x00b", Mode: ModeRegular}) }, "NUL"},
		{"trailer name", func(w *Writer) error { return w.WriteHeader(&Header{Name: "TRAILER!!!", Mode: ModeRegular}) }, "trailer"},
		{"long name", func(w *Writer) error {
			return w.WriteHeader(&Header{Name: strings.Repeat("x", MaxNameLen), Mode: ModeRegular})
		}, "outside"},
		{"huge", func(w *Writer) error { return w.WriteHeader(&Header{Name: "a", Mode: ModeRegular, Size: 1 << 32}) }, "size"},
		{"dir with data", func(w *Writer) error { return w.WriteHeader(&Header{Name: "a", Mode: ModeDir, Size: 1}) }, "no data"},
		{"fifo", func(w *Writer) error { return w.WriteHeader(&Header{Name: "a", Mode: 0o010644}) }, "unsupported"},
		{"too much data", func(w *Writer) error {
			w.WriteHeader(&Header{Name: "a", Mode: ModeRegular, Size: 2})
			_, err := w.Write([]byte("abc"))
			return err
		}, "past the entry's size"},
		{"short entry", func(w *Writer) error {
			w.WriteHeader(&Header{Name: "a", Mode: ModeRegular, Size: 2})
			w.Write([]byte("a"))
			return w.WriteHeader(&Header{Name: "b", Mode: ModeRegular})
		}, "1 bytes short"},
		{"short at close", func(w *Writer) error {
			w.WriteHeader(&Header{Name: "a", Mode: ModeRegular, Size: 2})
			return w.Close()
		}, "2 bytes short"},
	} {
		err := tc.run(NewWriter(io.Discard))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one saying %q", tc.name, err, tc.want)
		}
	}
}

func TestCpioReaderErrors(t *testing.T) {
	good := testArchive(t, "a=hello")
	for _, tc := range []struct {
		name string
		arch []byte
		want string
	}{
		{"empty", nil, "at byte 0: truncated header"},
		{"magic", append([]byte("070707"), good[6:]...), "at byte 0: magic"},
		{"hex", append(append(append([]byte{}, good[:14]...), 'g'), good[15:]...), "at byte 14: field 1"},
		{"name size", func() []byte {
			b := append([]byte{}, good...)
			copy(b[94:], "00000000")
			return b
		}(), "at byte 94: name size 0"},
		{"no trailer", good[:124], "truncated header"},
		{"truncated data", good[:118], "truncated"},
	} {
		r := NewReader(bytes.NewReader(tc.arch))
		var err error
		for err == nil {
			if _, err = r.Next(); err == nil {
				_, err = io.Copy(io.Discard, r)
			}
		}
		if err == io.EOF || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one saying %q", tc.name, err, tc.want)
		}
		if _, again := r.Next(); again != err {
			t.Errorf("%s: error not sticky: %v then %v", tc.name, err, again)
		}
	}
}

// FuzzCpioReader: any input reads to an end (EOF or an error with an offset) without a
// panic, and within its own length.
func FuzzCpioReader(f *testing.F) {
	f.Add(testArchive(f, "dev/", "!dev/console", "init=abc", "@l=init"))
	f.Add([]byte("070701"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewReader(bytes.NewReader(data))
		for i := 0; ; i++ {
			h, err := r.Next()
			if err != nil {
				if err != io.EOF && !strings.Contains(err.Error(), "at byte ") {
					t.Fatalf("error without an offset: %v", err)
				}
				return
			}
			if h.Offset > int64(len(data)) || len(h.Name) >= MaxNameLen {
				t.Fatalf("entry %d: offset %d, name %d bytes, in %d bytes of input", i, h.Offset, len(h.Name), len(data))
			}
			io.Copy(io.Discard, r)
		}
	})
}

func TestManifestRoundTrip(t *testing.T) {
	in := []Entry{{"data/a/b c", 3, crc32.Checksum([]byte("abc"), Castagnoli)}, {"data/x", 0, 0}}
	var b bytes.Buffer
	if err := WriteManifest(&b, in); err != nil {
		t.Fatal(err)
	}
	if want := "qmg-manifest 1 crc32c\n364b3fb7 3 data/a/b c\n00000000 0 data/x\n"; b.String() != want {
		t.Errorf("manifest %q, want %q", b.String(), want) // crc32c("abc") = 0x364b3fb7 (RFC 3720 check values' algorithm)
	}
	out, err := ParseManifest(&b)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(out) != fmt.Sprint(in) {
		t.Errorf("parsed %v, want %v", out, in)
	}
	if err := WriteManifest(io.Discard, []Entry{{"a\nb", 1, 1}}); err == nil {
		t.Error("a path with a newline was listed")
	}
}

func TestManifestErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "empty"},
		{"qmg-manifest 2 crc32c\n", "line 1 at byte 0"},
		{"qmg-manifest 1 crc32c\n0000000 1 a\n", "line 2 at byte 22"},
		{"qmg-manifest 1 crc32c\n00000000 -1 a\n", "line 2 at byte 22"},
		{"qmg-manifest 1 crc32c\n00000000 1 /a\n", "line 2"},
		{"qmg-manifest 1 crc32c\n00000000 1 a\n00000000 1 b", "line 3 at byte 35: no newline"},
		{"qmg-manifest 1 crc32c\n00000000 1 " + strings.Repeat("a", MaxNameLen+40) + "\n", "longer than"},
	} {
		_, err := ParseManifest(strings.NewReader(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%.40q: error %v, want one saying %q", tc.in, err, tc.want)
		}
	}
}

func FuzzManifest(f *testing.F) {
	f.Add("qmg-manifest 1 crc32c\n364b3fb7 3 data/a/b c\n")
	f.Add("qmg-manifest 1 crc32c\n")
	f.Fuzz(func(t *testing.T, in string) {
		entries, err := ParseManifest(strings.NewReader(in))
		if err != nil {
			return
		}
		var b bytes.Buffer
		if err := WriteManifest(&b, entries); err != nil {
			t.Fatalf("parsed entries do not write back: %v", err)
		}
		again, err := ParseManifest(&b)
		if err != nil || fmt.Sprint(again) != fmt.Sprint(entries) {
			t.Fatalf("round trip: %v, %v != %v", err, again, entries)
		}
	})
}

func TestCmdline(t *testing.T) {
	o := Options{DirtyMiB: 64, RateMiBs: 8, TickMs: 500, VerifySec: 3, BodyEvery: 32, Seed: 1 << 40, Control: "ttyS1"}
	got, err := ParseCmdline("console=ttyS0 quiet " + o.Cmdline() + " other.param=1")
	if err != nil || got != o {
		t.Errorf("round trip: %+v, %v; want %+v", got, err, o)
	}
	if got, err := ParseCmdline("console=ttyS0"); err != nil || got != (Options{TickMs: DefaultTickMs}) {
		t.Errorf("defaults: %+v, %v", got, err)
	}
	for _, bad := range []string{"qmg.dirty=-1", "qmg.rate=x", "qmg.tick=99999999", "qmg.nope=1", "qmg.ctl=../x", "qmg.seed=-1"} {
		if _, err := ParseCmdline(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

func TestParseLine(t *testing.T) {
	l, ok := ParseLine("[    1.2] x QMG FILES OK seq=3 files=10 first=\"a b\"\r")
	if !ok || l.Kind != KindFiles || l.Word != "OK" || l.Fields["seq"] != "3" || l.Text != `QMG FILES OK seq=3 files=10 first="a b"` {
		t.Errorf("parsed %+v, %v", l, ok)
	}
	if n, ok := l.Int("files"); n != 10 || !ok {
		t.Errorf("files = %d, %v", n, ok)
	}
	if _, ok := l.Int("first"); ok {
		t.Error("first read as a number")
	}
	for _, s := range []string{"", "QMG ", "QMGX READY", "[ 0.1] Linux version 6.1", "QMG READY " + strings.Repeat("x", MaxLineLen)} {
		if _, ok := ParseLine(s); ok {
			t.Errorf("%.30q parsed as a report", s)
		}
	}
	ls := ParseLines("QMG BOOT t=1\nnoise\nQMG TICK seq=1 rate_mibs=2.5\n")
	if len(ls) != 2 || ls[1].Kind != KindTick {
		t.Fatalf("lines %+v", ls)
	}
	if f, ok := ls[1].Float("rate_mibs"); f != 2.5 || !ok {
		t.Errorf("rate = %v, %v", f, ok)
	}
}

func FuzzParseLine(f *testing.F) {
	f.Add("QMG TICK seq=1 t=2.00 pages=3 pass=1 rate_mibs=4.0 bad=0")
	f.Add("QMG FILES BAD seq=1 first=\"x\"")
	f.Fuzz(func(t *testing.T, s string) {
		l, ok := ParseLine(s)
		if ok && (l.Kind == "" || !strings.HasPrefix(l.Text, LinePrefix) || len(l.Text) > MaxLineLen) {
			t.Fatalf("%q parsed as %+v", s, l)
		}
	})
}

func TestPagePattern(t *testing.T) {
	p := make([]uint64, PageWords)
	FillPage(p, 7, 12345, 9)
	if err := CheckPage(p, 7, 12345, 9, true); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name               string
		seed, index, gen   uint64
		body               bool
		corrupt, wantInErr string
	}{
		{"stale generation", 7, 12345, 10, false, "", "word 1"},
		{"other page", 7, 12346, 9, false, "", "word 0"},
		{"other seed", 8, 12345, 9, false, "", "word 2"},
		{"body word", 7, 12345, 9, true, "body", "word 300"},
		{"body unchecked", 7, 12345, 9, false, "body", ""},
		{"zero page", 7, 12345, 9, false, "zero", "word 0"},
	} {
		q := append([]uint64{}, p...)
		switch tc.corrupt {
		case "body":
			q[300] ^= 1 << 17
		case "zero":
			clear(q)
		}
		err := CheckPage(q, tc.seed, tc.index, tc.gen, tc.body)
		switch {
		case tc.wantInErr == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.wantInErr != "" && (!errors.Is(err, ErrPage) || !strings.Contains(err.Error(), tc.wantInErr)):
			t.Errorf("%s: error %v, want ErrPage naming %s", tc.name, err, tc.wantInErr)
		}
	}
	// Distinct pages and generations give distinct check words and bodies.
	seen := map[uint64]bool{}
	for i := uint64(0); i < 1000; i++ {
		for g := uint64(0); g < 4; g++ {
			seen[CheckWord(1, i, g)] = true
		}
		seen[BodyBase(1, i)] = true
	}
	if len(seen) != 5000 {
		t.Errorf("%d distinct words of 5000", len(seen))
	}
}
