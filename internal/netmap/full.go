package netmap

import (
	"encoding/json"
	"math/bits"
	"slices"
	"time"
	"unsafe"

	"tailscale.com/tailcfg"
	"tailscale.com/types/opt"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/session"
	"github.com/tailplane/tailplane/internal/state"
)

// chunkSpan is the node-ID range one shared chunk of peers covers. Ranges
// are by ID, not position, so a join (a new, higher ID) or a change to one
// node leaves the other chunks as they were. Classes that see a span's
// peers the same way share its chunk; under a large policy classes differ
// in a few peers here and there (tagged nodes of many tags are spread over
// every range), and smaller spans keep the others shared. Under the
// generated 15,000-rule policy, the 4,148 classes' full maps held 3.1 GB
// of distinct chunks at 64 ids, 1.0 GB at 32 and 0.24 GB at 16, for 6%
// and 19% more compressed bytes per map than at 64 (a frame per chunk).
const chunkSpan = 32

// chunkEntry is a cached chunk: the peer encodings it holds, in order.
type chunkEntry struct {
	encs  []*encoded
	bare  bool // no leading comma: the first chunk of a delta's peers
	chunk *session.Chunk
	cacheUse
}

// cacheUse is when a cached part of full maps was last used: the batch
// number and the time. Parts unused for chunkTTL batches or for
// chunkIdleTTL are swept (sweepChunksLocked).
type cacheUse struct {
	used     uint64
	usedTime time.Time
}

func (u *cacheUse) touch(batch uint64, now time.Time) { u.used, u.usedTime = batch, now }

func (u *cacheUse) fresh(batch uint64, cutoff time.Time) bool {
	return batch-u.used <= chunkTTL && u.usedTime.After(cutoff)
}

// An unused chunk stays cached for chunkTTL batches, and at most
// chunkIdleTTL: in an idle tailnet no batches run, and the chunks (the
// JSON and zstd of every peer) would otherwise stay in memory for good.
const (
	chunkTTL     = 8
	chunkIdleTTL = time.Minute
)

// chunk returns the shared chunk holding exactly encs (each with a
// leading comma, or, bare, all but the first), building it on first
// request. Two classes that see the same peers the same way share it too.
// The caller holds mu or viewMu; the JSON is put together outside
// cacheMu, so builders on other cores are not held up by it.
func (e *Engine) chunk(encs []*encoded, bare bool) *session.Chunk {
	h := fnvOffset
	if bare {
		h = fnvMix(h, 1)
	}
	for _, x := range encs {
		h = fnvMix(h, uint64(uintptr(unsafe.Pointer(x))))
	}
	if c := e.cachedChunk(h, encs, bare, nil); c != nil {
		return c
	}
	size := 0
	for _, x := range encs {
		size += len(x.full) + 1
	}
	b := make([]byte, 0, size)
	for i, x := range encs {
		if i > 0 || !bare {
			b = append(b, ',')
		}
		b = append(b, x.full...)
	}
	return e.cachedChunk(h, encs, bare, session.NewChunk(b))
}

// cachedChunk returns the cached chunk of encs (hash h); when there is
// none, it caches and returns c.
func (e *Engine) cachedChunk(h uint64, encs []*encoded, bare bool, c *session.Chunk) *session.Chunk {
	now := time.Now()
	e.cacheMu.Lock()
	defer e.cacheMu.Unlock()
	for _, ce := range e.chunks[h] {
		if ce.bare == bare && equalEncs(ce.encs, encs) {
			ce.touch(e.batchNo, now)
			return ce.chunk
		}
	}
	if c != nil {
		e.chunks[h] = append(e.chunks[h], &chunkEntry{encs: encs, bare: bare, chunk: c, cacheUse: cacheUse{e.batchNo, now}})
	}
	return c
}

// FNV-1a over 64-bit words, for cache keys made of pointers and ids.
const fnvOffset uint64 = 14695981039346656037

func fnvMix(h, v uint64) uint64 { return (h ^ v) * 1099511628211 }

func equalEncs(a, b []*encoded) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// sweepChunksLocked drops chunks not used for chunkTTL batches or for
// chunkIdleTTL.
func (e *Engine) sweepChunksLocked() {
	cutoff := time.Now().Add(-chunkIdleTTL)
	for cl, cf := range e.classFull {
		if !cf.fresh(e.batchNo, cutoff) || !e.extendable(cf.gen) {
			delete(e.classFull, cl)
		}
	}
	for h, pc := range e.profChunks {
		if !pc.fresh(e.batchNo, cutoff) {
			delete(e.profChunks, h)
		}
	}
	e.cacheMu.Lock()
	defer e.cacheMu.Unlock()
	sweepLists(e.spanChunks, e.batchNo, cutoff)
	sweepLists(e.chunks, e.batchNo, cutoff)
}

// sweepLists keeps the entries of m's lists that are fresh.
func sweepLists[T interface{ fresh(uint64, time.Time) bool }](m map[uint64][]T, batch uint64, cutoff time.Time) {
	for h, list := range m {
		if list = slices.DeleteFunc(list, func(x T) bool { return !x.fresh(batch, cutoff) }); len(list) == 0 {
			delete(m, h)
		} else {
			m[h] = list
		}
	}
}

// fullPartsLocked builds a session's full map as parts: its own header
// (self node, first peer), shared chunks of further peers, and a trailer.
// It records what the session was sent.
func (e *Engine) fullPartsLocked(ss *sessState, n *state.Node) []session.Part {
	ce, f := e.classEncLocked(n.ID), e.filterLocked(n.ID)
	self := e.selfJSONLocked(n)
	ss.self, ss.selfJSON, ss.filterSum, ss.filterGen, ss.ssh = n, self, f.sum, e.compiled.Gen(), ce.ssh

	// The class's peer list, shared by its members, minus this node. The
	// first peer opens the Peers array in the header; the rest go in
	// chunks by node-ID span, shared by the class (and with any class
	// that sees those peers the same way).
	cf := e.classFullLocked(n.ID)
	var first *policy.Peer
	for i := range cf.peers {
		if p := &cf.peers[i]; p.ID != n.ID && e.nodes[p.ID] != nil {
			first = p
			break
		}
	}
	head := session.NewObj(nil)
	head.Raw("Node", self)
	head.Raw("DERPMap", e.derpJSON)
	var parts []session.Part
	if first != nil {
		fn := e.nodes[first.ID]
		hb := append(head.Key("Peers"), '[')
		e.cacheMu.Lock()
		hb = append(hb, e.peerJSON(fn, first.AllowedIPs, first.PrimaryRoutes).full...)
		e.cacheMu.Unlock()
		parts = append(parts, session.Part{Raw: hb})
		for _, sp := range cf.spans {
			switch {
			case sp.span == n.ID/chunkSpan:
				parts = e.ownSpanPartsLocked(parts, sp.peers, n.ID, first.ID)
			case sp.span == first.ID/chunkSpan:
				// Every member but the first peer itself has the
				// same span without it: cached as one chunk.
				parts = appendChunk(parts, e.spanChunk(sp.peers, first.ID, first.ID, nil))
			default:
				parts = appendChunk(parts, sp.chunk)
			}
		}
		head = session.ContinueObj("]")
	}
	head.Raw("DNSConfig", e.dnsJSON)
	head.Value("Domain", e.static.BaseDomain)
	head.Value("CollectServices", opt.False)
	head.RawParts("PacketFilters", f.obj)
	head.RawParts("UserProfiles", e.profilePartsLocked(cf, ownerID(n)))
	head.Raw("SSHPolicy", ce.ssh)
	head.Value("ControlTime", time.Now().UTC())
	return append(parts, head.Parts()...)
}

// miniSpan divides the span holding the session's own node: without that
// node it is a list only this session gets, compressed for it alone, so
// it is built from miniSpan-ID pieces of which only the one holding the
// node is the session's own. Rebuilding whole 256-peer spans per first
// map was most of the per-session compression in a join storm.
const miniSpan = 16

// ownSpanPartsLocked appends the span of peers that holds the session's
// own node (skip1), without it and without the header's peer (skip2).
func (e *Engine) ownSpanPartsLocked(parts []session.Part, peers []policy.Peer, skip1, skip2 uint64) []session.Part {
	for rest := peers; len(rest) > 0; {
		k := runLen(rest, miniSpan)
		parts = appendChunk(parts, e.spanChunk(rest[:k], skip1, skip2, nil))
		rest = rest[k:]
	}
	return parts
}

// runLen is how many leading peers (sorted by ID) fall in the same range
// of width IDs as the first.
func runLen(peers []policy.Peer, width uint64) int {
	r := peers[0].ID / width
	k := 1
	for k < len(peers) && peers[k].ID/width == r {
		k++
	}
	return k
}

// appendChunk appends a chunk of peers, unless it has none.
func appendChunk(parts []session.Part, c *session.Chunk) []session.Part {
	if c == nil {
		return parts
	}
	return append(parts, session.Part{Chunk: c})
}

// profileChunkLocked returns the profiles of a set of owners,
// comma-separated in ID order, as a chunk shared by every class with the
// same owners (most classes of a large tailnet see everybody).
func (e *Engine) profileChunkLocked(owners *ownerSet) *session.Chunk {
	ids := owners.sorted()
	h := fnvOffset
	for _, uid := range ids {
		h = fnvMix(h, uint64(uid))
	}
	if pc := e.profChunks[h]; pc != nil && slices.Equal(pc.uids, ids) {
		pc.touch(e.batchNo, time.Now())
		return pc.chunk
	}
	var pb []byte
	for _, uid := range ids {
		pj := e.profileJSONLocked(uid)
		if pj == nil {
			continue
		}
		if len(pb) > 0 {
			pb = append(pb, ',')
		}
		pb = append(pb, pj...)
	}
	pc := &profChunk{uids: ids, chunk: session.NewChunk(pb), cacheUse: cacheUse{e.batchNo, time.Now()}}
	e.profChunks[h] = pc
	return pc.chunk
}

// profChunk is a cached list of profiles.
type profChunk struct {
	uids  []tailcfg.UserID
	chunk *session.Chunk
	cacheUse
}

// profilePartsLocked returns the UserProfiles list of a full map: the
// session's owner, then the class's shared chunk of its peers' owners.
// Marshalling the profiles of a few thousand owners per first map was a
// large part of a join storm's cost.
func (e *Engine) profilePartsLocked(cf *classFull, own tailcfg.UserID) []session.Part {
	if cf.profiles == nil {
		cf.profiles = e.profileChunkLocked(&cf.owners)
	}
	b := []byte{'['}
	if !cf.owners.has(own) {
		if pj := e.profileJSONLocked(own); pj != nil {
			b = append(b, pj...)
			if len(cf.profiles.JSON()) > 0 {
				b = append(b, ',')
			}
		}
	}
	if len(cf.profiles.JSON()) == 0 {
		return []session.Part{{Raw: append(b, ']')}}
	}
	return []session.Part{{Raw: b}, {Chunk: cf.profiles}, {Raw: []byte{']'}}}
}

// classFull is a class's peers as full maps carry them, valid while the
// tailnet's nodes and the compilation stay as they were (viewGen), and
// extended in place by batches that only add nodes or change them softly.
type classFull struct {
	gen      uint64
	peers    []policy.Peer
	spans    []peerSpan
	owners   ownerSet       // of the peers
	profiles *session.Chunk // owners' profiles, comma-separated
	cacheUse
}

// peerSpan is the class's peers in one node-ID span, and their chunk.
type peerSpan struct {
	span  uint64
	peers []policy.Peer
	chunk *session.Chunk
}

// viewStep is an incremental batch that changed the view generation: the
// nodes it added and those it changed without changing any peer list.
type viewStep struct {
	gen   uint64
	added []uint64
	soft  []uint64
}

// maxViewSteps is how many incremental batches a class's full-map peers
// can be brought forward over.
const maxViewSteps = 16

// recordViewStepLocked notes a new view generation: an incremental step
// when b only added nodes or changed them softly under an extended (not
// recompiled) compilation, else a break that full-map peers cannot be
// brought forward over.
func (e *Engine) recordViewStepLocked(b *batch) {
	if b.full || b.syncAll || len(b.removed) > 0 {
		e.viewSteps = e.viewSteps[:0]
		return
	}
	if len(e.viewSteps) == maxViewSteps {
		e.viewSteps = slices.Delete(e.viewSteps, 0, 1)
	}
	e.viewSteps = append(e.viewSteps, viewStep{gen: e.viewGen, added: slices.Clone(b.added), soft: slices.Clone(b.soft)})
}

// extendable reports whether full-map peers built at view generation gen
// are current or can be brought forward.
func (e *Engine) extendable(gen uint64) bool {
	if gen == e.viewGen {
		return true
	}
	n := len(e.viewSteps)
	return n > 0 && e.viewSteps[n-1].gen == e.viewGen && e.viewSteps[0].gen <= gen+1
}

// stepsSince returns the nodes added and softly changed since view
// generation gen, or false when a batch since then was not incremental or
// is no longer recorded.
func (e *Engine) stepsSince(gen uint64) (added, soft []uint64, ok bool) {
	if !e.extendable(gen) {
		return nil, nil, false
	}
	for _, st := range e.viewSteps {
		if st.gen > gen {
			added = append(added, st.added...)
			soft = append(soft, st.soft...)
		}
	}
	slices.Sort(added)
	return added, soft, true
}

// classFullLocked returns the class's full-map peers, building them once
// per class and view generation. Looking up each peer's encoding for
// every full map was the largest cost of a reconnect storm (27% of the
// server's CPU in peerJSON at 10,000 nodes: 10,000 maps of 9,999 peers).
func (e *Engine) classFullLocked(nodeID uint64) *classFull {
	cl := e.compiled.ClassOf(nodeID)
	cf := e.classFull[cl]
	if cf != nil && cf.gen != e.viewGen {
		cf = e.extendClassFullLocked(cf, nodeID)
	}
	if cf == nil {
		// The peer list is the class's cached one, not a copy: at
		// thousands of classes a copy each took gigabytes.
		cf = e.newClassFull(e.viewGen, e.classPeersLocked(nodeID))
	}
	e.classFull[cl] = cf
	cf.touch(e.batchNo, time.Now())
	return cf
}

// buildClassFullLocked builds the full-map peers of nodeID's class, when
// they are missing, outside mu (holding viewMu shared) and caches them, so that
// the classes of a reconnect storm are built on every core rather than
// one after another under mu: after a restart under the 15,000-rule
// policy each of 4,148 classes builds its list and spans on its first
// reconnect, and that was most of the storm's time under mu. A class
// already being built is waited for. If a batch changes the view in the
// meantime the result is dropped, and classFullLocked builds under mu.
// The caller holds mu; it is released while building or waiting, so the
// caller must look up what it needs again after the call.
func (e *Engine) buildClassFullLocked(nodeID uint64) {
	if e.nodes[nodeID] == nil {
		return
	}
	cl := e.compiled.ClassOf(nodeID)
	if cf := e.classFull[cl]; cf != nil && e.extendable(cf.gen) {
		return
	}
	if wait := e.building[cl]; wait != nil {
		e.mu.Unlock()
		<-wait
		e.mu.Lock()
		return
	}
	done := make(chan struct{})
	e.building[cl] = done
	gen := e.viewGen
	e.mu.Unlock()

	var cf *classFull
	e.viewMu.RLock()
	if e.viewGen == gen {
		cf = e.newClassFull(gen, e.compiled.ClassPeers(nodeID))
	}
	e.viewMu.RUnlock()

	e.mu.Lock()
	delete(e.building, cl)
	close(done)
	if old := e.classFull[cl]; cf != nil && e.viewGen == gen && (old == nil || old.gen != gen) {
		cf.touch(e.batchNo, time.Now())
		e.classFull[cl] = cf
		e.classPeers[cl] = cf.peers
	}
}

// newClassFull builds a class's full-map peers from its peer list: the
// spans' chunks and the peers' owners. The caller holds mu or viewMu.
func (e *Engine) newClassFull(gen uint64, peers []policy.Peer) *classFull {
	cf := &classFull{gen: gen, peers: peers}
	cf.spans = e.spans(peers, nil, nil, &cf.owners)
	return cf
}

// addOwner adds the owner of peer id; a new one invalidates the profiles.
func (cf *classFull) addOwner(e *Engine, id uint64) {
	if pn := e.nodes[id]; pn != nil && cf.owners.add(ownerID(pn)) {
		cf.profiles = nil
	}
}

// extendClassFullLocked brings a class's full-map peers forward over the
// incremental batches since it was built: joined nodes the class sees are
// appended (node IDs only grow) and only the spans holding joined or
// changed nodes get new chunks. Rebuilding every class's list and spans
// after each batch of joins was an eighth of a join storm's CPU. It
// returns nil when the list must be built anew.
func (e *Engine) extendClassFullLocked(old *classFull, nodeID uint64) *classFull {
	added, soft, ok := e.stepsSince(old.gen)
	if !ok {
		return nil
	}
	var last uint64
	if n := len(old.peers); n > 0 {
		last = old.peers[n-1].ID
	}
	if len(added) > 0 && added[0] <= last {
		return nil
	}
	// The old entry is replaced, so its slices and set are reused.
	cf := &classFull{gen: e.viewGen, peers: old.peers, owners: old.owners, profiles: old.profiles}
	dirty := map[uint64]bool{}
	for _, id := range soft {
		dirty[id/chunkSpan] = true
	}
	for _, id := range added {
		p, ok := e.compiled.ClassPeer(nodeID, id)
		if !ok {
			continue
		}
		cf.peers = append(cf.peers, p)
		dirty[id/chunkSpan] = true
		cf.addOwner(e, id)
	}
	cf.spans = e.spans(cf.peers, old.spans, dirty, nil)
	return cf
}

// spans divides a peer list into chunks by node-ID span, reusing the
// chunks of old spans that are not dirty. The owners of the peers in
// spans it builds are added to owners, if set. The caller holds mu or
// viewMu.
func (e *Engine) spans(peers []policy.Peer, old []peerSpan, dirty map[uint64]bool, owners *ownerSet) []peerSpan {
	var out []peerSpan
	for rest := peers; len(rest) > 0; {
		span, k := rest[0].ID/chunkSpan, runLen(rest, chunkSpan)
		for len(old) > 0 && old[0].span < span {
			old = old[1:]
		}
		var ch *session.Chunk
		if len(old) > 0 && old[0].span == span && !dirty[span] {
			ch = old[0].chunk
		} else {
			ch = e.spanChunk(rest[:k], 0, 0, owners)
		}
		out = append(out, peerSpan{span: span, peers: rest[:k], chunk: ch})
		rest = rest[k:]
	}
	return out
}

// spanChunk returns the chunk of peers without the nodes skip1 and skip2
// (the session's own node and the peer its header holds), nil if none is
// left. The peers' owners are added to owners, if set. The peers lie in
// one span of chunkSpan ids, whose last change (spanChanged) decides
// whether the chunk cached for their views still holds. The caller holds
// mu or viewMu.
func (e *Engine) spanChunk(peers []policy.Peer, skip1, skip2 uint64, owners *ownerSet) *session.Chunk {
	if len(peers) == 0 {
		return nil
	}
	h := spanHash(peers, skip1, skip2)
	changed := e.spanChanged[peers[0].ID/chunkSpan]
	e.cacheMu.Lock()
	se := e.cachedSpan(h, peers, skip1, skip2, changed)
	e.cacheMu.Unlock()
	if se == nil {
		se = e.buildSpan(peers, skip1, skip2)
		e.cacheMu.Lock()
		e.spanChunks[h] = append(e.spanChunks[h], se)
		e.cacheMu.Unlock()
	}
	if owners != nil {
		for _, uid := range se.owners {
			owners.add(uid)
		}
	}
	return se.chunk
}

// spanEntry is a cached span chunk: the peer views it was built from
// (a copy, so the addresses' slices, whose identity the key is made of,
// stay alive), and the distinct owners of the peers it holds.
type spanEntry struct {
	peers        []policy.Peer
	skip1, skip2 uint64
	chunk        *session.Chunk
	owners       []tailcfg.UserID
	gen          uint64 // viewGen when built
	cacheUse
}

// spanHash hashes a span's views by identity: peer IDs and the slices of
// their allowed IPs and routes, which a compilation shares between the
// lists of every class that sees a peer the same way.
func spanHash(peers []policy.Peer, skip1, skip2 uint64) uint64 {
	h := fnvMix(fnvMix(fnvOffset, skip1), skip2)
	for i := range peers {
		p := &peers[i]
		h = fnvMix(h, p.ID)
		h = fnvMix(h, uint64(uintptr(unsafe.Pointer(unsafe.SliceData(p.AllowedIPs))))+uint64(len(p.AllowedIPs)))
		h = fnvMix(h, uint64(uintptr(unsafe.Pointer(unsafe.SliceData(p.PrimaryRoutes))))+uint64(len(p.PrimaryRoutes)))
	}
	return h
}

// sameViews reports whether two spans' views are the same slices.
func sameViews(a, b []policy.Peer) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		p, q := &a[i], &b[i]
		if p.ID != q.ID || !sameSlice(p.AllowedIPs, q.AllowedIPs) || !sameSlice(p.PrimaryRoutes, q.PrimaryRoutes) {
			return false
		}
	}
	return true
}

func sameSlice[T any](a, b []T) bool {
	return len(a) == len(b) && unsafe.SliceData(a) == unsafe.SliceData(b)
}

// cachedSpan returns the cached chunk of a span's views, if no node of
// the span changed since it was built (at view generation changed or
// later). The caller holds cacheMu.
func (e *Engine) cachedSpan(h uint64, peers []policy.Peer, skip1, skip2, changed uint64) *spanEntry {
	list := e.spanChunks[h]
	for i, se := range list {
		if se.skip1 != skip1 || se.skip2 != skip2 || !sameViews(se.peers, peers) {
			continue
		}
		if se.gen < changed {
			// A node of the span changed since: the entry is stale
			// for good, and is replaced by the caller.
			e.spanChunks[h] = slices.Delete(list, i, i+1)
			return nil
		}
		se.touch(e.batchNo, time.Now())
		return se
	}
	return nil
}

// buildSpan builds the chunk of a span's peers without skip1 and skip2.
// The nodes are looked up before taking cacheMu, which builders of other
// classes wait for.
func (e *Engine) buildSpan(peers []policy.Peer, skip1, skip2 uint64) *spanEntry {
	se := &spanEntry{peers: slices.Clone(peers), skip1: skip1, skip2: skip2, gen: e.viewGen, cacheUse: cacheUse{e.batchNo, time.Now()}}
	pns := make([]*state.Node, len(peers))
	n := 0
	var owners ownerSet
	for i, p := range peers {
		if pn := e.nodes[p.ID]; pn != nil && p.ID != skip1 && p.ID != skip2 {
			pns[i] = pn
			n++
			if uid := ownerID(pn); owners.add(uid) {
				se.owners = append(se.owners, uid)
			}
		}
	}
	if n == 0 {
		return se
	}
	encs := make([]*encoded, 0, n)
	e.cacheMu.Lock()
	for i, pn := range pns {
		if pn != nil {
			encs = append(encs, e.peerJSON(pn, peers[i].AllowedIPs, peers[i].PrimaryRoutes))
		}
	}
	e.cacheMu.Unlock()
	se.chunk = e.chunk(encs, false)
	return se
}

// classPeersLocked returns a node's class peer list, computed once per
// class per compilation.
func (e *Engine) classPeersLocked(nodeID uint64) []policy.Peer {
	cl := e.compiled.ClassOf(nodeID)
	if l, ok := e.classPeers[cl]; ok {
		return l
	}
	l := e.compiled.ClassPeers(nodeID)
	e.classPeers[cl] = l
	return l
}

// ownerSet is a set of user IDs, one bit each (IDs are handed out in
// order): a class's full map collects the owners of thousands of peers,
// and a map per class was most of the cost of collecting them in a
// restart storm under the 15,000-rule policy.
type ownerSet struct {
	bits   []uint64
	tagged bool                    // TaggedUserID
	big    map[tailcfg.UserID]bool // IDs too large for bits
}

// maxOwnerBit bounds the IDs kept as bits.
const maxOwnerBit = 1 << 20

// add adds uid and reports whether it was new.
func (s *ownerSet) add(uid tailcfg.UserID) bool {
	switch {
	case uid == TaggedUserID:
		if s.tagged {
			return false
		}
		s.tagged = true
		return true
	case uid < 0 || uid >= maxOwnerBit:
		if s.big[uid] {
			return false
		}
		if s.big == nil {
			s.big = map[tailcfg.UserID]bool{}
		}
		s.big[uid] = true
		return true
	}
	w, b := int(uid/64), uint64(1)<<(uid%64)
	if w >= len(s.bits) {
		s.bits = append(s.bits, make([]uint64, w+1-len(s.bits))...)
	}
	if s.bits[w]&b != 0 {
		return false
	}
	s.bits[w] |= b
	return true
}

func (s *ownerSet) has(uid tailcfg.UserID) bool {
	switch {
	case uid == TaggedUserID:
		return s.tagged
	case uid < 0 || uid >= maxOwnerBit:
		return s.big[uid]
	}
	w := int(uid / 64)
	return w < len(s.bits) && s.bits[w]&(uint64(1)<<(uid%64)) != 0
}

// sorted returns the set's IDs in increasing order.
func (s *ownerSet) sorted() []tailcfg.UserID {
	var out []tailcfg.UserID
	for w, x := range s.bits {
		for ; x != 0; x &= x - 1 {
			out = append(out, tailcfg.UserID(w*64+bits.TrailingZeros64(x)))
		}
	}
	if s.tagged {
		out = append(out, TaggedUserID)
	}
	for uid := range s.big {
		out = append(out, uid)
	}
	slices.Sort(out)
	return out
}

// profileJSONLocked returns a user's profile as clients see it, encoded
// once per version of the users.
func (e *Engine) profileJSONLocked(uid tailcfg.UserID) []byte {
	if b, ok := e.profJSON[uid]; ok {
		return b
	}
	var p tailcfg.UserProfile
	if uid == TaggedUserID {
		p = taggedProfile
	} else if u := e.users[uint64(uid)]; u != nil {
		p = profileOf(u)
	} else {
		return nil
	}
	b, _ := json.Marshal(p)
	e.profJSON[uid] = b
	return b
}

func (e *Engine) selfJSONLocked(n *state.Node) json.RawMessage {
	tn := e.tailNode(n, peerFields{})
	// Whether a node is online is news for its peers, not for itself.
	tn.PrimaryRoutes, tn.Online, tn.LastSeen = nil, nil, nil
	tn.CapMap = e.compiled.CapMap(n.ID)
	b, _ := json.Marshal(tn)
	return b
}
