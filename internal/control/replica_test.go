package control

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/state"
	"github.com/tailplane/tailplane/internal/store/sqlite"
	"github.com/tailplane/tailplane/internal/testclient"
)

// pollFollower follows a SQLite file other test servers write, polling in
// place of PostgreSQL's notifications.
type pollFollower struct{ *sqlite.Store }

func (f pollFollower) Listen(ctx context.Context, fn func(int64)) error {
	for {
		fn(0)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// newReplica runs a test server on the shared database at path that
// follows the other replicas there.
func newReplica(t *testing.T, path string, noise key.MachinePrivate, opts ...func(*Options)) *testServer {
	t.Helper()
	ts := newTestServerAt(t, path, noise, opts...)
	db, err := sqlite.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); db.Close() })
	ts.st.Follow(ctx, pollFollower{db})
	return ts
}

// TestNodeMovesToAnotherReplica: an ephemeral node whose stream ends on
// replica a and resumes on replica b within a's grace is b's now: a's
// timers must neither mark it offline nor delete it.
func TestNodeMovesToAnotherReplica(t *testing.T) {
	const grace, ephemeral = 200 * time.Millisecond, 400 * time.Millisecond
	path := filepath.Join(t.TempDir(), "shared.db")
	noise := key.NewMachine()
	timers := func(o *Options) { o.OfflineGrace, o.EphemeralTimeout = grace, ephemeral }
	a := newReplica(t, path, noise, timers)
	b := newReplica(t, path, noise, timers)
	ctx := context.Background()
	if _, err := a.st.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	ks, err := a.st.CreateKeys(ctx, state.KeyParams{User: "alice", Ephemeral: true}, 1)
	if err != nil {
		t.Fatal(err)
	}
	c := join(t, a, ks[0].Key, "roamer")
	id := a.st.NodeByKey(c.Node.Public()).ID
	s, err := c.Map(ctx)
	if err != nil {
		t.Fatal(err)
	}
	fullMap(t, s)
	waitFor(t, func() bool { n := b.st.Node(id); return n != nil && n.Online })

	// The stream ends on a; the client reconnects to b.
	s.Close()
	waitFor(t, func() bool { return !a.eng.Connected(id) })
	c.URL = b.url
	if err := c.Dial(ctx); err != nil {
		t.Fatal(err)
	}
	s, err = c.Map(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	fullMap(t, s)

	time.Sleep(2 * ephemeral) // past both of a's timers
	for name, ts := range map[string]*testServer{"a": a, "b": b} {
		if n := ts.st.Node(id); n == nil || !n.Online {
			t.Errorf("replica %s: the node connected to b is %+v, want it online", name, n)
		}
	}
}

// TestCrashedReplicasNodesAreAdopted: the nodes a replica held when it
// stopped without marking them offline are marked offline by another one
// after the restart grace, and its ephemeral ones deleted; a node whose
// stream is still open on the replica taken for gone is marked online
// again there.
func TestCrashedReplicasNodesAreAdopted(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shared.db")
	noise := key.NewMachine()
	// a's own timers would act only after the test: its nodes' presence
	// is left as a crash leaves it.
	a := newReplica(t, path, noise, func(o *Options) { o.OfflineGrace, o.EphemeralTimeout = time.Hour, time.Hour })
	b := newReplica(t, path, noise, func(o *Options) {
		o.RestartGrace, o.EphemeralTimeout = 100*time.Millisecond, 100*time.Millisecond
	})
	ctx := context.Background()
	if _, err := a.st.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	ks, err := a.st.CreateKeys(ctx, state.KeyParams{User: "alice", Ephemeral: true, Reusable: true}, 1)
	if err != nil {
		t.Fatal(err)
	}
	var ids [2]uint64
	var streams [2]*testclient.Stream
	for i, host := range []string{"orphan", "alive"} {
		c := join(t, a, ks[0].Key, host)
		ids[i] = a.st.NodeByKey(c.Node.Public()).ID
		s, err := c.Map(ctx)
		if err != nil {
			t.Fatal(err)
		}
		fullMap(t, s)
		streams[i] = s
	}
	defer streams[1].Close()
	orphan, alive := ids[0], ids[1]
	streams[0].Close()
	waitFor(t, func() bool { return !a.eng.Connected(orphan) })
	waitFor(t, func() bool {
		for _, id := range ids {
			if n := b.st.Node(id); n == nil || !n.Online || n.Holder != a.st.Owner() {
				return false
			}
		}
		return true
	})

	if n := b.srv.AdoptOrphans(map[string]bool{a.st.Owner(): true}); n != 2 {
		t.Fatalf("adopted %d nodes, want 2", n)
	}
	if n := b.srv.AdoptOrphans(map[string]bool{a.st.Owner(): true}); n != 0 {
		t.Errorf("adopted %d nodes again, want 0 (taken over already)", n)
	}
	waitFor(t, func() bool { return a.st.Node(orphan) == nil && b.st.Node(orphan) == nil })
	// b marks the alive node offline after the grace; a, whose stream
	// for it is open, marks it online again.
	time.Sleep(300 * time.Millisecond)
	for _, ts := range []*testServer{a, b} {
		waitFor(t, func() bool { n := ts.st.Node(alive); return n != nil && n.Online && n.Holder == a.st.Owner() })
	}
}
