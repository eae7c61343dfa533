package policy

import "math/bits"

// bitset is a fixed-size set of small integers (class ids).
type bitset []uint64

func newBitset(n int) bitset { return make(bitset, (n+63)/64) }

func (b bitset) set(i int) { b[i/64] |= 1 << (uint(i) % 64) }

// has reports whether i is in the set; sets made before class i existed
// (AddNodes) are shorter and do not hold it.
func (b bitset) has(i int) bool { return i/64 < len(b) && b[i/64]&(1<<(uint(i)%64)) != 0 }

// add is set for a set that may be shorter than i needs: it grows.
func (b *bitset) add(i int) {
	for len(*b) <= i/64 {
		*b = append(*b, 0)
	}
	b.set(i)
}
func (b bitset) or(o bitset) {
	for i := range o {
		b[i] |= o[i]
	}
}
func (b bitset) setAll(n int) {
	for i := 0; i < n; i++ {
		b.set(i)
	}
}

func (b bitset) empty() bool {
	for _, w := range b {
		if w != 0 {
			return false
		}
	}
	return true
}

// each calls f for every member in increasing order.
func (b bitset) each(f func(int)) {
	for wi, w := range b {
		for w != 0 {
			t := bits.TrailingZeros64(w)
			f(wi*64 + t)
			w &= w - 1
		}
	}
}

// intersects reports whether the sets share a member.
func (b bitset) intersects(o bitset) bool {
	for i := range min(len(b), len(o)) {
		if b[i]&o[i] != 0 {
			return true
		}
	}
	return false
}

// orGrow is or for a set that may be shorter than o: it grows.
func (b *bitset) orGrow(o bitset) {
	for len(*b) < len(o) {
		*b = append(*b, 0)
	}
	b.or(o)
}
