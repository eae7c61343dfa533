package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/tailscale/hujson"
	"tailscale.com/tailcfg"
)

// The policy file as written. Unknown fields are rejected.
type rawPolicy struct {
	Groups        map[string][]string `json:"groups"`
	Hosts         map[string]string   `json:"hosts"`
	TagOwners     map[string][]string `json:"tagOwners"`
	IPSets        map[string][]string `json:"ipsets"`
	ACLs          *[]rawACL           `json:"acls"`
	Grants        *[]rawGrant         `json:"grants"`
	SSH           []rawSSH            `json:"ssh"`
	AutoApprovers *rawAutoApprovers   `json:"autoApprovers"`
	NodeAttrs     []rawNodeAttr       `json:"nodeAttrs"`
	Tests         []rawTest           `json:"tests"`
	SSHTests      []rawSSHTest        `json:"sshTests"`

	// Accepted for compatibility; they do not affect compilation.
	RandomizeClientPort bool            `json:"randomizeClientPort"`
	DisableIPv4         bool            `json:"disableIPv4"`
	OneCGNATRoute       string          `json:"OneCGNATRoute"`
	DERPMap             json.RawMessage `json:"derpMap"`
	Postures            json.RawMessage `json:"postures"`
	DefaultSrcPosture   json.RawMessage `json:"defaultSrcPosture"`
}

type rawACL struct {
	Action     string          `json:"action"`
	Src        []string        `json:"src"`
	Dst        []string        `json:"dst"`
	Proto      string          `json:"proto"`
	SrcPosture json.RawMessage `json:"srcPosture"`
}

type rawGrant struct {
	Src        []string                                     `json:"src"`
	Dst        []string                                     `json:"dst"`
	IP         *[]string                                    `json:"ip"`
	App        map[tailcfg.PeerCapability][]json.RawMessage `json:"app"`
	Via        []string                                     `json:"via"`
	SrcPosture json.RawMessage                              `json:"srcPosture"`
}

type rawSSH struct {
	Action      *string         `json:"action"`
	Src         []string        `json:"src"`
	Dst         []string        `json:"dst"`
	Users       *[]string       `json:"users"`
	CheckPeriod *string         `json:"checkPeriod"`
	AcceptEnv   []string        `json:"acceptEnv"`
	SrcPosture  json.RawMessage `json:"srcPosture"`
}

type rawAutoApprovers struct {
	Routes   map[string][]string `json:"routes"`
	ExitNode []string            `json:"exitNode"`
}

type rawNodeAttr struct {
	Target []string        `json:"target"`
	Attr   []string        `json:"attr"`
	IPPool []string        `json:"ipPool"`
	App    json.RawMessage `json:"app"`
}

type rawTest struct {
	Src    *string  `json:"src"`
	Proto  string   `json:"proto"`
	Accept []string `json:"accept"`
	Deny   []string `json:"deny"`
}

type rawSSHTest struct {
	Src    string   `json:"src"`
	Dst    []string `json:"dst"`
	Accept []string `json:"accept"`
	Check  []string `json:"check"`
	Deny   []string `json:"deny"`
}

// maxCheckPeriod is the longest SSH check period Tailscale accepts.
const maxCheckPeriod = 7 * 24 * time.Hour

// Parse parses a HuJSON policy and validates everything that does not need
// the tailnet's users and nodes.
func Parse(src []byte) (*Policy, error) {
	std, err := hujson.Standardize(bytes.Clone(src))
	if err != nil {
		return nil, fmt.Errorf("parsing policy: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(std))
	dec.DisallowUnknownFields()
	var raw rawPolicy
	if err := dec.Decode(&raw); err != nil {
		return nil, fmt.Errorf("parsing policy: %w", err)
	}
	if dec.More() {
		return nil, errors.New("parsing policy: trailing data after the policy object")
	}
	p := &Policy{
		groups:    map[string][]string{},
		hosts:     map[string][]netip.Prefix{},
		ipsets:    map[string][]netip.Prefix{},
		tagOwners: map[string][]alias{},
	}
	if err := p.load(&raw); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *Policy) load(raw *rawPolicy) error {
	// Sections are walked in name order so that a policy with several
	// errors is always refused with the same one.
	for _, name := range slices.Sorted(maps.Keys(raw.Groups)) {
		members := raw.Groups[name]
		if !strings.HasPrefix(name, "group:") || len(name) == len("group:") {
			return fmt.Errorf("groups: %q: group names must start with \"group:\"", name)
		}
		var logins []string
		for _, m := range members {
			m = trim(m)
			switch {
			case strings.HasPrefix(m, "group:"):
				return fmt.Errorf("groups[%q]: %q: group members cannot be recursive", name, m)
			case !strings.Contains(m, "@") || strings.HasPrefix(m, "tag:") || strings.HasPrefix(m, "autogroup:"):
				return fmt.Errorf("groups[%q]: %q: group members must be users", name, m)
			}
			logins = append(logins, m)
		}
		p.groups[name] = logins
	}
	for _, name := range slices.Sorted(maps.Keys(raw.Hosts)) {
		v := raw.Hosts[name]
		if name == "" || strings.ContainsAny(name, ":@*") || strings.HasPrefix(name, "tag") && strings.Contains(name, ":") {
			return fmt.Errorf("hosts: %q is not a valid host name", name)
		}
		ps, ok := parseAddrSpec(trim(v))
		if !ok {
			return fmt.Errorf("hosts[%q]: %q is not an IP address or prefix", name, v)
		}
		p.hosts[name] = ps
	}
	for _, tag := range slices.Sorted(maps.Keys(raw.TagOwners)) {
		if !strings.HasPrefix(tag, "tag:") || len(tag) == len("tag:") {
			return fmt.Errorf("tagOwners: %q: tag names must start with \"tag:\"", tag)
		}
		p.tagOwners[tag] = nil
	}
	ctx := aliasCtx{p}
	// ipsets may only contain addresses and hosts; resolve them after hosts.
	for name, entries := range raw.IPSets {
		if !strings.HasPrefix(name, "ipset:") {
			return fmt.Errorf("ipsets: %q: names must start with \"ipset:\"", name)
		}
		var ps []netip.Prefix
		for _, e := range entries {
			e = trim(e)
			if h, ok := p.hosts[e]; ok {
				ps = append(ps, h...)
				continue
			}
			q, ok := parseAddrSpec(e)
			if !ok {
				return fmt.Errorf("ipsets[%q]: %q is not an IP address, prefix, range or host", name, e)
			}
			ps = append(ps, q...)
		}
		p.ipsets[name] = ps
	}
	// Tag owners may be users, groups, other tags or autogroup:member.
	for tag, owners := range raw.TagOwners {
		var as []alias
		for _, o := range owners {
			a, err := ctx.parse(trim(o))
			if err != nil {
				return fmt.Errorf("tagOwners[%q]: %w", tag, err)
			}
			switch a.kind {
			case akUser, akGroup, akTag, akMember, akAdmin:
			default:
				return fmt.Errorf("tagOwners[%q]: %q cannot own tags", tag, o)
			}
			as = append(as, a)
		}
		p.tagOwners[tag] = as
	}

	if raw.ACLs == nil && raw.Grants == nil {
		// A policy without acls and grants allows everything, as in
		// Tailscale (an explicit empty list denies everything).
		raw.ACLs = &[]rawACL{{Action: "accept", Src: []string{"*"}, Dst: []string{"*:*"}}}
	}
	if raw.ACLs != nil {
		for i, a := range *raw.ACLs {
			r, err := p.loadACL(ctx, &a)
			if err != nil {
				return fmt.Errorf("acls[%d]: %w", i, err)
			}
			p.rules = append(p.rules, r)
		}
	}
	if raw.Grants != nil {
		for i, g := range *raw.Grants {
			rs, err := p.loadGrant(ctx, &g)
			if err != nil {
				return fmt.Errorf("grants[%d]: %w", i, err)
			}
			p.rules = append(p.rules, rs...)
		}
	}
	for i, s := range raw.SSH {
		r, err := p.loadSSH(ctx, &s)
		if err != nil {
			return fmt.Errorf("ssh[%d]: %w", i, err)
		}
		p.ssh = append(p.ssh, r)
	}
	if aa := raw.AutoApprovers; aa != nil {
		for pfx, approvers := range aa.Routes {
			pr, err := netip.ParsePrefix(trim(pfx))
			if err != nil {
				return fmt.Errorf("autoApprovers.routes: %q: %w", pfx, err)
			}
			as, err := parseApprovers(ctx, approvers)
			if err != nil {
				return fmt.Errorf("autoApprovers.routes[%q]: %w", pfx, err)
			}
			p.autoRoutes = append(p.autoRoutes, autoRoute{prefix: pr.Masked(), approvers: as})
		}
		slices.SortFunc(p.autoRoutes, func(a, b autoRoute) int { return a.prefix.Addr().Compare(b.prefix.Addr()) })
		as, err := parseApprovers(ctx, aa.ExitNode)
		if err != nil {
			return fmt.Errorf("autoApprovers.exitNode: %w", err)
		}
		p.autoExit = as
	}
	for i, na := range raw.NodeAttrs {
		var a nodeAttr
		for _, t := range na.Target {
			al, err := ctx.parse(trim(t))
			if err != nil {
				return fmt.Errorf("nodeAttrs[%d]: target %q: %w", i, t, err)
			}
			switch al.kind {
			case akSelf, akInternet, akDangerAll:
				return fmt.Errorf("nodeAttrs[%d]: %q cannot be a nodeAttrs target", i, t)
			}
			a.targets = append(a.targets, al)
		}
		for _, at := range na.Attr {
			if at = trim(at); at != "" {
				a.attrs = append(a.attrs, at)
			}
		}
		for _, pool := range na.IPPool {
			if _, err := netip.ParsePrefix(trim(pool)); err != nil {
				return fmt.Errorf("nodeAttrs[%d]: ipPool %q: %w", i, pool, err)
			}
		}
		p.nodeAttrs = append(p.nodeAttrs, a)
	}
	for i, t := range raw.Tests {
		at := aclTest{where: fmt.Sprintf("tests[%d]", i), accept: t.Accept, deny: t.Deny}
		if t.Src != nil {
			at.src = trim(*t.Src)
		}
		protos, err := parseProto(trim(t.Proto))
		if err != nil {
			return fmt.Errorf("tests[%d]: %w", i, err)
		}
		at.proto = protos
		p.tests = append(p.tests, at)
	}
	for i, t := range raw.SSHTests {
		st := sshTest{where: fmt.Sprintf("sshTests[%d]", i), src: trim(t.Src), accept: t.Accept, check: t.Check, deny: t.Deny}
		for _, d := range t.Dst {
			d = trim(d)
			switch {
			case d == "autogroup:internet" || d == "autogroup:danger-all" || d == "*":
				return fmt.Errorf("sshTests[%d]: SSH tests dst contains disallowed element %q", i, d)
			case strings.HasPrefix(d, "tag:"):
				if _, ok := p.tagOwners[d]; !ok {
					return fmt.Errorf("sshTests[%d]: SSH tests dst contains unknown tag %q", i, d)
				}
			default:
				if pfx, err := netip.ParsePrefix(d); err == nil && pfx.Bits() != pfx.Addr().BitLen() || strings.Contains(d, "/") {
					return fmt.Errorf("sshTests[%d]: SSH tests dst contains disallowed element %q", i, d)
				}
			}
			st.dst = append(st.dst, d)
		}
		p.sshTests = append(p.sshTests, st)
	}
	return nil
}

func parseApprovers(ctx aliasCtx, approvers []string) ([]alias, error) {
	var out []alias
	for _, s := range approvers {
		a, err := ctx.parse(trim(s))
		if err != nil {
			return nil, err
		}
		switch a.kind {
		case akUser, akGroup, akTag, akMember, akTagged, akAdmin:
		default:
			return nil, fmt.Errorf("%q cannot approve routes", s)
		}
		out = append(out, a)
	}
	return out, nil
}

// parseSrc parses a rule's sources.
func (p *Policy) parseSrc(ctx aliasCtx, srcs []string) ([]alias, error) {
	var out []alias
	for _, s := range srcs {
		a, err := ctx.parse(trim(s))
		if err != nil {
			return nil, fmt.Errorf("src=%w", err)
		}
		switch a.kind {
		case akSelf:
			return nil, errors.New(`"autogroup:self" not valid on the src side of a rule`)
		case akInternet:
			return nil, errors.New(`"autogroup:internet" not valid on the src side of a rule`)
		}
		out = append(out, a)
	}
	return out, nil
}

// checkSelf enforces Tailscale's rule that autogroup:self destinations only
// pair with sources that are users, groups or autogroup:member. ACLs also
// accept "*" there (it then means the user's own devices); grants do not.
func checkSelf(src []alias, allowWildcard bool) error {
	for _, a := range src {
		switch a.kind {
		case akUser, akGroup, akMember, akDomain:
			continue
		case akWildcard:
			if allowWildcard {
				continue
			}
		}
		return errors.New("autogroup:self can only be used with users, groups, or supported autogroups")
	}
	return nil
}

func (p *Policy) loadACL(ctx aliasCtx, a *rawACL) (rule, error) {
	r := rule{}
	switch trim(a.Action) {
	case "accept":
	case "":
		return r, errors.New("action must be specified")
	default:
		return r, fmt.Errorf("%q is not a valid action", a.Action)
	}
	src, err := p.parseSrc(ctx, a.Src)
	if err != nil {
		return r, err
	}
	r.src = src
	r.protos, err = parseProto(trim(a.Proto))
	if err != nil {
		return r, err
	}
	hasSelf := false
	for _, d := range a.Dst {
		d = trim(d)
		host, portSpec, err := splitHostPorts(d)
		if err != nil {
			return r, fmt.Errorf("dst=%q: %w", d, err)
		}
		ports, err := parsePorts(portSpec)
		if err != nil {
			return r, fmt.Errorf("dst=%q: %w", d, err)
		}
		al, err := ctx.parse(host)
		if err != nil {
			return r, fmt.Errorf("dst=%q: %w", d, err)
		}
		if err := checkDst(al); err != nil {
			return r, fmt.Errorf("dst=%q: %w", d, err)
		}
		if al.kind == akSelf {
			hasSelf = true
		}
		if !protoHasPorts(r.protos) {
			ports = []tailcfg.PortRange{tailcfg.PortRangeAny}
		}
		r.dst = append(r.dst, dstEntry{a: al, ports: ports})
	}
	if hasSelf {
		p.usesSelf = true
		if err := checkSelf(r.src, true); err != nil {
			return r, err
		}
	}
	return r, nil
}

// checkDst rejects aliases that cannot be destinations.
func checkDst(a alias) error {
	switch a.kind {
	case akDangerAll:
		return errors.New("cannot use autogroup:danger-all as a dst")
	case akAdmin:
		return fmt.Errorf("%q cannot be used as a dst", a.name)
	case akPrefix:
		for _, p := range a.pfx {
			if p.Bits() == 0 {
				return fmt.Errorf("dst %q: to allow all IP addresses, use \"*\" or \"autogroup:internet\"", a.name)
			}
		}
	}
	return nil
}

// tailscaleCaps are the tailscale.com capabilities a policy may grant; the
// rest of that domain is reserved to Tailscale itself.
var tailscaleCaps = map[string]bool{
	"tailscale.com/cap/drive":      true,
	"tailscale.com/cap/kubernetes": true,
	"tailscale.com/cap/webui":      true,
	"tailscale.com/cap/relay":      true,
	"tailscale.com/cap/tsidp":      true,
	"tailscale.com/cap/golink":     true,
	"tailscale.com/cap/tailsql":    true,
	"tailscale.com/cap/funnel":     true,
}

func (p *Policy) loadGrant(ctx aliasCtx, g *rawGrant) ([]rule, error) {
	if (g.IP == nil || len(*g.IP) == 0) && len(g.App) == 0 {
		return nil, errors.New("ip and app can not both be empty")
	}
	src, err := p.parseSrc(ctx, g.Src)
	if err != nil {
		return nil, err
	}
	var dsts []alias
	hasSelf, hasInternet := false, false
	for _, d := range g.Dst {
		d = trim(d)
		al, err := ctx.parse(d)
		if err != nil {
			return nil, fmt.Errorf("dst=%w", err)
		}
		if err := checkDst(al); err != nil {
			return nil, err
		}
		switch al.kind {
		case akSelf:
			hasSelf = true
		case akInternet:
			hasInternet = true
		}
		dsts = append(dsts, al)
	}
	if hasSelf {
		p.usesSelf = true
		if err := checkSelf(src, false); err != nil {
			return nil, err
		}
	}
	var via []string
	for _, v := range g.Via {
		v = trim(v)
		if !strings.HasPrefix(v, "tag:") {
			return nil, fmt.Errorf("via can only be a tag, got %q", v)
		}
		if _, ok := p.tagOwners[v]; !ok {
			return nil, fmt.Errorf("tag %q not found", v)
		}
		via = append(via, v)
	}
	var out []rule
	if g.IP != nil {
		// Group the ip elements by protocol set: one filter rule each.
		type group struct {
			protos []int
			ports  []tailcfg.PortRange
		}
		var groups []group
		for _, spec := range *g.IP {
			protos, ports, err := parseIPSpec(trim(spec))
			if err != nil {
				return nil, err
			}
			if !protoHasPorts(protos) {
				ports = []tailcfg.PortRange{tailcfg.PortRangeAny}
			}
			i := slices.IndexFunc(groups, func(g group) bool { return slices.Equal(g.protos, protos) })
			if i < 0 {
				groups = append(groups, group{protos: protos})
				i = len(groups) - 1
			}
			groups[i].ports = append(groups[i].ports, ports...)
		}
		for _, gr := range groups {
			r := rule{src: src, protos: gr.protos, via: via, fromGrant: true}
			for _, d := range dsts {
				r.dst = append(r.dst, dstEntry{a: d, ports: gr.ports})
			}
			out = append(out, r)
		}
	}
	if len(g.App) > 0 {
		if hasInternet {
			return nil, errors.New("cannot use app grants with autogroup:internet")
		}
		caps := tailcfg.PeerCapMap{}
		for name, vals := range g.App {
			n := string(name)
			if n == "" || strings.Count(n, "/") < 1 {
				return nil, fmt.Errorf("capability name %q must look like domain/path", n)
			}
			if (strings.HasPrefix(n, "tailscale.com/") || strings.HasPrefix(n, "https://tailscale.com/")) && !tailscaleCaps[strings.TrimPrefix(n, "https://")] {
				return nil, fmt.Errorf("capability name must not be in the tailscale.com domain: %q", n)
			}
			rv := make([]tailcfg.RawMessage, 0, len(vals))
			for _, v := range vals {
				var buf bytes.Buffer
				if err := json.Compact(&buf, v); err != nil {
					return nil, fmt.Errorf("app[%q]: %w", n, err)
				}
				rv = append(rv, tailcfg.RawMessage(buf.String()))
			}
			caps[name] = rv
		}
		r := rule{src: src, caps: caps, via: via, fromGrant: true}
		for _, d := range dsts {
			r.dst = append(r.dst, dstEntry{a: d})
		}
		out = append(out, r)
		if comp := companionCaps(caps); comp != nil {
			// The other side learns the reverse relation: the destination
			// shares with (or relays for) the source.
			rev := rule{caps: comp, fromGrant: true}
			if hasSelf {
				rev.src, rev.dst = src, r.dst
			} else {
				rev.src = dsts
				for _, a := range src {
					rev.dst = append(rev.dst, dstEntry{a: a})
				}
			}
			out = append(out, rev)
		}
	}
	return out, nil
}

// companionCap lists capabilities Tailscale grants in the reverse direction
// alongside some tailscale.com capabilities.
var companionCap = map[tailcfg.PeerCapability]tailcfg.PeerCapability{
	"tailscale.com/cap/drive": "tailscale.com/cap/drive-sharer",
	"tailscale.com/cap/relay": "tailscale.com/cap/relay-target",
}

func companionCaps(caps tailcfg.PeerCapMap) tailcfg.PeerCapMap {
	var out tailcfg.PeerCapMap
	for name := range caps {
		if c, ok := companionCap[name]; ok {
			if out == nil {
				out = tailcfg.PeerCapMap{}
			}
			out[c] = nil
		}
	}
	return out
}

func (p *Policy) loadSSH(ctx aliasCtx, s *rawSSH) (sshRule, error) {
	r := sshRule{}
	if s.Action == nil || trim(*s.Action) == "" {
		return r, errors.New("action must be specified")
	}
	switch trim(*s.Action) {
	case "accept":
		r.accept = true
	case "check":
	default:
		return r, fmt.Errorf("%q is not a valid action", *s.Action)
	}
	if s.Users == nil {
		return r, errors.New("users must be specified")
	}
	for _, u := range *s.Users {
		u = trim(u)
		switch {
		case u == "" || u == "*":
			return r, fmt.Errorf("user %q is not valid", u)
		case strings.HasPrefix(u, "localpart:*@"):
			d := strings.TrimPrefix(u, "localpart:*@")
			if d != "" {
				p.localparts = append(p.localparts, d)
			}
		}
		r.users = append(r.users, u)
	}
	if s.CheckPeriod != nil {
		cp := trim(*s.CheckPeriod)
		if cp != "always" {
			d, err := time.ParseDuration(cp)
			if err != nil {
				return r, err
			}
			if d < 0 {
				return r, fmt.Errorf("checkPeriod %v must be a positive duration", d)
			}
			if d > maxCheckPeriod {
				return r, fmt.Errorf("checkPeriod %v exceeds the maximum of %v", d, maxCheckPeriod)
			}
		}
	}
	for _, e := range s.AcceptEnv {
		if e == "" {
			return r, errors.New("acceptEnv values cannot be empty")
		}
		r.acceptEnv = append(r.acceptEnv, e)
	}
	src, err := p.parseSrc(ctx, s.Src)
	if err != nil {
		return r, err
	}
	r.src = src
	hasSelf := false
	for _, d := range s.Dst {
		d = trim(d)
		al, err := ctx.parse(d)
		if err != nil {
			return r, fmt.Errorf("dst=%w", err)
		}
		switch al.kind {
		case akPrefix:
			// SSH destinations are machines: a host must be one address.
			if len(al.pfx) != 1 || al.pfx[0].Bits() != al.pfx[0].Addr().BitLen() {
				return r, fmt.Errorf("invalid dst %q", d)
			}
		case akSelf:
			hasSelf = true
		case akInternet, akDangerAll, akWildcard, akAdmin:
			return r, fmt.Errorf("invalid dst %q", d)
		}
		r.dst = append(r.dst, al)
	}
	if hasSelf {
		p.usesSelf = true
		if err := checkSelf(r.src, false); err != nil {
			return r, err
		}
	}
	return r, nil
}
