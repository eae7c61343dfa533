package control

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/state"
	"github.com/tailplane/tailplane/internal/store/sqlite"
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
