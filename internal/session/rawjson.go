package session

import "encoding/json"

// Obj builds a JSON object by appending fields. Pre-encoded values are
// appended as they are: encoding/json would re-validate and compact every
// json.RawMessage, which profiles showed to be the largest cost of
// building maps from cached encodings.
type Obj struct {
	b      []byte
	fields int
	// parts holds what precedes b when the object splices shared chunks.
	parts []Part
}

// NewObj starts an object in buf (reused when non-nil).
func NewObj(buf []byte) *Obj { return &Obj{b: append(buf[:0], '{')} }

// ContinueObj continues an object whose earlier part (fields, then an
// open value closed by prefix) was written elsewhere: the next field is
// preceded by a comma.
func ContinueObj(prefix string) *Obj { return &Obj{b: []byte(prefix), fields: 1} }

func (o *Obj) key(name string) {
	if o.fields > 0 {
		o.b = append(o.b, ',')
	}
	o.fields++
	o.b = append(o.b, '"')
	o.b = append(o.b, name...)
	o.b = append(o.b, '"', ':')
}

// Key writes a field name and returns the object so far, for a value the
// caller writes itself (then continued with ContinueObj).
func (o *Obj) Key(name string) []byte {
	o.key(name)
	return o.b
}

// Raw adds a pre-encoded value; an empty value is omitted.
func (o *Obj) Raw(name string, v []byte) {
	if len(v) == 0 {
		return
	}
	o.key(name)
	o.b = append(o.b, v...)
}

// RawList adds a list of pre-encoded values; an empty list is omitted.
func (o *Obj) RawList(name string, vs [][]byte) {
	if len(vs) == 0 {
		return
	}
	o.key(name)
	o.b = append(o.b, '[')
	for i, v := range vs {
		if i > 0 {
			o.b = append(o.b, ',')
		}
		o.b = append(o.b, v...)
	}
	o.b = append(o.b, ']')
}

// RawParts adds a value made of parts: per-session bytes and shared
// chunks, which stay separate parts of the message.
func (o *Obj) RawParts(name string, ps []Part) {
	if len(ps) == 0 {
		return
	}
	o.key(name)
	o.appendParts(ps)
}

func (o *Obj) appendParts(ps []Part) {
	for _, p := range ps {
		if p.Chunk == nil {
			o.b = append(o.b, p.Raw...)
			continue
		}
		if len(o.b) > 0 {
			o.parts = append(o.parts, Part{Raw: o.b})
			o.b = nil
		}
		o.parts = append(o.parts, p)
	}
}

// Value adds v encoded with encoding/json (for small values).
func (o *Obj) Value(name string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	o.Raw(name, b)
	return nil
}

// Bytes closes the object and returns it.
func (o *Obj) Bytes() []byte {
	if len(o.parts) > 0 {
		return JoinParts(o.Parts(), false)
	}
	return append(o.b, '}')
}

// Parts closes the object and returns it as parts.
func (o *Obj) Parts() []Part { return append(o.parts, Part{Raw: append(o.b, '}')}) }

// filterChunks adds a PacketFilters map whose values are pre-encoded parts
// (nil means JSON null).
func (o *Obj) filterChunks(m map[string][]Part) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sortStrings(keys)
	o.key("PacketFilters")
	o.b = append(o.b, '{')
	for i, k := range keys {
		if i > 0 {
			o.b = append(o.b, ',')
		}
		kb, _ := json.Marshal(k)
		o.b = append(o.b, kb...)
		o.b = append(o.b, ':')
		if v := m[k]; v == nil {
			o.b = append(o.b, "null"...)
		} else {
			o.appendParts(v)
		}
	}
	o.b = append(o.b, '}')
}
