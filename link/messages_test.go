package link

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

// roundTripControl writes a control frame through a Framer and returns the payload read back.
func roundTripControl(t *testing.T, ft FrameType, p []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := NewFramer("w", nil, &buf).WriteFrame(ft, p); err != nil {
		t.Fatal(err)
	}
	f, err := NewFramer("r", &buf, nil).ReadFrame()
	if err != nil || f.Type != ft {
		t.Fatalf("%v: read %v, %v", ft, f.Type, err)
	}
	return f.Payload
}

func TestHelloRoundTrip(t *testing.T) {
	for name, h := range map[string]Hello{
		"control": {MinVersion: 1, MaxVersion: 1, Role: "control", Connections: 4, Compress: []string{"none", "zstd", "s2", "lz4"},
			Source: &Endpoint{QEMU: "7.2.22", Machine: "pc-q35-7.2", RAM: 1 << 30, Status: "running"}, Sidecar: "v0.9", Features: []string{"verify"}},
		"control one":   {MinVersion: 1, MaxVersion: 7, Role: "control", Connections: 1},
		"control max":   {MinVersion: 0, MaxVersion: 0xffff, Role: "control", Connections: MaxConnections},
		"data":          {MinVersion: 1, MaxVersion: 1, Role: "data", Session: "00112233445566778899aabbccddeeff", Index: 1},
		"data last":     {MinVersion: 1, MaxVersion: 1, Role: "data", Session: "x", Index: MaxConnections},
		"unicode names": {MinVersion: 1, MaxVersion: 1, Role: "control", Connections: 2, Sidecar: "sidecar \u00e9\u4e2d\U0001F600 \"quoted\" \\ </script>"},
	} {
		t.Run(name, func(t *testing.T) {
			p, err := AppendHello([]byte("prefix"), h)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(p, []byte("prefixQMGL")) || binary.BigEndian.Uint16(p[10:]) != h.MinVersion || binary.BigEndian.Uint16(p[12:]) != h.MaxVersion {
				t.Fatalf("payload starts % x", p[:14])
			}
			got, err := ParseHello(roundTripControl(t, FrameHello, p[len("prefix"):]))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, h) {
				t.Fatalf("decoded %+v, want %+v", got, h)
			}
		})
	}
}

func TestHelloRefusals(t *testing.T) {
	hello := func(min, max uint16, j string) []byte {
		b := append([]byte("QMGL"), 0, 0, 0, 0)
		binary.BigEndian.PutUint16(b[4:], min)
		binary.BigEndian.PutUint16(b[6:], max)
		return append(b, j...)
	}
	for _, tc := range []struct {
		name string
		p    []byte
		want string
	}{
		{"empty", nil, "no QMGL magic"},
		{"short", []byte("QMGL\x00\x01\x00"), "no QMGL magic"},
		{"wrong magic", hello(1, 1, `{"role":"control","connections":1}`)[1:], "no QMGL magic"},
		{"QEMU stream", []byte("QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0apc-q35-7.2"), "no QMGL magic"},
		{"versions reversed", hello(2, 1, `{"role":"control","connections":1}`), "HELLO offers versions 2 to 1"},
		{"no JSON", hello(1, 1, ""), "HELLO: unexpected end of JSON input"},
		{"bad JSON", hello(1, 1, `{"role":"control",`), "HELLO:"},
		{"JSON trailing", hello(1, 1, `{"role":"control","connections":1}{}`), "HELLO:"},
		{"JSON wrong type", hello(1, 1, `{"role":"control","connections":"4"}`), "HELLO:"},
		{"no role", hello(1, 1, `{"connections":1}`), `HELLO with role ""`},
		{"unknown role", hello(1, 1, `{"role":"admin","connections":1}`), `HELLO with role "admin"`},
		{"null", hello(1, 1, `null`), `HELLO with role ""`},
		{"no connections", hello(1, 1, `{"role":"control"}`), "HELLO asks for 0 data connections (1 to 16)"},
		{"17 connections", hello(1, 1, `{"role":"control","connections":17}`), "HELLO asks for 17 data connections"},
		{"negative connections", hello(1, 1, `{"role":"control","connections":-1}`), "HELLO asks for -1 data connections"},
		{"data no session", hello(1, 1, `{"role":"data","index":1}`), `data connection HELLO with index 1 and session ""`},
		{"data index 0", hello(1, 1, `{"role":"data","session":"ab"}`), "data connection HELLO with index 0"},
		{"data index 17", hello(1, 1, `{"role":"data","session":"ab","index":17}`), "data connection HELLO with index 17"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := ParseHello(tc.p)
			if err == nil {
				t.Fatalf("accepted: %+v", h)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%q, want …%s…", err, tc.want)
			}
		})
	}
}

func TestWelcomeRoundTrip(t *testing.T) {
	for name, w := range map[string]Welcome{
		"control": {Version: 1, Session: "00112233445566778899aabbccddeeff", Connections: 4, Compress: CodecNames(),
			Destination: &Endpoint{QEMU: "10.0.2", Status: "inmigrate"}, Features: []string{"verify"}},
		"data":        {Version: 1},
		"max version": {Version: 0xffff, Connections: MaxConnections},
	} {
		t.Run(name, func(t *testing.T) {
			p, err := AppendWelcome(nil, w)
			if err != nil {
				t.Fatal(err)
			}
			got, err := ParseWelcome(roundTripControl(t, FrameWelcome, p))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, w) {
				t.Fatalf("decoded %+v, want %+v", got, w)
			}
		})
	}
	for _, p := range [][]byte{nil, []byte("QMGL\x00"), []byte("QMGX\x00\x01{}"), []byte("QMGL\x00\x01"), []byte("QMGL\x00\x01{"), []byte(`QMGL` + "\x00\x01" + `{"connections":"x"}`)} {
		if w, err := ParseWelcome(p); err == nil {
			t.Errorf("ParseWelcome(%q) accepted: %+v", p, w)
		}
	}
}

func TestPingRoundTrip(t *testing.T) {
	for _, p := range []Ping{{}, {Nonce: 1, Received: 2, Applied: 3}, {1<<64 - 1, 1<<64 - 1, 1<<64 - 1}} {
		b := p.Append(nil)
		if len(b) != 24 {
			t.Fatalf("PING of %d bytes", len(b))
		}
		got, err := ParsePing(roundTripControl(t, FramePing, b))
		if err != nil || got != p {
			t.Errorf("%+v: %+v, %v", p, got, err)
		}
	}
	for _, n := range []int{0, 8, 23, 25, 64} {
		if _, err := ParsePing(make([]byte, n)); err == nil || !strings.Contains(err.Error(), "want 24") {
			t.Errorf("PING of %d bytes: %v", n, err)
		}
	}
}

func TestErrorRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		code ErrorCode
		msg  string
	}{
		{CodeProtocol, "link: data 2 connection, offset 77: frame header: unknown frame type 0x42"},
		{CodeRefused, "the destination QEMU 7.2.22 does not know machine pc-q35-10.0"},
		{CodeDestination, ""},
		{CodeSource, "the sending sidecar gave up"},
		{CodeCancelled, "interrupted \u00e9\u4e2d\U0001F600"},
		{CodeTimeout, strings.Repeat("t", maxErrorMessage)},
		{ErrorCode(0xffff), "a code from a later version"},
	} {
		b := AppendError(nil, tc.code, tc.msg)
		re, err := ParseError(roundTripControl(t, FrameError, b))
		if err != nil {
			t.Fatalf("%v: %v", tc.code, err)
		}
		if re.Code != tc.code || re.Message != tc.msg || re.Error() != tc.msg {
			t.Errorf("%v %q: decoded %v %q", tc.code, tc.msg, re.Code, re.Message)
		}
	}
}

// TestAppendErrorBounds: a message is cut to 4 KiB of valid UTF-8, whatever it was, so that
// the peer's ParseError takes it.
func TestAppendErrorBounds(t *testing.T) {
	for name, msg := range map[string]string{
		"long ASCII":          strings.Repeat("a", 10000),
		"rune across the cut": strings.Repeat("a", maxErrorMessage-1) + "\u4e2d" + "tail",
		"emoji at the cut":    strings.Repeat("a", maxErrorMessage-2) + "\U0001F600",
		"invalid UTF-8":       "bad \xff\xfe bytes \xc3",
		"all invalid":         strings.Repeat("\xff", 5000),
	} {
		b := AppendError(nil, CodeProtocol, msg)
		if len(b) > 2+maxErrorMessage {
			t.Errorf("%s: ERROR payload of %d bytes", name, len(b))
		}
		if !utf8.Valid(b[2:]) {
			t.Errorf("%s: message is not UTF-8", name)
		}
		re, err := ParseError(b)
		if err != nil {
			t.Errorf("%s: the peer refuses it: %v", name, err)
			continue
		}
		if want := msg[:min(len(msg), 8)]; utf8.ValidString(want) && !strings.HasPrefix(re.Message, want) {
			t.Errorf("%s: message %.20q does not start like %.20q", name, re.Message, msg)
		}
	}
	for _, tc := range []struct {
		p    []byte
		want string
	}{
		{nil, "ERROR of 0 bytes"},
		{[]byte{0}, "ERROR of 1 bytes"},
		{append([]byte{0, 1}, strings.Repeat("a", maxErrorMessage+1)...), "ERROR of 4099 bytes"},
		{[]byte("\x00\x01bad \xff"), "not UTF-8"},
	} {
		if _, err := ParseError(tc.p); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseError(%.20q): %v, want %s", tc.p, err, tc.want)
		}
	}
}

func TestErrorCodeNames(t *testing.T) {
	// PROTOCOL.md §2.1.
	for code, name := range map[ErrorCode]string{1: "protocol", 2: "refused", 3: "destination", 4: "source", 5: "cancelled", 6: "timeout"} {
		if code.String() != name {
			t.Errorf("%d: %q, want %q", uint16(code), code.String(), name)
		}
	}
	if s := ErrorCode(7).String(); s != "ErrorCode(7)" {
		t.Errorf("ErrorCode(7) = %q", s)
	}
}

func TestDeliveredJSON(t *testing.T) {
	d := Delivered{State: "delivered", BytesOut: 1 << 33, DeliveredMs: 12}
	b, err := AppendJSON(nil, d)
	if err != nil {
		t.Fatal(err)
	}
	var got Delivered
	if err := json.Unmarshal(roundTripControl(t, FrameDelivered, b), &got); err != nil || got != d {
		t.Fatalf("%+v, %v", got, err)
	}
	if !HasFeature([]string{"a", "verify"}, "verify") || HasFeature(nil, "verify") || HasFeature([]string{"verify2"}, "verify") {
		t.Error("HasFeature")
	}
}
