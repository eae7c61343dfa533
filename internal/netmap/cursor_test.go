package netmap

import (
	"slices"
	"testing"

	"github.com/tailplane/tailplane/internal/policy"
)

func TestCursorSkipsSelfAndInsertsRepresentative(t *testing.T) {
	list := []policy.Peer{{ID: 1}, {ID: 2}, {ID: 4}, {ID: 5}}
	for _, tc := range []struct {
		skip uint64
		ins  uint64
		want []uint64
	}{
		{skip: 4, ins: 3, want: []uint64{1, 2, 3, 5}},
		{skip: 1, ins: 9, want: []uint64{2, 4, 5, 9}},
		{skip: 5, ins: 0, want: []uint64{1, 2, 4}},
		{skip: 0, ins: 0, want: []uint64{1, 2, 4, 5}},
	} {
		c := &cursor{l: list, skip: tc.skip}
		if tc.ins != 0 {
			c.ins = &policy.Peer{ID: tc.ins}
		}
		var got []uint64
		for {
			p, ok := c.peek()
			if !ok {
				break
			}
			got = append(got, p.ID)
			c.next()
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("skip %d ins %d: got %v, want %v", tc.skip, tc.ins, got, tc.want)
		}
	}
}
