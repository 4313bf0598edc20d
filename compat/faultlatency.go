package compat

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// FaultTraceArgs are the destination QEMU's arguments that log, with microsecond timestamps,
// every page its fault thread asks the source for and every page it places in postcopy, into
// path: FaultLatencies reads the request → placement latency the guest sees from it, for QEMU's
// own postcopy as for the sidecar's (QEMU itself reports only the total postcopy-blocktime).
func FaultTraceArgs(path string) []string {
	return []string{"-D", path, "-msg", "timestamp=on",
		"-trace", "postcopy_ram_fault_thread_request", "-trace", "postcopy_place_page", "-trace", "postcopy_place_page_zero"}
}

// FaultStats are the destination's page requests and how long each waited for its page.
type FaultStats struct {
	Requests  int // fault requests the trace shows
	Placed    int // of them, placed later in the trace (the latency samples)
	P50, P99  time.Duration
	Max       time.Duration
	Unmatched int // requests whose page the trace never shows placed

	// Where a long wait comes from. Starved counts the pauses of at least StallGap between two
	// placements (StarvedTime their sum): the destination had no page to load, because the
	// stream feeding it paused. HeadWaits counts the requests that waited at least StallGap for
	// a page that was the very next one placed: the page was not queued behind others at the
	// destination, the stream had not brought it yet.
	Starved     int
	StarvedTime time.Duration
	HeadWaits   int
}

// StallGap is the pause that FaultStats counts as the destination starved of pages.
const StallGap = time.Millisecond

// FaultLatencies reads a trace written with FaultTraceArgs. A request's latency runs from its
// postcopy_ram_fault_thread_request line to the first placement of the same host page after it;
// a page placed before the fault thread logged it (the page came first) counts 0.
func FaultLatencies(path string) (FaultStats, error) {
	f, err := os.Open(path)
	if err != nil {
		return FaultStats{}, err
	}
	defer f.Close()
	return faultLatencies(f)
}

func faultLatencies(rd io.Reader) (FaultStats, error) {
	var st FaultStats
	type request struct {
		at     time.Time
		placed int // placements before it
	}
	pending := map[uint64]request{}
	placed := map[uint64]bool{}
	var lat []time.Duration
	var last time.Time // the latest placement
	nplaced := 0
	sc := bufio.NewScanner(rd)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		at, name, args, ok := traceLine(sc.Text())
		if !ok {
			continue
		}
		switch name {
		case "postcopy_ram_fault_thread_request":
			hva, err := traceHex(args, "HVA=")
			if err != nil {
				return st, fmt.Errorf("line %d: %w", n, err)
			}
			page := hva &^ 4095
			switch _, asked := pending[page]; {
			case asked: // another vCPU faulted on the same page before it came: one wait
			case placed[page]:
				st.Requests++
				lat = append(lat, 0) // placed between the fault and its request's log line
			default:
				st.Requests++
				pending[page] = request{at, nplaced}
			}
		case "postcopy_place_page", "postcopy_place_page_zero":
			host, err := traceHex(args, "host=")
			if err != nil {
				return st, fmt.Errorf("line %d: %w", n, err)
			}
			placed[host] = true
			if gap := at.Sub(last); !last.IsZero() && gap >= StallGap {
				st.Starved++
				st.StarvedTime += gap
			}
			last = at
			nplaced++
			if r, ok := pending[host]; ok {
				w := max(0, at.Sub(r.at))
				lat = append(lat, w)
				if w >= StallGap && nplaced == r.placed+1 {
					st.HeadWaits++
				}
				delete(pending, host)
			}
		}
	}
	if err := sc.Err(); err != nil {
		return st, err
	}
	st.Placed, st.Unmatched = len(lat), len(pending)
	if len(lat) > 0 {
		slices.Sort(lat)
		st.P50, st.P99, st.Max = lat[len(lat)/2], lat[min(len(lat)-1, len(lat)*99/100)], lat[len(lat)-1]
	}
	return st, nil
}

// traceLine splits QEMU's log-backend line "TID@SEC.USEC:NAME ARGS".
func traceLine(l string) (at time.Time, name, args string, ok bool) {
	at0, rest, ok := strings.Cut(l, ":")
	if !ok {
		return
	}
	_, stamp, ok := strings.Cut(at0, "@")
	if !ok {
		return
	}
	sec, usec, ok := strings.Cut(stamp, ".")
	if !ok {
		return
	}
	s, err1 := strconv.ParseInt(sec, 10, 64)
	u, err2 := strconv.ParseInt(usec, 10, 64)
	if err1 != nil || err2 != nil {
		return at, "", "", false
	}
	name, args, _ = strings.Cut(rest, " ")
	return time.Unix(s, u*1000), name, args, true
}

// traceHex is the hexadecimal value after key (e.g. "host=0x7f…") in a trace line's arguments.
func traceHex(args, key string) (uint64, error) {
	i := strings.Index(args, key)
	if i < 0 {
		return 0, fmt.Errorf("no %q in %q", key, args)
	}
	v := args[i+len(key):]
	if j := strings.IndexByte(v, ' '); j >= 0 {
		v = v[:j]
	}
	return strconv.ParseUint(strings.TrimPrefix(v, "0x"), 16, 64)
}
