package guestram

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/compat"
)

// The benchmarks hash a 1 GiB guest (the fill guest: a mix of zero, text-like and random pages,
// paused after filling its RAM) with each method, and a 1 GiB buffer of this process with the
// same workers (hashing alone). Each reports ms/GiB:
//
//	go test -run XXX -bench BenchmarkHash -benchtime 5x ./guestram/

const benchGiB = 1 << 30

// memSource is a block held in this process's memory: what hashing costs without any reading.
type memSource struct{ mem []byte }

func (s *memSource) copies() bool { return false }
func (s *memSource) probe() error { return nil }
func (s *memSource) release()     {}
func (s *memSource) read(off int64, n int, _ []byte, _ func(int64, int64)) ([]byte, error) {
	return s.mem[off : off+int64(n)], nil
}

// reportPerGiB reports wall time per GiB and this process's CPU time (user+system) per GiB since
// cpu0: the machine is shared, so wall time measures the neighbours too, while CPU time is what
// the work costs (for pmemsave most of it is QEMU's, not counted here).
func reportPerGiB(b *testing.B, bytes int64, cpu0 time.Duration) {
	b.SetBytes(bytes)
	gib := float64(b.N) * float64(bytes) / benchGiB
	b.ReportMetric(float64(b.Elapsed().Milliseconds())/gib, "ms/GiB")
	b.ReportMetric(float64((cpuTime()-cpu0).Milliseconds())/gib, "cpu-ms/GiB")
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkHashMemory hashes a 1 GiB buffer in memory with 1 worker and with GOMAXPROCS workers.
func BenchmarkHashMemory(b *testing.B) {
	mem := make([]byte, benchGiB)
	x := uint64(88172645463325252)
	for i := 0; i < len(mem); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		for j := 0; j < 8; j++ {
			mem[i+j] = byte(x >> (8 * j))
		}
	}
	st, err := startTime(os.Getpid())
	if err != nil {
		b.Fatal(err)
	}
	for _, w := range []int{1, runtime.GOMAXPROCS(0)} {
		b.Run(fmt.Sprintf("workers=%d", w), func(b *testing.B) {
			l := &Layout{PID: os.Getpid(), StartTime: st, Blocks: []Block{{Name: "mem", Used: benchGiB}}}
			h := &hasher{l: l, opt: Options{Workers: w}.withDefaults()}
			h.zero = ZeroSum(0)
			cpu0 := cpuTime()
			for b.Loop() {
				var bh BlockHashes
				if err := h.random(context.Background(), &l.Blocks[0], &bh, &memSource{mem}); err != nil {
					b.Fatal(err)
				}
			}
			reportPerGiB(b, benchGiB, cpu0)
		})
	}
}

// BenchmarkHash hashes a paused 1 GiB guest on a memfd backend with each method (QEMU 10.0).
func BenchmarkHash(b *testing.B) {
	q, err := compat.FindQEMU("10.0")
	if err != nil {
		b.Fatal(err)
	}
	img, err := compat.GuestFill(fillOpt(1024))
	if err != nil {
		b.Fatal(err)
	}
	vm := compat.StartVM(b, compat.VMConfig{QEMU: q, MemMiB: 1024, SharedMem: "memfd", Disk: img})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	fillCtx, fillCancel := context.WithTimeout(ctx, 120*time.Second)
	defer fillCancel()
	if err := vm.WaitSerial(fillCtx, "F", func(s string) bool { return strings.Contains(s, "F") }); err != nil {
		b.Skipf("the 1 GiB guest did not fill its RAM in time on this machine: %v", err)
	}
	if err := vm.QMP.Stop(ctx); err != nil {
		b.Fatal(err)
	}
	if _, err := vm.WaitStatus(ctx, "paused"); err != nil {
		b.Fatal(err)
	}
	l := locateVM(b, ctx, vm)
	ram := l.Block("ram0")
	for _, m := range DefaultMethods {
		b.Run(string(m), func(b *testing.B) {
			cpu0 := cpuTime()
			for b.Loop() {
				list, err := Hash(ctx, vm.QMP, l, Options{Methods: []Method{m}})
				if err != nil {
					b.Fatal(err)
				}
				if bh := list.Block("ram0"); bh.Method != m || len(bh.Unread) != 0 {
					b.Fatalf("ram0 not read whole with %s: %s", m, bh.Note)
				}
			}
			reportPerGiB(b, ram.Used, cpu0)
		})
	}
}
