package state

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/postgres"
	"github.com/tailplane/tailplane/internal/store/postgres/pgtest"
)

// conflictCounter counts the transactions a store refused with ErrConflict.
type conflictCounter struct {
	store.Store
	applies, conflicts *atomic.Int64
}

func (c conflictCounter) Apply(ctx context.Context, m []store.Mutation) (int64, error) {
	c.applies.Add(1)
	seq, err := c.Store.Apply(ctx, m)
	if errors.Is(err, store.ErrConflict) {
		c.conflicts.Add(1)
	}
	return seq, err
}

// BenchmarkRegisterReplicas registers b.N nodes, 64 at a time, on one
// PostgreSQL database through one replica or spread over two, each node
// with a hostname of its own as in a fleet. Replicas allocate ids and
// addresses in blocks of their own; conflicts/op counts the transactions
// refused for a clash, applies/op all transactions (group commits and
// their retries).
func BenchmarkRegisterReplicas(b *testing.B) {
	for _, n := range []int{1, 2} {
		b.Run(map[int]string{1: "replicas=1", 2: "replicas=2"}[n], func(b *testing.B) {
			ctx := context.Background()
			dsn := pgtest.NewSchemaDSN(b)
			var applies, conflicts atomic.Int64
			var states []*State
			for range n {
				db, err := postgres.Open(ctx, dsn)
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { db.Close() })
				s, err := New(ctx, Options{Store: conflictCounter{db, &applies, &conflicts},
					V4Prefix: netip.MustParsePrefix("100.64.0.0/10"), V6Prefix: netip.MustParsePrefix("fd7a:115c:a1e0::/48")})
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(s.Close)
				fctx, cancel := context.WithCancel(ctx)
				b.Cleanup(cancel)
				s.Follow(fctx, db)
				states = append(states, s)
			}
			if _, err := states[0].CreateUser(ctx, "alice", ""); err != nil {
				b.Fatal(err)
			}
			key := mustKey(b, states[0], KeyParams{User: "alice", Reusable: true})
			for _, s := range states {
				for len(s.Keys()) == 0 {
					if err := s.CatchUp(ctx); err != nil {
						b.Fatal(err)
					}
				}
			}
			applies.Store(0)
			work := make(chan int)
			var wg sync.WaitGroup
			var failed atomic.Int64
			var lastErr atomic.Value
			b.ResetTimer()
			for w := range 64 {
				s := states[w%n]
				wg.Go(func() {
					for i := range work {
						p := params(key)
						p.Hostinfo.Hostname = fmt.Sprintf("host%d", i)
						if _, err := s.Register(ctx, p); err != nil {
							failed.Add(1)
							lastErr.Store(err.Error())
						}
					}
				})
			}
			for i := 0; i < b.N; i++ {
				work <- i
			}
			close(work)
			wg.Wait()
			b.StopTimer()
			if f := failed.Load(); f > 0 {
				b.Errorf("%d of %d registrations failed, the last: %v", f, b.N, lastErr.Load())
			}
			// Runs of consecutive addresses, each a range in source
			// lists: a replica's full blocks side by side make one, its
			// block in use and a left one another each.
			if err := states[0].CatchUp(ctx); err != nil {
				b.Fatal(err)
			}
			var v4 []netip.Addr
			for _, nd := range states[0].Nodes() {
				v4 = append(v4, nd.IPv4)
			}
			slices.SortFunc(v4, netip.Addr.Compare)
			runs := 0
			for i, a := range v4 {
				if i == 0 || v4[i-1].Next() != a {
					runs++
				}
			}
			b.ReportMetric(float64(runs), "v4-runs")
			b.ReportMetric(float64(conflicts.Load())/float64(b.N), "conflicts/op")
			b.ReportMetric(float64(applies.Load())/float64(b.N), "applies/op")
		})
	}
}
