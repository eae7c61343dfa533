package netmap

import (
	"encoding/json"
	"net/netip"
	"strconv"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/state"
)

// TaggedUserID is the user id tagged nodes are shown under, as Tailscale
// shows them as owned by "tagged-devices" rather than by whoever
// registered them.
const TaggedUserID = 2147455555

var taggedProfile = tailcfg.UserProfile{
	ID: TaggedUserID, LoginName: "tagged-devices", DisplayName: "Tagged Devices",
}

// ownerID is the user a node is shown under.
func ownerID(n *state.Node) tailcfg.UserID {
	if n.IsTagged() {
		return TaggedUserID
	}
	return tailcfg.UserID(n.UserID)
}

func profileOf(u *state.User) tailcfg.UserProfile {
	name := u.DisplayName
	if name == "" {
		name = u.Name
	}
	return tailcfg.UserProfile{ID: tailcfg.UserID(u.ID), LoginName: u.LoginName(), DisplayName: name}
}

// peerFields controls how a node is rendered.
type peerFields struct {
	allowed []netip.Prefix
	primary []netip.Prefix
	// patchable zeroes the fields a PeerChange patch can carry, to
	// fingerprint everything else.
	patchable bool
}

// tailNode renders n as a tailcfg.Node for a client. Peers do not see a
// node's NetInfo (it changes with every latency probe); they see its
// home DERP region.
func (e *Engine) tailNode(n *state.Node, f peerFields) *tailcfg.Node {
	addrs := []netip.Prefix{netip.PrefixFrom(n.IPv4, 32), netip.PrefixFrom(n.IPv6, 128)}
	allowed := f.allowed
	if allowed == nil {
		allowed = addrs
	}
	tn := &tailcfg.Node{
		ID:                tailcfg.NodeID(n.ID),
		StableID:          tailcfg.StableNodeID(strconv.FormatUint(n.ID, 10)),
		Name:              n.GivenName + "." + e.static.BaseDomain + ".",
		User:              ownerID(n),
		Key:               n.NodeKey,
		KeyExpiry:         n.Expiry,
		Machine:           n.MachineKey,
		DiscoKey:          n.DiscoKey,
		Addresses:         addrs,
		AllowedIPs:        allowed,
		Endpoints:         n.Endpoints,
		HomeDERP:          n.HomeDERP(),
		Created:           n.CreatedAt,
		Tags:              n.Tags,
		PrimaryRoutes:     f.primary,
		MachineAuthorized: true,
	}
	if n.Hostinfo != nil {
		hi := *n.Hostinfo
		hi.NetInfo = nil
		tn.Hostinfo = hi.View()
	}
	online := n.Online
	tn.Online = &online
	if !online && !n.LastSeen.IsZero() {
		ls := n.LastSeen
		tn.LastSeen = &ls
	}
	if f.patchable {
		tn.Endpoints, tn.HomeDERP, tn.Online, tn.LastSeen = nil, 0, nil, nil
		tn.DiscoKey = key.DiscoPublic{}
		tn.Key = key.NodePublic{}
		tn.KeyExpiry = time.Time{}
	}
	return tn
}

// peerEnc caches one node version's encodings, per allowed-IPs variant.
type peerEnc struct {
	variants map[string]*encoded // by allowed IPs and primary routes
	// own is the variant with just the node's addresses, and ownIPs the
	// last allowed-IPs slice it was asked with: the policy hands every
	// viewer the same read-only slice, so a pointer check finds it.
	// Comparing the prefixes for each of the 37 million peers of a
	// 15K-policy restart storm was 6% of its CPU.
	own    *encoded
	ownIPs []netip.Prefix
}

type encoded struct {
	full        json.RawMessage // the node as peers see it
	fingerprint json.RawMessage // the same with patchable fields zeroed
}

func prefixKey(ps []netip.Prefix) string {
	if len(ps) == 0 {
		return ""
	}
	b := make([]byte, 0, 24*len(ps))
	for _, p := range ps {
		b = p.AppendTo(b)
		b = append(b, ',')
	}
	return string(b)
}

// peerJSON returns the shared encoding of n as a peer, encoding it once
// per node version and allowed-IPs variant (DESIGN principle 4). The
// caller holds cacheMu, or holds viewMu exclusively (a batch).
func (e *Engine) peerJSON(n *state.Node, allowed, primary []netip.Prefix) *encoded {
	pe := e.enc[n]
	if pe == nil {
		pe = &peerEnc{}
		e.enc[n] = pe
	}
	own := len(primary) == 0 && len(allowed) == 2
	if own && pe.own != nil && &allowed[0] == &pe.ownIPs[0] {
		return pe.own
	}
	// Most peers are seen with just their own addresses: skip building a
	// key for them.
	own = own && isOwnAddrs(n, allowed)
	if own {
		if pe.own == nil {
			pe.own = e.encodePeer(n, allowed, primary)
		}
		pe.ownIPs = allowed
		return pe.own
	}
	k := prefixKey(allowed) + "|" + prefixKey(primary)
	v := pe.variants[k]
	if v == nil {
		if pe.variants == nil {
			pe.variants = map[string]*encoded{}
		}
		v = e.encodePeer(n, allowed, primary)
		pe.variants[k] = v
	}
	return v
}

func (e *Engine) encodePeer(n *state.Node, allowed, primary []netip.Prefix) *encoded {
	full, _ := json.Marshal(e.tailNode(n, peerFields{allowed: allowed, primary: primary}))
	fp, _ := json.Marshal(e.tailNode(n, peerFields{allowed: allowed, primary: primary, patchable: true}))
	return &encoded{full: full, fingerprint: fp}
}

func isOwnAddrs(n *state.Node, allowed []netip.Prefix) bool {
	return len(allowed) == 2 && allowed[0] == netip.PrefixFrom(n.IPv4, 32) && allowed[1] == netip.PrefixFrom(n.IPv6, 128)
}

// patchFor describes the patchable difference between two versions.
func patchFor(old, cur *state.Node) *tailcfg.PeerChange {
	pc := &tailcfg.PeerChange{NodeID: tailcfg.NodeID(cur.ID)}
	if cur.HomeDERP() != old.HomeDERP() {
		pc.DERPRegion = cur.HomeDERP()
	}
	if !equalAddrPorts(cur.Endpoints, old.Endpoints) {
		pc.Endpoints = cur.Endpoints
		if pc.Endpoints == nil {
			pc.Endpoints = []netip.AddrPort{}
		}
	}
	if cur.DiscoKey != old.DiscoKey {
		dk := cur.DiscoKey
		pc.DiscoKey = &dk
	}
	if cur.NodeKey != old.NodeKey {
		nk := cur.NodeKey
		pc.Key = &nk
	}
	if !cur.Expiry.Equal(old.Expiry) {
		ke := cur.Expiry
		pc.KeyExpiry = &ke
	}
	if cur.Online != old.Online {
		on := cur.Online
		pc.Online = &on
		if !on {
			ls := cur.LastSeen
			pc.LastSeen = &ls
		}
	}
	return pc
}

func equalAddrPorts(a, b []netip.AddrPort) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// UserProfile is how a user is shown to clients.
func UserProfile(u *state.User) tailcfg.UserProfile { return profileOf(u) }
