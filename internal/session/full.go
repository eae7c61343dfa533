package session

import (
	"encoding/binary"
	"sync"
)

// A message is built as parts: small per-session JSON pieces and shared
// chunks (runs of peers in a full map, large source lists in packet
// filters). A client decodes a map message with zstdframe.AppendDecode,
// which accepts several zstd frames back to back and returns their
// concatenated content, so each shared chunk is compressed once and its
// frame spliced into every message that carries it (DESIGN principle 4).

// Chunk is a shared piece of JSON that many messages splice in.
type Chunk struct {
	json []byte
	once sync.Once
	zstd []byte
}

// NewChunk wraps JSON that many messages will splice in.
func NewChunk(json []byte) *Chunk { return &Chunk{json: json} }

// JSON returns the chunk's JSON.
func (c *Chunk) JSON() []byte { return c.json }

// compressed returns the chunk's zstd frame, built on first use.
func (c *Chunk) compressed() []byte {
	c.once.Do(func() { c.zstd = appendCompressed(nil, c.json) })
	return c.zstd
}

// Part is one piece of a message: per-session Raw JSON or a shared Chunk.
type Part struct {
	Raw   []byte
	Chunk *Chunk
}

// JoinParts returns the message the parts make: their JSON concatenated,
// or, compressed, their zstd frames concatenated.
func JoinParts(parts []Part, compress bool) []byte {
	frames, size := partFrames(parts, compress)
	out := make([]byte, 0, size)
	for _, f := range frames {
		out = append(out, f...)
	}
	return out
}

// partFrames returns the bytes each part puts on the wire (its JSON, or
// its zstd frame) and their total size. Per-session parts are compressed
// here, shared chunks once for every message.
func partFrames(parts []Part, compress bool) (frames [][]byte, size int) {
	frames = make([][]byte, len(parts))
	for i, p := range parts {
		switch {
		case p.Chunk == nil && compress:
			frames[i] = appendFrame(nil, p.Raw)
		case p.Chunk == nil:
			frames[i] = p.Raw
		case compress:
			frames[i] = p.Chunk.compressed()
		default:
			frames[i] = p.Chunk.json
		}
		size += len(frames[i])
	}
	return frames, size
}

// writeParts writes the parts as one length-prefixed message, in writes
// of up to writeSize: not joined into one buffer first (a full map is
// about a megabyte at 5,000 peers, and joining its parts was a tenth of the
// server's CPU in a join storm), and not frame by frame either. Each Write
// to an HTTP/2 response of 4 KiB or more is a round trip with the
// connection's serving goroutine, and a full map is hundreds of chunk
// frames of about 4 KiB (32-id spans): writing them one by one doubled the
// server's CPU in an allow-all restart storm of 10,000 clients.
func writeParts(w Writer, parts []Part, compress bool) (int, error) {
	frames, size := partFrames(parts, compress)
	bp := writeBufs.Get().(*[]byte)
	defer writeBufs.Put(bp)
	buf := binary.LittleEndian.AppendUint32((*bp)[:0], uint32(size))
	for _, f := range frames {
		if len(buf)+len(f) > writeSize && len(buf) > 0 {
			if _, err := w.Write(buf); err != nil {
				return 0, err
			}
			buf = buf[:0]
		}
		if len(f) >= writeSize {
			if _, err := w.Write(f); err != nil {
				return 0, err
			}
			continue
		}
		buf = append(buf, f...)
	}
	if len(buf) > 0 {
		if _, err := w.Write(buf); err != nil {
			return 0, err
		}
	}
	return size + 4, nil
}

// writeSize is the largest write writeParts makes of small frames: HTTP/2's
// default frame size, so a write is one DATA frame. Its buffers are pooled,
// so sessions that are not writing hold none. 64 KiB was no faster and,
// with thousands of sessions blocked in Write during a storm, held 0.6 GiB
// more.
const writeSize = 16 << 10

var writeBufs = sync.Pool{New: func() any {
	b := make([]byte, 0, writeSize)
	return &b
}}
