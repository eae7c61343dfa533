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
			for j, d := range r.DstPorts {
				if j > 0 {
					p.B = append(p.B, ',')
				}
				p.B = append(p.B, `{"IP":`...)
				p.B = appendJSONString(p.B, d.IP)
				p.B = append(p.B, `,"Ports":{"First":`...)
				p.B = strconv.AppendUint(p.B, uint64(d.Ports.First), 10)
				p.B = append(p.B, `,"Last":`...)
				p.B = strconv.AppendUint(p.B, uint64(d.Ports.Last), 10)
				p.B = append(p.B, "}}"...)
			}
			p.B = append(p.B, ']')
		}
		if len(r.IPProto) > 0 {
			p.B = append(p.B, `,"IPProto":[`...)
			for j, proto := range r.IPProto {
				if j > 0 {
					p.B = append(p.B, ',')
				}
				p.B = strconv.AppendInt(p.B, int64(proto), 10)
			}
			p.B = append(p.B, ']')
		}
		p.B = append(p.B, '}')
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
