package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"tailscale.com/tailcfg"
)

// joinPolicy: every member reaches its own user's nodes on 8001
// (autogroup:self), and ja reaches jb's nodes on 8002. Until ja has a node,
// the second rule has no source and compiles to nothing.
const joinPolicy = `// TestJoinUpdatesFilters
{
	"acls": [
		{"action": "accept", "proto": "tcp", "src": ["autogroup:member"], "dst": ["autogroup:self:8001"]},
		{"action": "accept", "proto": "tcp", "src": ["ja@example.com"], "dst": ["jb@example.com:8002"]},
	],
}
`

// TestJoinUpdatesFilters checks, with real clients, that joins and leaves
// reach the packet filters of nodes already connected, sent as changed
// filter chunks on their open map stream (both are applied to the
// compiled policy without recompiling it): ja's first node makes the rule
// it is the source of apply to jb1, jb's second node joins jb1's identity
// class, whose autogroup:self source list gains its address, ja's node
// leaving empties its class, and ja's next node revives it.
func TestJoinUpdatesFilters(t *testing.T) {
	srv := startServer(t)
	for _, u := range []string{"ja", "jb"} {
		srv.mustCLI(t, "users", "create", u, "--email", u+"@example.com")
	}
	setPolicy(t, srv, joinPolicy)
	ka := srv.createKey(t, "ja").Key
	kb := srv.createKey(t, "jb", "--reusable").Key

	b1 := joinEach(t, srv, nil, []string{"jb1"}, []string{kb})[0]
	for _, port := range []int{8001, 8002} {
		if err := b1.Serve(t.Context(), port, fmt.Sprintf("jb1 port %d", port)); err != nil {
			t.Fatal(err)
		}
	}
	polls0 := mapCounters(t, []*member{b1}, "controlclient_map_requests_poll")
	maps0 := mapCounters(t, []*member{b1}, "controlclient_map_response_map")

	a := joinEach(t, srv, nil, []string{"ja1"}, []string{ka})[0]
	checkAllowed(t, a, b1, 8002, trafficTimeout)
	checkDenied(t, []flow{{a, b1, 8001}})

	b2 := joinEach(t, srv, nil, []string{"jb2"}, []string{kb})[0]
	checkAllowed(t, b2, b1, 8001, trafficTimeout)
	checkDenied(t, []flow{{b2, b1, 8002}})

	// Leaves are taken out of the compiled policy in place too. ja1 is
	// the only node of its class: the rule it is the source of loses its
	// source list, whose chunk jb1 is told to delete; a new ja node brings
	// the class back.
	if !names(filterRules(t, b1), a.ip4) {
		t.Fatalf("jb1's packet filter does not name ja1's %v", a.ip4)
	}
	leave(t, srv, a, b1)
	deadline := time.Now().Add(removalTimeout)
	rules := filterRules(t, b1)
	for ; names(rules, a.ip4); rules = filterRules(t, b1) {
		if time.Now().After(deadline) {
			t.Fatalf("jb1's packet filter still names ja1's %v %v after its node was deleted", a.ip4, removalTimeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The emptied list's chunk was deleted, not replaced by a rule
	// without sources.
	if len(rules) != 1 || len(rules[0].SrcIPs) == 0 {
		t.Fatalf("jb1's packet filter after ja1 left: %+v, want the autogroup:self rule alone", rules)
	}
	checkAllowed(t, b2, b1, 8001, trafficTimeout)
	a2 := joinEach(t, srv, nil, []string{"ja2"}, []string{srv.createKey(t, "ja").Key})[0]
	checkAllowed(t, a2, b1, 8002, trafficTimeout)

	// jb1 learnt all of it on the stream it had: it sent no new streaming
	// map request, and received map responses on it.
	polls := mapCounters(t, []*member{b1}, "controlclient_map_requests_poll")
	maps := mapCounters(t, []*member{b1}, "controlclient_map_response_map")
	t.Logf("jb1: streaming map requests %d -> %d, map responses %d -> %d", polls0[0], polls[0], maps0[0], maps[0])
	if polls[0] != polls0[0] {
		t.Errorf("jb1 opened %d new map stream(s): it reconnected to control", polls[0]-polls0[0])
	}
	if maps[0] < maps0[0]+4 {
		t.Errorf("jb1 received %d map responses for three joins and a leave, want at least 4", maps[0]-maps0[0])
	}
}

// filterRules returns m's packet filter as its netmap holds it.
func filterRules(t *testing.T, m *member) []tailcfg.FilterRule {
	t.Helper()
	out, err := m.CLI(t.Context(), "debug", "netmap")
	if err != nil {
		t.Fatalf("%s: debug netmap: %v", m.Name(), err)
	}
	var nm struct{ PacketFilterRules []tailcfg.FilterRule }
	if err := json.Unmarshal(out, &nm); err != nil {
		t.Fatalf("%s: debug netmap: %v", m.Name(), err)
	}
	return nm.PacketFilterRules
}

// names reports whether a rule's sources list address ip.
func names(rules []tailcfg.FilterRule, ip netip.Addr) bool {
	return slices.ContainsFunc(rules, func(r tailcfg.FilterRule) bool { return slices.Contains(r.SrcIPs, ip.String()) })
}

// leave deletes m's node and waits until it is no longer a peer of viewer.
func leave(t *testing.T, srv *server, m, viewer *member) {
	t.Helper()
	n, ok := nodeByIP(srv.mustListNodes(t), m.ip4)
	if !ok {
		t.Fatalf("%s (%v) not in nodes list", m.Name(), m.ip4)
	}
	srv.mustCLI(t, "nodes", "delete", fmt.Sprint(n.ID))
	if err := waitPeer(t.Context(), viewer, m.ip4, false, removalTimeout); err != nil {
		t.Fatalf("%s still a peer of %s after its node was deleted: %v", m.Name(), viewer.Name(), err)
	}
}
