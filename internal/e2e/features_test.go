package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"

	"github.com/tailplane/tailplane/internal/realclient"
)

// TestMagicDNSAndTaildrop: real clients resolve each other's MagicDNS
// names (the node names tailplane gives) through their own resolver
// (100.100.100.100) to the addresses the named node has for itself, and
// send each other a file with Taildrop between devices of one user, which
// needs the file-sharing capability from control.
func TestMagicDNSAndTaildrop(t *testing.T) {
	t.Parallel()
	_, _, ms := aliceTailnet(t, "sender", "receiver")
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

// TestNodeExpiry: an admin expires a node's key; its peer marks it expired
// and stops reaching it, and the node itself learns that its key expired,
// without anyone reconnecting. Logged in again with a key, it is the same
// node at the same addresses, reachable again.
func TestNodeExpiry(t *testing.T) {
	t.Parallel()
	srv, key, ms := aliceTailnet(t, "viewer", "expiring")
	viewer, expiring := ms[0], ms[1]
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	const port = 8090
	if err := expiring.Serve(ctx, port, "hello from "+expiring.Name()); err != nil {
		t.Fatal(err)
	}
	reach := func(when string) {
		t.Helper()
		if err := realclient.Eventually(ctx, 250*time.Millisecond, func() error {
			_, err := viewer.HTTPGet(ctx, expiring.ip4, expiring.dnsName, port)
			return err
		}); err != nil {
			t.Fatalf("%s: %v", when, err)
		}
	}
	reach("before expiry")

	n, ok := nodeByIP(srv.mustListNodes(t), expiring.ip4)
	if !ok {
		t.Fatalf("%v not in nodes list", expiring.ip4)
	}
	start := time.Now()
	srv.mustCLI(t, "nodes", "expire", strconv.FormatUint(n.ID, 10))
	if _, err := viewer.WaitStatus(ctx, func(st *ipnstate.Status) error {
		if p := peerByIP(st, expiring.ip4); p != nil && !p.Expired {
			return fmt.Errorf("peer %s not expired (key expiry %v)", expiring.Name(), p.KeyExpiry)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("the peer saw the expiry after %v", time.Since(start).Round(time.Millisecond))
	if _, err := expiring.WaitStatus(ctx, func(st *ipnstate.Status) error {
		if st.Self.KeyExpiry == nil || st.Self.KeyExpiry.After(time.Now()) {
			return fmt.Errorf("own key expiry %v, want one passed", st.Self.KeyExpiry)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	short, cancelShort := context.WithTimeout(ctx, 5*time.Second)
	defer cancelShort()
	if body, err := viewer.HTTPGet(short, expiring.ip4, expiring.dnsName, port); err == nil {
		t.Errorf("the viewer still reaches the expired node: %q", body)
	}

	// Its user logs it in again with a key: the same node comes back,
	// with its addresses, and is reachable again.
	if _, err := expiring.CLI(ctx, "up", "--force-reauth", "--login-server="+srv.URL(), "--authkey="+key.Key,
		"--hostname=expiring", "--accept-dns=false", "--accept-routes=false", "--timeout=60s"); err != nil {
		t.Fatalf("logging in again: %v", err)
	}
	if _, err := viewer.WaitStatus(ctx, func(st *ipnstate.Status) error {
		if p := peerByIP(st, expiring.ip4); p == nil || p.Expired {
			return fmt.Errorf("peer %s at %v missing or still expired", expiring.Name(), expiring.ip4)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	reach("after logging in again")
	again, ok := nodeByIP(srv.mustListNodes(t), expiring.ip4)
	if !ok || again.ID != n.ID {
		t.Errorf("after logging in again the node is %v (found: %v), want node %d", again, ok, n.ID)
	}
}

// aliceTailnet starts a server with a user alice and joins one client per
// hostname with a reusable key of hers.
func aliceTailnet(t *testing.T, hostnames ...string) (*server, authKey, []*member) {
	t.Helper()
	srv := startServer(t)
	srv.mustCLI(t, "users", "create", "alice")
	key := srv.createKey(t, "alice", "--reusable")
	return srv, key, join(t, srv, key.Key, nil, hostnames...)
}

// TestAdvertiseTags: a client that asks for a tag its key's user owns in
// the policy's tagOwners (`tailscale up --advertise-tags`) joins as a
// tagged node, and its peer sees the tag; asking for a tag the user does
// not own is refused with a message that says so, and adds no node.
func TestAdvertiseTags(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	srv.mustCLI(t, "users", "create", "alice", "--email", "alice@example.com")
	setPolicy(t, srv, `{"tagOwners": {"tag:web": ["alice@example.com"], "tag:db": []},
		"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}`)
	key := srv.createKey(t, "alice", "--reusable")
	ms := join(t, srv, key.Key, nil, "viewer")
	viewer := ms[0]
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	up := func(c *realclient.Client, hostname, tag string) error {
		_, err := c.CLI(ctx, "up", "--login-server="+srv.URL(), "--authkey="+key.Key, "--hostname="+hostname,
			"--advertise-tags="+tag, "--accept-dns=false", "--accept-routes=false", "--timeout=60s")
		return err
	}

	web := realclient.Start(t, realclient.Options{Name: "web", ControlURL: srv.URL()})
	if err := up(web, "web", "tag:web"); err != nil {
		t.Fatalf("up with an owned tag: %v", err)
	}
	st, err := web.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ip := st.Self.TailscaleIPs[0]
	if n, ok := nodeByIP(srv.mustListNodes(t), ip); !ok || !slices.Equal(n.Tags, []string{"tag:web"}) {
		t.Errorf("node at %v: %v (found: %v), want tagged tag:web", ip, n, ok)
	}
	if _, err := viewer.WaitStatus(ctx, func(st *ipnstate.Status) error {
		p := peerByIP(st, ip)
		if p == nil || p.Tags == nil || !slices.Contains(p.Tags.AsSlice(), "tag:web") {
			return fmt.Errorf("peer %v not seen with tag:web", ip)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	before := len(srv.mustListNodes(t))
	db := realclient.Start(t, realclient.Options{Name: "db", ControlURL: srv.URL()})
	err = up(db, "db", "tag:db")
	if err == nil || !strings.Contains(err.Error(), "not permitted") {
		t.Errorf("up with a tag alice does not own: %v, want a refusal saying it is not permitted", err)
	}
	if after := len(srv.mustListNodes(t)); after != before {
		t.Errorf("%d nodes after the refused join, want %d", after, before)
	}
}
