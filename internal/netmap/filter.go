package netmap

import (
	"encoding/json"
	"strconv"
	"unsafe"

	"tailscale.com/tailcfg"

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
	used  uint64
}

// sharedSrcSize is the smallest encoded source list sent as a shared
// chunk. A zstd frame costs about 20 bytes and compresses alone, so short
// lists stay inline.
const sharedSrcSize = 512

func newFilterEncoder() *filterEncoder { return &filterEncoder{srcs: map[srcKey]*srcEnc{}} }

// sweep drops the lists not used since the previous sweep. Lists the
// compiler replaced (a join changed them) are no longer asked for; those
// it kept are, and stay encoded.
func (fe *filterEncoder) sweep() {
	fe.gen++
	for k, se := range fe.srcs {
		if se.used+1 < fe.gen {
			delete(fe.srcs, k)
		}
	}
}

// plainJSON reports whether s needs no escaping in a JSON string.
func plainJSON(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return false
		}
	}
	return true
}

func appendJSONString(b []byte, s string) []byte {
	if plainJSON(s) {
		b = append(b, '"')
		b = append(b, s...)
		return append(b, '"')
	}
	q, _ := json.Marshal(s)
	return append(b, q...)
}

// parts builds JSON from bytes and shared chunks.
type parts struct {
	done []session.Part
	b    []byte
}

func (p *parts) chunk(c *session.Chunk) {
	if len(p.b) > 0 {
		p.done = append(p.done, session.Part{Raw: p.b})
		p.b = nil
	}
	p.done = append(p.done, session.Part{Chunk: c})
}

func (p *parts) result() []session.Part {
	if len(p.b) > 0 {
		p.done = append(p.done, session.Part{Raw: p.b})
	}
	return p.done
}

func (fe *filterEncoder) appendSrcs(p *parts, srcs []string) {
	if len(srcs) == 0 {
		p.b = append(p.b, "null"...)
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
			enc = appendJSONString(enc, s)
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
		p.chunk(se.chunk)
	} else {
		p.b = append(p.b, se.json...)
	}
}

// encode returns the filter as JSON, as encoding/json would write it, in
// parts: large source lists are shared chunks.
func (fe *filterEncoder) encode(rules []tailcfg.FilterRule) []session.Part {
	p := &parts{b: []byte{'['}}
	fe.appendRules(p, rules)
	p.b = append(p.b, ']')
	return p.result()
}

func (fe *filterEncoder) appendRules(p *parts, rules []tailcfg.FilterRule) {
	for i := range rules {
		r := &rules[i]
		if i > 0 {
			p.b = append(p.b, ',')
		}
		if len(r.CapGrant) > 0 || len(r.SrcBits) > 0 || hasBits(r.DstPorts) {
			rb, _ := json.Marshal(r)
			p.b = append(p.b, rb...)
			continue
		}
		p.b = append(p.b, `{"SrcIPs":`...)
		fe.appendSrcs(p, r.SrcIPs)
		if len(r.DstPorts) > 0 {
			p.b = append(p.b, `,"DstPorts":[`...)
			for j, d := range r.DstPorts {
				if j > 0 {
					p.b = append(p.b, ',')
				}
				p.b = append(p.b, `{"IP":`...)
				p.b = appendJSONString(p.b, d.IP)
				p.b = append(p.b, `,"Ports":{"First":`...)
				p.b = strconv.AppendUint(p.b, uint64(d.Ports.First), 10)
				p.b = append(p.b, `,"Last":`...)
				p.b = strconv.AppendUint(p.b, uint64(d.Ports.Last), 10)
				p.b = append(p.b, "}}"...)
			}
			p.b = append(p.b, ']')
		}
		if len(r.IPProto) > 0 {
			p.b = append(p.b, `,"IPProto":[`...)
			for j, proto := range r.IPProto {
				if j > 0 {
					p.b = append(p.b, ',')
				}
				p.b = strconv.AppendInt(p.b, int64(proto), 10)
			}
			p.b = append(p.b, ']')
		}
		p.b = append(p.b, '}')
	}
}

func hasBits(ds []tailcfg.NetPortRange) bool {
	for _, d := range ds {
		if d.Bits != nil {
			return true
		}
	}
	return false
}
