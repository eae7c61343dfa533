package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tailplane/tailplane/internal/realclient"
)

// TestMagicDNSAndTaildrop: real clients resolve each other's MagicDNS
// names (the node names tailplane gives) through their own resolver
// (100.100.100.100) to the addresses the named node has for itself, and
// send each other a file with Taildrop between devices of one user, which
// needs the file-sharing capability from control.
func TestMagicDNSAndTaildrop(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	srv.mustCLI(t, "users", "create", "alice")
	key := srv.createKey(t, "alice", "--reusable")
	ms := join(t, srv, key.Key, nil, "sender", "receiver")
	sender, receiver := ms[0], ms[1]
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()

	out, err := sender.CLI(ctx, "dns", "query", receiver.dnsName)
	if err != nil || !strings.Contains(string(out), receiver.ip4.String()) {
		t.Errorf("dns query %s: %q, %v; want %v", receiver.dnsName, out, err, receiver.ip4)
	}
	out, err = sender.CLI(ctx, "dns", "query", "nobody."+strings.SplitN(receiver.dnsName, ".", 2)[1])
	if err == nil && strings.Contains(string(out), "100.64.") {
		t.Errorf("dns query of a name nobody has answered an address: %q", out)
	}

	const text = "sent through tailplane's tailnet"
	file := filepath.Join(t.TempDir(), "hello.txt")
	if err := os.WriteFile(file, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := realclient.Eventually(ctx, time.Second, func() error {
		_, err := sender.CLI(ctx, "file", "cp", file, receiver.ip4.String()+":")
		return err
	}); err != nil {
		t.Fatalf("taildrop: %v", err)
	}
	inbox := t.TempDir()
	if _, err := receiver.CLI(ctx, "file", "get", "--wait", inbox); err != nil {
		t.Fatalf("file get: %v", err)
	}
	got, err := os.ReadFile(filepath.Join(inbox, "hello.txt"))
	if err != nil || string(got) != text {
		t.Errorf("received %q (%v), want %q", got, err, text)
	}
}
