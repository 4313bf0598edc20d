package qmp

import (
	"encoding/json"
	"testing"
)

// FuzzReplies decodes arbitrary JSON into the typed replies and events this package defines and
// runs their helpers: nothing may panic. The qmp package has no parser of its own beyond
// encoding/json (Execute unmarshals the "return" member into these structs; events arrive already
// decoded by go-qemu as map[string]any), so what is fuzzed is json.Unmarshal into the structs,
// Execute's two-step reply decoding, and the exported helpers (MigrationInfo.Finished,
// Version.String/AtLeast, the capability map built by QueryCapabilities).
func FuzzReplies(f *testing.F) {
	for _, s := range []string{
		`{"return": {"status": "active", "total-time": 12, "ram": {"transferred": 1, "remaining": 2, "total": 3, "mbps": 1.5, "dirty-sync-count": 4}, "xbzrle-cache": {"cache-size": 67108864, "encoding-rate": 0.5}}}`,
		`{"return": {"status": "completed", "downtime": 9, "total-time": 100}}`,
		`{"return": {"status": "failed", "error-desc": "Unable to write to socket"}}`,
		`{"return": {"status": "running", "running": true, "singlestep": false}}`,
		`{"return": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "Debian 1:10.0.2"}}`,
		`{"return": [{"capability": "xbzrle", "state": false}, {"capability": "x-ignore-shared", "state": true}]}`,
		`{"return": {"downtime-limit": 300, "max-bandwidth": 134217728, "tls-creds": ""}}`,
		`{"return": "human monitor output"}`,
		`{"event": "MIGRATION", "data": {"status": "completed"}, "timestamp": {"seconds": 1, "microseconds": 2}}`,
		`{"return": {"status": "pre-switchover", "ram": null, "xbzrle-cache": {}}}`,
		`{"return": {"qemu": {"major": 1e400}}}`,
		`{"return": {"total-time": -9223372036854775808}}`,
		`[]`, `null`, `{}`, `{"return": {}}`, "",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		// Execute's first step: the "return" member.
		var reply struct {
			Return json.RawMessage `json:"return"`
		}
		ret := raw
		if json.Unmarshal(raw, &reply) == nil && reply.Return != nil {
			ret = reply.Return
		}
		for _, in := range [][]byte{raw, ret} {
			var m MigrationInfo
			if json.Unmarshal(in, &m) == nil {
				_ = m.Finished()
				if m.RAM != nil {
					_ = m.RAM.Remaining + m.RAM.Total
				}
				if m.XBZRLE != nil {
					_ = m.XBZRLE.EncodingRate
				}
			}
			var st Status
			_ = json.Unmarshal(in, &st)
			var v Version
			if json.Unmarshal(in, &v) == nil {
				_ = v.String()
				_ = v.AtLeast(7, 2)
				_ = v.AtLeast(v.QEMU.Major, v.QEMU.Minor)
			}
			var caps []Capability
			if json.Unmarshal(in, &caps) == nil {
				m := make(map[string]bool, len(caps))
				for _, c := range caps {
					m[c.Capability] = c.State
				}
			}
			var params map[string]any
			_ = json.Unmarshal(in, &params)
			var out string
			_ = json.Unmarshal(in, &out)
			var ev struct {
				Event     string         `json:"event"`
				Data      map[string]any `json:"data"`
				Timestamp struct {
					Seconds      int64 `json:"seconds"`
					Microseconds int64 `json:"microseconds"`
				} `json:"timestamp"`
			}
			if json.Unmarshal(in, &ev) == nil {
				e := Event{Name: ev.Event, Data: ev.Data}
				_ = e.Data["status"]
			}
			// Round trip: what decoded must encode again.
			if json.Unmarshal(in, &m) == nil {
				if _, err := json.Marshal(m); err != nil {
					t.Fatalf("MigrationInfo decoded from %q does not encode: %v", in, err)
				}
			}
		}
		// CommandError formatting of an arbitrary description (HMP output, QEMU's error desc).
		_ = (&CommandError{Command: "query-migrate", Desc: string(raw)}).Error()
	})
}
