package state

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/sqlite"
)

// clashCounter counts the transactions a store refused: in clashes those
// that create a node and claim no block (registrations: a group commit
// holding a lost claim is refused whole, and its registrations are then
// tried one by one), in lost those that claim a block.
type clashCounter struct {
	store.Store
	clashes, lost *atomic.Int64
}

func (c clashCounter) Apply(ctx context.Context, muts []store.Mutation) (int64, error) {
	seq, err := c.Store.Apply(ctx, muts)
	if errors.Is(err, store.ErrConflict) {
		switch {
		case slices.ContainsFunc(muts, func(m store.Mutation) bool { return m.CreateSetting != nil }):
			c.lost.Add(1)
		case slices.ContainsFunc(muts, func(m store.Mutation) bool { return m.CreateNode != nil }):
			c.clashes.Add(1)
		}
	}
	return seq, err
}

// countedReplica is a replica on the shared database file whose refused
// transactions are counted (clashCounter).
func countedReplica(t *testing.T, path string, clashes, lost *atomic.Int64) *State {
	t.Helper()
	db, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s := newState(t, clashCounter{db, clashes, lost})
	t.Cleanup(s.Close)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s.Follow(ctx, pollFollower{db})
	return s
}

// registerNamed registers n nodes named prefix0.. on s, concurrently, and
// returns them.
func registerNamed(t *testing.T, s *State, key, prefix string, n int) []*Node {
	t.Helper()
	out := make([]*Node, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			p := params(key)
			p.Hostinfo.Hostname = fmt.Sprintf("%s%d", prefix, i)
			r, err := s.Register(context.Background(), p)
			if err != nil {
				t.Error(err)
				return
			}
			out[i] = r.Node
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return out
}

// inOwnBlocks checks that nodes, registered on one replica after its
// first, have ids in one block and consecutive addresses, and returns the
// id block.
func inOwnBlocks(t *testing.T, who string, nodes []*Node) uint64 {
	t.Helper()
	block := (nodes[0].ID - 1) / idBlock
	addrs := make([]netip.Addr, len(nodes))
	for i, n := range nodes {
		if (n.ID-1)/idBlock != block {
			t.Errorf("%s: node ids %d and %d are in different blocks", who, nodes[0].ID, n.ID)
		}
		addrs[i] = n.IPv4
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	for i := 1; i < len(addrs); i++ {
		if addrs[i-1].Next() != addrs[i] {
			t.Errorf("%s: addresses not consecutive: %v", who, addrs)
			break
		}
	}
	return block
}

// TestReplicasAllocateInOwnBlocks: replicas registering at the same time
// never clash, and each one's nodes are consecutive in ids and addresses.
// With one shared cursor, they picked the same next id and address again
// and again.
func TestReplicasAllocateInOwnBlocks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tp.db")
	var clashes, lost atomic.Int64
	a := countedReplica(t, path, &clashes, &lost)
	b := countedReplica(t, path, &clashes, &lost)
	first := a.Node(aliceNode(t, a))
	key := mustKey(t, a, KeyParams{User: "alice", Reusable: true})
	for _, k := range []string{claimPrefix + "node_id/1", claimPrefix + SettingNextIPv4 + "/1"} {
		eventually(t, "a claims "+k+" ahead", func() bool { return a.Setting(k) != nil })
	}
	catchUp(t, b)
	// b has seen a's claims: its own take the next numbers at once.
	warm := registerNamed(t, b, key, "warm", 1)
	if n := lost.Load(); n != 0 {
		t.Errorf("%d claims lost by a replica that had followed the other's, want none", n)
	}

	const n = 30
	var onA, onB []*Node
	var wg sync.WaitGroup
	wg.Go(func() { onA = registerNamed(t, a, key, "a", n) })
	wg.Go(func() { onB = append(registerNamed(t, b, key, "b", n), warm...) })
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	if c := clashes.Load(); c != 0 {
		t.Errorf("%d registrations refused for a clash, want none", c)
	}
	catchUp(t, a)
	catchUp(t, b)
	if inOwnBlocks(t, "first replica", append(onA, first)) == inOwnBlocks(t, "second replica", onB) {
		t.Errorf("both replicas allocated ids from one block")
	}
	checkSameNodes(t, a, b)
}

// secondReplica starts replica a with a node of alice and a reusable key
// of hers, then replica b on the same file; both catch up only when told.
func secondReplica(t *testing.T) (a, b *State, key string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tp.db")
	a, _ = replica(t, path, manual)
	aliceNode(t, a)
	key = mustKey(t, a, KeyParams{User: "alice", Reusable: true})
	b, _ = replica(t, path, manual)
	return a, b, key
}

// TestStartOwnRanges: a replica started beside a running one leaves the
// blocks the stored cursors point at, which the running one fills.
func TestStartOwnRanges(t *testing.T) {
	a, b, key := secondReplica(t)
	b.StartOwnRanges()
	nb := registerNamed(t, b, key, "b", 1)[0]
	na := registerNamed(t, a, key, "a", 1)[0]
	if na.ID != 2 || na.IPv4.String() != "100.64.0.2" {
		t.Errorf("running replica's next node: id %d, %v; want 2, 100.64.0.2", na.ID, na.IPv4)
	}
	if nb.ID <= idBlock || !netip.MustParsePrefix("100.64.1.0/24").Addr().Less(nb.IPv4) {
		t.Errorf("new replica's first node: id %d, %v; want one past the first blocks (id %d, 100.64.1.0)", nb.ID, nb.IPv4, idBlock)
	}
}

// span returns the smallest and largest id and address of nodes.
func span(nodes []*Node) (ids [2]uint64, v4 [2]netip.Addr) {
	idList := make([]uint64, len(nodes))
	addrs := make([]netip.Addr, len(nodes))
	for i, n := range nodes {
		idList[i], addrs[i] = n.ID, n.IPv4
	}
	return [2]uint64{slices.Min(idList), slices.Max(idList)},
		[2]netip.Addr{slices.MinFunc(addrs, netip.Addr.Compare), slices.MaxFunc(addrs, netip.Addr.Compare)}
}

// TestFullBlockMovesOn: a replica that fills its block of ids and of
// addresses continues in the next ones, claimed ahead, and across a
// restart.
func TestFullBlockMovesOn(t *testing.T) {
	db := openStore(t, t.TempDir())
	s := newState(t, db)
	aliceNode(t, s)
	// The blocks after the first are claimed ahead, not when needed.
	for _, k := range []string{claimPrefix + "node_id/1", claimPrefix + SettingNextIPv4 + "/1"} {
		eventually(t, "the state claims "+k, func() bool { return s.Setting(k) != nil })
	}
	key := mustKey(t, s, KeyParams{User: "alice", Reusable: true})
	nodes := registerNamed(t, s, key, "n", addrBlock)
	ids, v4 := span(nodes)
	// Address offsets start at 1, ids at 1: the block of offsets 1-256
	// holds addresses up to 100.64.1.0, that of ids 1-256 ids up to 256.
	if ids != [2]uint64{2, addrBlock + 1} || v4[0].String() != "100.64.0.2" || v4[1].String() != "100.64.1.1" {
		t.Errorf("nodes over a block's end: ids %v, addresses %v", ids, v4)
	}
	s.Close()
	s = newState(t, db)
	defer s.Close()
	n := registerNamed(t, s, key, "after", 1)[0]
	if n.ID != addrBlock+2 || n.IPv4.String() != "100.64.1.2" {
		t.Errorf("after a restart: id %d, %v; want %d, 100.64.1.2", n.ID, n.IPv4, addrBlock+2)
	}
}

// TestSharedBlockIsLeft: a replica that sees another create a node in its
// block (both took it up at start, each thinking itself alone) leaves it.
func TestSharedBlockIsLeft(t *testing.T) {
	a, b, key := secondReplica(t)
	if nb := registerNamed(t, b, key, "b", 1)[0]; nb.ID != 2 {
		t.Fatalf("second replica's node has id %d, want 2 (it took up the stored cursor's block)", nb.ID)
	}
	catchUp(t, a)
	na := registerNamed(t, a, key, "a", 1)[0]
	if na.ID <= idBlock || !netip.MustParsePrefix("100.64.1.0/24").Addr().Less(na.IPv4) {
		t.Errorf("first replica's node after the other's: id %d, %v; want one past the first blocks (id %d, 100.64.1.0)", na.ID, na.IPv4, idBlock)
	}
}

// TestAheadAfterFullBlock: a block claimed ahead after the block in use
// ran full is used, by ids and addresses alike.
func TestAheadAfterFullBlock(t *testing.T) {
	ids := newIDAllocator(1, nil)
	ids.claims.hasWant = false
	ids.claims.gained(3, true)
	if id, err := ids.allocate(func(uint64) bool { return false }); err != nil || id != 3*idBlock+1 {
		t.Errorf("id from the block claimed ahead: %d, %v; want %d", id, err, 3*idBlock+1)
	}
	a, err := newIPAllocator(netip.MustParsePrefix("100.64.0.0/10"), netip.MustParsePrefix("fd7a:115c:a1e0::/48"), nil)
	if err != nil {
		t.Fatal(err)
	}
	c := &a.lanes[laneUntagged].claims
	c.hasWant = false
	c.gained(3, true)
	if v4, _, _, err := a.allocate(false); err != nil || v4.String() != "100.64.3.1" {
		t.Errorf("address from the block claimed ahead: %v, %v; want 100.64.3.1", v4, err)
	}
}
