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
	return c.filterChunks(nodeID, 0, true)
}

// FilterChunksSince returns the chunks AddNodes or RemoveNodes calls after
// generation gen (see Gen) added or changed for the node, and those they
// emptied with nil Rules. A client that holds the node's chunks as of gen
// and replaces them with these (deleting the nil ones) holds exactly
// Filter: a join resends the rules whose sources it changed, not the whole
// filter.
func (c *Compiled) FilterChunksSince(nodeID, gen uint64) []FilterChunk {
	return c.filterChunks(nodeID, gen, false)
}

// filterChunks pairs each rule appendRules builds with its source list's
// name, one chunk per rule, as classFilterParts selects them.
func (c *Compiled) filterChunks(nodeID, gen uint64, all bool) []FilterChunk {
	n, i, ok := c.node(nodeID)
	if !ok {
		return nil
	}
	var out []FilterChunk
	for _, pc := range c.classes[c.classOf[i]].pieces {
		rules := pc.appendRules(nil, n)
		whole := all || pc.added > gen
		for si, l := range pc.srcs {
			if len(l.ips) == 0 {
				if !whole && l.dirty > gen {
					out = append(out, FilterChunk{Name: pc.names[si]})
				}
				continue
			}
			if whole || l.dirty > gen {
				out = append(out, FilterChunk{Name: pc.names[si], Rules: rules[:1:1]})
			}
			rules = rules[1:]
		}
	}
	return out
}
