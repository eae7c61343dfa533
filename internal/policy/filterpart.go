package policy

import "tailscale.com/tailcfg"

// FilterPart is a named part of a node's packet filter, a chunk of
// MapResponse.PacketFilters: the rule one source list of a policy rule
// gives it (its autogroup:self part is a part of its own). Names sort in
// rule order, and clients concatenate chunks in name order, so a node's
// parts together are exactly Filter.
//
// Parts are kept as the compiler holds them, for an encoder that writes a
// node's rule without building it: SrcIPs Src, DstPorts Dst followed by
// every address of the receiving node (OwnAddrs) with each of SelfPorts,
// and IPProto Protos. An app grant's part (HasCaps) is built by Rules
// instead. Everything a part returns is shared: read only.
//
// A part is one source list, not the whole policy rule, because a join
// changes some of a rule's lists: under the generated 15,000-rule policy
// a join changed 44,000 rules in the filters of 5,000 nodes, and resending
// whole policy rules resent 92,000, with 4.8 MB of unchanged inline
// source lists among them.
type FilterPart struct {
	pc *piece
	si int
}

// Name is the chunk's name in MapResponse.PacketFilters.
func (p FilterPart) Name() string { return p.pc.names[p.si] }

// Src is the rule's source list, rendered as SrcIPs; a list keeps its
// backing array until a join changes it, so encoders can cache by identity.
func (p FilterPart) Src() []string { return p.pc.srcs[p.si].ips }

// Dst are the destinations every receiver gets.
func (p FilterPart) Dst() []tailcfg.NetPortRange { return p.pc.dst }

// SelfPorts are the ports on each of the receiver's own addresses.
func (p FilterPart) SelfPorts() []tailcfg.PortRange { return p.pc.selfPorts }

// Protos is the rule's IPProto.
func (p FilterPart) Protos() []int { return p.pc.protos }

// Deleted reports a part whose source list a leave emptied: it builds no
// rule, and a client holding its chunk must delete it (a null value in
// PacketFilters). Only ClassFilterPartsSince returns such parts.
func (p FilterPart) Deleted() bool { return len(p.Src()) == 0 }

// HasCaps reports an app grant, whose rule carries a CapGrant.
func (p FilterPart) HasCaps() bool { return p.pc.caps != nil }

// Shape identifies what the parts of one policy rule's piece share (Dst,
// SelfPorts, Protos, HasCaps), for caches of their encoding.
func (p FilterPart) Shape() FilterShape { return FilterShape{p.pc} }

// FilterShape is a comparable key: see FilterPart.Shape.
type FilterShape struct{ pc *piece }

// Rules returns the part's rule as node nodeID receives it: the chunk's
// Rules.
func (p FilterPart) Rules(c *Compiled, nodeID uint64) []tailcfg.FilterRule {
	n, _, ok := c.node(nodeID)
	if !ok {
		return nil
	}
	fr := p.pc.rule(n)
	fr.SrcIPs = p.Src()
	return []tailcfg.FilterRule{fr}
}

// ClassFilterParts returns the filter parts of class cl (see ClassOf), in
// name order. Its members' filters are these parts, each built for the
// member.
func (c *Compiled) ClassFilterParts(cl int) []FilterPart {
	return c.classFilterParts(cl, 0, true)
}

// ClassFilterPartsSince returns the parts of class cl that AddNodes or
// RemoveNodes calls after generation gen (see Gen) created, changed or
// emptied (Deleted). A client that holds its node's parts as of gen and
// replaces them with these (deleting the emptied ones) holds exactly
// Filter: a join or leave resends the rules whose sources it changed, not
// the whole filter. Members share the result, so a fan-out looks for
// changed pieces once per class.
func (c *Compiled) ClassFilterPartsSince(cl int, gen uint64) []FilterPart {
	return c.classFilterParts(cl, gen, false)
}

// classFilterParts returns the parts of class cl with a non-empty source
// list (an empty one builds no rule): all of them, or those of pieces
// created after gen and of lists changed after it, with the lists emptied
// after gen as deleted parts.
func (c *Compiled) classFilterParts(cl int, gen uint64, all bool) []FilterPart {
	if cl < 0 || cl >= len(c.classes) {
		return nil
	}
	var out []FilterPart
	for _, pc := range c.classes[cl].pieces {
		whole := all || pc.added > gen
		for si, l := range pc.srcs {
			if len(l.ips) > 0 && (whole || l.dirty > gen) || len(l.ips) == 0 && !whole && l.dirty > gen {
				out = append(out, FilterPart{pc, si})
			}
		}
	}
	return out
}

// OwnAddrs returns the node's addresses as its filter's destinations name
// them (a FilterPart's SelfPorts apply to each).
func (c *Compiled) OwnAddrs(nodeID uint64) []string {
	n, _, ok := c.node(nodeID)
	if !ok {
		return nil
	}
	return n.addrStrings()
}
