package netmap

import (
	"context"
	"testing"

	"tailscale.com/tailcfg"

	"github.com/tailplane/tailplane/internal/state"
)

// TestReauthAfterExpiryReachesPeers: a node whose key an admin expired
// logs in again with a key; its peers must learn that it no longer
// expires. A PeersChangedPatch cannot carry that (a zero KeyExpiry is
// omitted from its JSON), so they get the whole node.
func TestReauthAfterExpiryReachesPeers(t *testing.T) {
	tn := smallTailnet(nil, 2, 4, func(int) bool { return false }, "")
	f := newBenchFixture(t, tn)
	f.drainAll()
	ctx := context.Background()
	id, viewer := f.ids[1], f.ids[0]
	n := f.st.Node(id)
	if _, err := f.st.ExpireNode(ctx, id); err != nil {
		t.Fatal(err)
	}
	f.e.process(map[uint64]struct{}{id: {}}, false, false)
	var expiry *tailcfg.PeerChange
	for _, m := range collect(t, f.sessions[viewer]) {
		for _, pc := range m.PeersChangedPatch {
			if pc.NodeID == tailcfg.NodeID(id) && pc.KeyExpiry != nil {
				expiry = pc
			}
		}
	}
	if expiry == nil {
		t.Fatal("the peer was not told the node's key expired")
	}

	// The same client logs in again: same keys and Hostinfo, so only the
	// expiry changes.
	k := f.keys[keyOf(tn.nodes[1].user, tn.nodes[1].tags)]
	if _, err := f.st.Register(ctx, state.RegisterParams{MachineKey: n.MachineKey, NodeKey: n.NodeKey, AuthKey: k,
		Hostinfo: &tailcfg.Hostinfo{Hostname: "node1", OS: "linux"}}); err != nil {
		t.Fatal(err)
	}
	f.e.process(map[uint64]struct{}{id: {}}, false, false)
	cleared := false
	for _, m := range collect(t, f.sessions[viewer]) {
		for _, p := range m.PeersChanged {
			if p.ID == tailcfg.NodeID(id) && p.KeyExpiry.IsZero() {
				cleared = true
			}
		}
		for _, pc := range m.PeersChangedPatch {
			if pc.NodeID == tailcfg.NodeID(id) && pc.KeyExpiry != nil && pc.KeyExpiry.IsZero() {
				cleared = true
			}
		}
	}
	if !cleared {
		t.Error("the peer was not told that the node logged in again no longer expires")
	}
}
