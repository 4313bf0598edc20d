package migration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/link"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
	"github.com/qemu-migrate-go/qemu-migrate-go/transport"
)

// ReceiveOptions describe one `receive`: where the link arrives and where the local
// destination QEMU waits.
type ReceiveOptions struct {
	Listen string        // HOST:PORT to listen on (--listen tcp:HOST:PORT), and nowhere else
	To     transport.URI // the local destination: unix:, tcp: on loopback, or file:
	DstQMP string        // optional: the destination QEMU's QMP socket
	TLS    link.TLSFiles // --tls-cert, --tls-key, --tls-ca, --tls-peer
	NoTLS  bool
	// Timeout: a silent sender is dead after this long (--link-timeout, default 5 s).
	Timeout time.Duration
	// ConnectTimeout bounds the set-up of each connection (default 30 s); the wait for the
	// sender itself lasts until ctx ends.
	ConnectTimeout time.Duration
	StallTimeout   time.Duration
	// RecoverTimeout bounds the recovery of a postcopy whose link broke (default
	// DefaultRecoverTimeout).
	RecoverTimeout time.Duration
	Events         func(savevm.Event)
	Warn           func(string)
	// Listening is called once the listener is up, with its address.
	Listening func(addr string)
}

// Receive takes one migration from a sending sidecar and writes it into the local destination
// QEMU (PROTOCOL.md §5): the destination gets the complete stream only when the sender commits,
// and a reset on any failure before that.
func Receive(ctx context.Context, o ReceiveOptions) (Summary, error) {
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 30 * time.Second
	}
	r := &receiving{o: o}
	defer r.close()

	// 1. The request makes sense: a destination QEMU's transport, TLS files that load.
	cfg, err := r.config()
	if err != nil {
		return Summary{}, &MigrateError{Class: ErrUsage, Err: err}
	}
	// 2. The destination's QMP, when given: it waits in inmigrate; its version and machine.
	if err := r.checkDestination(ctx); err != nil {
		return Summary{}, &MigrateError{Class: ErrDestination, Err: err}
	}
	// 3. Listen where --listen says, and wait for the one sender; its HELLO is checked against
	//    this destination before it may send anything.
	l, err := link.Listen(o.Listen, cfg)
	if err != nil {
		return Summary{}, &MigrateError{Class: ErrUsage, Err: err}
	}
	if o.Listening != nil {
		o.Listening(l.Addr().String())
	}
	s, err := l.Accept(ctx, r.accept)
	if err != nil {
		class := ErrSource
		var rf refusal
		switch {
		case ctx.Err() != nil:
			class = ErrCancelled
		case errors.As(err, &rf):
			class = ErrDestination
		}
		return Summary{}, &MigrateError{Class: class, Err: err}
	}
	r.adoptSession(s)
	// 4. The engine writes the stream for the destination until the sender commits — or,
	//    after a switch to postcopy, until the destination has every page, recovering a link
	//    that breaks (recoverlink.go).
	eng := savevm.NewReceiver(s, r.dconn, savevm.ReceiveOptions{DstSeries: r.series, Events: o.Events, Warn: o.Warn,
		StallTimeout: o.StallTimeout})
	sum, err := eng.Run(ctx)
	if err != nil && eng.Started() {
		sum, err = r.recoverPostcopy(ctx, eng, cfg, err)
		if err != nil {
			return sum, err
		}
	}
	if err != nil {
		return sum, r.failed(ctx, err, eng.Phase())
	}
	r.delivered = true
	// 5. The destination has the complete stream: see it run, and tell the sender.
	if err := r.finish(ctx, &sum); err != nil {
		if sum.Verify != nil {
			savevm.EmitSummary(savevm.Options{Events: o.Events}, &sum)
		}
		return sum, err
	}
	savevm.EmitSummary(savevm.Options{Events: o.Events}, &sum)
	return sum, nil
}

// receiving is the state of one Receive.
type receiving struct {
	o       ReceiveOptions
	cleanup []func()

	dst       *qmp.Client
	series    string // the destination's QEMU series
	machine   string
	version   string
	dconn     transport.Conn
	session   *link.Session
	delivered bool
	verify    *verifySide // the sender asked for --verify and this destination can be read
}

func (r *receiving) defer_(f func()) { r.cleanup = append(r.cleanup, f) }

// adoptSession makes s the link, closed cleanly once the destination has everything, else
// with an ERROR.
func (r *receiving) adoptSession(s *link.Session) {
	r.session = s
	r.defer_(func() {
		if r.delivered {
			s.Close()
		} else {
			s.Abort(link.CodeDestination, "the receiving sidecar gave up")
		}
	})
}

// adoptDestination makes c the destination's stream connection, reset unless the destination
// got everything.
func (r *receiving) adoptDestination(c transport.Conn) {
	r.dconn = c
	r.defer_(func() {
		if !r.delivered {
			c.Abort()
		}
	})
}

func (r *receiving) close() {
	for i := len(r.cleanup) - 1; i >= 0; i-- {
		r.cleanup[i]()
	}
}

// receiveWindow is the receiver's reorder window (link.Config.Window): with batches of at
// most 1 MiB of page data, it holds a few early frames from each connection while the one due
// is on its way, which is all that 4 connections need to stay busy (compat TestBenchLink).
const receiveWindow = 4 << 20

// refusal is an error the receiver answers HELLO with: this destination cannot take the
// migration.
type refusal struct{ error }

func (e refusal) Unwrap() error { return e.error }

func (r *receiving) config() (link.Config, error) {
	switch r.o.To.Scheme {
	case "unix", "file":
	case "tcp":
		host := r.o.To.Host()
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return link.Config{}, fmt.Errorf("receive --to %s: the destination QEMU must be on this host (tcp: on loopback, unix: or file:)", r.o.To)
		}
	default:
		return link.Config{}, fmt.Errorf("receive --to %s: want unix:PATH, tcp:127.0.0.1:PORT or file:PATH", r.o.To)
	}
	cfg := link.Config{Timeout: r.o.Timeout, HandshakeTimeout: r.o.ConnectTimeout, Window: receiveWindow}
	if r.o.NoTLS {
		if r.o.TLS != (link.TLSFiles{}) {
			return cfg, errors.New("--no-tls with --tls-* flags: choose one")
		}
		return cfg, nil
	}
	tc, err := link.ServerTLS(r.o.TLS)
	if err != nil {
		return cfg, err
	}
	cfg.TLS = tc
	return cfg, nil
}

func (r *receiving) checkDestination(ctx context.Context) error {
	if r.o.DstQMP == "" {
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, r.o.ConnectTimeout)
	defer cancel()
	dst, err := qmp.DialUnix(cctx, r.o.DstQMP)
	if err != nil {
		return err
	}
	r.dst = dst
	r.defer_(func() { dst.Close() })
	if r.series, err = destinationSeries(cctx, dst); err != nil {
		return err
	}
	if v, err := dst.QueryVersion(cctx); err == nil {
		r.version = fmt.Sprintf("%d.%d.%d", v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro)
	}
	r.machine, err = dst.MachineType(cctx)
	return err
}

// accept decides on the sender's HELLO: the machine types must agree and the destination QEMU
// must be listening; then it is connected before WELCOME, so that nothing crosses otherwise.
func (r *receiving) accept(h link.Hello) (link.Welcome, error) {
	var w link.Welcome
	if h.Source != nil && h.Source.Machine != "" && r.machine != "" && h.Source.Machine != r.machine {
		return w, refusal{fmt.Errorf("the source runs machine type %q, this destination %q: the destination would reject the stream; start both with the same versioned type (e.g. -machine %s)",
			h.Source.Machine, r.machine, h.Source.Machine)}
	}
	if r.dst != nil {
		ctx, cancel := context.WithTimeout(context.Background(), r.o.ConnectTimeout)
		st, err := r.dst.QueryStatus(ctx)
		cancel()
		if err != nil {
			return w, refusal{fmt.Errorf("the destination's QMP: %w", err)}
		}
		if st.Status != "inmigrate" {
			return w, refusal{fmt.Errorf("the destination VM is %q, not waiting for an incoming migration", st.Status)}
		}
	}
	if h.Resume != "" {
		return w, refusal{errors.New("there is no broken postcopy migration here to resume")}
	}
	if err := r.acceptVerify(h); err != nil {
		return w, err
	}
	postcopy := link.HasFeature(h.Features, link.FeaturePostcopy)
	if postcopy {
		if r.dst == nil {
			return w, refusal{errors.New("--postcopy over the link needs receive --dst-qmp: the destination needs postcopy-ram, and a recovery drives its migrate-recover")}
		}
		if r.o.To.Scheme == "file" {
			return w, refusal{errors.New("--postcopy needs a destination QEMU that answers (receive --to unix: or tcp:), not a file")}
		}
		ctx, cancel := context.WithTimeout(context.Background(), r.o.ConnectTimeout)
		err := givePostcopy(ctx, r.dst)
		cancel()
		if err != nil {
			return w, refusal{err}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.o.ConnectTimeout)
	defer cancel()
	dconn, err := transport.Open(ctx, r.o.To)
	if err != nil {
		return w, refusal{fmt.Errorf("the destination QEMU is not reachable: %w", err)}
	}
	r.adoptDestination(dconn)
	if postcopy {
		transport.LowLatency(dconn, postcopyUnsent) // as the relay's: requested pages must not queue
	}
	w = link.Welcome{Connections: h.Connections, Compress: link.CodecNames(),
		Destination: &link.Endpoint{QEMU: r.version, Machine: r.machine}}
	if r.dst != nil {
		w.Features = append(w.Features, "status")
		w.Destination.Status = "inmigrate"
	}
	if r.verify != nil {
		w.Features = append(w.Features, link.FeatureVerify)
	}
	if postcopy {
		w.Features = append(w.Features, link.FeaturePostcopy)
	}
	return w, nil
}

// failed classifies a failure of the receiving engine and adds what the destination says.
func (r *receiving) failed(ctx context.Context, err error, phase savevm.Phase) error {
	class := ErrSource // the sender, its source, or the link to them
	var re *savevm.ReceiveError
	var rem *link.RemoteError
	switch {
	case ctx.Err() != nil:
		class, err = ErrCancelled, fmt.Errorf("%w (%v)", context.Cause(ctx), err)
	case errors.As(err, &re) && re.Local:
		class = ErrDestination
		if r.dst != nil {
			if why := destinationSays(r.dst); why != "" {
				err = fmt.Errorf("%w; %s", err, why)
			}
		}
	case errors.As(err, &rem):
		err = fmt.Errorf("the sender gave up: %w", err)
		if rem.Code == link.CodeDestination {
			class = ErrDestination
		}
	case errors.Is(err, link.ErrStalled):
		class = ErrPolicy
	}
	return &MigrateError{Class: class, Phase: phase, Err: fmt.Errorf("%w; the destination got a reset, not a complete stream", err)}
}

// finish waits, with the destination's QMP, until it runs (or stays paused), and reports that
// to the sender (STATUS); with --verify the destination then runs only after the check.
func (r *receiving) finish(ctx context.Context, sum *Summary) error {
	if r.dst == nil {
		return nil
	}
	wctx, cancel := context.WithTimeout(context.Background(), r.o.ConnectTimeout)
	defer cancel()
	st, err := waitDestination(wctx, r.dst)
	if err != nil {
		savevm.SendStatus(r.session, "failed", err.Error())
		return &MigrateError{Class: ErrDestination, Phase: savevm.PhaseDone,
			Err: fmt.Errorf("the destination did not start after receiving the complete stream: %w (the source stays paused in postmigrate)", err)}
	}
	if err := savevm.SendStatus(r.session, st, ""); err != nil && r.o.Warn != nil {
		r.o.Warn("the destination runs, but the sender did not get the news: " + err.Error())
	}
	if r.verify != nil {
		return r.serveVerify(ctx, sum)
	}
	return nil
}

// statusOf reads STATUS's payload.
func statusOf(p []byte) (state, msg string) {
	var d link.Delivered
	if err := json.Unmarshal(p, &d); err != nil {
		return "", "unreadable STATUS from the receiver"
	}
	if d.Message == "" {
		d.Message = d.State
	}
	return d.State, d.Message
}
