package session

import (
	"math/bits"
	"sync"

	"tailscale.com/util/zstdframe"
)

// A message is several zstd frames back to back, and every frame is
// written without its content size. klauspost/compress's DecodeAll, which
// tailscaled uses (zstdframe.AppendDecode(nil, msg), controlclient
// direct.go:1494), grows its output to exactly the size a frame declares
// before decoding it, copying everything decoded so far: quadratic in the
// number of frames. A 10,000-peer full map of 318 parts took a client
// 198 ms and 779 MB of allocation to decode, against 9.5 ms and 21 MB
// with the sizes left out (BenchmarkClientDecodeFullMap10kPeers). Without
// a declared size the decoder appends, and the output grows
// geometrically.

// storedMax is the largest per-session part written as a stored
// (uncompressed) zstd frame instead of being compressed. Compressing costs
// about 4 µs per call whatever the size (encoder reset and entropy
// tables), and a filter delta splices many small per-session pieces (rule
// names, the node's own destination ports) between shared source lists:
// at 4,000 nodes under the 15,000-rule policy that was 357,000 calls,
// most of them for a few hundred bytes that compress by less than half.
const storedMax = 1024

// appendFrame appends src as a zstd frame: stored as is when small,
// compressed otherwise.
func appendFrame(dst, src []byte) []byte {
	if len(src) > storedMax {
		return appendCompressed(dst, src)
	}
	return appendStoredFrame(dst, src)
}

// appendCompressed appends src compressed as one zstd frame that declares
// no content size. It compresses into a pooled buffer: given no room,
// EncodeAll allocates an output as large as its input, and those were a
// fifth of the bytes the server allocated in a join storm under the
// 15,000-rule policy (6.8 of 31 GB).
func appendCompressed(dst, src []byte) []byte {
	bp := zstdScratch.Get().(*[]byte)
	f := zstdframe.AppendEncode((*bp)[:0], src, zstdframe.FastestCompression)
	f = unsize(f, len(src))
	dst = append(dst, f...)
	*bp = f[:0]
	zstdScratch.Put(bp)
	return dst
}

// zstdScratch holds the buffers appendCompressed compresses into; each
// keeps the capacity its largest frame needed.
var zstdScratch = sync.Pool{New: func() any { return new([]byte) }}

// unsize removes the content size from the header of frame f, which
// holds n bytes (RFC 8878 3.1.1.1): a single-segment frame (whose window
// is its content size) gets a window descriptor of at least n instead,
// which bounds both its match offsets and its blocks; a frame with a
// window descriptor keeps it. A header of another shape (a dictionary) is
// left as it is: still valid, only slower to decode.
func unsize(f []byte, n int) []byte {
	fhd := f[4]
	if fhd&3 != 0 {
		return f
	}
	fcsFlag := fhd >> 6
	// hdr is the header's end: magic, descriptor, window descriptor
	// (unless single-segment), content size.
	var hdr int
	wd := windowFor(n)
	if fhd>>5&1 == 1 {
		hdr = 5 + [4]int{1, 2, 4, 8}[fcsFlag]
	} else {
		wd = f[5]
		hdr = 6 + [4]int{0, 2, 4, 8}[fcsFlag]
	}
	// New header: magic, descriptor (checksum flag kept), window.
	f[4], f[5] = fhd&4, wd
	return append(f[:6], f[hdr:]...)
}

// windowFor returns the window descriptor of the smallest window of at
// least n bytes (1 KiB at least): exponent windowLog-10, mantissa 0.
func windowFor(n int) byte {
	wl := max(10, bits.Len(uint(max(n, 1)-1)))
	return byte(wl-10) << 3
}

// appendStoredFrame appends a zstd frame holding src in one raw block,
// declaring no content size: the magic number, a frame header descriptor
// of 0 (no size, no checksum, no dictionary, not single-segment), a window
// descriptor of at least len(src), then a last block of type Raw. src must
// be at most 128 KiB (a block's limit); callers pass at most storedMax.
func appendStoredFrame(dst, src []byte) []byte {
	n := len(src)
	dst = append(dst, 0x28, 0xb5, 0x2f, 0xfd, 0, windowFor(n))
	bh := uint32(n)<<3 | 1 // Last_Block, Block_Type Raw (0)
	dst = append(dst, byte(bh), byte(bh>>8), byte(bh>>16))
	return append(dst, src...)
}
