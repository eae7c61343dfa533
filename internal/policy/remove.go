package policy

import (
	"slices"

	"go4.org/netipx"
	"tailscale.com/tailcfg"
)

// RemoveNodes removes nodes from the compilation in place, giving the same
// answers as compiling the policy over the nodes that remain (DESIGN
// principle 3, for leaves). A node leaving a class that keeps other
// members only takes its addresses out of the source lists and SSH
// principals naming it: classes, pieces and visibility stay as they are,
// and class ids stay valid, so a caller can still ask which classes saw
// the removed nodes (ClassSees).
//
// It returns the classes whose filter or SSH policy may have changed. It
// returns ok=false, having changed nothing, when the change needs a full
// Compile: a node that routes or is absent, a policy with via grants, or a
// class losing its last node. (So no selector loses its last address: a
// class is keyed by the selectors naming its nodes, so a selector's
// addresses are all of its classes' members. Rules and source lists
// never disappear.)
//
// RemoveNodes needs exclusive access to c.
func (c *Compiled) RemoveNodes(ids []uint64) (changed []int, ok bool) {
	cp := c.cp
	if cp == nil || cp.hasVia {
		return nil, false
	}
	gone, sets, ok := cp.canRemove(ids)
	if !ok {
		return nil, false
	}
	cp.adds++
	c.lists = newPeerLists()
	ch := newBitset(len(c.classes))
	for si, set := range sets {
		s := cp.sels[si]
		s.addrs = set
		if s.src != nil {
			s.src.ips, s.src.dirty = ipSetStrings(set), cp.adds
			ch.or(s.src.holders)
		}
	}
	selfDirty := map[*selfEntry]bool{}
	for _, i := range gone {
		n := &c.nodes[i]
		if n.IsTagged() {
			continue
		}
		delete(cp.userSrcCache, n.UserID)
		for _, ri := range cp.selfRules {
			if e := cp.self[selfKey{ri, n.UserID}]; e != nil && cp.active[ri] && cp.inSrc(&c.p.rules[ri], c.classOf[i]) {
				selfDirty[e] = true
			}
		}
	}
	touch := newBitset(len(c.classes))
	cp.removeSSHSources(gone, &touch)
	c.compact(gone)
	for e := range selfDirty {
		e.list.ips, e.list.dirty = cp.userSrc(e.user, e.classes), cp.adds
		for _, ci := range cp.userClasses[e.user] {
			ch.add(ci)
		}
	}
	touch.each(func(ci int) { c.classes[ci].ssh = cp.classSSH(ci) })
	ch.or(touch)
	ch.each(func(ci int) { changed = append(changed, ci) })
	return changed, true
}

// ClassSees reports whether viewerID's class sees the nodes of class ci.
// After RemoveNodes it tells which viewers saw a removed node, given the
// class the node was in (ClassOf before the call).
func (c *Compiled) ClassSees(viewerID uint64, ci int) bool {
	_, vi, ok := c.node(viewerID)
	return ok && ci >= 0 && ci < len(c.classes) && c.classes[c.classOf[vi]].visible.has(ci)
}

// canRemove checks that RemoveNodes can take ids without a full Compile
// and returns the nodes' indices, ascending, and the new address sets of
// the node selectors naming them.
func (cp *compiler) canRemove(ids []uint64) (gone []int, sets map[int]*netipx.IPSet, ok bool) {
	c := cp.c
	left := map[int]int{} // class -> members removed
	for _, id := range ids {
		i, ok := c.byID[id]
		if !ok || len(c.nodes[i].ApprovedRoutes) > 0 {
			return nil, nil, false
		}
		gone = append(gone, i)
		left[c.classOf[i]]++
	}
	slices.Sort(gone)
	if len(slices.Compact(gone)) != len(ids) {
		return nil, nil, false
	}
	for ci, k := range left {
		if k >= len(c.classes[ci].members) {
			return nil, nil, false
		}
	}
	builders := map[int]*netipx.IPSetBuilder{}
	for _, i := range gone {
		for _, si := range cp.nodeSels[i] {
			s := cp.sels[si]
			if !s.a.isNodeSelector() {
				continue
			}
			b := builders[si]
			if b == nil {
				b = &netipx.IPSetBuilder{}
				b.AddSet(s.addrs)
				builders[si] = b
			}
			for _, p := range c.nodes[i].addrPrefixes() {
				b.RemovePrefix(p)
			}
		}
	}
	sets = make(map[int]*netipx.IPSet, len(builders))
	for si, b := range builders {
		sets[si], _ = b.IPSet()
	}
	return gone, sets, true
}

// removeSSHSources takes the nodes gone (indices, ascending, still in
// place) out of the SSH rules' sources and re-emits the parts they were
// in, adding the classes receiving those parts to touch. No part loses its
// last source: that would have emptied a class, which canRemove refuses.
func (cp *compiler) removeSSHSources(gone []int, touch *bitset) {
	c := cp.c
	out := map[*tailcfg.SSHPrincipal]bool{}
	for _, i := range gone {
		for _, p := range c.nodePrincipals(i) {
			out[p] = true
		}
	}
	// A new slice: emitted rules share the old one's array.
	drop := func(pr []*tailcfg.SSHPrincipal) ([]*tailcfg.SSHPrincipal, bool) {
		if !slices.ContainsFunc(pr, func(p *tailcfg.SSHPrincipal) bool { return out[p] }) {
			return pr, false
		}
		kept := make([]*tailcfg.SSHPrincipal, 0, len(pr))
		for _, p := range pr {
			if !out[p] {
				kept = append(kept, p)
			}
		}
		return kept, true
	}
	for _, st := range cp.ssh {
		var dirty bool
		if st.principals, dirty = drop(st.principals); dirty {
			st.all = st.emit(st.principals, st.common)
			touch.orGrow(st.dstCl)
		}
		for _, g := range slices.Concat(st.users, st.tagged) {
			var d bool
			if g.principals, d = drop(g.principals); d {
				cp.reemit(st, g, touch)
			}
		}
	}
}

// compact deletes the nodes gone (indices, ascending) from every per-node
// table and renumbers the indices that follow them.
func (c *Compiled) compact(gone []int) {
	cp := c.cp
	newIdx := make([]int, len(c.nodes))
	k := 0
	for i := range c.nodes {
		if k < len(gone) && gone[k] == i {
			newIdx[i] = -1
			k++
			continue
		}
		newIdx[i] = i - k
	}
	keep := func(i int) bool { return newIdx[i] >= 0 }
	for _, i := range gone {
		delete(c.byID, c.nodes[i].ID)
	}
	c.nodes = compactSlice(c.nodes, keep)
	c.addrs = compactSlice(c.addrs, keep)
	c.classOf = compactSlice(c.classOf, keep)
	cp.nodeSels = compactSlice(cp.nodeSels, keep)
	cp.nodeRSel = compactSlice(cp.nodeRSel, keep)
	c.principals = compactSlice(c.principals, keep)
	for i := gone[0]; i < len(c.nodes); i++ {
		c.byID[c.nodes[i].ID] = i
	}
	for _, cl := range c.classes {
		cl.members = slices.DeleteFunc(cl.members, func(i int) bool { return !keep(i) })
		for j, i := range cl.members {
			cl.members[j] = newIdx[i]
		}
		cl.rep = cl.members[0]
	}
	for p, i := range c.primary {
		c.primary[p] = newIdx[i]
	}
	for k, i := range c.viaPrimary {
		c.viaPrimary[k] = newIdx[i]
	}
}

// compactSlice keeps the elements whose index keep accepts, in order.
func compactSlice[T any](s []T, keep func(int) bool) []T {
	out := s[:0]
	for i, v := range s {
		if keep(i) {
			out = append(out, v)
		}
	}
	clear(s[len(out):])
	return out
}
