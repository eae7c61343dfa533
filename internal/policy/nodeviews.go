package policy

// NodeViews indexes a compilation by a list of node IDs, so that a caller
// diffing the views of many viewer classes against another compilation
// tests visibility with a bit lookup per class and node, without building
// peer lists. A policy edit or a router joining the generated
// 15,000-rule tailnet of 10,000 nodes built the ClassPeers lists of both
// compilations for that (two lists of about 8,000 peers for each of 1,966
// distinct visible sets), about half of such a batch.
//
// Everything a lookup needs is laid out by position: reading each node's
// class and routes through its index was most of such a diff (the nodes
// are large and read in ID order, not index order).
type NodeViews struct {
	c     *Compiled
	idx   []int32 // node index of ids[k], or -1 when c does not hold it
	cls   []int32 // class of ids[k], or -1
	plain []bool  // ids[k] has no routes and its class not disable-ipv4
	no4   []bool  // by class: the disable-ipv4 capability
}

// NodeViews returns the index of ids: position k stands for ids[k].
func (c *Compiled) NodeViews(ids []uint64) *NodeViews {
	v := &NodeViews{c: c, idx: make([]int32, len(ids)), cls: make([]int32, len(ids)), plain: make([]bool, len(ids)),
		no4: make([]bool, len(c.classes))}
	for ci, cl := range c.classes {
		v.no4[ci] = cl.hasCap(capDisableIPv4)
	}
	for k, id := range ids {
		v.idx[k], v.cls[k] = -1, -1
		if i, ok := c.byID[id]; ok {
			cl := c.classOf[i]
			v.idx[k], v.cls[k] = int32(i), int32(cl)
			v.plain[k] = !v.no4[cl] && len(c.nodes[i].ApprovedRoutes) == 0
		}
	}
	return v
}

// Sees reports whether class viewer sees the node at position k; it
// includes the viewer's own members when the class sees itself, as
// ClassPeers does.
func (v *NodeViews) Sees(viewer, k int) bool {
	cl := v.cls[k]
	return cl >= 0 && v.c.classes[viewer].visible.has(int(cl))
}

// Plain reports whether class viewer sees the node at position k (which
// it sees) as the node's own addresses only: neither side has the
// disable-ipv4 capability and the node has no routes. A node that did not
// change has equal plain views under any two compilations.
func (v *NodeViews) Plain(viewer, k int) bool {
	return !v.no4[viewer] && v.plain[k]
}

// View returns how class viewer sees the node at position k (which it
// sees).
func (v *NodeViews) View(viewer, k int) Peer {
	return v.c.peerView(v.c.classes[viewer], int(v.idx[k]))
}
