package qmp

import (
	"context"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"
)

func TestEndpointValidate(t *testing.T) {
	cases := []struct {
		e   Endpoint
		err string // "" = valid
	}{
		{Endpoint{Socket: "/run/vm1/qmp.sock"}, ""},
		{Endpoint{LibvirtURI: "qemu:///system", Domain: "vm1"}, ""},
		{Endpoint{}, "no monitor"},
		{Endpoint{Socket: "/s", Domain: "vm1"}, "not both"},
		{Endpoint{Socket: "/s", LibvirtURI: "qemu:///system"}, "not both"},
		{Endpoint{Domain: "vm1"}, "--domain needs --libvirt"},
		{Endpoint{LibvirtURI: "qemu:///system"}, "--libvirt needs --domain"},
	}
	for _, c := range cases {
		err := c.e.Validate()
		if (err == nil) != (c.err == "") || (err != nil && !strings.Contains(err.Error(), c.err)) {
			t.Errorf("%+v: %v, want %q", c.e, err, c.err)
		}
	}
}

// URIs that cannot name a QEMU domain are refused before any connection is tried.
func TestDialLibvirtBadURI(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for uri, want := range map[string]string{
		"":                   "bad connection URI",
		"system":             "bad connection URI",
		"xen:///system":      "the \"xen\" driver",
		"lxc+tcp://h/":       "the \"lxc\" driver",
		"qemu+unix:///x\x7f": "bad connection URI",
	} {
		if _, err := DialLibvirt(ctx, uri, "vm1"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", uri, err, want)
		}
	}
	if _, err := DialLibvirt(ctx, "qemu:///system", ""); err == nil || !strings.Contains(err.Error(), "no domain") {
		t.Errorf("no domain: %v", err)
	}
}

// A libvirt socket that does not exist fails the dial at once with the URI in the message.
func TestDialLibvirtNoDaemon(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := DialLibvirt(ctx, "qemu+unix:///system?socket="+t.TempDir()+"/none.sock", "vm1")
	if err == nil || !strings.Contains(err.Error(), "qemu+unix:///system") {
		t.Errorf("err %v", err)
	}
}

// A libvirtd that accepts the connection and never answers cannot hold the dial past its deadline
// (go-libvirt's calls have none of their own).
func TestDialLibvirtSilentDaemon(t *testing.T) {
	sock := t.TempDir() + "/silent.sock"
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close() // hold it open, say nothing
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = DialLibvirt(ctx, "qemu+unix:///system?socket="+sock, "vm1")
	if err == nil || time.Since(start) > 2*time.Second {
		t.Fatalf("err %v after %v", err, time.Since(start))
	}
	t.Logf("%v after %v", err, time.Since(start).Round(time.Millisecond))
}

// The local socket each URI form reaches, as libvirt's own client chooses it.
func TestLocalSocket(t *testing.T) {
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	for uri, want := range map[string]string{
		"qemu:///system":                       "",
		"qemu+unix:///system":                  "",
		"qemu+unix:///system?socket=/tmp/x.sk": "/tmp/x.sk",
		"qemu:///session":                      "/run/user/1000/libvirt/libvirt-sock",
		"qemu:///session?socket=/tmp/y":        "/tmp/y",
	} {
		u, err := url.Parse(uri)
		if err != nil {
			t.Fatal(err)
		}
		if got := localSocket(u); got != want {
			t.Errorf("%s: %q, want %q", uri, got, want)
		}
	}
}
