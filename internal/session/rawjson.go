package session

import "encoding/json"

// Obj builds a JSON object by appending fields. Pre-encoded values are
// appended as they are: encoding/json would re-validate and compact every
// json.RawMessage, which profiles showed to be the largest cost of
// building maps from cached encodings.
type Obj struct {
	Builder
	fields int
}

// Builder builds JSON as parts: its own bytes (B, which callers append to
// directly) and shared chunks, each kept as a part of its own so that its
// frame is spliced, not copied.
type Builder struct {
	B []byte
	// parts holds what precedes B.
	parts []Part
}

// Chunk adds a shared chunk. The bytes after it go on in the same
// buffer (what precedes is a part of its own, capped so that nothing
// appended can reach it): a message sized up front is one allocation.
func (b *Builder) Chunk(c *Chunk) {
	if n := len(b.B); n > 0 {
		b.parts = append(b.parts, Part{Raw: b.B[:n:n]})
		b.B = b.B[n:]
	}
	b.parts = append(b.parts, Part{Chunk: c})
}

// Append adds parts: their bytes are copied, their chunks kept.
func (b *Builder) Append(ps []Part) {
	for _, p := range ps {
		if p.Chunk != nil {
			b.Chunk(p.Chunk)
		} else {
			b.B = append(b.B, p.Raw...)
		}
	}
}

// Parts returns what was built.
func (b *Builder) Parts() []Part {
	if len(b.B) > 0 {
		return append(b.parts, Part{Raw: b.B})
	}
	return b.parts
}

// NewObj starts an object in buf (reused when non-nil).
func NewObj(buf []byte) *Obj { return &Obj{Builder: Builder{B: append(buf[:0], '{')}} }

// ContinueObj continues an object whose earlier part (fields, then an
// open value closed by prefix) was written elsewhere: the next field is
// preceded by a comma.
func ContinueObj(prefix string) *Obj { return &Obj{Builder: Builder{B: []byte(prefix)}, fields: 1} }

func (o *Obj) key(name string) {
	if o.fields > 0 {
		o.B = append(o.B, ',')
	}
	o.fields++
	o.B = append(o.B, '"')
	o.B = append(o.B, name...)
	o.B = append(o.B, '"', ':')
}

// Key writes a field name and returns the object so far, for a value the
// caller writes itself (then continued with ContinueObj).
func (o *Obj) Key(name string) []byte {
	o.key(name)
	return o.B
}

// Raw adds a pre-encoded value; an empty value is omitted.
func (o *Obj) Raw(name string, v []byte) {
	if len(v) == 0 {
		return
	}
	o.key(name)
	o.B = append(o.B, v...)
}

// RawList adds a list of pre-encoded values; an empty list is omitted.
func (o *Obj) RawList(name string, vs [][]byte) {
	if len(vs) == 0 {
		return
	}
	o.key(name)
	o.B = append(o.B, '[')
	for i, v := range vs {
		if i > 0 {
			o.B = append(o.B, ',')
		}
		o.B = append(o.B, v...)
	}
	o.B = append(o.B, ']')
}

// RawParts adds a value made of parts: per-session bytes and shared
// chunks, which stay separate parts of the message.
func (o *Obj) RawParts(name string, ps []Part) {
	if len(ps) == 0 {
		return
	}
	o.key(name)
	o.Append(ps)
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
	return append(o.B, '}')
}

// Parts closes the object and returns it as parts.
func (o *Obj) Parts() []Part {
	o.B = append(o.B, '}')
	return o.Builder.Parts()
}

// filterChunks adds a PacketFilters map whose values are pre-encoded parts
// (nil means JSON null).
func (o *Obj) filterChunks(m map[string][]Part) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sortStrings(keys)
	o.key("PacketFilters")
	o.B = append(o.B, '{')
	for i, k := range keys {
		if i > 0 {
			o.B = append(o.B, ',')
		}
		o.B = AppendString(o.B, k)
		o.B = append(o.B, ':')
		if v := m[k]; v == nil {
			o.B = append(o.B, "null"...)
		} else {
			o.Append(v)
		}
	}
	o.B = append(o.B, '}')
}

// AppendString appends s as a JSON string, as encoding/json writes it:
// copied as it is when nothing in it needs escaping (addresses, chunk
// names), which skips encoding/json's allocation.
func AppendString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
