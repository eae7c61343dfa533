package session

import (
	"bytes"
	"strings"
	"testing"

	"tailscale.com/util/zstdframe"
)

// TestStoredFramesDecode: stored frames of every size class decode with
// the client's decoder, alone and spliced between compressed frames.
func TestStoredFramesDecode(t *testing.T) {
	for _, n := range []int{0, 1, 255, 256, 257, 1000, storedMax, storedMax + 1, 70000} {
		src := []byte(strings.Repeat("x", n))
		f := appendFrame(nil, src)
		if n <= storedMax && len(f) != n+9 && len(f) != n+10 {
			t.Fatalf("%d bytes: frame of %d bytes is not stored", n, len(f))
		}
		got, err := zstdframe.AppendDecode(nil, f)
		if err != nil || !bytes.Equal(got, src) {
			t.Fatalf("%d bytes: %v, got %d bytes", n, err, len(got))
		}
		c := zstdframe.AppendEncode(nil, []byte("abc"), zstdframe.FastestCompression)
		msg := append(append(append([]byte{}, c...), f...), c...)
		got, err = zstdframe.AppendDecode(nil, msg)
		if want := "abc" + string(src) + "abc"; err != nil || string(got) != want {
			t.Fatalf("%d bytes spliced: %v", n, err)
		}
	}
}
