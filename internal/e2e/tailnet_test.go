package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"

	"github.com/tailplane/tailplane/internal/realclient"
)

// Bounds of the waits in these tests. They are generous for a loaded 2-core
// machine; the tests log the times they actually measured.
const (
	joinTimeout     = 60 * time.Second // `tailscale up` of a batch of clients
	convergeTimeout = 30 * time.Second // every client lists its peers
	trafficTimeout  = 30 * time.Second // a TCP exchange across the tailnet succeeds
	// Clients are back after a server restart. About 10 s is normal: a
	// client that redials while the server is down gets "connection refused"
	// and then waits out its 10 s dial timeout, because tailscale.com's
	// controlhttp (v1.102.5) does not return early when its only dial (plain
	// HTTP to a private host, no HTTPS fallback) fails.
	reconnectTimeout = 60 * time.Second
	removalTimeout   = 10 * time.Second // a deleted node leaves its peers' netmaps
	servePort        = 8080             // tailnet port of every node's text service
	bulkPort         = 8081             // tailnet port of the bulk file
	bulkSize         = 4 << 20
)

// member is a client that has joined, with its identity as it sees it.
type member struct {
	*realclient.Client
	ip4     netip.Addr
	ip6     netip.Addr
	dnsName string // MagicDNS FQDN without the trailing dot
}

// TestTailnet is the foundation scenario on one server: three clients join
// with one reusable key and reach each other (peers, ping, TCP, bulk); the
// server restarts (SIGTERM, then SIGKILL) and they carry on by themselves with
// the same addresses and names; bad keys are refused with clear errors and
// change nothing; a deleted node leaves the others' peer lists.
func TestTailnet(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	srv.mustCLI(t, "users", "create", "alice")
	key := srv.createKey(t, "alice", "--reusable")

	t0 := time.Now()
	ms := join(t, srv, key.Key, nil, "n1", "n2", "n3")
	t.Logf("3 clients joined in %v", time.Since(t0).Round(time.Millisecond))

	if !t.Run("peers", func(t *testing.T) { checkFullMesh(t, ms) }) {
		t.FailNow() // nothing below can work
	}
	t.Logf("converged %v after the joins started", time.Since(t0).Round(time.Millisecond))

	t.Run("nodes-list", func(t *testing.T) {
		ns := srv.mustListNodes(t)
		if len(ns) != len(ms) {
			t.Errorf("nodes list has %d nodes, want %d: %v", len(ns), len(ms), ns)
		}
		for _, m := range ms {
			n, ok := nodeByIP(ns, m.ip4)
			switch {
			case !ok:
				t.Errorf("%s (%v) missing from nodes list: %v", m.Name(), m.ip4, ns)
			case n.IPv6 != m.ip6 || n.Hostname != m.Name() || n.User != "alice" || !n.Online:
				t.Errorf("%s: nodes list has %v, client has %v %v, hostname %s, user alice, online", m.Name(), n, m.ip4, m.ip6, m.Name())
			case !strings.HasPrefix(m.dnsName, n.Name+"."):
				t.Errorf("%s: MagicDNS name %q does not start with the node name %q", m.Name(), m.dnsName, n.Name)
			}
		}
	})

	t.Run("ping", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), trafficTimeout)
		defer cancel()
		if _, err := ms[0].Ping(ctx, ms[1].ip4); err != nil {
			t.Error(err)
		}
	})

	t.Run("tcp", func(t *testing.T) {
		for _, m := range ms {
			if err := m.Serve(t.Context(), servePort, "hello from "+m.Name()); err != nil {
				t.Fatal(err)
			}
		}
		// A ring covers every node as a sender and as a receiver.
		for i, src := range ms {
			checkHello(t, src, ms[(i+1)%len(ms)])
		}
	})

	t.Run("bulk", func(t *testing.T) { checkBulk(t, ms[0], ms[1]) })

	t.Run("client-restart", func(t *testing.T) { checkClientRestart(t, srv, ms) })
	t.Run("restart-sigterm", func(t *testing.T) { checkRestart(t, srv, ms, srv.Stop) })
	t.Run("restart-sigkill", func(t *testing.T) { checkRestart(t, srv, ms, srv.Kill) })

	// A fourth node joins with a one-off key: the restarted server must add
	// it to the running clients' netmaps, and it is the node deleted below.
	oneOff := srv.createKey(t, "alice")
	n4 := join(t, srv, oneOff.Key, nil, "n4")[0]
	t.Run("new-peer-after-restart", func(t *testing.T) {
		for _, m := range ms {
			if err := waitPeer(t.Context(), m, n4.ip4, true, convergeTimeout); err != nil {
				t.Error(err)
			}
		}
	})

	t.Run("bad-keys", func(t *testing.T) {
		before := srv.mustListNodes(t)
		expired := srv.createKey(t, "alice", "--reusable")
		srv.mustCLI(t, "keys", "expire", string(expired.ID))
		// The group returns when its parallel subtests are done.
		t.Run("refused", func(t *testing.T) {
			badKeys(t, srv, []badKey{
				{"unknown", "tpkey-auth-0000000000000000-" + strings.Repeat("ab", 32), "invalid"},
				{"garbage", "not-a-key", "invalid"},
				{"wrong-secret", "tpkey-auth-" + string(key.ID) + "-" + strings.Repeat("cd", 32), "invalid"},
				{"expired", expired.Key, "expired"},
				{"used", oneOff.Key, "used"},
			})
		})
		if after := srv.mustListNodes(t); !sameNodes(before, after) {
			t.Errorf("nodes list changed by refused keys:\nbefore: %v\nafter:  %v", before, after)
		}
	})

	t.Run("delete", func(t *testing.T) {
		n, ok := nodeByIP(srv.mustListNodes(t), n4.ip4)
		if !ok {
			t.Fatalf("n4 (%v) not in nodes list", n4.ip4)
		}
		start := time.Now()
		srv.mustCLI(t, "nodes", "delete", fmt.Sprint(n.ID))
		var wg sync.WaitGroup
		for _, m := range ms {
			wg.Go(func() {
				if err := waitPeer(t.Context(), m, n4.ip4, false, removalTimeout); err != nil {
					t.Errorf("deleted node still a peer: %v", err)
					return
				}
				t.Logf("%s: n4 gone %v after nodes delete", m.Name(), time.Since(start).Round(time.Millisecond))
			})
		}
		wg.Wait()
		if _, ok := nodeByIP(srv.mustListNodes(t), n4.ip4); ok {
			t.Errorf("n4 still in nodes list after nodes delete")
		}
	})
}

// TestEphemeralNode checks that the node of an ephemeral key is deleted once
// its client is gone: killed, so it cannot log out.
func TestEphemeralNode(t *testing.T) {
	t.Parallel()
	srv := startServer(t, "--ephemeral-timeout", "2s")
	srv.mustCLI(t, "users", "create", "bob")
	key := srv.createKey(t, "bob", "--ephemeral")
	m := join(t, srv, key.Key, nil, "eph")[0]
	if _, ok := nodeByIP(srv.mustListNodes(t), m.ip4); !ok {
		t.Fatalf("ephemeral node %v not in nodes list", m.ip4)
	}
	if err := m.Kill(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	err := realclient.Eventually(ctx, 250*time.Millisecond, func() error {
		ns, err := srv.listNodes(ctx)
		if err != nil {
			return err
		}
		if n, ok := nodeByIP(ns, m.ip4); ok {
			return fmt.Errorf("still listed: %v", n)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("ephemeral node not deleted after its client was killed (--ephemeral-timeout 2s): %v", err)
	}
	t.Logf("ephemeral node deleted %v after its client was killed", time.Since(start).Round(time.Millisecond))
}

// badKey is a key that `tailscale up` must fail with, with an error message
// containing want (compared in lower case).
type badKey struct {
	name, key, want string
}

// badKeys tries each key with a fresh client, in parallel.
func badKeys(t *testing.T, srv *server, keys []badKey) {
	for _, tc := range keys {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := realclient.Start(t, realclient.Options{Name: "bad-" + tc.name, ControlURL: srv.URL()})
			ctx, cancel := context.WithTimeout(t.Context(), joinTimeout)
			defer cancel()
			err := c.Up(ctx, srv.URL(), tc.key, "bad-"+tc.name)
			switch {
			case err == nil:
				t.Fatalf("tailscale up with a %s key succeeded", tc.name)
			case !strings.Contains(strings.ToLower(err.Error()), tc.want):
				t.Fatalf("tailscale up with a %s key: want an error mentioning %q, got: %v", tc.name, tc.want, err)
			}
			t.Logf("refused as expected: %v", err)
		})
	}
}

// TestDERPRelay checks the embedded DERP relay: two clients that may not
// use direct UDP still reach each other, through the server's /derp.
func TestDERPRelay(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	srv.mustCLI(t, "users", "create", "carol")
	key := srv.createKey(t, "carol", "--reusable")
	ms := join(t, srv, key.Key, []string{"TS_DEBUG_ALWAYS_USE_DERP=1"}, "d1", "d2")
	checkFullMesh(t, ms)
	if t.Failed() {
		t.FailNow()
	}
	ctx, cancel := context.WithTimeout(t.Context(), trafficTimeout)
	defer cancel()
	if _, err := ms[0].Ping(ctx, ms[1].ip4); err != nil {
		t.Error(err)
	}
	for _, m := range ms {
		if err := m.Serve(ctx, servePort, "hello from "+m.Name()); err != nil {
			t.Fatal(err)
		}
	}
	checkHello(t, ms[0], ms[1])
	checkHello(t, ms[1], ms[0])
	checkBulk(t, ms[0], ms[1])
	// The bytes took the only path there was; make sure it was the relay.
	st, err := ms[0].Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Peer {
		if p.CurAddr != "" || p.Relay == "" {
			t.Errorf("peer %s: direct address %q, relay %q; want only a DERP relay", p.DNSName, p.CurAddr, p.Relay)
		}
	}
}

// join starts one client per hostname, with env added to its environment,
// and logs them all in with key, in parallel.
func join(t *testing.T, srv *server, key string, env []string, hostnames ...string) []*member {
	t.Helper()
	keys := make([]string, len(hostnames))
	for i := range keys {
		keys[i] = key
	}
	return joinEach(t, srv, env, hostnames, keys)
}

// setIdentity records the addresses and name the client reports for itself.
func (m *member) setIdentity(st *ipnstate.Status) error {
	if st.Self == nil {
		return fmt.Errorf("%s: no Self in status", m.Name())
	}
	for _, a := range st.Self.TailscaleIPs {
		if a.Is4() {
			m.ip4 = a
		} else {
			m.ip6 = a
		}
	}
	m.dnsName = strings.TrimSuffix(st.Self.DNSName, ".")
	if !m.ip4.IsValid() || !m.ip6.IsValid() || m.dnsName == "" {
		return fmt.Errorf("%s: incomplete identity: addresses %v, DNS name %q", m.Name(), st.Self.TailscaleIPs, st.Self.DNSName)
	}
	return nil
}

// checkFullMesh waits until every member lists every other one as an online
// peer, with the addresses and MagicDNS name that member has for itself.
func checkFullMesh(t *testing.T, ms []*member) {
	var wg sync.WaitGroup
	for _, m := range ms {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(t.Context(), convergeTimeout)
			defer cancel()
			_, err := m.WaitStatus(ctx, func(st *ipnstate.Status) error {
				for _, o := range ms {
					if o == m {
						continue
					}
					if err := hasPeer(st, o); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
}

// hasPeer checks that st lists o as an online peer with o's identity.
func hasPeer(st *ipnstate.Status, o *member) error {
	for _, p := range st.Peer {
		if !slices.Contains(p.TailscaleIPs, o.ip4) {
			continue
		}
		switch {
		case !p.Online:
			return fmt.Errorf("peer %s is not online", o.Name())
		case !slices.Contains(p.TailscaleIPs, o.ip6):
			return fmt.Errorf("peer %s has addresses %v, want %v and %v", o.Name(), p.TailscaleIPs, o.ip4, o.ip6)
		case strings.TrimSuffix(p.DNSName, ".") != o.dnsName:
			return fmt.Errorf("peer %s has DNS name %q, want %q", o.Name(), p.DNSName, o.dnsName)
		}
		return nil
	}
	return fmt.Errorf("no peer %s (%v); peers: %s", o.Name(), o.ip4, realclient.DescribePeers(st))
}

// waitPeer waits until m lists (present) or no longer lists (!present) a
// peer with address ip.
func waitPeer(ctx context.Context, m *member, ip netip.Addr, present bool, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	_, err := m.WaitStatus(ctx, func(st *ipnstate.Status) error {
		for _, p := range st.Peer {
			if slices.Contains(p.TailscaleIPs, ip) {
				if present {
					return nil
				}
				return fmt.Errorf("still lists peer %s (%v)", p.DNSName, ip)
			}
		}
		if present {
			return fmt.Errorf("no peer %v; peers: %s", ip, realclient.DescribePeers(st))
		}
		return nil
	})
	return err
}

// checkHello fetches dst's text service from src across the tailnet,
// retrying until the first path is up.
func checkHello(t *testing.T, src, dst *member) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), trafficTimeout)
	defer cancel()
	want := "hello from " + dst.Name()
	start := time.Now()
	err := realclient.Eventually(ctx, 500*time.Millisecond, func() error {
		body, err := src.HTTPGet(ctx, dst.ip4, dst.dnsName, servePort)
		if err == nil && string(body) != want {
			err = fmt.Errorf("got %q, want %q", body, want)
		}
		return err
	})
	if err != nil {
		t.Errorf("TCP %s -> %s over the tailnet: %v", src.Name(), dst.Name(), err)
		return
	}
	t.Logf("TCP %s -> %s: %q after %v", src.Name(), dst.Name(), want, time.Since(start).Round(time.Millisecond))
}

// checkBulk moves bulkSize random bytes from dst to src across the tailnet
// and compares them.
func checkBulk(t *testing.T, src, dst *member) {
	blob := make([]byte, bulkSize)
	rand.Read(blob)
	path := filepath.Join(dst.Dir(), "blob")
	if err := os.WriteFile(path, blob, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := dst.ServeFile(t.Context(), bulkPort, path); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), trafficTimeout)
	defer cancel()
	var got []byte
	var took time.Duration
	err := realclient.Eventually(ctx, time.Second, func() error {
		start := time.Now()
		b, err := src.HTTPGet(ctx, dst.ip4, dst.dnsName, bulkPort)
		got, took = b, time.Since(start)
		return err
	})
	if err != nil {
		t.Fatalf("bulk %s -> %s: %v", dst.Name(), src.Name(), err)
	}
	if !bytes.Equal(got, blob) {
		t.Fatalf("bulk %s -> %s: got %d bytes, not the %d sent", dst.Name(), src.Name(), len(got), len(blob))
	}
	t.Logf("bulk %s -> %s: %d MiB byte-identical in %v (%.1f MiB/s)", dst.Name(), src.Name(), bulkSize>>20,
		took.Round(time.Millisecond), float64(bulkSize)/(1<<20)/took.Seconds())
}

// checkRestart stops the server with stop, starts it again on the same data
// directory and port, and checks that every client comes back by itself:
// the server lists it online with unchanged name and addresses, the client
// keeps its own addresses and name and sees its peers online, and TCP flows.
// watchOffline polls m's peers every 100 ms until the returned function is
// called, which fails the test if any peer was shown offline meanwhile.
func watchOffline(t *testing.T, m *member, during string) func() {
	ctx, stop := context.WithCancel(t.Context())
	var offline []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			if st, err := m.Status(ctx); err == nil {
				for _, p := range st.Peer {
					if !p.Online {
						offline = append(offline, fmt.Sprintf("%s at %v", p.HostName, time.Now().Format("15:04:05.000")))
					}
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return func() {
		stop()
		<-done
		if len(offline) > 0 {
			t.Errorf("%s saw peers offline during %s: %v", m.Name(), during, offline)
		}
	}
}

// checkClientRestart restarts one client's tailscaled (SIGTERM, same
// state), down for 2 s: its map stream ends and a new one comes back
// within the offline grace (10 s), so its peers never see it offline, and
// traffic reaches it again. With offline_grace 0 its peers see it offline
// for those seconds. (An instant restart, about 30 ms, is hidden by the
// engine's coalescing window even without the grace.)
func checkClientRestart(t *testing.T, srv *server, ms []*member) {
	defer watchOffline(t, ms[0], ms[1].Name()+"'s restart")()
	start := time.Now()
	if err := ms[1].RestartAfter(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), reconnectTimeout)
	defer cancel()
	if _, err := ms[1].WaitStatus(ctx, func(st *ipnstate.Status) error {
		if st.BackendState != "Running" {
			return fmt.Errorf("state %s", st.BackendState)
		}
		return hasPeer(st, ms[0])
	}); err != nil {
		t.Fatalf("%s after its restart: %v", ms[1].Name(), err)
	}
	err := realclient.Eventually(ctx, 100*time.Millisecond, func() error {
		n, ok := nodeByIP(srv.mustListNodes(t), ms[1].ip4)
		if !ok || !n.Online || !n.Connected {
			return fmt.Errorf("%s on the server: %v", ms[1].Name(), n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s restarted and connected again %v later", ms[1].Name(), time.Since(start).Round(time.Millisecond))
	if _, err := ms[0].Ping(ctx, ms[1].ip4); err != nil {
		t.Error(err)
	}
}

func checkRestart(t *testing.T, srv *server, ms []*member, stop func(*testing.T)) {
	before := srv.mustListNodes(t)
	// A client watches its peers through the restart: with the restart
	// grace, no peer ever shows offline (the clients are only
	// reconnecting to control; their tunnels never stopped).
	defer watchOffline(t, ms[0], "the server's restart")()
	start := time.Now()
	stop(t)
	t.Logf("server stopped in %v", time.Since(start).Round(time.Millisecond))
	srv.Start(t)
	// Before any client is back, the restarted server presumes them online.
	for _, n := range srv.mustListNodes(t) {
		if !n.Online {
			t.Errorf("right after the restart %v is listed offline", n)
		}
	}

	ctx, cancel := context.WithTimeout(t.Context(), reconnectTimeout)
	defer cancel()
	err := realclient.Eventually(ctx, 250*time.Millisecond, func() error {
		after, err := srv.listNodes(ctx)
		if err != nil {
			return err
		}
		if !sameNodes(before, after) {
			return fmt.Errorf("nodes changed across the restart:\nbefore: %v\nafter:  %v", before, after)
		}
		for _, n := range after {
			if !n.Online || !n.Connected {
				return fmt.Errorf("not connected again: %v", n)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("after restart: %v", err)
	}
	t.Logf("all %d clients have a map stream to the restarted server %v after the restart began", len(ms), time.Since(start).Round(time.Millisecond))

	var wg sync.WaitGroup
	for _, m := range ms {
		wg.Go(func() {
			_, err := m.WaitStatus(ctx, func(st *ipnstate.Status) error {
				if st.BackendState != "Running" {
					return fmt.Errorf("state %s", st.BackendState)
				}
				again := &member{Client: m.Client}
				if err := again.setIdentity(st); err != nil {
					return err
				}
				if again.ip4 != m.ip4 || again.ip6 != m.ip6 || again.dnsName != m.dnsName {
					return fmt.Errorf("identity changed: %v %v %s, was %v %v %s", again.ip4, again.ip6, again.dnsName, m.ip4, m.ip6, m.dnsName)
				}
				for _, o := range ms {
					if o != m {
						if err := hasPeer(st, o); err != nil {
							return err
						}
					}
				}
				return nil
			})
			if err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	t.Logf("clients back with their identities and peers %v after the restart began", time.Since(start).Round(time.Millisecond))
	checkHello(t, ms[0], ms[1])
}

// sameNodes reports whether a and b list the same nodes with the same
// identities (online state aside).
func sameNodes(a, b []node) bool {
	key := func(ns []node) []string {
		var ks []string
		for _, n := range ns {
			ks = append(ks, fmt.Sprintf("%d %s %s %s %v %v", n.ID, n.Name, n.Hostname, n.User, n.IPv4, n.IPv6))
		}
		slices.Sort(ks)
		return ks
	}
	return slices.Equal(key(a), key(b))
}
