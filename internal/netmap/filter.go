package netmap

import (
	"encoding/json"
	"slices"
	"strconv"
	"unsafe"

	"tailscale.com/tailcfg"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/session"
)

// filterEncoder encodes packet filters by hand, without reflection, and
// encodes each source list once: the compiler shares one SrcIPs slice per
// selector among every class whose rules name it, so a large list
// (autogroup:member, a big group) is escaped once, not once per class.
// Profiles showed json.Marshal of filters as the largest cost of a join
// under large policies.
//
// A large list becomes a shared chunk of the message, compressed once and
// spliced into every node's filter: filters that carry the receiving
// node's own addresses are compressed per session, and the source lists
// were most of those bytes (zstd of per-session filter deltas was about a
// tenth of the server's CPU in a join storm under the 15,000-rule policy).
type filterEncoder struct {
	srcs map[srcKey]*srcEnc
	// parts caches what every node's rendering of a filter part shares:
	// its fixed destinations and protocols, written once per piece.
	parts map[policy.FilterShape]*partEnc
	// gen counts sweeps; an entry not used since the previous sweep goes.
	gen uint64
}

type srcKey struct {
	p *string
	n int
}

type srcEnc struct {
	json  []byte
	chunk *session.Chunk // for a list of at least sharedSrcSize bytes
	lastUse
}

// sharedSrcSize is the smallest encoded source list sent as a shared
// chunk. A zstd frame costs about 20 bytes and compresses alone, so short
// lists stay inline.
const sharedSrcSize = 512

// partEnc is the JSON a filter part's rules share, around the source list
// and the receiving node's own destinations.
type partEnc struct {
	// dst are the fixed DstPorts entries, comma-separated; self the tail
	// of an own-address entry per SelfPorts range, after its "IP".
	dst  []byte
	self [][]byte
	// tail ends a rule: its IPProto and the closing brace.
	tail []byte
	// marshal: rules encoding/json must write (app grants, Bits).
	marshal bool
	lastUse
}

func newFilterEncoder() *filterEncoder {
	return &filterEncoder{srcs: map[srcKey]*srcEnc{}, parts: map[policy.FilterShape]*partEnc{}}
}

// sweep drops the lists not used since the previous sweep. Lists the
// compiler replaced (a join changed them) are no longer asked for; those
// it kept are, and stay encoded.
func (fe *filterEncoder) sweep() {
	fe.gen++
	sweepUnused(fe.srcs, fe.gen)
	sweepUnused(fe.parts, fe.gen)
}

// lastUse is the sweep generation a cached encoding was last used in.
type lastUse struct{ used uint64 }

func (l *lastUse) lastUsed() uint64 { return l.used }

// sweepUnused drops the entries of m not used since the sweep before gen.
func sweepUnused[K comparable, V interface{ lastUsed() uint64 }](m map[K]V, gen uint64) {
	for k, v := range m {
		if v.lastUsed()+1 < gen {
			delete(m, k)
		}
	}
}

func (fe *filterEncoder) appendSrcs(p *session.Builder, srcs []string) {
	if len(srcs) == 0 {
		p.B = append(p.B, "null"...)
		return
	}
	k := srcKey{p: unsafe.SliceData(srcs), n: len(srcs)}
	se := fe.srcs[k]
	if se == nil {
		enc := []byte{'['}
		for i, s := range srcs {
			if i > 0 {
				enc = append(enc, ',')
			}
			enc = session.AppendString(enc, s)
		}
		enc = append(enc, ']')
		se = &srcEnc{json: enc}
		if len(enc) >= sharedSrcSize {
			se.chunk = session.NewChunk(enc)
		}
		fe.srcs[k] = se
	}
	se.used = fe.gen
	if se.chunk != nil {
		p.Chunk(se.chunk)
	} else {
		p.B = append(p.B, se.json...)
	}
}

// encode returns the filter as JSON, as encoding/json would write it, in
// parts: large source lists are shared chunks.
func (fe *filterEncoder) encode(rules []tailcfg.FilterRule) []session.Part {
	p := &session.Builder{B: []byte{'['}}
	fe.appendRules(p, rules)
	p.B = append(p.B, ']')
	return p.Parts()
}

func (fe *filterEncoder) appendRules(p *session.Builder, rules []tailcfg.FilterRule) {
	for i := range rules {
		r := &rules[i]
		if i > 0 {
			p.B = append(p.B, ',')
		}
		if len(r.CapGrant) > 0 || len(r.SrcBits) > 0 || hasBits(r.DstPorts) {
			rb, _ := json.Marshal(r)
			p.B = append(p.B, rb...)
			continue
		}
		p.B = append(p.B, `{"SrcIPs":`...)
		fe.appendSrcs(p, r.SrcIPs)
		if len(r.DstPorts) > 0 {
			p.B = append(p.B, `,"DstPorts":[`...)
			p.B = appendDsts(p.B, r.DstPorts)
			p.B = append(p.B, ']')
		}
		p.B = appendRuleTail(p.B, r.IPProto)
	}
}

// appendDsts writes DstPorts entries, comma-separated.
func appendDsts(b []byte, ds []tailcfg.NetPortRange) []byte {
	for j, d := range ds {
		if j > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"IP":`...)
		b = session.AppendString(b, d.IP)
		b = appendPorts(b, d.Ports)
	}
	return b
}

// appendPorts writes the end of a DstPorts entry, from after its IP.
func appendPorts(b []byte, pr tailcfg.PortRange) []byte {
	b = append(b, `,"Ports":{"First":`...)
	b = strconv.AppendUint(b, uint64(pr.First), 10)
	b = append(b, `,"Last":`...)
	b = strconv.AppendUint(b, uint64(pr.Last), 10)
	return append(b, "}}"...)
}

// appendRuleTail writes a rule's IPProto, if any, and closes it.
func appendRuleTail(b []byte, protos []int) []byte {
	if len(protos) > 0 {
		b = append(b, `,"IPProto":[`...)
		for j, proto := range protos {
			if j > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendInt(b, int64(proto), 10)
		}
		b = append(b, ']')
	}
	return append(b, '}')
}

// ownDsts returns the start of a DstPorts entry for each of a node's own
// addresses, up to its Ports: what a filter part adds per receiver.
func ownDsts(addrs []string) [][]byte {
	out := make([][]byte, len(addrs))
	for i, a := range addrs {
		out[i] = session.AppendString([]byte(`{"IP":`), a)
	}
	return out
}

// partEncFor returns the shared JSON of part p, building it on first use.
func (fe *filterEncoder) partEncFor(p policy.FilterPart) *partEnc {
	pe := fe.parts[p.Shape()]
	if pe == nil {
		pe = &partEnc{marshal: p.HasCaps() || hasBits(p.Dst())}
		pe.dst = appendDsts(nil, p.Dst())
		for _, pr := range p.SelfPorts() {
			pe.self = append(pe.self, appendPorts(nil, pr))
		}
		pe.tail = appendRuleTail(nil, p.Protos())
		fe.parts[p.Shape()] = pe
	}
	pe.used = fe.gen
	return pe
}

// encodePart returns part p of node nodeID's filter as JSON, exactly as
// encode writes p.Rules: the shared source list (a chunk when large) and
// the part's cached JSON, with only the node's own destinations written
// per node. own is ownDsts of the node's OwnAddrs.
func (fe *filterEncoder) encodePart(c *policy.Compiled, nodeID uint64, p policy.FilterPart, own [][]byte) []session.Part {
	pe := fe.partEncFor(p)
	if pe.marshal {
		return fe.encode(p.Rules(c, nodeID))
	}
	hasDst := len(pe.dst) > 0 || (len(pe.self) > 0 && len(own) > 0)
	// What follows the source list, sized once (after a large list, a
	// chunk, the builder goes on in what is left of its buffer).
	rest := len(pe.tail) + 1
	if hasDst {
		rest += len(`,"DstPorts":[]`) + len(pe.dst)
		for _, ip := range own {
			for _, ports := range pe.self {
				rest += 1 + len(ip) + len(ports)
			}
		}
	}
	b := &session.Builder{B: append(make([]byte, 0, 64), `[{"SrcIPs":`...)}
	fe.appendSrcs(b, p.Src())
	b.B = slices.Grow(b.B, rest)
	if hasDst {
		b.B = append(b.B, `,"DstPorts":[`...)
		b.B = append(b.B, pe.dst...)
		comma := len(pe.dst) > 0
		for _, ip := range own {
			for _, ports := range pe.self {
				if comma {
					b.B = append(b.B, ',')
				}
				comma = true
				b.B = append(b.B, ip...)
				b.B = append(b.B, ports...)
			}
		}
		b.B = append(b.B, ']')
	}
	b.B = append(b.B, pe.tail...)
	b.B = append(b.B, ']')
	return b.Parts()
}

func hasBits(ds []tailcfg.NetPortRange) bool {
	for _, d := range ds {
		if d.Bits != nil {
			return true
		}
	}
	return false
}
