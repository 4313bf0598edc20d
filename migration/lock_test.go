package migration

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// TestLockSource: a second sidecar against the same VM is refused at once, naming the lock; once
// the first is done its lock file is gone, and the VM can be migrated again.
func TestLockSource(t *testing.T) {
	t.Setenv("TMPDIR", t.TempDir())
	ep := qmp.Endpoint{Socket: filepath.Join(t.TempDir(), "qmp.sock")}
	unlock, err := lockSource(ep)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lockSource(ep); err == nil || !strings.Contains(err.Error(), "already migrating") {
		t.Fatalf("second lock: %v, want a refusal", err)
	}
	other, err := lockSource(qmp.Endpoint{Socket: ep.Socket + ".other"})
	if err != nil {
		t.Fatalf("another VM's lock: %v", err)
	}
	defer other()
	unlock()
	left, _ := filepath.Glob(filepath.Join(os.TempDir(), "qemu-migrate-go-*.lock"))
	if len(left) != 1 { // the other VM's lock is still held
		t.Errorf("lock files left after unlock: %v", left)
	}
	unlock, err = lockSource(ep)
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	unlock()
}

// TestLockFileExclusive races takers of one lock that remove its file on unlock: never may two
// hold it at once. Without the check that the locked file is still the one at the path, a taker
// that opened the file just before the holder removed it locks a file nobody else sees, while a
// third locks the new one.
func TestLockFileExclusive(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.lock")
	var inside, taken atomic.Int64
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 2000; i++ {
				unlock, err := lockFile(path)
				if errors.Is(err, errLocked) {
					continue
				}
				if err != nil {
					t.Error(err)
					return
				}
				if n := inside.Add(1); n != 1 {
					t.Errorf("%d holders at once", n)
				}
				taken.Add(1)
				time.Sleep(20 * time.Microsecond) // a holder that does something: others open the file meanwhile
				inside.Add(-1)
				unlock()
			}
		}()
	}
	wg.Wait()
	if taken.Load() == 0 {
		t.Fatal("the lock was never taken")
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("lock file left: %v", err)
	}
	t.Logf("taken %d times", taken.Load())
}

// TestLockFileNoFollow: a symbolic link planted at the lock's path is not followed.
func TestLockFileNoFollow(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "victim")
	if err := os.WriteFile(target, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "x.lock")
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	if _, err := lockFile(path); err == nil {
		t.Fatal("locked through a symbolic link")
	}
}
