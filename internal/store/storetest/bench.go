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

// BenchmarkApplyPresence measures Apply with batches of 64 presence
// writes (a node coming online, as in a reconnect storm), written as the
// whole row (UpdateNode) and as the client part only (PatchNode). It
// reports mutations per second as muts/s.
func BenchmarkApplyPresence(b *testing.B, open Opener) {
	const nodes, size = 512, 64
	for _, kind := range []string{"update", "patch"} {
		b.Run("write="+kind, func(b *testing.B) {
			s := openStore(b, open)
			muts := []store.Mutation{{PutUser: User(1)}}
			for id := uint64(1); id <= nodes; id++ {
				n := Node(id, 1)
				n.Hostinfo = []byte(`{"OS":"linux","Hostname":"host","IPNVersion":"1.102.5","NetInfo":{"PreferredDERP":1}}`)
				muts = append(muts, store.Mutation{CreateNode: n})
			}
			apply(b, s, muts...)
			ctx := context.Background()
			next, ops := uint64(0), 0
			batch := make([]store.Mutation, size)
			for b.Loop() {
				for i := range batch {
					n := Node(next%nodes+1, 1)
					n.Online, n.Holder = ops%2 == 0, "replica"
					if kind == "patch" {
						batch[i] = store.Mutation{PatchNode: &store.NodePatch{Part: store.NodeClient, Node: *n}}
					} else {
						batch[i] = store.Mutation{UpdateNode: n}
					}
					next++
				}
				if _, err := s.Apply(ctx, batch); err != nil {
					b.Fatal(err)
				}
				ops++
			}
			b.ReportMetric(float64(ops*size)/b.Elapsed().Seconds(), "muts/s")
		})
	}
}
