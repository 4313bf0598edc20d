// Command mktestdata captures the migration streams in testdata/streams from real QEMU 7.2 and
// 10.0 (make testdata). Each capture NAME is stored as NAME.bin.gz (gzip: the streams are mostly
// pages of zeros and small counters and shrink 100–1000×; read them with zcat or the tests'
// loader), multifd channels as NAME.chN.bin.gz, and NAME.json beside it holds the QEMU command
// line, the migration settings and QEMU's own query-migrate counters — the oracle the stream
// tests compare record counts with.
//
// The postcopy captures (postcopyCaptures; -postcopy records only them) go to the postcopy/
// subfolder: a source and a destination QEMU of the same version migrate through a recording
// proxy that saves every direction of every connection — NAME.bin.gz (main stream),
// NAME.rp.bin.gz (return path), NAME.preempt.bin.gz (postcopy-preempt channel) and, for a
// recovery, NAME.resume.bin.gz / NAME.resume.rp.bin.gz — with NAME.json listing the files, both
// command lines, what was done when, and the source's counters (postcopy-requests included).
package main

import (
	"bufio"
	"compress/gzip"
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// capture is one stream to record.
type capture struct {
	name    string
	qemu    string
	machine string
	memMiB  int
	guest   string // "", "dirty"
	caps    map[string]bool
	params  map[string]any
	uuid    string
	shared  bool // memory-backend-file,share=on
	file    bool // migrate to file: (mapped-ram)
	rounds  int  // hold switchover until this many dirty syncs (needs a dirtying guest)
	note    string
}

var captures = []capture{
	{name: "idle-7.2", qemu: "7.2", machine: "q35", memMiB: 64, note: "idle q35, no boot device"},
	{name: "idle-10.0", qemu: "10.0", machine: "q35", memMiB: 64, note: "idle q35 (pc-q35-10.0): COMMAND 11"},
	{name: "idle-10.0-pc-q35-7.2", qemu: "10.0", machine: "pc-q35-7.2", memMiB: 64, note: "10.0 on the 7.2 machine type"},
	{name: "dirty-7.2", qemu: "7.2", machine: "q35", memMiB: 16, guest: "dirty", rounds: 4, note: "dirty guest, several iterations"},
	{name: "dirty-10.0", qemu: "10.0", machine: "q35", memMiB: 16, guest: "dirty", rounds: 4, note: "dirty guest, several iterations"},
	{name: "xbzrle-7.2", qemu: "7.2", machine: "q35", memMiB: 16, guest: "dirty", rounds: 4,
		caps: map[string]bool{"xbzrle": true}, params: map[string]any{"xbzrle-cache-size": 64 << 20}, note: "XBZRLE records"},
	{name: "xbzrle-10.0", qemu: "10.0", machine: "q35", memMiB: 16, guest: "dirty", rounds: 4,
		caps: map[string]bool{"xbzrle": true}, params: map[string]any{"xbzrle-cache-size": 64 << 20}, note: "XBZRLE records"},
	{name: "compress-7.2", qemu: "7.2", machine: "q35", memMiB: 16, guest: "dirty", rounds: 2,
		caps: map[string]bool{"compress": true}, note: "COMPRESS_PAGE records (7.2 only)"},
	{name: "ignore-shared-7.2", qemu: "7.2", machine: "q35", memMiB: 32, shared: true,
		caps: map[string]bool{"x-ignore-shared": true}, note: "x-ignore-shared with a shared file backend: capabilities subsection, GPA per block"},
	{name: "ignore-shared-10.0", qemu: "10.0", machine: "q35", memMiB: 32, shared: true,
		caps: map[string]bool{"x-ignore-shared": true}, note: "x-ignore-shared with a shared file backend"},
	{name: "uuid-7.2", qemu: "7.2", machine: "q35", memMiB: 32, uuid: "11111111-2222-3333-4444-555555555555",
		caps: map[string]bool{"validate-uuid": true}, note: "configuration/uuid subsection"},
	{name: "uuid-10.0", qemu: "10.0", machine: "q35", memMiB: 32, uuid: "11111111-2222-3333-4444-555555555555",
		caps: map[string]bool{"validate-uuid": true}, note: "configuration/uuid subsection"},
	{name: "multifd-7.2", qemu: "7.2", machine: "q35", memMiB: 16, guest: "dirty", rounds: 2,
		caps: map[string]bool{"multifd": true}, params: map[string]any{"multifd-channels": 2}, note: "main stream + 2 channels"},
	{name: "multifd-10.0", qemu: "10.0", machine: "q35", memMiB: 16, guest: "dirty", rounds: 2,
		caps: map[string]bool{"multifd": true}, params: map[string]any{"multifd-channels": 2}, note: "main stream (0x200 flushes) + 2 channels"},
	{name: "multifd-10.0-pc-q35-7.2", qemu: "10.0", machine: "pc-q35-7.2", memMiB: 16, guest: "dirty", rounds: 2,
		caps: map[string]bool{"multifd": true}, params: map[string]any{"multifd-channels": 2}, note: "per-section sync, ZERO in main stream"},
	{name: "mapped-ram-10.0", qemu: "10.0", machine: "q35", memMiB: 32, file: true,
		caps: map[string]bool{"mapped-ram": true}, note: "file: with mapped-ram (sparse file)"},
}

// meta is written to NAME.json.
type meta struct {
	Name         string           `json:"name"`
	Note         string           `json:"note"`
	QEMU         string           `json:"qemu"`
	CommandLine  string           `json:"command_line"`
	Capabilities map[string]bool  `json:"capabilities,omitempty"`
	Parameters   map[string]any   `json:"parameters,omitempty"`
	URI          string           `json:"uri"`
	Channels     []string         `json:"channels,omitempty"`
	RAM          *qmp.RAMStats    `json:"ram"`
	XBZRLE       *qmp.XBZRLEStats `json:"xbzrle_cache,omitempty"`
	Status       string           `json:"status"`
}

func main() {
	out := flag.String("out", "testdata/streams", "output folder (postcopy captures go to its postcopy/ subfolder)")
	only := flag.String("only", "", "comma-separated capture names, precopy or postcopy (default all)")
	postcopyOnly := flag.Bool("postcopy", false, "record only the postcopy captures (postcopy/ subfolder)")
	flag.Parse()
	if err := os.MkdirAll(*out, 0o755); err != nil {
		log.Fatal(err)
	}
	want := map[string]bool{}
	for _, n := range strings.Split(*only, ",") {
		if n != "" {
			want[n] = true
		}
	}
	for _, c := range captures {
		if *postcopyOnly || len(want) > 0 && !want[c.name] {
			continue
		}
		start := time.Now()
		if err := record(c, *out); err != nil {
			log.Fatalf("%s: %v", c.name, err)
		}
		log.Printf("%s: done in %v", c.name, time.Since(start).Round(time.Millisecond))
	}
	pdir := filepath.Join(*out, "postcopy")
	for _, c := range postcopyCaptures {
		if len(want) > 0 && !want[c.name] {
			continue
		}
		if err := os.MkdirAll(pdir, 0o755); err != nil {
			log.Fatal(err)
		}
		start := time.Now()
		if err := recordPostcopy(c, pdir); err != nil {
			log.Fatalf("%s: %v", c.name, err)
		}
		log.Printf("%s: done in %v", c.name, time.Since(start).Round(time.Millisecond))
	}
}

func record(c capture, out string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	q, err := compat.FindQEMU(c.qemu)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "mktestdata-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cfg := compat.VMConfig{Name: c.name, QEMU: q, Machine: c.machine, MemMiB: c.memMiB, UUID: c.uuid}
	if c.shared {
		cfg.SharedMem = "file"
	}
	if c.guest == "dirty" {
		cfg.Disk = compat.GuestDirty()
	}
	vm, err := compat.Launch(ctx, filepath.Join(dir, "vm"), cfg)
	if err != nil {
		return err
	}
	defer vm.Kill()
	if c.guest != "" {
		if err := vm.WaitMoreSerial(ctx, 'B', 2); err != nil {
			return err
		}
	}
	if len(c.caps) > 0 {
		if err := vm.QMP.SetCapabilities(ctx, c.caps); err != nil {
			return err
		}
	}
	params := map[string]any{"max-bandwidth": compat.Unlimited}
	for k, v := range c.params {
		params[k] = v
	}
	if c.rounds > 0 {
		// Hold switchover for c.rounds dirty syncs: at 16 MiB/s a pass over the guest's RAM takes
		// about a second, in which the guest dirties every page again, so pending stays far above
		// the 16 KiB threshold (bandwidth × 1 ms). Released below.
		params["max-bandwidth"] = 16 << 20
		params["downtime-limit"] = 1
	}
	if err := vm.QMP.SetParameters(ctx, params); err != nil {
		return err
	}

	var uri string
	var rec *recorder
	if c.file {
		uri = "file:" + filepath.Join(dir, "stream.bin")
	} else {
		rec, err = newRecorder(dir)
		if err != nil {
			return err
		}
		defer rec.close()
		uri = "tcp:" + rec.addr()
	}
	if err := vm.QMP.Migrate(ctx, uri); err != nil {
		return err
	}
	if c.rounds > 0 {
		for {
			m, err := vm.QMP.QueryMigrate(ctx)
			if err != nil {
				return err
			}
			if m.RAM != nil && m.RAM.DirtySyncCount >= int64(c.rounds) || m.Finished() {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err := vm.QMP.SetParameters(ctx, map[string]any{"downtime-limit": 100000, "max-bandwidth": compat.Unlimited}); err != nil {
			return err
		}
	}
	m, err := vm.QMP.WaitMigration(ctx, 10*time.Millisecond)
	if err != nil {
		return err
	}
	if m.Status != "completed" {
		return fmt.Errorf("migration %s: %s", m.Status, m.ErrorDesc)
	}
	md := meta{Name: c.name, Note: c.note, QEMU: q.Full, CommandLine: vm.CommandLine(), Capabilities: c.caps,
		Parameters: params, URI: uri, RAM: m.RAM, XBZRLE: m.XBZRLE, Status: m.Status}
	md.CommandLine = strings.ReplaceAll(md.CommandLine, dir, "$TMP")
	md.URI = strings.ReplaceAll(md.URI, dir, "$TMP")
	if c.file {
		if err := gzipFile(filepath.Join(dir, "stream.bin"), filepath.Join(out, c.name+".bin.gz")); err != nil {
			return err
		}
	} else {
		files, err := rec.wait(ctx)
		if err != nil {
			return err
		}
		for _, f := range files {
			dst := c.name + f.suffix + ".bin.gz"
			if f.suffix != "" {
				md.Channels = append(md.Channels, dst)
			}
			if err := gzipFile(f.path, filepath.Join(out, dst)); err != nil {
				return err
			}
		}
	}
	js, _ := json.MarshalIndent(md, "", "  ")
	return os.WriteFile(filepath.Join(out, c.name+".json"), append(js, '\n'), 0o644)
}

// recorder accepts the migration connections of one capture on loopback TCP and writes each to
// a file: the main stream (starts with "QEVM") and multifd channels (magic 0x11223344, channel
// id at byte 24 of the hello; stream-format.md §4.1).
type recorder struct {
	l     net.Listener
	dir   string
	mu    sync.Mutex
	files []recFile
	wg    sync.WaitGroup
	errs  chan error
}

type recFile struct{ suffix, path string }

func newRecorder(dir string) (*recorder, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &recorder{l: l, dir: dir, errs: make(chan error, 16)}
	go r.accept()
	return r, nil
}

func (r *recorder) addr() string { return r.l.Addr().String() }

func (r *recorder) accept() {
	for {
		conn, err := r.l.Accept()
		if err != nil {
			return
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			defer conn.Close()
			if err := r.save(conn); err != nil {
				r.errs <- err
			}
		}()
	}
}

func (r *recorder) save(conn net.Conn) error {
	br := bufio.NewReaderSize(conn, 1<<20)
	head, err := br.Peek(25)
	if err != nil {
		return fmt.Errorf("recorder: short connection: %w", err)
	}
	suffix := ""
	switch binary.BigEndian.Uint32(head) {
	case 0x5145564D:
	case 0x11223344:
		suffix = fmt.Sprintf(".ch%d", head[24])
	default:
		return fmt.Errorf("recorder: unknown connection magic % x", head[:4])
	}
	path := filepath.Join(r.dir, "conn"+suffix+".bin")
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(f, br); err != nil {
		return err
	}
	r.mu.Lock()
	r.files = append(r.files, recFile{suffix, path})
	r.mu.Unlock()
	return nil
}

// wait returns the recorded files once every connection has been closed by QEMU.
func (r *recorder) wait(ctx context.Context) ([]recFile, error) {
	r.l.Close()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		return nil, fmt.Errorf("recorder: connections still open: %w", ctx.Err())
	}
	select {
	case err := <-r.errs:
		return nil, err
	default:
	}
	sort.Slice(r.files, func(i, j int) bool { return r.files[i].suffix < r.files[j].suffix })
	return r.files, nil
}

func (r *recorder) close() { r.l.Close() }

func gzipFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	zw, _ := gzip.NewWriterLevel(out, gzip.BestCompression)
	zw.Header.ModTime = time.Unix(0, 0)
	if _, err := io.Copy(zw, in); err != nil {
		out.Close()
		return err
	}
	if err := zw.Close(); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// postcopyCapture is one recorded postcopy migration between two QEMUs of the same version: the
// source migrates over loopback TCP through a recording proxy (postcopyProxy) to a destination
// started with `-incoming defer`, both with postcopy-ram (and postcopy-preempt), running the
// dirty guest so that the destination really faults and requests pages.
type postcopyCapture struct {
	name    string
	qemu    string
	memMiB  int
	preempt bool // capability postcopy-preempt: a second connection for urgent pages
	// recover cuts every connection once the destination has requested pages in postcopy, lets
	// both QEMUs reach postcopy-paused, and resumes with migrate-recover / migrate resume=true.
	recover bool
	note    string
}

var postcopyCaptures = []postcopyCapture{
	{name: "postcopy-7.2", qemu: "7.2", memMiB: 64, note: "postcopy-ram, dirty guest, migrate-start-postcopy after the first pass"},
	{name: "postcopy-10.0", qemu: "10.0", memMiB: 64, note: "postcopy-ram, dirty guest, migrate-start-postcopy after the first pass"},
	{name: "postcopy-preempt-10.0", qemu: "10.0", memMiB: 64, preempt: true,
		note: "postcopy-ram + postcopy-preempt: urgent pages on a second connection"},
	{name: "postcopy-recover-10.0", qemu: "10.0", memMiB: 64, recover: true,
		note: "postcopy-ram; every connection cut during postcopy, both sides postcopy-paused, then migrate-recover + migrate resume=true"},
}

// postcopyMeta is NAME.json of a postcopy capture.
type postcopyMeta struct {
	Name                   string          `json:"name"`
	Note                   string          `json:"note"`
	QEMU                   string          `json:"qemu"`
	CommandLine            string          `json:"command_line"`
	DestinationCommandLine string          `json:"destination_command_line"`
	Capabilities           map[string]bool `json:"capabilities"`
	Parameters             map[string]any  `json:"parameters"`
	URI                    string          `json:"uri"`
	// Files maps each recorded direction of each connection to its file in this folder:
	// main, rp (destination → source on the main connection), preempt, and after a recovery
	// resume, resume-rp, resume-preempt.
	Files map[string]string `json:"files"`
	// Events is what the generator did, in order, with the source's counters at that moment.
	Events []string `json:"events"`
	// RAM and Status are the source's final query-migrate counters.
	RAM    *qmp.RAMStats `json:"ram"`
	Status string        `json:"status"`
	// AtCut is the source's query-migrate ram counters just before the connections were cut.
	AtCut             *qmp.RAMStats `json:"ram_at_cut,omitempty"`
	DestinationStatus string        `json:"destination_status"`
}

// recordPostcopy records c into out (the postcopy/ folder).
func recordPostcopy(c postcopyCapture, out string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	q, err := compat.FindQEMU(c.qemu)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "mktestdata-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	caps := map[string]bool{"postcopy-ram": true}
	if c.preempt {
		caps["postcopy-preempt"] = true
	}
	cfg := compat.VMConfig{Name: c.name + "-src", QEMU: q, Machine: "q35", MemMiB: c.memMiB, Disk: compat.GuestDirty()}
	dcfg := cfg
	dcfg.Name, dcfg.Incoming = c.name+"-dst", "defer"
	dst, err := compat.Launch(ctx, filepath.Join(dir, "dst"), dcfg)
	if err != nil {
		return err
	}
	defer dst.Kill()
	src, err := compat.Launch(ctx, filepath.Join(dir, "src"), cfg)
	if err != nil {
		return err
	}
	defer src.Kill()
	if err := src.WaitMoreSerial(ctx, 'B', 2); err != nil {
		return err
	}
	for _, vm := range []*compat.VM{src, dst} {
		if err := vm.QMP.SetCapabilities(ctx, caps); err != nil {
			return fmt.Errorf("%s: %w", vm.Config.Name, err)
		}
	}
	port, err := compat.FreePort()
	if err != nil {
		return err
	}
	dstAddr := fmt.Sprintf("127.0.0.1:%d", port)
	if err := dst.QMP.MigrateIncoming(ctx, "tcp:"+dstAddr); err != nil {
		return fmt.Errorf("%s: %w", dst.Config.Name, err)
	}
	px, err := newPostcopyProxy(dir, dstAddr)
	if err != nil {
		return err
	}
	defer px.close()
	// Precopy is held (downtime 1 ms at 32 MiB/s: the guest redirties every page far faster than
	// that) until the first pass has ended; then migrate-start-postcopy. Postcopy's background
	// rate is capped so that the destination guest faults on most pages and requests them.
	params := map[string]any{"max-bandwidth": 32 << 20, "downtime-limit": 1, "max-postcopy-bandwidth": 32 << 20}
	if c.recover {
		params["max-postcopy-bandwidth"] = 4 << 20
	}
	if err := src.QMP.SetParameters(ctx, params); err != nil {
		return err
	}
	md := postcopyMeta{Name: c.name, Note: c.note, QEMU: q.Full, Capabilities: caps, Parameters: params,
		URI: "tcp:" + px.addr(), Files: map[string]string{}}
	event := func(format string, args ...any) {
		e := fmt.Sprintf(format, args...)
		if m, err := src.QMP.QueryMigrate(ctx); err == nil && m.RAM != nil {
			e += fmt.Sprintf(" (source %s: dirty-sync-count %d, normal %d, duplicate %d, postcopy-requests %d)",
				m.Status, m.RAM.DirtySyncCount, m.RAM.Normal, m.RAM.Duplicate, m.RAM.PostcopyRequests)
		}
		md.Events = append(md.Events, e)
		log.Printf("%s: %s", c.name, e)
	}
	if err := src.QMP.Migrate(ctx, md.URI); err != nil {
		return err
	}
	event("migrate %s", md.URI)
	if _, err := waitMigrate(ctx, src, func(m qmp.MigrationInfo) bool {
		return m.RAM != nil && m.RAM.DirtySyncCount >= 2
	}); err != nil {
		return err
	}
	if err := src.QMP.Execute(ctx, "migrate-start-postcopy", nil, nil); err != nil {
		return err
	}
	event("migrate-start-postcopy")
	if c.recover {
		m, err := waitMigrate(ctx, src, func(m qmp.MigrationInfo) bool {
			return m.Status == "postcopy-active" && m.RAM != nil && m.RAM.PostcopyRequests >= 200
		})
		if err != nil {
			return err
		}
		md.AtCut = m.RAM
		px.cut()
		event("cut every connection")
		for _, vm := range []*compat.VM{src, dst} {
			if _, err := waitMigrate(ctx, vm, func(m qmp.MigrationInfo) bool { return m.Status == "postcopy-paused" }); err != nil {
				return fmt.Errorf("%s: %w", vm.Config.Name, err)
			}
		}
		event("both sides postcopy-paused")
		port2, err := compat.FreePort()
		if err != nil {
			return err
		}
		dstAddr2 := fmt.Sprintf("127.0.0.1:%d", port2)
		if err := dst.QMP.Execute(ctx, "migrate-recover", map[string]any{"uri": "tcp:" + dstAddr2}, nil); err != nil {
			return fmt.Errorf("%s: %w", dst.Config.Name, err)
		}
		px.resume(dstAddr2)
		event("destination migrate-recover tcp:%s", dstAddr2)
		if err := src.QMP.Execute(ctx, "migrate", map[string]any{"uri": md.URI, "resume": true}, nil); err != nil {
			return err
		}
		event("source migrate %s resume=true", md.URI)
	}
	m, err := waitMigrate(ctx, src, func(m qmp.MigrationInfo) bool {
		return m.Finished() && (m.Status != "completed" || m.TotalTime > 0)
	})
	if err != nil {
		return err
	}
	if m.Status != "completed" {
		return fmt.Errorf("migration %s: %s", m.Status, m.ErrorDesc)
	}
	event("completed")
	st, err := dst.WaitStatus(ctx, "running")
	if err != nil {
		return err
	}
	md.RAM, md.Status, md.DestinationStatus = m.RAM, m.Status, st
	md.CommandLine = strings.ReplaceAll(src.CommandLine(), dir, "$TMP")
	md.DestinationCommandLine = strings.ReplaceAll(dst.CommandLine(), dir, "$TMP")
	files, err := px.wait(ctx)
	if err != nil {
		return err
	}
	for _, f := range files {
		dstName := c.name + f.suffix + ".bin.gz"
		md.Files[f.key] = dstName
		if err := gzipFile(f.path, filepath.Join(out, dstName)); err != nil {
			return err
		}
	}
	js, _ := json.MarshalIndent(md, "", "  ")
	return os.WriteFile(filepath.Join(out, c.name+".json"), append(js, '\n'), 0o644)
}

// waitMigrate polls query-migrate on vm every 5 ms until ok accepts the reply, the migration
// fails, or ctx ends.
func waitMigrate(ctx context.Context, vm *compat.VM, ok func(qmp.MigrationInfo) bool) (qmp.MigrationInfo, error) {
	for {
		m, err := vm.QMP.QueryMigrate(ctx)
		if err != nil {
			return m, fmt.Errorf("%s: %w", vm.Config.Name, err)
		}
		if ok(m) {
			return m, nil
		}
		if m.Status == "failed" || m.Status == "cancelled" {
			return m, fmt.Errorf("%s: migration %s: %s", vm.Config.Name, m.Status, m.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return m, fmt.Errorf("%s: migration still %q: %w", vm.Config.Name, m.Status, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// postcopyProxy forwards the migration connections of one postcopy capture from the source to
// the destination over loopback TCP and records both directions of each. Connections are named
// by their order within a phase, which is QEMU's order: the main connection first, then (with
// postcopy-preempt) the preempt channel, which carries no magic of its own; after a recovery
// ("resume" phase) the same again. Bytes are recorded once they have been written to the peer,
// so a recording holds exactly what the receiving QEMU was given.
type postcopyProxy struct {
	l   net.Listener
	dir string

	mu     sync.Mutex
	target string
	phase  string
	n      int // connections accepted in this phase
	conns  []net.Conn
	files  []proxyFile

	wg   sync.WaitGroup
	errs chan error
}

type proxyFile struct{ key, suffix, path string }

func newPostcopyProxy(dir, target string) (*postcopyProxy, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &postcopyProxy{l: l, dir: dir, target: target, errs: make(chan error, 16)}
	go p.accept()
	return p, nil
}

func (p *postcopyProxy) addr() string { return p.l.Addr().String() }

func (p *postcopyProxy) accept() {
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		target, phase, n := p.target, p.phase, p.n
		p.n++
		p.mu.Unlock()
		// Dial in accept order, so that the destination sees the connections in the source's order.
		d, err := net.DialTimeout("tcp", target, 10*time.Second)
		if err != nil {
			c.Close()
			p.errs <- fmt.Errorf("proxy: %w", err)
			continue
		}
		key := "main"
		if n == 1 {
			key = "preempt"
		} else if n > 1 {
			key = fmt.Sprintf("conn%d", n)
		}
		if phase != "" {
			key = phase + "-" + key
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, d)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(c, d, key)
		go p.pipe(d, c, key+"-rp")
	}
}

// fileName maps a pipe's direction ("main", "main-rp", "resume-preempt", …) to its key in
// postcopyMeta.Files and its file suffix: main → "main", ""; main-rp → "rp", ".rp"; preempt →
// "preempt", ".preempt"; resume-main-rp → "resume-rp", ".resume.rp".
func fileName(dir string) (key, suffix string) {
	var parts []string
	for _, s := range strings.Split(dir, "-") {
		if s != "main" {
			parts = append(parts, s)
		}
	}
	if len(parts) == 0 {
		return "main", ""
	}
	return strings.Join(parts, "-"), "." + strings.Join(parts, ".")
}

func (p *postcopyProxy) pipe(from, to net.Conn, key string) {
	defer p.wg.Done()
	path := filepath.Join(p.dir, key+".bin")
	f, err := os.Create(path)
	if err != nil {
		p.errs <- err
		return
	}
	defer f.Close()
	buf := make([]byte, 256<<10)
	total := 0
	for {
		n, rerr := from.Read(buf)
		if n > 0 {
			if _, err := to.Write(buf[:n]); err != nil {
				break
			}
			if _, err := f.Write(buf[:n]); err != nil {
				p.errs <- err
				return
			}
			total += n
		}
		if rerr != nil {
			// Pass the end on (the source closing its side, or the cut).
			if tc, ok := to.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
			break
		}
	}
	if total > 0 {
		k, suffix := fileName(key)
		p.mu.Lock()
		p.files = append(p.files, proxyFile{key: k, suffix: suffix, path: path})
		p.mu.Unlock()
	}
}

// cut closes every connection at once with a reset (linger 0), as a network failure would.
func (p *postcopyProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close()
	}
	p.conns = nil
}

// resume directs the connections accepted from now on to target, named as the "resume" phase.
func (p *postcopyProxy) resume(target string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.target, p.phase, p.n = target, "resume", 0
}

// wait returns the recorded files once every connection has ended.
func (p *postcopyProxy) wait(ctx context.Context) ([]proxyFile, error) {
	p.l.Close()
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		return nil, fmt.Errorf("proxy: connections still open: %w", ctx.Err())
	}
	select {
	case err := <-p.errs:
		return nil, err
	default:
	}
	sort.Slice(p.files, func(i, j int) bool { return p.files[i].suffix < p.files[j].suffix })
	return p.files, nil
}

func (p *postcopyProxy) close() {
	p.l.Close()
	p.cut()
}
