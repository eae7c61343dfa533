package session

import (
	"bytes"
	"crypto/rand"
	"runtime"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"tailscale.com/util/zstdframe"
)

// TestFramesDecode: stored and compressed frames of every size class
// declare no content size and decode with the client's decoder, alone and
// spliced between other frames.
func TestFramesDecode(t *testing.T) {
	for _, n := range []int{0, 1, 255, 256, 257, 1000, storedMax, storedMax + 1, 70000, 300000} {
		src := []byte(strings.Repeat("x", n))
		if n > 1000 {
			var b strings.Builder
			for b.Len() < n {
				b.WriteString(rand.Text())
			}
			src = []byte(b.String()[:n])
		}
		f := appendFrame(nil, src)
		if n <= storedMax && len(f) != n+9 {
			t.Fatalf("%d bytes: frame of %d bytes is not stored", n, len(f))
		}
		var h zstd.Header
		if err := h.Decode(f); err != nil || h.HasFCS || h.SingleSegment {
			t.Fatalf("%d bytes: header %+v (%v): want no content size", n, h, err)
		}
		got, err := zstdframe.AppendDecode(nil, f)
		if err != nil || !bytes.Equal(got, src) {
			t.Fatalf("%d bytes: %v, got %d bytes", n, err, len(got))
		}
		c := appendCompressed(nil, []byte(strings.Repeat("abc", 500)))
		msg := append(append(append([]byte{}, c...), f...), c...)
		got, err = zstdframe.AppendDecode(nil, msg)
		if want := strings.Repeat("abc", 500) + string(src) + strings.Repeat("abc", 500); err != nil || string(got) != want {
			t.Fatalf("%d bytes spliced: %v", n, err)
		}
	}
}

// TestManyFramesDecodeInLinearSpace: a message of 300 chunk frames (a
// 10,000-peer full map) decodes, as tailscaled decodes it, allocating a
// small multiple of its size. Frames that declare their size made the
// decoder copy its output once per frame: over 100 times the size. The
// least of three decodes is taken, and the bound leaves room for a fresh
// decoder (about 4 MB), because the race detector makes sync.Pool drop
// pooled decoders at random.
func TestManyFramesDecodeInLinearSpace(t *testing.T) {
	var msg, raw []byte
	for range 300 {
		piece := []byte(strings.Repeat(`{"Key":"nodekey:`+rand.Text()+`","Online":true},`, 30))
		raw = append(raw, piece...)
		msg = appendFrame(msg, piece)
	}
	least := ^uint64(0)
	for range 3 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		got, err := zstdframe.AppendDecode(nil, msg)
		runtime.ReadMemStats(&after)
		if err != nil || !bytes.Equal(got, raw) {
			t.Fatalf("decode: %v", err)
		}
		least = min(least, after.TotalAlloc-before.TotalAlloc)
	}
	if least > 24*uint64(len(raw)) {
		t.Fatalf("decoding %d bytes in 300 frames allocated %d bytes", len(raw), least)
	}
}
