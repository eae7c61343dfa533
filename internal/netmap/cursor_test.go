package netmap

import (
	"testing"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/policy/policygen"
)

// TestCursorIsPeers: a session's cursor walks exactly its node's peers,
// as Compiled.Peers gives them, for nodes of classes that see their own
// members and of classes that do not, routers included.
func TestCursorIsPeers(t *testing.T) {
	src, users, nodes := policygen.Generate(policygen.Options{Seed: 5, Nodes: 120, Users: 12, Tags: 10, Groups: 6,
		Hosts: 6, Rules: 100, SelfRules: 3, SSHRules: 2, Tagged: 0.4, Routers: 4})
	pol, err := policy.Parse(src)
	if err != nil {
		t.Fatal(err)
	}
	c, err := pol.Compile(users, nodes)
	if err != nil {
		t.Fatal(err)
	}
	cv := newClassViews(c)
	selfSeeing := 0
	for _, n := range nodes {
		var got []policy.Peer
		for cur := cv.cursor(n.ID); ; cur.next() {
			p, ok := cur.peek()
			if !ok {
				break
			}
			got = append(got, p)
		}
		want := c.Peers(n.ID)
		if !equalPeerLists(got, want) {
			t.Fatalf("node %d: cursor walks %v, Peers gives %v", n.ID, got, want)
		}
		if len(c.ClassPeers(n.ID)) > len(want) {
			selfSeeing++
		}
	}
	if selfSeeing == 0 || selfSeeing == len(nodes) {
		t.Fatalf("%d of %d nodes are in classes that see themselves: the test needs both kinds", selfSeeing, len(nodes))
	}
	if cur := cv.cursor(99999); func() bool { _, ok := cur.peek(); return ok }() {
		t.Fatal("a node not in the compilation has peers")
	}
}
