package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"tailscale.com/tailcfg"

	"github.com/tailplane/tailplane/internal/admin"
	"github.com/tailplane/tailplane/internal/config"
)

// start runs a server in-process until the test ends.
func start(t *testing.T, cfg config.Config) {
	t.Helper()
	if err := cfg.Finish(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
	})
}

func testConfig(t *testing.T) config.Config {
	cfg := config.Default()
	cfg.DataDir = t.TempDir()
	cfg.Listen = freeAddr(t)
	cfg.DERP.STUNListen = ""
	cfg.LogLevel = "warn"
	return cfg
}

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func selfSigned(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:   time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	return certFile, keyFile
}

func TestServesHTTPSFromCertFiles(t *testing.T) {
	cfg := testConfig(t)
	cfg.TLS.CertFile, cfg.TLS.KeyFile = selfSigned(t, t.TempDir())
	start(t, cfg)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, Timeout: 5 * time.Second}
	var res *http.Response
	waitFor(t, "https /key", func() bool {
		var err error
		res, err = hc.Get("https://" + cfg.Listen + "/key?v=130")
		return err == nil
	})
	defer res.Body.Close()
	var keys tailcfg.OverTLSPublicKeyResponse
	if err := json.NewDecoder(res.Body).Decode(&keys); err != nil || keys.PublicKey.IsZero() {
		t.Fatalf("/key over https: %v %+v", err, keys)
	}
	if res.TLS == nil {
		t.Fatal("answer did not come over TLS")
	}
}

func TestPolicyFileReloadsAndKeepsLastGood(t *testing.T) {
	cfg := testConfig(t)
	file := filepath.Join(t.TempDir(), "policy.hujson")
	good1 := "// one\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:22\"]}]}\n"
	good2 := "// two\n{\"acls\": [{\"action\": \"accept\", \"src\": [\"*\"], \"dst\": [\"*:443\"]}]}\n"
	os.WriteFile(file, []byte(good1), 0o600)
	cfg.Policy = config.PolicyConfig{Mode: "file", File: file}
	start(t, cfg)
	ac := admin.NewClient(filepath.Join(cfg.DataDir, "admin.sock"))
	current := func() string {
		p, err := ac.Policy(context.Background())
		if err != nil {
			return ""
		}
		return p.Text
	}
	waitFor(t, "the file policy at start", func() bool { return current() == good1 })

	// Setting the policy through the API is refused in file mode.
	if err := ac.SetPolicy(context.Background(), []byte(good2)); err == nil || !strings.Contains(err.Error(), "file") {
		t.Fatalf("policy set in file mode: %v", err)
	}

	// A change of the file is picked up.
	os.WriteFile(file, []byte(good2), 0o600)
	waitFor(t, "the changed file", func() bool { return current() == good2 })

	// An invalid file is refused; the last good policy stays.
	os.WriteFile(file, []byte("{\"acls\": [{\"action\": \"allow\"}]}"), 0o600)
	time.Sleep(2500 * time.Millisecond) // longer than the file poll interval
	if got := current(); got != good2 {
		t.Fatalf("after an invalid file the policy is %q", got)
	}

	// SIGHUP reloads at once, even when the file's size and time look
	// unchanged to the poller.
	os.WriteFile(file, []byte(good1), 0o600)
	syscall.Kill(os.Getpid(), syscall.SIGHUP)
	waitFor(t, "the SIGHUP reload", func() bool { return current() == good1 })
}
