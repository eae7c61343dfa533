package policy

import (
	"slices"
	"strings"

	"tailscale.com/tailcfg"
)

// checkURL is the hold-and-delegate URL of "check" rules. Clients fetch it
// over their control connection, so the host is a placeholder, as Tailscale
// sends it.
const checkURL = "https://unused/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER"

func (r *sshRule) action() *tailcfg.SSHAction {
	if r.accept {
		return &tailcfg.SSHAction{
			Accept:                    true,
			AllowAgentForwarding:      true,
			AllowLocalPortForwarding:  true,
			AllowRemotePortForwarding: true,
		}
	}
	return &tailcfg.SSHAction{HoldAndDelegate: checkURL}
}

// sshUsers maps the rule's login users. root is denied ("") unless listed;
// autogroup:nonroot maps every other user to itself ("*": "=").
func (r *sshRule) sshUsers() (common map[string]string, localDomains []string) {
	common = map[string]string{}
	for _, u := range r.users {
		switch {
		case u == "autogroup:nonroot":
			common["*"] = "="
		case strings.HasPrefix(u, "localpart:*@") && len(u) > len("localpart:*@"):
			localDomains = append(localDomains, strings.TrimPrefix(u, "localpart:*@"))
		default:
			common[u] = u
		}
	}
	if _, ok := common["root"]; !ok {
		common["root"] = ""
	}
	return common, localDomains
}

// sshState is what one SSH rule emitted, kept with the compilation so that
// AddNodes re-emits only the parts whose sources gained nodes. Tailscale
// emits a rule per unit of sources: all of them (to the rule's
// destinations), each source user (to the user's own nodes, for
// autogroup:self and localpart users) and each tagged source class
// (localpart users).
type sshState struct {
	r            *sshRule
	common       map[string]string
	localDomains []string
	hasSelf      bool
	// hasDst is set when a destination is not autogroup:self; dstCl are
	// the classes those destinations name.
	hasDst bool
	dstCl  bitset
	// principals are every source node's, in node order, and all the rule
	// emitted with them to dstCl (rules without localpart users).
	principals []*tailcfg.SSHPrincipal
	all        *tailcfg.SSHRule
	// users and tagged are the per-user and per-tagged-class parts, in the
	// order of their first source node.
	users   []*sshGroup
	byUser  map[uint64]*sshGroup
	tagged  []*sshGroup
	byClass map[int]*sshGroup
}

// sshGroup is the part of an SSH rule emitted for one source user or
// tagged source class.
type sshGroup struct {
	user       uint64
	class      int // the tagged class; -1 for a user
	principals []*tailcfg.SSHPrincipal
	rules      []*tailcfg.SSHRule
	dirty      bool // gained a source node in this compileSSH call
}

// sshStates starts the state of every SSH rule, with no sources yet.
func (cp *compiler) sshStates() []*sshState {
	out := make([]*sshState, len(cp.c.p.ssh))
	for ri := range cp.c.p.ssh {
		r := &cp.c.p.ssh[ri]
		st := &sshState{r: r, byUser: map[uint64]*sshGroup{}, byClass: map[int]*sshGroup{}}
		st.common, st.localDomains = r.sshUsers()
		for _, a := range r.dst {
			if a.kind == akSelf {
				st.hasSelf = true
			} else {
				st.hasDst = true
			}
		}
		out[ri] = st
	}
	return out
}

// compileSSH adds the nodes from index first on to the SSH rules' sources,
// re-emits the parts of the rules that gained source nodes, and rebuilds
// the SSH rules of the classes in touch and of every class receiving a
// re-emitted part; touch ends holding them all. Compile passes every node;
// AddNodes the nodes it adds, with the classes it started in touch. New
// nodes come after every node already added, so the parts keep the order a
// single pass over all nodes gives them.
func (cp *compiler) compileSSH(first int, touch *bitset) {
	c := cp.c
	nc := len(c.classes)
	for _, st := range cp.ssh {
		st.dstCl = newBitset(nc)
		for _, a := range st.r.dst {
			if a.kind != akSelf {
				st.dstCl.or(cp.sel(a).classes)
			}
		}
		srcCl := newBitset(nc)
		for _, a := range st.r.src {
			srcCl.or(cp.sel(a).classes)
		}
		cp.addSSHSources(st, first, srcCl, touch)
	}
	touch.each(func(ci int) { c.classes[ci].ssh = cp.classSSH(ci) })
}

// addSSHSources adds the nodes from index first on that are in srcCl to
// the rule's sources and re-emits the parts they join, adding the classes
// receiving those parts to touch.
func (cp *compiler) addSSHSources(st *sshState, first int, srcCl bitset, touch *bitset) {
	c := cp.c
	perUser := st.hasSelf || len(st.localDomains) > 0
	allDirty := false
	var dirty []*sshGroup
	for ni := first; ni < len(c.nodes); ni++ {
		ci := c.classOf[ni]
		if !srcCl.has(ci) {
			continue
		}
		pr := c.nodePrincipals(ni)
		if st.hasDst && len(st.localDomains) == 0 {
			st.principals = append(st.principals, pr...)
			allDirty = true
		}
		var g *sshGroup
		switch n := &c.nodes[ni]; {
		case !n.IsTagged() && perUser:
			if g = st.byUser[n.UserID]; g == nil {
				g = &sshGroup{user: n.UserID, class: -1}
				st.byUser[n.UserID] = g
				st.users = append(st.users, g)
			}
		case n.IsTagged() && len(st.localDomains) > 0:
			if g = st.byClass[ci]; g == nil {
				g = &sshGroup{class: ci}
				st.byClass[ci] = g
				st.tagged = append(st.tagged, g)
			}
		default:
			continue
		}
		g.principals = append(g.principals, pr...)
		if !g.dirty {
			g.dirty = true
			dirty = append(dirty, g)
		}
	}
	if allDirty {
		st.all = st.emit(st.principals, st.common)
		touch.orGrow(st.dstCl)
	}
	for _, g := range dirty {
		g.dirty = false
		cp.reemit(st, g, touch)
	}
}

// emit makes one SSH rule of the state's rule for principals pr.
func (st *sshState) emit(pr []*tailcfg.SSHPrincipal, users map[string]string) *tailcfg.SSHRule {
	// Clipped: the state appends to pr for later joins.
	return &tailcfg.SSHRule{Principals: slices.Clip(pr), SSHUsers: users, Action: st.r.action(), AcceptEnv: st.r.acceptEnv}
}

// reemit rebuilds the rules of group g, whose principals changed, and adds
// the classes receiving them to touch.
func (cp *compiler) reemit(st *sshState, g *sshGroup, touch *bitset) {
	g.rules = []*tailcfg.SSHRule{st.emit(g.principals, st.common)}
	if len(st.localDomains) > 0 {
		// With localpart users every part also goes to the rule's
		// destinations.
		touch.orGrow(st.dstCl)
	}
	if g.class >= 0 {
		touch.add(g.class)
		return
	}
	if lp, ok := localpartFor(cp.c, g.user, st.localDomains); ok {
		g.rules = append(g.rules, st.emit(g.principals, map[string]string{lp: lp}))
	}
	for _, ci := range cp.userClasses[g.user] {
		touch.add(ci)
	}
}

// classSSH returns class ci's SSH rules: in rule order, the parts of each
// rule that the class receives, in the order Tailscale emits them.
func (cp *compiler) classSSH(ci int) []*tailcfg.SSHRule {
	cl := cp.c.classes[ci]
	var out []*tailcfg.SSHRule
	for _, st := range cp.ssh {
		if st.dstCl.has(ci) {
			if st.all != nil {
				out = append(out, st.all)
			}
			if len(st.localDomains) > 0 {
				for _, g := range st.users {
					out = append(out, g.rules...)
				}
				for _, g := range st.tagged {
					out = append(out, g.rules...)
				}
				continue
			}
		}
		// The part of the class's own user, or of the tagged class itself.
		g := st.byUser[cl.user]
		if cl.tagged {
			g = st.byClass[ci]
		}
		if g != nil {
			out = append(out, g.rules...)
		}
	}
	return out
}

// localpartFor returns the local part of the user's email when its domain is
// one of domains.
func localpartFor(c *Compiled, uid uint64, domains []string) (string, bool) {
	u, ok := c.users[uid]
	if !ok {
		return "", false
	}
	local, domain, ok := strings.Cut(u.Email, "@")
	if !ok || local == "" || !slices.Contains(domains, domain) {
		return "", false
	}
	return local, true
}

// nodePrincipals returns node i's addresses as SSH principals, built once
// per node and shared by every SSH rule (and part of one) naming it.
func (c *Compiled) nodePrincipals(i int) []*tailcfg.SSHPrincipal {
	for len(c.principals) <= i {
		c.principals = append(c.principals, nil)
	}
	if c.principals[i] == nil {
		for _, a := range c.nodes[i].addrStrings() {
			c.principals[i] = append(c.principals[i], &tailcfg.SSHPrincipal{NodeIP: a})
		}
	}
	return c.principals[i]
}
