package netmap

import (
	"bytes"
	"encoding/json"
	"slices"

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
}

// changed adds a peer's new encoding, and its owner's profile.
func (d *update) changed(e *Engine, pn *state.Node, enc *encoded) {
	if d.u.PeersChanged == nil {
		d.u.PeersChanged = make(map[uint64]json.RawMessage, d.peers)
	}
	d.u.PeersChanged[pn.ID] = enc.full
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
	case bytes.Equal(oldEnc.fingerprint, newEnc.fingerprint):
		if d.u.Patches == nil {
			d.u.Patches = make(map[uint64]*session.Patch, d.patches)
		}
		d.u.Patches[cur.ID] = b.patch(old, cur)
	default:
		d.changed(e, cur, newEnc)
	}
}

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
		f := e.filterLocked(id)
		if f.sum == ss.filterSum {
			return nil
		}
		ss.filterSum = f.sum
		return f.chunks
	}
	parts := b.partsSince(e.compiled, e.compiled.ClassOf(id), since)
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
	for _, id := range b.added {
		if p, ok := e.compiled.PeerView(me, id); ok {
			pn := e.nodes[id]
			d.changed(e, pn, e.peerJSON(pn, p.AllowedIPs, p.PrimaryRoutes))
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

// sameView reports whether node v's class sees exactly the same peers,
// the same way, under the previous and the new compilation (oldV, newV).
// It is decided once per pair of classes, so a policy edit that changes a
// few classes' views does not walk every session's peer list.
func (b *batch) sameView(v uint64, oldV, newV *classViews) bool {
	if oldV.c == nil || newV.c == nil {
		return false
	}
	k := [2]int{oldV.c.ClassOf(v), newV.c.ClassOf(v)}
	if k[0] < 0 || k[1] < 0 {
		return false
	}
	same, ok := b.same[k]
	if !ok {
		same = equalPeerLists(oldV.classPeers(v, k[0]), newV.classPeers(v, k[1]))
		b.same[k] = same
	}
	return same
}

func equalPeerLists(a, c []policy.Peer) bool {
	return slices.EqualFunc(a, c, equalPeer)
}

// equalPeer reports whether two views of a peer are the same.
func equalPeer(a, c policy.Peer) bool {
	return a.ID == c.ID && equalPrefixes(a.AllowedIPs, c.AllowedIPs) && equalPrefixes(a.PrimaryRoutes, c.PrimaryRoutes)
}

// classViews gives each session's peer list under one compilation from
// its class's shared list (policy.Compiled.ClassPeers), so a full diff
// costs O(peers) per session, builds no list per session or class, and
// keeps no per-session state.
type classViews struct {
	c    *policy.Compiled
	list map[int][]policy.Peer // by class: ClassPeers costs O(peers) even when cached
}

func newClassViews(c *policy.Compiled) *classViews {
	return &classViews{c: c, list: map[int][]policy.Peer{}}
}

// cursor walks node v's peer list (sorted by id) without building it:
// members of a class see the same peers, so v's list is its class's list
// (which holds the members when the class sees itself) without v. A full
// diff over 10,000 sessions used to copy a list per session: about 11 GB
// per policy edit at 10,000 nodes; and one per class (Compiled.Peers of a
// representative), a third of a router join's diff.
type cursor struct {
	l    []policy.Peer
	i    int
	skip uint64
}

func (cv *classViews) cursor(v uint64) *cursor {
	if cv.c == nil {
		return &cursor{}
	}
	cl := cv.c.ClassOf(v)
	if cl < 0 {
		return &cursor{}
	}
	return &cursor{l: cv.classPeers(v, cl), skip: v}
}

// classPeers returns the peer list of class cl, of which v is a member,
// once per class.
func (cv *classViews) classPeers(v uint64, cl int) []policy.Peer {
	l, ok := cv.list[cl]
	if !ok {
		l = cv.c.ClassPeers(v)
		cv.list[cl] = l
	}
	return l
}

// peek returns the next peer without consuming it.
func (c *cursor) peek() (policy.Peer, bool) {
	for c.i < len(c.l) && c.l[c.i].ID == c.skip {
		c.i++
	}
	if c.i < len(c.l) {
		return c.l[c.i], true
	}
	return policy.Peer{}, false
}

// next consumes the peer peek returned.
func (c *cursor) next() { c.i++ }

// diffAllLocked diffs a session's whole view between the previous and the
// new compilation: peers that appeared, disappeared or changed.
func (e *Engine) diffAllLocked(ss *sessState, b *batch, oldV, newV *classViews) *session.Update {
	var d update
	me := ss.s.NodeID
	e.filterAndSelf(ss, b, &d, true)
	if len(b.prev) == 0 && b.sameView(me, oldV, newV) {
		// A policy or user change that left this class's view as it was:
		// only the filter and SSH policy can differ.
		return d.result()
	}
	olds, news := oldV.cursor(me), newV.cursor(me)
	for {
		op, okOld := olds.peek()
		np, okNew := news.peek()
		switch {
		case !okOld && !okNew:
			return d.result()
		case !okNew || (okOld && op.ID < np.ID):
			d.removed(op.ID)
			olds.next()
		case !okOld || np.ID < op.ID:
			pn := e.nodes[np.ID]
			d.changed(e, pn, e.peerJSON(pn, np.AllowedIPs, np.PrimaryRoutes))
			news.next()
		default:
			// A peer that did not change, seen the same way, has the same
			// encoding: skip the lookups. Most peers of most sessions are
			// such when a router joins (two lookups per session and peer
			// were a third of a router join at 10,000 nodes).
			if b.touches(np.ID) || !equalPeer(op, np) {
				old, cur := e.oldNode(b, np.ID), e.nodes[np.ID]
				d.peer(e, b, old, cur, e.peerJSON(old, op.AllowedIPs, op.PrimaryRoutes), e.peerJSON(cur, np.AllowedIPs, np.PrimaryRoutes))
			}
			olds.next()
			news.next()
		}
	}
}
