package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"

	"github.com/tailplane/tailplane/internal/realclient"
	"github.com/tailplane/tailplane/internal/testclient"
)

const (
	// burstSize is how many nodes register at once in TestBurstOfJoins.
	// The engine sends a shared delta's peers as span chunks from 8
	// changed peers on (netmap.minChunkedPeers); a burst this size makes
	// a batch of more than 8 joins even when group commit or the
	// coalescing window splits it in three.
	burstSize = 27
	// burstRounds bounds the bursts tried until one batch holds more than
	// 8 joins.
	burstRounds = 3
	// bigBatch is the batch-size histogram bucket (tailplane_change_batch_events)
	// above which a batch counts as big enough.
	bigBatch = "8"
)

// TestBurstOfJoins checks, with a real client, the deltas a burst of joins
// produces: the engine coalesces the joins into one batch and sends the
// connected client their peers as one delta whose peers are spliced from
// the full maps' cached span chunks. tailscaled must decode it into the
// same peers a full map gives (keys, addresses, names) without dropping
// its stream, and apply a later removal on top of it.
func TestBurstOfJoins(t *testing.T) {
	metrics := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	srv := startServer(t, "--metrics-listen", metrics)
	srv.mustCLI(t, "users", "create", "bu", "--email", "bu@example.com")
	key := srv.createKey(t, "bu", "--reusable").Key
	m := join(t, srv, key, nil, "burst-real")[0]
	// A delta tailscaled cannot decode ends its map stream, and the
	// full map of the next one would hide the error: the stream must
	// stay the same throughout.
	polls0 := mapCounters(t, []*member{m}, "controlclient_map_requests_poll")

	var fakes []fake
	for round := 1; ; round++ {
		before := bigBatches(t, metrics)
		fakes = append(fakes, registerBurst(t, srv, key, round)...)
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		err := realclient.Eventually(ctx, 100*time.Millisecond, func() error {
			if n := bigBatches(t, metrics); n <= before {
				return fmt.Errorf("no change batch of more than %s events yet (%d before the burst, %d now)", bigBatch, before, n)
			}
			return nil
		})
		cancel()
		if err == nil {
			t.Logf("round %d: a batch of more than %s joins", round, bigBatch)
			break
		}
		if round == burstRounds {
			t.Fatalf("%d bursts of %d registrations: %v", round, burstSize, err)
		}
		t.Logf("round %d: %v; another burst", round, err)
	}

	ns := srv.mustListNodes(t)
	byHost := map[string]node{}
	for _, n := range ns {
		byHost[n.Hostname] = n
	}
	want := func(st *ipnstate.Status, skip string) error {
		var errs []error
		peers := 0
		for _, f := range fakes {
			h := f.host
			if h == skip {
				continue
			}
			peers++
			n, ok := byHost[h]
			if !ok {
				return fmt.Errorf("node %s is not in the server's node list", h)
			}
			p, ok := st.Peer[f.Node.Public()]
			switch {
			case !ok:
				errs = append(errs, fmt.Errorf("no peer %s", h))
			case p.HostName != h:
				errs = append(errs, fmt.Errorf("peer %s has host name %q", h, p.HostName))
			case !slices.Contains(p.TailscaleIPs, n.IPv4) || !slices.Contains(p.TailscaleIPs, n.IPv6):
				errs = append(errs, fmt.Errorf("peer %s has addresses %v, want %v and %v", h, p.TailscaleIPs, n.IPv4, n.IPv6))
			}
		}
		if len(st.Peer) != peers {
			errs = append(errs, fmt.Errorf("%d peers, want %d", len(st.Peer), peers))
		}
		return errors.Join(errs...)
	}
	ctx, cancel := context.WithTimeout(t.Context(), convergeTimeout)
	defer cancel()
	if _, err := m.WaitStatus(ctx, func(st *ipnstate.Status) error { return want(st, "") }); err != nil {
		t.Fatalf("after the burst: %v", err)
	}

	// A later, small delta applies on top of the chunked one.
	gone := fakes[0].host
	srv.mustCLI(t, "nodes", "delete", strconv.FormatUint(byHost[gone].ID, 10))
	if _, err := m.WaitStatus(ctx, func(st *ipnstate.Status) error { return want(st, gone) }); err != nil {
		t.Fatalf("after deleting %s: %v", gone, err)
	}
	if polls := mapCounters(t, []*member{m}, "controlclient_map_requests_poll"); polls[0] != polls0[0] {
		t.Errorf("the client opened %d new map stream(s): it reconnected to control", polls[0]-polls0[0])
	}
}

// fake is a simulated client of TestBurstOfJoins and its host name.
type fake struct {
	*testclient.Client
	host string
}

// registerBurst connects burstSize simulated clients, then registers them
// all at the same moment with key. They never open a map stream: they are
// peers that are offline.
func registerBurst(t *testing.T, srv *server, key string, round int) []fake {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), joinTimeout)
	defer cancel()
	cs := make([]fake, burstSize)
	errs := make([]error, burstSize)
	var wg sync.WaitGroup
	for i := range cs {
		cs[i].host = fmt.Sprintf("burst-%d-%02d", round, i)
		wg.Go(func() { cs[i].Client, errs[i] = testclient.New(ctx, srv.URL()) })
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range cs {
			if c.Client != nil {
				c.Close()
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	start := make(chan struct{})
	for i, c := range cs {
		wg.Go(func() {
			<-start
			_, errs[i] = c.Register(ctx, key, c.host)
		})
	}
	close(start)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return cs
}

// bigBatches reads from the server's metrics how many change batches held
// more than bigBatch events.
func bigBatches(t *testing.T, addr string) int64 {
	t.Helper()
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, "http://"+addr+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var count, small int64 = -1, -1
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		switch f[0] {
		case "tailplane_change_batch_events_count":
			count, _ = strconv.ParseInt(f[1], 10, 64)
		case `tailplane_change_batch_events_bucket{le="` + bigBatch + `"}`:
			small, _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	if count < 0 || small < 0 {
		t.Fatalf("metrics at %s have no tailplane_change_batch_events count and le=%q bucket", addr, bigBatch)
	}
	return count - small
}
