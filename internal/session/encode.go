package session

import (
	"slices"

	"tailscale.com/tailcfg"
)

// Encode turns an update (without Full) into one delta message, as parts.
// Field names are those of tailcfg.MapResponse; peers are sorted by id;
// pre-encoded values are spliced in unchanged.
func Encode(u *Update) ([]Part, error) {
	// Sized up front: growing the buffer while appending a few hundred
	// peers was a tenth of a join storm's memmove.
	size := 256 + len(u.Self) + len(u.SSHPolicy) + 16*len(u.PeersRemoved)
	if u.PeerChunks == nil {
		for _, p := range u.PeersChanged {
			size += len(p) + 1
		}
	}
	for _, p := range u.UserProfiles {
		size += len(p) + 1
	}
	patches := make([][]byte, 0, len(u.Patches))
	for _, id := range sortedKeys(u.Patches) {
		b, err := u.Patches[id].encoded()
		if err != nil {
			return nil, err
		}
		patches = append(patches, b)
		size += len(b) + 1
	}
	for k, ps := range u.PacketFilters {
		// Shared chunks are parts of their own; the builder goes on
		// in the same buffer after them.
		size += len(k) + 4
		for _, p := range ps {
			size += len(p.Raw)
		}
	}
	o := NewObj(make([]byte, 0, size))
	o.Raw("Node", u.Self)
	if len(u.PeerChunks) > 0 {
		o.key("PeersChanged")
		o.B = append(o.B, '[')
		for _, c := range u.PeerChunks {
			o.Chunk(c)
		}
		o.B = append(o.B, ']')
	} else if len(u.PeersChanged) > 0 {
		peers := make([][]byte, 0, len(u.PeersChanged))
		for _, id := range sortedKeys(u.PeersChanged) {
			peers = append(peers, u.PeersChanged[id])
		}
		o.RawList("PeersChanged", peers)
	}
	if len(u.PeersRemoved) > 0 {
		ids := make([]tailcfg.NodeID, 0, len(u.PeersRemoved))
		for _, id := range sortedKeys(u.PeersRemoved) {
			ids = append(ids, tailcfg.NodeID(id))
		}
		if err := o.Value("PeersRemoved", ids); err != nil {
			return nil, err
		}
	}
	o.RawList("PeersChangedPatch", patches)
	if len(u.Online) > 0 {
		m := make(map[tailcfg.NodeID]bool, len(u.Online))
		for id, on := range u.Online {
			m[tailcfg.NodeID(id)] = on
		}
		if err := o.Value("OnlineChange", m); err != nil {
			return nil, err
		}
	}
	if u.PacketFilters != nil {
		o.filterChunks(u.PacketFilters)
	}
	if len(u.UserProfiles) > 0 {
		ps := make([][]byte, 0, len(u.UserProfiles))
		for _, id := range sortedKeys(u.UserProfiles) {
			ps = append(ps, u.UserProfiles[id])
		}
		o.RawList("UserProfiles", ps)
	}
	o.Raw("SSHPolicy", u.SSHPolicy)
	return o.Parts(), nil
}

func sortStrings(s []string) { slices.Sort(s) }

func sortedKeys[V any](m map[uint64]V) []uint64 {
	if len(m) == 0 {
		return nil
	}
	ks := make([]uint64, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
