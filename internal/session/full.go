package session

import (
	"sync"

	"tailscale.com/util/zstdframe"
)

// A full map is sent as parts: small per-session JSON pieces and shared
// chunks of peers. A client decodes a map message with
// zstdframe.AppendDecode, which accepts several zstd frames back to back
// and returns their concatenated content, so each shared chunk is
// compressed once and its frame spliced into every message that carries
// it (DESIGN principle 4).

// Chunk is a shared run of encoded peers.
type Chunk struct {
	json []byte
	once sync.Once
	zstd []byte
}

// NewChunk wraps JSON that many full maps will splice in.
func NewChunk(json []byte) *Chunk { return &Chunk{json: json} }

// compressed returns the chunk's zstd frame, built on first use.
func (c *Chunk) compressed() []byte {
	c.once.Do(func() { c.zstd = zstdframe.AppendEncode(nil, c.json, zstdframe.FastestCompression) })
	return c.zstd
}

// Part is one piece of a full map: per-session Raw JSON or a shared Chunk.
type Part struct {
	Raw   []byte
	Chunk *Chunk
}

// JoinParts returns the message the parts make: their JSON concatenated,
// or, compressed, their zstd frames concatenated.
func JoinParts(parts []Part, compress bool) []byte {
	size := 0
	for _, p := range parts {
		switch {
		case p.Chunk == nil:
			size += len(p.Raw)
		case compress:
			size += len(p.Chunk.compressed())
		default:
			size += len(p.Chunk.json)
		}
	}
	out := make([]byte, 0, size)
	for _, p := range parts {
		switch {
		case p.Chunk == nil && compress:
			out = zstdframe.AppendEncode(out, p.Raw, zstdframe.FastestCompression)
		case p.Chunk == nil:
			out = append(out, p.Raw...)
		case compress:
			out = append(out, p.Chunk.compressed()...)
		default:
			out = append(out, p.Chunk.json...)
		}
	}
	return out
}
