package migration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/qemu-migrate-go/qemu-migrate-go/guestram"
	"github.com/qemu-migrate-go/qemu-migrate-go/link"
	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
	"github.com/qemu-migrate-go/qemu-migrate-go/savevm"
)

// --verify over the link (PROTOCOL.md §5.1): each sidecar hashes its own QEMU and only the
// destination's hash list crosses. The sender offers the feature in HELLO; a receiver with
// --dst-qmp whose destination is held paused agrees in WELCOME, any other refuses HELLO, so a
// check that cannot be made is known before the source is touched. After STATUS (paused) the
// sender sends VERIFY with the seed, the receiver answers with its list in HASHES chunks, the
// sender compares (with the pages KVM rewrites excluded, from the cpu sections it relayed) and
// sends VERDICT; on "equal" the receiver resumes its destination and reports STATUS running.

// prepareVerifyLink locates the source here; the destination is the receiver's (accept).
func (m *migration) prepareVerifyLink(ctx context.Context) error {
	cctx, cancel := context.WithTimeout(ctx, m.o.ConnectTimeout)
	defer cancel()
	src, err := locateSide(cctx, "source", m.src, m.o.Source)
	if err != nil {
		return err
	}
	m.verify = &verifier{src: src, methods: m.o.VerifyMethods}
	m.note("verify", fmt.Sprintf("--verify: RAM will be read from the source by %s; the receiving sidecar reads the destination's and must hold it paused",
		plannedMethods(src.layout, m.o.VerifyMethods)))
	return nil
}

// verifyWait bounds each wait of the exchange: the other end hashes a guest of about this
// size (hashing runs at ≥ 1 GiB/s here; a read stuck beyond it is guestram's ReadTimeout).
func verifyWait(ram int64) time.Duration {
	return time.Minute + time.Duration(ram>>30)*20*time.Second
}

// ramOf is the bytes a layout hashes.
func ramOf(l *guestram.Layout) (n int64) {
	for _, b := range l.Blocks {
		n += b.Used
	}
	return n
}

// linkPeer is the destination behind a receiving sidecar.
type linkPeer struct{ m *migration }

func (p linkPeer) hash(ctx context.Context, opt guestram.Options) (*guestram.List, error) {
	s := p.m.session
	vm := link.Verify{Seed: opt.Seed}
	for _, meth := range opt.Methods {
		vm.Methods = append(vm.Methods, string(meth))
	}
	j, _ := json.Marshal(vm)
	if err := s.SendControl(link.FrameVerify, j); err != nil {
		return nil, err
	}
	ram := ramOf(p.m.verify.src.layout)
	pages := ram / guestram.PageSize
	// A list costs at most 17 bytes a page plus names and notes: more is not a list of this guest.
	limit := int(pages)*17 + 4<<20
	b, err := receiveHashes(ctx, s, limit, verifyWait(ram))
	if err != nil {
		return nil, fmt.Errorf("the receiving sidecar: %w", err)
	}
	l, err := guestram.Decode(b, guestram.Limits{MaxPages: pages + pages/8 + 1<<16})
	if err != nil {
		return nil, fmt.Errorf("the receiving sidecar's hash list: %w", err)
	}
	return l, nil
}

// receiveHashes collects HASHES chunks until the empty one, at most limit bytes.
func receiveHashes(ctx context.Context, s *link.Session, limit int, wait time.Duration) ([]byte, error) {
	var b []byte
	deadline := time.After(wait)
	for {
		f, err := nextControl(ctx, s, deadline, link.FrameHashes)
		if err != nil {
			return nil, err
		}
		if len(f.Payload) == 0 {
			return b, nil
		}
		if len(b)+len(f.Payload) > limit {
			return nil, fmt.Errorf("its hash list exceeds %d bytes, more than this guest's RAM can need", limit)
		}
		b = append(b, f.Payload...)
	}
}

// nextControl waits for the next control frame, which must be of type want.
func nextControl(ctx context.Context, s *link.Session, deadline <-chan time.Time, want link.FrameType) (link.Frame, error) {
	select {
	case f := <-s.Control():
		if f.Type != want {
			err := fmt.Errorf("the peer sent %s, expected %s", f.Type, want)
			s.Abort(link.CodeProtocol, err.Error())
			return f, err
		}
		return f, nil
	case <-s.Done():
		return link.Frame{}, fmt.Errorf("the link closed: %w", orClosedErr(s.Err()))
	case <-deadline:
		return link.Frame{}, fmt.Errorf("no %s from the peer in time", want)
	case <-ctx.Done():
		return link.Frame{}, context.Cause(ctx)
	}
}

func (p linkPeer) verdict(ctx context.Context, vs *savevm.VerifySummary, what string) error {
	s := p.m.session
	sj, _ := json.Marshal(vs)
	j, _ := json.Marshal(link.Verdict{Equal: vs.Equal, Message: what, Summary: sj})
	if err := s.SendControl(link.FrameVerdict, j); err != nil {
		return err
	}
	if !vs.Equal {
		return nil
	}
	// The receiver resumes its destination and says so.
	f, err := nextControl(ctx, s, nil, link.FrameStatus)
	if err != nil {
		return fmt.Errorf("no word from the receiver that the destination runs: %w", err)
	}
	if st, msg := statusOf(f.Payload); st != "running" {
		return fmt.Errorf("the receiver could not resume the destination: %s", msg)
	}
	return nil
}

func (p linkPeer) abort(class error, msg string) {
	code := link.CodeSource
	switch class {
	case ErrDestination:
		code = link.CodeDestination
	case ErrCancelled:
		code = link.CodeCancelled
	}
	p.m.session.Abort(code, msg)
}

// ---------------------------------------------------------------------------------------------
// The receiving end.

// acceptVerify decides on a HELLO that asks for --verify: this receiver must have the
// destination's QMP, and the destination must stay paused after loading.
func (r *receiving) acceptVerify(h link.Hello) error {
	if !link.HasFeature(h.Features, link.FeatureVerify) {
		return nil
	}
	if r.dst == nil {
		return refusal{errors.New("the sender asks for --verify, and this receiver cannot read its destination's RAM: give `receive` the destination's --dst-qmp")}
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.o.ConnectTimeout)
	defer cancel()
	side, err := locateSide(ctx, "destination", r.dst, qmp.Endpoint{Socket: r.o.DstQMP})
	if err != nil {
		return refusal{err}
	}
	if err := checkHeld(ctx, side); err != nil {
		return refusal{err}
	}
	r.verify = &side
	return nil
}

// serveVerify runs the receiver's part of the check once the sender has STATUS "paused": hash
// the destination with the sender's seed, send the list, and resume only on VERDICT equal.
func (r *receiving) serveVerify(ctx context.Context, sum *Summary) error {
	s := r.session
	untouched := "Nothing was resumed: this destination stays paused"
	fail := func(class error, format string, args ...any) error {
		return &MigrateError{Class: class, Phase: savevm.PhaseDone, Err: fmt.Errorf(format+". "+untouched, args...)}
	}
	f, err := nextControl(ctx, s, time.After(2*r.o.ConnectTimeout), link.FrameVerify)
	if err != nil {
		return fail(ErrSource, "--verify: waiting for the sender's check: %w", err)
	}
	var v link.Verify
	if err := json.Unmarshal(f.Payload, &v); err != nil {
		s.Abort(link.CodeProtocol, "VERIFY: "+err.Error())
		return fail(ErrSource, "--verify: the sender's VERIFY: %w", err)
	}
	r.note("verify", "both guests are paused: hashing the destination's RAM for the sender")
	start := time.Now()
	methods := guestram.KnownMethods(v.Methods) // a newer sender's unknown names are left out
	l, err := guestram.Hash(ctx, r.dst, r.verify.layout, guestram.Options{Seed: v.Seed, Methods: methods})
	var b []byte
	if err == nil {
		b, err = l.MarshalBinary()
	}
	if err != nil && ctx.Err() != nil {
		s.Abort(link.CodeCancelled, "the receiving sidecar was interrupted during the check")
		return fail(ErrCancelled, "--verify was interrupted (%v)", context.Cause(ctx))
	}
	if err != nil {
		s.Abort(link.CodeDestination, "the receiving sidecar could not read the destination's RAM: "+err.Error())
		return &MigrateError{Class: ErrDestination, Phase: savevm.PhaseDone,
			Err: fmt.Errorf("--verify could not read the destination's RAM: %w. %s; the source, paused in postmigrate, is the trustworthy copy", err, untouched)}
	}
	hashMs := time.Since(start).Milliseconds()
	for { // the list in chunks, then an empty one: the end
		n := min(len(b), link.MaxHashChunk)
		if err := s.SendControl(link.FrameHashes, b[:n]); err != nil {
			return fail(ErrSource, "--verify: sending the hashes: %w", err)
		}
		if n == 0 {
			break
		}
		b = b[n:]
	}
	f, err = nextControl(ctx, s, time.After(verifyWait(ramOf(r.verify.layout))), link.FrameVerdict)
	if err != nil {
		return fail(ErrSource, "--verify: waiting for the sender's verdict: %w", err)
	}
	var vd link.Verdict
	if err := json.Unmarshal(f.Payload, &vd); err != nil {
		s.Abort(link.CodeProtocol, "VERDICT: "+err.Error())
		return fail(ErrSource, "--verify: the sender's VERDICT: %w", err)
	}
	vs := &savevm.VerifySummary{}
	if json.Unmarshal(vd.Summary, vs) == nil {
		vs.DestMs = hashMs
		sum.Verify = vs
	}
	if !vd.Equal {
		return &MigrateError{Class: ErrVerify, Phase: savevm.PhaseDone,
			Err: fmt.Errorf("the destination's RAM is not the source's: %s. %s", vd.Message, mismatchAdvice)}
	}
	cctx, cancel := context.WithTimeout(context.Background(), r.o.ConnectTimeout)
	defer cancel()
	if err := r.dst.Cont(cctx); err != nil {
		savevm.SendStatus(s, "failed", "resuming the verified destination: "+err.Error())
		return &MigrateError{Class: ErrDestination, Phase: savevm.PhaseDone, Err: fmt.Errorf("the RAM is verified, but resuming the destination failed: %w; `cont` on its QMP", err)}
	}
	r.note("verify", "verified: "+vd.Message+"; the destination runs")
	if err := savevm.SendStatus(s, "running", ""); err != nil && r.o.Warn != nil {
		r.o.Warn("the destination runs, but the sender did not get the news: " + err.Error())
	}
	return nil
}

// note sends an event of its own type to the caller.
func (r *receiving) note(typ, msg string) { emit(r.o.Events, typ, savevm.PhaseDone, msg) }
