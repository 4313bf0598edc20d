package compat

// A test PKI, made fresh by every test that needs one (never shipped, never reused): a CA, server
// and client certificates for the sidecar link's mutual TLS and for QEMU's own TLS migration, and
// the bad certificates the link's tests must see refused. ECDSA P-256 throughout.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestServerName is the DNS name every good server certificate of NewTestPKI carries, besides the
// hosts it is asked for (use it as QEMU's tls-hostname or a link's server name).
const TestServerName = "qmg-dst.test"

// TestClientName is the common name and DNS name of NewTestPKI's client certificates.
const TestClientName = "qmg-src.test"

// Authority is a certificate authority of a test PKI.
type Authority struct {
	Name     string
	Cert     *x509.Certificate
	Key      *ecdsa.PrivateKey
	CertPEM  []byte
	CertFile string // its certificate, PEM (the file a peer's --tls-ca names)
}

// KeyPair is a certificate and its private key, as PEM and as files.
type KeyPair struct {
	Name     string
	Cert     *x509.Certificate
	CertPEM  []byte
	KeyPEM   []byte // PKCS #8, unencrypted
	CertFile string // <dir>/<name>.pem
	KeyFile  string // <dir>/<name>-key.pem
}

// CertOptions describes a certificate Issue makes.
type CertOptions struct {
	CommonName string
	DNSNames   []string
	IPs        []net.IP
	// NotBefore and NotAfter default to an hour ago and a day from now.
	NotBefore, NotAfter time.Time
	// ExtKeyUsage is the certificate's purposes (x509.ExtKeyUsageServerAuth, …ClientAuth);
	// required: every certificate of the test PKI says what it is for.
	ExtKeyUsage []x509.ExtKeyUsage
}

// NewAuthority makes a self-signed CA and writes its certificate to <dir>/<name>.pem (and its key
// to <dir>/<name>-key.pem, for tools that want to issue more).
func NewAuthority(dir, name string) (*Authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"qemu-migrate-go tests"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("CA %s: %w", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	ca := &Authority{Name: name, Cert: cert, Key: key, CertPEM: pemBlock("CERTIFICATE", der),
		CertFile: filepath.Join(dir, name+".pem")}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	if err := writeFiles(map[string][]byte{ca.CertFile: ca.CertPEM, filepath.Join(dir, name+"-key.pem"): pemBlock("PRIVATE KEY", keyDER)}); err != nil {
		return nil, err
	}
	return ca, nil
}

// Issue makes a certificate signed by ca with a fresh P-256 key and writes it to
// <dir>/<name>.pem and <dir>/<name>-key.pem.
//
// Its key usage is digital signature and key encipherment. Key encipherment means nothing to an
// ECDSA key, but QEMU 10.0.2 refuses to load a certificate whose key usage (critical, as Go
// writes it) lacks it: "usage does not permit key encipherment" (crypto/tlscredsx509.c; checked
// here: the 7.2.22 here accepts it, and QEMU's later stable releases, 10.0.7 among them, dropped
// the requirement). Go's TLS ignores the bit.
func (ca *Authority) Issue(dir, name string, opt CertOptions) (*KeyPair, error) {
	if len(opt.ExtKeyUsage) == 0 {
		return nil, fmt.Errorf("certificate %s: no ExtKeyUsage", name)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	if opt.NotBefore.IsZero() {
		opt.NotBefore = now.Add(-time.Hour)
	}
	if opt.NotAfter.IsZero() {
		opt.NotAfter = now.Add(24 * time.Hour)
	}
	if opt.CommonName == "" {
		opt.CommonName = name
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: opt.CommonName, Organization: []string{"qemu-migrate-go tests"}},
		NotBefore:             opt.NotBefore,
		NotAfter:              opt.NotAfter,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           opt.ExtKeyUsage,
		DNSNames:              opt.DNSNames,
		IPAddresses:           opt.IPs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("certificate %s: %w", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	kp := &KeyPair{Name: name, Cert: cert, CertPEM: pemBlock("CERTIFICATE", der), KeyPEM: pemBlock("PRIVATE KEY", keyDER),
		CertFile: filepath.Join(dir, name+".pem"), KeyFile: filepath.Join(dir, name+"-key.pem")}
	if err := writeFiles(map[string][]byte{kp.CertFile: kp.CertPEM, kp.KeyFile: kp.KeyPEM}); err != nil {
		return nil, err
	}
	return kp, nil
}

// TestPKI is the set of certificates the link's tests use, all as PEM files in Dir. Server
// certificates name TestServerName, localhost, 127.0.0.1, ::1 and the hosts NewTestPKI was given;
// client certificates name TestClientName.
type TestPKI struct {
	Dir     string
	CA      *Authority // the CA both ends trust
	OtherCA *Authority // a CA nobody trusts

	Server, Client *KeyPair // good: signed by CA, valid now, the right names and purposes

	ServerOtherCA, ClientOtherCA         *KeyPair // signed by OtherCA
	ServerExpired, ClientExpired         *KeyPair // valid from 2 days ago until yesterday
	ServerNotYetValid, ClientNotYetValid *KeyPair // valid from tomorrow
	ServerWrongName                      *KeyPair // names only wrong.qmg.test: no IP, not TestServerName
	// ServerWrongUsage is for TLS clients only (ExtKeyUsageClientAuth); ClientWrongUsage for
	// servers only (ExtKeyUsageServerAuth): each is refused in the role it was not made for.
	ServerWrongUsage, ClientWrongUsage *KeyPair

	// QEMUDir holds the good set in the layout of QEMU's tls-creds-x509 (ca-cert.pem,
	// server-cert.pem, server-key.pem, client-cert.pem, client-key.pem): one folder that serves
	// both `endpoint=server` and `endpoint=client`.
	QEMUDir string
}

// NewTestPKI makes a TestPKI in a fresh folder of t; hosts are further DNS names or IP
// addresses for the server certificates (e.g. LinkDstAddr.String()).
func NewTestPKI(t testing.TB, hosts ...string) *TestPKI {
	t.Helper()
	p, err := MakeTestPKI(t.TempDir(), hosts...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// MakeTestPKI is NewTestPKI into dir.
func MakeTestPKI(dir string, hosts ...string) (*TestPKI, error) {
	p := &TestPKI{Dir: dir, QEMUDir: filepath.Join(dir, "qemu")}
	var err error
	if p.CA, err = NewAuthority(dir, "ca"); err != nil {
		return nil, err
	}
	if p.OtherCA, err = NewAuthority(dir, "other-ca"); err != nil {
		return nil, err
	}
	dns := []string{TestServerName, "localhost"}
	ips := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("::1")}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			ips = append(ips, ip)
		} else {
			dns = append(dns, h)
		}
	}
	server := CertOptions{CommonName: TestServerName, DNSNames: dns, IPs: ips, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	client := CertOptions{CommonName: TestClientName, DNSNames: []string{TestClientName}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	now := time.Now()
	expired := func(o CertOptions) CertOptions {
		o.NotBefore, o.NotAfter = now.Add(-48*time.Hour), now.Add(-24*time.Hour)
		return o
	}
	notYet := func(o CertOptions) CertOptions {
		o.NotBefore, o.NotAfter = now.Add(24*time.Hour), now.Add(48*time.Hour)
		return o
	}
	wrongName := server
	wrongName.CommonName, wrongName.DNSNames, wrongName.IPs = "wrong.qmg.test", []string{"wrong.qmg.test"}, nil
	serverAsClient := server
	serverAsClient.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	clientAsServer := client
	clientAsServer.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	for _, c := range []struct {
		to   **KeyPair
		ca   *Authority
		name string
		opt  CertOptions
	}{
		{&p.Server, p.CA, "server", server},
		{&p.Client, p.CA, "client", client},
		{&p.ServerOtherCA, p.OtherCA, "server-other-ca", server},
		{&p.ClientOtherCA, p.OtherCA, "client-other-ca", client},
		{&p.ServerExpired, p.CA, "server-expired", expired(server)},
		{&p.ClientExpired, p.CA, "client-expired", expired(client)},
		{&p.ServerNotYetValid, p.CA, "server-not-yet-valid", notYet(server)},
		{&p.ClientNotYetValid, p.CA, "client-not-yet-valid", notYet(client)},
		{&p.ServerWrongName, p.CA, "server-wrong-name", wrongName},
		{&p.ServerWrongUsage, p.CA, "server-wrong-usage", serverAsClient},
		{&p.ClientWrongUsage, p.CA, "client-wrong-usage", clientAsServer},
	} {
		if *c.to, err = c.ca.Issue(dir, c.name, c.opt); err != nil {
			return nil, err
		}
	}
	if err := WriteQEMUCreds(p.QEMUDir, []*Authority{p.CA}, p.Server, p.Client); err != nil {
		return nil, err
	}
	return p, nil
}

// WriteQEMUCreds writes a folder for QEMU's `-object tls-creds-x509,dir=DIR,...`: ca-cert.pem
// (every CA in cas, concatenated: the certificates the endpoint trusts and, since QEMU checks its
// own certificate against them when it loads the object, its own issuer), and
// server-cert.pem/server-key.pem and client-cert.pem/client-key.pem for those of server and
// client that are not nil. QEMU needs no dh-params.pem: its ECDHE suites do not use them.
func WriteQEMUCreds(dir string, cas []*Authority, server, client *KeyPair) error {
	if len(cas) == 0 {
		return errors.New("QEMU TLS credentials need at least one CA")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	var bundle []byte
	for _, ca := range cas {
		bundle = append(bundle, ca.CertPEM...)
	}
	files := map[string][]byte{filepath.Join(dir, "ca-cert.pem"): bundle}
	if server != nil {
		files[filepath.Join(dir, "server-cert.pem")] = server.CertPEM
		files[filepath.Join(dir, "server-key.pem")] = server.KeyPEM
	}
	if client != nil {
		files[filepath.Join(dir, "client-cert.pem")] = client.CertPEM
		files[filepath.Join(dir, "client-key.pem")] = client.KeyPEM
	}
	return writeFiles(files)
}

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n.Add(n, big.NewInt(1))
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// writeFiles writes each file with mode 0600 (keys among them), creating its folder.
func writeFiles(files map[string][]byte) error {
	for path, b := range files {
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(path, b, 0o600); err != nil {
			return err
		}
	}
	return nil
}
