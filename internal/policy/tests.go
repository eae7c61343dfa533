package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"tailscale.com/tailcfg"
)

// RunTests evaluates the policy's tests and sshTests against the tailnet. The
// error lists every failing assertion.
func (p *Policy) RunTests(users []User, nodes []Node) error {
	if len(p.tests) == 0 && len(p.sshTests) == 0 {
		return nil
	}
	c, err := p.Compile(users, nodes)
	if err != nil {
		return err
	}
	var fails []string
	for _, t := range p.tests {
		fails = append(fails, c.runACLTest(&t)...)
	}
	for _, t := range p.sshTests {
		fails = append(fails, c.runSSHTest(&t)...)
	}
	if len(fails) > 0 {
		return fmt.Errorf("test(s) failed:\n%s", strings.Join(fails, "\n"))
	}
	return nil
}

// endpoint is a test source or destination: a node, or bare addresses.
type endpoint struct {
	node *Node
	pfx  netip.Prefix
}

func (e endpoint) String() string {
	if e.node != nil {
		return e.node.Hostname
	}
	return e.pfx.String()
}

// resolveEndpoints resolves a test's source or destination name.
func (c *Compiled) resolveEndpoints(name string, self *Node) ([]endpoint, error) {
	a, err := aliasCtx{c.p}.parse(name)
	if err != nil {
		return nil, err
	}
	var out []endpoint
	switch a.kind {
	case akSelf:
		if self == nil || self.IsTagged() {
			return nil, errors.New("autogroup:self needs a user source")
		}
		for i := range c.nodes {
			if n := &c.nodes[i]; !n.IsTagged() && n.UserID == self.UserID {
				out = append(out, endpoint{node: n})
			}
		}
	case akInternet, akDangerAll, akAdmin:
		return nil, fmt.Errorf("%q cannot be tested", name)
	case akPrefix:
		for _, p := range a.pfx {
			if p.IsSingleIP() {
				if i := slices.IndexFunc(c.nodes, func(n Node) bool { return n.hasAddr(p.Addr()) }); i >= 0 {
					out = append(out, endpoint{node: &c.nodes[i]})
					continue
				}
			}
			out = append(out, endpoint{pfx: p})
		}
	default:
		for i := range c.nodes {
			if c.matchNode(a, &c.nodes[i]) {
				out = append(out, endpoint{node: &c.nodes[i]})
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%q matches nothing", name)
	}
	return out, nil
}

func (c *Compiled) runACLTest(t *aclTest) []string {
	if t.src == "" {
		return []string{t.where + ": src must be specified"}
	}
	srcs, err := c.resolveEndpoints(t.src, nil)
	if err != nil {
		return []string{fmt.Sprintf("%s: src %q: %v", t.where, t.src, err)}
	}
	proto := protoTCP
	if len(t.proto) > 0 {
		proto = t.proto[0]
	}
	var fails []string
	check := func(dst string, want bool) {
		host, portSpec, err := splitHostPorts(trim(dst))
		if err != nil {
			fails = append(fails, fmt.Sprintf("%s: %v", t.where, err))
			return
		}
		port, err := strconv.ParseUint(portSpec, 10, 16)
		if err != nil {
			fails = append(fails, fmt.Sprintf("%s: %q: a test destination needs a single port", t.where, dst))
			return
		}
		for _, s := range srcs {
			dsts, err := c.resolveEndpoints(host, s.node)
			if err != nil {
				fails = append(fails, fmt.Sprintf("%s: dst %q: %v", t.where, dst, err))
				return
			}
			for _, d := range dsts {
				if got := c.allows(s, d, uint16(port), proto); got != want {
					verb := "accepted"
					if !got {
						verb = "denied"
					}
					fails = append(fails, fmt.Sprintf("%s: %s -> %s:%d is %s", t.where, s, d, port, verb))
				}
			}
		}
	}
	for _, d := range t.accept {
		check(d, true)
	}
	for _, d := range t.deny {
		check(d, false)
	}
	return fails
}

// srcMatches reports whether a rule source alias covers the test source.
func (c *Compiled) srcMatches(a alias, s endpoint) bool {
	if s.node != nil {
		return c.matchNode(a, s.node)
	}
	switch a.kind {
	case akWildcard, akDangerAll:
		return true
	case akPrefix:
		return slices.ContainsFunc(a.pfx, func(p netip.Prefix) bool { return p.Bits() <= s.pfx.Bits() && p.Contains(s.pfx.Addr()) })
	}
	return false
}

// allows evaluates the packet filter rules for one flow.
func (c *Compiled) allows(s, d endpoint, port uint16, proto int) bool {
	for ri := range c.p.rules {
		r := &c.p.rules[ri]
		if r.caps != nil {
			continue
		}
		if r.protos != nil && !slices.Contains(r.protos, proto) {
			continue
		}
		if !slices.ContainsFunc(r.src, func(a alias) bool { return c.srcMatches(a, s) }) {
			continue
		}
		for _, e := range r.dst {
			if !slices.ContainsFunc(e.ports, func(pr tailcfg.PortRange) bool { return pr.First <= port && port <= pr.Last }) {
				continue
			}
			if c.dstMatches(r, e.a, s, d) {
				return true
			}
		}
	}
	return false
}

func (c *Compiled) dstMatches(r *rule, a alias, s, d endpoint) bool {
	switch a.kind {
	case akWildcard:
		return true
	case akSelf:
		return s.node != nil && d.node != nil && !s.node.IsTagged() && !d.node.IsTagged() && s.node.UserID == d.node.UserID
	case akInternet:
		return d.node == nil && internetSet.ContainsPrefix(d.pfx)
	case akPrefix:
		if d.node != nil {
			return c.matchNode(a, d.node)
		}
		for _, p := range a.pfx {
			if p.Bits() > d.pfx.Bits() || !p.Contains(d.pfx.Addr()) {
				continue
			}
			// A grant to addresses outside the tailnet only takes effect
			// where an approved route carries them.
			if r.fromGrant && !tailnetAddrs.ContainsPrefix(d.pfx) && !c.routed(d.pfx) {
				continue
			}
			return true
		}
		return false
	}
	return d.node != nil && c.matchNode(a, d.node)
}

// routed reports whether an approved subnet route covers p.
func (c *Compiled) routed(p netip.Prefix) bool {
	for r := range c.primary {
		if r.Bits() <= p.Bits() && r.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

func (c *Compiled) runSSHTest(t *sshTest) []string {
	if len(t.accept) == 0 && len(t.check) == 0 && len(t.deny) == 0 {
		return []string{t.where + ": a test needs accept, check or deny"}
	}
	srcs, err := c.resolveEndpoints(t.src, nil)
	if err != nil {
		return []string{fmt.Sprintf("%s: src %q: %v", t.where, t.src, err)}
	}
	var fails []string
	for _, dn := range t.dst {
		if strings.Contains(dn, ":") && !strings.HasPrefix(dn, "tag:") && !strings.HasPrefix(dn, "autogroup:") && !strings.HasPrefix(dn, "group:") {
			// Bare IPv6 addresses are not valid SSH test destinations.
			fails = append(fails, fmt.Sprintf("%s: dst %q is not a valid SSH destination", t.where, dn))
			continue
		}
		for _, s := range srcs {
			if s.node == nil {
				fails = append(fails, fmt.Sprintf("%s: src %q is not a node", t.where, t.src))
				continue
			}
			dsts, err := c.resolveEndpoints(dn, s.node)
			if err != nil {
				fails = append(fails, fmt.Sprintf("%s: dst %q: %v", t.where, dn, err))
				continue
			}
			for _, d := range dsts {
				if d.node == nil {
					fails = append(fails, fmt.Sprintf("%s: dst %q is not a node", t.where, dn))
					continue
				}
				pol := c.SSHPolicy(d.node.ID)
				for _, u := range t.accept {
					if got := sshDecision(pol, s.node, u); got != "accept" {
						fails = append(fails, fmt.Sprintf("%s: %s -> %s as %q: want accept, got %s", t.where, s, d, u, got))
					}
				}
				for _, u := range t.check {
					if got := sshDecision(pol, s.node, u); got != "check" {
						fails = append(fails, fmt.Sprintf("%s: %s -> %s as %q: want check, got %s", t.where, s, d, u, got))
					}
				}
				for _, u := range t.deny {
					if got := sshDecision(pol, s.node, u); got != "deny" {
						fails = append(fails, fmt.Sprintf("%s: %s -> %s as %q: want deny, got %s", t.where, s, d, u, got))
					}
				}
			}
		}
	}
	return fails
}

// sshDecision evaluates an SSH policy as tailscaled does: the first rule whose
// principals match and that maps the login user decides.
func sshDecision(pol *tailcfg.SSHPolicy, src *Node, user string) string {
	if pol == nil || user == "" {
		return "deny"
	}
	for _, r := range pol.Rules {
		if !slices.ContainsFunc(r.Principals, func(p *tailcfg.SSHPrincipal) bool {
			a, err := netip.ParseAddr(p.NodeIP)
			return p.Any || err == nil && src.hasAddr(a)
		}) {
			continue
		}
		mapped, ok := r.SSHUsers[user]
		if !ok {
			mapped, ok = r.SSHUsers["*"]
		}
		if !ok || mapped == "" {
			continue
		}
		switch {
		case r.Action.Accept:
			return "accept"
		case r.Action.HoldAndDelegate != "":
			return "check"
		}
		return "deny"
	}
	return "deny"
}
