package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
)

// ipAllocator hands out node addresses. It walks the IPv4 prefix forward
// from a persisted cursor, so an address freed by a deleted node is not
// handed to a new node until the whole range has been used once; the
// IPv6 address carries the same offset inside the IPv6 prefix, so a node's
// pair is stable and unique together.
type ipAllocator struct {
	v4, v6 netip.Prefix
	used   map[netip.Addr]bool
	next   uint32 // offset within v4 of the next candidate
	size   uint32 // number of offsets in v4
}

func newIPAllocator(v4, v6 netip.Prefix, cursor []byte) (*ipAllocator, error) {
	if !v4.IsValid() || !v6.IsValid() {
		return nil, errors.New("state: address prefixes not set")
	}
	a := &ipAllocator{v4: v4, v6: v6, used: map[netip.Addr]bool{}, size: 1 << (32 - v4.Bits())}
	a.next = 1 // skip the network address
	if len(cursor) > 0 {
		n, err := strconv.ParseUint(string(cursor), 10, 32)
		if err != nil {
			return nil, fmt.Errorf("state: bad stored address cursor %q: %w", cursor, err)
		}
		a.next = uint32(n)
	}
	return a, nil
}

func (a *ipAllocator) markUsed(v4, v6 netip.Addr) {
	a.used[v4] = true
	a.used[v6] = true
}

func (a *ipAllocator) release(v4, v6 netip.Addr) {
	delete(a.used, v4)
	delete(a.used, v6)
}

// allocate returns a free pair and the cursor to persist with it.
func (a *ipAllocator) allocate() (v4, v6 netip.Addr, cursor []byte, err error) {
	base4 := binary.BigEndian.Uint32(a.v4.Addr().AsSlice())
	for range a.size {
		off := a.next
		a.next++
		if a.next >= a.size {
			a.next = 1
		}
		if off == 0 || off == a.size-1 {
			continue // network and broadcast-like addresses confuse people
		}
		var b4 [4]byte
		binary.BigEndian.PutUint32(b4[:], base4+off)
		cand4 := netip.AddrFrom4(b4)
		if isReservedV4(cand4) {
			continue
		}
		b16 := a.v6.Addr().As16()
		binary.BigEndian.PutUint32(b16[12:], binary.BigEndian.Uint32(b16[12:])+off)
		cand6 := netip.AddrFrom16(b16)
		if a.used[cand4] || a.used[cand6] {
			continue
		}
		a.markUsed(cand4, cand6)
		return cand4, cand6, []byte(strconv.FormatUint(uint64(a.next), 10)), nil
	}
	return netip.Addr{}, netip.Addr{}, nil, errors.New("state: address range exhausted")
}

// isReservedV4 excludes the addresses Tailscale clients use themselves
// (100.100.100.100 for MagicDNS and the 100.100.100.0/24 service range).
func isReservedV4(a netip.Addr) bool { return reservedV4.Contains(a) }

var reservedV4 = netip.MustParsePrefix("100.100.100.0/24")
