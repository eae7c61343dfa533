package state

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/sqlite"
)

// pollFollower lets two states in one process share a SQLite file as
// replicas: its change log, with the notifications a PostgreSQL store
// sends replaced by a short poll.
type pollFollower struct{ *sqlite.Store }

func (f pollFollower) Listen(ctx context.Context, fn func(int64)) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		fn(0)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// eventLog is a Sink that keeps every event.
type eventLog struct {
	mu  sync.Mutex
	evs []Event
}

func (l *eventLog) Notify(ev Event) {
	l.mu.Lock()
	l.evs = append(l.evs, ev)
	l.mu.Unlock()
}

func (l *eventLog) foreign() []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Event
	for _, ev := range l.evs {
		if ev.Foreign {
			out = append(out, ev)
		}
	}
	return out
}

// replica opens a state on the shared database file that follows the
// others, through the follower follow makes, until the test ends.
func replica(t *testing.T, path string, follow func(*sqlite.Store) Follower) (*State, *eventLog) {
	t.Helper()
	db, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s := newState(t, db)
	t.Cleanup(s.Close)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s.Follow(ctx, follow(db))
	l := &eventLog{}
	s.Subscribe(l)
	return s, l
}

// aliceNode registers a node of a new user alice on s and returns its id.
func aliceNode(t *testing.T, s *State) uint64 {
	t.Helper()
	if _, err := s.CreateUser(context.Background(), "alice", ""); err != nil {
		t.Fatal(err)
	}
	res, err := s.Register(context.Background(), params(mustKey(t, s, KeyParams{User: "alice"})))
	if err != nil {
		t.Fatal(err)
	}
	return res.Node.ID
}

// aliceOnTwo starts two replicas on one file that catch up only when
// told, registers a node of alice on the first and has the second follow.
func aliceOnTwo(t *testing.T) (a, b *State, id uint64) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "shared.db")
	a, _ = replica(t, path, manual)
	b, _ = replica(t, path, manual)
	id = aliceNode(t, a)
	catchUp(t, b)
	return a, b, id
}

// catchUp makes s follow what the others committed, now.
func catchUp(t *testing.T, s *State) {
	t.Helper()
	if err := s.CatchUp(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// polled follows by polling; manual only when CatchUp is called.
func polled(db *sqlite.Store) Follower { return pollFollower{db} }
func manual(db *sqlite.Store) Follower { return pokedFollower{db, make(chan struct{})} }

// eventually polls cond for up to 5 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestReplicasFollowEachOther(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "shared.db")
	a, aLog := replica(t, path, polled)
	b, bLog := replica(t, path, polled)

	if _, err := a.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b knows alice", func() bool { _, err := b.UserByName("alice"); return err == nil })
	// A key made on b admits a node on a.
	authKey := mustKey(t, b, KeyParams{User: "alice", Reusable: true})
	eventually(t, "a knows b's key", func() bool { return len(a.Keys()) == 1 })
	res, err := a.Register(ctx, params(authKey))
	if err != nil {
		t.Fatal(err)
	}
	id := res.Node.ID
	eventually(t, "b has a's node", func() bool { return b.Node(id) != nil })
	if !slices.Contains(bLog.foreign(), Event{Kind: NodeChanged, NodeID: id, Foreign: true}) {
		t.Errorf("b's sinks were not told of node %d: %v", id, bLog.foreign())
	}

	// Both replicas register at once from the same address cursor and id
	// counter: clashes are caught up with and retried, none overwrites.
	const each = 15
	var wg sync.WaitGroup
	var mu sync.Mutex
	created := map[*State][]uint64{a: {id}}
	for _, s := range []*State{a, b} {
		for range each {
			wg.Go(func() {
				res, err := s.Register(ctx, params(authKey))
				if err != nil {
					t.Errorf("concurrent registration: %v", err)
					return
				}
				mu.Lock()
				created[s] = append(created[s], res.Node.ID)
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	const total = 2*each + 1
	eventually(t, "both replicas hold every node", func() bool { return len(a.Nodes()) == total && len(b.Nodes()) == total })
	checkSameNodes(t, a, b)
	snap, err := a.commit.st.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Nodes) != total {
		t.Errorf("the store holds %d nodes, want %d", len(snap.Nodes), total)
	}

	// A one-off key is used once across replicas.
	once := mustKey(t, a, KeyParams{User: "alice"})
	eventually(t, "b knows the one-off key", func() bool { return len(b.Keys()) == 2 })
	var used, ok int
	results := make(chan error, 2)
	for _, s := range []*State{a, b} {
		go func() { _, err := s.Register(ctx, params(once)); results <- err }()
	}
	for range 2 {
		switch err := <-results; {
		case err == nil:
			ok++
		case errors.Is(err, ErrKeyUsed) || errors.Is(err, store.ErrConflict):
			used++
		default:
			t.Errorf("one-off key on two replicas: %v", err)
		}
	}
	if ok != 1 || used != 1 {
		t.Errorf("one-off key on two replicas: %d admitted, %d refused; want 1 and 1", ok, used)
	}

	// A policy set on one replica is active on the other; a node deleted
	// on one leaves the other.
	pol := []byte(`{"acls": [{"action": "accept", "src": ["alice@"], "dst": ["alice@:22"]}]}`)
	if err := b.SetPolicy(ctx, pol); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a enforces b's policy", func() bool { _, text := a.Policy(); return string(text) == string(pol) })
	if !slices.Contains(aLog.foreign(), Event{Kind: PolicyChanged, Foreign: true}) {
		t.Error("a's sinks were not told of b's policy")
	}
	if err := b.DeleteNode(ctx, id); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a dropped the node b deleted", func() bool { return a.Node(id) == nil })

	// A replica is not told its own changes back as another's (b's
	// deletion of node id aside).
	for s, l := range map[*State]*eventLog{a: aLog, b: bLog} {
		for _, ev := range l.foreign() {
			if ev.Kind == NodeChanged && slices.Contains(created[s], ev.NodeID) && !(s == a && ev.NodeID == id) {
				t.Errorf("node %d came back to the replica that created it as another's change", ev.NodeID)
			}
		}
	}
}

// checkSameNodes checks that two replicas hold the same nodes, with unique
// addresses and names.
func checkSameNodes(t *testing.T, a, b *State) {
	t.Helper()
	seen := map[string]uint64{}
	bn := b.Nodes()
	for i, n := range a.Nodes() {
		m := bn[i]
		if n.ID != m.ID || n.IPv4 != m.IPv4 || n.IPv6 != m.IPv6 || n.GivenName != m.GivenName || n.NodeKey != m.NodeKey {
			t.Errorf("replicas differ on node %d: %+v vs %+v", n.ID, n, m)
		}
		for _, k := range []string{n.IPv4.String(), n.IPv6.String(), "name " + n.GivenName} {
			if other, dup := seen[k]; dup {
				t.Errorf("nodes %d and %d share %s", other, n.ID, k)
			}
			seen[k] = n.ID
		}
	}
	if t.Failed() {
		t.Log(fmt.Sprint(len(a.Nodes()), " nodes"))
	}
}

// pokedFollower follows a SQLite file when the test pokes it.
type pokedFollower struct {
	*sqlite.Store
	poke chan struct{}
}

func (f pokedFollower) Listen(ctx context.Context, fn func(int64)) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-f.poke:
			fn(0)
		}
	}
}

// pokedReplica opens a state on a new shared database file that follows
// the change log only when poked, and returns the file, the follower and
// the channel that reports why following stopped.
func pokedReplica(t *testing.T) (string, pokedFollower, <-chan error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "shared.db")
	db, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s := newState(t, db)
	t.Cleanup(s.Close)
	f := pokedFollower{db, make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return path, f, s.Follow(ctx, f)
}

// TestFollowerBehindPrunedLog: a replica that has yet to read entries the
// change log no longer holds stops following and says it must reload.
func TestFollowerBehindPrunedLog(t *testing.T) {
	ctx := context.Background()
	path, f, fatal := pokedReplica(t)

	// Another replica commits twice; the log is pruned before this one
	// reads either.
	other, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	for _, name := range []string{"u1", "u2"} {
		if _, err := other.Apply(ctx, []store.Mutation{{PutSetting: &store.Setting{Key: name, Value: []byte{1}}}}); err != nil {
			t.Fatal(err)
		}
	}
	if n, err := other.PruneChanges(ctx, time.Now().Add(time.Second)); err != nil || n != 1 {
		t.Fatalf("PruneChanges = %d, %v; want 1 (the newest stays)", n, err)
	}
	f.poke <- struct{}{}
	select {
	case err := <-fatal:
		if !errors.Is(err, store.ErrPruned) || !strings.Contains(err.Error(), "must restart") {
			t.Errorf("follower stopped with %v, want store.ErrPruned and a word on restarting", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the follower went on past a pruned change log")
	}
}

// TestNewerOwnWriteStands: two replicas rename one node at nearly the same
// time, each before following the other's rename. The log's later rename
// wins on both: the replica that wrote it does not put the other's older
// one over it when it catches up.
func TestNewerOwnWriteStands(t *testing.T) {
	ctx := context.Background()
	a, b, id := aliceOnTwo(t)
	if _, err := b.RenameNode(ctx, id, "from-b"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RenameNode(ctx, id, "from-a"); err != nil {
		t.Fatal(err)
	}
	catchUp(t, a)
	catchUp(t, b)
	snap, err := a.commit.st.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for name, got := range map[string]string{"a": a.Node(id).GivenName, "b": b.Node(id).GivenName, "store": snap.Nodes[0].GivenName} {
		if got != "from-a" {
			t.Errorf("%s has the node named %q, want the later rename, from-a", name, got)
		}
	}
}

// TestOwnWritesRewind checks the bookkeeping behind following: a row being
// written or written later hides another replica's entry for it, and a
// failed write makes the follower read the entries it hid again.
func TestOwnWritesRewind(t *testing.T) {
	var o ownWrites
	o.start()
	node := []store.Mutation{{DeleteNode: 7}}
	r := row{kind: 'n', id: 7}
	o.pend(node)
	if !o.newer(r, 5) || !o.newer(r, 6) {
		t.Fatal("a pending write does not hide other replicas' entries")
	}
	o.unpend(node, true)
	if got := o.takeRedo(); got[r] != 5 || len(got) != 1 {
		t.Errorf("after a failed write, redo %v, want the node's entries from 5 (the first hidden)", got)
	}
	if o.newer(r, 8) {
		t.Error("a failed write still hides entries")
	}
	o.pend(node)
	o.newer(r, 9)
	o.committed(12, node)
	o.unpend(node, false)
	if got := o.takeRedo(); got != nil {
		t.Errorf("after a committed write, redo %v, want none", got)
	}
	if !o.newer(r, 11) || o.newer(r, 13) {
		t.Error("a committed write must hide older entries only")
	}
	if own := o.take(12); !own[12] || !o.newer(r, 11) {
		t.Errorf("take(12) = %v; entry 12 must still hide 11 until the follower passed it", own)
	}
	if o.passed(12); o.newer(r, 11) {
		t.Error("an own write passed by the follower still hides entries")
	}
}

// TestReplicasAgreeOnNewSettings: replicas starting together on an empty
// database each make a server key; all of them end with the one stored
// first.
func TestReplicasAgreeOnNewSettings(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "shared.db")
	var states []*State
	for range 3 {
		// Following by hand: only the conflict makes them catch up.
		s, _ := replica(t, path, manual)
		states = append(states, s)
	}
	got := make([]string, len(states))
	var wg sync.WaitGroup
	for i, s := range states {
		wg.Go(func() {
			v, err := s.SettingOrCreate(ctx, "server_key", func() ([]byte, error) { return []byte(fmt.Sprint("key-", i)), nil })
			if err != nil {
				t.Errorf("replica %d: %v", i, err)
			}
			got[i] = string(v)
		})
	}
	wg.Wait()
	snap, err := states[0].commit.st.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stored := string(snap.Settings["server_key"])
	for i, v := range got {
		if v != stored || string(states[i].Setting("server_key")) != stored {
			t.Errorf("replica %d uses %q (memory %q), the store holds %q", i, v, states[i].Setting("server_key"), stored)
		}
	}
}

// TestOnlineAgainIsWrittenNotPublished: among replicas a node coming online
// that is already marked online is written, with its last-seen time, for
// the replica it may have left; this replica's memory and peers see no
// new version of it.
func TestOnlineAgainIsWrittenNotPublished(t *testing.T) {
	ctx := context.Background()
	s, log := replica(t, filepath.Join(t.TempDir(), "shared.db"), manual)
	id := aliceNode(t, s)
	s.SetOnline(id, true)
	before := s.Node(id)
	log.mu.Lock()
	events := len(log.evs)
	log.mu.Unlock()
	time.Sleep(10 * time.Millisecond) // a later last-seen time
	s.SetOnline(id, true)
	storedLastSeen := func() time.Time {
		snap, err := s.commit.st.Load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return snap.Nodes[0].LastSeen
	}
	eventually(t, "the reconnect is written", func() bool { return storedLastSeen().After(before.LastSeen) })
	log.mu.Lock()
	defer log.mu.Unlock()
	if s.Node(id) != before || len(log.evs) != events {
		t.Errorf("the reconnect made a new version of the node (%v) or events (%v)", s.Node(id) != before, log.evs[events:])
	}
}

// TestKeyFromAnotherReplica: a key made on one replica admits a node on
// another at once, before that one has followed the change; a key no
// replica made is still refused.
func TestKeyFromAnotherReplica(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "shared.db")
	a, _ := replica(t, path, manual)
	b, _ := replica(t, path, manual)
	aliceNode(t, a) // named box, like the next
	k := mustKey(t, a, KeyParams{User: "alice"})
	res, err := b.Register(ctx, params(k))
	if err != nil {
		t.Fatalf("a key made on another replica: %v", err)
	}
	// No clash happened: the name is the next in line, not a random one.
	if res.Node.GivenName != "box-2" {
		t.Errorf("the node is named %q, want box-2", res.Node.GivenName)
	}
	unknown := k[:len(KeyPrefix)] + "0000000000000000" + k[len(KeyPrefix)+16:]
	if _, err := b.Register(ctx, params(unknown)); !errors.Is(err, ErrKeyInvalid) {
		t.Errorf("a key no replica made: %v, want ErrKeyInvalid", err)
	}
}

// TestDeletedNodeStaysDeleted: a replica that writes a node's soft state
// while another deletes it does not bring the node back.
func TestDeletedNodeStaysDeleted(t *testing.T) {
	ctx := context.Background()
	a, b, id := aliceOnTwo(t)
	if err := b.DeleteNode(ctx, id); err != nil {
		t.Fatal(err)
	}
	// a has not followed the deletion when its client reports endpoints.
	a.UpdateFromClient(id, ClientUpdate{Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")}})
	time.Sleep(50 * time.Millisecond) // the soft-state write is queued, not awaited
	catchUp(t, a)
	snap, err := a.commit.st.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(snap.Nodes) != 0 || a.Node(id) != nil {
		t.Errorf("the deleted node is back: %d in the store, in a's memory: %v", len(snap.Nodes), a.Node(id) != nil)
	}
}

// TestEditsOfOneNodeOnTwoReplicasMerge: an admin change on one replica and
// the node's client reporting to another at the same moment both stand,
// in memory and in the store, whichever commits first: each writes only
// its part of the node (store.NodePart).
func TestEditsOfOneNodeOnTwoReplicasMerge(t *testing.T) {
	ctx := context.Background()
	a, b, id := aliceOnTwo(t)
	endpoints := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")}
	stored := func() store.Node {
		snap, err := a.commit.st.Load(ctx)
		if err != nil || len(snap.Nodes) != 1 {
			t.Fatalf("Load: %d nodes, %v", len(snap.Nodes), err)
		}
		return snap.Nodes[0]
	}

	// b has not followed a's rename when the client reports to it.
	if _, err := a.RenameNode(ctx, id, "renamed-on-a"); err != nil {
		t.Fatal(err)
	}
	b.UpdateFromClient(id, ClientUpdate{Endpoints: endpoints})
	eventually(t, "b's soft-state write reaches the store", func() bool { return len(stored().Endpoints) == 1 })
	if name := stored().GivenName; name != "renamed-on-a" {
		t.Errorf("after b's soft-state write the store has the node named %q, want renamed-on-a", name)
	}
	// Nor has a followed that report when it tags the node.
	if _, err := a.TagNode(ctx, id, []string{"tag:server"}); err != nil {
		t.Fatal(err)
	}
	catchUp(t, a)
	catchUp(t, b)

	sn := stored()
	for name, n := range map[string]*Node{"a": a.Node(id), "b": b.Node(id), "the store": {GivenName: sn.GivenName, Tags: sn.Tags, Endpoints: sn.Endpoints}} {
		if n.GivenName != "renamed-on-a" || !slices.Equal(n.Tags, []string{"tag:server"}) || !slices.Equal(n.Endpoints, endpoints) {
			t.Errorf("%s has name %q, tags %v, endpoints %v; want every edit: renamed-on-a, [tag:server], %v",
				name, n.GivenName, n.Tags, n.Endpoints, endpoints)
		}
	}
}

// TestNameClashRetriesAtTheNodesID: two replicas naming nodes of one
// hostname at once give both the same next name; the one that loses the
// clash retries from its node's id, which no other replica gives out.
func TestNameClashRetriesAtTheNodesID(t *testing.T) {
	ctx := context.Background()
	a, b, _ := aliceOnTwo(t) // alice's first node is "box" on both
	k := mustKey(t, a, KeyParams{User: "alice", Reusable: true})
	catchUp(t, b)
	first, err := a.Register(ctx, params(k))
	if err != nil {
		t.Fatal(err)
	}
	// b has not followed a's registration of box-2.
	second, err := b.Register(ctx, params(k))
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("box-%d", second.Node.ID)
	if first.Node.GivenName != "box-2" || second.Node.GivenName != want {
		t.Errorf("names %q and %q, want box-2 and, after the clash, %q", first.Node.GivenName, second.Node.GivenName, want)
	}
}

// TestNewerChangeStopsTheFollower: a change-log entry this version cannot
// apply (a kind of mutation it does not know, written by a newer replica)
// stops the follower with an error asking for an upgrade, rather than
// being skipped while this replica serves a tailnet it no longer follows.
func TestNewerChangeStopsTheFollower(t *testing.T) {
	path, f, fatal := pokedReplica(t)

	// A newer replica appends an entry of a kind this version lacks.
	raw, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, err := raw.Exec("INSERT INTO changes (at, payload) VALUES (?, ?)", time.Now().UTC(),
		`[{"RenameTailnet":{"Name":"newer"}}]`); err != nil {
		t.Fatal(err)
	}
	f.poke <- struct{}{}
	select {
	case err := <-fatal:
		if !errors.Is(err, store.ErrNewerChange) || !strings.Contains(err.Error(), "upgrade this replica") {
			t.Errorf("follower stopped with %v, want store.ErrNewerChange and a word on upgrading", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the follower went on past a change it cannot apply")
	}
}
