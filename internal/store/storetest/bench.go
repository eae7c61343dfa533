package storetest

import (
	"context"
	"fmt"
	"testing"

	"github.com/tailplane/tailplane/internal/store"
)

// BenchmarkApplyBatch measures Apply with batches of 1 and 64 new nodes.
// Every Apply is one durable commit, so the gap between the two sizes per
// mutation is what group commit (batching concurrent changes into one
// Apply) saves. It reports mutations per second as muts/s.
func BenchmarkApplyBatch(b *testing.B, open Opener) {
	for _, size := range []int{1, 64} {
		b.Run(fmt.Sprintf("size=%d", size), func(b *testing.B) {
			s := openStore(b, open)
			apply(b, s, store.Mutation{PutUser: User(1)})
			ctx := context.Background()
			next, ops := uint64(1), 0
			muts := make([]store.Mutation, size)
			for b.Loop() {
				for i := range muts {
					muts[i] = store.Mutation{PutNode: Node(next, 1)}
					next++
				}
				if _, err := s.Apply(ctx, muts); err != nil {
					b.Fatal(err)
				}
				ops++
			}
			b.ReportMetric(float64(ops*size)/b.Elapsed().Seconds(), "muts/s")
		})
	}
}
