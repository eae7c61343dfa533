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

// compileSSH builds each class's SSH rules. When grown is set (AddNodes),
// the classes receiving a rule whose sources include a grown class are
// added to changed: the rule's principals changed.
func (cp *compiler) compileSSH(grown bitset, changed *bitset) {
	c := cp.c
	nc := len(c.classes)
	for ri := range c.p.ssh {
		r := &c.p.ssh[ri]
		common, localDomains := r.sshUsers()
		// Source nodes, grouped into the units Tailscale emits rules for.
		srcCl := newBitset(nc)
		for _, a := range r.src {
			srcCl.or(cp.sel(a).classes)
		}
		var srcNodes []int
		srcCl.each(func(ci int) { srcNodes = append(srcNodes, c.classes[ci].members...) })
		slices.Sort(srcNodes)
		if len(srcNodes) == 0 {
			continue
		}
		touched := grown != nil && srcCl.intersects(grown)
		dstCl := newBitset(nc)
		hasSelf := false
		for _, a := range r.dst {
			if a.kind == akSelf {
				hasSelf = true
				continue
			}
			dstCl.or(cp.sel(a).classes)
		}
		emit := func(principals []int, users map[string]string, to bitset) {
			rule := &tailcfg.SSHRule{
				Principals: principalsOf(c, principals),
				SSHUsers:   users,
				Action:     r.action(),
				AcceptEnv:  r.acceptEnv,
			}
			to.each(func(ci int) {
				c.classes[ci].ssh = append(c.classes[ci].ssh, rule)
				if touched {
					changed.add(ci)
				}
			})
		}
		if len(localDomains) == 0 {
			if !dstCl.empty() {
				emit(srcNodes, common, dstCl)
			}
			if hasSelf {
				for _, u := range groupByUser(c, srcNodes) {
					to := newBitset(nc)
					for _, ci := range cp.userClasses[u.user] {
						to.set(ci)
					}
					emit(u.nodes, common, to)
				}
			}
			continue
		}
		// With localpart users, Tailscale emits the rule per source user (and
		// per tagged source class) and also delivers it to the source's own
		// nodes.
		for _, u := range groupByUser(c, srcNodes) {
			to := newBitset(nc)
			to.or(dstCl)
			for _, ci := range cp.userClasses[u.user] {
				to.set(ci)
			}
			emit(u.nodes, common, to)
			if lp, ok := localpartFor(c, u.user, localDomains); ok {
				emit(u.nodes, map[string]string{lp: lp}, to)
			}
		}
		byClass := map[int][]int{}
		var order []int
		for _, ni := range srcNodes {
			if !c.nodes[ni].IsTagged() {
				continue
			}
			ci := c.classOf[ni]
			if _, ok := byClass[ci]; !ok {
				order = append(order, ci)
			}
			byClass[ci] = append(byClass[ci], ni)
		}
		for _, ci := range order {
			to := newBitset(nc)
			to.or(dstCl)
			to.set(ci)
			emit(byClass[ci], common, to)
		}
	}
}

type userNodes struct {
	user  uint64
	nodes []int
}

// groupByUser groups the untagged nodes by user, in first-seen order.
func groupByUser(c *Compiled, nodes []int) []userNodes {
	var out []userNodes
	idx := map[uint64]int{}
	for _, ni := range nodes {
		n := &c.nodes[ni]
		if n.IsTagged() {
			continue
		}
		i, ok := idx[n.UserID]
		if !ok {
			i = len(out)
			idx[n.UserID] = i
			out = append(out, userNodes{user: n.UserID})
		}
		out[i].nodes = append(out[i].nodes, ni)
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

func principalsOf(c *Compiled, nodes []int) []*tailcfg.SSHPrincipal {
	var out []*tailcfg.SSHPrincipal
	for _, ni := range nodes {
		out = append(out, c.nodePrincipals(ni)...)
	}
	return out
}

// nodePrincipals returns node i's addresses as SSH principals, built once
// per node: AddNodes rebuilds every SSH rule, whose sources can be most of
// the tailnet, and profiles showed rendering them again as its main cost.
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
