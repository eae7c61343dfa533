package policy

import (
	"slices"

	"go4.org/netipx"
	"tailscale.com/tailcfg"
)

// RemoveNodes removes nodes from the compilation in place, giving the same
// answers as compiling the policy over the nodes that remain (DESIGN
// principle 3, for leaves). A leaving node only takes its addresses out of
// the source lists and SSH principals naming it: classes, pieces and
// visibility stay as they are, and class ids stay valid, so a caller can
// still ask which classes saw the removed nodes (ClassSees).
//
// A class may be left without members. It stays, seen by and holding what
// it did, which no node's answers show; a node joining it later revives
// it. Its source lists may empty: their parts then build no rule, and
// ClassFilterPartsSince reports them deleted. Such classes make AddNodes
// recompile when a join would compile a rule anew (its pieces are built
// from a class's representative node).
//
// It returns the classes whose filter or SSH policy may have changed. It
// returns ok=false, having changed nothing, when the change needs a full
// Compile: a node that routes or is absent, or a policy with via grants.
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
	for _, id := range ids {
		i, ok := c.byID[id]
		if !ok || len(c.nodes[i].ApprovedRoutes) > 0 {
			return nil, nil, false
		}
		gone = append(gone, i)
	}
	slices.Sort(gone)
	if len(slices.Compact(gone)) != len(ids) {
		return nil, nil, false
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
// in, adding the classes receiving those parts to touch. A part left
// without sources goes, as Compile would not have emitted it.
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
			st.all = nil
			if len(st.principals) > 0 {
				st.all = st.emit(st.principals, st.common)
			}
			touch.orGrow(st.dstCl)
		}
		reorder := false
		for _, groups := range [2]*[]*sshGroup{&st.users, &st.tagged} {
			*groups = slices.DeleteFunc(*groups, func(g *sshGroup) bool {
				first := g.principals[0]
				var d bool
				if g.principals, d = drop(g.principals); !d {
					return false
				}
				cp.reemit(st, g, touch)
				if len(g.principals) == 0 {
					delete(st.byUser, g.user)
					delete(st.byClass, g.class)
					return true
				}
				reorder = reorder || g.principals[0] != first
				return false
			})
		}
		if reorder && len(st.localDomains) > 0 {
			cp.sortGroups(st)
		}
	}
}

// sortGroups puts an SSH rule's parts back in the order of their first
// source node, which a leave of a part's first node may have changed. Only
// rules with localpart users send every part to one class, so only their
// order shows.
func (cp *compiler) sortGroups(st *sshState) {
	at := map[*tailcfg.SSHPrincipal]int{}
	for i, pr := range cp.c.principals {
		if len(pr) > 0 {
			at[pr[0]] = i
		}
	}
	for _, groups := range [2][]*sshGroup{st.users, st.tagged} {
		slices.SortStableFunc(groups, func(a, b *sshGroup) int { return at[a.principals[0]] - at[b.principals[0]] })
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
		had := len(cl.members) > 0
		cl.members = slices.DeleteFunc(cl.members, func(i int) bool { return !keep(i) })
		for j, i := range cl.members {
			cl.members[j] = newIdx[i]
		}
		if len(cl.members) > 0 {
			cl.rep = cl.members[0]
		} else if had {
			cl.rep = -1
			cp.empty++
		}
	}
	for p, i := range c.primary {
		c.primary[p] = newIdx[i]
	}
	for k, i := range c.viaPrimary {
		c.viaPrimary[k] = newIdx[i]
	}
}

// empty reports a piece whose source lists leaves all emptied: it builds
// no rule, and Compile would not have made it.
func (pc *piece) empty() bool {
	return !slices.ContainsFunc(pc.srcs, func(l *srcList) bool { return len(l.ips) > 0 })
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
