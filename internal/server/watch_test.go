package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/metrics"
	"github.com/tailplane/tailplane/internal/state"
	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/sqlite"
)

// fakeWatcher reports replica "crashed" as gone, and "blip" at its first
// check only; it records what it was asked and how often.
type fakeWatcher struct {
	mu    sync.Mutex
	asked []string
	calls int
}

func (f *fakeWatcher) SetReplica(string) {}

func (f *fakeWatcher) Gone(_ context.Context, ids []string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.asked = slices.Sorted(slices.Values(ids))
	gone := []string{"crashed"}
	if f.calls == 1 {
		gone = append(gone, "blip")
	}
	return gone, nil
}

// TestWatchReplicas: the watch of the leading replica asks about the
// holders of online nodes and hands those gone at two checks in a row to
// adopt; a replica that does not lead does nothing.
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
	}{{"crashed", true}, {"running", true}, {"blip", true}, {"earlier", false}} {
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
	w := &fakeWatcher{}
	adopted := make(chan map[string]bool, 1)
	calls := make(chan int, 1)
	var leading atomic.Bool
	go watchReplicas(ctx, w, leading.Load, st, func(gone map[string]bool) int {
		w.mu.Lock()
		n := w.calls
		w.mu.Unlock()
		select {
		case adopted <- gone:
			calls <- n
		default:
		}
		return 1
	}, 5*time.Millisecond, slog.Default())
	// Another replica leads: this one only waits for its turn.
	time.Sleep(50 * time.Millisecond)
	w.mu.Lock()
	if w.calls != 0 {
		t.Errorf("a replica that does not lead checked %d times", w.calls)
	}
	w.mu.Unlock()
	leading.Store(true)
	select {
	case gone := <-adopted:
		if len(gone) != 1 || !gone["crashed"] {
			t.Errorf("adopted the nodes of %v, want those of crashed (blip was gone at one check only)", gone)
		}
		if n := <-calls; n != 2 {
			t.Errorf("adopted after %d checks, want 2", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nothing adopted in 5 s")
	}
	if got := jobsLeader(t); got != 1 {
		t.Errorf("tailplane_jobs_leader = %v while leading, want 1", got)
	}
	leading.Store(false)
	for end := time.Now().Add(5 * time.Second); jobsLeader(t) != 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("tailplane_jobs_leader still 1 after the lead went to another replica")
		}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !slices.Equal(w.asked, []string{"blip", "crashed", "running"}) {
		t.Errorf("asked about %v, want the holders of online nodes: [blip crashed running]", w.asked)
	}
}

// jobsLeader reads the tailplane_jobs_leader gauge.
func jobsLeader(t *testing.T) float64 {
	t.Helper()
	var m dto.Metric
	if err := metrics.JobsLeader.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetGauge().GetValue()
}
