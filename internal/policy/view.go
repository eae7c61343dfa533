package policy

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
		if pc.caps != nil || len(pc.selfPorts) > 0 {
			return false
		}
	}
	return true
}
