package policy

import "tailscale.com/tailcfg"

// FilterChunk is a FilterPart built for one node by way of the piece's
// rules: the reference the tests hold parts to.
type FilterChunk struct {
	Name  string
	Rules []tailcfg.FilterRule
}

// FilterChunks returns the node's filter as named chunks, without empty
// ones.
func (c *Compiled) FilterChunks(nodeID uint64) []FilterChunk {
	return c.filterChunks(nodeID, func(*piece) bool { return true })
}

// FilterChunksSince returns the chunks AddNodes calls after generation
// gen (see Gen) added or changed for the node. A client that holds the
// node's chunks as of gen and replaces them with these holds exactly
// Filter: a join resends the rules whose sources it changed, not the
// whole filter.
func (c *Compiled) FilterChunksSince(nodeID, gen uint64) []FilterChunk {
	return c.filterChunks(nodeID, func(pc *piece) bool { return pc.changedSince(gen) })
}

func (c *Compiled) filterChunks(nodeID uint64, keep func(*piece) bool) []FilterChunk {
	n, i, ok := c.node(nodeID)
	if !ok {
		return nil
	}
	var out []FilterChunk
	for _, pc := range c.classes[c.classOf[i]].pieces {
		if !keep(pc) {
			continue
		}
		if rules := pc.appendRules(nil, n); len(rules) > 0 {
			out = append(out, FilterChunk{Name: pc.nm, Rules: rules})
		}
	}
	return out
}
