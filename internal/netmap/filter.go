package netmap

import (
	"encoding/json"
	"strconv"
	"unsafe"

	"tailscale.com/tailcfg"
)

// filterEncoder encodes packet filters by hand, without reflection, and
// encodes each source list once per compilation: the compiler shares one
// SrcIPs slice per selector among every class whose rules name it, so a
// large list (autogroup:member, a big group) is escaped once, not once per
// class. Profiles showed json.Marshal of filters as the largest cost of a
// join under large policies.
type filterEncoder struct {
	srcs map[srcKey][]byte
}

type srcKey struct {
	p *string
	n int
}

func newFilterEncoder() *filterEncoder { return &filterEncoder{srcs: map[srcKey][]byte{}} }

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

func (fe *filterEncoder) appendSrcs(b []byte, srcs []string) []byte {
	if len(srcs) == 0 {
		return append(b, "null"...)
	}
	k := srcKey{p: unsafe.SliceData(srcs), n: len(srcs)}
	enc, ok := fe.srcs[k]
	if !ok {
		enc = append(enc, '[')
		for i, s := range srcs {
			if i > 0 {
				enc = append(enc, ',')
			}
			enc = appendJSONString(enc, s)
		}
		enc = append(enc, ']')
		fe.srcs[k] = enc
	}
	return append(b, enc...)
}

// encode returns the filter as JSON, as encoding/json would write it.
func (fe *filterEncoder) encode(rules []tailcfg.FilterRule) []byte {
	b := []byte{'['}
	for i := range rules {
		r := &rules[i]
		if i > 0 {
			b = append(b, ',')
		}
		if len(r.CapGrant) > 0 || len(r.SrcBits) > 0 || hasBits(r.DstPorts) {
			rb, _ := json.Marshal(r)
			b = append(b, rb...)
			continue
		}
		b = append(b, `{"SrcIPs":`...)
		b = fe.appendSrcs(b, r.SrcIPs)
		if len(r.DstPorts) > 0 {
			b = append(b, `,"DstPorts":[`...)
			for j, d := range r.DstPorts {
				if j > 0 {
					b = append(b, ',')
				}
				b = append(b, `{"IP":`...)
				b = appendJSONString(b, d.IP)
				b = append(b, `,"Ports":{"First":`...)
				b = strconv.AppendUint(b, uint64(d.Ports.First), 10)
				b = append(b, `,"Last":`...)
				b = strconv.AppendUint(b, uint64(d.Ports.Last), 10)
				b = append(b, "}}"...)
			}
			b = append(b, ']')
		}
		if len(r.IPProto) > 0 {
			b = append(b, `,"IPProto":[`...)
			for j, p := range r.IPProto {
				if j > 0 {
					b = append(b, ',')
				}
				b = strconv.AppendInt(b, int64(p), 10)
			}
			b = append(b, ']')
		}
		b = append(b, '}')
	}
	return append(b, ']')
}

func hasBits(ds []tailcfg.NetPortRange) bool {
	for _, d := range ds {
		if d.Bits != nil {
			return true
		}
	}
	return false
}
