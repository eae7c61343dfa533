package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/tailplane/tailplane/internal/store"
)

// ipAllocator hands out node addresses. Tagged and untagged nodes get
// addresses from separate halves of the IPv4 prefix (lanes), each walked
// forward from its own persisted cursor, so an address freed by a deleted
// node is not handed to a new node until its lane has been used once; the
// IPv6 address carries the same offset inside the IPv6 prefix, so a node's
// pair is stable and unique together.
//
// The lanes keep policy source lists short: clients receive every source
// as explicit addresses (FilterRule.SrcIPs), rendered as ranges where they
// are contiguous. With one cursor, user and tagged nodes interleave and
// autogroup:member or a tag stands for thousands of single addresses; in
// the generated 15,000-rule benchmark tailnet at 9,000 nodes the filters
// of all nodes took 8.7 GB, and one user joining changed 8.1 GB of them.
// With lanes: 0.65 GB and 90 MB.
//
// A lane is walked in claimed blocks of addrBlock offsets (see claims), so
// that replicas sharing a database fill blocks of their own; full blocks
// side by side still make one range.
type ipAllocator struct {
	v4, v6 netip.Prefix
	used   map[netip.Addr]bool
	size   uint32 // number of offsets in v4
	lanes  [2]lane
}

// lane is a range of offsets [lo, hi), walked in blocks of block offsets,
// the offset of its next candidate, and how many of its addresses can be
// handed out (capacity) and are in use.
type lane struct {
	lo, hi, next   uint32
	block          uint32
	capacity, used uint32
	setting        string // where next is persisted
	claims         claims
}

// Lanes by index.
const (
	laneUntagged = 0
	laneTagged   = 1
)

// minLaneSplit is the smallest prefix size split into lanes; a smaller
// one is a single lane.
const minLaneSplit = 256

// addrBlock is how many offsets of a lane a replica claims at a time.
const addrBlock = 256

// newIPAllocator makes an allocator whose lanes continue at their stored
// cursors, with the claims among settings.
func newIPAllocator(v4, v6 netip.Prefix, settings map[string][]byte) (*ipAllocator, error) {
	if !v4.IsValid() || !v6.IsValid() {
		return nil, errors.New("state: address prefixes not set")
	}
	a := &ipAllocator{v4: v4, v6: v6, used: map[netip.Addr]bool{}, size: 1 << (32 - v4.Bits())}
	half := a.size / 2
	if a.size < minLaneSplit {
		half = a.size
	}
	a.lanes[laneUntagged] = lane{lo: 1, hi: half, setting: SettingNextIPv4}
	// Like the prefix, the tagged lane skips its first address (x.y.0.0).
	// It is empty when the prefix is too small to split.
	a.lanes[laneTagged] = lane{lo: min(half+1, a.size), hi: a.size, setting: SettingNextIPv4Tagged}
	for i := range a.lanes {
		l := &a.lanes[i]
		l.block = max(1, min(addrBlock, l.hi-l.lo))
		l.capacity = a.takeable(l.lo, l.hi)
		l.claims = claims{prefix: claimPrefix + l.setting + "/"}
		l.claims.load(settings)
		l.next = l.lo
		if v := settings[l.setting]; len(v) > 0 {
			n, err := strconv.ParseUint(string(v), 10, 32)
			if err != nil {
				return nil, fmt.Errorf("state: stored address cursor %q: %w", v, err)
			}
			if uint32(n) >= l.lo && uint32(n) < l.hi {
				l.next = uint32(n)
			}
		}
		l.resume(settings)
	}
	return a, nil
}

// takeable counts the offsets in [lo, hi) that take may hand out.
func (a *ipAllocator) takeable(lo, hi uint32) uint32 {
	n := hi - lo
	for _, off := range []uint32{0, a.size - 1} {
		if off >= lo && off < hi {
			n--
		}
	}
	base := binary.BigEndian.Uint32(a.v4.Addr().AsSlice())
	r := binary.BigEndian.Uint32(reservedV4.Addr().AsSlice())
	for off := range uint32(1 << (32 - reservedV4.Bits())) {
		if o := r + off - base; r+off >= base && o >= lo && o < hi && o != 0 && o != a.size-1 {
			n--
		}
	}
	return n
}

// blocks is the number of blocks in l.
func (l *lane) blocks() uint64 { return uint64((l.hi - l.lo + l.block - 1) / l.block) }

// bounds returns the offsets [start, end) of the block claim number seq
// maps to.
func (l *lane) bounds(seq uint64) (start, end uint32) {
	start = l.lo + uint32(seq%l.blocks())*l.block
	return start, min(start+l.block, l.hi)
}

// resume takes up the block that holds the cursor, under the newest claim
// of it, or, when no block was ever claimed, under the number that maps to
// it.
func (l *lane) resume(settings map[string][]byte) {
	if l.lo >= l.hi {
		return
	}
	idx := uint64((l.next - l.lo) / l.block)
	if !l.claims.anyTop {
		l.claims.resume(idx, settings)
		return
	}
	var newest uint64
	found := false
	for k := range settings {
		if n, ok := l.claims.number(k); ok && n%l.blocks() == idx && (!found || n > newest) {
			newest, found = n, true
		}
	}
	if found {
		l.claims.resume(newest, settings)
	}
}

func (a *ipAllocator) markUsed(v4, v6 netip.Addr) {
	if !a.used[v4] {
		a.count(v4, 1)
	}
	a.used[v4] = true
	a.used[v6] = true
}

func (a *ipAllocator) release(v4, v6 netip.Addr) {
	if a.used[v4] {
		a.count(v4, ^uint32(0))
	}
	delete(a.used, v4)
	delete(a.used, v6)
}

// count adds d to the use count of the lane holding v4, if one does.
func (a *ipAllocator) count(v4 netip.Addr, d uint32) {
	if l, _ := a.laneOf(v4); l != nil {
		l.used += d
	}
}

// laneOf returns the lane holding v4 (nil if none does) and v4's offset.
func (a *ipAllocator) laneOf(v4 netip.Addr) (*lane, uint32) {
	if !a.v4.Contains(v4) {
		return nil, 0
	}
	off := binary.BigEndian.Uint32(v4.AsSlice()) - binary.BigEndian.Uint32(a.v4.Addr().AsSlice())
	for i := range a.lanes {
		if l := &a.lanes[i]; off >= l.lo && off < l.hi {
			return l, off
		}
	}
	return nil, off
}

// allocate returns a free pair from the node's lane (the other lane when
// its own is full) and the lane's cursor to store with it, or
// errNeedBlock when the lane has no owned block with room.
func (a *ipAllocator) allocate(tagged bool) (v4, v6 netip.Addr, cursor store.Setting, err error) {
	own := laneUntagged
	if tagged {
		own = laneTagged
	}
	for _, li := range []int{own, 1 - own} {
		l := &a.lanes[li]
		if l.used >= l.capacity {
			continue
		}
		if v4, v6, ok := a.allocateIn(l); ok {
			return v4, v6, store.Setting{Key: l.setting, Value: []byte(strconv.FormatUint(uint64(l.next), 10))}, nil
		}
		return netip.Addr{}, netip.Addr{}, store.Setting{}, &errNeedBlock{&l.claims}
	}
	return netip.Addr{}, netip.Addr{}, store.Setting{}, errors.New("state: address range exhausted")
}

// allocateIn takes the next free pair of l's owned blocks.
func (a *ipAllocator) allocateIn(l *lane) (v4, v6 netip.Addr, ok bool) {
	c := &l.claims
	for c.ready() {
		start, end := l.bounds(c.seq)
		if c.entered {
			// A fresh block starts at its start, one resumed (the
			// block a cursor from before claims is in) at the cursor.
			if l.next < start || l.next >= end {
				l.next = start
			}
			c.entered = false
		}
		if l.next < start || l.next >= end {
			c.advance()
			continue
		}
		off := l.next
		l.next++
		if v4, v6, ok := a.take(off); ok {
			return v4, v6, true
		}
	}
	return netip.Addr{}, netip.Addr{}, false
}

// take marks the pair at offset off used, unless it is in use or reserved.
func (a *ipAllocator) take(off uint32) (v4, v6 netip.Addr, ok bool) {
	if off == 0 || off == a.size-1 {
		return netip.Addr{}, netip.Addr{}, false // network and broadcast-like addresses confuse people
	}
	var b4 [4]byte
	binary.BigEndian.PutUint32(b4[:], binary.BigEndian.Uint32(a.v4.Addr().AsSlice())+off)
	cand4 := netip.AddrFrom4(b4)
	if isReservedV4(cand4) {
		return netip.Addr{}, netip.Addr{}, false
	}
	b16 := a.v6.Addr().As16()
	binary.BigEndian.PutUint32(b16[12:], binary.BigEndian.Uint32(b16[12:])+off)
	cand6 := netip.AddrFrom16(b16)
	if a.used[cand4] || a.used[cand6] {
		return netip.Addr{}, netip.Addr{}, false
	}
	a.markUsed(cand4, cand6)
	return cand4, cand6, true
}

// observeClaim records another replica's claim of a block in one of the
// lanes; it reports whether key is such a claim.
func (a *ipAllocator) observeClaim(key string) bool {
	for i := range a.lanes {
		if a.lanes[i].claims.observe(key) {
			return true
		}
	}
	return false
}

// claimsOf returns the claims of the lane holding v4, an address it
// handed out.
func (a *ipAllocator) claimsOf(v4 netip.Addr) *claims {
	l, _ := a.laneOf(v4)
	return &l.claims
}

// leaveIfIn makes the lane holding v4 give up its blocks if v4 is in one
// of them.
func (a *ipAllocator) leaveIfIn(v4 netip.Addr) {
	l, off := a.laneOf(v4)
	if l == nil {
		return
	}
	c := &l.claims
	in := func(seq uint64) bool { start, end := l.bounds(seq); return off >= start && off < end }
	if c.owned && in(c.seq) || c.hasAhead && in(c.ahead) {
		c.leave()
	}
}

// leave makes every lane give up its blocks.
func (a *ipAllocator) leave() {
	for i := range a.lanes {
		a.lanes[i].claims.leave()
	}
}

// isReservedV4 excludes the addresses Tailscale clients use themselves
// (100.100.100.100 for MagicDNS and the 100.100.100.0/24 service range).
func isReservedV4(a netip.Addr) bool { return reservedV4.Contains(a) }

var reservedV4 = netip.MustParsePrefix("100.100.100.0/24")
