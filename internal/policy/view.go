package policy

import (
	"cmp"
	"math"
	"slices"
)

// This file holds the pair- and class-level views the netmap engine uses
// to apply a change to connected sessions without recomputing every
// session's whole peer list.

// PeerView returns peerID as viewerID sees it, and whether it sees it at
// all. It costs one class lookup, not a scan of the tailnet.
func (c *Compiled) PeerView(viewerID, peerID uint64) (Peer, bool) {
	_, vi, ok := c.node(viewerID)
	if !ok {
		return Peer{}, false
	}
	_, pi, ok := c.node(peerID)
	if !ok || pi == vi {
		return Peer{}, false
	}
	cl := c.classes[c.classOf[vi]]
	if !cl.visible.has(c.classOf[pi]) {
		return Peer{}, false
	}
	return c.peerView(cl, pi), true
}

// ClassPeer reports whether peerID is in the peer list of nodeID's class
// (ClassPeers, which holds the node itself when its class sees itself),
// and how the class sees it.
func (c *Compiled) ClassPeer(nodeID, peerID uint64) (Peer, bool) {
	_, vi, ok := c.node(nodeID)
	if !ok {
		return Peer{}, false
	}
	_, pi, ok := c.node(peerID)
	if !ok {
		return Peer{}, false
	}
	cl := c.classes[c.classOf[vi]]
	if !cl.visible.has(c.classOf[pi]) {
		return Peer{}, false
	}
	return c.peerView(cl, pi), true
}

// FilterShared reports whether every node of nodeID's class receives the
// same packet filter. It is false when a rule names the receiving node's
// own addresses (autogroup:self destinations, app capability grants), so
// callers that cache filter encodings per class must then cache per node.
func (c *Compiled) FilterShared(nodeID uint64) bool {
	_, i, ok := c.node(nodeID)
	if !ok {
		return false
	}
	for _, pc := range c.classes[c.classOf[i]].pieces {
		if (pc.caps != nil || len(pc.selfPorts) > 0) && !pc.empty() {
			return false
		}
	}
	return true
}

// denseIDs bounds the ID range, per member, that ClassPeers reads slot by
// slot rather than sorting: a 64-byte scan per member is cheaper than a
// sort, and IDs stay that dense unless most nodes ever registered were
// deleted since.
const denseIDs = 16

// ClassPeers returns every node that nodeID's class sees, as the class
// sees it, sorted by node ID; unlike Peers it includes nodeID itself when
// the class sees its own members. All members of a class get the same
// list, so callers can share what they build from it and drop each
// member's own entry. Classes that see the same peers the same way share
// one list too: read it, never modify it.
func (c *Compiled) ClassPeers(nodeID uint64) []Peer {
	_, i, ok := c.node(nodeID)
	if !ok {
		return nil
	}
	cl := c.classes[c.classOf[i]]
	n := 0
	lo, hi := uint64(math.MaxUint64), uint64(0)
	var routed []int
	cl.visible.each(func(pci int) {
		for _, pi := range c.classes[pci].members {
			id := c.nodes[pi].ID
			lo, hi = min(lo, id), max(hi, id)
			n++
			if len(c.nodes[pi].ApprovedRoutes) > 0 {
				routed = append(routed, pi)
			}
		}
	})
	slices.SortFunc(routed, func(a, b int) int { return cmp.Compare(c.nodes[a].ID, c.nodes[b].ID) })
	views := make([]Peer, len(routed))
	for j, pi := range routed {
		views[j] = c.peerView(cl, pi)
	}
	no4 := cl.hasCap(capDisableIPv4)
	k := c.lists.key(cl.visible, no4, views)
	if l := c.lists.get(k, cl.visible, no4, views); l != nil {
		return l
	}
	out := c.buildClassPeers(cl, n, lo, hi)
	c.lists.put(k, cl.visible, no4, views, out)
	return out
}

// buildClassPeers makes class cl's list of n peers with IDs in [lo, hi].
func (c *Compiled) buildClassPeers(cl *class, n int, lo, hi uint64) []Peer {
	out := make([]Peer, 0, n)
	if n > 0 && hi-lo < uint64(denseIDs*n) {
		// Node IDs are dense (the store hands them out in order): each
		// member goes to its ID's slot and the slots are read in order.
		// Sorting was most of the cost of a class's first full map in a
		// restart storm under the 15,000-rule policy (thousands of
		// classes, each building its list once).
		slots := make([]int32, hi-lo+1)
		cl.visible.each(func(pci int) {
			for _, pi := range c.classes[pci].members {
				slots[c.nodes[pi].ID-lo] = int32(pi) + 1
			}
		})
		for _, s := range slots {
			if s != 0 {
				out = append(out, c.peerView(cl, int(s-1)))
			}
		}
		return out
	}
	// Sparse IDs (most nodes ever registered since deleted): the member
	// indices are sorted by ID.
	idx := make([]int, 0, n)
	cl.visible.each(func(pci int) { idx = append(idx, c.classes[pci].members...) })
	slices.SortFunc(idx, func(a, b int) int { return cmp.Compare(c.nodes[a].ID, c.nodes[b].ID) })
	for _, pi := range idx {
		out = append(out, c.peerView(cl, pi))
	}
	return out
}
