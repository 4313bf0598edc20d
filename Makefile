# qemu-migrate-go — `make demo` and `make test` work on a fresh machine: both install what they need.
GO        ?= go
BIN       := bin/qemu-migrate-go
# The whole suite (compat scenarios included) must stay well inside CI's budget on 2 cores.
TEST_TIMEOUT ?= 40m

.PHONY: all setup build test vet fmt-check demo bench testdata fuzz clean install-hook

all: build

## setup: install QEMU 7.2 (apt-get), QEMU 10.0 (bookworm-backports, unpacked into .cache/),
## libvirtd (apt-get; configured for this machine — the libvirt tests start and stop the daemon),
## the Linux test guest's kernel and files (bookworm, unpacked into .cache/), chromium (the
## report test renders its page) and the network tools of the link tests (ip, tc, ss, iptables)
setup:
	@compat/install-qemu.sh
	@compat/install-libvirt.sh
	@compat/install-linux-guest.sh
	@compat/install-chromium.sh
	@compat/install-tools.sh

build:
	$(GO) build -o $(BIN) ./cmd/qemu-migrate-go

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi

## test: everything — unit, round-trip, fuzz-seed and the compat scenarios against real QEMU
test: setup fmt-check vet
	CI=$${CI:-} $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...

## demo: start a real test VM and migrate it with the sidecar
demo: setup build
	$(GO) run ./compat/cmd/demo -bin $(BIN)

## bench: the benchmark tables (stream codec; QEMU by itself; relay and relay cost; the link; postcopy;
## --verify; libvirt; the Linux guest). QMG_BENCH_RUNS, QMG_BENCH_MEM and each test's own variables
## choose a part; one test alone: QMG_BENCH=1 go test -count=1 -run '^TestBenchLink$$' -v ./compat/
bench: setup
	$(GO) test -run x -bench . -benchmem -cpu 1 ./stream/
	QMG_BENCH=1 $(GO) test -count=1 -timeout 180m -run Bench -v ./compat/

## testdata: re-capture the streams in testdata/streams from real QEMU
testdata: setup
	$(GO) run ./compat/cmd/mktestdata -out testdata/streams

## fuzz: run each fuzz target of every package for FUZZTIME (default 1m)
FUZZTIME ?= 1m
fuzz:
	@for pkg in $$(grep -l '^func Fuzz' $$(git ls-files '*_test.go') | xargs -n1 dirname | sort -u); do \
	  for t in $$($(GO) test -list 'Fuzz.*' ./$$pkg/ | grep ^Fuzz); do \
	    echo "== $$pkg $$t"; $(GO) test ./$$pkg/ -run x -fuzz "^$$t$$" -fuzztime $(FUZZTIME) || exit 1; done; done

## install-hook: install the sidecar as libvirt's QEMU hook (/etc/libvirt/hooks/qemu.d/); libvirtd
## reads new hook files when it starts
HOOK_DIR ?= /etc/libvirt/hooks/qemu.d
PREFIX   ?= /usr/local
install-hook: build
	install -D -m 0755 $(BIN) $(PREFIX)/bin/qemu-migrate-go
	install -d $(HOOK_DIR)
	ln -sf $(PREFIX)/bin/qemu-migrate-go $(HOOK_DIR)/qemu-migrate-go
	@echo "installed $(HOOK_DIR)/qemu-migrate-go -> $(PREFIX)/bin/qemu-migrate-go; restart libvirtd to enable it"

clean:
	rm -rf bin
