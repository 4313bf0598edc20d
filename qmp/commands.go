package qmp

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// Status is the reply of query-status. Status is kept as a string so that run states added by
// newer QEMUs do not break decoding.
type Status struct {
	Status     string `json:"status"`
	Running    bool   `json:"running"`
	Singlestep bool   `json:"singlestep"`
}

// QueryStatus returns the VM's run state ("running", "paused", "postmigrate", …).
func (c *Client) QueryStatus(ctx context.Context) (Status, error) {
	var s Status
	err := c.Execute(ctx, "query-status", nil, &s)
	return s, err
}

// Version is the reply of query-version.
type Version struct {
	QEMU struct {
		Major int `json:"major"`
		Minor int `json:"minor"`
		Micro int `json:"micro"`
	} `json:"qemu"`
	Package string `json:"package"`
}

func (v Version) String() string {
	return fmt.Sprintf("%d.%d.%d", v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro)
}

// AtLeast reports whether the version is major.minor or newer.
func (v Version) AtLeast(major, minor int) bool {
	return v.QEMU.Major > major || v.QEMU.Major == major && v.QEMU.Minor >= minor
}

// QueryVersion returns the QEMU version.
func (c *Client) QueryVersion(ctx context.Context) (Version, error) {
	var v Version
	err := c.Execute(ctx, "query-version", nil, &v)
	return v, err
}

// RAMStats are the "ram" counters of query-migrate. Fields a QEMU does not report stay zero.
type RAMStats struct {
	Transferred      int64   `json:"transferred"`
	Remaining        int64   `json:"remaining"`
	Total            int64   `json:"total"`
	Duplicate        int64   `json:"duplicate"`
	Normal           int64   `json:"normal"`
	NormalBytes      int64   `json:"normal-bytes"`
	DirtyPagesRate   int64   `json:"dirty-pages-rate"`
	Mbps             float64 `json:"mbps"`
	DirtySyncCount   int64   `json:"dirty-sync-count"`
	PagesPerSecond   int64   `json:"pages-per-second"`
	PrecopyBytes     int64   `json:"precopy-bytes"`
	DowntimeBytes    int64   `json:"downtime-bytes"`
	MultifdBytes     int64   `json:"multifd-bytes"`
	PostcopyRequests int64   `json:"postcopy-requests"`
}

// XBZRLEStats are the "xbzrle-cache" counters of query-migrate.
type XBZRLEStats struct {
	CacheSize    int64   `json:"cache-size"`
	Bytes        int64   `json:"bytes"`
	Pages        int64   `json:"pages"`
	CacheMiss    int64   `json:"cache-miss"`
	Overflow     int64   `json:"overflow"`
	EncodingRate float64 `json:"encoding-rate"`
}

// MigrationInfo is the reply of query-migrate. Status is a string ("setup", "active",
// "completed", "failed", "cancelled", "device", "pre-switchover", …) so unknown states decode.
type MigrationInfo struct {
	Status           string       `json:"status"`
	TotalTime        int64        `json:"total-time"`        // ms
	Downtime         int64        `json:"downtime"`          // ms, after completion
	ExpectedDowntime int64        `json:"expected-downtime"` // ms, while active
	SetupTime        int64        `json:"setup-time"`        // ms
	RAM              *RAMStats    `json:"ram"`
	XBZRLE           *XBZRLEStats `json:"xbzrle-cache"`
	CPUThrottle      int64        `json:"cpu-throttle-percentage"` // auto-converge's current throttle
	ErrorDesc        string       `json:"error-desc"`
}

// InPostcopy reports whether the migration is past its switch to postcopy (the guest runs on
// the destination): active, paused by a broken connection, or recovering.
func (m MigrationInfo) InPostcopy() bool {
	switch m.Status {
	case "postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-recover-setup":
		return true
	}
	return false
}

// Finished reports whether the migration has ended, successfully or not.
func (m MigrationInfo) Finished() bool {
	switch m.Status {
	case "completed", "failed", "cancelled":
		return true
	}
	return false
}

// QueryMigrate returns the state and counters of the current (or last) migration.
func (c *Client) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var m MigrationInfo
	err := c.Execute(ctx, "query-migrate", nil, &m)
	return m, err
}

// Capability is one entry of query-migrate-capabilities.
type Capability struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

// QueryCapabilities returns the migration capabilities and their states, keyed by name.
func (c *Client) QueryCapabilities(ctx context.Context) (map[string]bool, error) {
	var caps []Capability
	if err := c.Execute(ctx, "query-migrate-capabilities", nil, &caps); err != nil {
		return nil, err
	}
	m := make(map[string]bool, len(caps))
	for _, cp := range caps {
		m[cp.Capability] = cp.State
	}
	return m, nil
}

// SetCapabilities sets migration capabilities by name.
func (c *Client) SetCapabilities(ctx context.Context, caps map[string]bool) error {
	list := make([]Capability, 0, len(caps))
	for name, on := range caps {
		list = append(list, Capability{Capability: name, State: on})
	}
	return c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil)
}

// QueryParameters returns the migration parameters as QEMU reports them.
func (c *Client) QueryParameters(ctx context.Context) (map[string]any, error) {
	var p map[string]any
	err := c.Execute(ctx, "query-migrate-parameters", nil, &p)
	return p, err
}

// SetParameters sets migration parameters, e.g. {"max-bandwidth": 1 << 40, "downtime-limit": 300}.
func (c *Client) SetParameters(ctx context.Context, params map[string]any) error {
	return c.Execute(ctx, "migrate-set-parameters", params, nil)
}

// Migrate starts an outgoing migration to uri ("unix:PATH", "tcp:HOST:PORT", "exec:CMD", …).
func (c *Client) Migrate(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil)
}

// MigrateIncoming starts listening for an incoming migration on a destination started with
// `-incoming defer`.
func (c *Client) MigrateIncoming(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil)
}

// MigrateCancel cancels the current outgoing migration; the source VM keeps its run state.
func (c *Client) MigrateCancel(ctx context.Context) error {
	return c.Execute(ctx, "migrate_cancel", nil, nil)
}

// MigrateStartPostcopy switches a migration with postcopy-ram to postcopy: the source stops the
// guest, sends the device state and the destination runs it, asking for pages it lacks.
func (c *Client) MigrateStartPostcopy(ctx context.Context) error {
	return c.Execute(ctx, "migrate-start-postcopy", nil, nil)
}

// MigrateRecover makes a destination paused in postcopy (postcopy-paused) listen on uri for the
// source's resumed migration.
func (c *Client) MigrateRecover(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate-recover", map[string]any{"uri": uri}, nil)
}

// MigrateResume makes a source paused in postcopy (postcopy-paused) resume its migration
// towards uri (migrate with resume: true).
func (c *Client) MigrateResume(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate", map[string]any{"uri": uri, "resume": true}, nil)
}

// MigratePause pauses a postcopy migration as a network failure would (postcopy-paused), so that
// it can be recovered.
func (c *Client) MigratePause(ctx context.Context) error {
	return c.Execute(ctx, "migrate-pause", nil, nil)
}

// MigrateContinue lets a migration paused in state (with pause-before-switchover) go on.
func (c *Client) MigrateContinue(ctx context.Context, state string) error {
	return c.Execute(ctx, "migrate-continue", map[string]any{"state": state}, nil)
}

// Stop pauses the VM.
func (c *Client) Stop(ctx context.Context) error { return c.Execute(ctx, "stop", nil, nil) }

// Cont resumes the VM.
func (c *Client) Cont(ctx context.Context) error { return c.Execute(ctx, "cont", nil, nil) }

// Quit makes QEMU exit.
func (c *Client) Quit(ctx context.Context) error { return c.Execute(ctx, "quit", nil, nil) }

// HMP runs a human monitor command and returns its output. HMP reports many failures only in its
// output text; an output that starts with "Error" is returned as a *CommandError.
func (c *Client) HMP(ctx context.Context, line string) (string, error) {
	var out string
	if err := c.Execute(ctx, "human-monitor-command", map[string]any{"command-line": line}, &out); err != nil {
		return "", err
	}
	if strings.HasPrefix(out, "Error") {
		return out, &CommandError{Command: "human-monitor-command " + line, Desc: strings.TrimSpace(out)}
	}
	return out, nil
}

// PMemSave writes size bytes of guest physical memory from addr to path (on QEMU's host).
func (c *Client) PMemSave(ctx context.Context, addr, size int64, path string) error {
	return c.Execute(ctx, "pmemsave", map[string]any{"val": addr, "size": size, "filename": path}, nil)
}

// WaitMigration polls query-migrate every interval until the migration has finished
// (completed, failed or cancelled) and its total-time is reported, or ctx ends. QEMU fills in
// total-time and downtime shortly after the status changes, so a reply with status "completed"
// and total-time 0 is polled again.
func (c *Client) WaitMigration(ctx context.Context, interval time.Duration) (MigrationInfo, error) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		m, err := c.QueryMigrate(ctx)
		if err != nil {
			return m, err
		}
		if m.Finished() && (m.Status != "completed" || m.TotalTime > 0) {
			return m, nil
		}
		select {
		case <-ctx.Done():
			return m, fmt.Errorf("qmp: migration still %q: %w", m.Status, ctx.Err())
		case <-t.C:
		}
	}
}

// WaitEvent waits until an event named name arrives on events and match (nil = any) accepts it.
func WaitEvent(ctx context.Context, events <-chan Event, name string, match func(Event) bool) (Event, error) {
	for {
		select {
		case e, ok := <-events:
			if !ok {
				return Event{}, ErrClosed
			}
			if e.Name == name && (match == nil || match(e)) {
				return e, nil
			}
		case <-ctx.Done():
			return Event{}, fmt.Errorf("qmp: waiting for event %s: %w", name, ctx.Err())
		}
	}
}

// MachineType returns the exact machine type name the VM runs ("pc-q35-7.2" — never an alias
// like "q35"), read from the QOM type of /machine.
func (c *Client) MachineType(ctx context.Context) (string, error) {
	var t string
	if err := c.Execute(ctx, "qom-get", map[string]any{"path": "/machine", "property": "type"}, &t); err != nil {
		return "", err
	}
	return strings.TrimSuffix(t, "-machine"), nil
}
