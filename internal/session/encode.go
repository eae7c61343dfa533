package session

import (
	"encoding/json"
	"slices"
	"time"

	"tailscale.com/tailcfg"
)

// wireDelta mirrors the tailcfg.MapResponse fields a delta uses, with
// pre-encoded parts as raw JSON so shared encodings are spliced, not
// re-marshalled. Field names match tailcfg.MapResponse's JSON.
type wireDelta struct {
	Node              json.RawMessage            `json:",omitempty"`
	PeersChanged      []json.RawMessage          `json:",omitempty"`
	PeersRemoved      []tailcfg.NodeID           `json:",omitempty"`
	PeersChangedPatch []*tailcfg.PeerChange      `json:",omitempty"`
	OnlineChange      map[tailcfg.NodeID]bool    `json:",omitempty"`
	PacketFilters     map[string]json.RawMessage `json:",omitempty"`
	UserProfiles      []json.RawMessage          `json:",omitempty"`
	SSHPolicy         json.RawMessage            `json:",omitempty"`
	ControlTime       *time.Time                 `json:",omitempty"`
}

// Encode turns an update (without Full) into one delta message. Peers are
// sorted by id, as the protocol requires.
func Encode(u *Update) ([]byte, error) {
	var d wireDelta
	d.Node = u.Self
	for _, id := range sortedKeys(u.PeersChanged) {
		d.PeersChanged = append(d.PeersChanged, u.PeersChanged[id])
	}
	for _, id := range sortedKeys(u.PeersRemoved) {
		d.PeersRemoved = append(d.PeersRemoved, tailcfg.NodeID(id))
	}
	for _, id := range sortedKeys(u.Patches) {
		d.PeersChangedPatch = append(d.PeersChangedPatch, u.Patches[id])
	}
	if len(u.Online) > 0 {
		d.OnlineChange = make(map[tailcfg.NodeID]bool, len(u.Online))
		for id, on := range u.Online {
			d.OnlineChange[tailcfg.NodeID(id)] = on
		}
	}
	d.PacketFilters = u.PacketFilters
	for _, id := range sortedKeys(u.UserProfiles) {
		d.UserProfiles = append(d.UserProfiles, u.UserProfiles[id])
	}
	d.SSHPolicy = u.SSHPolicy
	return json.Marshal(&d)
}

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
