package policy

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"go4.org/netipx"
	"tailscale.com/tailcfg"
)

// Compiled is a policy compiled for one tailnet state. It is safe for
// concurrent reads; AddNodes changes it in place and needs exclusive access.
// Slices it returns are shared and must not be modified by callers.
type Compiled struct {
	p     *Policy
	nodes []Node
	// addrs are each node's host prefixes, shared (read-only, clipped)
	// by every Peer that carries no more than them: a peer list of the
	// 10,000-node benchmark allocated one per peer and viewer class.
	addrs   [][]netip.Prefix
	byID    map[uint64]int
	users   map[uint64]User
	classOf []int // node index -> class id
	classes []*class

	// primary maps each approved subnet route to the node index that is
	// primary for it.
	primary map[netip.Prefix]int
	// viaPrimary is the primary among the routers carrying some via tags:
	// key is route + "|" + the tags joined by ",".
	viaPrimary map[string]int

	// cp is the compiler state AddNodes continues from.
	cp *compiler
	// principals caches each node's SSH principals.
	principals [][]*tailcfg.SSHPrincipal
	// lists shares ClassPeers lists among classes; AddNodes replaces it.
	lists *peerLists
}

// class is an identity class: nodes the policy cannot tell apart.
type class struct {
	members []int // node indices
	rep     int   // representative node index
	user    uint64
	tagged  bool

	pieces []*piece
	ssh    []*tailcfg.SSHRule
	caps   tailcfg.NodeCapMap

	// visible is the set of classes whose nodes this class sees.
	visible bitset
	// reach and reachedBy are the address sets this class may send to and
	// receive from beyond node identities; they decide which of a peer's
	// routes the class gets in AllowedIPs.
	reach, reachedBy *netipx.IPSet
	// internet is set when the class may send to the internet through any
	// exit node.
	internet bool
	// steers are the class's via grants: traffic to those prefixes goes
	// through routers carrying one of the via tags.
	steers []steer
}

// steer is a via grant as its sources see it.
type steer struct {
	pfx      *netipx.IPSet
	internet bool
	via      []string
}

// srcList is a rendered FilterRule.SrcIPs list, shared by every piece whose
// source is the same selector (or the same autogroup:self user). AddNodes
// replaces ips in place, so one update reaches every piece naming it.
type srcList struct {
	ips []string
	// dirty is the AddNodes call that last changed ips.
	dirty uint64
	// holders are the classes holding a piece that uses a selector's list,
	// which AddNodes reports changed when it re-renders the list. (An
	// autogroup:self list's are its user's classes.)
	holders bitset
}

// piece is one filter rule as a class receives it. Pieces are shared by every
// class that receives the same part of a policy rule.
type piece struct {
	// ri is the rule the piece comes from and self whether it is the
	// rule's autogroup:self part: a class's pieces are ordered by both.
	ri   int
	self bool
	// added is the AddNodes call that created the piece (0: Compile).
	added uint64
	// srcs are the SrcIPs lists of the rule's source selectors; the piece
	// becomes one FilterRule per non-empty list so the lists stay shared.
	srcs   []*srcList
	protos []int
	// dst are destinations that are the same for every receiver.
	dst []tailcfg.NetPortRange
	// selfPorts are ports on the receiving node's own addresses.
	selfPorts []tailcfg.PortRange
	// caps describes an app grant (CapGrant rule) to the node itself.
	caps    tailcfg.PeerCapMap
	capSelf bool
	// names are the FilterPart names of the piece's rules, one per source
	// list, made once: fan-outs ask for them per receiving node.
	names []string
}

// selector is one distinct alias used by the policy, resolved against the
// tailnet.
type selector struct {
	a alias
	// classes whose nodes the alias names (identity, or address inside a
	// prefix), and classes whose approved routes overlap the alias.
	classes      bitset
	routeClasses bitset
	// addrs are the addresses the alias stands for as a source, and src
	// their FilterRule.SrcIPs rendering.
	addrs *netipx.IPSet
	src   *srcList

	// What rules using the selector as a source reach (classes, addresses,
	// the internet), and what reaches rules using it as a destination.
	reach, reachedBy       bitset
	reachPfx, reachedByPfx netipx.IPSetBuilder
	internet               bool
}

// compiler holds the state of one Compile call, kept with the result for
// AddNodes.
type compiler struct {
	c        *Compiled
	sels     []*selector
	selIdx   map[string]int
	index    *selectorIndex
	nodeSels [][]int        // per node: selectors naming it by identity/address
	nodeRSel [][]int        // per node: selectors overlapping its routes
	perUser  bool           // classes must separate users
	keys     map[string]int // class key -> class id

	wildcardSrc   []string
	approvedRoute *netipx.IPSet // all approved subnet routes
	userClasses   map[uint64][]int
	userSrcCache  map[uint64][]string

	// active marks the rules with at least one source address; the others
	// compile to nothing. selfRules are the rules with an autogroup:self
	// destination, which AddNodes walks for every user node it adds.
	active    []bool
	selfRules []int
	hasVia    bool
	// selRules are, per selector, the rules naming it as a source or
	// destination, and wildDstRules the rules to "*": the only rules that
	// can give a class started by AddNodes a piece or name it as a source.
	selRules     [][]int
	wildDstRules []int
	// anyDstReachedBy are the classes that are sources of rules to "*",
	// and anyDst those rules' source prefixes.
	anyDstReachedBy bitset
	anyDst          *netipx.IPSet
	// selReachPfx and selReachedByPfx are the selectors' prefix reach.
	selReachPfx, selReachedByPfx []*netipx.IPSet
	// self holds the autogroup:self piece of each rule and source user.
	self map[selfKey]*selfEntry
	// adds counts AddNodes and RemoveNodes calls, to mark the source lists
	// each changed.
	adds uint64
	// empty counts the classes RemoveNodes left without members.
	empty int
	// ssh is what each SSH rule emitted.
	ssh []*sshState
	// names holds the pieces' names by rule, self and count: pieces of one
	// rule in many classes share them.
	names map[nameKey][]string
}

type nameKey struct {
	ri   int
	self bool
	n    int
}

type selfKey struct {
	ri   int
	user uint64
}

// selfEntry is the autogroup:self part of one rule for one user: every
// class of the user receives pc, whose source is the user's classes that
// the rule's sources name.
type selfEntry struct {
	user    uint64
	classes []int
	// The piece, its source list and the piece's one-element srcs live in
	// the entry: there is one per autogroup:self rule and user (112,550
	// under the generated policy), and as separate objects they were
	// 460,000 of the 1.6 million a compiled tailnet kept live
	// (BenchmarkIdleGC in internal/netmap).
	pc   piece
	list srcList
	srcs [1]*srcList
}

// Compile resolves the policy against the tailnet's users and nodes and
// computes every class's filter, SSH policy, capabilities and visible peers.
// It fails only for problems that need the tailnet to detect.
func (p *Policy) Compile(users []User, nodes []Node) (*Compiled, error) {
	c := &Compiled{
		p:          p,
		nodes:      slices.Clone(nodes),
		byID:       make(map[uint64]int, len(nodes)),
		users:      make(map[uint64]User, len(users)),
		primary:    map[netip.Prefix]int{},
		viaPrimary: map[string]int{},
		lists:      newPeerLists(),
	}
	for _, u := range users {
		c.users[u.ID] = u
	}
	for i := range c.nodes {
		c.byID[c.nodes[i].ID] = i
		c.addrs = append(c.addrs, slices.Clip(c.nodes[i].addrPrefixes()))
	}
	if err := p.checkTailnet(users); err != nil {
		return nil, err
	}
	cp := &compiler{
		c:            c,
		selIdx:       map[string]int{},
		perUser:      p.usesSelf || len(p.localparts) > 0,
		keys:         map[string]int{},
		userClasses:  map[uint64][]int{},
		userSrcCache: map[uint64][]string{},
		self:         map[selfKey]*selfEntry{},
		names:        map[nameKey][]string{},
	}
	c.cp = cp
	cp.electPrimaries()
	cp.collectSelectors()
	cp.buildClasses()
	cp.resolveSelectors()
	cp.compileRules()
	cp.ssh = cp.sshStates()
	touch := newBitset(len(c.classes))
	cp.compileSSH(0, &touch)
	cp.compileNodeAttrs()
	return c, nil
}

// checkTailnet validates what needs the tailnet: localpart domains must be a
// domain of the tailnet, which is the domain of its first user (the one who
// created it, as in Tailscale).
func (p *Policy) checkTailnet(users []User) error {
	if len(p.localparts) == 0 {
		return nil
	}
	domain := tailnetDomain(users)
	for _, lp := range p.localparts {
		if lp != domain {
			return fmt.Errorf("ssh: %s is not associated with this Tailnet and cannot be used in user:*@<domain> expressions", lp)
		}
	}
	return nil
}

// tailnetDomain is the email domain of the lowest-ID user.
func tailnetDomain(users []User) string {
	var first *User
	for i := range users {
		if users[i].Email != "" && (first == nil || users[i].ID < first.ID) {
			first = &users[i]
		}
	}
	if first == nil {
		return ""
	}
	_, d, _ := strings.Cut(first.Email, "@")
	return d
}

// electPrimaries picks, for every approved subnet route, the router with the
// lowest node ID (the first registered, as Tailscale's first-come primary).
func (cp *compiler) electPrimaries() {
	c := cp.c
	var b netipx.IPSetBuilder
	for i := range c.nodes {
		n := &c.nodes[i]
		for _, r := range n.ApprovedRoutes {
			if isExitRoute(r) {
				continue
			}
			b.AddPrefix(r)
			cur, ok := c.primary[r]
			if !ok || n.ID < c.nodes[cur].ID {
				c.primary[r] = i
			}
		}
	}
	cp.approvedRoute, _ = b.IPSet()
	var w netipx.IPSetBuilder
	w.AddSet(tailnetAddrs)
	w.AddSet(cp.approvedRoute)
	ws, _ := w.IPSet()
	cp.wildcardSrc = ipSetStrings(ws)
}

func (cp *compiler) addSelector(a alias) {
	if _, ok := cp.selIdx[a.key()]; ok {
		return
	}
	cp.selIdx[a.key()] = len(cp.sels)
	cp.sels = append(cp.sels, &selector{a: a})
}

func (cp *compiler) collectSelectors() {
	p := cp.c.p
	for _, r := range p.rules {
		for _, a := range r.src {
			cp.addSelector(a)
		}
		for _, d := range r.dst {
			cp.addSelector(d.a)
		}
	}
	for _, r := range p.ssh {
		for _, a := range r.src {
			cp.addSelector(a)
		}
		for _, a := range r.dst {
			cp.addSelector(a)
		}
	}
	for _, na := range p.nodeAttrs {
		for _, a := range na.targets {
			cp.addSelector(a)
		}
	}
}

// userLogin returns the policy name of the node's user.
func (c *Compiled) userLogin(n *Node) string {
	u, ok := c.users[n.UserID]
	if !ok {
		return ""
	}
	return u.Login()
}

// matchNode reports whether the alias names the node by identity or address.
func (c *Compiled) matchNode(a alias, n *Node) bool {
	switch a.kind {
	case akWildcard, akDangerAll:
		return true
	case akUser:
		return !n.IsTagged() && c.userLogin(n) == a.name
	case akGroup:
		return !n.IsTagged() && slices.Contains(c.p.groups[a.name], c.userLogin(n))
	case akTag:
		return slices.Contains(n.Tags, a.name)
	case akDomain:
		return !n.IsTagged() && strings.HasSuffix(c.userLogin(n), "@"+strings.TrimPrefix(a.name, "user:*@"))
	case akMember:
		return !n.IsTagged()
	case akTagged:
		return n.IsTagged()
	case akPrefix:
		return (n.IPv4.IsValid() && containsAddr(a.pfx, n.IPv4)) || (n.IPv6.IsValid() && containsAddr(a.pfx, n.IPv6))
	}
	return false
}

// matchRoutes reports whether the alias covers part of what the node routes.
func matchRoutes(a alias, n *Node) bool {
	switch a.kind {
	case akPrefix:
		for _, r := range n.ApprovedRoutes {
			if !isExitRoute(r) && prefixesOverlap(a.pfx, []netip.Prefix{r}) {
				return true
			}
		}
	case akInternet:
		return n.isExitNode()
	}
	return false
}

// selectorIndex finds the selectors naming a node without trying them all.
type selectorIndex struct {
	always, users, tagged []int // "*"/danger-all; member; autogroup:tagged
	byTag                 map[string][]int
	byLogin               map[string][]int // user selectors and groups
	byDomain              map[string][]int
	prefixes              []int // host, IP and ipset selectors
	internet              []int
}

func (cp *compiler) indexSelectors() *selectorIndex {
	x := &selectorIndex{byTag: map[string][]int{}, byLogin: map[string][]int{}, byDomain: map[string][]int{}}
	for si, s := range cp.sels {
		switch s.a.kind {
		case akWildcard, akDangerAll:
			x.always = append(x.always, si)
		case akMember:
			x.users = append(x.users, si)
		case akTagged:
			x.tagged = append(x.tagged, si)
		case akTag:
			x.byTag[s.a.name] = append(x.byTag[s.a.name], si)
		case akUser:
			x.byLogin[s.a.name] = append(x.byLogin[s.a.name], si)
		case akGroup:
			for _, m := range cp.c.p.groups[s.a.name] {
				x.byLogin[m] = append(x.byLogin[m], si)
			}
		case akDomain:
			d := strings.TrimPrefix(s.a.name, "user:*@")
			x.byDomain[d] = append(x.byDomain[d], si)
		case akPrefix:
			x.prefixes = append(x.prefixes, si)
		case akInternet:
			x.internet = append(x.internet, si)
		}
	}
	return x
}

// nodeSelectors returns the selectors naming node n (identity or address)
// and those overlapping its routes, both sorted.
func (cp *compiler) nodeSelectors(x *selectorIndex, n *Node) (ids, rids []int) {
	ids = append(ids, x.always...)
	if n.IsTagged() {
		ids = append(ids, x.tagged...)
		for _, t := range n.Tags {
			ids = append(ids, x.byTag[t]...)
		}
	} else {
		ids = append(ids, x.users...)
		login := cp.c.userLogin(n)
		ids = append(ids, x.byLogin[login]...)
		if _, d, ok := strings.Cut(login, "@"); ok {
			ids = append(ids, x.byDomain[d]...)
		}
	}
	for _, si := range x.prefixes {
		a := cp.sels[si].a
		if cp.c.matchNode(a, n) {
			ids = append(ids, si)
		}
		if matchRoutes(a, n) {
			rids = append(rids, si)
		}
	}
	if n.isExitNode() {
		rids = append(rids, x.internet...)
	}
	slices.Sort(ids)
	return slices.Compact(ids), rids
}

// buildClasses groups nodes by what the policy can see of them.
func (cp *compiler) buildClasses() {
	c := cp.c
	c.classOf = make([]int, len(c.nodes))
	cp.nodeSels = make([][]int, len(c.nodes))
	cp.nodeRSel = make([][]int, len(c.nodes))
	cp.index = cp.indexSelectors()
	for i := range c.nodes {
		cp.classify(i)
	}
}

// classify puts node i into the class of its key, starting a new class when
// no node had that key, and reports whether it did.
func (cp *compiler) classify(i int) (ci int, isNew bool) {
	c := cp.c
	n := &c.nodes[i]
	ids, rids := cp.nodeSelectors(cp.index, n)
	cp.nodeSels[i], cp.nodeRSel[i] = ids, rids
	k := cp.classKey(n, ids, rids)
	ci, ok := cp.keys[k]
	if !ok {
		ci = len(c.classes)
		cp.keys[k] = ci
		c.classes = append(c.classes, &class{rep: i, user: n.UserID, tagged: n.IsTagged()})
		if !n.IsTagged() {
			cp.userClasses[n.UserID] = append(cp.userClasses[n.UserID], ci)
		}
	}
	c.classOf[i] = ci
	if cl := c.classes[ci]; len(cl.members) == 0 && ok {
		// A class RemoveNodes emptied comes back.
		cl.rep = i
		cp.empty--
	}
	c.classes[ci].members = append(c.classes[ci].members, i)
	return ci, !ok
}

// classKey is what the policy can see of a node: user (or tagged),
// approved routes, and the selectors naming it.
func (cp *compiler) classKey(n *Node, ids, rids []int) string {
	var kb strings.Builder
	if n.IsTagged() {
		kb.WriteString("t")
	} else {
		kb.WriteString("u")
		if cp.perUser {
			kb.WriteString(strconv.FormatUint(n.UserID, 10))
		}
	}
	// Approved routes decide what a router receives and which routes its
	// viewers get, so routers only share a class with routers of the same
	// routes.
	for _, r := range n.ApprovedRoutes {
		kb.WriteString(r.String())
		kb.WriteByte(',')
	}
	kb.WriteByte('|')
	for _, id := range ids {
		kb.WriteString(strconv.Itoa(id))
		kb.WriteByte(',')
	}
	kb.WriteByte('|')
	for _, id := range rids {
		kb.WriteString(strconv.Itoa(id))
		kb.WriteByte(',')
	}
	return kb.String()
}

// resolveSelectors computes each selector's classes and source addresses.
func (cp *compiler) resolveSelectors() {
	c := cp.c
	nc := len(c.classes)
	for _, s := range cp.sels {
		s.classes = newBitset(nc)
		s.routeClasses = newBitset(nc)
	}
	builders := make([]netipx.IPSetBuilder, len(cp.sels))
	for i := range c.nodes {
		ci := c.classOf[i]
		for _, si := range cp.nodeSels[i] {
			cp.sels[si].classes.set(ci)
			if cp.sels[si].a.isNodeSelector() {
				for _, p := range c.nodes[i].addrPrefixes() {
					builders[si].AddPrefix(p)
				}
			}
		}
		for _, si := range cp.nodeRSel[i] {
			cp.sels[si].routeClasses.set(ci)
		}
	}
	for si, s := range cp.sels {
		if s.a.kind == akPrefix {
			for _, p := range s.a.pfx {
				builders[si].AddPrefix(p)
			}
		}
		s.addrs, _ = builders[si].IPSet()
	}
}

func (cp *compiler) sel(a alias) *selector { return cp.sels[cp.selIdx[a.key()]] }

// srcRef returns a selector's addresses rendered as FilterRule.SrcIPs. Each
// selector's list is built once and shared by every rule that names it.
func (cp *compiler) srcRef(si int) *srcList {
	s := cp.sels[si]
	if s.src != nil {
		return s.src
	}
	s.src = &srcList{}
	switch s.a.kind {
	case akDangerAll:
		s.src.ips = []string{"*"}
	case akWildcard:
		s.src.ips = cp.wildcardSrc
	default:
		s.src.ips = ipSetStrings(s.addrs)
	}
	return s.src
}

// srcRefs returns the SrcIPs lists of a rule's sources, one per selector,
// and whether any of them stands for an address.
func (cp *compiler) srcRefs(src []alias) ([]*srcList, bool) {
	out := make([]*srcList, 0, len(src))
	any := false
	for _, a := range src {
		l := cp.srcRef(cp.selIdx[a.key()])
		out = append(out, l)
		any = any || len(l.ips) > 0
	}
	return out, any
}

// srcPrefixes is the address part of a rule's sources that is not node
// identity: prefixes, or everything routed for "*".
func (cp *compiler) srcPrefixes(src []alias, b *netipx.IPSetBuilder) {
	for _, a := range src {
		switch a.kind {
		case akWildcard, akDangerAll:
			b.AddSet(cp.approvedRoute)
			b.AddSet(tailnetAddrs)
		case akPrefix:
			for _, p := range a.pfx {
				b.AddPrefix(p)
			}
		}
	}
}

// dstPrefixes is the address part of a rule's destinations.
func dstPrefixes(dst []dstEntry, b *netipx.IPSetBuilder) {
	for _, d := range dst {
		switch d.a.kind {
		case akWildcard:
			b.AddPrefix(allIPv4)
			b.AddPrefix(allIPv6)
		case akInternet:
			b.AddSet(internetSet)
		case akPrefix:
			for _, p := range d.a.pfx {
				b.AddPrefix(p)
			}
		}
	}
}

// srcClasses returns the classes a rule's sources contain, for visibility:
// nodes named by the sources and routers of source prefixes.
func (cp *compiler) srcClasses(src []alias) bitset {
	out := newBitset(len(cp.c.classes))
	for _, a := range src {
		s := cp.sel(a)
		out.or(s.classes)
		out.or(s.routeClasses)
	}
	return out
}

// compileRules turns acls and grants into per-class filter pieces, visibility
// and route relevance. Visibility is accumulated per selector (what rules
// naming it as a source reach, what reaches rules naming it as a
// destination) and folded into classes at the end, so a rule costs its
// selectors, not its classes.
func (cp *compiler) compileRules() {
	c := cp.c
	nc := len(c.classes)
	for _, s := range cp.sels {
		s.reach = newBitset(nc)
		s.reachedBy = newBitset(nc)
	}
	// Via and autogroup:self rules depend on the class, not only on the
	// selectors; they add to these per-class sets directly.
	direct := make([]bitset, nc)
	for i := range direct {
		direct[i] = newBitset(nc)
	}
	anyDstReachedBy := newBitset(nc) // sources of rules to "*"
	var anyDstPfx netipx.IPSetBuilder
	cp.active = make([]bool, len(c.p.rules))
	cp.selRules = make([][]int, len(cp.sels))
	for ri := range c.p.rules {
		r := &c.p.rules[ri]
		cp.indexRule(ri)
		if len(r.via) > 0 {
			cp.hasVia = true
		}
		if slices.ContainsFunc(r.dst, func(d dstEntry) bool { return d.a.kind == akSelf }) {
			cp.selfRules = append(cp.selfRules, ri)
		}
		if len(r.src) == 0 || len(r.dst) == 0 {
			continue
		}
		srcs, active := cp.srcRefs(r.src)
		if !active {
			continue
		}
		cp.active[ri] = true
		srcCl := cp.srcClasses(r.src)

		var viaCl bitset
		if len(r.via) > 0 {
			viaCl = cp.viaClasses(r.via)
		}
		rc := cp.receivers(r, nc, viaCl)
		dstCl, selfEntries, wildDst := rc.dstCl, rc.selfEntries, rc.wild
		cp.givePieces(ri, srcs, rc.recvs, cp.appendPiece)

		// autogroup:self: each source user reaches their own untagged nodes.
		if len(selfEntries) > 0 {
			cp.compileSelf(ri, selfEntries, srcCl, cp.appendPiece, func(x, y int) {
				direct[x].set(y)
				direct[y].set(x)
			})
		}

		// Visibility and route relevance.
		var sp, dp netipx.IPSetBuilder
		cp.srcPrefixes(r.src, &sp)
		dstPrefixes(r.dst, &dp)
		srcSet, _ := sp.IPSet()
		dstSet, _ := dp.IPSet()
		internet := slices.ContainsFunc(r.dst, func(d dstEntry) bool { return d.a.kind == akInternet || d.a.kind == akWildcard })
		if len(r.via) > 0 {
			st := steer{pfx: dstSet, internet: internet, via: r.via}
			cp.electVia(dstSet, r.via)
			srcCl.each(func(ci int) {
				direct[ci].or(dstCl)
				c.classes[ci].steers = append(c.classes[ci].steers, st)
			})
			dstCl.each(func(ci int) { direct[ci].or(srcCl) })
			continue
		}
		for _, a := range r.src {
			s := cp.sel(a)
			s.reach.or(dstCl)
			s.reachPfx.AddSet(dstSet)
			s.internet = s.internet || internet
		}
		if wildDst {
			anyDstReachedBy.or(srcCl)
			anyDstPfx.AddSet(srcSet)
		}
		for _, d := range r.dst {
			if d.a.kind == akSelf || d.a.kind == akWildcard {
				continue
			}
			s := cp.sel(d.a)
			s.reachedBy.or(srcCl)
			s.reachedByPfx.AddSet(srcSet)
		}
	}

	// Fold selectors into classes.
	cp.selReachPfx = make([]*netipx.IPSet, len(cp.sels))
	cp.selReachedByPfx = make([]*netipx.IPSet, len(cp.sels))
	for si, s := range cp.sels {
		cp.selReachPfx[si], _ = s.reachPfx.IPSet()
		cp.selReachedByPfx[si], _ = s.reachedByPfx.IPSet()
	}
	cp.anyDstReachedBy = anyDstReachedBy
	cp.anyDst, _ = anyDstPfx.IPSet()
	for ci := range c.classes {
		cp.foldClass(ci, direct[ci])
	}
}

// indexRule adds rule ri to selRules and wildDstRules.
func (cp *compiler) indexRule(ri int) {
	r := &cp.c.p.rules[ri]
	for _, a := range r.src {
		si := cp.selIdx[a.key()]
		cp.selRules[si] = append(cp.selRules[si], ri)
	}
	for _, d := range r.dst {
		switch d.a.kind {
		case akSelf:
		case akWildcard:
			cp.wildDstRules = append(cp.wildDstRules, ri)
		default:
			si := cp.selIdx[d.a.key()]
			cp.selRules[si] = append(cp.selRules[si], ri)
		}
	}
}

// appendPiece gives class ci piece pc, which comes after its pieces in
// (rule, self) order.
func (cp *compiler) appendPiece(ci int, pc *piece) {
	cp.c.classes[ci].pieces = append(cp.c.classes[ci].pieces, pc)
	cp.holdLists(ci, pc)
}

// holdLists records class ci as a holder of pc's selector source lists.
func (cp *compiler) holdLists(ci int, pc *piece) {
	if pc.self {
		return
	}
	for _, l := range pc.srcs {
		l.holders.add(ci)
	}
}

// foldClass computes class ci's visibility from the selectors naming its
// representative, on top of vis (its direct links), and the address sets
// deciding which routes it gets.
func (cp *compiler) foldClass(ci int, vis bitset) {
	cl := cp.c.classes[ci]
	vis.or(cp.anyDstReachedBy)
	var rb, rbb netipx.IPSetBuilder
	rbb.AddSet(cp.anyDst)
	each := func(si int) {
		s := cp.sels[si]
		vis.or(s.reach)
		vis.or(s.reachedBy)
		rb.AddSet(cp.selReachPfx[si])
		rbb.AddSet(cp.selReachedByPfx[si])
		cl.internet = cl.internet || s.internet
	}
	for _, si := range cp.nodeSels[cl.rep] {
		each(si)
	}
	for _, si := range cp.nodeRSel[cl.rep] {
		each(si)
	}
	cl.visible = vis
	cl.reach, _ = rb.IPSet()
	cl.reachedBy, _ = rbb.IPSet()
}

// viaClasses returns the classes carrying any of the via tags.
func (cp *compiler) viaClasses(via []string) bitset {
	out := newBitset(len(cp.c.classes))
	for ci, cl := range cp.c.classes {
		if hasAnyTag(&cp.c.nodes[cl.rep], via) {
			out.set(ci)
		}
	}
	return out
}

func viaKey(r netip.Prefix, via []string) string { return r.String() + "|" + strings.Join(via, ",") }

// electVia elects, for every approved route inside dst, the primary among
// the routers carrying a via tag: the lowest node ID, as for primaries.
func (cp *compiler) electVia(dst *netipx.IPSet, via []string) {
	c := cp.c
	for i := range c.nodes {
		n := &c.nodes[i]
		if !hasAnyTag(n, via) {
			continue
		}
		for _, r := range n.ApprovedRoutes {
			if !dst.OverlapsPrefix(r) {
				continue
			}
			k := viaKey(r, via)
			if cur, ok := c.viaPrimary[k]; !ok || n.ID < c.nodes[cur].ID {
				c.viaPrimary[k] = i
			}
		}
	}
}

// newPiece builds the filter piece of rule ri for the entries marked in m,
// as a node like rep receives them. It returns nil when nothing applies.
func (cp *compiler) newPiece(ri int, srcs []*srcList, m []bool, rep Node) *piece {
	r := &cp.c.p.rules[ri]
	pc := &piece{ri: ri, added: cp.adds, srcs: srcs, protos: r.protos, caps: r.caps, names: cp.pieceNames(ri, false, len(srcs))}
	own := rep.addrPrefixes()
	routes := nonExit(rep.ApprovedRoutes)
	for ei, on := range m {
		if !on {
			continue
		}
		d := r.dst[ei]
		if r.caps != nil {
			// Capabilities are granted to nodes; an app grant to addresses
			// only makes the routers visible.
			if d.a.kind != akPrefix {
				pc.capSelf = true
			}
			continue
		}
		switch d.a.kind {
		case akWildcard:
			for _, pr := range d.ports {
				pc.dst = append(pc.dst, tailcfg.NetPortRange{IP: "*", Ports: pr})
			}
		case akPrefix:
			for _, p := range d.a.pfx {
				if !prefixesOverlap([]netip.Prefix{p}, own) && !prefixesOverlap([]netip.Prefix{p}, routes) {
					continue
				}
				for _, pr := range d.ports {
					pc.dst = append(pc.dst, tailcfg.NetPortRange{IP: prefixString(p), Ports: pr})
				}
			}
		case akInternet:
			for _, p := range internetSet.Prefixes() {
				for _, pr := range d.ports {
					pc.dst = append(pc.dst, tailcfg.NetPortRange{IP: p.String(), Ports: pr})
				}
			}
		default:
			pc.selfPorts = append(pc.selfPorts, d.ports...)
		}
	}
	if len(pc.dst) == 0 && len(pc.selfPorts) == 0 && !pc.capSelf {
		return nil
	}
	return pc
}

// receivers are the classes a rule's destinations name: which entries
// each receives, all of them as a set, the autogroup:self entries, and
// whether a destination is "*".
type receivers struct {
	recvs       map[int][]bool
	dstCl       bitset
	selfEntries []int
	wild        bool
}

// receivers computes rule r's receivers among nc classes; viaCl, when
// set, are the classes carrying its via tags.
func (cp *compiler) receivers(r *rule, nc int, viaCl bitset) receivers {
	rc := receivers{recvs: map[int][]bool{}, dstCl: newBitset(nc)}
	mark := func(ci, ei int) {
		m, ok := rc.recvs[ci]
		if !ok {
			m = make([]bool, len(r.dst))
			rc.recvs[ci] = m
		}
		m[ei] = true
		rc.dstCl.set(ci)
	}
	for ei, d := range r.dst {
		switch d.a.kind {
		case akSelf:
			rc.selfEntries = append(rc.selfEntries, ei)
			continue
		case akWildcard:
			for ci := range nc {
				mark(ci, ei)
			}
			rc.wild = true
			continue
		}
		s := cp.sel(d.a)
		if viaCl != nil && (d.a.kind == akPrefix || d.a.kind == akInternet) {
			// A via grant is carried only by the routers with a via tag.
			s.routeClasses.each(func(ci int) {
				if viaCl.has(ci) {
					mark(ci, ei)
				}
			})
			continue
		}
		s.classes.each(func(ci int) { mark(ci, ei) })
		s.routeClasses.each(func(ci int) { mark(ci, ei) })
	}
	return rc
}

// givePieces builds rule ri's pieces for its receivers, one shared by all
// the classes receiving the same entries, and gives each class its own.
func (cp *compiler) givePieces(ri int, srcs []*srcList, recvs map[int][]bool, give func(ci int, pc *piece)) {
	c := cp.c
	shared := map[string]*piece{}
	key := make([]byte, len(c.p.rules[ri].dst))
	for ci, m := range recvs {
		for i, v := range m {
			key[i] = '0'
			if v {
				key[i] = '1'
			}
		}
		pc, ok := shared[string(key)]
		if !ok {
			pc = cp.newPiece(ri, srcs, m, c.nodes[c.classes[ci].rep])
			shared[string(key)] = pc
		}
		if pc != nil {
			give(ci, pc)
		}
	}
}

// compileSelf handles autogroup:self destinations of rule ri: sources
// reach the untagged nodes of their own user. Every class of a source user
// is given the user's piece and linked with the user's source classes.
func (cp *compiler) compileSelf(ri int, entries []int, srcCl bitset, give func(ci int, pc *piece), link func(x, y int)) {
	c := cp.c
	ports := selfPorts(&c.p.rules[ri], entries)
	// Users with at least one untagged node named by the sources.
	var users []uint64
	seen := map[uint64]bool{}
	srcCl.each(func(ci int) {
		if cl := c.classes[ci]; !cl.tagged && !seen[cl.user] {
			seen[cl.user] = true
			users = append(users, cl.user)
		}
	})
	for _, u := range users {
		ucl := cp.userClasses[u]
		var srcUser []int
		for _, ci := range ucl {
			if srcCl.has(ci) {
				srcUser = append(srcUser, ci)
			}
		}
		e := cp.newSelfEntry(ri, ports, u, srcUser)
		for _, ci := range ucl {
			give(ci, &e.pc)
			for _, si := range srcUser {
				link(ci, si)
			}
		}
	}
}

// selfPorts are the ports of rule r's autogroup:self entries.
func selfPorts(r *rule, entries []int) []tailcfg.PortRange {
	var ports []tailcfg.PortRange
	for _, ei := range entries {
		ports = append(ports, r.dst[ei].ports...)
	}
	return ports
}

// newSelfEntry builds the autogroup:self piece of rule ri for user u, whose
// classes srcUser the rule's sources name.
func (cp *compiler) newSelfEntry(ri int, ports []tailcfg.PortRange, u uint64, srcUser []int) *selfEntry {
	r := &cp.c.p.rules[ri]
	e := &selfEntry{user: u, classes: srcUser}
	e.list.ips = cp.userSrc(u, srcUser)
	e.srcs[0] = &e.list
	e.pc = piece{ri: ri, self: true, added: cp.adds, srcs: e.srcs[:], protos: r.protos, caps: r.caps, names: cp.pieceNames(ri, true, 1)}
	if r.caps != nil {
		e.pc.capSelf = true
	} else {
		e.pc.selfPorts = ports
	}
	cp.self[selfKey{ri, u}] = e
	return e
}

// userSrc renders the addresses of a user's classes as SrcIPs, cached for
// the common case of all the user's untagged nodes.
func (cp *compiler) userSrc(u uint64, cls []int) []string {
	all := len(cls) == len(cp.userClasses[u])
	if all {
		if s, ok := cp.userSrcCache[u]; ok {
			return s
		}
	}
	var b netipx.IPSetBuilder
	for _, ci := range cls {
		for _, ni := range cp.c.classes[ci].members {
			for _, p := range cp.c.nodes[ni].addrPrefixes() {
				b.AddPrefix(p)
			}
		}
	}
	set, _ := b.IPSet()
	out := ipSetStrings(set)
	if all {
		cp.userSrcCache[u] = out
	}
	return out
}

func nonExit(rs []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(rs))
	for _, r := range rs {
		if !isExitRoute(r) {
			out = append(out, r)
		}
	}
	return out
}

// prefixString renders a host prefix as a bare address, others as CIDR.
func prefixString(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

// node returns the node with the given ID.
func (c *Compiled) node(id uint64) (*Node, int, bool) {
	i, ok := c.byID[id]
	if !ok {
		return nil, 0, false
	}
	return &c.nodes[i], i, true
}

// ClassOf returns the node's identity class id, or -1 for an unknown node.
// Nodes of one class get identical filters (up to their own addresses),
// SSH policies and peer classes.
func (c *Compiled) ClassOf(nodeID uint64) int {
	_, i, ok := c.node(nodeID)
	if !ok {
		return -1
	}
	return c.classOf[i]
}

// NumClasses returns the number of identity classes.
func (c *Compiled) NumClasses() int { return len(c.classes) }

// Filter returns the packet filter the node receives. Rules are built from
// pieces shared by the node's class; destinations that name the node itself
// carry its own addresses, as Tailscale sends them. The result is freshly
// allocated but its SrcIPs and CapMap are shared and must not be modified.
func (c *Compiled) Filter(nodeID uint64) []tailcfg.FilterRule {
	n, i, ok := c.node(nodeID)
	if !ok {
		return nil
	}
	cl := c.classes[c.classOf[i]]
	out := make([]tailcfg.FilterRule, 0, len(cl.pieces))
	for _, pc := range cl.pieces {
		out = pc.appendRules(out, n)
	}
	return out
}

// appendRules appends the piece's rules as node n receives them: one per
// non-empty source list.
func (pc *piece) appendRules(out []tailcfg.FilterRule, n *Node) []tailcfg.FilterRule {
	fr := pc.rule(n)
	for _, src := range pc.srcs {
		if len(src.ips) == 0 {
			continue
		}
		fr.SrcIPs = src.ips
		out = append(out, fr)
	}
	return out
}

// rule returns the piece's rule as node n receives it, without SrcIPs.
func (pc *piece) rule(n *Node) tailcfg.FilterRule {
	var fr tailcfg.FilterRule
	fr.IPProto = pc.protos
	if pc.caps != nil {
		fr.CapGrant = []tailcfg.CapGrant{{Dsts: n.addrPrefixes(), CapMap: pc.caps}}
		return fr
	}
	fr.DstPorts = pc.dst
	if len(pc.selfPorts) > 0 {
		dp := make([]tailcfg.NetPortRange, 0, len(pc.dst)+2*len(pc.selfPorts))
		dp = append(dp, pc.dst...)
		for _, a := range n.addrStrings() {
			for _, pr := range pc.selfPorts {
				dp = append(dp, tailcfg.NetPortRange{IP: a, Ports: pr})
			}
		}
		fr.DstPorts = dp
	}
	return fr
}

// Gen counts the AddNodes calls applied to the compilation: the
// generation of its filters, for ClassFilterPartsSince.
func (c *Compiled) Gen() uint64 { return c.cp.adds }

// pieceNames returns pieceNames(ri, self, n), made once per compilation.
func (cp *compiler) pieceNames(ri int, self bool, n int) []string {
	k := nameKey{ri, self, n}
	names, ok := cp.names[k]
	if !ok {
		names = pieceNames(ri, self, n)
		cp.names[k] = names
	}
	return names
}

// pieceNames are the FilterPart names of a piece's n rules: the rule
// index, zero-padded so names sort numerically, "s" for the rule's
// autogroup:self part, and, when the piece has several source lists, a
// dot and the list's index, padded to one width (names sort in list
// order; "." sorts before "s", so a rule's parts stay in order).
func pieceNames(ri int, self bool, n int) []string {
	nm := fmt.Sprintf("%07d", ri)
	if self {
		nm += "s"
	}
	if n == 1 {
		return []string{nm}
	}
	width := len(strconv.Itoa(n - 1))
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s.%0*d", nm, width, i)
	}
	return names
}

// Peers returns the peers the node sees, sorted by node ID: its class's
// peers without the node itself.
func (c *Compiled) Peers(nodeID uint64) []Peer {
	l := c.ClassPeers(nodeID)
	out := make([]Peer, 0, len(l))
	for _, p := range l {
		if p.ID != nodeID {
			out = append(out, p)
		}
	}
	return out
}

// peerView is node pi as nodes of class viewer see it.
func (c *Compiled) peerView(viewer *class, pi int) Peer {
	n := &c.nodes[pi]
	p := Peer{ID: n.ID, AllowedIPs: c.addrs[pi]}
	if n.IPv4.IsValid() && (viewer.hasCap(capDisableIPv4) || c.classes[c.classOf[pi]].hasCap(capDisableIPv4)) {
		// Either side without IPv4 means the pair talks IPv6 only.
		p.AllowedIPs = p.AllowedIPs[1:]
	}
	vr := c.nodes[viewer.rep].ApprovedRoutes
	for _, r := range n.ApprovedRoutes {
		if isExitRoute(r) {
			if viewer.internet || slices.ContainsFunc(viewer.steers, func(s steer) bool { return s.internet && hasAnyTag(n, s.via) }) {
				p.AllowedIPs = append(p.AllowedIPs, r)
			}
			continue
		}
		// The primary carries the route for viewers whose rules touch it,
		// and for the other routers of the route (its standbys). Via grants
		// steer sources that have no other access to the route to the via
		// routers' own primary.
		var use bool
		if viewer.reach.OverlapsPrefix(r) || viewer.reachedBy.OverlapsPrefix(r) || slices.Contains(vr, r) {
			use = c.primary[r] == pi
		} else {
			use = slices.ContainsFunc(viewer.steers, func(s steer) bool {
				vp, ok := c.viaPrimary[viaKey(r, s.via)]
				return ok && vp == pi && s.pfx.OverlapsPrefix(r)
			})
		}
		if use {
			p.AllowedIPs = append(p.AllowedIPs, r)
			p.PrimaryRoutes = append(p.PrimaryRoutes, r)
		}
	}
	return p
}

func (cl *class) hasCap(name tailcfg.NodeCapability) bool {
	_, ok := cl.caps[name]
	return ok
}

// capDisableIPv4 is the node attribute that keeps IPv4 peer addresses away
// from a node.
const capDisableIPv4 tailcfg.NodeCapability = "disable-ipv4"

func hasAnyTag(n *Node, tags []string) bool {
	return slices.ContainsFunc(n.Tags, func(t string) bool { return slices.Contains(tags, t) })
}

// SSHPolicy returns the SSH policy the node receives, or nil when none.
func (c *Compiled) SSHPolicy(nodeID uint64) *tailcfg.SSHPolicy {
	_, i, ok := c.node(nodeID)
	if !ok {
		return nil
	}
	cl := c.classes[c.classOf[i]]
	if len(cl.ssh) == 0 {
		return nil
	}
	return &tailcfg.SSHPolicy{Rules: cl.ssh}
}

// CapMap returns the node's capabilities: defaultCaps and those of
// nodeAttrs. The map is shared; callers must not modify it.
func (c *Compiled) CapMap(nodeID uint64) tailcfg.NodeCapMap {
	_, i, ok := c.node(nodeID)
	if !ok {
		return nil
	}
	return c.classes[c.classOf[i]].caps
}

// compileNodeAttrs assigns nodeAttrs capabilities to classes.
func (cp *compiler) compileNodeAttrs() {
	for ci := range cp.c.classes {
		cp.capsFor(ci)
	}
}

// defaultCaps are the capabilities every node has, as Tailscale grants
// them by default, for the features tailplane serves: Tailscale SSH (a
// client refuses to run its SSH server without cap/ssh), with Tailscale's
// default server behaviour and the environment variables SSH rules accept
// (acceptEnv), and Taildrop. Classes without nodeAttrs share this map.
var defaultCaps = tailcfg.NodeCapMap{
	tailcfg.CapabilitySSH:                   nil,
	tailcfg.NodeAttrSSHBehaviorV1:           nil,
	tailcfg.NodeAttrSSHEnvironmentVariables: nil,
	tailcfg.CapabilityFileSharing:           nil,
}

// capsFor assigns defaultCaps and nodeAttrs capabilities to class ci.
func (cp *compiler) capsFor(ci int) {
	cl := cp.c.classes[ci]
	cl.caps = defaultCaps
	shared := true
	for _, na := range cp.c.p.nodeAttrs {
		for _, t := range na.targets {
			if !cp.sel(t).classes.has(ci) {
				continue
			}
			if shared {
				cl.caps, shared = maps.Clone(defaultCaps), false
			}
			for _, at := range na.attrs {
				if _, ok := cl.caps[tailcfg.NodeCapability(at)]; !ok {
					cl.caps[tailcfg.NodeCapability(at)] = nil
				}
			}
		}
	}
}
