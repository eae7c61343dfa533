package state

import (
	"context"
	"errors"
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

// claimed allocates from a as a state would, claiming blocks as it needs
// them, with no other replica about.
func claimed(t *testing.T, a *ipAllocator, tagged bool) netip.Addr {
	t.Helper()
	for {
		v4, _, _, err := a.allocate(tagged)
		var need *errNeedBlock
		if !errors.As(err, &need) {
			if err != nil {
				t.Fatal(err)
			}
			return v4
		}
		n := need.c.next()
		need.c.hasWant = false
		need.c.observeNumber(n)
		need.c.gained(n, false)
	}
}

// TestFullLaneBorrowsTheOther: when a lane is exhausted its nodes get
// addresses from the other one rather than an error.
func TestFullLaneBorrowsTheOther(t *testing.T) {
	a, err := newIPAllocator(netip.MustParsePrefix("100.64.0.0/24"), netip.MustParsePrefix("fd7a:115c:a1e0::/48"), nil)
	if err != nil {
		t.Fatal(err)
	}
	var last netip.Addr
	for range 127 { // offsets 1..127: the untagged lane
		last = claimed(t, a, false)
	}
	if last.String() != "100.64.0.127" {
		t.Fatalf("last untagged address = %v, want 100.64.0.127", last)
	}
	if v4 := claimed(t, a, false); v4.String() != "100.64.0.129" {
		t.Fatalf("untagged node with its lane full: %v; want 100.64.0.129 from the tagged lane", v4)
	}
	for range 125 { // the rest of the tagged lane, but the last offset
		claimed(t, a, false)
	}
	if _, _, _, err := a.allocate(false); err == nil || errors.As(err, new(*errNeedBlock)) {
		t.Fatalf("allocation from a full prefix: %v, want exhausted", err)
	}
}

// TestLaneResumes: a lane continues at its stored cursor when its block
// was claimed, or no block ever was; else in a fresh block.
func TestLaneResumes(t *testing.T) {
	claim := claimPrefix + SettingNextIPv4 + "/"
	cursor := []byte("600") // in block 2
	for _, c := range []struct {
		name     string
		settings map[string][]byte
		off      uint32
		owned    bool // the block in use needs no claim
	}{
		{"before claims", map[string][]byte{SettingNextIPv4: cursor}, 600, false},
		{"in the newest block", map[string][]byte{SettingNextIPv4: cursor, claim + "2": []byte("p")}, 600, true},
		{"with the next claimed ahead", map[string][]byte{SettingNextIPv4: cursor, claim + "2": []byte("p"), claim + "3": []byte("p")}, 600, true},
		{"behind newer blocks", map[string][]byte{SettingNextIPv4: cursor, claim + "2": []byte("p"), claim + "5": []byte("q")}, 600, true},
		{"in a block never claimed", map[string][]byte{SettingNextIPv4: cursor, claim + "5": []byte("q"), claim + "6": []byte("q")}, 1 + 7*addrBlock, false},
	} {
		a, err := newIPAllocator(netip.MustParsePrefix("100.64.0.0/10"), netip.MustParsePrefix("fd7a:115c:a1e0::/48"), c.settings)
		if err != nil {
			t.Fatal(err)
		}
		owned := a.lanes[laneUntagged].claims.owned
		if v4 := claimed(t, a, false); v4 != offsetAddr(a.v4.Addr(), c.off) || owned != c.owned {
			t.Errorf("%s: got %v (block owned: %v), want offset %d (owned: %v)", c.name, v4, owned, c.off, c.owned)
		}
	}
}

// TestLaneResumesAfterWrap: in a lane that has wrapped round, the cursor's
// block is taken up under its newest claim, not the first generation's.
func TestLaneResumesAfterWrap(t *testing.T) {
	claim := claimPrefix + SettingNextIPv4 + "/"
	// A /24's untagged lane is one block: every claim maps to it.
	a, err := newIPAllocator(netip.MustParsePrefix("100.64.0.0/24"), netip.MustParsePrefix("fd7a:115c:a1e0::/48"),
		map[string][]byte{SettingNextIPv4: []byte("5"), claim + "0": []byte("p"), claim + "1": []byte("q")})
	if err != nil {
		t.Fatal(err)
	}
	if c := a.lanes[laneUntagged].claims; !c.owned || c.seq != 1 || c.hasAhead {
		t.Errorf("resumed under claim %d (owned %v, ahead %v), want 1 (owned, none ahead)", c.seq, c.owned, c.hasAhead)
	}
}

// offsetAddr returns a moved n addresses on.
func offsetAddr(a netip.Addr, n uint32) netip.Addr {
	for range n {
		a = a.Next()
	}
	return a
}
