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

// removeAndCompare starts from a compilation over all nodes and removes
// random nodes in batches of the given sizes with RemoveNodes (recompiling
// when it declines). After every batch it checks the remaining nodes'
// answers against a fresh Compile, their filter parts, that their old
// chunks with those changed since replaced make their filter, that nodes of
// unreported classes kept their filter and SSH policy, and that ClassSees
// tells exactly which of them saw each removed node. It returns how many
// batches RemoveNodes took.
func removeAndCompare(t *testing.T, name string, pol *policy.Policy, users []policy.User, nodes []policy.Node, r *rand.Rand, sizes []int) (took int) {
	t.Helper()
	c, err := pol.Compile(users, nodes)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	live := slices.Clone(nodes)
	for _, size := range sizes {
		if size >= len(live) {
			break
		}
		// The rest keep their order: Compile emits SSH principals in
		// node order.
		pick := r.Perm(len(live))[:size]
		var out, rest []policy.Node
		for i, nd := range live {
			if slices.Contains(pick, i) {
				out = append(out, nd)
			} else {
				rest = append(rest, nd)
			}
		}
		var ids []uint64
		classOf := map[uint64]int{}
		for _, nd := range out {
			ids = append(ids, nd.ID)
			classOf[nd.ID] = c.ClassOf(nd.ID)
		}
		before := map[uint64]string{}
		chunks := map[uint64]map[string][]tailcfg.FilterRule{}
		saw := map[[2]uint64]bool{}
		for _, nd := range rest {
			before[nd.ID] = ownAnswers(t, c, nd.ID)
			chunks[nd.ID] = chunkMap(c.FilterChunks(nd.ID))
			for _, p := range c.Peers(nd.ID) {
				saw[[2]uint64{nd.ID, p.ID}] = true
			}
		}
		gen := c.Gen()
		what := fmt.Sprintf("%s: after removing %v", name, ids)
		changed, ok := c.RemoveNodes(ids)
		if !ok {
			if c, err = pol.Compile(users, rest); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			live = rest
			continue
		}
		took++
		want, err := pol.Compile(users, rest)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		for _, nd := range rest {
			if got, w := answers(t, c, nd.ID), answers(t, want, nd.ID); got != w {
				t.Fatalf("%s, node %d (%s):\n got %s\nwant %s", what, nd.ID, nd.Hostname, got, w)
			}
			cl := c.ClassOf(nd.ID)
			checkParts(t, what, c, nd.ID, c.ClassFilterParts(cl), c.FilterChunks(nd.ID))
			checkParts(t, what+" since", c, nd.ID, c.ClassFilterPartsSince(cl, gen), c.FilterChunksSince(nd.ID, gen))
			for _, id := range ids {
				if got := c.ClassSees(nd.ID, classOf[id]); got != saw[[2]uint64{nd.ID, id}] {
					t.Fatalf("%s: ClassSees(node %d, class %d of removed node %d) = %v, but it saw it: %v", what, nd.ID, classOf[id], id, got, !got)
				}
			}
		}
		checkDelta(t, what, c, rest, before, chunks, gen, changed)
		for _, id := range ids {
			if c.ClassOf(id) != -1 {
				t.Fatalf("%s: removed node %d still has a class", what, id)
			}
		}
		live = rest
	}
	return took
}

// TestRemoveNodesMatchesCompile checks incremental leaves against full
// compilation over every oracle policy Tailscale accepted: nodes leave one
// by one in random order until one is left.
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
			ones[i] = 1
		}
		took += removeAndCompare(t, oc.ID, pol, users, nodes, r, ones)
		batches += len(ones)
	}
	t.Logf("RemoveNodes took %d of %d leaves (the rest needed a full compile)", took, batches)
	if took == 0 {
		t.Fatal("RemoveNodes never applied: the test compared nothing")
	}
}

// TestRemoveNodesGenerated does the same on generated policies with
// groups, tags, hosts, autogroup:self and SSH rules (and, in the second,
// localpart SSH users through autogroup:self-only classes), nodes leaving
// in random batches.
func TestRemoveNodesGenerated(t *testing.T) {
	for seed := range uint64(2) {
		o := policygen.Options{Seed: seed + 1, Nodes: 100, Users: 10, Tags: 12, Groups: 8, Hosts: 8,
			Rules: 120, SelfRules: 6, SSHRules: 6, Tagged: 0.4, Routers: 4}
		pol, users, nodes := generated(t, o)
		r := rand.New(rand.NewPCG(seed, 11))
		var sizes []int
		for range 16 {
			sizes = append(sizes, 1+r.IntN(4))
		}
		took := removeAndCompare(t, fmt.Sprintf("seed %d", seed), pol, users, nodes, r, sizes)
		t.Logf("seed %d: RemoveNodes took %d of %d batches", seed, took, len(sizes))
		if took < len(sizes)/4 {
			t.Errorf("seed %d: RemoveNodes took only %d of %d batches", seed, took, len(sizes))
		}
	}
}

// TestRemoveNodesDeclines checks the leaves that need a full compile: a
// node that is absent or given twice, one that routes, and the last nodes
// of a class.
func TestRemoveNodesDeclines(t *testing.T) {
	pol, err := policy.Parse([]byte(`{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["*:*"]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	router := policy.Node{ID: 6, Hostname: "router", UserID: 2, IPv4: netip.MustParseAddr("100.64.0.6"),
		ApprovedRoutes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}}
	router2 := router
	router2.ID, router2.IPv4 = 7, netip.MustParseAddr("100.64.0.7")
	// One class of user nodes (laptop, phone, desk), one of the two tagged
	// db nodes, one of the two routers.
	c, err := pol.Compile(testUsers, append(slices.Clone(testNodes), router, router2))
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
		{"the last of a class", []uint64{4, 5}},
	} {
		if _, ok := c.RemoveNodes(tc.ids); ok {
			t.Errorf("%s: RemoveNodes(%v) took it", tc.name, tc.ids)
		}
	}
	if c.Gen() != gen {
		t.Fatal("a declined RemoveNodes changed the compilation")
	}
	if _, ok := c.RemoveNodes([]uint64{2, 4}); !ok {
		t.Fatal("RemoveNodes declined nodes whose classes keep members")
	}
}
