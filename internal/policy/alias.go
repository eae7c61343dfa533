package policy

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"tailscale.com/tailcfg"
)

type aliasKind uint8

const (
	akWildcard  aliasKind = iota // "*"
	akUser                       // a login: email or "name@"
	akGroup                      // "group:x"
	akTag                        // "tag:x"
	akPrefix                     // host name, IP, CIDR, range or ipset
	akDomain                     // "user:*@domain"
	akMember                     // autogroup:member
	akTagged                     // autogroup:tagged
	akSelf                       // autogroup:self
	akInternet                   // autogroup:internet
	akDangerAll                  // autogroup:danger-all
	akAdmin                      // autogroup:admin / owner: roles tailplane does not track
)

// alias is one parsed policy name: a selector of nodes or addresses.
type alias struct {
	kind aliasKind
	name string         // canonical text
	pfx  []netip.Prefix // akPrefix
}

// key identifies the selector for de-duplication.
func (a alias) key() string { return a.name }

// isNodeSelector reports whether the alias selects nodes by identity (its
// addresses are the selected nodes' addresses).
func (a alias) isNodeSelector() bool {
	switch a.kind {
	case akUser, akGroup, akTag, akDomain, akMember, akTagged:
		return true
	}
	return false
}

// aliasCtx resolves names against the policy's own tables.
type aliasCtx struct {
	p *Policy
}

// parse parses a src/dst/target name (already trimmed).
func (c aliasCtx) parse(s string) (alias, error) {
	switch {
	case s == "":
		return alias{}, fmt.Errorf("empty name")
	case s == "*":
		return alias{kind: akWildcard, name: "*"}, nil
	case strings.HasPrefix(s, "autogroup:"):
		switch s {
		case "autogroup:member":
			return alias{kind: akMember, name: s}, nil
		case "autogroup:tagged":
			return alias{kind: akTagged, name: s}, nil
		case "autogroup:self":
			return alias{kind: akSelf, name: s}, nil
		case "autogroup:internet":
			return alias{kind: akInternet, name: s}, nil
		case "autogroup:danger-all":
			return alias{kind: akDangerAll, name: s}, nil
		case "autogroup:admin", "autogroup:owner", "autogroup:it-admin", "autogroup:network-admin",
			"autogroup:billing-admin", "autogroup:auditor":
			return alias{kind: akAdmin, name: s}, nil
		}
		return alias{}, fmt.Errorf("unknown autogroup %q", s)
	case strings.HasPrefix(s, "group:"):
		if _, ok := c.p.groups[s]; !ok {
			return alias{}, fmt.Errorf("group not found: %q", s)
		}
		return alias{kind: akGroup, name: s}, nil
	case strings.HasPrefix(s, "tag:"):
		if _, ok := c.p.tagOwners[s]; !ok {
			return alias{}, fmt.Errorf("tag not found: %q", s)
		}
		return alias{kind: akTag, name: s}, nil
	case strings.HasPrefix(s, "user:*@"):
		d := strings.TrimPrefix(s, "user:*@")
		if d == "" || strings.ContainsAny(d, "*@") {
			return alias{}, fmt.Errorf("invalid user domain selector %q", s)
		}
		return alias{kind: akDomain, name: "user:*@" + d}, nil
	case strings.HasPrefix(s, "ipset:"):
		ps, ok := c.p.ipsets[s]
		if !ok {
			return alias{}, fmt.Errorf("ipset not found: %q", s)
		}
		return alias{kind: akPrefix, name: s, pfx: ps}, nil
	case strings.Contains(s, "@"):
		if strings.Count(s, "@") != 1 || strings.HasPrefix(s, "@") || strings.ContainsAny(s, " *:") {
			return alias{}, fmt.Errorf("invalid user %q", s)
		}
		return alias{kind: akUser, name: s}, nil
	}
	if ps, ok := c.p.hosts[s]; ok {
		return alias{kind: akPrefix, name: s, pfx: ps}, nil
	}
	if ps, ok := parseAddrSpec(s); ok {
		return alias{kind: akPrefix, name: s, pfx: ps}, nil
	}
	return alias{}, fmt.Errorf("host %q not found", s)
}

// splitHostPorts splits an ACL destination "alias:ports". IPv6 addresses may
// be bracketed ("[fd7a::1]:22"); otherwise the last colon separates the ports.
func splitHostPorts(s string) (host, ports string, err error) {
	if strings.HasPrefix(s, "[") {
		end := strings.Index(s, "]")
		if end < 0 || end+1 >= len(s) || s[end+1] != ':' {
			return "", "", fmt.Errorf("invalid destination %q", s)
		}
		return s[1:end], s[end+2:], nil
	}
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return "", "", fmt.Errorf("destination %q has no port (use %q for all ports)", s, s+":*")
	}
	return s[:i], s[i+1:], nil
}

// parsePorts parses "*", "22", "80-443" and comma lists of these.
func parsePorts(s string) ([]tailcfg.PortRange, error) {
	if s == "*" {
		return []tailcfg.PortRange{tailcfg.PortRangeAny}, nil
	}
	var out []tailcfg.PortRange
	for _, part := range strings.Split(s, ",") {
		first, last, isRange := strings.Cut(part, "-")
		f, err := strconv.ParseUint(first, 10, 16)
		if err != nil {
			return nil, fmt.Errorf("port range %q: invalid first integer", part)
		}
		l := f
		if isRange {
			l, err = strconv.ParseUint(last, 10, 16)
			if err != nil {
				return nil, fmt.Errorf("port range %q: invalid last integer", part)
			}
		}
		if f == 0 {
			return nil, fmt.Errorf("port range %q: first port must be >0, or use '*' for wildcard", part)
		}
		if l < f {
			return nil, fmt.Errorf("port range %q: last port must be >= first port", part)
		}
		out = append(out, tailcfg.PortRange{First: uint16(f), Last: uint16(l)})
	}
	return out, nil
}

// Protocol numbers Tailscale's packet filter understands.
const (
	protoICMPv4 = 1
	protoIGMP   = 2
	protoTCP    = 6
	protoEGP    = 8
	protoIGP    = 9
	protoUDP    = 17
	protoGRE    = 47
	protoESP    = 50
	protoAH     = 51
	protoICMPv6 = 58
	protoSCTP   = 132
)

var protoNames = map[string][]int{
	"icmp": {protoICMPv4}, "igmp": {protoIGMP}, "tcp": {protoTCP}, "egp": {protoEGP},
	"igp": {protoIGP}, "udp": {protoUDP}, "gre": {protoGRE}, "esp": {protoESP}, "ah": {protoAH},
	"ipv6-icmp": {protoICMPv6}, "sctp": {protoSCTP},
}

// parseProto parses an ACL "proto" value: a name or an IANA number.
func parseProto(s string) ([]int, error) {
	if s == "" {
		return nil, nil
	}
	if ps, ok := protoNames[strings.ToLower(s)]; ok {
		return ps, nil
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil || n == 0 {
		return nil, fmt.Errorf("proto %q is not a known protocol name or number", s)
	}
	return []int{int(n)}, nil
}

// protoHasPorts reports whether ports mean anything for the protocols.
func protoHasPorts(protos []int) bool {
	if protos == nil {
		return true
	}
	for _, p := range protos {
		switch p {
		case protoTCP, protoUDP, protoSCTP:
			return true
		}
	}
	return false
}

// parseIPSpec parses one grant "ip" element: "*", "80", "tcp:443",
// "udp:1000-2000", "icmp:*".
func parseIPSpec(s string) (protos []int, ports []tailcfg.PortRange, err error) {
	if s == "*" {
		return nil, []tailcfg.PortRange{tailcfg.PortRangeAny}, nil
	}
	proto, portSpec, hasProto := strings.Cut(s, ":")
	if !hasProto {
		portSpec = proto
		proto = ""
	}
	if hasProto {
		protos, err = parseProto(proto)
		if err != nil {
			return nil, nil, err
		}
		if protos == nil {
			return nil, nil, fmt.Errorf("empty protocol in %q", s)
		}
	}
	ports, err = parsePorts(portSpec)
	if err != nil {
		return nil, nil, err
	}
	return protos, ports, nil
}
