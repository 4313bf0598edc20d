package savevm

import (
	"strings"
	"testing"
	"time"
)

// TestDecideBacklog: over a link the expected downtime counts the link's backlog (pages sent
// but not yet taken in by the receiver), so the policy holds while it drains — but not for
// ever: once the RAM alone has fitted the budget for backlogPatience, it releases.
func TestDecideBacklog(t *testing.T) {
	p := Policy{}.withDefaults()
	ms := time.Millisecond
	for _, tc := range []struct {
		name string
		o    observation
		want decision
		msg  string
	}{
		{"fits", observation{fresh: true, rate: 1, expected: 40 * ms, backlog: 30 * ms}, release, "expected downtime 40ms"},
		{"backlog-holds", observation{fresh: true, rate: 1, expected: 250*ms + 300*ms, backlog: 300 * ms, fitFor: time.Second}, hold, ""},
		{"backlog-patience", observation{fresh: true, rate: 1, expected: 250*ms + 300*ms, backlog: 300 * ms, fitFor: backlogPatience}, release, "300ms of it the link's backlog"},
		{"ram-too-big", observation{fresh: true, rate: 1, expected: 400 * ms}, hold, ""},
		{"not-fresh", observation{rate: 1, expected: 550 * ms, backlog: 300 * ms, fitFor: backlogPatience}, hold, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, why := p.decide(tc.o)
			if d != tc.want || !strings.Contains(why, tc.msg) {
				t.Errorf("decide = %v %q, want %v …%s…", d, why, tc.want, tc.msg)
			}
		})
	}
}

// TestHoldDowntime: in relay mode QEMU runs with the budget as its downtime-limit (its own rule
// then switches over mid-pass, as it would directly); over a link, where QEMU cannot see the
// backlog, it is held at 1 ms. QEMU's limit is in whole milliseconds and 0 would let it complete
// at every pass end.
func TestHoldDowntime(t *testing.T) {
	for _, c := range []struct {
		budget   time.Duration
		overLink bool
		want     time.Duration
	}{
		{0, false, 300 * time.Millisecond}, // the default budget
		{30 * time.Millisecond, false, 30 * time.Millisecond},
		{1500 * time.Microsecond, false, time.Millisecond},
		{100 * time.Microsecond, false, time.Millisecond},
		{0, true, time.Millisecond},
		{2 * time.Second, true, time.Millisecond},
	} {
		if got := HoldDowntime(Policy{Downtime: c.budget}, c.overLink); got != c.want {
			t.Errorf("HoldDowntime(%v, overLink %v) = %v, want %v", c.budget, c.overLink, got, c.want)
		}
	}
}
