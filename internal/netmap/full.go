package netmap

import (
	"encoding/json"
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
// node leaves the other chunks as they were.
const chunkSpan = 256

// chunkEntry is a cached chunk: the peer encodings it holds, in order.
type chunkEntry struct {
	encs     []*encoded
	chunk    *session.Chunk
	used     uint64    // batch number of last use
	usedTime time.Time // time of last use
}

// An unused chunk stays cached for chunkTTL batches, and at most
// chunkIdleTTL: in an idle tailnet no batches run, and the chunks (the
// JSON and zstd of every peer) would otherwise stay in memory for good.
const (
	chunkTTL     = 8
	chunkIdleTTL = time.Minute
)

// chunkLocked returns the shared chunk holding exactly encs (each with a
// leading comma), building it on first request. Two classes that see the
// same peers the same way share it too.
func (e *Engine) chunkLocked(encs []*encoded) *session.Chunk {
	var h uint64 = 14695981039346656037
	for _, x := range encs {
		h ^= uint64(uintptr(unsafe.Pointer(x)))
		h *= 1099511628211
	}
	now := time.Now()
	for _, ce := range e.chunks[h] {
		if equalEncs(ce.encs, encs) {
			ce.used, ce.usedTime = e.batchNo, now
			return ce.chunk
		}
	}
	size := 0
	for _, x := range encs {
		size += len(x.full) + 1
	}
	b := make([]byte, 0, size)
	for _, x := range encs {
		b = append(b, ',')
		b = append(b, x.full...)
	}
	ce := &chunkEntry{encs: encs, chunk: session.NewChunk(b), used: e.batchNo, usedTime: now}
	e.chunks[h] = append(e.chunks[h], ce)
	return ce.chunk
}

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
		if cf.gen != e.viewGen || e.batchNo-cf.used > chunkTTL || !cf.usedTime.After(cutoff) {
			delete(e.classFull, cl)
		}
	}
	for h, list := range e.chunks {
		keep := list[:0]
		for _, ce := range list {
			if e.batchNo-ce.used <= chunkTTL && ce.usedTime.After(cutoff) {
				keep = append(keep, ce)
			}
		}
		if len(keep) == 0 {
			delete(e.chunks, h)
		} else {
			e.chunks[h] = keep
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
	prof := profileSet{}
	prof.add(e, ownerID(n))

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
		hb = append(hb, e.peerJSON(fn, first.AllowedIPs, first.PrimaryRoutes).full...)
		parts = append(parts, session.Part{Raw: hb})
		for _, sp := range cf.spans {
			// The spans holding this node or the first peer are
			// built for it; the others are the class's.
			if sp.span == n.ID/chunkSpan || sp.span == first.ID/chunkSpan {
				parts = append(parts, session.Part{Chunk: e.spanChunkLocked(sp.peers, n.ID, first.ID)})
			} else {
				parts = append(parts, session.Part{Chunk: sp.chunk})
			}
		}
		head = session.ContinueObj("]")
	}
	for _, uid := range cf.owners {
		prof.add(e, uid)
	}
	head.Raw("DNSConfig", e.dnsJSON)
	head.Value("Domain", e.static.BaseDomain)
	head.Value("CollectServices", opt.False)
	head.Raw("PacketFilters", f.obj)
	head.Value("UserProfiles", prof.list)
	head.Raw("SSHPolicy", ce.ssh)
	head.Value("ControlTime", time.Now().UTC())
	return append(parts, session.Part{Raw: head.Bytes()})
}

// classFull is a class's peers as full maps carry them, valid while the
// tailnet's nodes and the compilation stay as they were (viewGen).
type classFull struct {
	gen      uint64
	peers    []policy.Peer
	spans    []peerSpan
	owners   []tailcfg.UserID // of the peers, in order, without repeats
	used     uint64
	usedTime time.Time
}

// peerSpan is the class's peers in one node-ID span, and their chunk.
type peerSpan struct {
	span  uint64
	peers []policy.Peer
	chunk *session.Chunk
}

// classFullLocked returns the class's full-map peers, building them once
// per class and view generation. Looking up each peer's encoding for
// every full map was the largest cost of a reconnect storm (27% of the
// server's CPU in peerJSON at 10,000 nodes: 10,000 maps of 9,999 peers).
func (e *Engine) classFullLocked(nodeID uint64) *classFull {
	cl := e.compiled.ClassOf(nodeID)
	cf := e.classFull[cl]
	if cf == nil || cf.gen != e.viewGen {
		// The peer list is the class's cached one, not a copy: at
		// thousands of classes a copy each took gigabytes.
		cf = &classFull{gen: e.viewGen, peers: e.classPeersLocked(nodeID)}
		var seen profileSet
		for _, p := range cf.peers {
			pn := e.nodes[p.ID]
			if pn == nil {
				continue
			}
			if uid := ownerID(pn); !seen.seen[uid] {
				seen.add(e, uid)
				cf.owners = append(cf.owners, uid)
			}
		}
		for rest := cf.peers; len(rest) > 0; {
			span := rest[0].ID / chunkSpan
			k := 0
			for k < len(rest) && rest[k].ID/chunkSpan == span {
				k++
			}
			cf.spans = append(cf.spans, peerSpan{span: span, peers: rest[:k], chunk: e.spanChunkLocked(rest[:k], 0, 0)})
			rest = rest[k:]
		}
		e.classFull[cl] = cf
	}
	cf.used, cf.usedTime = e.batchNo, time.Now()
	return cf
}

// spanChunkLocked returns the chunk of peers without the nodes skip1 and
// skip2 (the session's own node and the peer its header holds).
func (e *Engine) spanChunkLocked(peers []policy.Peer, skip1, skip2 uint64) *session.Chunk {
	encs := make([]*encoded, 0, len(peers))
	for _, p := range peers {
		if pn := e.nodes[p.ID]; pn != nil && p.ID != skip1 && p.ID != skip2 {
			encs = append(encs, e.peerJSON(pn, p.AllowedIPs, p.PrimaryRoutes))
		}
	}
	return e.chunkLocked(encs)
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

// profileSet collects the user profiles a message must carry.
type profileSet struct {
	seen map[tailcfg.UserID]bool
	list []tailcfg.UserProfile
}

func (ps *profileSet) add(e *Engine, uid tailcfg.UserID) {
	if ps.seen[uid] {
		return
	}
	if ps.seen == nil {
		ps.seen = map[tailcfg.UserID]bool{}
	}
	ps.seen[uid] = true
	if uid == TaggedUserID {
		ps.list = append(ps.list, taggedProfile)
	} else if u := e.users[uint64(uid)]; u != nil {
		ps.list = append(ps.list, profileOf(u))
	}
}

func (e *Engine) selfJSONLocked(n *state.Node) json.RawMessage {
	tn := e.tailNode(n, peerFields{})
	// Whether a node is online is news for its peers, not for itself.
	tn.PrimaryRoutes, tn.Online, tn.LastSeen = nil, nil, nil
	tn.CapMap = e.compiled.CapMap(n.ID)
	b, _ := json.Marshal(tn)
	return b
}
