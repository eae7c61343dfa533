package netmap

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"go4.org/netipx"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/policy/policygen"
	"github.com/tailplane/tailplane/internal/session"
	"github.com/tailplane/tailplane/internal/state"
)

// TestJoinReachesOnlyViewers: under a scoped policy, a join reaches the
// sessions that see the new node or whose filter it changes, and no
// other: a tag:secret node only the tag:ops sessions, a user node only the
// user sessions (autogroup:member reaches autogroup:member, so their
// filters' source lists and peers change), never tag:ops.
func TestJoinReachesOnlyViewers(t *testing.T) {
	tn := smallTailnet(scopedPolicy, 3, 60, func(i int) bool { return i%10 == 7 }, "tag:ops")
	f := newBenchFixture(t, tn)
	f.drainAll()
	ops, members := map[uint64]bool{}, map[uint64]bool{}
	for i, n := range tn.nodes {
		if slices.Contains(n.tags, "tag:ops") {
			ops[f.ids[i]] = true
		} else {
			members[f.ids[i]] = true
		}
	}
	for _, tc := range []struct {
		name string
		n    benchNode
		want map[uint64]bool
	}{
		{"tag:secret", benchNode{user: 0, tags: []string{"tag:secret"}}, ops},
		{"user node", benchNode{user: 1}, members},
	} {
		f.join(t, tc.n)
		checkReceivers(t, tc.name+" joins", f.drainAll(), tc.want, len(f.sessions))
	}
}

// smallTailnet has users user0..userN-1 owning nodes in turn, except
// the nodes tagged says are tagged with tag (owned by user0).
func smallTailnet(policy []byte, users, nodes int, tagged func(i int) bool, tag string) benchTailnet {
	tn := benchTailnet{policy: policy}
	for u := range users {
		tn.users = append(tn.users, fmt.Sprintf("user%d", u))
	}
	for i := range nodes {
		n := benchNode{user: i % users}
		if tagged(i) {
			n = benchNode{user: 0, tags: []string{tag}}
		}
		tn.nodes = append(tn.nodes, n)
	}
	return tn
}

// join registers a node like n (with a reusable key of its user and tags)
// and runs the batch that publishes it.
func (f *benchFixture) join(t *testing.T, n benchNode) uint64 {
	t.Helper()
	id := f.registerNode(t, n)
	f.e.process(map[uint64]struct{}{id: {}}, false, false)
	return id
}

// registerNode registers a node like n (with a reusable key of its user and
// tags) without running a batch.
func (f *benchFixture) registerNode(t testing.TB, n benchNode) uint64 {
	t.Helper()
	ctx := context.Background()
	k, ok := f.keys[keyOf(n.user, n.tags)]
	if !ok {
		ks, err := f.st.CreateKeys(ctx, state.KeyParams{User: f.users[n.user], Reusable: true, Tags: n.tags}, 1)
		if err != nil {
			t.Fatal(err)
		}
		k = ks[0].Key
		f.keys[keyOf(n.user, n.tags)] = k
	}
	res, err := f.st.Register(ctx, state.RegisterParams{MachineKey: key.NewMachine().Public(), NodeKey: key.NewNode().Public(),
		AuthKey: k, Hostinfo: &tailcfg.Hostinfo{Hostname: "joiner", RoutableIPs: n.routes}})
	if err != nil {
		t.Fatal(err)
	}
	return res.Node.ID
}

// leave deletes node id and runs the batch that removes it.
func (f *benchFixture) leave(t *testing.T, id uint64) {
	t.Helper()
	if err := f.st.DeleteNode(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	f.e.process(map[uint64]struct{}{id: {}}, false, false)
}

// TestJoinBurstSyncsFiltersOnce: in a burst of joins, the filters and SSH
// policies of connected nodes are brought up to date at most once per
// policySyncEvery, or twice the last sync's time when that is longer;
// peers still arrive with every batch, and the deferred sync, when due,
// sends the chunks changed by every join since.
func TestJoinBurstSyncsFiltersOnce(t *testing.T) {
	tn := smallTailnet([]byte(`{
  "tagOwners": {"tag:srv": ["user0@example.com"]},
  "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:srv:22", "autogroup:member:80"]}]
}`), 2, 20, func(i int) bool { return i%5 == 0 }, "tag:srv")
	f := newBenchFixture(t, tn)
	f.drainAll()
	srv := f.ids[0]
	join := func(user int) uint64 { return f.join(t, benchNode{user: user}) }
	srcOf := func(m []tailcfg.MapResponse) []string {
		var out []string
		for _, r := range m {
			for _, rules := range r.PacketFilters {
				for _, fr := range rules {
					out = append(out, fr.SrcIPs...)
				}
			}
		}
		return out
	}
	hasAddr := func(ips []string, id uint64) bool { return srcsHold(ips, f.st.Node(id).IPv4) }

	// A quiet tailnet: the first join reaches tag:srv's filter at once.
	f.e.lastSync = time.Time{}
	a := join(1)
	if got := srcOf(collect(t, f.sessions[srv])); !hasAddr(got, a) {
		t.Fatalf("first join: tag:srv's filter sources %v lack the new node", got)
	}
	// A second join right after: peers at once, the filter deferred.
	b := join(1)
	m := collect(t, f.sessions[srv])
	if len(m) == 0 || !slices.ContainsFunc(m, func(r tailcfg.MapResponse) bool { return len(r.PeersChanged) > 0 }) {
		t.Fatalf("second join: tag:srv got no peer: %+v", m)
	}
	if got := srcOf(m); hasAddr(got, b) {
		t.Fatalf("second join: tag:srv's filter synced within %v of the last sync", policySyncEvery)
	}
	c := join(0)
	collect(t, f.sessions[srv])
	// The sync is due: an empty batch brings both joins in.
	f.e.lastSync = time.Now().Add(-policySyncEvery)
	f.e.process(map[uint64]struct{}{}, false, false)
	got := srcOf(collect(t, f.sessions[srv]))
	if !hasAddr(got, b) || !hasAddr(got, c) {
		t.Fatalf("due sync: tag:srv's filter sources %v lack the deferred joins", got)
	}
	if f.e.syncEvery != policySyncEvery {
		t.Fatalf("after a fast sync the interval is %v, want %v", f.e.syncEvery, policySyncEvery)
	}

	// After a slow sync (3 s), the next waits twice as long: not due
	// 3 s later, due 6 s later.
	f.e.syncEvery = syncInterval(3 * time.Second)
	f.e.lastSync = time.Now().Add(-3 * time.Second)
	d := join(1)
	if got := srcOf(collect(t, f.sessions[srv])); hasAddr(got, d) {
		t.Fatalf("join 3 s after a 3 s sync: tag:srv's filter synced before %v", f.e.syncEvery)
	}
	f.e.lastSync = time.Now().Add(-6 * time.Second)
	f.e.process(map[uint64]struct{}{}, false, false)
	if got := srcOf(collect(t, f.sessions[srv])); !hasAddr(got, d) {
		t.Fatalf("6 s after a 3 s sync: tag:srv's filter sources %v lack the join", got)
	}
}

func TestSyncInterval(t *testing.T) {
	for _, tc := range []struct{ took, want time.Duration }{
		{100 * time.Millisecond, policySyncEvery},
		{3 * time.Second, 6 * time.Second},
		{20 * time.Second, maxSyncEvery},
	} {
		if got := syncInterval(tc.took); got != tc.want {
			t.Errorf("syncInterval(%v) = %v, want %v", tc.took, got, tc.want)
		}
	}
}

// srcsHold reports whether a FilterRule source list (addresses, prefixes
// and ranges) holds a.
func srcsHold(ips []string, a netip.Addr) bool {
	return slices.ContainsFunc(ips, func(s string) bool {
		if r, err := netipx.ParseIPRange(s); err == nil {
			return r.Contains(a)
		}
		p, err := netip.ParsePrefix(s)
		return s == a.String() || (err == nil && p.Contains(a))
	})
}

// collect delivers everything pending on s and returns the messages.
func collect(t *testing.T, s *session.Session) []tailcfg.MapResponse {
	t.Helper()
	s.Push(&session.Update{Online: map[uint64]bool{sentinelID: true}})
	ctx, cancel := context.WithCancel(context.Background())
	w := &captureWriter{cancel: cancel}
	s.Run(ctx, w)
	cancel()
	var out []tailcfg.MapResponse
	for r := bytes.NewReader(w.buf.Bytes()); r.Len() > 0; {
		var hdr [4]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			t.Fatal(err)
		}
		msg := make([]byte, binary.LittleEndian.Uint32(hdr[:]))
		if _, err := io.ReadFull(r, msg); err != nil {
			t.Fatal(err)
		}
		var m tailcfg.MapResponse
		if err := json.Unmarshal(msg, &m); err != nil {
			t.Fatal(err)
		}
		delete(m.OnlineChange, sentinelID)
		out = append(out, m)
	}
	return out
}

// captureWriter records what Run writes until the first flush.
type captureWriter struct {
	cancel context.CancelFunc
	buf    bytes.Buffer
}

func (w *captureWriter) Write(p []byte) (int, error) { return w.buf.Write(p) }
func (w *captureWriter) Flush() error                { w.cancel(); return nil }

// TestSameDeltasShareAnEncoding: class deltas with the same peers (the
// same encodings), removals, patches and profiles are one update; any
// difference keeps them apart, and updates with a class's own parts are
// never shared.
func TestSameDeltasShareAnEncoding(t *testing.T) {
	p1, p2 := json.RawMessage(`{"ID":1}`), json.RawMessage(`{"ID":2}`)
	prof := func() map[uint64]json.RawMessage { return map[uint64]json.RawMessage{7: json.RawMessage(`{"ID":7}`)} }
	mk := func(peers ...json.RawMessage) *session.Update {
		u := &session.Update{PeersChanged: map[uint64]json.RawMessage{}, UserProfiles: prof(), Shared: new(session.Encoded)}
		for i, p := range peers {
			u.PeersChanged[uint64(i+1)] = p
		}
		return u
	}
	sd := sameDeltas{}
	a := sd.find(mk(p1, p2))
	if b := sd.find(mk(p1, p2)); b != a {
		t.Fatal("equal deltas not shared")
	}
	if c := sd.find(mk(p1)); c == a {
		t.Fatal("different peers shared")
	}
	// The same bytes at another address are another encoding: not shared.
	if d := sd.find(mk(p1, json.RawMessage(`{"ID":2}`))); d == a {
		t.Fatal("deltas shared by bytes, not by encoding")
	}
	withRemoval := mk(p1, p2)
	withRemoval.PeersRemoved = map[uint64]struct{}{9: {}}
	if sd.find(withRemoval) == a {
		t.Fatal("a delta with a removal shared with one without")
	}
	own := mk(p1, p2)
	own.SSHPolicy = json.RawMessage(`{}`)
	if sd.find(own) != own {
		t.Fatal("a delta with an SSH policy was shared")
	}
}

// TestJoinSyncsEachNodesOwnFilter: when a join changes an
// autogroup:self rule, every member of a class gets that rule's chunk
// naming its own addresses, though the chunks all members share are
// computed once per class.
func TestJoinSyncsEachNodesOwnFilter(t *testing.T) {
	tn := smallTailnet([]byte(`{
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:80"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:22"]}
  ]
}`), 2, 10, func(int) bool { return false }, "")
	f := newBenchFixture(t, tn)
	f.drainAll()
	f.e.lastSync = time.Time{}
	joined := f.join(t, benchNode{user: 1})
	for i, id := range f.ids {
		if i%2 != 1 {
			continue // user0's nodes: their self rule did not change
		}
		var shared, own []tailcfg.FilterRule
		for _, m := range collect(t, f.sessions[id]) {
			for name, rules := range m.PacketFilters {
				if strings.HasSuffix(name, "s") {
					own = append(own, rules...)
				} else {
					shared = append(shared, rules...)
				}
			}
		}
		if len(shared) == 0 {
			t.Fatalf("node %d: the member rule's chunk, changed by the join, was not sent", id)
		}
		me := f.st.Node(id).IPv4.String()
		var dsts []string
		for _, fr := range own {
			for _, d := range fr.DstPorts {
				dsts = append(dsts, d.IP)
			}
			if !srcsHold(fr.SrcIPs, f.st.Node(joined).IPv4) {
				t.Fatalf("node %d: self rule sources %v lack the joined node", id, fr.SrcIPs)
			}
		}
		if !slices.Contains(dsts, me) || slices.ContainsFunc(dsts, func(d string) bool {
			return strings.HasPrefix(d, "100.") && d != me
		}) {
			t.Fatalf("node %d (%s): self rule destinations %v, want its own addresses only", id, me, dsts)
		}
	}
}

// TestIdleSweepDropsEncodings: two idle ticks without a batch drop the
// filter and SSH encodings, the classes' peer lists and filter parts; the
// next join builds them again, and the sessions' own filter chunks still
// name the joined node.
func TestIdleSweepDropsEncodings(t *testing.T) {
	tn := smallTailnet([]byte(`{
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:80"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:22"]}
  ],
  "ssh": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot"]}
  ]
}`), 2, 10, func(int) bool { return false }, "")
	f := newBenchFixture(t, tn)
	f.drainAll()
	joinSynced := func() uint64 {
		f.e.lastSync = time.Time{}
		id := f.registerNode(t, benchNode{user: 1})
		f.processAll(map[uint64]struct{}{id: {}})
		return id
	}
	joinSynced()
	f.drainAll()
	f.e.mu.Lock()
	f.e.classPeersLocked(f.ids[0])
	f.e.mu.Unlock()
	sizes := func() [5]int {
		f.e.mu.Lock()
		defer f.e.mu.Unlock()
		return [5]int{len(f.e.filterEnc.parts), len(f.e.filterEnc.srcs), len(f.e.sshEnc.rules), len(f.e.classPeers), len(f.e.parts)}
	}
	if s := sizes(); slices.Contains(s[:], 0) {
		t.Fatalf("after a synced join and a peer list: filter parts, source lists, SSH rules, peer lists, class parts = %v, want all cached", s)
	}
	for range 2 {
		f.e.mu.Lock()
		f.e.sweepIdleLocked()
		f.e.mu.Unlock()
	}
	if s := sizes(); s != [5]int{} {
		t.Fatalf("after two idle ticks: filter parts, source lists, SSH rules, peer lists, class parts = %v, want none", s)
	}
	joined := joinSynced()
	for i, id := range f.ids {
		if i%2 != 1 {
			continue
		}
		var own []tailcfg.FilterRule
		for _, m := range collect(t, f.sessions[id]) {
			for name, rules := range m.PacketFilters {
				if strings.HasSuffix(name, "s") {
					own = append(own, rules...)
				}
			}
		}
		if len(own) == 0 || !srcsHold(own[0].SrcIPs, f.st.Node(joined).IPv4) {
			t.Fatalf("node %d: after the idle sweep, its self rule %v lacks the joined node", id, own)
		}
	}
}

// TestLeaveUpdatesInPlace: a leave is taken out of the compilation
// without recompiling: the sessions that saw the node are told it is gone,
// the filters naming its address lose it at once in a quiet tailnet, and a
// session that never saw it gets nothing. When the last node of a class
// leaves, the chunks whose sources it alone stood for are deleted.
func TestLeaveUpdatesInPlace(t *testing.T) {
	tn := smallTailnet([]byte(`{
  "tagOwners": {"tag:srv": ["user0@example.com"], "tag:lone": ["user0@example.com"], "tag:x": ["user0@example.com"]},
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:srv:22", "autogroup:member:80"]},
    {"action": "accept", "src": ["tag:lone"], "dst": ["tag:srv:443"]}
  ]
}`), 2, 20, func(i int) bool { return i%5 == 0 }, "tag:srv")
	f := newBenchFixture(t, tn)
	var srv []uint64
	for i, n := range tn.nodes {
		if len(n.tags) > 0 {
			srv = append(srv, f.ids[i])
		}
	}
	lone := f.join(t, benchNode{user: 0, tags: []string{"tag:lone"}})
	x := f.join(t, benchNode{user: 0, tags: []string{"tag:x"}})
	f.sessions[x] = session.New(x, false)
	f.e.attachQuiet(f.sessions[x])
	f.drainAll()
	compiled := f.e.compiled
	leave := func(id uint64) map[uint64][]tailcfg.MapResponse {
		t.Helper()
		f.e.lastSync = time.Time{}
		f.leave(t, id)
		if f.e.compiled != compiled {
			t.Fatalf("node %d leaving recompiled the policy", id)
		}
		delete(f.sessions, id)
		got := map[uint64][]tailcfg.MapResponse{}
		for sid, s := range f.sessions {
			got[sid] = collect(t, s)
		}
		// Only the sentinel drain pushes to the node nobody sees.
		if m := got[x]; len(m) != 1 || len(m[0].PeersRemoved)+len(m[0].PacketFilters)+len(m[0].PeersChanged) > 0 {
			t.Fatalf("the node that never saw %d got %+v", id, m)
		}
		return got
	}

	gone := f.ids[1] // a user node; its class keeps members
	addr := f.st.Node(gone).IPv4
	other := f.st.Node(f.ids[2]).IPv4 // a member that stays
	for id, m := range leave(gone) {
		if id == x {
			continue
		}
		removed, synced := false, false
		for _, r := range m {
			removed = removed || slices.Contains(r.PeersRemoved, tailcfg.NodeID(gone))
			for _, rules := range r.PacketFilters {
				for _, fr := range rules {
					if srcsHold(fr.SrcIPs, addr) {
						t.Fatalf("node %d: filter sources %v still hold the removed node's %v", id, fr.SrcIPs, addr)
					}
					synced = synced || srcsHold(fr.SrcIPs, other)
				}
			}
		}
		if !removed || !synced {
			t.Fatalf("node %d: told of the leave %v, filter synced %v: %+v", id, removed, synced, m)
		}
	}

	got := leave(lone)
	for _, id := range srv {
		deleted := false
		for _, r := range got[id] {
			for name, rules := range r.PacketFilters {
				deleted = deleted || (rules == nil && name != "*")
			}
		}
		if !deleted {
			t.Fatalf("tag:srv node %d: the chunk of tag:lone's rule was not deleted: %+v", id, got[id])
		}
	}
}

// TestFullBatchesKeepSessionsInStep: a router joining, and then a policy
// edit, are full batches (the policy is recompiled and every session's
// view diffed). After each, every session, applying what it received to
// the peers it held, holds exactly the peers it now has, seen the same
// way: the new router with its route where the policy gives it, then the
// route gone where the edit takes it away, and nothing resent for peers
// whose view did not change.
func TestFullBatchesKeepSessionsInStep(t *testing.T) {
	const pol = `{
  "tagOwners": {"tag:srv": ["user0@example.com"]},
  "autoApprovers": {"routes": {"10.0.0.0/8": ["autogroup:member"]}},
  "acls": [
    {"action": "accept", "src": ["user0@example.com"], "dst": ["tag:srv:22", "10.1.0.0/16:*"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:80"]}
  ]
}`
	tn := smallTailnet([]byte(pol), 3, 30, func(i int) bool { return i%6 == 0 }, "tag:srv")
	f := newBenchFixture(t, tn)
	f.drainAll()
	held := map[uint64]heldPeers{}
	for id := range f.sessions {
		held[id] = holdPeers(f.e.compiled, id)
	}
	// check applies what each session received and compares; it returns
	// how many sessions hold the router with its route, and how many got
	// no peer change.
	check := func(what string, router uint64) (withRoute, unchanged int) {
		t.Helper()
		for id, s := range f.sessions {
			got := held[id].apply(t, what, id, collect(t, s))
			held[id].check(t, what, f.e.compiled, id)
			if len(held[id][router].allowed) == 3 {
				withRoute++
			}
			if got > 1 {
				t.Fatalf("%s: node %d got %d peer changes, want at most 1 (the router)", what, id, got)
			}
			if got == 0 {
				unchanged++
			}
		}
		return withRoute, unchanged
	}

	router := f.join(t, benchNode{user: 1, routes: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}})
	if r := f.st.Node(router); len(r.ApprovedRoutes) != 1 {
		t.Fatalf("router's routes were not approved: %v", r.ApprovedRoutes)
	}
	withRoute, unchanged := check("router joined", router)
	if withRoute == 0 || unchanged == 0 {
		t.Fatalf("router joined: %d sessions see its route, %d got no peer change: the test needs both", withRoute, unchanged)
	}

	if err := f.st.SetPolicy(context.Background(), []byte(strings.Replace(pol, `, "10.1.0.0/16:*"`, "", 1))); err != nil {
		t.Fatal(err)
	}
	f.e.process(nil, true, false)
	if withRoute, _ = check("route taken out of the policy", router); withRoute != 0 {
		t.Fatalf("route taken out of the policy: %d sessions still see the router's route", withRoute)
	}
}

// TestJoinAfterRecompileUsesNewClasses: a policy edit renumbers the
// classes, and the join after it must reach each session by its class in
// the new compilation. Under the first policy every user node is in one
// class; the edit gives user1's nodes a class of their own that sees
// tag:srv, so a tag:srv node joining then reaches user1's sessions and no
// other user's.
func TestJoinAfterRecompileUsesNewClasses(t *testing.T) {
	const pol = `{
  "tagOwners": {"tag:srv": ["user0@example.com"]},
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:80"]}
  ]
}`
	tn := smallTailnet([]byte(pol), 3, 30, func(int) bool { return false }, "")
	f := newBenchFixture(t, tn)
	f.drainAll()
	held := map[uint64]heldPeers{}
	check := func(what string) {
		t.Helper()
		for id, s := range f.sessions {
			held[id].apply(t, what, id, collect(t, s))
			held[id].check(t, what, f.e.compiled, id)
		}
	}
	for id := range f.sessions {
		held[id] = holdPeers(f.e.compiled, id)
	}
	// A join before the edit: every session's class is looked up in the
	// first compilation.
	f.join(t, benchNode{user: 2})
	check("user node joined")
	if err := f.st.SetPolicy(context.Background(), []byte(strings.Replace(pol, `
  ]`, `,
    {"action": "accept", "src": ["user1@example.com"], "dst": ["tag:srv:22"]}
  ]`, 1))); err != nil {
		t.Fatal(err)
	}
	f.e.process(nil, true, false)
	check("policy edited")
	// No session keeps the replaced compilation alive through its class.
	for id, ent := range f.e.sessions {
		if ent.of != f.e.compiled {
			t.Fatalf("session %d holds its class under an old compilation after the edit", id)
		}
	}
	srv := f.join(t, benchNode{user: 0, tags: []string{"tag:srv"}})
	check("tag:srv joined")
	seen := 0
	for id := range f.sessions {
		if _, ok := held[id][srv]; ok {
			seen++
			if n := f.st.Node(id); n.UserID != f.st.Node(f.ids[1]).UserID {
				t.Errorf("node %d of user %d sees tag:srv; only user1's nodes may", id, n.UserID)
			}
		}
	}
	if seen == 0 {
		t.Fatal("no session sees the tag:srv node: the test needs user1's")
	}
}

// TestJoinBatchPeersAsChunks: a batch of joins reaches each class as a
// delta whose peers are shared chunks by node-ID span; every session
// decodes exactly the joined nodes it sees, in id order, and sessions that
// see none get nothing.
func TestJoinBatchPeersAsChunks(t *testing.T) {
	tn := smallTailnet(scopedPolicy, 3, 40, func(i int) bool { return i%10 == 7 }, "tag:ops")
	f := newBenchFixture(t, tn)
	f.drainAll()
	var members, secrets []uint64
	dirty := map[uint64]struct{}{}
	for i := range 2*chunkSpan + 5 {
		id := f.registerNode(t, benchNode{user: i % 3})
		members = append(members, id)
		dirty[id] = struct{}{}
	}
	for range 2 {
		id := f.registerNode(t, benchNode{user: 0, tags: []string{"tag:secret"}})
		secrets = append(secrets, id)
		dirty[id] = struct{}{}
	}
	f.e.process(dirty, false, false)
	for i, n := range tn.nodes {
		id := f.ids[i]
		want := members
		if slices.Contains(n.tags, "tag:ops") {
			want = secrets
		}
		var got []uint64
		for _, m := range collect(t, f.sessions[id]) {
			for _, p := range m.PeersChanged {
				got = append(got, uint64(p.ID))
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("node %d (%v) got peers %v, want %v", id, n.tags, got, want)
		}
	}
	bare := 0
	for _, list := range f.e.chunks {
		for _, ce := range list {
			if ce.bare {
				bare++
				if len(ce.encs) == 0 || ce.chunk.JSON()[0] != '{' {
					t.Fatalf("bare chunk %q", ce.chunk.JSON())
				}
			}
		}
	}
	if bare != 1 {
		t.Fatalf("%d bare chunks cached, want the one of the members' delta", bare)
	}
}

// TestFullDiffKeepsViewsInStep: through full batches (a router joining, a
// policy edit that changes a capability every peer view depends on, one
// that drops rules, the router leaving), every session that applies what
// it was sent holds exactly its peers, with their allowed IPs and primary
// routes, as the compilation gives them, and exactly its packet filter.
// Filters go out as the parts that changed where few did (the router's
// join and leave, a tenth of the rules dropped), and whole where most did.
func TestFullDiffKeepsViewsInStep(t *testing.T) {
	tn, pol := generatedTailnetOf(policygen.Options{Seed: 7, Nodes: 150, Users: 15, Tags: 10, Groups: 6, Hosts: 6,
		Rules: 60, SelfRules: 3, SSHRules: 2, Tagged: 0.4, Routers: 6})
	no4 := append([]byte(`{"nodeAttrs":[{"target":["tag:t1","user3@example.com"],"attr":["disable-ipv4"]}],`), pol[1:]...)
	tn.policy = no4
	f := newBenchFixture(t, tn)
	f.drainAll()
	held := map[uint64]heldPeers{}
	filters := map[uint64]map[string][]tailcfg.FilterRule{}
	for id := range f.sessions {
		fs := map[string][]tailcfg.FilterRule{}
		for _, p := range f.e.compiled.ClassFilterParts(f.e.compiled.ClassOf(id)) {
			fs[p.Name()] = p.Rules(f.e.compiled, id)
		}
		filters[id] = fs
		held[id] = holdPeers(f.e.compiled, id)
	}
	check := func(what string) (changed, whole, parts int) {
		t.Helper()
		for id, s := range f.sessions {
			msgs := collect(t, s)
			changed += held[id].apply(t, what, id, msgs)
			held[id].check(t, what, f.e.compiled, id)
			for _, m := range msgs {
				if _, ok := m.PacketFilters["*"]; ok {
					filters[id] = map[string][]tailcfg.FilterRule{}
					whole++
				} else if len(m.PacketFilters) > 0 {
					parts++
				}
				for name, rules := range m.PacketFilters {
					if rules == nil {
						delete(filters[id], name)
					} else {
						filters[id][name] = rules
					}
				}
			}
			var got []tailcfg.FilterRule
			for _, name := range slices.Sorted(maps.Keys(filters[id])) {
				got = append(got, filters[id][name]...)
			}
			a, _ := json.Marshal(got)
			b, _ := json.Marshal(f.e.compiled.Filter(id))
			if len(got) == 0 {
				a = []byte("null")
			}
			if !bytes.Equal(a, b) {
				t.Fatalf("%s: node %d holds filter %s, has %s", what, id, a, b)
			}
		}
		return changed, whole, parts
	}
	// wantParts asserts that most sessions whose filter changed got only
	// the changed parts (some get it whole: most of their few parts
	// changed), or, if not, that most got it whole.
	wantParts := func(what string, whole, parts int, want bool) {
		t.Helper()
		if parts > whole != want {
			t.Fatalf("%s: %d sessions got whole filters, %d changed parts; want mostly parts: %v", what, whole, parts, want)
		}
	}
	setPolicy := func(what string, p []byte) (whole, parts int) {
		t.Helper()
		if err := f.st.SetPolicy(context.Background(), p); err != nil {
			t.Fatal(err)
		}
		f.e.process(nil, true, false)
		changed, whole, parts := check(what)
		if changed == 0 && whole == 0 && parts == 0 {
			t.Fatalf("%s: no session's peers or filter changed: the step tests nothing", what)
		}
		return whole, parts
	}

	router := f.join(t, benchNode{user: 1, routes: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}})
	changed, whole, parts := check("a second router of 10.1.0.0/16 joined")
	if changed == 0 {
		t.Fatal("the router's join reached no session")
	}
	wantParts("router joined", whole, parts, true)
	setPolicy("disable-ipv4 taken out", pol)
	var doc map[string]any
	if err := json.Unmarshal(pol, &doc); err != nil {
		t.Fatal(err)
	}
	acls := doc["acls"].([]any)
	doc["acls"] = acls[:len(acls)*9/10]
	tenth, _ := json.Marshal(doc)
	whole, parts = setPolicy("the last tenth of the rules dropped", tenth)
	wantParts("a tenth dropped", whole, parts, true)
	doc["acls"] = acls[:len(acls)/2]
	half, _ := json.Marshal(doc)
	whole, parts = setPolicy("half the rules dropped", half)
	wantParts("half dropped", whole, parts, false)
	setPolicy("disable-ipv4 back, all rules", no4)
	f.leave(t, router)
	_, whole, parts = check("the router left")
	wantParts("router left", whole, parts, true)

	// A join whose filter sync is deferred, then a full batch: the
	// sessions that did not hold the previous compilation's filter get
	// theirs whole.
	f.e.lastSync = time.Now()
	f.join(t, benchNode{user: 2})
	if len(f.e.syncPending) == 0 {
		t.Fatal("the join's filter sync was not deferred")
	}
	whole, parts = setPolicy("a tenth dropped after a deferred sync", tenth)
	wantParts("a tenth dropped after a deferred sync", whole, parts, false)
}

// TestJoinsKeepViewsInStep: joins (incremental batches) reach every
// session that sees the joined nodes, as that session's class sees them:
// plainly, or IPv6 only when either side has disable-ipv4. Sessions that
// apply their deltas hold the compilation's peers after each batch.
func TestJoinsKeepViewsInStep(t *testing.T) {
	tn, pol := generatedTailnetOf(policygen.Options{Seed: 11, Nodes: 120, Users: 12, Tags: 8, Groups: 5, Hosts: 4,
		Rules: 50, SelfRules: 3, SSHRules: 1, Tagged: 0.4})
	tn.policy = append([]byte(`{"nodeAttrs":[{"target":["tag:t1","user3@example.com"],"attr":["disable-ipv4"]}],`), pol[1:]...)
	f := newBenchFixture(t, tn)
	f.drainAll()
	held := map[uint64]heldPeers{}
	for id := range f.sessions {
		held[id] = holdPeers(f.e.compiled, id)
	}
	step := func(what string, joiners ...benchNode) {
		t.Helper()
		batch := map[uint64]struct{}{}
		for _, n := range joiners {
			batch[f.registerNode(t, n)] = struct{}{}
		}
		f.e.process(batch, false, false)
		changed := 0
		for id, s := range f.sessions {
			changed += held[id].apply(t, what, id, collect(t, s))
			held[id].check(t, what, f.e.compiled, id)
		}
		if changed == 0 {
			t.Fatalf("%s: the join reached no session", what)
		}
	}
	step("a node of user3 (disable-ipv4) joined", benchNode{user: 3})
	step("a tag:t1 node (disable-ipv4) joined", benchNode{user: 0, tags: []string{"tag:t1"}})
	step("a plain node joined", benchNode{user: 1})
	step("all three kinds in one batch", benchNode{user: 3}, benchNode{user: 0, tags: []string{"tag:t1"}}, benchNode{user: 2})
}

// TestSyncIsSentInSlices: a sync's per-node filter chunks go out over as
// many batches as the slice allows, each batch asking Run for the next;
// every session gets the join's change exactly once, and the next sync is
// not planned before the last one is sent.
func TestSyncIsSentInSlices(t *testing.T) {
	tn := smallTailnet(scopedPolicy, 3, 60, func(i int) bool { return i%10 == 7 }, "tag:ops")
	f := newBenchFixture(t, tn)
	f.drainAll()
	f.e.syncSlice = time.Nanosecond // 16 sessions a batch
	select {
	case <-f.e.wake:
	default:
	}
	joined := f.join(t, benchNode{user: 1})
	addr := f.st.Node(joined).IPv4
	members := 0
	for i, n := range tn.nodes {
		if len(n.tags) == 0 && f.sessions[f.ids[i]] != nil {
			members++
		}
	}
	got := map[uint64]int{}
	batches := 0
	for {
		for id, s := range f.sessions {
			for _, m := range collect(t, s) {
				for _, rules := range m.PacketFilters {
					for _, r := range rules {
						if srcsHold(r.SrcIPs, addr) {
							got[id]++
						}
					}
				}
			}
		}
		batches++
		if len(f.e.filterDue) == 0 {
			break
		}
		if batches > len(f.sessions) {
			t.Fatalf("%d sessions still due after %d batches: syncs overlap", len(f.e.filterDue), batches)
		}
		select {
		case <-f.e.wake:
		default:
			t.Fatalf("batch %d left %d sessions due without waking Run", batches, len(f.e.filterDue))
		}
		// A next round would be due: it must wait for this one, so no
		// session gets the first join's rule twice.
		f.e.lastSync = time.Time{}
		id := f.registerNode(t, benchNode{user: 2})
		select {
		case <-f.e.wake: // the registration's own notice
		default:
		}
		f.e.process(map[uint64]struct{}{id: {}}, false, false)
	}
	select {
	case <-f.e.wake:
	default:
		t.Fatal("the round ended with joins pending and due, without waking Run")
	}
	if batches < 3 {
		t.Fatalf("the sync went out in %d batches, want it sliced", batches)
	}
	if len(got) != members {
		t.Fatalf("%d of %d members got the join in their filter", len(got), members)
	}
	for id, n := range got {
		if n != 1 {
			t.Fatalf("session %d got the join's rule %d times", id, n)
		}
	}
}

// heldPeers is a session's peers as it holds them, by id.
type heldPeers map[uint64]heldPeer

type heldPeer struct{ allowed, primary []netip.Prefix }

// holdPeers returns node id's peers as a session that applied its full
// map holds them.
func holdPeers(c *policy.Compiled, id uint64) heldPeers {
	h := heldPeers{}
	for _, p := range c.Peers(id) {
		h[p.ID] = heldPeer{p.AllowedIPs, p.PrimaryRoutes}
	}
	return h
}

// apply applies the peer changes of node id's messages and returns how
// many there were; being sent itself as a peer fails the test.
func (h heldPeers) apply(t *testing.T, what string, id uint64, msgs []tailcfg.MapResponse) (changes int) {
	t.Helper()
	for _, m := range msgs {
		for _, p := range m.PeersChanged {
			if uint64(p.ID) == id {
				t.Fatalf("%s: node %d was sent itself as a peer", what, id)
			}
			h[uint64(p.ID)] = heldPeer{p.AllowedIPs, p.PrimaryRoutes}
			changes++
		}
		for _, pid := range m.PeersRemoved {
			delete(h, uint64(pid))
			changes++
		}
	}
	return changes
}

// check compares the held peers with node id's peers under c, allowed
// IPs and primary routes included.
func (h heldPeers) check(t *testing.T, what string, c *policy.Compiled, id uint64) {
	t.Helper()
	want := c.Peers(id)
	if len(h) != len(want) {
		t.Fatalf("%s: node %d holds %d peers, has %d", what, id, len(h), len(want))
	}
	for _, p := range want {
		got, ok := h[p.ID]
		if !ok || !slices.Equal(got.allowed, p.AllowedIPs) || len(got.primary)+len(p.PrimaryRoutes) > 0 && !slices.Equal(got.primary, p.PrimaryRoutes) {
			t.Fatalf("%s: node %d holds peer %d as %+v (held %v), has it as %v %v", what, id, p.ID, got, ok, p.AllowedIPs, p.PrimaryRoutes)
		}
	}
}

// TestConnectedDoesNotWaitForBatches: whether a node has a session is
// answered while a batch holds the engine's lock (the control server asks
// for every node another replica changes, on the follower's goroutine),
// and follows Attach and Detach.
func TestConnectedDoesNotWaitForBatches(t *testing.T) {
	f := newBenchFixture(t, smallTailnet(scopedPolicy, 3, 6, func(int) bool { return false }, ""))
	f.drainAll()
	real, quiet := f.ids[0], f.ids[5] // attached with Attach, and as benchmarks do
	f.e.mu.Lock()
	got := make(chan bool, 2)
	go func() { got <- f.e.Connected(real) && f.e.Connected(quiet) }()
	select {
	case c := <-got:
		if !c {
			t.Error("attached nodes are not connected")
		}
	case <-time.After(5 * time.Second):
		t.Error("Connected waited for the engine's lock")
	}
	f.e.mu.Unlock()
	if !f.e.Detach(f.sessions[real]) || f.e.Connected(real) {
		t.Error("a detached node is still connected")
	}
}
