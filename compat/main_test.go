package compat

import (
	"os"
	"testing"
)

// TestMain stops the libvirtd the libvirt scenarios started, if they started one.
func TestMain(m *testing.M) {
	code := m.Run()
	StopLibvirtd()
	os.Exit(code)
}
