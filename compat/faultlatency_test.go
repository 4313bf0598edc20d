package compat

import (
	"strings"
	"testing"
	"time"
)

// TestFaultLatencies reads a trace shaped as QEMU 10.0's log backend writes it with
// -msg timestamp=on (FaultTraceArgs): the lines below are the forms of real ones.
func TestFaultLatencies(t *testing.T) {
	trace := `qemu-system-x86_64: some warning without a trace prefix
4242@1764770000.000100:postcopy_ram_fault_thread_request Request for HVA=0x7f0000001234 rb=pc.ram offset=0x1000 pid=4250
4243@1764770000.000300:postcopy_place_page host=0x7f0000002000
4243@1764770000.000600:postcopy_place_page host=0x7f0000001000
4242@1764770000.000700:postcopy_ram_fault_thread_request Request for HVA=0x7f0000003008 rb=pc.ram offset=0x3000 pid=4251
4242@1764770000.000800:postcopy_ram_fault_thread_request Request for HVA=0x7f0000003ff0 rb=pc.ram offset=0x3000 pid=4252
4243@1764770000.002700:postcopy_place_page_zero host=0x7f0000003000
4242@1764770000.003000:postcopy_ram_fault_thread_request Request for HVA=0x7f0000002000 rb=pc.ram offset=0x2000 pid=4251
4242@1764770000.004000:postcopy_ram_fault_thread_request Request for HVA=0x7f0000009000 rb=pc.ram offset=0x9000 pid=4251
`
	st, err := faultLatencies(strings.NewReader(trace))
	if err != nil {
		t.Fatal(err)
	}
	// 0x1000: 500 µs; 0x3000 (two vCPUs, one wait): 2 ms; 0x2000 placed before its request: 0;
	// 0x9000 never placed. Nothing was placed from 600 µs to 2.7 ms (starved), and 0x3000's
	// 2 ms wait was for the next page placed (a head wait).
	want := FaultStats{Requests: 4, Placed: 3, P50: 500 * time.Microsecond, P99: 2 * time.Millisecond, Max: 2 * time.Millisecond, Unmatched: 1,
		Starved: 1, StarvedTime: 2100 * time.Microsecond, HeadWaits: 1}
	if st != want {
		t.Errorf("got %+v, want %+v", st, want)
	}
	if _, err := faultLatencies(strings.NewReader("1@1.000001:postcopy_place_page host=zz\n")); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("a bad host address: %v", err)
	}
}
