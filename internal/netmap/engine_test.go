package netmap

import (
	"context"
	"fmt"
	"slices"
	"testing"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/state"
)

// TestJoinReachesOnlyViewers: under a scoped policy, a join reaches the
// sessions that see the new node or whose filter it changes, and no
// other: a tag:secret node only the tag:ops sessions, a user node only the
// user sessions (autogroup:member reaches autogroup:member, so their
// filters' source lists and peers change), never tag:ops.
func TestJoinReachesOnlyViewers(t *testing.T) {
	tn := benchTailnet{policy: scopedPolicy}
	for u := range 3 {
		tn.users = append(tn.users, fmt.Sprintf("user%d", u))
	}
	for i := range 60 {
		n := benchNode{user: i % 3}
		if i%10 == 7 {
			n = benchNode{user: 0, tags: []string{"tag:ops"}}
		}
		tn.nodes = append(tn.nodes, n)
	}
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
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		n    benchNode
		want map[uint64]bool
	}{
		{"tag:secret", benchNode{user: 0, tags: []string{"tag:secret"}}, ops},
		{"user node", benchNode{user: 1}, members},
	} {
		k, ok := f.keys[keyOf(tc.n.user, tc.n.tags)]
		if !ok {
			ks, err := f.st.CreateKeys(ctx, state.KeyParams{User: f.users[tc.n.user], Reusable: true, Tags: tc.n.tags}, 1)
			if err != nil {
				t.Fatal(err)
			}
			k = ks[0].Key
		}
		res, err := f.st.Register(ctx, state.RegisterParams{MachineKey: key.NewMachine().Public(), NodeKey: key.NewNode().Public(),
			AuthKey: k, Hostinfo: &tailcfg.Hostinfo{Hostname: "joiner"}})
		if err != nil {
			t.Fatal(err)
		}
		f.e.process(map[uint64]struct{}{res.Node.ID: {}}, false, false)
		checkReceivers(t, tc.name+" joins", f.drainAll(), tc.want, len(f.sessions))
	}
}
