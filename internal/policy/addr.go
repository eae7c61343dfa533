package policy

import (
	"net/netip"
	"slices"
	"strings"

	"go4.org/netipx"
)

// Address ranges Tailscale reserves for tailnet nodes. A source of "*" expands
// to these (minus the 100.115.92.0/23 block Tailscale keeps for its own
// services) plus every approved subnet route, which is what Tailscale's control
// plane sends.
var (
	cgnatRange   = netip.MustParsePrefix("100.64.0.0/10")
	ulaRange     = netip.MustParsePrefix("fd7a:115c:a1e0::/48")
	reservedCGN  = netip.MustParsePrefix("100.115.92.0/23")
	allIPv4      = netip.MustParsePrefix("0.0.0.0/0")
	allIPv6      = netip.MustParsePrefix("::/0")
	tailnetAddrs = buildTailnetAddrs()
	internetSet  = buildInternet()
)

func buildTailnetAddrs() *netipx.IPSet {
	var b netipx.IPSetBuilder
	b.AddPrefix(cgnatRange)
	b.RemovePrefix(reservedCGN)
	b.AddPrefix(ulaRange)
	s, _ := b.IPSet()
	return s
}

// buildInternet is autogroup:internet: every address that is neither a tailnet
// address nor private, link-local, multicast or otherwise non-routable.
func buildInternet() *netipx.IPSet {
	var b netipx.IPSetBuilder
	b.AddPrefix(allIPv4)
	b.AddPrefix(allIPv6)
	for _, p := range []string{
		"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
		"172.16.0.0/12", "192.168.0.0/16", "224.0.0.0/3",
		"::/8", "fc00::/7", "fe80::/10", "ff00::/8",
	} {
		b.RemovePrefix(netip.MustParsePrefix(p))
	}
	s, _ := b.IPSet()
	return s
}

// isExitRoute reports whether p is a default route, which makes its
// advertiser an exit node rather than a subnet router.
func isExitRoute(p netip.Prefix) bool {
	return p.Bits() == 0
}

// ipSetStrings renders an IP set as FilterRule.SrcIPs entries: single
// addresses, prefixes, or "a-b" ranges, whichever is exact and shortest.
func ipSetStrings(s *netipx.IPSet) []string {
	var out []string
	for _, r := range s.Ranges() {
		if r.From() == r.To() {
			out = append(out, r.From().String())
			continue
		}
		if p, ok := r.Prefix(); ok {
			out = append(out, p.String())
			continue
		}
		out = append(out, r.From().String()+"-"+r.To().String())
	}
	return out
}

// addrPrefixes returns the host prefixes of a node's addresses.
func (n *Node) addrPrefixes() []netip.Prefix {
	var out []netip.Prefix
	if n.IPv4.IsValid() {
		out = append(out, netip.PrefixFrom(n.IPv4, n.IPv4.BitLen()))
	}
	if n.IPv6.IsValid() {
		out = append(out, netip.PrefixFrom(n.IPv6, n.IPv6.BitLen()))
	}
	return out
}

// addrStrings returns the node's addresses as plain strings.
func (n *Node) addrStrings() []string {
	var out []string
	if n.IPv4.IsValid() {
		out = append(out, n.IPv4.String())
	}
	if n.IPv6.IsValid() {
		out = append(out, n.IPv6.String())
	}
	return out
}

// hasAddr reports whether a is one of the node's addresses.
func (n *Node) hasAddr(a netip.Addr) bool {
	return (n.IPv4.IsValid() && n.IPv4 == a) || (n.IPv6.IsValid() && n.IPv6 == a)
}

// isExitNode reports whether the node has an approved default route.
func (n *Node) isExitNode() bool {
	return slices.ContainsFunc(n.ApprovedRoutes, isExitRoute)
}

// parseAddrSpec parses an IP, a CIDR prefix or an "a-b" range into prefixes.
func parseAddrSpec(s string) ([]netip.Prefix, bool) {
	if a, err := netip.ParseAddr(s); err == nil {
		return []netip.Prefix{netip.PrefixFrom(a, a.BitLen())}, true
	}
	if p, err := netip.ParsePrefix(s); err == nil {
		return []netip.Prefix{p.Masked()}, true
	}
	if from, to, ok := strings.Cut(s, "-"); ok {
		f, err1 := netip.ParseAddr(from)
		t, err2 := netip.ParseAddr(to)
		if err1 == nil && err2 == nil {
			r := netipx.IPRangeFrom(f, t)
			if r.IsValid() {
				return r.Prefixes(), true
			}
		}
	}
	return nil, false
}

// prefixesOverlap reports whether any prefix of a overlaps any prefix of b.
func prefixesOverlap(a, b []netip.Prefix) bool {
	for _, x := range a {
		for _, y := range b {
			if x.Overlaps(y) {
				return true
			}
		}
	}
	return false
}

// containsAddr reports whether any prefix contains addr.
func containsAddr(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
