package policy_test

import (
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"tailscale.com/tailcfg"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/policy/policygen"
	"github.com/tailplane/tailplane/internal/policy/simulate"
)

// answers is everything a node receives from a compilation, as JSON.
func answers(t testing.TB, c *policy.Compiled, id uint64) string {
	t.Helper()
	b, err := json.Marshal(struct {
		Filter any
		Peers  any
		SSH    any
		Caps   any
		Shared bool
	}{c.Filter(id), c.Peers(id), c.SSHPolicy(id), c.CapMap(id), c.FilterShared(id)})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// addAndCompare starts from a compilation over nodes[:start], adds the rest
// in the given batch sizes with AddNodes (recompiling when it declines), and
// after every batch checks every node's answers against a fresh Compile, and
// that nodes of classes AddNodes did not report as changed kept their
// filter, SSH policy and capabilities. It returns how many batches AddNodes
// took.
func addAndCompare(t *testing.T, name string, pol *policy.Policy, users []policy.User, nodes []policy.Node, start int, sizes []int) (took int) {
	t.Helper()
	c, err := pol.Compile(users, nodes[:start])
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	n := start
	// What a client that stopped listening after the first compilation
	// holds, to check FilterChunksSince over several calls.
	snap := func() (uint64, map[uint64]map[string][]tailcfg.FilterRule) {
		held := map[uint64]map[string][]tailcfg.FilterRule{}
		for _, nd := range nodes[:n] {
			held[nd.ID] = chunkMap(c.FilterChunks(nd.ID))
		}
		return c.Gen(), held
	}
	gen0, held0 := snap()
	for _, size := range sizes {
		end := min(n+size, len(nodes))
		if end == n {
			break
		}
		before := map[uint64]string{}
		chunks := map[uint64]map[string][]tailcfg.FilterRule{}
		for _, nd := range nodes[:n] {
			before[nd.ID] = ownAnswers(t, c, nd.ID)
			chunks[nd.ID] = chunkMap(c.FilterChunks(nd.ID))
		}
		gen := c.Gen()
		changed, ok := c.AddNodes(slices.Clone(nodes[n:end]))
		if !ok {
			if c, err = pol.Compile(users, nodes[:end]); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			n = end
			gen0, held0 = snap()
			continue
		}
		took++
		want, err := pol.Compile(users, nodes[:end])
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for _, nd := range nodes[:end] {
			if got, w := answers(t, c, nd.ID), answers(t, want, nd.ID); got != w {
				t.Fatalf("%s: after adding nodes %d..%d, node %d (%s):\n got %s\nwant %s", name, n, end-1, nd.ID, nd.Hostname, got, w)
			}
		}
		for _, nd := range nodes[:end] {
			cl := c.ClassOf(nd.ID)
			checkParts(t, name, c, nd.ID, c.ClassFilterParts(cl), c.FilterChunks(nd.ID))
			checkParts(t, name+" since", c, nd.ID, c.ClassFilterPartsSince(cl, gen), c.FilterChunksSince(nd.ID, gen))
			if got, w := jsonOf(t, concatChunks(chunkMap(c.FilterChunks(nd.ID)))), jsonOf(t, c.Filter(nd.ID)); got != w {
				t.Fatalf("%s: node %d: chunks concatenated in name order\n got %s\nwant %s", name, nd.ID, got, w)
			}
		}
		for _, nd := range nodes[:n] {
			if h, ok := held0[nd.ID]; ok {
				applyChunks(h, c.FilterChunksSince(nd.ID, gen0))
				if got, w := jsonOf(t, concatChunks(h)), jsonOf(t, c.Filter(nd.ID)); got != w {
					t.Fatalf("%s: node %d: chunks as of generation %d plus those changed since\n got %s\nwant %s", name, nd.ID, gen0, got, w)
				}
			}
		}
		checkDelta(t, fmt.Sprintf("%s: after adding nodes %d..%d", name, n, end-1), c, nodes[:n], before, chunks, gen, changed)
		n = end
	}
	return took
}

// checkDelta checks, for nodes that were in the tailnet before a change,
// that the chunks they held (chunks, as of generation gen) with those
// changed since replaced make their filter, and that nodes of classes the
// change did not report kept their filter, SSH policy and capabilities
// (before, from ownAnswers).
func checkDelta(t *testing.T, what string, c *policy.Compiled, nodes []policy.Node, before map[uint64]string, chunks map[uint64]map[string][]tailcfg.FilterRule, gen uint64, changed []int) {
	t.Helper()
	for _, nd := range nodes {
		held := chunks[nd.ID]
		applyChunks(held, c.FilterChunksSince(nd.ID, gen))
		if got, w := jsonOf(t, concatChunks(held)), jsonOf(t, c.Filter(nd.ID)); got != w {
			t.Fatalf("%s, node %d: old chunks plus changed ones\n got %s\nwant %s", what, nd.ID, got, w)
		}
		if !slices.Contains(changed, c.ClassOf(nd.ID)) && ownAnswers(t, c, nd.ID) != before[nd.ID] {
			t.Fatalf("%s, node %d's filter or SSH policy changed but its class %d was not reported", what, nd.ID, c.ClassOf(nd.ID))
		}
	}
}

// checkParts checks that a class's filter parts are the node's chunks:
// same names, and rules that are both what Rules builds and what the
// part's accessors describe (SrcIPs Src, DstPorts Dst then each own
// address with each SelfPorts range, IPProto Protos).
func checkParts(t *testing.T, name string, c *policy.Compiled, id uint64, parts []policy.FilterPart, chs []policy.FilterChunk) {
	t.Helper()
	if len(parts) != len(chs) {
		t.Fatalf("%s: node %d: %d filter parts, %d chunks", name, id, len(parts), len(chs))
	}
	for i, p := range parts {
		ch := chs[i]
		if p.Name() != ch.Name {
			t.Fatalf("%s: node %d: part %d is %q, chunk %q", name, id, i, p.Name(), ch.Name)
		}
		if p.Deleted() || ch.Rules == nil {
			if !p.Deleted() || ch.Rules != nil {
				t.Fatalf("%s: node %d: part %s deleted %v, chunk rules %v", name, id, p.Name(), p.Deleted(), ch.Rules)
			}
			continue
		}
		want := jsonOf(t, ch.Rules)
		if got := jsonOf(t, p.Rules(c, id)); got != want {
			t.Fatalf("%s: node %d: part %s's Rules\n got %s\nwant %s", name, id, p.Name(), got, want)
		}
		if p.HasCaps() {
			continue
		}
		dst := slices.Clone(p.Dst())
		for _, a := range c.OwnAddrs(id) {
			for _, pr := range p.SelfPorts() {
				dst = append(dst, tailcfg.NetPortRange{IP: a, Ports: pr})
			}
		}
		rules := []tailcfg.FilterRule{{SrcIPs: p.Src(), DstPorts: dst, IPProto: p.Protos()}}
		if got := jsonOf(t, rules); got != want {
			t.Fatalf("%s: node %d: part %s as its accessors describe it\n got %s\nwant %s", name, id, p.Name(), got, want)
		}
	}
}

// applyChunks is what a client does with PacketFilters: replace the
// named chunks, deleting those with no rules.
func applyChunks(held map[string][]tailcfg.FilterRule, chs []policy.FilterChunk) {
	for _, ch := range chs {
		if ch.Rules == nil {
			delete(held, ch.Name)
		} else {
			held[ch.Name] = ch.Rules
		}
	}
}

func chunkMap(chs []policy.FilterChunk) map[string][]tailcfg.FilterRule {
	m := map[string][]tailcfg.FilterRule{}
	for _, ch := range chs {
		m[ch.Name] = ch.Rules
	}
	return m
}

// concatChunks is what a client makes of its chunks: their rules in name
// order.
func concatChunks(m map[string][]tailcfg.FilterRule) []tailcfg.FilterRule {
	out := []tailcfg.FilterRule{}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, m[k]...)
	}
	return out
}

func jsonOf(t testing.TB, v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// ownAnswers is what of a node's answers AddNodes reports through changed
// classes (peers are the caller's to diff).
func ownAnswers(t testing.TB, c *policy.Compiled, id uint64) string {
	b, err := json.Marshal([]any{c.Filter(id), c.SSHPolicy(id), c.CapMap(id)})
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestAddNodesMatchesCompile checks incremental joins against full
// compilation over every oracle policy Tailscale accepted: nodes join one
// by one, or all but the first at once.
func TestAddNodesMatchesCompile(t *testing.T) {
	var took, batches int
	for _, oc := range loadCases(t) {
		pol, users, nodes, ok := oracleTailnet(oc)
		if !ok {
			continue
		}
		ones := make([]int, len(nodes))
		for i := range ones {
			ones[i] = 1
		}
		took += addAndCompare(t, oc.ID+"/one-by-one", pol, users, nodes, 1, ones)
		took += addAndCompare(t, oc.ID+"/at-once", pol, users, nodes, 1, []int{len(nodes)})
		batches += len(nodes) // len(nodes)-1 one by one, and one at once
	}
	t.Logf("AddNodes took %d of %d batches (the rest needed a full compile)", took, batches)
	if took == 0 {
		t.Fatal("AddNodes never applied: the test compared nothing")
	}
}

// oracleTailnet is an oracle case's policy and tailnet, when Tailscale
// accepted the policy, it compiles, and the tailnet has two nodes or more.
func oracleTailnet(oc oracleCase) (*policy.Policy, []policy.User, []policy.Node, bool) {
	if oc.PolicyStatus != 200 {
		return nil, nil, nil, false
	}
	pol, err := policy.Parse([]byte(oc.Policy))
	if err != nil {
		return nil, nil, nil, false
	}
	users, nodes, err := simulate.Tailnet(&oc.Case, pol)
	if err != nil || len(nodes) < 2 {
		return nil, nil, nil, false
	}
	if _, err := pol.Compile(users, nodes); err != nil {
		return nil, nil, nil, false
	}
	return pol, users, nodes, true
}

// TestAddNodesGenerated does the same on a generated policy with groups,
// tags, hosts, autogroup:self and SSH rules, nodes joining in random
// batches.
func TestAddNodesGenerated(t *testing.T) {
	for seed := range uint64(2) {
		o := policygen.Options{Seed: seed + 1, Nodes: 200, Users: 40, Tags: 20, Groups: 10, Hosts: 10,
			Rules: 200, SelfRules: 6, SSHRules: 6, Tagged: 0.4, Routers: 5}
		pol, users, nodes := generated(t, o)
		r := rand.New(rand.NewPCG(seed, 7))
		var sizes []int
		for range 30 {
			sizes = append(sizes, 1+r.IntN(10))
		}
		took := addAndCompare(t, fmt.Sprintf("seed %d", seed), pol, users, nodes, o.Routers+20, sizes)
		if took < len(sizes)/2 {
			t.Errorf("seed %d: AddNodes took only %d of %d batches", seed, took, len(sizes))
		}
	}
}

// TestAddNodesSSHChangedIsPrecise checks that a join reports, of the
// classes receiving an autogroup:self SSH rule, only those of the joining
// node's user: the other users' parts of the rule are unchanged.
func TestAddNodesSSHChangedIsPrecise(t *testing.T) {
	pol, err := policy.Parse([]byte(`{
		"tagOwners": {"tag:db": ["odin@example.com"]},
		"ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot"]}],
	}`))
	if err != nil {
		t.Fatal(err)
	}
	// laptop (odin), desk (thor), db; then odin's phone joins.
	start := []policy.Node{testNodes[0], testNodes[2], testNodes[3]}
	c, err := pol.Compile(testUsers, start)
	if err != nil {
		t.Fatal(err)
	}
	changed, ok := c.AddNodes([]policy.Node{testNodes[1]})
	if !ok {
		t.Fatal("AddNodes declined")
	}
	if want := []int{c.ClassOf(testNodes[1].ID)}; !slices.Equal(changed, want) || c.ClassOf(testNodes[0].ID) != want[0] {
		t.Errorf("changed classes %v, want only odin's class %v (thor's is %d)", changed, want, c.ClassOf(testNodes[2].ID))
	}
	if c.SSHPolicy(testNodes[2].ID) == nil {
		t.Error("thor's desk lost its SSH policy")
	}
}

// TestAddNodesReportsSelfList checks that a join reports the classes whose
// only change is their user's autogroup:self source list.
func TestAddNodesReportsSelfList(t *testing.T) {
	pol, err := policy.Parse([]byte(`{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	// laptop (odin) and desk (thor); then odin's phone joins laptop's class.
	c, err := pol.Compile(testUsers, []policy.Node{testNodes[0], testNodes[2]})
	if err != nil {
		t.Fatal(err)
	}
	before := jsonOf(t, c.Filter(testNodes[0].ID))
	changed, ok := c.AddNodes([]policy.Node{testNodes[1]})
	if !ok {
		t.Fatal("AddNodes declined")
	}
	if jsonOf(t, c.Filter(testNodes[0].ID)) == before {
		t.Fatal("laptop's filter did not change: the test checks nothing")
	}
	if ci := c.ClassOf(testNodes[0].ID); !slices.Contains(changed, ci) {
		t.Errorf("changed classes %v, want laptop's class %d", changed, ci)
	}
}

// TestFilterPartsPerSourceList checks that each source list of a rule is
// a part of its own, named so that name order is rule order (also past
// ten lists), and that a join resends only the list it changed.
func TestFilterPartsPerSourceList(t *testing.T) {
	var srcs []string
	for i := 1; i <= 11; i++ {
		srcs = append(srcs, fmt.Sprintf("%q", fmt.Sprintf("10.0.0.%d", i)))
	}
	srcs = append(srcs, `"tag:db"`)
	pol, err := policy.Parse([]byte(`{"tagOwners": {"tag:db": ["odin@example.com"]},
		"acls": [{"action": "accept", "src": [` + strings.Join(srcs, ",") + `], "dst": ["autogroup:member:22"]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	// laptop and db; then db2 joins db's class.
	c, err := pol.Compile(testUsers, []policy.Node{testNodes[0], testNodes[3]})
	if err != nil {
		t.Fatal(err)
	}
	laptop := testNodes[0].ID
	cl := c.ClassOf(laptop)
	parts := c.ClassFilterParts(cl)
	if len(parts) != 12 {
		t.Fatalf("%d parts, want one per source list (12)", len(parts))
	}
	checkParts(t, "compiled", c, laptop, parts, c.FilterChunks(laptop))
	if got, want := jsonOf(t, concatChunks(chunkMap(c.FilterChunks(laptop)))), jsonOf(t, c.Filter(laptop)); got != want {
		t.Fatalf("chunks concatenated in name order\n got %s\nwant %s", got, want)
	}
	gen := c.Gen()
	if _, ok := c.AddNodes([]policy.Node{testNodes[4]}); !ok {
		t.Fatal("AddNodes declined")
	}
	since := c.ClassFilterPartsSince(cl, gen)
	if len(since) != 1 || since[0].Name() != parts[11].Name() {
		t.Fatalf("after db2 joined: parts %v resent, want the tag:db list's (%s) alone", names(since), parts[11].Name())
	}
	checkParts(t, "joined", c, laptop, since, c.FilterChunksSince(laptop, gen))
}

func names(ps []policy.FilterPart) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Name())
	}
	return out
}
