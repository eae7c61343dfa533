package policy_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"tailscale.com/tailcfg"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/policy/policygen"
)

// churnAndCompare starts from a compilation over nodes[:start] and
// applies steps: a positive step adds that many nodes not in the tailnet
// (in pool order) with AddNodes, a negative one removes that many random
// nodes with RemoveNodes; a declined step recompiles. After every step it
// checks every node's answers against a fresh Compile, their filter parts,
// that the old chunks of nodes that stayed, with those changed since
// replaced or deleted, make their filter, that nodes of unreported classes
// kept their filter and SSH policy, and that ClassSees tells exactly which
// nodes saw each removed one. It returns how many steps were taken in
// place.
func churnAndCompare(t *testing.T, name string, pol *policy.Policy, users []policy.User, nodes []policy.Node, start int, r *rand.Rand, steps []int) (took int) {
	t.Helper()
	c, err := pol.Compile(users, nodes[:start])
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	// live is in the compilation's node order, which Compile is given:
	// it emits SSH principals in node order.
	live := slices.Clone(nodes[:start])
	for _, step := range steps {
		var out, next []policy.Node
		if step < 0 {
			if -step >= len(live) {
				continue
			}
			pick := r.Perm(len(live))[:-step]
			for i, nd := range live {
				if slices.Contains(pick, i) {
					out = append(out, nd)
				} else {
					next = append(next, nd)
				}
			}
		} else {
			next = slices.Clone(live)
			for _, nd := range nodes {
				if len(next) == len(live)+step {
					break
				}
				if !slices.ContainsFunc(live, func(l policy.Node) bool { return l.ID == nd.ID }) {
					next = append(next, nd)
				}
			}
		}
		stay := slices.DeleteFunc(slices.Clone(live), func(nd policy.Node) bool {
			return slices.ContainsFunc(out, func(o policy.Node) bool { return o.ID == nd.ID })
		})
		var ids []uint64
		classOf := map[uint64]int{}
		for _, nd := range out {
			ids = append(ids, nd.ID)
			classOf[nd.ID] = c.ClassOf(nd.ID)
		}
		before := map[uint64]string{}
		chunks := map[uint64]map[string][]tailcfg.FilterRule{}
		saw := map[[2]uint64]bool{}
		for _, nd := range stay {
			before[nd.ID] = ownAnswers(t, c, nd.ID)
			chunks[nd.ID] = chunkMap(c.FilterChunks(nd.ID))
			for _, p := range c.Peers(nd.ID) {
				saw[[2]uint64{nd.ID, p.ID}] = true
			}
		}
		gen := c.Gen()
		var changed []int
		var ok bool
		what := fmt.Sprintf("%s: after removing %v", name, ids)
		if step < 0 {
			changed, ok = c.RemoveNodes(ids)
		} else {
			what = fmt.Sprintf("%s: after adding %d nodes", name, len(next)-len(live))
			changed, ok = c.AddNodes(slices.Clone(next[len(live):]))
		}
		live = next
		if !ok {
			if c, err = pol.Compile(users, live); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			continue
		}
		took++
		want, err := pol.Compile(users, live)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		for _, nd := range live {
			if got, w := answers(t, c, nd.ID), answers(t, want, nd.ID); got != w {
				t.Fatalf("%s, node %d (%s):\n got %s\nwant %s", what, nd.ID, nd.Hostname, got, w)
			}
			cl := c.ClassOf(nd.ID)
			checkParts(t, what, c, nd.ID, c.ClassFilterParts(cl), c.FilterChunks(nd.ID))
			checkParts(t, what+" since", c, nd.ID, c.ClassFilterPartsSince(cl, gen), c.FilterChunksSince(nd.ID, gen))
		}
		for _, nd := range stay {
			for _, id := range ids {
				if got := c.ClassSees(nd.ID, classOf[id]); got != saw[[2]uint64{nd.ID, id}] {
					t.Fatalf("%s: ClassSees(node %d, class %d of removed node %d) = %v, but it saw it: %v", what, nd.ID, classOf[id], id, got, !got)
				}
			}
		}
		checkDelta(t, what, c, stay, before, chunks, gen, changed)
		for _, id := range ids {
			if c.ClassOf(id) != -1 {
				t.Fatalf("%s: removed node %d still has a class", what, id)
			}
		}
	}
	return took
}

// TestRemoveNodesMatchesCompile checks incremental leaves against full
// compilation over every oracle policy Tailscale accepted: nodes leave one
// by one in random order until one is left, then, from the whole tailnet
// again, leave and join in turn.
func TestRemoveNodesMatchesCompile(t *testing.T) {
	var took, batches int
	r := rand.New(rand.NewPCG(1, 2))
	for _, oc := range loadCases(t) {
		pol, users, nodes, ok := oracleTailnet(oc)
		if !ok {
			continue
		}
		ones := make([]int, len(nodes)-1)
		for i := range ones {
			ones[i] = -1
		}
		took += churnAndCompare(t, oc.ID, pol, users, nodes, len(nodes), r, ones)
		// Leaves and joins in turn: emptied classes come back.
		churn := []int{-2, 1, -1, 2, -3, 3}
		took += churnAndCompare(t, oc.ID+"/churn", pol, users, nodes, len(nodes), r, churn)
		batches += len(ones) + len(churn)
	}
	t.Logf("%d of %d steps taken in place (the rest needed a full compile)", took, batches)
	if took == 0 {
		t.Fatal("RemoveNodes never applied: the test compared nothing")
	}
}

// TestRemoveNodesGenerated does the same on generated policies with
// groups, tags, hosts, autogroup:self and SSH rules: nodes leave in random
// batches, then join and leave in turn, so that emptied classes come back.
func TestRemoveNodesGenerated(t *testing.T) {
	for seed := range uint64(2) {
		o := policygen.Options{Seed: seed + 1, Nodes: 100, Users: 10, Tags: 12, Groups: 8, Hosts: 8,
			Rules: 120, SelfRules: 6, SSHRules: 6, Tagged: 0.4, Routers: 4}
		pol, users, nodes := generated(t, o)
		r := rand.New(rand.NewPCG(seed, 11))
		var steps []int
		for range 10 {
			steps = append(steps, -1-r.IntN(6))
		}
		for range 10 {
			steps = append(steps, 1+r.IntN(6), -1-r.IntN(6))
		}
		took := churnAndCompare(t, fmt.Sprintf("seed %d", seed), pol, users, nodes, len(nodes), r, steps)
		t.Logf("seed %d: %d of %d steps taken in place", seed, took, len(steps))
		if took < len(steps)/2 {
			t.Errorf("seed %d: only %d of %d steps taken in place", seed, took, len(steps))
		}
	}
}

// TestRemoveNodesDeclines checks the leaves that need a full compile (a
// node that is absent or given twice, one that routes), and that the last
// nodes of a class leave in place and a join revives their class.
func TestRemoveNodesDeclines(t *testing.T) {
	pol, err := policy.Parse([]byte(`{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["*:*"]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	router := policy.Node{ID: 6, Hostname: "router", UserID: 2, IPv4: netip.MustParseAddr("100.64.0.6"),
		ApprovedRoutes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}}
	// One class of user nodes (laptop, phone, desk), one of the two tagged
	// db nodes, one of the router.
	c, err := pol.Compile(testUsers, append(slices.Clone(testNodes), router))
	if err != nil {
		t.Fatal(err)
	}
	gen := c.Gen()
	for _, tc := range []struct {
		name string
		ids  []uint64
	}{
		{"absent", []uint64{999}},
		{"twice", []uint64{1, 1}},
		{"a router", []uint64{6}},
	} {
		if _, ok := c.RemoveNodes(tc.ids); ok {
			t.Errorf("%s: RemoveNodes(%v) took it", tc.name, tc.ids)
		}
	}
	if c.Gen() != gen {
		t.Fatal("a declined RemoveNodes changed the compilation")
	}
	db := c.ClassOf(4)
	if _, ok := c.RemoveNodes([]uint64{2, 4, 5}); !ok {
		t.Fatal("RemoveNodes declined")
	}
	if _, ok := c.AddNodes([]policy.Node{testNodes[4]}); !ok {
		t.Fatal("AddNodes declined to revive the emptied class")
	}
	if c.ClassOf(5) != db {
		t.Fatalf("db2 came back in class %d, not its emptied class %d", c.ClassOf(5), db)
	}
	want, err := pol.Compile(testUsers, []policy.Node{testNodes[0], testNodes[2], router, testNodes[4]})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []uint64{1, 3, 5, 6} {
		if got, w := answers(t, c, id), answers(t, want, id); got != w {
			t.Fatalf("node %d:\n got %s\nwant %s", id, got, w)
		}
	}
}

// TestRemoveNodesEdges: leaves whose effect only some policies show. A
// leave of a user's first node reorders the parts of an SSH rule with
// localpart users (Compile emits them in the order of each part's first
// node). A join that compiles a rule anew while a class is empty
// recompiles: the rule's pieces are built from each receiving class's
// representative, which the emptied class lacks; one that brings an
// emptied class back does not.
func TestRemoveNodesEdges(t *testing.T) {
	users := []policy.User{{ID: 1, Name: "ann", Email: "ann@example.com"}, {ID: 2, Name: "bob", Email: "bob@example.com"}}
	node := func(id uint64, user uint64, tags ...string) policy.Node {
		return policy.Node{ID: id, Hostname: fmt.Sprint("n", id), UserID: user, Tags: tags,
			IPv4: netip.AddrFrom4([4]byte{100, 64, 0, byte(id)})}
	}
	pol, err := policy.Parse([]byte(`{
		"tagOwners": {"tag:srv": ["ann@example.com"], "tag:a": ["ann@example.com"], "tag:b": ["ann@example.com"]},
		"acls": [
			{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:srv:22"]},
			{"action": "accept", "src": ["tag:a"], "dst": ["tag:b:80"]},
		],
		"ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:srv"], "users": ["localpart:*@example.com"]}],
	}`))
	if err != nil {
		t.Fatal(err)
	}
	// ann's nodes 1 and 4, bob's 2: the SSH parts go ann, bob until node 1
	// leaves. Nodes 5 and 6 are tag:b; tag:a has no node, so the second
	// rule is not compiled.
	nodes := []policy.Node{node(1, 1), node(2, 2), node(3, 1, "tag:srv"), node(4, 1), node(5, 1, "tag:b"), node(6, 1, "tag:b")}
	c, err := pol.Compile(users, nodes)
	if err != nil {
		t.Fatal(err)
	}
	check := func(what string, live []policy.Node) {
		t.Helper()
		want, err := pol.Compile(users, live)
		if err != nil {
			t.Fatal(err)
		}
		for _, nd := range live {
			if got, w := answers(t, c, nd.ID), answers(t, want, nd.ID); got != w {
				t.Fatalf("%s, node %d:\n got %s\nwant %s", what, nd.ID, got, w)
			}
		}
	}
	if _, ok := c.RemoveNodes([]uint64{1}); !ok {
		t.Fatal("RemoveNodes declined")
	}
	live := slices.Delete(slices.Clone(nodes), 0, 1)
	check("after ann's first node left", live)
	if _, ok := c.RemoveNodes([]uint64{5, 6}); !ok {
		t.Fatal("RemoveNodes declined")
	}
	live = live[:3]
	check("after tag:b emptied", live)
	if _, ok := c.AddNodes([]policy.Node{node(7, 1, "tag:a")}); ok {
		t.Fatal("AddNodes compiled the tag:a rule anew while tag:b's class was empty")
	}
	if _, ok := c.AddNodes([]policy.Node{node(5, 1, "tag:b")}); !ok {
		t.Fatal("AddNodes declined to bring tag:b's emptied class back")
	}
	check("after tag:b came back", append(live, node(5, 1, "tag:b")))
}
