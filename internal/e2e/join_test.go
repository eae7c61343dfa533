package e2e

import (
	"fmt"
	"testing"
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

// TestJoinUpdatesFilters checks, with real clients, that joins reach the
// packet filters of nodes already connected, sent as changed filter chunks
// on their open map stream (joins are added to the compiled policy without
// recompiling it): ja's first node makes the rule it is the source of apply
// to jb1, and jb's second node joins jb1's identity class, whose
// autogroup:self source list gains its address.
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

	// jb1 learnt both joins on the stream it had: it sent no new streaming
	// map request, and received map responses on it.
	polls := mapCounters(t, []*member{b1}, "controlclient_map_requests_poll")
	maps := mapCounters(t, []*member{b1}, "controlclient_map_response_map")
	t.Logf("jb1: streaming map requests %d -> %d, map responses %d -> %d", polls0[0], polls[0], maps0[0], maps[0])
	if polls[0] != polls0[0] {
		t.Errorf("jb1 opened %d new map stream(s): it reconnected to control", polls[0]-polls0[0])
	}
	if maps[0] < maps0[0]+2 {
		t.Errorf("jb1 received %d map responses for two joins, want at least 2", maps[0]-maps0[0])
	}
}
