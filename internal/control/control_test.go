package control

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/netmap"
	"github.com/tailplane/tailplane/internal/state"
	"github.com/tailplane/tailplane/internal/store/sqlite"
	"github.com/tailplane/tailplane/internal/testclient"
)

type testServer struct {
	url  string
	st   *state.State
	eng  *netmap.Engine
	srv  *Server
	stop func()
}

func newTestServer(t *testing.T) *testServer {
	t.Helper()
	return newTestServerAt(t, filepath.Join(t.TempDir(), "tp.db"), key.NewMachine())
}

// newTestServerAt runs a server over the database at path, as after a
// restart when the path already holds a tailnet.
func newTestServerAt(t *testing.T, path string, noise key.MachinePrivate, opts ...func(*Options)) *testServer {
	t.Helper()
	db, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := state.New(context.Background(), state.Options{
		Store: db, V4Prefix: netip.MustParsePrefix("100.64.0.0/10"), V6Prefix: netip.MustParsePrefix("fd7a:115c:a1e0::/48"),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	eng := netmap.New(netmap.Options{State: st, Static: netmap.Static{BaseDomain: "ts.test", DERPMap: &tailcfg.DERPMap{}}, Window: 2 * time.Millisecond})
	go eng.Run(ctx)
	o := Options{State: st, Engine: eng, NoiseKey: noise, EphemeralTimeout: time.Second}
	for _, f := range opts {
		f(&o)
	}
	srv := New(o)
	hs := httptest.NewServer(srv)
	ts := &testServer{url: hs.URL, st: st, eng: eng, srv: srv}
	ts.stop = func() {
		hs.CloseClientConnections()
		hs.Close()
		cancel()
		st.Close()
		db.Close()
	}
	t.Cleanup(ts.stop)
	return ts
}

func (ts *testServer) key(t *testing.T, reusable bool) string {
	t.Helper()
	ctx := context.Background()
	if _, err := ts.st.UserByName("alice"); err != nil {
		if _, err := ts.st.CreateUser(ctx, "alice", "alice@example.com"); err != nil {
			t.Fatal(err)
		}
	}
	ks, err := ts.st.CreateKeys(ctx, state.KeyParams{User: "alice", Reusable: reusable}, 1)
	if err != nil {
		t.Fatal(err)
	}
	return ks[0].Key
}

func join(t *testing.T, ts *testServer, authKey, host string) *testclient.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := testclient.New(ctx, ts.url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	if _, err := c.Register(ctx, authKey, host); err != nil {
		t.Fatal(err)
	}
	return c
}

// waitPublished waits until the fan-out has published the node with the
// given hostname: Engine.FullMap waits for the batch that publishes it.
func (ts *testServer) waitPublished(t *testing.T, host string) {
	t.Helper()
	for _, n := range ts.st.Nodes() {
		if n.Hostname == host {
			if _, ok := ts.eng.FullMap(n.ID); !ok {
				t.Fatalf("node %s was never published", host)
			}
			return
		}
	}
	t.Fatalf("no node %s", host)
}

// fullMap reads a stream's full map.
func fullMap(t *testing.T, s *testclient.Stream) *tailcfg.MapResponse {
	t.Helper()
	full, err := s.Next(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(full.Peers) > 0 && full.Peers[0].Online == nil {
		t.Errorf("full map peers carry no presence")
	}
	return full
}

func peerNames(peers []*tailcfg.Node) []string {
	var out []string
	for _, p := range peers {
		out = append(out, strings.SplitN(p.Name, ".", 2)[0])
	}
	slices.Sort(out)
	return out
}

// pairWithStream joins nodes a and b with a reusable key and opens a's
// stream, returning its full map.
func pairWithStream(t *testing.T) (ts *testServer, k string, sa *testclient.Stream, full *tailcfg.MapResponse) {
	t.Helper()
	ts = newTestServer(t)
	k = ts.key(t, true)
	a := join(t, ts, k, "a")
	join(t, ts, k, "b")
	// a's map must hold b: wait until the fan-out has published b (a
	// registration is acknowledged before its coalescing window ends).
	ts.waitPublished(t, "b")
	sa, err := a.Map(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sa.Close)
	return ts, k, sa, fullMap(t, sa)
}

// TestOfflineGrace: a node whose stream ends and comes back within the
// grace never appears offline to its peers; one that stays away is marked
// offline when the grace has passed.
func TestOfflineGrace(t *testing.T) {
	const grace = 500 * time.Millisecond
	ts := newTestServerAt(t, filepath.Join(t.TempDir(), "tp.db"), key.NewMachine(), func(o *Options) { o.OfflineGrace = grace })
	k := ts.key(t, true)
	a, b := join(t, ts, k, "a"), join(t, ts, k, "b")
	ts.waitPublished(t, "b")
	sa, err := a.Map(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sa.Close)
	fullMap(t, sa)
	sb, err := b.Map(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	fullMap(t, sb)
	if m, err := sa.Next(5 * time.Second); err != nil || len(m.PeersChangedPatch) != 1 || !*m.PeersChangedPatch[0].Online {
		t.Fatalf("want b's online patch: %+v %v", m, err)
	}
	bid := ts.st.NodeByKey(b.Node.Public()).ID

	// b's stream drops and b reconnects at once, then goes away for good.
	sb.Close()
	waitFor(t, func() bool { return !ts.eng.Connected(bid) })
	if sb, err = b.Map(context.Background()); err != nil {
		t.Fatal(err)
	}
	fullMap(t, sb)
	sb.Close()
	// The next thing a hears is b going offline, a grace after b left:
	// the reconnect itself sent nothing.
	nextIsOfflineAfter(t, sa, time.Now(), grace, "b left (the reconnect flapped)")
}

// nextIsOfflineAfter checks that the next message on s is one peer's
// offline patch, and that it came no sooner than grace after start.
func nextIsOfflineAfter(t *testing.T, s *testclient.Stream, start time.Time, grace time.Duration, what string) {
	t.Helper()
	m, err := s.Next(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.PeersChangedPatch) != 1 || m.PeersChangedPatch[0].Online == nil || *m.PeersChangedPatch[0].Online {
		t.Fatalf("want an offline patch, got %+v", m)
	}
	if since := time.Since(start); since < grace-50*time.Millisecond {
		t.Fatalf("offline patch %v after %s, before the grace (%v)", since, what, grace)
	}
}

// TestRestartGrace: after a restart, nodes that were online still count as
// online while they reconnect: a peer's first map shows them online and
// the reconnect sends nobody anything; a node that does not come back
// goes offline once the restart grace has passed.
func TestRestartGrace(t *testing.T) {
	path, noise := filepath.Join(t.TempDir(), "tp.db"), key.NewMachine()
	// A long offline grace: the streams that end with the first server
	// must not be recorded offline before it stops (SIGTERM, SIGKILL).
	ts := newTestServerAt(t, path, noise, func(o *Options) { o.OfflineGrace = time.Minute })
	k := ts.key(t, true)
	a, b := join(t, ts, k, "a"), join(t, ts, k, "b")
	ts.waitPublished(t, "b")
	for _, c := range []*testclient.Client{a, b} {
		s, err := c.Map(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		fullMap(t, s)
		defer s.Close()
	}
	aid, bid := ts.st.NodeByKey(a.Node.Public()).ID, ts.st.NodeByKey(b.Node.Public()).ID
	waitFor(t, func() bool { return ts.eng.Connected(aid) && ts.eng.Connected(bid) })
	ts.stop()

	const grace = 700 * time.Millisecond
	ts2 := newTestServerAt(t, path, noise, func(o *Options) { o.RestartGrace = grace })
	start := time.Now()
	ts2.srv.PresumeOnline()
	for _, id := range []uint64{aid, bid} {
		if n := ts2.st.Node(id); n == nil || !n.Online {
			t.Fatalf("node %d loaded offline: %+v", id, n)
		}
	}
	// Only a comes back.
	a.URL = ts2.url
	if err := a.Dial(context.Background()); err != nil {
		t.Fatal(err)
	}
	sa, err := a.Map(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sa.Close)
	full := fullMap(t, sa)
	if len(full.Peers) != 1 || full.Peers[0].Online == nil || !*full.Peers[0].Online {
		t.Fatalf("a's first map after the restart: want b online, got %+v", full.Peers)
	}
	nextIsOfflineAfter(t, sa, start, grace, "the restart")
	if n := ts2.st.Node(aid); !n.Online {
		t.Fatal("a, reconnected, went offline")
	}
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 5 s")
		}
	}
}

func TestFullMapThenDeltas(t *testing.T) {
	ts, k, sa, full := pairWithStream(t)
	if full.Node == nil || full.Node.Name != "a.ts.test." || len(full.Node.Addresses) != 2 {
		t.Fatalf("self node: %+v", full.Node)
	}
	if got := peerNames(full.Peers); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("full map peers = %v, want [b]", got)
	}
	if full.DERPMap == nil || full.DNSConfig == nil || full.PacketFilters == nil {
		t.Fatalf("full map lacks DERP map, DNS or filter: %+v", full)
	}

	c := join(t, ts, k, "c")
	d, err := sa.Next(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := peerNames(d.PeersChanged); !slices.Equal(got, []string{"c"}) || len(d.Peers) != 0 {
		t.Fatalf("join delta = %+v, want PeersChanged [c] only", d)
	}
	if on := d.PeersChanged[0].Online; on == nil || *on {
		t.Fatalf("join delta lacks c's presence (offline): %v", on)
	}

	// c goes online: a receives a patch, not a whole node.
	sc, err := c.Map(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	fullMap(t, sc)
	d, err = sa.Next(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.PeersChangedPatch) != 1 || d.PeersChangedPatch[0].Online == nil || !*d.PeersChangedPatch[0].Online || len(d.PeersChanged) != 0 {
		t.Fatalf("online delta = %+v, want one online patch", d)
	}
	sc.Close()

	cid := ts.st.NodeByKey(c.Node.Public()).ID
	if err := ts.st.DeleteNode(context.Background(), cid); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		d, err = sa.Next(time.Until(deadline))
		if err != nil {
			t.Fatalf("waiting for removal: %v", err)
		}
		if slices.Contains(d.PeersRemoved, tailcfg.NodeID(cid)) {
			break
		}
	}
}

func TestOldClientsRefused(t *testing.T) {
	ts := newTestServer(t)
	res, err := http.Get(ts.url + "/key?v=100")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 400 || !strings.Contains(string(body), "v1.80") {
		t.Fatalf("/key?v=100: %d %q", res.StatusCode, body)
	}

	c, err := testclient.New(context.Background(), ts.url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Version = 100
	_, err = c.Register(context.Background(), ts.key(t, false), "old")
	if err == nil || !strings.Contains(err.Error(), "v1.80") {
		t.Fatalf("old client registration: %v", err)
	}
	if n := len(ts.st.Nodes()); n != 0 {
		t.Fatalf("%d nodes after refused registration", n)
	}
}

func TestBadKeysGetClearErrors(t *testing.T) {
	ts := newTestServer(t)
	oneOff := ts.key(t, false)
	join(t, ts, oneOff, "first")
	for _, tc := range []struct{ key, want string }{
		{"tpkey-auth-nope-nope", "invalid pre-auth key"},
		{oneOff, "already used"},
		{"", "only accepts pre-auth keys"},
	} {
		c, err := testclient.New(context.Background(), ts.url)
		if err != nil {
			t.Fatal(err)
		}
		_, err = c.Register(context.Background(), tc.key, "x")
		c.Close()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("key %q: error %v, want it to mention %q", tc.key, err, tc.want)
		}
	}
	if n := len(ts.st.Nodes()); n != 1 {
		t.Fatalf("%d nodes, want 1", n)
	}
}

func TestOversizedAndMalformedRequests(t *testing.T) {
	ts := newTestServer(t)
	c, err := testclient.New(context.Background(), ts.url)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	big := fmt.Sprintf(`{"Version":%d,"Hostinfo":{"Hostname":%q}}`, tailcfg.CurrentCapabilityVersion, strings.Repeat("x", 2<<20))
	code, body, err := c.Post(context.Background(), "/machine/register", []byte(big))
	if err != nil || code != http.StatusRequestEntityTooLarge {
		t.Fatalf("oversized register: %d %q %v", code, body, err)
	}
	code, body, err = c.Post(context.Background(), "/machine/map", []byte(`{"Version":`))
	if err != nil || code != http.StatusBadRequest || !strings.Contains(string(body), "malformed") {
		t.Fatalf("malformed map: %d %q %v", code, body, err)
	}
	// The server is unaffected.
	join(t, ts, ts.key(t, false), "ok")
}

func TestMalformedHandshakes(t *testing.T) {
	ts := newTestServer(t)
	addr := strings.TrimPrefix(ts.url, "http://")
	for name, req := range map[string]string{
		"no upgrade":       "POST /ts2021 HTTP/1.1\r\nHost: x\r\n\r\n",
		"unknown protocol": "POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: nonsense\r\nConnection: upgrade\r\n\r\n",
		"bad base64":       "POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: !!!\r\n\r\n",
		"garbage init":     "POST /ts2021 HTTP/1.1\r\nHost: x\r\nUpgrade: tailscale-control-protocol\r\nConnection: upgrade\r\nX-Tailscale-Handshake: AAAA\r\n\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(conn, req)
			res, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				return // closed without an answer: also a refusal
			}
			if res.StatusCode == http.StatusSwitchingProtocols {
				// The upgrade is answered before the Noise init is
				// checked; then the server must close the connection
				// (after at most an error frame), not hang.
				if _, err := io.Copy(io.Discard, conn); err != nil {
					t.Fatalf("connection not closed after a bad handshake: %v", err)
				}
				return
			}
			if res.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d, want 400", res.StatusCode)
			}
		})
	}
	// A header that never ends is cut off by the server's header limit.
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, "POST /ts2021 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Handshake: "+strings.Repeat("A", 2<<20))
	conn.Close()
	// The server still works.
	join(t, ts, ts.key(t, false), "ok")
}

func TestNonStreamingMapAndLiteUpdate(t *testing.T) {
	ts := newTestServer(t)
	c := join(t, ts, ts.key(t, false), "solo")
	ep := netip.MustParseAddrPort("127.0.0.1:41641")
	lite, _ := json.Marshal(tailcfg.MapRequest{
		Version: tailcfg.CurrentCapabilityVersion, NodeKey: c.Node.Public(), OmitPeers: true,
		Endpoints: []netip.AddrPort{ep}, Hostinfo: &tailcfg.Hostinfo{Hostname: "solo"},
	})
	code, _, err := c.Post(context.Background(), "/machine/map", lite)
	if err != nil || code != 200 {
		t.Fatalf("lite update: %d %v", code, err)
	}
	if n := ts.st.NodeByKey(c.Node.Public()); n == nil || !slices.Equal(n.Endpoints, []netip.AddrPort{ep}) {
		t.Fatalf("endpoints not recorded: %+v", n)
	}
}

func TestPolicyChangeSendsDeltas(t *testing.T) {
	ts, _, sa, full := pairWithStream(t)
	if len(full.Peers) != 1 {
		t.Fatalf("full map peers: %v", peerNames(full.Peers))
	}
	bid := full.Peers[0].ID
	// Only a's own traffic to itself: b is no longer visible to a.
	if err := ts.st.SetPolicy(context.Background(), []byte(`{"acls":[{"action":"accept","src":["100.64.0.1"],"dst":["100.64.0.1:22"]}]}`)); err != nil {
		t.Fatal(err)
	}
	// The peer change (shared by the class pair) comes first, the node's
	// own filter in the message after it.
	d, err := sa.Next(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	f, err := sa.Next(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(d.PeersRemoved, []tailcfg.NodeID{bid}) || d.PacketFilters != nil || f.PacketFilters == nil || f.PeersRemoved != nil {
		t.Fatalf("after restrictive policy: removed %v, then filters %v", d.PeersRemoved, f.PacketFilters)
	}
	if err := ts.st.SetPolicy(context.Background(), []byte(`{"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]}`)); err != nil {
		t.Fatal(err)
	}
	d, err = sa.Next(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := peerNames(d.PeersChanged); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("after open policy: changed %v", got)
	}
	if f, err = sa.Next(5 * time.Second); err != nil || f.PacketFilters == nil {
		t.Fatalf("after open policy: no filter message (%v)", err)
	}
	// An invalid policy is refused and changes nothing.
	if err := ts.st.SetPolicy(context.Background(), []byte(`{"acls":[{"action":"allow"}]}`)); err == nil {
		t.Fatal("invalid policy accepted")
	}
	if _, err := sa.Next(300 * time.Millisecond); err == nil {
		t.Fatal("a refused policy produced a map message")
	}
}

// After a restart, clients that reconnect (each sending its endpoints,
// then opening its stream, all at once) each learn that the others are
// online.
func TestPresenceAfterRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tp.db")
	noise := key.NewMachine()
	ts := newTestServerAt(t, path, noise)
	k := ts.key(t, true)
	var cs []*testclient.Client
	for _, h := range []string{"a", "b", "c"} {
		cs = append(cs, join(t, ts, k, h))
	}
	ts.stop()

	ts2 := newTestServerAt(t, path, noise)
	ctx := context.Background()
	type result struct {
		online map[tailcfg.NodeID]bool
		err    error
	}
	results := make(chan result, len(cs))
	start := time.Now()
	for i, c := range cs {
		go func() {
			c.URL = ts2.url
			if err := c.Dial(ctx); err != nil {
				results <- result{err: err}
				return
			}
			lite, _ := json.Marshal(tailcfg.MapRequest{
				Version: tailcfg.CurrentCapabilityVersion, NodeKey: c.Node.Public(), OmitPeers: true,
				Endpoints: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(41000+i))},
				Hostinfo:  &tailcfg.Hostinfo{Hostname: "x"},
			})
			if code, _, err := c.Post(ctx, "/machine/map", lite); err != nil || code != 200 {
				results <- result{err: fmt.Errorf("lite update: %d %v", code, err)}
				return
			}
			s, err := c.Map(ctx)
			if err != nil {
				results <- result{err: err}
				return
			}
			defer s.Close()
			online := map[tailcfg.NodeID]bool{}
			// Every stream stays open until the same deadline: a client
			// that left early would rightly be seen offline by the others.
			deadline := start.Add(3 * time.Second)
			for time.Now().Before(deadline) {
				m, err := s.Next(time.Until(deadline))
				if err != nil {
					break
				}
				for _, p := range m.Peers {
					online[p.ID] = p.Online != nil && *p.Online
				}
				for _, p := range m.PeersChanged {
					if _, ok := online[p.ID]; ok && p.Online != nil {
						online[p.ID] = *p.Online
					}
				}
				// Like tailscaled: presence of unknown nodes (itself) is ignored.
				for id, on := range m.OnlineChange {
					if _, ok := online[id]; ok {
						online[id] = on
					}
				}
				for _, p := range m.PeersChangedPatch {
					if _, ok := online[p.NodeID]; ok && p.Online != nil {
						online[p.NodeID] = *p.Online
					}
				}
			}
			results <- result{online: online}
		}()
	}
	for range cs {
		r := <-results
		if r.err != nil {
			t.Fatal(r.err)
		}
		for id, on := range r.online {
			if !on {
				t.Errorf("a client sees peer %v offline: %v", id, r.online)
			}
		}
	}
}
