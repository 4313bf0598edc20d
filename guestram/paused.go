package guestram

import (
	"context"
	"fmt"
	"strings"

	"github.com/qemu-migrate-go/qemu-migrate-go/qmp"
)

// HeldPaused says whether a destination QEMU will stay paused once it has loaded an incoming
// migration, so that its RAM can be verified before it runs.
//
// What decides it (QEMU 7.2 and 10.0, migration/migration.c process_incoming_migration_bh,
// monitor/qmp-cmds.c): after loading, the destination starts the guest when the global
// `autostart` is set and the source was running; otherwise it goes to "paused". autostart is
// cleared by -S on the command line and by QMP `stop` while the destination is in "inmigrate",
// and set again by QMP `cont` while in "inmigrate". The command line is visible in
// /proc/PID/cmdline; a `stop` or `cont` some other monitor client sent is not visible anywhere.
type HeldPaused struct {
	Held    bool     // the destination will not run by itself after loading (as far as can be seen)
	Status  string   // its run state now (query-status)
	Reasons []string // what Held rests on
	Unknown []string // what cannot be determined from here
}

// CheckHeldPaused reports whether the destination QEMU behind c (process pid on this host) will
// stay paused after loading. It changes nothing; HoldPaused makes a destination hold.
func CheckHeldPaused(ctx context.Context, c *qmp.Client, pid int) (HeldPaused, error) {
	var h HeldPaused
	st, err := c.QueryStatus(ctx)
	if err != nil {
		return h, fmt.Errorf("guestram: %w", err)
	}
	h.Status = st.Status
	args, err := cmdline(pid)
	if err != nil {
		return h, fmt.Errorf("guestram: command line of QEMU pid %d: %w", pid, err)
	}
	cl := parseQEMUArgs(args[1:])
	switch {
	case st.Running || st.Status == "running":
		h.Reasons = append(h.Reasons, "the destination is already running")
		return h, nil
	case st.Status != "inmigrate":
		// Loaded (or never incoming): it runs only when someone sends cont.
		h.Held = true
		h.Reasons = append(h.Reasons, fmt.Sprintf("the destination is %q, not waiting for a migration: it runs only on a `cont`", st.Status))
		return h, nil
	}
	if !cl.incoming {
		h.Unknown = append(h.Unknown, "no -incoming on the command line although the state is inmigrate")
	}
	switch {
	case cl.stopped:
		h.Held = true
		h.Reasons = append(h.Reasons, "-S on the command line: QEMU clears autostart and goes to \"paused\" after loading")
	case cl.ambiguousS != "":
		h.Unknown = append(h.Unknown, fmt.Sprintf("-S follows %s, which this check does not know to take no argument: it may be that option's value", cl.ambiguousS))
	default:
		h.Reasons = append(h.Reasons, "no -S on the command line: QEMU starts the guest as soon as it has loaded the stream (when the source was running); HoldPaused (QMP stop while inmigrate) prevents that")
	}
	h.Unknown = append(h.Unknown, "a QMP `cont` (or `stop`) sent by another monitor client while the destination waits in inmigrate changes this and cannot be seen from outside QEMU")
	return h, nil
}

// HoldPaused makes a destination that waits in "inmigrate" stay paused after loading: QMP `stop`
// in that state clears QEMU's autostart (the same effect as -S). It fails for a destination in
// any other state.
func HoldPaused(ctx context.Context, c *qmp.Client) error {
	st, err := c.QueryStatus(ctx)
	if err != nil {
		return fmt.Errorf("guestram: %w", err)
	}
	if st.Status != "inmigrate" {
		return fmt.Errorf("guestram: the destination is %q, not inmigrate: stop would not hold it after loading", st.Status)
	}
	if err := c.Stop(ctx); err != nil {
		return fmt.Errorf("guestram: %w", err)
	}
	return nil
}

// qemuArgs is what parseQEMUArgs found.
type qemuArgs struct {
	stopped    bool   // -S given as an option
	incoming   bool   // -incoming given
	ambiguousS string // "-S" appeared right after this option, which may take it as its value
}

// noArgOptions are QEMU system-emulator options that take no argument (DEF(..., 0, ...) in
// qemu-options.hx of 7.2 and 10.0). An option not listed is taken to consume the next word, so a
// missing entry can only make the check say "cannot tell", never see a -S that is not there.
var noArgOptions = map[string]bool{
	"h": true, "help": true, "version": true, "S": true, "s": true, "snapshot": true,
	"nographic": true, "no-user-config": true, "nodefaults": true, "daemonize": true,
	"no-reboot": true, "no-shutdown": true, "enable-kvm": true, "no-hpet": true, "no-acpi": true,
	"full-screen": true, "no-quit": true, "alt-grab": true, "ctrl-grab": true, "portrait": true,
	"win2k-hack": true, "no-fd-bootchk": true, "enable-fips": true, "only-migratable": true,
	"preconfig": true, "xen-attach": true, "xen-domid-restrict": true, "mem-prealloc": true,
	"audio-help": true, "semihosting": true, "usb": true, "singlestep": true, "sdl": true,
	"enable-sync-profile": true, "no-frame": true, "nodefconfig": true, "rtc-td-hack": true,
	"no-kvm-irqchip": true, "no-kvm-pit": true, "no-kvm-pit-reinjection": true, "no-kvm": true,
}

// parseQEMUArgs walks QEMU's arguments (without argv[0]) the way QEMU does: a word starting with
// '-' (or "--") is an option, and an option that takes an argument consumes the next word,
// whatever it looks like; other words are disk images.
func parseQEMUArgs(args []string) qemuArgs {
	var r qemuArgs
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") || a == "-" {
			continue
		}
		name := strings.TrimPrefix(strings.TrimPrefix(a, "-"), "-")
		switch {
		case name == "S":
			r.stopped = true
		case name == "incoming":
			r.incoming = true
		}
		if noArgOptions[name] {
			continue
		}
		if i+1 < len(args) && strings.TrimPrefix(strings.TrimPrefix(args[i+1], "-"), "-") == "S" && !r.stopped {
			r.ambiguousS = a
		}
		i++ // the option's argument
	}
	if r.stopped {
		r.ambiguousS = ""
	}
	return r
}
