// Command mktestdata captures the migration streams in testdata/streams from real QEMU 7.2 and
// 10.0 (make testdata). Each capture NAME is stored as NAME.bin.gz (gzip: the streams are mostly
// pages of zeros and small counters and shrink 100–1000×; read them with zcat or the tests'
// loader), multifd channels as NAME.chN.bin.gz, and NAME.json beside it holds the QEMU command
// line, the migration settings and QEMU's own query-migrate counters — the oracle the stream
// tests compare record counts with.
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
	out := flag.String("out", "testdata/streams", "output folder")
	only := flag.String("only", "", "comma-separated capture names (default all)")
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
		if len(want) > 0 && !want[c.name] {
			continue
		}
		start := time.Now()
		if err := record(c, *out); err != nil {
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
