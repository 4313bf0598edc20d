package link

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
)

// TLSFiles are the --tls-* flags of one side (PROTOCOL.md §1).
type TLSFiles struct {
	Cert, Key string // this side's certificate chain and key (PEM)
	CA        string // the CA the peer's certificate must chain to (PEM)
	// Peer (receiver only): the name the sender's certificate must carry (a DNS or IP SAN, or
	// its subject CN); "" accepts any certificate from the CA.
	Peer string
}

// Validate reports flags that cannot work together.
func (f TLSFiles) Validate() error {
	var missing []string
	for _, x := range []struct{ v, name string }{{f.Cert, "--tls-cert"}, {f.Key, "--tls-key"}, {f.CA, "--tls-ca"}} {
		if x.v == "" {
			missing = append(missing, x.name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("the link is mutual TLS: give %s (or --no-tls on both sides for plain text)", strings.Join(missing, ", "))
	}
	return nil
}

func loadCA(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--tls-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in it", path)
	}
	return pool, nil
}

func loadPair(f TLSFiles) (tls.Certificate, error) {
	c, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return c, fmt.Errorf("--tls-cert %s / --tls-key %s: %w", f.Cert, f.Key, err)
	}
	return c, nil
}

// ClientTLS is the sender's configuration: TLS 1.3, its own certificate, and the receiver's
// checked against the CA and against host (the name or IP of qmg://HOST:PORT).
func ClientTLS(f TLSFiles, host string) (*tls.Config, error) {
	if err := f.Validate(); err != nil {
		return nil, err
	}
	pool, err := loadCA(f.CA)
	if err != nil {
		return nil, err
	}
	cert, err := loadPair(f)
	if err != nil {
		return nil, err
	}
	// Always present the certificate, even when the receiver's CA list does not name its
	// issuer (Go's client would then send none): the receiver's error can then say exactly
	// what is wrong with it.
	return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: host,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }}, nil
}

// ServerTLS is the receiver's configuration: TLS 1.3, its own certificate, and a client
// certificate required, chaining to the CA and, with Peer, carrying that name.
func ServerTLS(f TLSFiles) (*tls.Config, error) {
	if err := f.Validate(); err != nil {
		return nil, err
	}
	pool, err := loadCA(f.CA)
	if err != nil {
		return nil, err
	}
	cert, err := loadPair(f)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert}
	if f.Peer != "" {
		peer := f.Peer
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no client certificate")
			}
			return checkPeerName(cs.PeerCertificates[0], peer)
		}
	}
	return cfg, nil
}

// checkPeerName accepts a certificate that carries name as a DNS or IP SAN or as its subject CN.
func checkPeerName(c *x509.Certificate, name string) error {
	if c.VerifyHostname(name) == nil || c.Subject.CommonName == name {
		return nil
	}
	var have []string
	have = append(have, c.DNSNames...)
	for _, ip := range c.IPAddresses {
		have = append(have, ip.String())
	}
	if c.Subject.CommonName != "" {
		have = append(have, "CN="+c.Subject.CommonName)
	}
	return fmt.Errorf("the sender's certificate is for %s, not --tls-peer %q", strings.Join(have, ", "), name)
}

// ErrNotTLS is wrapped when the receiver got plain text on a TLS listener.
var ErrNotTLS = errors.New("the peer does not speak TLS")

// explainHandshake turns a TLS handshake or first-read error into a message that names the
// cause from this side's point of view ("sender" or "receiver").
func explainHandshake(side string, err error) error {
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		if side == "receiver" {
			return fmt.Errorf("%w: the sender connected without TLS (it has --no-tls?); this receiver requires mutual TLS", ErrNotTLS)
		}
		return fmt.Errorf("%w: the receiver answered without TLS (it has --no-tls?); start both sides with TLS or both with --no-tls", ErrNotTLS)
	}
	var ve *tls.CertificateVerificationError
	if errors.As(err, &ve) {
		who := "the receiver's"
		if side == "receiver" {
			who = "the sender's"
		}
		return fmt.Errorf("%s certificate is not acceptable: %v", who, explainX509(ve.Err))
	}
	if alert, ok := remoteAlert(err); ok {
		// The peer refused us: the alert says which of our credentials it did not like.
		who := "the receiver"
		if side == "receiver" {
			who = "the sender"
		}
		switch alert {
		case "certificate required":
			return fmt.Errorf("%s requires a client certificate and this side sent none (give --tls-cert and --tls-key): %v", who, err)
		case "unknown certificate authority", "bad certificate", "certificate expired", "expired certificate",
			"unsupported certificate", "certificate unknown", "certificate revoked":
			return fmt.Errorf("%s refused this side's certificate (%s: not signed by its --tls-ca, expired or not yet valid, or not the --tls-peer it pins): %v", who, alert, err)
		}
		return fmt.Errorf("%s ended the TLS handshake (%s): %v", who, alert, err)
	}
	if side == "receiver" && strings.Contains(err.Error(), "client didn't provide a certificate") {
		return fmt.Errorf("the sender presented no certificate: this receiver requires one signed by its --tls-ca: %v", err)
	}
	if errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "connection reset") || errors.Is(err, errEOF) {
		if side == "sender" {
			return fmt.Errorf("the receiver closed the connection during the TLS handshake (does it run without TLS — --no-tls —, or did it refuse this side's certificate?): %v", err)
		}
	}
	return err
}

// remoteAlert returns the text of a TLS alert the peer sent ("bad certificate", …): crypto/tls
// reports those as "remote error: tls: <alert>" (tls.AlertError is used only for QUIC).
func remoteAlert(err error) (string, bool) {
	var ae tls.AlertError
	if errors.As(err, &ae) {
		return strings.TrimPrefix(ae.Error(), "tls: "), true
	}
	s := err.Error()
	i := strings.LastIndex(s, "remote error: tls: ")
	if i < 0 {
		return "", false
	}
	return s[i+len("remote error: tls: "):], true
}

// explainX509 says in words what a certificate check found.
func explainX509(err error) string {
	var ua x509.UnknownAuthorityError
	var inv x509.CertificateInvalidError
	var host x509.HostnameError
	switch {
	case errors.As(err, &ua):
		return "not signed by --tls-ca (" + err.Error() + ")"
	case errors.As(err, &inv) && inv.Reason == x509.Expired:
		return "expired or not yet valid (" + err.Error() + ")"
	case errors.As(err, &host):
		return "issued for another name (" + err.Error() + ")"
	}
	return err.Error()
}
