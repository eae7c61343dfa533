package policy

import (
	"slices"

	"tailscale.com/tailcfg"
)

// FilterPart is a named part of a node's packet filter, a chunk of
// MapResponse.PacketFilters: the rules one policy rule gives it (its
// autogroup:self part is a part of its own). Names sort in rule order, and
// clients concatenate chunks in name order, so a node's parts together are
// exactly Filter.
//
// Parts are kept as the compiler holds them, for an encoder that writes a
// node's rules without building them: one rule per non-empty source list
// (Src), each with DstPorts Dst followed by every address of the receiving
// node (OwnAddrs) with each of SelfPorts, and IPProto Protos. An app
// grant's part (HasCaps) is built by Rules instead. Everything a part
// returns is shared: read only.
//
// A join under a large policy resends a few dozen chunks to every node;
// building them as FilterRules first, with a DstPorts slice per node, was
// a fifth of the fan-out.
type FilterPart struct{ pc *piece }

// Name is the chunk's name in MapResponse.PacketFilters.
func (p FilterPart) Name() string { return p.pc.nm }

// NumSrcs is the number of source lists, empty ones included.
func (p FilterPart) NumSrcs() int { return len(p.pc.srcs) }

// Src is source list i, rendered as SrcIPs; a list keeps its backing
// array until a join changes it, so encoders can cache by identity.
func (p FilterPart) Src(i int) []string { return p.pc.srcs[i].ips }

// Dst are the destinations every receiver gets.
func (p FilterPart) Dst() []tailcfg.NetPortRange { return p.pc.dst }

// SelfPorts are the ports on each of the receiver's own addresses.
func (p FilterPart) SelfPorts() []tailcfg.PortRange { return p.pc.selfPorts }

// Protos is the rules' IPProto.
func (p FilterPart) Protos() []int { return p.pc.protos }

// HasCaps reports an app grant, whose rules carry a CapGrant.
func (p FilterPart) HasCaps() bool { return p.pc.caps != nil }

// Rules returns the part's rules as node nodeID receives them: the
// chunk's Rules.
func (p FilterPart) Rules(c *Compiled, nodeID uint64) []tailcfg.FilterRule {
	n, _, ok := c.node(nodeID)
	if !ok {
		return nil
	}
	return p.pc.appendRules(nil, n)
}

// ClassFilterParts returns the filter parts of class cl (see ClassOf), in
// name order. Its members' filters are these parts, each built for the
// member.
func (c *Compiled) ClassFilterParts(cl int) []FilterPart {
	return c.classFilterParts(cl, func(*piece) bool { return true })
}

// ClassFilterPartsSince returns the parts of class cl that AddNodes calls
// after generation gen (see Gen) created or changed. A client that holds
// its node's parts as of gen and replaces them with these holds exactly
// Filter: a join resends the rules whose sources it changed, not the whole
// filter. Members share the result, so a fan-out looks for changed pieces
// once per class.
func (c *Compiled) ClassFilterPartsSince(cl int, gen uint64) []FilterPart {
	return c.classFilterParts(cl, func(pc *piece) bool { return pc.changedSince(gen) })
}

// classFilterParts leaves out the parts that build no rule (every source
// list empty), as filterChunks leaves out empty chunks.
func (c *Compiled) classFilterParts(cl int, keep func(*piece) bool) []FilterPart {
	if cl < 0 || cl >= len(c.classes) {
		return nil
	}
	var out []FilterPart
	for _, pc := range c.classes[cl].pieces {
		if keep(pc) && slices.ContainsFunc(pc.srcs, func(l *srcList) bool { return len(l.ips) > 0 }) {
			out = append(out, FilterPart{pc})
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
