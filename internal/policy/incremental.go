package policy

import (
	"slices"

	"go4.org/netipx"
)

// AddNodes adds nodes to the compilation in place, giving the same answers
// as compiling the policy over the old and the new nodes (DESIGN principle
// 3). A node joining an existing class only adds its addresses to the
// source lists naming that class; a node starting a class gets the class's
// filter pieces and visibility from the per-selector state Compile kept, and
// becomes visible to the classes that see it. Nothing is recompiled.
//
// It returns the classes whose filter, SSH policy or capabilities may have
// changed (new classes included). It returns ok=false, having changed
// nothing, when the change needs a full Compile: a node that routes or is
// already present, a policy with via grants, or a rule whose sources
// stood for no address and would now.
//
// AddNodes needs exclusive access to c.
func (c *Compiled) AddNodes(nodes []Node) (changed []int, ok bool) {
	cp := c.cp
	if cp == nil {
		return nil, false
	}
	activate, ok := cp.canAdd(nodes)
	if !ok {
		return nil, false
	}
	cp.adds++
	// Visible sets and peer views change: lists built before are stale.
	c.lists = newPeerLists()
	a := &adder{cp: cp, changed: newBitset(0)}
	first := len(c.nodes)
	for _, n := range nodes {
		i := len(c.nodes)
		c.nodes = append(c.nodes, n)
		c.addrs = append(c.addrs, slices.Clip(n.addrPrefixes()))
		c.byID[n.ID] = i
		c.classOf = append(c.classOf, 0)
		cp.nodeSels = append(cp.nodeSels, nil)
		cp.nodeRSel = append(cp.nodeRSel, nil)
		if !n.IsTagged() {
			// Its user's source lists change; the cache would hand out
			// the old one.
			delete(cp.userSrcCache, n.UserID)
		}
		ci, isNew := cp.classify(i)
		if isNew {
			a.fresh = append(a.fresh, ci)
		}
	}
	nc := len(c.classes)
	for i := first; i < len(c.nodes); i++ {
		a.addressNode(i)
	}
	a.renderSels()
	a.direct = map[int]bitset{}
	for _, ci := range a.fresh {
		a.direct[ci] = newBitset(nc)
	}
	for _, ri := range activate {
		a.activate(ri)
	}
	for _, ci := range a.fresh {
		a.compileClass(ci)
	}
	for i := first; i < len(c.nodes); i++ {
		a.selfNode(i)
	}
	a.renderSelf()
	for _, ci := range a.fresh {
		cp.foldClass(ci, a.direct[ci])
		c.classes[ci].visible.each(func(d int) { c.classes[d].visible.add(ci) })
		cp.capsFor(ci)
		a.changed.add(ci)
	}
	touch := newBitset(len(c.classes))
	for _, ci := range a.fresh {
		touch.set(ci)
	}
	cp.compileSSH(first, &touch)
	a.changed.orGrow(touch)
	a.markDirtyLists()
	a.changed.each(func(ci int) { changed = append(changed, ci) })
	return changed, true
}

// canAdd reports whether AddNodes can take nodes without a full Compile,
// and which rules the nodes make active: rules whose sources all stood for
// no address and one of which names a new node.
func (cp *compiler) canAdd(nodes []Node) (activate []int, ok bool) {
	c := cp.c
	if cp.hasVia {
		return nil, false
	}
	seen := map[uint64]bool{}
	filled := map[int]bool{} // node selectors that stand for no address yet
	for i := range nodes {
		n := &nodes[i]
		if _, ok := c.byID[n.ID]; ok || seen[n.ID] || len(n.ApprovedRoutes) > 0 {
			return nil, false
		}
		seen[n.ID] = true
		ids, _ := cp.nodeSelectors(cp.index, n)
		for _, si := range ids {
			// Compared with the empty set: rendering the prefixes of a
			// selector like autogroup:member was most of canAdd.
			if s := cp.sels[si]; s.a.isNodeSelector() && s.addrs.Equal(&netipx.IPSet{}) {
				filled[si] = true
			}
		}
	}
	if len(filled) == 0 {
		return nil, true
	}
	for ri := range c.p.rules {
		r := &c.p.rules[ri]
		if cp.active[ri] || len(r.dst) == 0 {
			continue
		}
		if slices.ContainsFunc(r.src, func(a alias) bool { return filled[cp.selIdx[a.key()]] }) {
			activate = append(activate, ri)
		}
	}
	if len(activate) > 0 && cp.empty > 0 {
		// Activating a rule gives pieces to every class it names, built
		// from each one's representative, which an emptied class lacks.
		return nil, false
	}
	return activate, true
}

// adder is the state of one AddNodes call.
type adder struct {
	cp *compiler
	// fresh are the classes the call started.
	fresh []int
	// direct holds the fresh classes' autogroup:self links.
	direct map[int]bitset
	// dirtySels and dirtySelf are source lists whose addresses changed.
	dirtySels map[int]bool
	dirtySelf map[*selfEntry]bool
	changed   bitset
}

// addressNode adds node i to the selectors naming it: their classes, and
// the addresses of node selectors.
func (a *adder) addressNode(i int) {
	cp := a.cp
	ci := cp.c.classOf[i]
	for _, si := range cp.nodeSels[i] {
		s := cp.sels[si]
		s.classes.add(ci)
		if !s.a.isNodeSelector() {
			continue
		}
		var b netipx.IPSetBuilder
		b.AddSet(s.addrs)
		for _, p := range cp.c.nodes[i].addrPrefixes() {
			b.AddPrefix(p)
		}
		s.addrs, _ = b.IPSet()
		if a.dirtySels == nil {
			a.dirtySels = map[int]bool{}
		}
		a.dirtySels[si] = true
	}
}

// compileClass gives a fresh class the regular (not autogroup:self) pieces
// of every rule naming it as a destination, and records what its sources
// and destinations reach, as compileRules does for every class. It walks
// the rules naming the class's selectors, not all of them.
func (a *adder) compileClass(ci int) {
	cp := a.cp
	c := cp.c
	cl := c.classes[ci]
	rules := slices.Clone(cp.wildDstRules)
	for _, sels := range [2][]int{cp.nodeSels[cl.rep], cp.nodeRSel[cl.rep]} {
		for _, si := range sels {
			rules = append(rules, cp.selRules[si]...)
		}
	}
	slices.Sort(rules)
	for _, ri := range slices.Compact(rules) {
		if !cp.active[ri] {
			continue
		}
		r := &c.p.rules[ri]
		m := make([]bool, len(r.dst))
		inDst, wildDst := false, false
		for ei, d := range r.dst {
			switch d.a.kind {
			case akSelf:
				continue
			case akWildcard:
				m[ei], inDst, wildDst = true, true, true
				continue
			}
			if s := cp.sel(d.a); s.classes.has(ci) || s.routeClasses.has(ci) {
				m[ei], inDst = true, true
			}
		}
		if inDst {
			srcs, _ := cp.srcRefs(r.src)
			if pc := cp.newPiece(ri, srcs, m, c.nodes[cl.rep]); pc != nil {
				cp.insertPiece(ci, pc)
			}
			for _, sa := range r.src {
				cp.sel(sa).reach.add(ci)
			}
		}
		if !cp.inSrc(r, ci) {
			continue
		}
		if wildDst {
			cp.anyDstReachedBy.add(ci)
		}
		for _, d := range r.dst {
			if d.a.kind != akSelf && d.a.kind != akWildcard {
				cp.sel(d.a).reachedBy.add(ci)
			}
		}
	}
}

// activate compiles rule ri, whose sources named no node before this call,
// as compileRules does. The classes its sources name now are all fresh (an
// old class named by a source would have given it an address), so old
// classes only gain pieces, and learn of the fresh classes when those are
// folded.
func (a *adder) activate(ri int) {
	cp := a.cp
	c := cp.c
	r := &c.p.rules[ri]
	srcs, ok := cp.srcRefs(r.src)
	if !ok {
		return
	}
	cp.active[ri] = true
	srcCl := cp.srcClasses(r.src)
	rc := cp.receivers(r, len(c.classes), nil)
	cp.givePieces(ri, srcs, rc.recvs, a.insert)
	if len(rc.selfEntries) > 0 {
		cp.compileSelf(ri, rc.selfEntries, srcCl, a.insert, a.link)
	}
	dstCl, wild := rc.dstCl, rc.wild
	var dp netipx.IPSetBuilder
	dstPrefixes(r.dst, &dp)
	dstSet, _ := dp.IPSet()
	internet := slices.ContainsFunc(r.dst, func(d dstEntry) bool { return d.a.kind == akInternet || d.a.kind == akWildcard })
	for _, sa := range r.src {
		si := cp.selIdx[sa.key()]
		s := cp.sels[si]
		s.reach.orGrow(dstCl)
		s.reachPfx.AddSet(dstSet)
		cp.selReachPfx[si], _ = s.reachPfx.IPSet()
		s.internet = s.internet || internet
	}
	if wild {
		cp.anyDstReachedBy.orGrow(srcCl)
	}
	for _, d := range r.dst {
		if d.a.kind != akSelf && d.a.kind != akWildcard {
			cp.sel(d.a).reachedBy.orGrow(srcCl)
		}
	}
}

// inSrc reports whether rule r's sources name class ci.
func (cp *compiler) inSrc(r *rule, ci int) bool {
	return slices.ContainsFunc(r.src, func(sa alias) bool {
		s := cp.sel(sa)
		return s.classes.has(ci) || s.routeClasses.has(ci)
	})
}

// selfNode applies node i to the autogroup:self parts of the rules: its
// user's source list grows, a fresh class receives the user's pieces, and
// a user the rule's sources did not name before gets a piece.
func (a *adder) selfNode(i int) {
	cp := a.cp
	c := cp.c
	n := &c.nodes[i]
	if n.IsTagged() || !cp.c.p.usesSelf {
		return
	}
	ci := c.classOf[i]
	isFresh := a.direct[ci] != nil
	ucl := cp.userClasses[n.UserID]
	for _, ri := range cp.selfRules {
		r := &c.p.rules[ri]
		if !cp.active[ri] {
			continue
		}
		in := cp.inSrc(r, ci)
		e := cp.self[selfKey{ri, n.UserID}]
		switch {
		case e == nil && !in:
			continue
		case e == nil:
			var entries []int
			for ei, d := range r.dst {
				if d.a.kind == akSelf {
					entries = append(entries, ei)
				}
			}
			e = cp.newSelfEntry(ri, selfPorts(r, entries), n.UserID, []int{ci})
			for _, uc := range ucl {
				a.insert(uc, &e.pc)
				a.link(uc, ci)
			}
		default:
			if isFresh {
				a.insert(ci, &e.pc)
				for _, sc := range e.classes {
					a.link(ci, sc)
				}
			}
			if in && !slices.Contains(e.classes, ci) {
				e.classes = append(e.classes, ci)
				slices.Sort(e.classes)
				for _, uc := range ucl {
					a.link(uc, ci)
				}
			}
		}
		if in {
			if a.dirtySelf == nil {
				a.dirtySelf = map[*selfEntry]bool{}
			}
			a.dirtySelf[e] = true
		}
	}
}

// insert gives class ci piece pc in rule order and marks it changed.
func (a *adder) insert(ci int, pc *piece) {
	a.cp.insertPiece(ci, pc)
	a.changed.add(ci)
}

// link makes classes x and y see each other; at least one of them is
// fresh, and fresh classes pass their links on when folded.
func (a *adder) link(x, y int) {
	for _, p := range [2][2]int{{x, y}, {y, x}} {
		if d, ok := a.direct[p[0]]; ok {
			d.add(p[1])
		} else {
			a.cp.c.classes[p[0]].visible.add(p[1])
		}
	}
}

// insertPiece gives class ci piece pc in (rule, self) order, the order
// compileRules appends them in. A class has at most one piece per rule and
// part, so a second insert is a no-op.
func (cp *compiler) insertPiece(ci int, pc *piece) {
	cl := cp.c.classes[ci]
	at, found := slices.BinarySearchFunc(cl.pieces, pc, func(x, y *piece) int {
		if x.ri != y.ri {
			return x.ri - y.ri
		}
		return btoi(x.self) - btoi(y.self)
	})
	if !found {
		cl.pieces = slices.Insert(cl.pieces, at, pc)
		cp.holdLists(ci, pc)
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// renderSels re-renders, in place, the selector source lists whose
// addresses changed.
func (a *adder) renderSels() {
	for si := range a.dirtySels {
		if s := a.cp.sels[si]; s.src != nil {
			s.src.ips, s.src.dirty = ipSetStrings(s.addrs), a.cp.adds
		}
	}
}

// renderSelf re-renders, in place, the autogroup:self source lists whose
// users' nodes changed.
func (a *adder) renderSelf() {
	for e := range a.dirtySelf {
		e.list.ips, e.list.dirty = a.cp.userSrc(e.user, e.classes), a.cp.adds
	}
}

// markDirtyLists marks the classes holding a piece whose sources changed:
// the holders of the re-rendered selector lists, and the classes of the
// users whose autogroup:self lists were.
func (a *adder) markDirtyLists() {
	for si := range a.dirtySels {
		if l := a.cp.sels[si].src; l != nil {
			a.changed.orGrow(l.holders)
		}
	}
	for e := range a.dirtySelf {
		for _, ci := range a.cp.userClasses[e.user] {
			a.changed.add(ci)
		}
	}
}
