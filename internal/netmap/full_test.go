package netmap

import (
	"encoding/json"
	"net/netip"
	"slices"
	"sync"
	"testing"

	"tailscale.com/tailcfg"

	"github.com/tailplane/tailplane/internal/session"
	"github.com/tailplane/tailplane/internal/state"
)

// TestExtendedFullMapsMatchFresh: after batches of joins and soft changes,
// full maps built from class peer lists brought forward
// (extendClassFullLocked) are the maps a fresh build gives, and spans the
// batches did not touch keep their chunks.
func TestExtendedFullMapsMatchFresh(t *testing.T) {
	tn := smallTailnet(scopedPolicy, 4, 300, func(i int) bool { return i%25 == 7 }, "tag:ops")
	f := newBenchFixture(t, tn)
	f.drainAll()
	member, ops := f.ids[0], f.ids[7]

	fullMap := func(id uint64) tailcfg.MapResponse {
		t.Helper()
		e := f.e
		e.mu.Lock()
		parts := e.fullPartsLocked(&sessState{}, e.nodes[id])
		e.mu.Unlock()
		var m tailcfg.MapResponse
		if err := json.Unmarshal(session.JoinParts(parts, false), &m); err != nil {
			t.Fatal(err)
		}
		m.ControlTime = nil
		slices.SortFunc(m.UserProfiles, func(a, b tailcfg.UserProfile) int { return int(a.ID - b.ID) })
		return m
	}
	for _, id := range []uint64{member, ops} {
		fullMap(id) // builds the class's peers at this generation
	}

	for round := range 3 {
		f.join(t, benchNode{user: 1 + round})
		f.join(t, benchNode{user: 0, tags: []string{"tag:secret"}})
		f.st.UpdateFromClient(f.ids[250+round], state.ClientUpdate{Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")}})
		f.e.process(map[uint64]struct{}{f.ids[250+round]: {}}, false, false)
		for _, id := range []uint64{member, ops} {
			got := fullMap(id)
			forgetFullMaps(f.e)
			want := fullMap(id)
			if g, w := mustJSON(t, got), mustJSON(t, want); g != w {
				t.Fatalf("round %d, node %d: extended full map differs from a fresh one", round, id)
			}
		}
	}
	// Built fresh above; one more join extends it, and span 0 (node ids
	// below chunkSpan, none joined or changed) keeps its chunk.
	fullMap(member)
	span0 := f.e.classFull[f.e.compiled.ClassOf(member)].spans[0].chunk
	f.join(t, benchNode{user: 2})
	fullMap(member)
	if got := f.e.classFull[f.e.compiled.ClassOf(member)].spans[0].chunk; got != span0 {
		t.Fatal("untouched span rebuilt: the class's peers were not brought forward")
	}
}

// forgetFullMaps drops the engine's class full-map peers and span
// chunks, so that the next full map is built from the nodes alone.
func forgetFullMaps(e *Engine) {
	e.mu.Lock()
	defer e.mu.Unlock()
	clear(e.classFull)
	e.cacheMu.Lock()
	defer e.cacheMu.Unlock()
	clear(e.spanChunks)
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestConcurrentFullMapsDuringJoins builds full maps from several
// goroutines while batches of joins and leaves run, as a reconnect storm during
// joins does: classes' peers are then built outside the engine lock
// (buildClassFullLocked). Run with -race. Afterwards every cached class must
// give the map a fresh build gives: a build that read a view newer than
// the generation it was recorded under would carry joined nodes twice
// once brought forward.
func TestConcurrentFullMapsDuringJoins(t *testing.T) {
	tn := smallTailnet(scopedPolicy, 6, 240, func(i int) bool { return i%20 == 7 }, "tag:ops")
	f := newBenchFixture(t, tn)
	ids := slices.Clone(f.ids)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := w; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				id := ids[i%len(ids)]
				if i%3 == 0 {
					f.e.Attach(session.New(id, false))
				} else if _, ok := f.e.FullMap(id); !ok {
					t.Errorf("node %d: no full map", id)
				}
				if i%8 == 0 {
					// Make every class build again.
					f.e.mu.Lock()
					clear(f.e.classFull)
					f.e.mu.Unlock()
				}
			}
		})
	}
	var joined []uint64
	for round := range 40 {
		joined = append(joined, f.join(t, benchNode{user: round % 6}))
		if round%4 == 3 {
			joined = append(joined, f.join(t, benchNode{user: 0, tags: []string{"tag:secret"}}))
		}
		if round%5 == 4 {
			// Leaves change the compilation in place too.
			f.leave(t, joined[len(joined)-2])
		}
	}
	close(stop)
	wg.Wait()

	fullMap := func(id uint64) string {
		m, ok := f.e.FullMap(id)
		if !ok {
			t.Fatalf("node %d: no full map", id)
		}
		var r tailcfg.MapResponse
		if err := json.Unmarshal(m, &r); err != nil {
			t.Fatal(err)
		}
		r.ControlTime = nil
		return mustJSON(t, r)
	}
	for _, id := range ids {
		got := fullMap(id)
		f.e.mu.Lock()
		cf := f.e.classFull[f.e.compiled.ClassOf(id)]
		f.e.mu.Unlock()
		forgetFullMaps(f.e)
		if want := fullMap(id); got != want {
			t.Fatalf("node %d: full map from the cached class peers (generation %d) differs from a fresh one", id, cf.gen)
		}
	}
}

// TestUnusedFullMapPartsAreSwept: the caches behind full maps (class
// lists, span entries, chunks, profile lists) drop what no full map used
// for chunkTTL batches, so a tailnet that goes quiet does not keep every
// peer's JSON and frames in memory.
func TestUnusedFullMapPartsAreSwept(t *testing.T) {
	f := newBenchFixture(t, smallTailnet(scopedPolicy, 4, 120, func(i int) bool { return i%25 == 7 }, "tag:ops"))
	f.drainAll()
	if _, ok := f.e.FullMap(f.ids[0]); !ok {
		t.Fatal("no full map")
	}
	sizes := func() [4]int {
		f.e.mu.Lock()
		defer f.e.mu.Unlock()
		f.e.cacheMu.Lock()
		defer f.e.cacheMu.Unlock()
		return [4]int{len(f.e.classFull), len(f.e.spanChunks), len(f.e.chunks), len(f.e.profChunks)}
	}
	if s := sizes(); slices.Contains(s[:], 0) {
		t.Fatalf("after a full map: class lists, span entries, chunks, profile lists = %v, want all cached", s)
	}
	for range chunkTTL + 1 {
		f.e.process(nil, false, false)
	}
	if s := sizes(); s != [4]int{} {
		t.Fatalf("after %d batches without a full map: class lists, span entries, chunks, profile lists = %v, want none", chunkTTL+1, s)
	}
}
