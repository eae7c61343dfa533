package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"

	"github.com/tailplane/tailplane/internal/realclient"
	"github.com/tailplane/tailplane/internal/store/postgres/pgtest"
)

// TestReplicas runs two tailplane servers on one PostgreSQL database, as
// replicas with meshed DERP relays: real clients joined to different
// replicas see and reach each other, directly and through the relays, and
// what an admin does on one replica (users, keys, deleting a node) takes
// effect on the other; when the leading replica crashes, the other takes
// over its jobs and its nodes.
func TestReplicas(t *testing.T) {
	t.Parallel()
	dsn := pgtest.SchemaDSN(t)
	// b's short restart grace is the time it gives a crashed replica's
	// clients to reconnect (crashed-replica).
	a := newServer(t, "--db-type", "postgres", "--postgres-dsn", dsn)
	b := newServer(t, "--db-type", "postgres", "--postgres-dsn", dsn, "--restart-grace", "1s")
	a.extra = append(a.extra, "--derp-mesh-with", b.URL()+"/derp")
	b.extra = append(b.extra, "--derp-mesh-with", a.URL()+"/derp")
	a.Start(t)
	b.Start(t)

	a.mustCLI(t, "users", "create", "alice")
	// The user made on a is known to b once b has followed a's change.
	var key authKey
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := realclient.Eventually(ctx, 100*time.Millisecond, func() error {
		out, err := b.CLI(ctx, "keys", "create", "--user", "alice", "--reusable", "--output", "json")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		if err := json.Unmarshal(out, &key); err != nil || key.Key == "" {
			return fmt.Errorf("keys create: want JSON with a key, got %q (%v)", out, err)
		}
		return nil
	}); err != nil {
		t.Fatalf("replica b never learned replica a's user: %v", err)
	}

	t0 := time.Now()
	n1 := join(t, a, key.Key, nil, "r1")[0]
	n2 := join(t, b, key.Key, nil, "r2")[0]
	if !t.Run("peers", func(t *testing.T) { checkFullMesh(t, []*member{n1, n2}) }) {
		t.FailNow()
	}
	t.Logf("clients on two replicas see each other %v after the joins started", time.Since(t0).Round(time.Millisecond))
	if n1.ip4 == n2.ip4 {
		t.Fatalf("both replicas gave %v", n1.ip4)
	}

	t.Run("presence", func(t *testing.T) {
		// Each replica lists its own client as connected to it, and the
		// other's as connected to another replica, not reconnecting.
		for _, c := range []struct {
			srv         *server
			own, others *member
		}{{a, n1, n2}, {b, n2, n1}} {
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			err := realclient.Eventually(ctx, 100*time.Millisecond, func() error {
				ns, err := c.srv.listNodes(ctx)
				if err != nil {
					return err
				}
				own, ok1 := nodeByIP(ns, c.own.ip4)
				other, ok2 := nodeByIP(ns, c.others.ip4)
				if !ok1 || !ok2 || !own.Online || !own.Connected || own.ConnectedElsewhere ||
					!other.Online || other.Connected || !other.ConnectedElsewhere {
					return fmt.Errorf("lists %v; want its own client connected here and the other's elsewhere", ns)
				}
				return nil
			})
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			out := string(c.srv.mustCLI(t, "nodes", "list"))
			if !strings.Contains(out, "online (other replica)") {
				t.Errorf("nodes list shows no client on the other replica:\n%s", out)
			}
		}
	})

	t.Run("tcp", func(t *testing.T) {
		for _, m := range []*member{n1, n2} {
			if err := m.Serve(t.Context(), servePort, "hello from "+m.Name()); err != nil {
				t.Fatal(err)
			}
		}
		checkHello(t, n1, n2)
		checkHello(t, n2, n1)
	})

	t.Run("delete-on-other-replica", func(t *testing.T) {
		// n3 joins a with a one-off key made on b; b deletes it.
		oneOff := b.createKey(t, "alice")
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		if err := realclient.Eventually(ctx, 200*time.Millisecond, func() error {
			if ns, err := a.listNodes(ctx); err != nil || len(ns) != 2 {
				return fmt.Errorf("a lists %v (%v)", ns, err)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		n3 := join(t, a, oneOff.Key, nil, "r3")[0]
		if err := waitPeer(t.Context(), n2, n3.ip4, true, convergeTimeout); err != nil {
			t.Fatalf("a client of b does not see a node that joined a: %v", err)
		}
		var id uint64
		if err := realclient.Eventually(ctx, 100*time.Millisecond, func() error {
			n, ok := nodeByIP(b.mustListNodes(t), n3.ip4)
			if !ok {
				return fmt.Errorf("b does not list r3 (%v)", n3.ip4)
			}
			id = n.ID
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		b.mustCLI(t, "nodes", "delete", fmt.Sprint(id))
		if err := waitPeer(t.Context(), n1, n3.ip4, false, removalTimeout); err != nil {
			t.Errorf("node deleted on b is still a peer of a client of a: %v", err)
		}
		t.Logf("node deleted on b left a's client after %v", time.Since(start).Round(time.Millisecond))
		if _, ok := nodeByIP(a.mustListNodes(t), n3.ip4); ok {
			t.Error("a still lists the node b deleted")
		}
	})

	t.Run("derp-mesh", func(t *testing.T) {
		// Clients that may not use direct UDP, each homed on its own
		// replica's relay: only the mesh joins them.
		ms := []*member{
			join(t, a, key.Key, []string{"TS_DEBUG_ALWAYS_USE_DERP=1"}, "d1")[0],
			join(t, b, key.Key, []string{"TS_DEBUG_ALWAYS_USE_DERP=1"}, "d2")[0],
		}
		checkFullMesh(t, ms)
		for _, m := range ms {
			if err := m.Serve(t.Context(), servePort, "hello from "+m.Name()); err != nil {
				t.Fatal(err)
			}
		}
		checkHello(t, ms[0], ms[1])
		checkHello(t, ms[1], ms[0])
		st, err := ms[0].Status(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range st.Peer {
			if p.CurAddr != "" {
				t.Errorf("peer %s: direct address %q; want only the DERP relays", p.DNSName, p.CurAddr)
			}
		}
	})

	// Last: it ends a.
	t.Run("crashed-replica", func(t *testing.T) {
		// a, started first, leads the replicas' jobs. It dies without
		// marking its nodes offline; b takes the lead (within 5 s), finds
		// a gone (two checks 15 s apart), gives its clients the restart
		// grace to reconnect, then marks them offline, which b's clients
		// see.
		const leads = "this replica now runs the jobs one replica runs for all"
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		if err := realclient.Eventually(ctx, 200*time.Millisecond, func() error {
			if !strings.Contains(a.logTail(1000), leads) {
				return errors.New("a has not logged that it leads")
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(b.logTail(1000), leads) {
			t.Fatal("both replicas logged that they lead")
		}
		a.Kill(t)
		start := time.Now()
		ctx, cancel = context.WithTimeout(t.Context(), 75*time.Second)
		defer cancel()
		_, err := n2.WaitStatus(ctx, func(st *ipnstate.Status) error {
			for _, p := range st.Peer {
				if !slices.Contains(p.TailscaleIPs, n1.ip4) {
					continue
				}
				if p.Online {
					return fmt.Errorf("peer %s, a client of the crashed replica, still online", p.DNSName)
				}
				return nil
			}
			return fmt.Errorf("no peer %v; peers: %s", n1.ip4, realclient.DescribePeers(st))
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("a client of b saw the crashed leader's client go offline %v after the crash", time.Since(start).Round(time.Millisecond))
		if !strings.Contains(b.logTail(1000), leads) {
			t.Error("b did not log that it took the lead")
		}
		if n, ok := nodeByIP(b.mustListNodes(t), n1.ip4); !ok || n.Online {
			t.Errorf("b lists the crashed replica's client as %v, want it offline", n)
		}
	})
}
