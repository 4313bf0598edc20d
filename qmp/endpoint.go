package qmp

import (
	"context"
	"errors"
	"fmt"
)

// Endpoint says how to reach one QEMU's monitor: its QMP unix socket, or a libvirt domain
// through libvirtd. The CLI's --qmp / --libvirt --domain flags fill it in.
type Endpoint struct {
	Socket     string // QMP unix socket (QEMU's -qmp unix:PATH,server=on,wait=off)
	LibvirtURI string // libvirt connection URI, with Domain
	Domain     string // libvirt domain name
}

// Validate reports an Endpoint that names neither or both ways in.
func (e Endpoint) Validate() error {
	switch {
	case e.Socket != "" && (e.LibvirtURI != "" || e.Domain != ""):
		return errors.New("give either a QMP socket (--qmp) or a libvirt domain (--libvirt URI --domain NAME), not both")
	case e.Socket != "":
		return nil
	case e.Domain != "" && e.LibvirtURI == "":
		return errors.New("--domain needs --libvirt URI (e.g. qemu:///system)")
	case e.LibvirtURI != "" && e.Domain == "":
		return errors.New("--libvirt needs --domain NAME")
	case e.LibvirtURI != "":
		return nil
	}
	return errors.New("no monitor: give --qmp SOCKET or --libvirt URI --domain NAME")
}

// IsZero reports an Endpoint with nothing set.
func (e Endpoint) IsZero() bool { return e == Endpoint{} }

// Dial connects to the monitor and completes the handshake before ctx's deadline.
func (e Endpoint) Dial(ctx context.Context) (*Client, error) {
	if err := e.Validate(); err != nil {
		return nil, err
	}
	if e.Socket != "" {
		return DialUnix(ctx, e.Socket)
	}
	return DialLibvirt(ctx, e.LibvirtURI, e.Domain)
}

// String names the endpoint for messages and locks: the socket path, or "domain NAME on URI".
func (e Endpoint) String() string {
	if e.Socket != "" {
		return e.Socket
	}
	return fmt.Sprintf("domain %s on %s", e.Domain, e.LibvirtURI)
}
