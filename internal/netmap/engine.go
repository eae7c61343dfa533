// Package netmap turns tailnet state and the compiled policy into what each
// connected client receives: a full map on connect, then deltas. It runs
// the fan-out: change events are coalesced for a short window, the policy
// is recompiled only when a change can alter it, and each affected session
// gets one merged update built from shared, encode-once pieces.
package netmap

import (
	"bytes"
	"context"
	"encoding/json"
	"hash/maphash"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"
	"unsafe"

	"tailscale.com/tailcfg"
	"tailscale.com/types/dnstype"

	"github.com/tailplane/tailplane/internal/metrics"
	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/session"
	"github.com/tailplane/tailplane/internal/state"
)

// Static is the part of every map that does not depend on the node.
type Static struct {
	DERPMap     *tailcfg.DERPMap
	BaseDomain  string
	MagicDNS    bool
	Nameservers []string
}

// Options configures an Engine.
type Options struct {
	State  *state.State
	Static Static
	Logger *slog.Logger
	// Window is how long changes are collected before a fan-out.
	Window time.Duration
}

// Engine owns the published view of the tailnet and the sessions.
type Engine struct {
	st     *state.State
	static Static
	log    *slog.Logger
	window time.Duration // base coalescing window; grows while batches are slow

	inMu        sync.Mutex
	dirty       map[uint64]struct{}
	policyDirty bool
	usersDirty  bool
	wake        chan struct{}

	// mu guards the view and sessions. It is held while computing, never
	// across network I/O: sessions write from their own goroutines.
	mu sync.Mutex
	// viewMu lets classes' full-map peers be built outside mu, on every
	// core (buildClassFullLocked): a batch holds it exclusively, under mu, while
	// it changes nodes, compiled and viewGen, so holding it shared keeps
	// them as they are. cacheMu guards enc and chunks, which builders
	// share with holders of mu.
	viewMu   sync.RWMutex
	cacheMu  sync.Mutex
	nodes    map[uint64]*state.Node
	users    map[uint64]*state.User
	pol      *policy.Policy
	compiled *policy.Compiled
	enc      map[*state.Node]*peerEnc
	classEnc map[int]*classEnc
	sessions map[uint64]sessEntry
	// connected holds the keys of sessions (node id -> struct{}), kept
	// with it under mu but read without it (Connected): callers ask per
	// node, some of them for every change another replica makes, and
	// must not wait for a batch holding mu.
	connected sync.Map
	dnsJSON   json.RawMessage
	derpJSON  json.RawMessage
	// batchDone is closed (and replaced) after every batch.
	batchDone chan struct{}
	batchNo   uint64
	// chunks caches shared chunks of encoded peers for full maps, keyed
	// by a hash of the encodings they hold.
	chunks map[uint64][]*chunkEntry
	// spanChunks caches the chunk of a span's peers by the views it was
	// built from (see spanChunk); spanChanged holds the view generation
	// of the last batch that changed a node of each span, and is written
	// under mu and viewMu.
	spanChunks  map[uint64][]*spanEntry
	spanChanged map[uint64]uint64
	// classPeers caches each class's peer list for the current compilation.
	classPeers map[int][]policy.Peer
	// tickBatch is batchNo at the last sweepIdleLocked.
	tickBatch uint64
	// classFull caches each class's full-map peers; viewGen counts the
	// batches that changed a node or the compilation, which invalidate it.
	classFull map[int]*classFull
	viewGen   uint64
	viewSteps []viewStep
	// building holds the classes whose full-map peers are being built
	// outside mu; the channel is closed when the build is done.
	building map[int]chan struct{}
	// syncPending are the classes whose filter or SSH policy joins
	// changed since lastSync; syncTimer wakes Run when a sync is due.
	syncPending map[int]bool
	lastSync    time.Time
	syncTimer   *time.Timer
	// syncEvery is the least time between syncs: policySyncEvery, or
	// more while syncs are slow (see syncInterval).
	syncEvery time.Duration
	// filterDue are the sessions a sync has yet to send their own filter
	// chunks; each batch sends some for at most syncSlice (see
	// sendDueFiltersLocked). roundCost is the time the batches of the
	// current sync round took, while syncRound is set.
	filterDue []*sessState
	syncSlice time.Duration
	syncRound bool
	roundCost time.Duration
	// filterEnc encodes filters, caching shared source lists; sshEnc SSH
	// policies, caching their rules.
	filterEnc *filterEncoder
	sshEnc    *sshEncoder
	// profJSON caches user profiles as clients see them, and profChunks
	// lists of them for full maps, by a hash of the users.
	profJSON   map[tailcfg.UserID][]byte
	profChunks map[uint64]*profChunk
	// filterSeed seeds the hashes by which sessions remember their filter.
	filterSeed maphash.Seed
	// parts caches ClassFilterPartsSince per class and generation of
	// partsOf at partsGen: the members of a class share the search for
	// changed pieces, across the batches of a sync round.
	parts    map[partsKey][]policy.FilterPart
	partsOf  *policy.Compiled
	partsGen uint64
}

// sessEntry is a session as the sessions map holds it, with its node's
// class under the compilation of, looked up once per compilation. Class
// ids of connected nodes change only with a new compilation: joins and
// leaves add and remove nodes in place. The fan-out loop reads the map
// anyway; a class lookup per session and batch was a sixth of the
// engine's part of a node joining 10,000 sessions under allow-all, and
// keeping the class in each session's state made it a cold read of every
// session, which slowed batches that skip most of them.
type sessEntry struct {
	ss *sessState
	of *policy.Compiled
	cl int
}

// classEnc caches what all nodes of one identity class share: the SSH
// policy, and the filter when no rule names the receiving node's own
// addresses (shared). Per-node filters are not cached: with
// autogroup:self or identity destinations every node's filter differs, and
// at 10,000 nodes under the 15,000-rule benchmark policy keeping them
// would take gigabytes.
type classEnc struct {
	ssh    json.RawMessage
	shared bool
	filter *filterEnc
}

// filterEnc is a node's filter encoded: as PacketFilters chunks (with the
// "*" reset, as a full batch sends them), as the PacketFilters object of a
// full map, and the hash a session keeps to compare it with a later one.
type filterEnc struct {
	chunks map[string][]session.Part
	obj    []session.Part
	sum    uint64
}

// sessState is what the engine keeps per session. It is O(1) in the
// tailnet size: what a session has seen of its peers is implied by the
// compiled policy and node versions the engine published before the
// current batch, so it is never stored per peer (that was 100 bytes per
// session-peer pair: 10 GB at 10,000 nodes).
type sessState struct {
	s        *session.Session
	self     *state.Node
	selfJSON json.RawMessage
	// filterSum is the hash of the filter the session holds; 0 after a
	// join batch sent it changed chunks of a per-node filter (the whole
	// filter is then not encoded to hash it).
	filterSum uint64
	// filterGen is the generation (policy.Compiled.Gen) of the filter
	// chunks the session holds.
	filterGen uint64
	ssh       json.RawMessage
	// due: in filterDue.
	due bool
}

// New builds an engine over the current state and subscribes it to changes.
func New(opts Options) *Engine {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	e := &Engine{
		st: opts.State, static: opts.Static, log: log, window: opts.Window,
		dirty: map[uint64]struct{}{}, wake: make(chan struct{}, 1),
		nodes: map[uint64]*state.Node{}, users: map[uint64]*state.User{},
		enc: map[*state.Node]*peerEnc{}, classEnc: map[int]*classEnc{}, batchDone: make(chan struct{}),
		chunks: map[uint64][]*chunkEntry{}, spanChunks: map[uint64][]*spanEntry{}, spanChanged: map[uint64]uint64{}, classPeers: map[int][]policy.Peer{}, classFull: map[int]*classFull{}, building: map[int]chan struct{}{}, syncPending: map[int]bool{}, filterEnc: newFilterEncoder(), sshEnc: newSSHEncoder(), profJSON: map[tailcfg.UserID][]byte{}, profChunks: map[uint64]*profChunk{}, filterSeed: maphash.MakeSeed(), sessions: map[uint64]sessEntry{},
	}
	if e.window <= 0 {
		e.window = 10 * time.Millisecond
	}
	e.syncSlice = syncSlice
	dns := &tailcfg.DNSConfig{Domains: []string{e.static.BaseDomain}, Proxied: e.static.MagicDNS}
	for _, ns := range e.static.Nameservers {
		dns.Resolvers = append(dns.Resolvers, resolver(ns))
	}
	e.dnsJSON, _ = json.Marshal(dns)
	e.derpJSON, _ = json.Marshal(e.static.DERPMap)

	for _, u := range e.st.Users() {
		e.users[u.ID] = u
	}
	for _, n := range e.st.Nodes() {
		e.nodes[n.ID] = n
	}
	e.pol, _ = e.st.Policy()
	e.recompileLocked()
	e.st.Subscribe(e)
	return e
}

// Notify implements state.Sink.
func (e *Engine) Notify(ev state.Event) {
	e.inMu.Lock()
	switch ev.Kind {
	case state.NodeChanged:
		e.dirty[ev.NodeID] = struct{}{}
	case state.PolicyChanged:
		e.policyDirty = true
	case state.UsersChanged:
		e.usersDirty = true
	}
	e.inMu.Unlock()
	e.wakeSoon()
}

// maxWindow bounds the adaptive coalescing window.
const maxWindow = 500 * time.Millisecond

// Run processes change batches until ctx ends.
func (e *Engine) Run(ctx context.Context) {
	window := e.window
	sweep := time.NewTicker(chunkIdleTTL)
	defer sweep.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sweep.C:
			e.mu.Lock()
			e.sweepIdleLocked()
			e.mu.Unlock()
			continue
		case <-e.wake:
		}
		// Coalesce: let the rest of a burst arrive, then take it all. When
		// batches are slow, wait longer so fewer, larger batches share the
		// recompilation and diffing.
		t := time.NewTimer(window)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		e.inMu.Lock()
		dirty, pol, users := e.dirty, e.policyDirty, e.usersDirty
		e.dirty, e.policyDirty, e.usersDirty = map[uint64]struct{}{}, false, false
		e.inMu.Unlock()
		began := time.Now()
		e.process(dirty, pol, users)
		window = min(e.window+time.Since(began)/2, maxWindow)
	}
}

// sweepIdleLocked runs every chunkIdleTTL, batches or not. It drops the
// full-map caches unused for that long, the filter and SSH encodings no
// batch used since the tick before, and, when no batch ran since then,
// the classes' peer lists and filter parts: an idle server needs none of
// them until the next change, and each garbage collection the runtime
// forces at idle (one every two minutes) marks whatever it keeps.
func (e *Engine) sweepIdleLocked() {
	e.sweepChunksLocked()
	e.filterEnc.sweep()
	e.sshEnc.sweep()
	if e.batchNo == e.tickBatch {
		clear(e.classPeers)
		e.parts = nil
	}
	e.tickBatch = e.batchNo
}

// batch is one coalesced set of changes as the engine applies it.
type batch struct {
	added, removed, soft []uint64
	// prev holds the version of every changed or removed node that
	// sessions had before this batch.
	prev map[uint64]*state.Node
	// prevCompiled is the compilation sessions were in step with. Joins
	// and leaves change it in place: removedClass then holds each removed
	// node's class in it (classes outlive RemoveNodes), from which
	// sawRemoved tells who saw the node.
	prevCompiled *policy.Compiled
	removedClass map[uint64]int
	full         bool
	// fd is a full batch's diff of the two compilations.
	fd *fullDiff
	// patches caches each changed peer's patch: it depends only on the
	// peer's old and new version, so every session shares it.
	patches map[uint64]*session.Patch
	// syncAll: the policy was recompiled, so every session compares its
	// whole filter and SSH policy. Otherwise sync holds the classes whose
	// sessions get the filter chunks changed since they last synced and
	// their SSH policy, when it differs.
	syncAll bool
	sync    map[int]bool
	// joined indexes the added nodes for the sessions' diffs, once the
	// first one needs it (see joinedViewsLocked).
	joined *joinedViews
}

type partsKey struct {
	class int
	since uint64
}

// partsSince returns c.ClassFilterPartsSince(cl, since), once per class
// and generation while the compilation does not change: a sync round
// reaches its sessions over several batches, and looking for a class's
// changed pieces in each was a sixth of a join's fan-out under the
// generated 15,000-rule policy.
func (e *Engine) partsSince(c *policy.Compiled, cl int, since uint64) []policy.FilterPart {
	if e.parts == nil || e.partsOf != c || e.partsGen != c.Gen() {
		e.parts, e.partsOf, e.partsGen = map[partsKey][]policy.FilterPart{}, c, c.Gen()
	}
	k := partsKey{cl, since}
	ps, ok := e.parts[k]
	if !ok {
		ps = c.ClassFilterPartsSince(cl, since)
		e.parts[k] = ps
	}
	return ps
}

// filtersFor reports whether the batch brings class cl's filter and SSH
// policy up to date.
func (b *batch) filtersFor(cl int) bool { return b.syncAll || b.sync[cl] }

// touches reports whether node id itself changed in the batch.
func (b *batch) touches(id uint64) bool {
	_, ok := b.prev[id]
	return ok
}

// sawRemoved reports whether session node me had removed node id as a
// peer before the batch.
func (b *batch) sawRemoved(me, id uint64) bool {
	if p, ok := b.prev[me]; ok && p == nil {
		return false // me joined in this batch
	}
	if ci, ok := b.removedClass[id]; ok {
		return b.prevCompiled.ClassSees(me, ci)
	}
	if b.prevCompiled == nil {
		return false
	}
	_, ok := b.prevCompiled.PeerView(me, id)
	return ok
}

// oldNode is the version of id sessions had before the batch.
func (e *Engine) oldNode(b *batch, id uint64) *state.Node {
	if n, ok := b.prev[id]; ok {
		return n
	}
	return e.nodes[id]
}

// process applies one coalesced batch of changes and pushes updates.
//
// Most batches are incremental: nodes joined or left, or changed only
// what peers can be patched with. Then each session learns only about the
// nodes in the batch, through class-level visibility checks on the new and
// the previous compilation. A batch that changes the policy, users, or a
// node's identity (user, tags, addresses, routes) may change any pair's
// visibility, so every session's view is diffed, using peer lists
// computed once per identity class.
func (e *Engine) process(dirty map[uint64]struct{}, policyChanged, usersChanged bool) {
	start := time.Now()
	metrics.ChangeBatch.Observe(float64(len(dirty) + btoi(policyChanged) + btoi(usersChanged)))
	e.mu.Lock()
	defer e.mu.Unlock()
	e.viewMu.Lock()
	defer e.viewMu.Unlock()
	defer func() {
		close(e.batchDone)
		e.batchDone = make(chan struct{})
		e.batchNo++
		e.sweepChunksLocked()
	}()

	b := &batch{prev: map[uint64]*state.Node{}, prevCompiled: e.compiled, full: policyChanged || usersChanged,
		patches: map[uint64]*session.Patch{}}
	for id := range dirty {
		cur := e.st.Node(id)
		prev := e.nodes[id]
		switch {
		case cur == prev:
			continue
		case cur == nil:
			delete(e.nodes, id)
			if ent, ok := e.sessions[id]; ok {
				ent.ss.s.Close()
				delete(e.sessions, id)
				e.connected.Delete(id)
			}
			b.removed = append(b.removed, id)
			b.full = b.full || hasRoutes(prev)
		case prev == nil:
			b.added = append(b.added, id)
			b.full = b.full || hasRoutes(cur)
		default:
			b.soft = append(b.soft, id)
			b.full = b.full || policyRelevantChange(prev, cur)
		}
		b.prev[id] = prev
		if cur != nil {
			e.nodes[id] = cur
		}
	}
	if usersChanged {
		clear(e.profJSON)
		clear(e.profChunks)
		clear(e.users)
		for _, u := range e.st.Users() {
			e.users[u.ID] = u
		}
	}
	if policyChanged {
		e.pol, _ = e.st.Policy()
	}
	switch {
	case b.full:
		e.recompileLocked()
		b.syncAll = true
	case len(b.added) > 0 || len(b.removed) > 0:
		changed, ok := e.updateNodesLocked(b)
		b.syncAll = !ok
		for ci := range changed {
			e.syncPending[ci] = true
		}
	}
	e.planSyncLocked(b)
	if len(b.prev) > 0 || b.full {
		e.viewGen++ // encodings or views changed: cached full-map peers are stale
		e.recordViewStepLocked(b)
		for id := range b.prev {
			e.spanChanged[id/chunkSpan] = e.viewGen
		}
	}
	if b.full {
		b.fd = e.newFullDiff(b)
	}
	// In an incremental batch, sessions of one class whose own node did
	// not change get the same delta: compute it once per class, and let
	// them share its encoding and compression. A filter that names each
	// node's own addresses follows as a second, per-session message.
	memo := map[int]classDelta{}
	same := sameDeltas{}
	for id, ent := range e.sessions {
		ss := ent.ss
		if ent.of != e.compiled {
			// Also after a full batch: an entry must not keep the
			// replaced compilation alive.
			ent = sessEntry{ss: ss, of: e.compiled, cl: e.compiled.ClassOf(id)}
			e.sessions[id] = ent
		}
		switch {
		case b.full:
			e.diffAllLocked(ss, b, b.fd)
			continue
		case b.touches(id):
			if u := e.diffBatchLocked(ss, b); u != nil {
				ss.s.Push(u)
			}
			continue
		}
		cl := ent.cl
		filters := b.filtersFor(cl)
		m, ok := memo[cl]
		if !ok {
			m = e.classDeltaLocked(ss, b)
			m.u, m.peers = e.shareLocked(same, m.u, m.peers), nil
			memo[cl] = m
		} else if !m.skip && filters {
			// Sessions of one class hold the same SSH policy (and
			// filter, when shared), so the first one's comparison
			// stands for all.
			ss.ssh = m.ssh
			if m.sharedFilter {
				ss.filterSum = m.filterSum
			}
		}
		if m.skip {
			continue
		}
		if m.u != nil {
			ss.s.Push(m.u)
		}
		if filters && !m.sharedFilter && !ss.due {
			ss.due = true
			e.filterDue = append(e.filterDue, ss)
		}
	}
	e.sendDueFiltersLocked(b)
	// Encodings of versions no session holds any more are dropped.
	e.cacheMu.Lock()
	for _, old := range b.prev {
		if old != nil {
			delete(e.enc, old)
		}
	}
	e.cacheMu.Unlock()
	if len(b.sync) > 0 {
		e.syncRound, e.roundCost = true, 0
	}
	if e.syncRound {
		e.roundCost += time.Since(start)
		if len(e.filterDue) == 0 {
			e.syncRound = false
			e.syncEvery = syncInterval(e.roundCost)
			if !e.armSyncTimerLocked(time.Now()) && len(e.syncPending) > 0 {
				e.wakeSoon() // joins during the round are due now
			}
		}
	}
	metrics.DeltaSeconds.Observe(time.Since(start).Seconds())
}

// classDelta is the part of an incremental batch that every session of
// one class receives alike.
type classDelta struct {
	// skip: the batch concerns nothing the class sees or holds.
	skip bool
	u    *session.Update
	// sharedFilter: the class's filter is the same for all its members,
	// so its change (and the hash sessions keep) is part of u.
	sharedFilter bool
	filterSum    uint64
	ssh          json.RawMessage
	// peers are u's changed peers, for its chunks.
	peers []changedPeer
}

// classDeltaLocked computes the class-wide part of an incremental batch
// for the class of session ss, which did not change itself.
func (e *Engine) classDeltaLocked(ss *sessState, b *batch) classDelta {
	id := ss.s.NodeID
	if !e.concernsLocked(id, b) {
		// A class lookup instead of a diff per session: a tag joining
		// 10,000 nodes of which 20 see it cost 7.4 ms (see
		// BenchmarkAddNodeTo10k).
		return classDelta{skip: true}
	}
	var m classDelta
	var d update
	if b.filtersFor(e.compiled.ClassOf(id)) {
		ce := e.classEncLocked(id)
		if !bytes.Equal(ce.ssh, ss.ssh) {
			d.u.SSHPolicy = ce.ssh
		}
		ss.ssh, m.ssh = ce.ssh, ce.ssh
		if ce.shared {
			m.sharedFilter = true
			d.u.PacketFilters = e.filterDeltaLocked(ss, b)
			m.filterSum = ss.filterSum
		}
	}
	e.batchPeersLocked(ss, b, &d)
	if m.u = d.result(); m.u != nil {
		m.u.Shared = new(session.Encoded)
		m.peers = d.list
	}
	return m
}

// sameDeltas finds, among the class-wide deltas of one batch, one with the
// same content, so that classes that see the batch's nodes the same way
// share one encoding and compression. In a join storm under the generated
// 15,000-rule policy each of about 4,000 classes got the new peers, and
// encoding and compressing those per class was a fifth of the server's
// CPU.
type sameDeltas map[uint64][]*session.Update

// find returns an earlier update with u's content, or u (recorded).
// Only updates of peers (added, removed, patched) and their owners'
// profiles are shared; the peer encodings and patches are shared
// pointers. The key sums a hash per entry, so it needs no sorting (sorting
// each class's keys was a sixth of a join batch's fan-out); equal content
// gives an equal key, and sameContent settles collisions.
func (sd sameDeltas) find(u *session.Update) *session.Update {
	if u == nil || u.Self != nil || u.PacketFilters != nil || u.SSHPolicy != nil || len(u.Online) > 0 {
		return u
	}
	var k uint64
	for id, p := range u.PeersChanged {
		k += mix(id, uint64(uintptr(unsafe.Pointer(unsafe.SliceData(p))))^uint64(len(p)))
	}
	for id := range u.PeersRemoved {
		k += mix(id, 1)
	}
	for id, p := range u.Patches {
		k += mix(id, uint64(uintptr(unsafe.Pointer(p))))
	}
	for id, p := range u.UserProfiles {
		k += mix(id, uint64(len(p))<<1)
	}
	for _, o := range sd[k] {
		if sameContent(o, u) {
			return o
		}
	}
	sd[k] = append(sd[k], u)
	return u
}

// mix hashes a pair of words (splitmix64's finalizer over both).
func mix(a, b uint64) uint64 {
	x := a*0x9e3779b97f4a7c15 ^ b
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

func sameContent(a, b *session.Update) bool {
	return maps.EqualFunc(a.PeersChanged, b.PeersChanged, func(x, y json.RawMessage) bool {
		return unsafe.SliceData(x) == unsafe.SliceData(y) && len(x) == len(y)
	}) && maps.Equal(a.PeersRemoved, b.PeersRemoved) && maps.Equal(a.Patches, b.Patches) &&
		maps.EqualFunc(a.UserProfiles, b.UserProfiles, func(x, y json.RawMessage) bool { return bytes.Equal(x, y) })
}

// concernsLocked reports whether an incremental batch can change anything
// for session id: its class's filter or SSH policy is synced, or the class
// sees a node the batch added, changed or removed.
func (e *Engine) concernsLocked(id uint64, b *batch) bool {
	if b.filtersFor(e.compiled.ClassOf(id)) {
		return true
	}
	sees := func(c *policy.Compiled, ids []uint64) bool {
		return slices.ContainsFunc(ids, func(p uint64) bool { _, ok := c.PeerView(id, p); return ok })
	}
	return sees(e.compiled, b.added) || sees(e.compiled, b.soft) || slices.ContainsFunc(b.removed, func(p uint64) bool { return b.sawRemoved(id, p) })
}

// hasRoutes reports whether a node carries routes: adding or removing a
// router can change which router is primary for other viewers.
func hasRoutes(n *state.Node) bool { return len(n.ApprovedRoutes) > 0 }

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// policyRelevantChange reports whether a node change can alter what the
// policy compiles: its identity, addresses or routes.
func policyRelevantChange(a, b *state.Node) bool {
	return a.UserID != b.UserID || !equalStrings(a.Tags, b.Tags) || a.IPv4 != b.IPv4 || a.IPv6 != b.IPv6 ||
		!equalPrefixes(a.ApprovedRoutes, b.ApprovedRoutes) || !equalPrefixes(a.AdvertisedRoutes, b.AdvertisedRoutes) ||
		a.Hostname != b.Hostname
}

func (e *Engine) recompileLocked() {
	start := time.Now()
	users := make([]policy.User, 0, len(e.users))
	for _, u := range e.users {
		users = append(users, state.PolicyUser(u))
	}
	nodes := make([]policy.Node, 0, len(e.nodes))
	for _, n := range e.nodes {
		nodes = append(nodes, state.PolicyNode(n))
	}
	c, err := e.pol.Compile(users, nodes)
	metrics.CompileSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		// The policy was checked when set; a tailnet change that makes it
		// fail to compile keeps the last good compilation in force.
		e.log.Error("policy compile failed; keeping the previous compilation", "err", err)
		if e.compiled != nil {
			return
		}
		c, _ = policy.Default().Compile(users, nodes)
	}
	e.compiled = c
	clear(e.classEnc)
	clear(e.classPeers)
	e.filterEnc = newFilterEncoder()
	e.sshEnc = newSSHEncoder()
}

// updateNodesLocked applies the batch's leaves and joins to the
// compilation without recompiling (policy.Compiled.RemoveNodes, then
// AddNodes), drops the cached encodings of the classes whose filter or SSH
// policy that changed, and returns those classes. It recompiles and returns
// false when either declines. Recompiling the 15,000-rule benchmark policy
// takes 0.5-0.6 s per batch at 10,000 nodes; adding one node about 1.7 ms.
func (e *Engine) updateNodesLocked(b *batch) (map[int]bool, bool) {
	start := time.Now()
	var changed []int
	if len(b.removed) > 0 {
		classes := make(map[uint64]int, len(b.removed))
		for _, id := range b.removed {
			classes[id] = e.compiled.ClassOf(id)
		}
		ch, ok := e.compiled.RemoveNodes(b.removed)
		if !ok {
			e.recompileLocked()
			return nil, false
		}
		b.removedClass = classes
		changed = ch
	}
	if len(b.added) > 0 {
		slices.Sort(b.added)
		nodes := make([]policy.Node, 0, len(b.added))
		for _, id := range b.added {
			nodes = append(nodes, state.PolicyNode(e.nodes[id]))
		}
		ch, ok := e.compiled.AddNodes(nodes)
		if !ok {
			e.recompileLocked()
			return nil, false
		}
		changed = append(changed, ch...)
	}
	metrics.CompileSeconds.Observe(time.Since(start).Seconds())
	dirty := make(map[int]bool, len(changed))
	for _, ci := range changed {
		dirty[ci] = true
		delete(e.classEnc, ci)
	}
	// Peer lists of classes that see a joined or removed node changed.
	clear(e.classPeers)
	// Source lists and SSH rules changed: the replaced ones' encodings
	// would only leak.
	e.filterEnc.sweep()
	e.sshEnc.sweep()
	return dirty, true
}

// policySyncEvery is how often, at most, joins reach the filters and SSH
// policies of nodes already connected. A join changes the source lists of
// every rule naming its user, group or tags, and so a chunk of most nodes'
// filters: under the generated 15,000-rule policy about 90 MB of filter
// JSON across a 9,000-node tailnet per batch. In a burst of joins each
// node then gets one update every policySyncEvery instead of one per
// batch; a join into a quiet tailnet is synced at once. The joining node
// itself gets its whole filter in its first map, and its peers at once.
const policySyncEvery = 2 * time.Second

// maxSyncEvery bounds the interval between syncs when they are slow.
const maxSyncEvery = 8 * time.Second

// syncInterval is the least time until the next sync after one whose batch
// took took: twice that, between policySyncEvery and maxSyncEvery. At
// 9,000 sessions under the generated 15,000-rule policy a batch that syncs
// takes 4-5 s while the tailnet joins, so every batch synced and each
// session got its changed chunks every batch; with syncs spaced by twice
// their cost the batches between them carry peers only. A 10,000-client
// join took 114.5 s with syncs every 6 s, 125.1 s every 2 s. A join into a
// quiet tailnet still syncs at once, and a fast sync brings the interval
// back to policySyncEvery.
func syncInterval(took time.Duration) time.Duration {
	return min(max(2*took, policySyncEvery), maxSyncEvery)
}

// planSyncLocked decides which classes' filters and SSH policies the batch
// brings up to date: all after a recompilation; else the classes changed
// by joins since the last sync, unless that was less than policySyncEvery
// ago, in which case a wake-up is scheduled for when it is due.
func (e *Engine) planSyncLocked(b *batch) {
	now := time.Now()
	if b.syncAll {
		clear(e.syncPending)
		e.lastSync = now
		// Every session compares its whole filter in a full batch.
		for _, ss := range e.filterDue {
			ss.due = false
		}
		e.filterDue, e.syncRound = nil, false
		return
	}
	if len(e.syncPending) == 0 || len(e.filterDue) > 0 {
		// The round being sent ends with a timer for the next one.
		return
	}
	if e.armSyncTimerLocked(now) {
		return
	}
	b.sync, e.syncPending, e.lastSync = e.syncPending, map[int]bool{}, now
	if e.syncTimer != nil {
		e.syncTimer.Stop()
		e.syncTimer = nil
	}
}

// armSyncTimerLocked schedules a wake-up for when the next sync is due and
// reports whether it is not due yet. It does nothing without pending
// classes.
func (e *Engine) armSyncTimerLocked(now time.Time) bool {
	if len(e.syncPending) == 0 {
		return false
	}
	due := e.lastSync.Add(max(e.syncEvery, policySyncEvery))
	if !now.Before(due) {
		return false
	}
	if e.syncTimer == nil {
		e.syncTimer = time.AfterFunc(due.Sub(now), e.wakeUp)
	}
	return true
}

// syncSlice bounds the time a batch spends sending sessions their own
// filter chunks. Under the generated 15,000-rule policy a sync took 4-5 s
// at 9,000 sessions, all within one batch: the engine lock was held that
// long, so joins in the meantime were published, and first maps served
// (Attach takes the lock), only after it. Now a sync is sent over as many
// batches as it takes, each spending at most syncSlice on it after its
// peers, and the next sync is not planned before the last is sent.
const syncSlice = 100 * time.Millisecond

// sendDueFiltersLocked sends due sessions their filter chunks (changed
// since the generation each holds) for at most e.syncSlice, at least a
// few per batch, and makes Run process another batch soon if some remain.
// After a recompilation (b.syncAll) it sends them all: a generation is
// only comparable within one compilation.
func (e *Engine) sendDueFiltersLocked(b *batch) {
	t0 := time.Now()
	i := 0
	for ; i < len(e.filterDue); i++ {
		if i%16 == 0 && i > 0 && !b.syncAll && time.Since(t0) >= e.syncSlice {
			break
		}
		ss := e.filterDue[i]
		ss.due = false
		if e.sessions[ss.s.NodeID].ss != ss {
			continue // the stream ended or was replaced
		}
		if pf := e.filterDeltaLocked(ss, b); pf != nil {
			ss.s.Push(&session.Update{PacketFilters: pf})
		}
	}
	rest := copy(e.filterDue, e.filterDue[i:])
	clear(e.filterDue[rest:])
	e.filterDue = e.filterDue[:rest]
	if rest == 0 {
		e.filterDue = nil
		return
	}
	e.wakeSoon()
}

// wakeSoon makes Run process another batch after its window.
func (e *Engine) wakeSoon() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// wakeUp makes Run process a batch (possibly empty: a sync that is due).
func (e *Engine) wakeUp() {
	e.mu.Lock()
	e.syncTimer = nil
	e.mu.Unlock()
	e.wakeSoon()
}

// classEncLocked returns the encodings the node's class shares, computing
// them once per class and compilation.
func (e *Engine) classEncLocked(nodeID uint64) *classEnc {
	cl := e.compiled.ClassOf(nodeID)
	ce := e.classEnc[cl]
	if ce == nil {
		ce = &classEnc{shared: e.compiled.FilterShared(nodeID)}
		ce.ssh = e.sshEnc.encode(e.compiled.SSHPolicy(nodeID))
		e.classEnc[cl] = ce
	}
	return ce
}

// filterLocked returns the node's filter encoded, shared by its class when
// the class's filter is.
func (e *Engine) filterLocked(nodeID uint64) *filterEnc {
	ce := e.classEncLocked(nodeID)
	if ce.shared && ce.filter != nil {
		return ce.filter
	}
	f := &filterEnc{chunks: map[string][]session.Part{"*": nil}}
	parts := e.compiled.ClassFilterParts(e.compiled.ClassOf(nodeID))
	own := ownDsts(e.compiled.OwnAddrs(nodeID))
	obj := &session.Builder{B: []byte(`{"*":null`)}
	for _, p := range parts {
		enc := e.filterEnc.encodePart(e.compiled, nodeID, p, own)
		f.chunks[p.Name()] = enc
		obj.B = append(obj.B, ',')
		obj.B = session.AppendString(obj.B, p.Name())
		obj.B = append(obj.B, ':')
		obj.Append(enc)
	}
	obj.B = append(obj.B, '}')
	f.obj = obj.Parts()
	var h maphash.Hash
	h.SetSeed(e.filterSeed)
	for _, p := range f.obj {
		if p.Chunk != nil {
			h.Write(p.Chunk.JSON())
		} else {
			h.Write(p.Raw)
		}
	}
	f.sum = h.Sum64() | 1 // never 0, "unknown"
	if ce.shared {
		ce.filter = f
	}
	return f
}

// Attach registers a new streaming session and queues its full map. A
// previous session of the same node is closed: the newest stream wins.
// The map's pieces are collected under the engine lock (so the record of
// what the session has is exact) and assembled after it is released.
func (e *Engine) Attach(s *session.Session) bool {
	e.catchUp(s.NodeID)
	e.mu.Lock()
	e.buildClassFullLocked(s.NodeID)
	n := e.nodes[s.NodeID]
	if n == nil {
		e.mu.Unlock()
		return false
	}
	if old, ok := e.sessions[s.NodeID]; ok {
		old.ss.s.Close()
	}
	ss := &sessState{s: s}
	e.sessions[s.NodeID] = sessEntry{ss: ss}
	e.connected.Store(s.NodeID, struct{}{})
	s.ExpectFull()
	parts := e.fullPartsLocked(ss, n)
	metrics.Sessions.Set(float64(len(e.sessions)))
	e.mu.Unlock()
	s.Push(&session.Update{Full: parts})
	return true
}

// Detach removes a session that ended. It reports whether it was the
// node's current session (false when a newer stream replaced it).
func (e *Engine) Detach(s *session.Session) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	ent, ok := e.sessions[s.NodeID]
	if !ok || ent.ss.s != s {
		return false
	}
	delete(e.sessions, s.NodeID)
	e.connected.Delete(s.NodeID)
	metrics.Sessions.Set(float64(len(e.sessions)))
	return true
}

// Connected reports whether the node has an open map stream. It does not
// wait for the engine's lock.
func (e *Engine) Connected(nodeID uint64) bool {
	_, ok := e.connected.Load(nodeID)
	return ok
}

// FullMap builds a one-shot map for a non-streaming request.
func (e *Engine) FullMap(nodeID uint64) ([]byte, bool) {
	e.catchUp(nodeID)
	e.mu.Lock()
	e.buildClassFullLocked(nodeID)
	n := e.nodes[nodeID]
	if n == nil {
		e.mu.Unlock()
		return nil, false
	}
	parts := e.fullPartsLocked(&sessState{}, n)
	e.mu.Unlock()
	return session.JoinParts(parts, false), true
}

// catchUp waits until the fan-out has published a node that exists in
// the state: a client that just registered asks for its map before the
// coalescing window that announces it has ended. Waiting for that batch,
// rather than processing the node alone, keeps joins batched.
func (e *Engine) catchUp(nodeID uint64) {
	deadline := time.NewTimer(catchUpTimeout)
	defer deadline.Stop()
	for {
		e.mu.Lock()
		known := e.nodes[nodeID] != nil
		done := e.batchDone
		e.mu.Unlock()
		if known || e.st.Node(nodeID) == nil {
			return
		}
		e.Notify(state.Event{Kind: state.NodeChanged, NodeID: nodeID})
		select {
		case <-done:
		case <-deadline.C:
			return
		}
	}
}

// catchUpTimeout bounds how long a first map request waits for its node
// to be published.
const catchUpTimeout = 30 * time.Second

func resolver(addr string) *dnstype.Resolver { return &dnstype.Resolver{Addr: addr} }

func equalStrings(a, b []string) bool        { return slices.Equal(a, b) }
func equalPrefixes(a, b []netip.Prefix) bool { return slices.Equal(a, b) }
