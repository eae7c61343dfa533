package session

import "encoding/json"

// Obj builds a JSON object by appending fields. Pre-encoded values are
// appended as they are: encoding/json would re-validate and compact every
// json.RawMessage, which profiles showed to be the largest cost of
// building maps from cached encodings.
type Obj struct {
	b      []byte
	fields int
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
func (o *Obj) Bytes() []byte { return append(o.b, '}') }

// filterChunks encodes a PacketFilters map whose values are pre-encoded
// (nil means JSON null).
func filterChunks(m map[string]json.RawMessage) []byte {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sortStrings(keys)
	o := NewObj(nil)
	for _, k := range keys {
		v := m[k]
		if v == nil {
			v = json.RawMessage("null")
		}
		kb, _ := json.Marshal(k)
		o.key(string(kb[1 : len(kb)-1]))
		o.b = append(o.b, v...)
	}
	return o.Bytes()
}
