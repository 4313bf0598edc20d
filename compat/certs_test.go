package compat

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// tlsConfigs loads a client and a server configuration from PEM files the way a sidecar given
// --tls-cert/--tls-key/--tls-ca would: mutual TLS, each side trusting only its CA file.
func tlsConfigs(t *testing.T, server, client *KeyPair, serverCA, clientCA, serverName string) (*tls.Config, *tls.Config) {
	t.Helper()
	pool := func(file string) *x509.CertPool {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		p := x509.NewCertPool()
		if !p.AppendCertsFromPEM(b) {
			t.Fatalf("%s: no certificate", file)
		}
		return p
	}
	load := func(kp *KeyPair) tls.Certificate {
		c, err := tls.LoadX509KeyPair(kp.CertFile, kp.KeyFile)
		if err != nil {
			t.Fatalf("%s: %v", kp.Name, err)
		}
		return c
	}
	srv := &tls.Config{Certificates: []tls.Certificate{load(server)}, ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs: pool(serverCA), MinVersion: tls.VersionTLS13}
	// GetClientCertificate sends the certificate whatever CAs the server says it accepts: with
	// plain Certificates, Go's client silently sends none when its issuer is not among them, and
	// the server would refuse "no certificate" instead of judging this one.
	cc := load(client)
	cli := &tls.Config{GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cc, nil },
		RootCAs: pool(clientCA), ServerName: serverName, MinVersion: tls.VersionTLS13}
	return srv, cli
}

// handshake runs one TLS 1.3 handshake over loopback and returns the client's and the server's
// error (the server learns of a refused client certificate only from its own handshake).
func handshake(t *testing.T, srvConf, cliConf *tls.Config) (cliErr, srvErr error) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	srvDone := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			srvDone <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, srvConf)
		err = tc.Handshake()
		if err == nil {
			// TLS 1.3: the server verifies the client's certificate after the client's
			// handshake has returned; a read makes the client see the server's verdict.
			_, err = tc.Write([]byte("ok"))
		}
		srvDone <- err
	}()
	c, err := net.DialTimeout("tcp", l.Addr().String(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(c, cliConf)
	cliErr = tc.Handshake()
	if cliErr == nil {
		buf := make([]byte, 2)
		_, cliErr = tc.Read(buf)
	}
	tc.Close()
	return cliErr, <-srvDone
}

// TestTestPKI checks every certificate of the test PKI with Go's own TLS stack, as the link
// will use them: the good pair completes a mutual handshake (by DNS name and by IP), and each
// bad certificate is refused by the side that must refuse it, for the reason it was made for.
func TestTestPKI(t *testing.T) {
	p := NewTestPKI(t, LinkDstAddr.String(), "dst.example.test")
	ca, other := p.CA.CertFile, p.OtherCA.CertFile
	cases := []struct {
		name           string
		server, client *KeyPair
		serverCA       string // what the server trusts for client certificates
		clientCA       string // what the client trusts for the server's
		serverName     string
		refusedBy      string // "", "client" or "server"
		reason         string // in the refusing side's error
	}{
		{"good by DNS name", p.Server, p.Client, ca, ca, TestServerName, "", ""},
		{"good by IP", p.Server, p.Client, ca, ca, LinkDstAddr.String(), "", ""},
		{"good by extra name", p.Server, p.Client, ca, ca, "dst.example.test", "", ""},
		{"good on loopback", p.Server, p.Client, ca, ca, "127.0.0.1", "", ""},
		{"server from another CA", p.ServerOtherCA, p.Client, ca, ca, TestServerName, "client", "unknown authority"},
		{"client from another CA", p.Server, p.ClientOtherCA, ca, ca, TestServerName, "server", "unknown authority"},
		{"client trusts only the other CA", p.Server, p.Client, ca, other, TestServerName, "client", "unknown authority"},
		{"server expired", p.ServerExpired, p.Client, ca, ca, TestServerName, "client", "expired"},
		{"client expired", p.Server, p.ClientExpired, ca, ca, TestServerName, "server", "expired"},
		{"server not yet valid", p.ServerNotYetValid, p.Client, ca, ca, TestServerName, "client", "not yet valid"},
		{"client not yet valid", p.Server, p.ClientNotYetValid, ca, ca, TestServerName, "server", "not yet valid"},
		{"server wrong name", p.ServerWrongName, p.Client, ca, ca, TestServerName, "client", "not " + TestServerName},
		{"server wrong name by IP", p.ServerWrongName, p.Client, ca, ca, LinkDstAddr.String(), "client", "doesn't contain any IP SANs"},
		{"server cert made for clients", p.ServerWrongUsage, p.Client, ca, ca, TestServerName, "client", "incompatible key usage"},
		{"client cert made for servers", p.Server, p.ClientWrongUsage, ca, ca, TestServerName, "server", "incompatible key usage"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			srvConf, cliConf := tlsConfigs(t, c.server, c.client, c.serverCA, c.clientCA, c.serverName)
			cliErr, srvErr := handshake(t, srvConf, cliConf)
			switch c.refusedBy {
			case "":
				if cliErr != nil || srvErr != nil {
					t.Fatalf("handshake failed: client %v, server %v", cliErr, srvErr)
				}
			case "client":
				var verr *tls.CertificateVerificationError
				if !errors.As(cliErr, &verr) || !strings.Contains(cliErr.Error(), c.reason) {
					t.Fatalf("client error %v, want a certificate verification error saying %q (server: %v)", cliErr, c.reason, srvErr)
				}
			case "server":
				var verr *tls.CertificateVerificationError
				if !errors.As(srvErr, &verr) || !strings.Contains(srvErr.Error(), c.reason) {
					t.Fatalf("server error %v, want a certificate verification error saying %q (client: %v)", srvErr, c.reason, cliErr)
				}
				if cliErr == nil {
					t.Error("the client did not learn that its certificate was refused")
				}
			}
		})
	}
}

// TestTestPKIFiles checks what is written where: PEM files that parse, keys that are private to
// the owner, certificates with the properties their names promise, and QEMU's layout.
func TestTestPKIFiles(t *testing.T) {
	p := NewTestPKI(t, LinkDstAddr.String())
	for _, kp := range []*KeyPair{p.Server, p.Client, p.ServerExpired, p.ServerWrongName} {
		if _, err := tls.LoadX509KeyPair(kp.CertFile, kp.KeyFile); err != nil {
			t.Errorf("%s: %v", kp.Name, err)
		}
		st, err := os.Stat(kp.KeyFile)
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v (%v), want 0600", kp.KeyFile, st.Mode().Perm(), err)
		}
	}
	if !p.CA.Cert.IsCA || p.Server.Cert.IsCA || p.Server.Cert.CheckSignatureFrom(p.CA.Cert) != nil {
		t.Error("the server certificate is not a leaf signed by the CA")
	}
	if p.ServerOtherCA.Cert.CheckSignatureFrom(p.CA.Cert) == nil || p.ServerOtherCA.Cert.CheckSignatureFrom(p.OtherCA.Cert) != nil {
		t.Error("server-other-ca is not signed by the other CA alone")
	}
	if err := p.Server.Cert.VerifyHostname(LinkDstAddr.String()); err != nil {
		t.Error(err)
	}
	now := time.Now()
	if !p.ServerExpired.Cert.NotAfter.Before(now) || !p.ClientNotYetValid.Cert.NotBefore.After(now) {
		t.Error("validity periods are not what the names say")
	}
	for _, f := range []string{"ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"} {
		if _, err := os.Stat(filepath.Join(p.QEMUDir, f)); err != nil {
			t.Error(err)
		}
	}
	two := filepath.Join(t.TempDir(), "two")
	if err := WriteQEMUCreds(two, []*Authority{p.CA, p.OtherCA}, nil, p.ClientOtherCA); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(two, "ca-cert.pem"))
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) || strings.Count(string(b), "BEGIN CERTIFICATE") != 2 {
		t.Error("the CA bundle does not hold both CAs")
	}
	if _, err := os.Stat(filepath.Join(two, "server-cert.pem")); err == nil {
		t.Error("a server certificate was written without one being given")
	}
}
