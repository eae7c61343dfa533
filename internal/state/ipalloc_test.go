package state

import (
	"context"
	"net/netip"
	"testing"
)

// TestTaggedNodesGetTheirOwnLane: tagged and untagged nodes take addresses
// from separate halves of the prefix, each lane consecutive, and both
// cursors survive a restart.
func TestTaggedNodesGetTheirOwnLane(t *testing.T) {
	ctx := context.Background()
	db := openStore(t, t.TempDir())
	s := newState(t, db)
	if _, err := s.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	if err := s.SetPolicy(ctx, []byte(`{"tagOwners": {"tag:srv": ["alice@"]}}`)); err != nil {
		t.Fatal(err)
	}
	user := mustKey(t, s, KeyParams{User: "alice", Reusable: true})
	tagged := mustKey(t, s, KeyParams{User: "alice", Reusable: true, Tags: []string{"tag:srv"}})
	register := func(s *State, k string) netip.Addr {
		t.Helper()
		r, err := s.Register(ctx, params(k))
		if err != nil {
			t.Fatal(err)
		}
		return r.Node.IPv4
	}
	got := []netip.Addr{register(s, user), register(s, tagged), register(s, user), register(s, tagged)}
	s.Close()
	s = newState(t, db)
	defer s.Close()
	got = append(got, register(s, user), register(s, tagged))
	want := []string{"100.64.0.1", "100.96.0.1", "100.64.0.2", "100.96.0.2", "100.64.0.3", "100.96.0.3"}
	for i, w := range want {
		if got[i].String() != w {
			t.Fatalf("addresses in registration order (user, tagged, user, tagged, restart, user, tagged) = %v, want %v", got, want)
		}
	}
}

// TestFullLaneBorrowsTheOther: when a lane is exhausted its nodes get
// addresses from the other one rather than an error.
func TestFullLaneBorrowsTheOther(t *testing.T) {
	a, err := newIPAllocator(netip.MustParsePrefix("100.64.0.0/24"), netip.MustParsePrefix("fd7a:115c:a1e0::/48"), [2][]byte{})
	if err != nil {
		t.Fatal(err)
	}
	var last netip.Addr
	for range 127 { // offsets 1..127: the untagged lane
		if last, _, _, err = a.allocate(false); err != nil {
			t.Fatal(err)
		}
	}
	if last.String() != "100.64.0.127" {
		t.Fatalf("last untagged address = %v, want 100.64.0.127", last)
	}
	v4, _, set, err := a.allocate(false)
	if err != nil || v4.String() != "100.64.0.129" || set.Key != SettingNextIPv4Tagged {
		t.Fatalf("untagged node with its lane full: %v, cursor %q, err %v; want 100.64.0.129 from the tagged lane", v4, set.Key, err)
	}
}
