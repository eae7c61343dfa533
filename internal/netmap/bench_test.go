package netmap

// Engine benchmarks (DESIGN "Measuring"): a node joining a 10,000-node
// tailnet, a full map with 10,000 peers, and a policy edit fanned out to
// 10,000 sessions, with the default policy and the generated 15,000-rule
// one.
//
// Run them bounded, e.g.:
//
//	go test -run '^$' -bench . -benchmem -benchtime 3x ./internal/netmap/
//
// Setup (a temp SQLite store, users, keys, 10,000 registrations through
// State.Register, the engine, attached sessions) is excluded from the
// timings. Sessions are real session.Session values attached with
// Engine.Attach; their writers are not running. Between timed iterations
// every session is drained (see drain): a sentinel update is pushed and
// Session.Run is run synchronously until it has written everything
// pending, so pending updates never pile up and each session's delivery
// can be checked exactly.

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/util/zstdframe"

	"github.com/tailplane/tailplane/internal/policy/policygen"
	"github.com/tailplane/tailplane/internal/session"
	"github.com/tailplane/tailplane/internal/state"
	"github.com/tailplane/tailplane/internal/store/sqlite"
)

var benchSessions = flag.Float64("netmap.sessions", 1.0, "fraction of benchmark nodes with an attached session")

const benchNodes = 10000

// benchNode is one node to register: its owner (index into the users)
// and tags.
type benchNode struct {
	user   int
	tags   []string
	routes []netip.Prefix
}

// benchTailnet describes a fixture.
type benchTailnet struct {
	users  []string // names; emails are name@example.com
	nodes  []benchNode
	policy []byte // nil: the default allow-all policy
}

type benchFixture struct {
	st       *state.State
	e        *Engine
	ids      []uint64 // registered node ids, in order of b.nodes
	sessions map[uint64]*session.Session
	keys     map[string]string // keyOf(user, tags) -> reusable key
	users    []string
}

func keyOf(user int, tags []string) string { return fmt.Sprint(user, tags) }

// newBenchFixture builds the tailnet in a fresh State over a temp SQLite
// store and an engine with sessions attached for a fraction of the nodes.
// Registrations and key creation run concurrently so the state's group
// commit batches them (one fsync per batch, not per node).
func newBenchFixture(b testing.TB, tn benchTailnet) *benchFixture {
	b.Helper()
	ctx := context.Background()
	t0 := time.Now()
	defer func() { b.Logf("setup: %v", time.Since(t0).Round(time.Millisecond)) }()
	db, err := sqlite.Open(filepath.Join(b.TempDir(), "tp.db"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	st, err := state.New(ctx, state.Options{
		Store: db, Logger: quiet,
		V4Prefix: netip.MustParsePrefix("100.64.0.0/10"),
		V6Prefix: netip.MustParsePrefix("fd7a:115c:a1e0::/48"),
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(st.Close)
	// The policy goes first: autoApprovers apply at registration.
	if tn.policy != nil {
		if err := st.SetPolicy(ctx, tn.policy); err != nil {
			b.Fatal(err)
		}
	}
	for _, u := range tn.users {
		if _, err := st.CreateUser(ctx, u, u+"@example.com"); err != nil {
			b.Fatal(err)
		}
	}
	f := &benchFixture{st: st, keys: map[string]string{}, users: tn.users, sessions: map[uint64]*session.Session{}}
	type keyReq struct {
		user int
		tags []string
	}
	var reqs []keyReq
	for _, n := range tn.nodes {
		k := keyOf(n.user, n.tags)
		if _, ok := f.keys[k]; !ok {
			f.keys[k] = ""
			reqs = append(reqs, keyReq{n.user, n.tags})
		}
	}
	var mu sync.Mutex
	parallel(len(reqs), func(i int) error {
		r := reqs[i]
		ks, err := st.CreateKeys(ctx, state.KeyParams{User: tn.users[r.user], Reusable: true, Tags: r.tags}, 1)
		if err != nil {
			return err
		}
		mu.Lock()
		f.keys[keyOf(r.user, r.tags)] = ks[0].Key
		mu.Unlock()
		return nil
	}, b)
	f.ids = make([]uint64, len(tn.nodes))
	parallel(len(tn.nodes), func(i int) error {
		n := tn.nodes[i]
		res, err := f.register(ctx, fmt.Sprintf("node%d", i), n)
		if err != nil {
			return err
		}
		f.ids[i] = res.ID
		// Routes the autoApprovers did not approve (tagged routers).
		if len(n.routes) > 0 && !slices.Equal(res.ApprovedRoutes, n.routes) {
			_, err = st.ApproveRoutes(ctx, res.ID, n.routes)
		}
		return err
	}, b)

	b.Logf("setup: %d nodes registered after %v", len(f.ids), time.Since(t0).Round(time.Millisecond))
	f.e = New(Options{State: st, Logger: quiet, Static: Static{
		DERPMap: &tailcfg.DERPMap{}, BaseDomain: "bench.example", MagicDNS: true,
	}})
	b.Logf("setup: engine built after %v", time.Since(t0).Round(time.Millisecond))
	// The engine's Run is not started: benchmarks call process directly.
	// A real Attach builds and pushes a full map: about 10-20 ms and
	// 5-8 MB each at 10,000 peers, so attaching 10,000 sessions that way
	// takes minutes. The first two sessions are attached for real and
	// checked against attachQuiet, which records the same session state
	// without building the map; the rest are attached quietly.
	attach := int(float64(len(f.ids)) * *benchSessions)
	for i, id := range f.ids[:attach] {
		s := session.New(id, false)
		if i < 2 || *benchRealAttach {
			f.e.mu.Lock()
			quiet := f.e.quietSessState(id)
			f.e.mu.Unlock()
			if !f.e.Attach(s) {
				b.Fatalf("attach %d failed", id)
			}
			if !drain(s) {
				b.Fatalf("session %d received no full map", id)
			}
			f.e.mu.Lock()
			real := *f.e.sessions[id].ss
			f.e.mu.Unlock()
			real.s = nil
			if !reflect.DeepEqual(real, *quiet) {
				b.Fatalf("attachQuiet is out of step with Attach:\nAttach: %+v\nquiet:  %+v", real, *quiet)
			}
		} else {
			f.e.attachQuiet(s)
		}
		f.sessions[id] = s
	}
	return f
}

var benchRealAttach = flag.Bool("netmap.realattach", false, "attach every benchmark session with Engine.Attach (slow: a full map each)")

// quietSessState is what Attach records for a session of node id,
// without the session (fields as set by fullPartsLocked).
func (e *Engine) quietSessState(id uint64) *sessState {
	n := e.nodes[id]
	return &sessState{self: n, selfJSON: e.selfJSONLocked(n), filterSum: e.filterLocked(id).sum, ssh: e.classEncLocked(id).ssh}
}

// attachQuiet registers s as Attach does, as if its full map had been
// delivered, without building it.
func (e *Engine) attachQuiet(s *session.Session) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ss := e.quietSessState(s.NodeID)
	ss.s = s
	e.sessions[s.NodeID] = sessEntry{ss: ss}
	e.connected.Store(s.NodeID, struct{}{})
}

func (f *benchFixture) register(ctx context.Context, hostname string, n benchNode) (*state.Node, error) {
	res, err := f.st.Register(ctx, state.RegisterParams{
		MachineKey: key.NewMachine().Public(), NodeKey: key.NewNode().Public(),
		AuthKey:  f.keys[keyOf(n.user, n.tags)],
		Hostinfo: &tailcfg.Hostinfo{Hostname: hostname, OS: "linux", RoutableIPs: n.routes},
	})
	if err != nil {
		return nil, err
	}
	return res.Node, nil
}

// parallel runs fn(0..n-1) on 64 workers: enough concurrent commits for
// the group committer to batch them.
func parallel(n int, fn func(i int) error, b testing.TB) {
	b.Helper()
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	next := make(chan int)
	for range 64 {
		wg.Go(func() {
			for i := range next {
				if err := fn(i); err != nil {
					once.Do(func() { first = err })
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	if first != nil {
		b.Fatal(first)
	}
}

// sentinelID is a node id no tailnet here reaches; its OnlineChange marks
// the end of a drain.
const sentinelID = 1 << 62

var sentinelFrame = func() []byte {
	msg, err := session.Encode(&session.Update{Online: map[uint64]bool{sentinelID: true}})
	if err != nil {
		panic(err)
	}
	var w bytes.Buffer
	if _, err := session.WriteFrame(&w, session.JoinParts(msg, false), false); err != nil {
		panic(err)
	}
	return w.Bytes()
}()

// drainWriter stops its session's Run after the first flush and records
// whether anything other than the sentinel was written, and how many bytes.
type drainWriter struct {
	cancel   context.CancelFunc
	buf      []byte
	overflow bool
	got      bool
	n        int
}

func (w *drainWriter) Write(p []byte) (int, error) {
	w.n += len(p)
	if len(w.buf)+len(p) > len(sentinelFrame) {
		w.overflow = true
	} else {
		w.buf = append(w.buf, p...)
	}
	return len(p), nil
}

func (w *drainWriter) Flush() error {
	if w.overflow || !bytes.Equal(w.buf, sentinelFrame) {
		w.got = true
	}
	w.buf, w.overflow = w.buf[:0], false
	w.cancel()
	return nil
}

// drain delivers everything pending on s and reports whether there was
// anything. It pushes a sentinel (so there is always something to write)
// and runs the session's writer synchronously: with a live context and an
// open session the writer's first wait can only end on the wake, it
// writes the pending update (a full map first, if any), and the flush
// cancels the context so Run returns. Deterministic, no goroutines.
func drain(s *session.Session) bool {
	got, _ := drainBytes(s)
	return got
}

// drainBytes is drain that also returns the bytes written, the sentinel
// included.
func drainBytes(s *session.Session) (bool, int) {
	s.Push(&session.Update{Online: map[uint64]bool{sentinelID: true}})
	ctx, cancel := context.WithCancel(context.Background())
	w := &drainWriter{cancel: cancel}
	s.Run(ctx, w)
	cancel()
	return w.got, w.n
}

// drainAll drains every session and returns the ids that received
// something.
func (f *benchFixture) drainAll() map[uint64]bool {
	got, _ := f.drainAllBytes()
	return got
}

// drainAllBytes is drainAll that also returns about how many bytes the
// sessions were sent (the sentinels' frames subtracted).
func (f *benchFixture) drainAllBytes() (map[uint64]bool, int) {
	got := map[uint64]bool{}
	total := 0
	for id, s := range f.sessions {
		g, n := drainBytes(s)
		if g {
			got[id] = true
		}
		total += n - len(sentinelFrame)
	}
	return got, total
}

// defaultTailnet: 100 users with 99-100 nodes each, and 20 tag:ops nodes
// (owned by user0).
func defaultTailnet(policy []byte) benchTailnet {
	tn := benchTailnet{policy: policy}
	for u := range 100 {
		tn.users = append(tn.users, fmt.Sprintf("user%d", u))
	}
	for i := range benchNodes {
		n := benchNode{user: i % 100}
		if i%500 == 7 {
			n = benchNode{user: 0, tags: []string{"tag:ops"}}
		}
		tn.nodes = append(tn.nodes, n)
	}
	return tn
}

// scopedPolicy lets users reach each other, and only tag:ops reach
// tag:secret: a tag:secret node is visible to the 20 ops nodes alone.
var scopedPolicy = []byte(`{
  "tagOwners": {"tag:ops": ["user0@example.com"], "tag:secret": ["user0@example.com"]},
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]},
    {"action": "accept", "src": ["tag:ops"], "dst": ["tag:secret:22"]}
  ]
}`)

// generatedTailnet maps policygen's users and nodes (tags, owners,
// routers) onto registrations: user i is policygen's user i+1.
func generatedTailnet() (benchTailnet, []byte) { return generatedTailnetOf(policygen.Default()) }

// generatedTailnetOf is generatedTailnet for other options.
func generatedTailnetOf(opts policygen.Options) (benchTailnet, []byte) {
	pol, users, nodes := policygen.Generate(opts)
	tn := benchTailnet{policy: pol}
	for _, u := range users {
		tn.users = append(tn.users, u.Name)
	}
	for _, n := range nodes {
		bn := benchNode{tags: n.Tags, routes: n.ApprovedRoutes}
		if len(n.Tags) > 0 {
			// Tagged nodes are registered with a tagged key of some user;
			// the owner does not matter to the policy.
			bn.user = 0
			// Keys carry sorted tags, as Register stores them.
			bn.tags = slices.Clone(n.Tags)
			slices.Sort(bn.tags)
			bn.tags = slices.Compact(bn.tags)
		} else {
			bn.user = int(n.UserID - 1)
		}
		tn.nodes = append(tn.nodes, bn)
	}
	return tn, pol
}

// BenchmarkAddNodeTo10k times one node registering into a 10,000-node
// tailnet and the engine's fan-out of it (fanout-ms/op). The node leaves
// again after each round, untimed; leave-ms/op is the engine's part of
// that leave, and the wire-B/op metrics what the sessions were sent.
func BenchmarkAddNodeTo10k(b *testing.B) {
	gen, _ := generatedTailnet()
	cases := []struct {
		name   string
		tn     benchTailnet
		joiner benchNode
		// viewers are the fixture nodes expected to see the joiner (nil:
		// every session).
		viewers func(tn benchTailnet) []int
	}{
		{name: "policy=allow-all", tn: defaultTailnet(nil), joiner: benchNode{user: 1}},
		{name: "policy=scoped-tag", tn: defaultTailnet(scopedPolicy),
			joiner: benchNode{user: 0, tags: []string{"tag:secret"}},
			viewers: func(tn benchTailnet) []int {
				var out []int
				for i, n := range tn.nodes {
					if slices.Contains(n.tags, "tag:ops") {
						out = append(out, i)
					}
				}
				return out
			}},
		// A user node joining the 15,000-rule tailnet: no assertion on
		// receivers (the policy decides), only the cost.
		{name: "policy=generated-15k", tn: gen, joiner: benchNode{user: 1}},
		// A subnet router (approved by the policy's autoApprovers) joining
		// it: routers still recompile the policy.
		{name: "policy=generated-15k/router", tn: gen,
			joiner: benchNode{user: 1, routes: []netip.Prefix{netip.MustParsePrefix("10.250.0.0/16")}}},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			f := newBenchFixture(b, tc.tn)
			if _, ok := f.keys[keyOf(tc.joiner.user, tc.joiner.tags)]; !ok {
				ks, err := f.st.CreateKeys(context.Background(), state.KeyParams{User: f.users[tc.joiner.user], Reusable: true, Tags: tc.joiner.tags}, 1)
				if err != nil {
					b.Fatal(err)
				}
				f.keys[keyOf(tc.joiner.user, tc.joiner.tags)] = ks[0].Key
			}
			var want map[uint64]bool
			if tc.viewers != nil {
				want = map[uint64]bool{}
				for _, i := range tc.viewers(tc.tn) {
					if f.sessions[f.ids[i]] != nil {
						want[f.ids[i]] = true
					}
				}
			}
			ctx := context.Background()
			hi := &tailcfg.Hostinfo{Hostname: "joiner", OS: "linux", RoutableIPs: tc.joiner.routes}
			params := func() state.RegisterParams {
				return state.RegisterParams{MachineKey: key.NewMachine().Public(), NodeKey: key.NewNode().Public(),
					AuthKey: f.keys[keyOf(tc.joiner.user, tc.joiner.tags)], Hostinfo: hi}
			}
			p := params()
			checked := false
			var updated int
			var fanout time.Duration // the engine's part, without registering
			var leave time.Duration  // the engine's part of the leave after it
			var joinBytes, leaveBytes int
			b.ReportAllocs()
			for b.Loop() {
				res, err := f.st.Register(ctx, p)
				if err != nil {
					b.Fatal(err)
				}
				id := res.Node.ID
				// A join into a quiet tailnet: connected nodes' filters
				// are synced at once, not deferred behind the last sync.
				f.e.lastSync = time.Time{}
				t0 := time.Now()
				f.processAll(map[uint64]struct{}{id: {}})
				fanout += time.Since(t0)

				b.StopTimer()
				got, n := f.drainAllBytes()
				updated, joinBytes = len(got), joinBytes+n
				if !checked {
					checkReceivers(b, "join", got, want, len(f.sessions))
				}
				// Leave the tailnet at 10,000 nodes for the next round.
				if err := f.st.DeleteNode(ctx, id); err != nil {
					b.Fatal(err)
				}
				f.e.lastSync = time.Time{}
				t0 = time.Now()
				f.processAll(map[uint64]struct{}{id: {}})
				leave += time.Since(t0)
				got, n = f.drainAllBytes()
				leaveBytes += n
				if !checked {
					checkReceivers(b, "leave", got, want, len(f.sessions))
					checked = true
				}
				p = params()
				b.StartTimer()
			}
			b.ReportMetric(float64(updated), "sessions-updated")
			b.ReportMetric(float64(fanout.Microseconds())/1000/float64(b.N), "fanout-ms/op")
			b.ReportMetric(float64(leave.Microseconds())/1000/float64(b.N), "leave-ms/op")
			b.ReportMetric(float64(joinBytes)/float64(b.N), "join-wire-B/op")
			b.ReportMetric(float64(leaveBytes)/float64(b.N), "leave-wire-B/op")
		})
	}
}

// BenchmarkJoinBatchTo10k times the engine's part of one batch of joins
// into the generated 15,000-rule tailnet of 10,000 connected nodes, as in
// a join storm: the joined nodes reach every session that sees them, and
// the filter sync is deferred, as it is behind the last one in a storm.
// The nodes leave again (not timed) after each op.
func BenchmarkJoinBatchTo10k(b *testing.B) {
	const joiners = 100
	gen, _ := generatedTailnet()
	f := newBenchFixture(b, gen)
	ctx := context.Background()
	var sent int
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		batch := map[uint64]struct{}{}
		for i := range joiners {
			batch[f.registerNode(b, benchNode{user: (i * 7) % len(gen.users)})] = struct{}{}
		}
		f.e.lastSync = time.Now()
		b.StartTimer()
		f.e.process(batch, false, false)
		b.StopTimer()
		got := f.drainAll()
		sent += len(got)
		for id := range batch {
			if err := f.st.DeleteNode(ctx, id); err != nil {
				b.Fatal(err)
			}
		}
		f.e.lastSync = time.Now()
		f.e.process(batch, false, false)
		f.drainAll()
		b.StartTimer()
	}
	b.ReportMetric(float64(sent)/float64(b.N), "sessions-updated/op")
}

// BenchmarkPolicyEdit10k times the engine's part of a policy edit in the
// generated 15,000-rule tailnet of 10,000 nodes: the last rule taken out,
// and put back (each an op: a recompile and a full batch). wire-B/op is
// what the sessions were sent.
func BenchmarkPolicyEdit10k(b *testing.B) {
	tn, pol := generatedTailnet()
	f := newBenchFixture(b, tn)
	var doc map[string]any
	if err := json.Unmarshal(pol, &doc); err != nil {
		b.Fatal(err)
	}
	acls := doc["acls"].([]any)
	doc["acls"] = acls[:len(acls)-1]
	edited, err := json.Marshal(doc)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	var took time.Duration
	var wire, updated int
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		p := edited
		if i%2 == 1 {
			p = pol
		}
		b.StopTimer()
		if err := f.st.SetPolicy(ctx, p); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		t0 := time.Now()
		f.e.process(nil, true, false)
		took += time.Since(t0)
		b.StopTimer()
		got, n := f.drainAllBytes()
		updated, wire = len(got), wire+n
		b.StartTimer()
	}
	b.ReportMetric(float64(took.Microseconds())/1000/float64(b.N), "edit-ms/op")
	b.ReportMetric(float64(wire)/float64(b.N), "wire-B/op")
	b.ReportMetric(float64(updated), "sessions-updated")
}

// processAll runs the batch of dirty, then the batches that send the
// filter chunks of a sync it started (sendDueFiltersLocked): a sync is the
// bulk of a join's cost under large policies, so it is timed with it.
func (f *benchFixture) processAll(dirty map[uint64]struct{}) {
	f.e.process(dirty, false, false)
	for len(f.e.filterDue) > 0 {
		f.e.process(nil, false, false)
	}
}

// checkReceivers asserts that exactly the sessions in want (all, when
// want is nil) received an update.
func checkReceivers(b testing.TB, what string, got, want map[uint64]bool, sessions int) {
	b.Helper()
	if want == nil {
		if len(got) != sessions {
			b.Fatalf("%s: %d of %d sessions received an update, want all", what, len(got), sessions)
		}
		return
	}
	for id := range got {
		if !want[id] {
			b.Errorf("%s: session %d received an update but cannot see the node", what, id)
		}
	}
	for id := range want {
		if !got[id] {
			b.Errorf("%s: session %d sees the node but received nothing", what, id)
		}
	}
	if b.Failed() {
		b.FailNow()
	}
	b.Logf("%s: %d of %d sessions updated, as expected", what, len(got), sessions)
}

func BenchmarkFullMap10kPeers(b *testing.B) {
	f := newBenchFixture(b, defaultTailnet(nil))
	id := f.ids[len(f.ids)/2]
	m, ok := f.e.FullMap(id)
	if !ok {
		b.Fatal("no map")
	}
	if got := len(f.e.compiled.Peers(id)); got != benchNodes-1 {
		b.Fatalf("node has %d peers, want %d", got, benchNodes-1)
	}
	b.ReportAllocs()
	for b.Loop() {
		m, _ = f.e.FullMap(id)
	}
	b.ReportMetric(float64(len(m)), "map-bytes")
}

// BenchmarkClientDecodeFullMap10kPeers is the client's side of a full
// map: tailscaled decoding the compressed message, hundreds of zstd frames
// back to back, as it does (zstdframe.AppendDecode(nil, msg)).
func BenchmarkClientDecodeFullMap10kPeers(b *testing.B) {
	f := newBenchFixture(b, defaultTailnet(nil))
	id := f.ids[len(f.ids)/2]
	f.e.mu.Lock()
	f.e.buildClassFullLocked(id)
	parts := f.e.fullPartsLocked(&sessState{}, f.e.nodes[id])
	f.e.mu.Unlock()
	msg := session.JoinParts(parts, true)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := zstdframe.AppendDecode(nil, msg); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(parts)), "parts")
	b.ReportMetric(float64(len(msg)), "wire-bytes")
}

func BenchmarkPolicyEditFanout(b *testing.B) {
	gen, genPol := generatedTailnet()
	genEdited := bytes.Replace(genPol, []byte(`"proto":"udp"`), []byte(`"proto":"tcp"`), 1)
	if bytes.Equal(genEdited, genPol) {
		b.Fatal("edit did not apply")
	}
	allowAll := []byte(`{"tagOwners": {"tag:ops": ["user0@example.com"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}`)
	allowAllEdited := []byte(`{"tagOwners": {"tag:ops": ["user0@example.com"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]},
           {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:ops:22"], "proto": "tcp"}]}`)
	cases := []struct {
		name       string
		tn         benchTailnet
		base, edit []byte
	}{
		{"policy=allow-all+1rule", defaultTailnet(allowAll), allowAll, allowAllEdited},
		{"policy=generated-15k", gen, genPol, genEdited},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			f := newBenchFixture(b, tc.tn)
			ctx := context.Background()
			texts := [2][]byte{tc.edit, tc.base}
			var updated int
			i := 0
			b.ReportAllocs()
			for b.Loop() {
				if err := f.st.SetPolicy(ctx, texts[i%2]); err != nil {
					b.Fatal(err)
				}
				f.e.process(nil, true, false)
				b.StopTimer()
				updated = len(f.drainAll())
				i++
				b.StartTimer()
			}
			b.ReportMetric(float64(updated), "sessions-updated")
		})
	}
}

// BenchmarkReconnectStorm attaches a stream for every node of a 10,000-node
// tailnet to a fresh engine, as after a server restart: every class builds
// its full-map peers on its first reconnect. Four workers attach and drain
// (compress and write) concurrently, as the server's stream goroutines do.
// ms/op is the wall time of the whole storm, cpu-s/op the process's CPU
// over it: a storm that serialises on the engine lock shows as wall time
// close to CPU time on two cores.
func BenchmarkReconnectStorm(b *testing.B) {
	for _, tc := range wholeTailnets() {
		b.Run(tc.name, func(b *testing.B) {
			prev := *benchSessions
			*benchSessions = 0
			f := newBenchFixture(b, tc.tn)
			*benchSessions = prev
			opts := Options{State: f.st, Logger: f.e.log, Static: f.e.static}
			var cpu time.Duration
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer()
				e := New(opts)
				c0 := processCPU(b)
				b.StartTimer()
				next := make(chan uint64)
				var wg sync.WaitGroup
				var failed sync.Once
				for range 4 {
					wg.Go(func() {
						for id := range next {
							s := session.New(id, true)
							if !e.Attach(s) || !drain(s) {
								failed.Do(func() { b.Errorf("node %d: no full map", id) })
							}
						}
					})
				}
				for _, id := range f.ids {
					next <- id
				}
				close(next)
				wg.Wait()
				b.StopTimer()
				cpu += processCPU(b) - c0
				b.StartTimer()
			}
			b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/op")
		})
	}
}

// BenchmarkIdleGC measures what an idle tailnet of 10,000 connected nodes
// costs between changes: the Go runtime forces a collection every two
// minutes, and each marks everything the engine keeps live (compiled
// policy, encodings, sessions). The tailnet is built, then 500 nodes join
// it in synced batches of 50. cpu-ms/op is the process's CPU per forced
// collection (mark workers run on every core), heap-MB and heap-objects the
// live heap after it, with the caches swept as an idle server sweeps
// them (two ticks of sweepIdleLocked). It leaves out what a server holds
// per connection (HTTP/2, Noise, four goroutines) and what 10,000 joins
// in small batches leave behind: a server idle after the join storm marks
// about four times this heap.
func BenchmarkIdleGC(b *testing.B) {
	for _, tc := range wholeTailnets() {
		b.Run(tc.name, func(b *testing.B) {
			f := newBenchFixture(b, tc.tn)
			// Joins after the engine is built, each synced to every
			// session, as in a server that grew to its size: they leave
			// the incremental compilation's structures and the filter
			// encodings the syncs made.
			for r := range 10 {
				batch := map[uint64]struct{}{}
				for i := range 50 {
					batch[f.registerNode(b, benchNode{user: (r*50 + i) * 7 % len(tc.tn.users)})] = struct{}{}
				}
				f.e.lastSync = time.Time{}
				f.processAll(batch)
				f.drainAll()
			}
			f.e.mu.Lock()
			f.e.batchNo += chunkTTL + 1
			f.e.sweepIdleLocked()
			f.e.sweepIdleLocked()
			f.e.mu.Unlock()
			runtime.GC()
			var cpu time.Duration
			var ms runtime.MemStats
			for b.Loop() {
				c0 := processCPU(b)
				runtime.GC()
				cpu += processCPU(b) - c0
			}
			runtime.ReadMemStats(&ms)
			b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "cpu-ms/op")
			b.ReportMetric(float64(ms.HeapAlloc)/(1<<20), "heap-MB")
			b.ReportMetric(float64(ms.HeapObjects), "heap-objects")
			runtime.KeepAlive(f)
		})
	}
}

// namedTailnet is a benchmark case.
type namedTailnet struct {
	name string
	tn   benchTailnet
}

// wholeTailnets are the cases of the benchmarks that act on every node at
// once: the default allow-all policy and the generated 15,000-rule one.
func wholeTailnets() []namedTailnet {
	gen, _ := generatedTailnet()
	return []namedTailnet{{"policy=allow-all", defaultTailnet(nil)}, {"policy=generated-15k", gen}}
}

// processCPU is the user and system CPU time the process has used.
func processCPU(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
