package policy_test

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/policy/policygen"
)

// TestClassPeersMatchPeerView: a node's class peer list is every node its
// class sees, sorted by id, as PeerView sees each one (the node itself is
// in it when its class sees itself), with nodes in any order given to
// Compile.
func TestClassPeersMatchPeerView(t *testing.T) {
	// ClassPeers places peers in ID slots when IDs are dense and sorts
	// them when sparse: each layout takes one of those paths, the last
	// with IDs beyond 2^40.
	for _, layout := range []struct {
		name string
		id   func(uint64) uint64
	}{
		{"dense", func(id uint64) uint64 { return id }},
		{"sparse", func(id uint64) uint64 { return id * 37 }},
		{"sparse and huge", func(id uint64) uint64 { return id*37 + 1<<41 }},
	} {
		t.Run(layout.name, func(t *testing.T) { classPeersMatchPeerView(t, layout.id) })
	}
}

// generated parses the policy policygen writes for o, with its tailnet.
func generated(t *testing.T, o policygen.Options) (*policy.Policy, []policy.User, []policy.Node) {
	t.Helper()
	src, users, nodes := policygen.Generate(o)
	pol, err := policy.Parse(src)
	if err != nil {
		t.Fatal(err)
	}
	return pol, users, nodes
}

func classPeersMatchPeerView(t *testing.T, mapID func(uint64) uint64) {
	o := policygen.Options{Seed: 3, Nodes: 150, Users: 30, Tags: 15, Groups: 8, Hosts: 8,
		Rules: 150, SelfRules: 4, SSHRules: 4, Tagged: 0.4, Routers: 4}
	pol, users, nodes := generated(t, o)
	for i := range nodes {
		nodes[i].ID = mapID(nodes[i].ID)
	}
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(nodes), func(i, j int) { nodes[i], nodes[j] = nodes[j], nodes[i] })
	c, err := pol.Compile(users, nodes)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		got := c.ClassPeers(n.ID)
		if !slices.IsSortedFunc(got, func(a, b policy.Peer) int { return int(a.ID) - int(b.ID) }) {
			t.Fatalf("node %d: class peers not sorted by id", n.ID)
		}
		var want []policy.Peer
		for _, p := range nodes {
			if pv, ok := c.PeerView(n.ID, p.ID); ok {
				want = append(want, pv)
			}
		}
		others := slices.DeleteFunc(slices.Clone(got), func(p policy.Peer) bool { return p.ID == n.ID })
		if len(others) != len(want) {
			t.Fatalf("node %d: %d class peers besides itself, %d from PeerView", n.ID, len(others), len(want))
		}
		for _, w := range want {
			i := slices.IndexFunc(got, func(p policy.Peer) bool { return p.ID == w.ID })
			if i < 0 || !slices.Equal(got[i].AllowedIPs, w.AllowedIPs) || !slices.Equal(got[i].PrimaryRoutes, w.PrimaryRoutes) {
				t.Fatalf("node %d: peer %d differs from PeerView", n.ID, w.ID)
			}
		}
	}
}

// TestClassPeersShared: classes that see the same peers the same way get
// one list, and taking a node's Peers does not change it for the others.
func TestClassPeersShared(t *testing.T) {
	o := policygen.Options{Seed: 5, Nodes: 300, Users: 40, Tags: 6, Groups: 6, Hosts: 4,
		Rules: 40, SelfRules: 0, SSHRules: 0, Tagged: 0.5, Routers: 0}
	pol, users, nodes := generated(t, o)
	c, err := pol.Compile(users, nodes)
	if err != nil {
		t.Fatal(err)
	}
	lists := map[int][]policy.Peer{}
	arrays := map[*policy.Peer]bool{}
	for _, n := range nodes {
		l := c.ClassPeers(n.ID)
		lists[c.ClassOf(n.ID)] = l
		if len(l) > 0 {
			arrays[&l[0]] = true
		}
	}
	if len(arrays) >= len(lists) {
		t.Fatalf("%d classes, %d distinct peer lists: none shared", len(lists), len(arrays))
	}
	want := map[int]string{}
	for cl, l := range lists {
		want[cl] = jsonOf(t, l)
	}
	for _, n := range nodes {
		c.Peers(n.ID)
	}
	for cl, l := range lists {
		if jsonOf(t, l) != want[cl] {
			t.Fatalf("class %d: its shared list changed when nodes' Peers were taken", cl)
		}
	}
	t.Logf("%d classes, %d distinct lists", len(lists), len(arrays))
}

// TestNodeViewsMatchClassPeer: for every class (through a member) and
// every node ID given, NodeViews sees what ClassPeer reports and as it
// reports it; Plain views are the node's own addresses; IDs the
// compilation does not hold are seen by none.
func TestNodeViewsMatchClassPeer(t *testing.T) {
	pol, users, nodes := generated(t, policygen.Options{Seed: 11, Nodes: 120, Users: 12, Tags: 10, Groups: 6, Hosts: 6,
		Rules: 100, SelfRules: 3, SSHRules: 2, Tagged: 0.4, Routers: 5})
	c, err := pol.Compile(users, nodes)
	if err != nil {
		t.Fatal(err)
	}
	ids := []uint64{0}
	for _, n := range nodes {
		ids = append(ids, n.ID)
	}
	ids = append(ids, 1<<40)
	v := c.NodeViews(ids)
	plain, routed := 0, 0
	for _, viewer := range nodes {
		cl := c.ClassOf(viewer.ID)
		for k, id := range ids {
			want, ok := c.ClassPeer(viewer.ID, id)
			if v.Sees(cl, k) != ok {
				t.Fatalf("class of %d sees %d: %v, ClassPeer says %v", viewer.ID, id, v.Sees(cl, k), ok)
			}
			if !ok {
				continue
			}
			if got := v.View(cl, k); !slices.Equal(got.AllowedIPs, want.AllowedIPs) || !slices.Equal(got.PrimaryRoutes, want.PrimaryRoutes) {
				t.Fatalf("class of %d sees %d as %+v, ClassPeer as %+v", viewer.ID, id, got, want)
			}
			if v.Plain(cl, k) {
				plain++
				if len(want.PrimaryRoutes) > 0 || len(want.AllowedIPs) != 2 {
					t.Fatalf("class of %d sees %d plainly, but as %+v", viewer.ID, id, want)
				}
			} else {
				routed++
			}
		}
	}
	if plain == 0 || routed == 0 {
		t.Fatalf("%d plain and %d other views: the test needs both", plain, routed)
	}
}
