package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/state"
	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/sqlite"
)

// fakeWatcher reports the replicas in gone as gone, and records what it
// was asked.
type fakeWatcher struct {
	gone  string
	mu    sync.Mutex
	asked []string
}

func (f *fakeWatcher) SetReplica(string) {}

func (f *fakeWatcher) Gone(_ context.Context, ids []string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.asked = slices.Sorted(slices.Values(ids))
	if slices.Contains(ids, f.gone) {
		return []string{f.gone}, nil
	}
	return nil, nil
}

// TestWatchReplicas: the watch asks about the holders of online nodes and
// hands the gone ones to adopt.
func TestWatchReplicas(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	db, err := sqlite.Open(filepath.Join(t.TempDir(), "tp.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	muts := []store.Mutation{{PutUser: &store.User{ID: 1, Name: "alice"}}}
	for i, h := range []struct {
		holder string
		online bool
	}{{"crashed", true}, {"running", true}, {"earlier", false}} {
		muts = append(muts, store.Mutation{CreateNode: &store.Node{
			ID: uint64(i + 1), MachineKey: key.NewMachine().Public().String(), NodeKey: key.NewNode().Public().String(),
			UserID: 1, GivenName: fmt.Sprint("n", i), IPv4: netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)}),
			Online: h.online, Holder: h.holder,
		}})
	}
	if _, err := db.Apply(ctx, muts); err != nil {
		t.Fatal(err)
	}
	st, err := state.New(ctx, state.Options{Store: db, V4Prefix: netip.MustParsePrefix("100.64.0.0/10"), V6Prefix: netip.MustParsePrefix("fd7a:115c:a1e0::/48")})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	w := &fakeWatcher{gone: "crashed"}
	adopted := make(chan map[string]bool, 1)
	go watchReplicas(ctx, w, st, func(gone map[string]bool) int {
		select {
		case adopted <- gone:
		default:
		}
		return 1
	}, 5*time.Millisecond, slog.Default())
	select {
	case gone := <-adopted:
		if len(gone) != 1 || !gone["crashed"] {
			t.Errorf("adopted the nodes of %v, want those of crashed", gone)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nothing adopted in 5 s")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !slices.Equal(w.asked, []string{"crashed", "running"}) {
		t.Errorf("asked about %v, want the holders of online nodes: [crashed running]", w.asked)
	}
}
