package migration

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// The source's side of the story: one sidecar per VM, and putting the VM back after a failure.

// recoverSource cancels the source's migration and puts the VM back in the run state it had,
// with the migration parameters it had; it returns the state it ended in. When the monitor
// connection is gone (a call ran past its deadline, which closes it), it tries a fresh one on
// the same endpoint, briefly; a source whose QMP does not answer is reported with what is left to do.
func recoverSource(src *qmp.Client, ep qmp.Endpoint, wasState string, params map[string]any) string {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	restore := map[string]any{}
	for _, k := range []string{"downtime-limit", "max-bandwidth", "max-postcopy-bandwidth"} {
		if v, ok := params[k]; ok {
			restore[k] = v
		}
	}
	manual := func(why error) string {
		b, _ := json.Marshal(restore)
		s := fmt.Sprintf("unknown: its QMP does not answer (%v); when it does: `migrate_cancel` if query-migrate shows a migration, `migrate-set-parameters` %s", why, b)
		if wasState == "running" {
			s += ", and `cont` if it is not running"
		}
		return s
	}
	m, err := src.QueryMigrate(ctx)
	if err != nil {
		c, derr := redial(ctx, ep)
		if derr != nil {
			return manual(derr)
		}
		defer c.Close()
		src = c
		if m, err = src.QueryMigrate(ctx); err != nil {
			return manual(err)
		}
	}
	if !m.Finished() {
		src.MigrateCancel(ctx)
		src.WaitMigration(ctx, 20*time.Millisecond) // until cancelled (or, too late, completed)
	}
	if err := src.SetParameters(ctx, restore); err != nil {
		return manual(err)
	}
	st, err := src.QueryStatus(ctx)
	if err != nil {
		return manual(err)
	}
	// The source may have stopped the guest for the switchover (finish-migrate, postmigrate)
	// while the destination never got the complete stream: it is safe — and required — to
	// resume it there and only there.
	if wasState == "running" && st.Status != "running" {
		if err := src.Cont(ctx); err != nil {
			return st.Status + " (cont failed: " + err.Error() + ")"
		}
		if st, err = src.QueryStatus(ctx); err != nil {
			return manual(err)
		}
	}
	return st.Status
}

// redial opens a fresh monitor connection for the recovery. A QMP socket gets one try of 3 s:
// a QEMU that does not answer its socket is not coming back. libvirtd is a daemon that its
// service manager restarts (upgrades do it too), so a libvirt endpoint is retried for 20 s.
func redial(ctx context.Context, ep qmp.Endpoint) (*qmp.Client, error) {
	limit := 3 * time.Second
	if ep.Socket == "" {
		limit = 20 * time.Second
	}
	rctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for {
		dctx, dcancel := context.WithTimeout(rctx, 3*time.Second)
		c, err := ep.Dial(dctx)
		dcancel()
		if err == nil || ep.Socket != "" {
			return c, err
		}
		select {
		case <-rctx.Done():
			return nil, err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func acceptBefore(ctx context.Context, l net.Listener) (net.Conn, error) {
	if ul, ok := l.(*net.UnixListener); ok {
		d, _ := ctx.Deadline()
		ul.SetDeadline(d)
	}
	return l.Accept()
}

// lockSource takes an exclusive lock named after the source's monitor (QMP socket, or libvirt
// URI and domain), so that a second sidecar started against the same VM refuses at once instead
// of racing the first.
func lockSource(ep qmp.Endpoint) (func(), error) {
	key := "libvirt\x00" + ep.LibvirtURI + "\x00" + ep.Domain
	if ep.Socket != "" {
		abs, err := filepath.Abs(ep.Socket)
		if err != nil {
			return nil, err
		}
		key = abs
	}
	sum := sha256.Sum256([]byte(key))
	path := filepath.Join(os.TempDir(), fmt.Sprintf("qemu-migrate-go-%x.lock", sum[:8]))
	unlock, err := lockFile(path)
	if errors.Is(err, errLocked) {
		return nil, fmt.Errorf("another qemu-migrate-go is already migrating the VM of %s (lock %s)", ep, path)
	}
	return unlock, err
}

// errLocked is lockFile's answer when another process holds the lock.
var errLocked = errors.New("locked")

// lockFile takes an exclusive flock on the file at path, created if need be, without waiting.
// The file is removed on unlock, so that a host does not keep one for every VM it ever migrated.
// That opens a race, closed here: a second taker may open the file just before the holder
// removes it, and then lock a file that is no longer at path while a third creates and locks a
// new one. So a lock counts only if the file locked is still the one at path; otherwise it is
// taken again. The file is opened without following a symbolic link (the temporary folder is
// shared with other users).
func lockFile(path string) (func(), error) {
	for try := 0; try < 100; try++ {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return nil, err
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, syscall.EWOULDBLOCK) {
				return nil, errLocked
			}
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		held, err1 := f.Stat()
		now, err2 := os.Lstat(path)
		if err1 == nil && err2 == nil && os.SameFile(held, now) {
			return func() {
				os.Remove(path) // while still holding it: a taker that opened it first sees it gone
				f.Close()
			}, nil
		}
		f.Close() // the holder removed it meanwhile: take the one at path now
	}
	return nil, fmt.Errorf("lock %s: the file kept changing under the lock", path)
}
