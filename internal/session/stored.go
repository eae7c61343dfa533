package session

import "tailscale.com/util/zstdframe"

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
		return zstdframe.AppendEncode(dst, src, zstdframe.FastestCompression)
	}
	return appendStoredFrame(dst, src)
}

// appendStoredFrame appends a zstd frame (RFC 8878) holding src in one
// raw block: the magic number, a single-segment frame header whose content
// size field is 1 byte (sizes below 256) or 2 bytes (size-256), then a
// last block of type Raw. No checksum. src must be at most 65,791 bytes and
// a block at most 128 KiB; callers pass at most storedMax.
func appendStoredFrame(dst, src []byte) []byte {
	n := len(src)
	dst = append(dst, 0x28, 0xb5, 0x2f, 0xfd)
	if n < 256 {
		dst = append(dst, 0x20, byte(n))
	} else {
		dst = append(dst, 0x60, byte(n-256), byte((n-256)>>8))
	}
	bh := uint32(n)<<3 | 1 // Last_Block, Block_Type Raw (0)
	dst = append(dst, byte(bh), byte(bh>>8), byte(bh>>16))
	return append(dst, src...)
}
