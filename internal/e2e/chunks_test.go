package e2e

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"

	"tailscale.com/ipn/ipnstate"

	"github.com/tailplane/tailplane/internal/realclient"
	"github.com/tailplane/tailplane/internal/testclient"
)

// manyPeers is how many nodes TestManyPeersInOneDelta makes visible at
// once. The engine sends a shared delta's peers as span chunks from 8
// changed peers on (netmap.minChunkedPeers).
const manyPeers = 27

// chunksPolicy0 keeps the users apart: ca's nodes see only each other.
const chunksPolicy0 = `// TestManyPeersInOneDelta: apart
{
	"acls": [
		{"action": "accept", "src": ["ca@example.com"], "dst": ["ca@example.com:*"]},
		{"action": "accept", "src": ["cb@example.com"], "dst": ["cb@example.com:*"]},
	],
}
`

// chunksPolicy1 lets ca's nodes reach cb's.
const chunksPolicy1 = `// TestManyPeersInOneDelta: together
{
	"acls": [
		{"action": "accept", "src": ["ca@example.com"], "dst": ["ca@example.com:*", "cb@example.com:*"]},
		{"action": "accept", "src": ["cb@example.com"], "dst": ["cb@example.com:*"]},
	],
}
`

// TestManyPeersInOneDelta checks, with a real client, a delta that brings
// many peers at once: a policy edit makes 27 nodes visible to a connected
// tailscaled in one batch, and the engine sends them as one delta whose
// peers are spliced from the full maps' cached span chunks. tailscaled
// must decode it into the peers a full map gives (keys, host names,
// addresses) without dropping its map stream, and apply a later removal
// on top of it.
func TestManyPeersInOneDelta(t *testing.T) {
	srv := startServer(t)
	for _, u := range []string{"ca", "cb"} {
		srv.mustCLI(t, "users", "create", u, "--email", u+"@example.com")
	}
	setPolicy(t, srv, chunksPolicy0)
	m := joinEach(t, srv, nil, []string{"chunks-real"}, []string{srv.createKey(t, "ca").Key})[0]
	// A delta tailscaled cannot decode ends its map stream, and the
	// full map of the next one would hide the error: the stream must
	// stay the same throughout.
	polls0 := mapCounters(t, []*member{m}, "controlclient_map_requests_poll")

	fakes := registerFakes(t, srv, srv.createKey(t, "cb", "--reusable").Key)
	byHost := map[string]node{}
	for _, n := range srv.mustListNodes(t) {
		byHost[n.Hostname] = n
	}
	// want checks that st lists exactly the fakes but skip, as the
	// server has them.
	want := func(st *ipnstate.Status, skip string) error {
		var errs []error
		peers := 0
		for _, f := range fakes {
			if f.host == skip {
				continue
			}
			peers++
			n, ok := byHost[f.host]
			if !ok {
				return fmt.Errorf("node %s is not in the server's node list", f.host)
			}
			p, ok := st.Peer[f.Node.Public()]
			switch {
			case !ok:
				errs = append(errs, fmt.Errorf("no peer %s", f.host))
			case p.HostName != f.host:
				errs = append(errs, fmt.Errorf("peer %s has host name %q", f.host, p.HostName))
			case !slices.Contains(p.TailscaleIPs, n.IPv4) || !slices.Contains(p.TailscaleIPs, n.IPv6):
				errs = append(errs, fmt.Errorf("peer %s has addresses %v, want %v and %v", f.host, p.TailscaleIPs, n.IPv4, n.IPv6))
			}
		}
		if len(st.Peer) != peers {
			errs = append(errs, fmt.Errorf("%d peers, want %d", len(st.Peer), peers))
		}
		return errors.Join(errs...)
	}

	ctx, cancel := context.WithTimeout(t.Context(), convergeTimeout)
	defer cancel()
	if st, err := m.Status(ctx); err != nil {
		t.Fatal(err)
	} else if len(st.Peer) != 0 {
		t.Fatalf("under the first policy the client lists %d peers, want none: %s", len(st.Peer), realclient.DescribePeers(st))
	}
	setPolicy(t, srv, chunksPolicy1)
	if _, err := m.WaitStatus(ctx, func(st *ipnstate.Status) error { return want(st, "") }); err != nil {
		t.Fatalf("after the policy edit: %v", err)
	}

	gone := fakes[0].host
	srv.mustCLI(t, "nodes", "delete", strconv.FormatUint(byHost[gone].ID, 10))
	if _, err := m.WaitStatus(ctx, func(st *ipnstate.Status) error { return want(st, gone) }); err != nil {
		t.Fatalf("after deleting %s: %v", gone, err)
	}
	if polls := mapCounters(t, []*member{m}, "controlclient_map_requests_poll"); polls[0] != polls0[0] {
		t.Errorf("the client opened %d new map stream(s): it reconnected to control", polls[0]-polls0[0])
	}
}

// fake is a simulated client of TestManyPeersInOneDelta and its host name.
type fake struct {
	*testclient.Client
	host string
}

// registerFakes registers manyPeers simulated clients with key. They
// never open a map stream: they are peers that are offline.
func registerFakes(t *testing.T, srv *server, key string) []fake {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), joinTimeout)
	defer cancel()
	fs := make([]fake, manyPeers)
	errs := make([]error, manyPeers)
	var wg sync.WaitGroup
	for i := range fs {
		fs[i].host = fmt.Sprintf("chunks-%02d", i)
		wg.Go(func() {
			c, err := testclient.New(ctx, srv.URL())
			if err == nil {
				fs[i].Client = c
				_, err = c.Register(ctx, key, fs[i].host)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, f := range fs {
			if f.Client != nil {
				f.Close()
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return fs
}
