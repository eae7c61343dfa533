package netmap

import (
	"bytes"
	"cmp"
	"encoding/json"
	"maps"
	"slices"
	"unsafe"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/session"
	"github.com/tailplane/tailplane/internal/state"
)

// update accumulates one session's delta.
type update struct {
	u session.Update
	// peers and patches size the maps when first needed: the batch's
	// joined and changed nodes, most of which a class sees in a join
	// storm (growing the maps was a ninth of the bytes the server
	// allocated in one under the 15,000-rule policy).
	peers, patches int
	// list records the changed peers' encodings, in the order added, for
	// a shared delta's chunks (chunkPeersLocked).
	list []changedPeer
}

type changedPeer struct {
	id  uint64
	enc *encoded
}

// changed adds a peer's new encoding, and its owner's profile.
func (d *update) changed(e *Engine, pn *state.Node, enc *encoded) {
	if d.u.PeersChanged == nil {
		d.u.PeersChanged = make(map[uint64]json.RawMessage, d.peers)
	}
	d.u.PeersChanged[pn.ID] = enc.full
	d.list = append(d.list, changedPeer{pn.ID, enc})
	uid := ownerID(pn)
	if _, ok := d.u.UserProfiles[uint64(uid)]; !ok {
		if pj := e.profileJSONLocked(uid); pj != nil {
			if d.u.UserProfiles == nil {
				d.u.UserProfiles = map[uint64]json.RawMessage{}
			}
			d.u.UserProfiles[uint64(uid)] = pj
		}
	}
}

func (d *update) removed(id uint64) {
	if d.u.PeersRemoved == nil {
		d.u.PeersRemoved = map[uint64]struct{}{}
	}
	d.u.PeersRemoved[id] = struct{}{}
}

// peer records what the session must learn about a peer it saw as oldEnc
// (of version old) and now sees as newEnc: nothing, a patch, or the node.
func (d *update) peer(e *Engine, b *batch, old, cur *state.Node, oldEnc, newEnc *encoded) {
	switch {
	case oldEnc == newEnc || bytes.Equal(oldEnc.full, newEnc.full):
	case bytes.Equal(oldEnc.fingerprint, newEnc.fingerprint) && !clearsExpiry(old, cur):
		if d.u.Patches == nil {
			d.u.Patches = make(map[uint64]*session.Patch, d.patches)
		}
		d.u.Patches[cur.ID] = b.patch(old, cur)
	default:
		d.changed(e, cur, newEnc)
	}
}

// clearsExpiry reports whether cur no longer expires where old did (its
// user logged it in again). A patch cannot say so: PeerChange.KeyExpiry
// is a *time.Time marked omitzero, and encoding/json omits a pointer to
// the zero time, so the peer would keep the old expiry and go on treating
// the node as expired. The whole node carries it.
func clearsExpiry(old, cur *state.Node) bool { return !old.Expiry.IsZero() && cur.Expiry.IsZero() }

// patch returns the patch from old to cur, shared within the batch.
func (b *batch) patch(old, cur *state.Node) *session.Patch {
	if p, ok := b.patches[cur.ID]; ok {
		return p
	}
	p := &session.Patch{Change: patchFor(old, cur)}
	b.patches[cur.ID] = p
	return p
}

// result returns the update, or nil when there is nothing to send.
func (d *update) result() *session.Update {
	u := &d.u
	if u.Self == nil && u.PacketFilters == nil && u.SSHPolicy == nil && len(u.PeersChanged) == 0 &&
		len(u.PeersRemoved) == 0 && len(u.Patches) == 0 {
		return nil
	}
	return u
}

// minChunkedPeers is the least number of changed peers a shared delta
// carries as chunks (chunkPeersLocked).
const minChunkedPeers = 8

// shareLocked returns an earlier shared delta of the batch with u's
// content, or u itself, its changed peers (in the order d.list recorded
// them) carried as chunks.
func (e *Engine) shareLocked(sd sameDeltas, u *session.Update, peers []changedPeer) *session.Update {
	if v := sd.find(u); v != u || u == nil {
		return v
	}
	e.chunkPeersLocked(u, peers)
	return u
}

// chunkPeersLocked sets u.PeerChunks from its changed peers' encodings:
// one chunk per node-ID span, shared (through the chunk cache) by every
// delta that carries the same peers of that span the same way. In a join
// storm under the generated 15,000-rule policy each of about 2,000
// distinct class deltas per batch held most of the batch's joined nodes,
// and compressing each whole was a seventh of the server's CPU; classes
// see a span's joined nodes in far fewer ways than they see the batch.
func (e *Engine) chunkPeersLocked(u *session.Update, peers []changedPeer) {
	if len(peers) < minChunkedPeers || len(peers) != len(u.PeersChanged) {
		return
	}
	byID := func(a, b changedPeer) int { return cmp.Compare(a.id, b.id) }
	if !slices.IsSortedFunc(peers, byID) {
		slices.SortFunc(peers, byID)
	}
	var chunks []*session.Chunk
	for rest := peers; len(rest) > 0; {
		span, k := rest[0].id/chunkSpan, 1
		for k < len(rest) && rest[k].id/chunkSpan == span {
			k++
		}
		encs := make([]*encoded, k)
		for i := range encs {
			encs[i] = rest[i].enc
		}
		chunks = append(chunks, e.chunk(encs, len(chunks) == 0))
		rest = rest[k:]
	}
	u.PeerChunks = chunks
}

// filterAndSelf adds the session's own node, and its filter and SSH policy
// if filters is set and they changed.
func (e *Engine) filterAndSelf(ss *sessState, b *batch, d *update, filters bool) {
	n := e.nodes[ss.s.NodeID]
	if n == nil {
		return
	}
	d.u.Self = e.selfChangeLocked(ss, n)
	if !filters {
		return
	}
	d.u.PacketFilters = e.filterDeltaLocked(ss, b)
	ce := e.classEncLocked(n.ID)
	if !bytes.Equal(ce.ssh, ss.ssh) {
		d.u.SSHPolicy = ce.ssh
	}
	ss.ssh = ce.ssh
}

// filterDeltaLocked returns the filter chunks session ss must receive, or
// nil. After a recompilation (b.syncAll) that is the whole filter with the
// "*" reset, when its hash differs from the one the session holds;
// otherwise the chunks joins and leaves changed since the session last
// synced, and deletions of those leaves emptied.
func (e *Engine) filterDeltaLocked(ss *sessState, b *batch) map[string][]session.Part {
	id := ss.s.NodeID
	since := ss.filterGen
	ss.filterGen = e.compiled.Gen()
	if b.syncAll {
		if pf, ok := e.fullFilterDeltaLocked(ss, b, since); ok {
			return pf
		}
		f := e.filterLocked(id)
		if f.sum == ss.filterSum {
			return nil
		}
		ss.filterSum = f.sum
		return f.chunks
	}
	parts := e.partsSince(e.compiled, e.compiled.ClassOf(id), since)
	if len(parts) == 0 {
		return nil
	}
	own := ownDsts(e.compiled.OwnAddrs(id))
	pf := make(map[string][]session.Part, len(parts))
	for _, p := range parts {
		if p.Deleted() {
			pf[p.Name()] = nil // a leave emptied its sources
			continue
		}
		pf[p.Name()] = e.filterEnc.encodePart(e.compiled, id, p, own)
	}
	ss.filterSum = 0
	if e.classEncLocked(id).shared {
		ss.filterSum = e.filterLocked(id).sum
	}
	return pf
}

// selfChangeLocked returns the session's own node if what it would see of
// itself changed, else nil.
func (e *Engine) selfChangeLocked(ss *sessState, n *state.Node) json.RawMessage {
	if n == nil || n == ss.self {
		return nil
	}
	ss.self = n
	b := e.selfJSONLocked(n)
	if bytes.Equal(b, ss.selfJSON) {
		return nil
	}
	ss.selfJSON = b
	return b
}

// diffBatchLocked applies a batch without identity changes to one session:
// joined nodes it may see, left nodes it saw, patches for changed peers,
// and its own filter and SSH policy when the batch syncs its class. Cost:
// one class lookup per changed node.
func (e *Engine) diffBatchLocked(ss *sessState, b *batch) *session.Update {
	var d update
	e.filterAndSelf(ss, b, &d, b.filtersFor(e.compiled.ClassOf(ss.s.NodeID)))
	e.batchPeersLocked(ss, b, &d)
	return d.result()
}

// batchPeersLocked adds what session ss must learn of the batch's nodes:
// joined ones it sees, left ones it saw, and patches or new encodings of
// changed ones.
func (e *Engine) batchPeersLocked(ss *sessState, b *batch, d *update) {
	me := ss.s.NodeID
	d.peers, d.patches = len(b.added), len(b.soft)
	if len(b.added) > 0 {
		j := e.joinedViewsLocked(b)
		cl := e.compiled.ClassOf(me)
		for k, id := range b.added {
			if id != me && j.views.Sees(cl, k) {
				d.changed(e, j.nodes[k], j.enc(e, cl, k))
			}
		}
	}
	for _, id := range b.removed {
		if b.sawRemoved(me, id) {
			d.removed(id)
		}
	}
	for _, id := range b.soft {
		if id == me {
			continue
		}
		// No identity changed: visibility and allowed IPs are as before.
		p, ok := e.compiled.PeerView(me, id)
		if !ok {
			continue
		}
		old, cur := b.prev[id], e.nodes[id]
		d.peer(e, b, old, cur, e.peerJSON(old, p.AllowedIPs, p.PrimaryRoutes), e.peerJSON(cur, p.AllowedIPs, p.PrimaryRoutes))
	}
}

// joinedViews indexes a batch's added nodes (by position in b.added) for
// the sessions' diffs: their versions, visibility by class through
// policy.NodeViews, and the encoding of their plain view (their own
// addresses), which most classes that see them share. Looking each node
// up by ID, in the compilation and in the engine's maps, once per class
// and node was most of the class deltas' cost in the 15K join storm.
type joinedViews struct {
	views *policy.NodeViews
	nodes []*state.Node
	plain []*encoded // built on first use
}

// joinedViewsLocked returns b's index of added nodes, building it once.
func (e *Engine) joinedViewsLocked(b *batch) *joinedViews {
	if b.joined == nil {
		j := &joinedViews{views: e.compiled.NodeViews(b.added), nodes: make([]*state.Node, len(b.added)), plain: make([]*encoded, len(b.added))}
		for k, id := range b.added {
			j.nodes[k] = e.nodes[id]
		}
		b.joined = j
	}
	return b.joined
}

// enc returns the encoding of how class cl sees the added node at
// position k (which it sees).
func (j *joinedViews) enc(e *Engine, cl, k int) *encoded {
	plain := j.views.Plain(cl, k)
	if plain && j.plain[k] != nil {
		return j.plain[k]
	}
	p := j.views.View(cl, k)
	x := e.peerJSON(j.nodes[k], p.AllowedIPs, p.PrimaryRoutes)
	if plain {
		j.plain[k] = x
	}
	return x
}

// equalPeer reports whether two views of a peer are the same.
func equalPeer(a, c policy.Peer) bool {
	return a.ID == c.ID && equalPrefixes(a.AllowedIPs, c.AllowedIPs) && equalPrefixes(a.PrimaryRoutes, c.PrimaryRoutes)
}

// fullDiff is a full batch's diff of the previous and the new
// compilation, computed once per pair of a session's previous and new
// class: members of a class see the same peers, so every session of a
// pair gets the same peer changes (less its own node), as one shared
// update. Visibility is a bit lookup per node (policy.NodeViews), and
// views are compared only for nodes that changed or that a class may see
// other than plainly. Diffing each session's walk of both compilations'
// peer lists made a router joining the generated 15,000-rule tailnet of
// 10,000 nodes cost the engine 28-31 s (half building those lists for
// both compilations, a fifth walking them per session).
type fullDiff struct {
	ids      []uint64 // every node of either compilation, sorted
	touched  []bool   // by position: the batch changed, added or removed it
	old, cur *policy.NodeViews
	pairs    map[[2]int]*session.Update
	same     sameDeltas
	// filters holds each class pair's filter part changes, and sameSrc
	// whether an old and a new source list are equal (lists are shared
	// by many parts and classes, and long).
	filters map[[2]int]*filterPair
	sameSrc map[[2]srcKey]bool
}

// filterPair is what a full batch changed in the filter parts of a class
// pair: parts new or different, and names gone. whole: most parts
// changed (rules were renumbered, say), so the whole filter, with the
// "*" reset, is no larger.
type filterPair struct {
	changed []policy.FilterPart
	deleted []string
	whole   bool
}

func (e *Engine) newFullDiff(b *batch) *fullDiff {
	ids := make([]uint64, 0, len(e.nodes)+len(b.removed))
	for id := range e.nodes {
		ids = append(ids, id)
	}
	ids = append(ids, b.removed...)
	slices.Sort(ids)
	fd := &fullDiff{ids: ids, touched: make([]bool, len(ids)), pairs: map[[2]int]*session.Update{}, same: sameDeltas{},
		filters: map[[2]int]*filterPair{}, sameSrc: map[[2]srcKey]bool{}}
	for k, id := range ids {
		fd.touched[k] = b.touches(id)
	}
	if e.compiled != nil {
		fd.cur = e.compiled.NodeViews(ids)
	}
	if b.prevCompiled != nil {
		fd.old = b.prevCompiled.NodeViews(ids)
	}
	return fd
}

// classOf returns node id's class under c, or -1.
func classOf(c *policy.Compiled, id uint64) int {
	if c == nil {
		return -1
	}
	return c.ClassOf(id)
}

// pairDeltaLocked returns the peer changes of a session whose class was
// oc (-1: none) and is nc, including the session's own node if it is
// among them; nil when there are none. It is computed once per pair.
func (e *Engine) pairDeltaLocked(b *batch, fd *fullDiff, oc, nc int) *session.Update {
	k := [2]int{oc, nc}
	if u, ok := fd.pairs[k]; ok {
		return u
	}
	var d update
	for i, id := range fd.ids {
		was := oc >= 0 && fd.old.Sees(oc, i)
		is := nc >= 0 && fd.cur.Sees(nc, i)
		switch {
		case was && !is:
			d.removed(id)
		case is && !was:
			if pn := e.nodes[id]; pn != nil {
				p := fd.cur.View(nc, i)
				d.changed(e, pn, e.peerJSON(pn, p.AllowedIPs, p.PrimaryRoutes))
			}
		case was && is:
			if !fd.touched[i] && fd.old.Plain(oc, i) && fd.cur.Plain(nc, i) {
				continue
			}
			op, np := fd.old.View(oc, i), fd.cur.View(nc, i)
			old, cur := e.oldNode(b, id), e.nodes[id]
			if old == nil || cur == nil || !fd.touched[i] && equalPeer(op, np) {
				continue
			}
			d.peer(e, b, old, cur, e.peerJSON(old, op.AllowedIPs, op.PrimaryRoutes), e.peerJSON(cur, np.AllowedIPs, np.PrimaryRoutes))
		}
	}
	u := d.result()
	if u != nil {
		u.Shared = new(session.Encoded)
		u = e.shareLocked(fd.same, u, d.list)
	}
	fd.pairs[k] = u
	return u
}

// filterPairLocked returns the filter part changes of class pair (oc,
// nc), computed once: parts are matched by name (both lists are in name
// order) and compared by what they encode to.
func (e *Engine) filterPairLocked(b *batch, fd *fullDiff, oc, nc int) *filterPair {
	k := [2]int{oc, nc}
	if fp, ok := fd.filters[k]; ok {
		return fp
	}
	olds, news := b.prevCompiled.ClassFilterParts(oc), e.compiled.ClassFilterParts(nc)
	total := len(news)
	fp := &filterPair{}
	for len(olds) > 0 || len(news) > 0 {
		switch {
		case len(news) == 0 || len(olds) > 0 && olds[0].Name() < news[0].Name():
			fp.deleted = append(fp.deleted, olds[0].Name())
			olds = olds[1:]
		case len(olds) == 0 || news[0].Name() < olds[0].Name():
			fp.changed = append(fp.changed, news[0])
			news = news[1:]
		default:
			if !e.samePart(fd, olds[0], news[0]) {
				fp.changed = append(fp.changed, news[0])
			}
			olds, news = olds[1:], news[1:]
		}
	}
	fp.whole = 2*(len(fp.changed)+len(fp.deleted)) > total
	fd.filters[k] = fp
	return fp
}

// samePart reports whether two parts of the same name (of the previous
// and the new compilation) encode alike for a receiver whose addresses did
// not change. App grants' parts are never the same.
func (e *Engine) samePart(fd *fullDiff, p, q policy.FilterPart) bool {
	pe, qe := e.filterEnc.partEncFor(p), e.filterEnc.partEncFor(q)
	if pe.marshal || qe.marshal || !bytes.Equal(pe.dst, qe.dst) || !bytes.Equal(pe.tail, qe.tail) ||
		!slices.EqualFunc(pe.self, qe.self, bytes.Equal) {
		return false
	}
	ps, qs := p.Src(), q.Src()
	k := [2]srcKey{{unsafe.SliceData(ps), len(ps)}, {unsafe.SliceData(qs), len(qs)}}
	same, ok := fd.sameSrc[k]
	if !ok {
		same = slices.Equal(ps, qs)
		fd.sameSrc[k] = same
	}
	return same
}

// fullFilterDeltaLocked returns, for a full batch, the filter parts
// session ss must replace (nil values delete), and false when it must
// get its whole filter instead: its own node changed, it did not hold the
// previous compilation's filter (a deferred sync), or most parts changed.
// A router joining changed a few source lists in most filters, and every
// session was sent its whole filter: 830 MB at 10,000 nodes under the
// generated 15,000-rule policy.
func (e *Engine) fullFilterDeltaLocked(ss *sessState, b *batch, since uint64) (map[string][]session.Part, bool) {
	id := ss.s.NodeID
	fd := b.fd
	if fd == nil || b.prevCompiled == nil || b.touches(id) || since != b.prevCompiled.Gen() {
		return nil, false
	}
	oc, nc := b.prevCompiled.ClassOf(id), e.compiled.ClassOf(id)
	if oc < 0 || nc < 0 {
		return nil, false
	}
	fp := e.filterPairLocked(b, fd, oc, nc)
	if fp.whole {
		return nil, false
	}
	ss.filterSum = 0
	if e.classEncLocked(id).shared {
		ss.filterSum = e.filterLocked(id).sum
	}
	if len(fp.changed) == 0 && len(fp.deleted) == 0 {
		return nil, true
	}
	own := ownDsts(e.compiled.OwnAddrs(id))
	pf := make(map[string][]session.Part, len(fp.changed)+len(fp.deleted))
	for _, name := range fp.deleted {
		pf[name] = nil
	}
	for _, p := range fp.changed {
		pf[p.Name()] = e.filterEnc.encodePart(e.compiled, id, p, own)
	}
	return pf, true
}

// withoutPeer returns u less peer id, as a private update (nil if empty),
// or u itself when it does not name id.
func withoutPeer(u *session.Update, id uint64) *session.Update {
	_, changed := u.PeersChanged[id]
	_, removed := u.PeersRemoved[id]
	_, patched := u.Patches[id]
	if !changed && !removed && !patched {
		return u
	}
	c := &session.Update{PeersChanged: maps.Clone(u.PeersChanged), PeersRemoved: maps.Clone(u.PeersRemoved),
		Patches: maps.Clone(u.Patches), UserProfiles: u.UserProfiles}
	delete(c.PeersChanged, id)
	delete(c.PeersRemoved, id)
	delete(c.Patches, id)
	if len(c.PeersChanged) == 0 && len(c.PeersRemoved) == 0 && len(c.Patches) == 0 {
		return nil
	}
	return c
}

// diffAllLocked pushes what a session must learn from a full batch: its
// class pair's shared peer changes (less its own node), then its own
// node, filter and SSH policy if they changed.
func (e *Engine) diffAllLocked(ss *sessState, b *batch, fd *fullDiff) {
	me := ss.s.NodeID
	if u := e.pairDeltaLocked(b, fd, classOf(b.prevCompiled, me), classOf(e.compiled, me)); u != nil {
		if u = withoutPeer(u, me); u != nil {
			ss.s.Push(u)
		}
	}
	var d update
	e.filterAndSelf(ss, b, &d, true)
	if u := d.result(); u != nil {
		ss.s.Push(u)
	}
}
