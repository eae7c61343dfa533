// Package netmap turns tailnet state and the compiled policy into what each
// connected client receives: a full map on connect, then deltas. It runs
// the fan-out: change events are coalesced for a short window, the policy
// is recompiled only when a change can alter it, and each affected session
// gets one merged update built from shared, encode-once pieces.
package netmap

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/dnstype"
	"tailscale.com/types/opt"

	"github.com/tailplane/tailplane/internal/metrics"
	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/session"
	"github.com/tailplane/tailplane/internal/state"
)

// Static is the part of every map that does not depend on the node.
type Static struct {
	DERPMap     *tailcfg.DERPMap
	BaseDomain  string
	MagicDNS    bool
	Nameservers []string
}

// Options configures an Engine.
type Options struct {
	State  *state.State
	Static Static
	Logger *slog.Logger
	// Window is how long changes are collected before a fan-out.
	Window time.Duration
}

// Engine owns the published view of the tailnet and the sessions.
type Engine struct {
	st     *state.State
	static Static
	log    *slog.Logger
	window time.Duration // base coalescing window; grows while batches are slow

	inMu        sync.Mutex
	dirty       map[uint64]struct{}
	policyDirty bool
	usersDirty  bool
	wake        chan struct{}

	// mu guards the view and sessions. It is held while computing, never
	// across network I/O: sessions write from their own goroutines.
	mu       sync.Mutex
	nodes    map[uint64]*state.Node
	users    map[uint64]*state.User
	pol      *policy.Policy
	compiled *policy.Compiled
	enc      map[uint64]*peerEnc
	classEnc map[classKey]*classEnc
	sessions map[uint64]*sessState
	dnsJSON  json.RawMessage
	derpJSON json.RawMessage
}

// classKey names a cached filter encoding: a class, or one node of a class
// whose filter names the node's own addresses.
type classKey struct {
	class int
	node  uint64
}

// classEnc caches what all nodes of one identity class share.
type classEnc struct {
	filter json.RawMessage
	ssh    json.RawMessage
}

// sessState is what the engine last sent to one session.
type sessState struct {
	s        *session.Session
	self     *state.Node
	selfJSON json.RawMessage
	sent     map[uint64]sentPeer
	filter   json.RawMessage
	ssh      json.RawMessage
	profiles map[tailcfg.UserID]bool
}

type sentPeer struct {
	node    *state.Node
	enc     *encoded
	allowed []netip.Prefix
	primary []netip.Prefix
}

// New builds an engine over the current state and subscribes it to changes.
func New(opts Options) *Engine {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	e := &Engine{
		st: opts.State, static: opts.Static, log: log, window: opts.Window,
		dirty: map[uint64]struct{}{}, wake: make(chan struct{}, 1),
		nodes: map[uint64]*state.Node{}, users: map[uint64]*state.User{},
		enc: map[uint64]*peerEnc{}, classEnc: map[classKey]*classEnc{}, sessions: map[uint64]*sessState{},
	}
	if e.window <= 0 {
		e.window = 10 * time.Millisecond
	}
	dns := &tailcfg.DNSConfig{Domains: []string{e.static.BaseDomain}, Proxied: e.static.MagicDNS}
	for _, ns := range e.static.Nameservers {
		dns.Resolvers = append(dns.Resolvers, resolver(ns))
	}
	e.dnsJSON, _ = json.Marshal(dns)
	e.derpJSON, _ = json.Marshal(e.static.DERPMap)

	for _, u := range e.st.Users() {
		e.users[u.ID] = u
	}
	for _, n := range e.st.Nodes() {
		e.nodes[n.ID] = n
	}
	e.pol, _ = e.st.Policy()
	e.recompileLocked()
	e.st.Subscribe(e)
	return e
}

// Notify implements state.Sink.
func (e *Engine) Notify(ev state.Event) {
	e.inMu.Lock()
	switch ev.Kind {
	case state.NodeChanged:
		e.dirty[ev.NodeID] = struct{}{}
	case state.PolicyChanged:
		e.policyDirty = true
	case state.UsersChanged:
		e.usersDirty = true
	}
	e.inMu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// maxWindow bounds the adaptive coalescing window.
const maxWindow = 500 * time.Millisecond

// Run processes change batches until ctx ends.
func (e *Engine) Run(ctx context.Context) {
	window := e.window
	for {
		select {
		case <-ctx.Done():
			return
		case <-e.wake:
		}
		// Coalesce: let the rest of a burst arrive, then take it all. When
		// batches are slow, wait longer so fewer, larger batches share the
		// recompilation and diffing.
		t := time.NewTimer(window)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		e.inMu.Lock()
		dirty, pol, users := e.dirty, e.policyDirty, e.usersDirty
		e.dirty, e.policyDirty, e.usersDirty = map[uint64]struct{}{}, false, false
		e.inMu.Unlock()
		began := time.Now()
		e.process(dirty, pol, users)
		window = min(e.window+time.Since(began)/2, maxWindow)
	}
}

// process applies one coalesced batch of changes and pushes updates.
//
// Most batches are incremental: nodes joined or left, or changed only
// what peers can be patched with. Then the policy is recompiled (its cost
// is per identity class, not per node) and each session learns only about
// the nodes in the batch, through a class-level visibility check. A batch
// that changes the policy, users, or a node's identity (user, tags,
// addresses, routes) may change any pair's visibility, so every session's
// view is diffed.
func (e *Engine) process(dirty map[uint64]struct{}, policyChanged, usersChanged bool) {
	start := time.Now()
	metrics.ChangeBatch.Observe(float64(len(dirty) + btoi(policyChanged) + btoi(usersChanged)))
	e.mu.Lock()
	defer e.mu.Unlock()

	full := policyChanged || usersChanged
	var added, removed, soft []uint64
	for id := range dirty {
		cur := e.st.Node(id)
		prev := e.nodes[id]
		switch {
		case cur == nil && prev == nil:
			continue
		case cur == nil:
			delete(e.nodes, id)
			delete(e.enc, id)
			if ss := e.sessions[id]; ss != nil {
				ss.s.Close()
				delete(e.sessions, id)
			}
			removed = append(removed, id)
			full = full || hasRoutes(prev)
		case prev == nil:
			e.nodes[id] = cur
			added = append(added, id)
			full = full || hasRoutes(cur)
		default:
			e.nodes[id] = cur
			if policyRelevantChange(prev, cur) {
				full = true
			}
			soft = append(soft, id)
		}
	}
	if usersChanged {
		clear(e.users)
		for _, u := range e.st.Users() {
			e.users[u.ID] = u
		}
	}
	if policyChanged {
		e.pol, _ = e.st.Policy()
	}
	membership := len(added) > 0 || len(removed) > 0
	if full || membership {
		e.recompileLocked()
	}
	for _, ss := range e.sessions {
		var u *session.Update
		if full {
			u = e.refreshAllLocked(ss)
		} else {
			u = e.refreshIncrementalLocked(ss, added, removed, soft, membership)
		}
		if u != nil {
			ss.s.Push(u)
		}
	}
	metrics.DeltaSeconds.Observe(time.Since(start).Seconds())
}

// hasRoutes reports whether a node carries routes: adding or removing a
// router can change which router is primary for other viewers.
func hasRoutes(n *state.Node) bool { return len(n.ApprovedRoutes) > 0 }

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// policyRelevantChange reports whether a node change can alter what the
// policy compiles: its identity, addresses or routes.
func policyRelevantChange(a, b *state.Node) bool {
	return a.UserID != b.UserID || !equalStrings(a.Tags, b.Tags) || a.IPv4 != b.IPv4 || a.IPv6 != b.IPv6 ||
		!equalPrefixes(a.ApprovedRoutes, b.ApprovedRoutes) || !equalPrefixes(a.AdvertisedRoutes, b.AdvertisedRoutes) ||
		a.Hostname != b.Hostname
}

func (e *Engine) recompileLocked() {
	start := time.Now()
	users := make([]policy.User, 0, len(e.users))
	for _, u := range e.users {
		users = append(users, state.PolicyUser(u))
	}
	nodes := make([]policy.Node, 0, len(e.nodes))
	for _, n := range e.nodes {
		nodes = append(nodes, state.PolicyNode(n))
	}
	c, err := e.pol.Compile(users, nodes)
	metrics.CompileSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		// The policy was checked when set; a tailnet change that makes it
		// fail to compile keeps the last good compilation in force.
		e.log.Error("policy compile failed; keeping the previous compilation", "err", err)
		if e.compiled != nil {
			return
		}
		c, _ = policy.Default().Compile(users, nodes)
	}
	e.compiled = c
	clear(e.classEnc)
}

func (e *Engine) classEncLocked(nodeID uint64) *classEnc {
	cl := classKey{class: e.compiled.ClassOf(nodeID)}
	if !e.compiled.FilterShared(nodeID) {
		cl.node = nodeID
	}
	ce := e.classEnc[cl]
	if ce == nil {
		filter := e.compiled.Filter(nodeID)
		if filter == nil {
			filter = []tailcfg.FilterRule{}
		}
		ce = &classEnc{}
		ce.filter, _ = json.Marshal(filter)
		ssh := e.compiled.SSHPolicy(nodeID)
		if ssh == nil {
			ssh = &tailcfg.SSHPolicy{}
		}
		ce.ssh, _ = json.Marshal(ssh)
		e.classEnc[cl] = ce
	}
	return ce
}

// Attach registers a new streaming session and queues its full map. A
// previous session of the same node is closed: the newest stream wins.
func (e *Engine) Attach(s *session.Session) bool {
	e.catchUp(s.NodeID)
	e.mu.Lock()
	defer e.mu.Unlock()
	n := e.nodes[s.NodeID]
	if n == nil {
		return false
	}
	if old := e.sessions[s.NodeID]; old != nil {
		old.s.Close()
	}
	ss := &sessState{s: s, sent: map[uint64]sentPeer{}, profiles: map[tailcfg.UserID]bool{}}
	e.sessions[s.NodeID] = ss
	full := e.fullMapLocked(ss, n)
	metrics.Sessions.Set(float64(len(e.sessions)))
	s.Push(&session.Update{Full: full})
	return true
}

// Detach removes a session that ended. It reports whether it was the
// node's current session (false when a newer stream replaced it).
func (e *Engine) Detach(s *session.Session) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	ss := e.sessions[s.NodeID]
	if ss == nil || ss.s != s {
		return false
	}
	delete(e.sessions, s.NodeID)
	metrics.Sessions.Set(float64(len(e.sessions)))
	return true
}

// FullMap builds a one-shot map for a non-streaming request.
func (e *Engine) FullMap(nodeID uint64) ([]byte, bool) {
	e.catchUp(nodeID)
	e.mu.Lock()
	defer e.mu.Unlock()
	n := e.nodes[nodeID]
	if n == nil {
		return nil, false
	}
	ss := &sessState{sent: map[uint64]sentPeer{}, profiles: map[tailcfg.UserID]bool{}}
	return e.fullMapLocked(ss, n), true
}

// catchUp publishes a node the fan-out has not processed yet: a client
// that just registered asks for its map before the coalescing window ends.
func (e *Engine) catchUp(nodeID uint64) {
	e.mu.Lock()
	known := e.nodes[nodeID] != nil
	e.mu.Unlock()
	if !known && e.st.Node(nodeID) != nil {
		e.process(map[uint64]struct{}{nodeID: {}}, false, false)
	}
}

// wireFull mirrors tailcfg.MapResponse for a complete map, with shared
// pieces spliced in as raw JSON.
type wireFull struct {
	KeepAlive       bool                       `json:",omitempty"`
	Node            json.RawMessage            `json:",omitempty"`
	DERPMap         json.RawMessage            `json:",omitempty"`
	Peers           []json.RawMessage          `json:",omitempty"`
	DNSConfig       json.RawMessage            `json:",omitempty"`
	Domain          string                     `json:",omitempty"`
	CollectServices opt.Bool                   `json:",omitempty"`
	PacketFilters   map[string]json.RawMessage `json:",omitempty"`
	UserProfiles    []tailcfg.UserProfile      `json:",omitempty"`
	SSHPolicy       json.RawMessage            `json:",omitempty"`
	ControlTime     *time.Time                 `json:",omitempty"`
}

func (e *Engine) fullMapLocked(ss *sessState, n *state.Node) []byte {
	ce := e.classEncLocked(n.ID)
	now := time.Now().UTC()
	m := wireFull{
		Node:            e.selfJSONLocked(n),
		DERPMap:         e.derpJSON,
		DNSConfig:       e.dnsJSON,
		Domain:          e.static.BaseDomain,
		CollectServices: opt.False,
		PacketFilters:   map[string]json.RawMessage{"*": nil, "base": ce.filter},
		SSHPolicy:       ce.ssh,
		ControlTime:     &now,
	}
	ss.self, ss.selfJSON, ss.filter, ss.ssh = n, m.Node, ce.filter, ce.ssh
	e.addProfileLocked(ss, ownerID(n), &m.UserProfiles)
	for _, p := range e.compiled.Peers(n.ID) {
		pn := e.nodes[p.ID]
		if pn == nil {
			continue
		}
		enc := e.peerJSON(pn, p.AllowedIPs, p.PrimaryRoutes)
		ss.sent[p.ID] = sentPeer{node: pn, enc: enc, allowed: p.AllowedIPs, primary: p.PrimaryRoutes}
		m.Peers = append(m.Peers, enc.full)
		e.addProfileLocked(ss, ownerID(pn), &m.UserProfiles)
	}
	// Peers come from the compiler in id order; the protocol requires it.
	b, _ := json.Marshal(&m)
	return b
}

func (e *Engine) addProfileLocked(ss *sessState, uid tailcfg.UserID, out *[]tailcfg.UserProfile) {
	if ss.profiles[uid] {
		return
	}
	ss.profiles[uid] = true
	if uid == TaggedUserID {
		*out = append(*out, taggedProfile)
		return
	}
	if u := e.users[uint64(uid)]; u != nil {
		*out = append(*out, profileOf(u))
	}
}

func (e *Engine) selfJSONLocked(n *state.Node) json.RawMessage {
	tn := e.tailNode(n, peerFields{})
	// Whether a node is online is news for its peers, not for itself.
	tn.PrimaryRoutes, tn.Online, tn.LastSeen = nil, nil, nil
	tn.CapMap = e.compiled.CapMap(n.ID)
	b, _ := json.Marshal(tn)
	return b
}

// selfChangeLocked returns the session's own node if what it would see of
// itself changed, else nil.
func (e *Engine) selfChangeLocked(ss *sessState, n *state.Node) json.RawMessage {
	if n == nil || n == ss.self {
		return nil
	}
	ss.self = n
	b := e.selfJSONLocked(n)
	if bytes.Equal(b, ss.selfJSON) {
		return nil
	}
	ss.selfJSON = b
	return b
}

// refreshAllLocked diffs everything a session sees after a structural
// change (policy, membership, identities).
func (e *Engine) refreshAllLocked(ss *sessState) *session.Update {
	n := e.nodes[ss.s.NodeID]
	if n == nil {
		return nil
	}
	u := &session.Update{}
	u.Self = e.selfChangeLocked(ss, n)
	ce := e.classEncLocked(n.ID)
	if !bytes.Equal(ce.filter, ss.filter) {
		u.PacketFilters = map[string]json.RawMessage{"*": nil, "base": ce.filter}
		ss.filter = ce.filter
	}
	if !bytes.Equal(ce.ssh, ss.ssh) {
		u.SSHPolicy = ce.ssh
		ss.ssh = ce.ssh
	}
	var profiles []tailcfg.UserProfile
	seen := make(map[uint64]struct{}, len(ss.sent))
	for _, p := range e.compiled.Peers(n.ID) {
		pn := e.nodes[p.ID]
		if pn == nil {
			continue
		}
		seen[p.ID] = struct{}{}
		e.diffPeerLocked(ss, u, pn, p.AllowedIPs, p.PrimaryRoutes)
		e.addProfileLocked(ss, ownerID(pn), &profiles)
	}
	for id := range ss.sent {
		if _, ok := seen[id]; !ok {
			if u.PeersRemoved == nil {
				u.PeersRemoved = map[uint64]struct{}{}
			}
			u.PeersRemoved[id] = struct{}{}
			delete(ss.sent, id)
		}
	}
	e.profilesInto(u, profiles)
	if u.Self == nil && u.PacketFilters == nil && u.SSHPolicy == nil && len(u.PeersChanged) == 0 &&
		len(u.PeersRemoved) == 0 && len(u.Patches) == 0 && len(u.UserProfiles) == 0 {
		return nil
	}
	return u
}

// refreshIncrementalLocked applies a batch without identity changes to
// one session: joined nodes it may see, left nodes it saw, patches for
// changed peers, and its own filter if membership changed the sources.
func (e *Engine) refreshIncrementalLocked(ss *sessState, added, removed, soft []uint64, membership bool) *session.Update {
	u := &session.Update{}
	me := ss.s.NodeID
	if membership {
		if n := e.nodes[me]; n != nil {
			ce := e.classEncLocked(n.ID)
			if !bytes.Equal(ce.filter, ss.filter) {
				u.PacketFilters = map[string]json.RawMessage{"*": nil, "base": ce.filter}
				ss.filter = ce.filter
			}
			if !bytes.Equal(ce.ssh, ss.ssh) {
				u.SSHPolicy = ce.ssh
				ss.ssh = ce.ssh
			}
		}
	}
	var profiles []tailcfg.UserProfile
	for _, id := range added {
		p, ok := e.compiled.PeerView(me, id)
		if !ok {
			continue
		}
		pn := e.nodes[id]
		e.diffPeerLocked(ss, u, pn, p.AllowedIPs, p.PrimaryRoutes)
		e.addProfileLocked(ss, ownerID(pn), &profiles)
	}
	e.profilesInto(u, profiles)
	for _, id := range removed {
		if _, ok := ss.sent[id]; ok {
			delete(ss.sent, id)
			if u.PeersRemoved == nil {
				u.PeersRemoved = map[uint64]struct{}{}
			}
			u.PeersRemoved[id] = struct{}{}
		}
	}
	for _, id := range soft {
		if id == me {
			u.Self = e.selfChangeLocked(ss, e.nodes[id])
			continue
		}
		sp, ok := ss.sent[id]
		pn := e.nodes[id]
		if !ok || pn == nil || sp.node == pn {
			continue
		}
		// No identity change: the peer's allowed IPs are as before.
		e.diffPeerLocked(ss, u, pn, sp.allowed, sp.primary)
	}
	if u.Self == nil && u.PacketFilters == nil && u.SSHPolicy == nil && len(u.PeersChanged) == 0 &&
		len(u.PeersRemoved) == 0 && len(u.Patches) == 0 && len(u.UserProfiles) == 0 {
		return nil
	}
	return u
}

// diffPeerLocked adds to u what the session needs to learn about peer pn.
func (e *Engine) diffPeerLocked(ss *sessState, u *session.Update, pn *state.Node, allowed, primary []netip.Prefix) {
	enc := e.peerJSON(pn, allowed, primary)
	sp, had := ss.sent[pn.ID]
	ss.sent[pn.ID] = sentPeer{node: pn, enc: enc, allowed: allowed, primary: primary}
	if had && sp.enc == enc {
		return
	}
	if had && bytes.Equal(sp.enc.fingerprint, enc.fingerprint) {
		if bytes.Equal(sp.enc.full, enc.full) {
			return
		}
		if u.Patches == nil {
			u.Patches = map[uint64]*tailcfg.PeerChange{}
		}
		u.Patches[pn.ID] = patchFor(sp.node, pn)
		return
	}
	if u.PeersChanged == nil {
		u.PeersChanged = map[uint64]json.RawMessage{}
	}
	u.PeersChanged[pn.ID] = enc.full
}

func (e *Engine) profilesInto(u *session.Update, ps []tailcfg.UserProfile) {
	for _, p := range ps {
		b, _ := json.Marshal(p)
		if u.UserProfiles == nil {
			u.UserProfiles = map[uint64]json.RawMessage{}
		}
		u.UserProfiles[uint64(p.ID)] = b
	}
}

func resolver(addr string) *dnstype.Resolver { return &dnstype.Resolver{Addr: addr} }

func equalStrings(a, b []string) bool        { return slices.Equal(a, b) }
func equalPrefixes(a, b []netip.Prefix) bool { return slices.Equal(a, b) }
