package state

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/store"
)

// ErrNeedsAuthKey is returned to a client that registers without a key
// and is not already registered: tailplane has no interactive login.
var ErrNeedsAuthKey = errors.New("this server only accepts pre-auth keys: run 'tailscale up --login-server=URL --authkey=KEY' with a key from 'tailplane keys create'")

// ErrWrongMachine is returned when a node key is presented by a machine
// that does not own it.
var ErrWrongMachine = errors.New("node key is registered to a different machine")

// RegisterParams is a client's registration request.
type RegisterParams struct {
	MachineKey key.MachinePublic
	NodeKey    key.NodePublic
	OldNodeKey key.NodePublic
	AuthKey    string
	Hostinfo   *tailcfg.Hostinfo
	// Expiry is what the client asked for; a time in the past is a logout.
	Expiry time.Time
}

// RegisterResult is what the client is told.
type RegisterResult struct {
	Node *Node // nil after a logout that deleted an ephemeral node
	User *User
}

// Register admits a node: it validates the pre-auth key, consumes a
// one-off key in the same step, allocates addresses for a new node and
// makes it all durable before returning. Among replicas, a registration
// that clashes with another replica's (the same id, address or name, or
// the same one-off key) is tried again once this one has caught up.
func (s *State) Register(ctx context.Context, p RegisterParams) (*RegisterResult, error) {
	var res *RegisterResult
	retry := false
	err := s.retryConflict(ctx, func() error {
		var err error
		res, err = s.registerClaiming(ctx, p, retry)
		retry = true
		return err
	})
	if errors.Is(err, errKeyUnknown) && s.following() {
		// The key may be one another replica made a moment ago.
		s.catchUpForKey(ctx)
		res, err = s.registerClaiming(ctx, p, false)
	}
	return res, err
}

// registerClaiming is register, after claiming the blocks of ids and
// addresses it needs. Each claim gives a block with room, unless others
// fill it first (registrations of this process: each round lets one
// through), so the rounds are bounded only as a guard.
func (s *State) registerClaiming(ctx context.Context, p RegisterParams, retry bool) (*RegisterResult, error) {
	const rounds = 64
	for range rounds {
		res, err := s.register(ctx, p, retry)
		var need *errNeedBlock
		if !errors.As(err, &need) {
			return res, err
		}
		if err := s.claimBlock(ctx, need.c, false); err != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("state: no block with room after %d claims", rounds)
}

// errKeyUnknown is ErrKeyInvalid for a well-formed key whose id this
// replica does not know.
var errKeyUnknown = fmt.Errorf("%w", ErrKeyInvalid)

// keyCatchUpEvery bounds how often registrations presenting unknown keys
// make a replica read the change log: they come before the client has
// proven anything (DESIGN principle 8).
const keyCatchUpEvery = 50 * time.Millisecond

// catchUpForKey catches up with the other replicas for a registration
// that presented an unknown key, or, when one did so less than
// keyCatchUpEvery ago, waits for that catch-up to finish.
func (s *State) catchUpForKey(ctx context.Context) {
	now := time.Now().UnixNano()
	last := s.keyCatchUp.Load()
	if now-last < int64(keyCatchUpEvery) || !s.keyCatchUp.CompareAndSwap(last, now) {
		s.followMu.Lock() // a catch-up in progress ends first
		s.followMu.Unlock()
		return
	}
	if err := s.CatchUp(ctx); err != nil {
		s.log.Warn("catching up for an unknown pre-auth key failed", "err", err)
	}
}

// register is one attempt of Register; retry: an earlier one clashed with
// another replica's registration.
func (s *State) register(ctx context.Context, p RegisterParams, retry bool) (*RegisterResult, error) {
	now := s.now()
	s.mu.Lock()
	existing := s.byNodeKey[p.NodeKey]
	if existing == nil && !p.OldNodeKey.IsZero() {
		existing = s.byNodeKey[p.OldNodeKey]
	}
	if existing != nil && existing.MachineKey != p.MachineKey {
		s.mu.Unlock()
		return nil, ErrWrongMachine
	}

	if !p.Expiry.IsZero() && p.Expiry.Before(now) && existing != nil {
		return s.logoutLocked(ctx, existing, p.Expiry)
	}

	if p.AuthKey == "" {
		if existing == nil || existing.Expired(now) {
			s.mu.Unlock()
			return nil, ErrNeedsAuthKey
		}
		if existing.NodeKey == p.NodeKey {
			u := s.users[existing.UserID]
			s.mu.Unlock()
			return &RegisterResult{Node: existing, User: u}, nil
		}
		// Key rotation of a still-valid node: swap keys, keep the rest.
		n := existing.clone()
		n.NodeKey = p.NodeKey
		return s.putNodeLocked(ctx, existing, n, 0, nil, nil)
	}

	k, err := s.checkKeyLocked(p.AuthKey, now)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}
	u := s.users[k.UserID]
	if u == nil {
		s.mu.Unlock()
		return nil, fmt.Errorf("pre-auth key %s belongs to a deleted user", k.ID)
	}
	if existing == nil {
		existing = s.byMachine[p.MachineKey]
	}
	tags, err := s.tagsFor(k, u, p.Hostinfo)
	if err != nil {
		s.mu.Unlock()
		return nil, err
	}

	var n *Node
	var muts []store.Mutation
	if existing != nil {
		// Re-authentication of a known machine keeps its id, addresses
		// and name: they are what peers and DNS know it by.
		n = existing.clone()
	} else {
		id, err := s.ids.allocate(func(id uint64) bool { return s.nodes[id] != nil })
		if err != nil {
			s.mu.Unlock()
			return nil, err
		}
		v4, v6, cursor, err := s.ips.allocate(len(tags) > 0)
		if err != nil {
			s.ids.unallocate(id)
			s.mu.Unlock()
			return nil, err
		}
		s.claimAhead(&s.ids.claims)
		s.claimAhead(s.ips.claimsOf(v4))
		n = &Node{ID: id, MachineKey: p.MachineKey, IPv4: v4, IPv6: v6, CreatedAt: now}
		muts = append(muts, store.Mutation{PutSetting: &cursor})
	}
	n.NodeKey = p.NodeKey
	n.UserID = u.ID
	n.Tags = tags
	n.AuthKeyID = k.ID
	n.Ephemeral = k.Ephemeral
	n.Expiry = time.Time{}
	if !p.Expiry.IsZero() && p.Expiry.After(now) {
		n.Expiry = p.Expiry
	}
	s.applyHostinfoLocked(n, p.Hostinfo)
	if n.GivenName == "" {
		n.GivenName = s.uniqueNameLocked(n.Hostname, n.ID, retry)
	}
	var consumed *PreAuthKey
	if !k.Reusable {
		muts = append(muts, store.Mutation{ConsumeKey: k.ID})
		k.Used = true
		consumed = k
	}
	return s.putNodeLocked(ctx, existing, n, 0, muts, consumed)
}

// putNodeLocked installs n (replacing old; nil for a new node), commits it
// with extra mutations, and undoes the in-memory change if the commit
// fails. It unlocks s.mu. A new node is created and an old one updated,
// not upserted: a new one cannot overwrite a node another replica created
// with the same id, nor an update bring back one another replica deleted.
// An old node is written whole, or only its part when part is not 0 (see
// store.NodePart).
func (s *State) putNodeLocked(ctx context.Context, old, n *Node, part store.NodePart, extra []store.Mutation, consumed *PreAuthKey) (*RegisterResult, error) {
	var put store.Mutation
	switch {
	case old == nil:
		s.indexNode(n)
		put.CreateNode = toStoreNode(n)
	case part != 0:
		s.replaceNode(old, n)
		put.PatchNode = &store.NodePatch{Part: part, Node: *toStoreNode(n)}
	default:
		s.replaceNode(old, n)
		put.UpdateNode = toStoreNode(n)
	}
	u := s.users[n.UserID]
	muts := append(extra, put)
	s.commit.pend(muts)
	s.mu.Unlock()

	if err := s.commit.commit(ctx, muts); err != nil {
		s.mu.Lock()
		s.unindexNode(n)
		if old != nil {
			s.indexNode(old)
		} else {
			s.ips.release(n.IPv4, n.IPv6)
		}
		// Another replica's node that arrived meanwhile (it may be why
		// the commit failed) keeps its addresses and indexes.
		for _, o := range s.nodes {
			if o.IPv4 == n.IPv4 || o.IPv6 == n.IPv6 || o.ID == n.ID {
				s.indexNode(o)
				s.ips.markUsed(o.IPv4, o.IPv6)
			}
		}
		if consumed != nil {
			consumed.Used = false
		}
		s.mu.Unlock()
		return nil, fmt.Errorf("registration not saved: %w", err)
	}
	s.emit(Event{Kind: NodeChanged, NodeID: n.ID})
	return &RegisterResult{Node: n, User: u}, nil
}

// logoutLocked handles a client's logout: an ephemeral node is deleted,
// any other node's key is expired so it must log in again. It unlocks s.mu.
func (s *State) logoutLocked(ctx context.Context, n *Node, expiry time.Time) (*RegisterResult, error) {
	u := s.users[n.UserID]
	if n.Ephemeral {
		s.mu.Unlock()
		if err := s.DeleteNode(ctx, n.ID); err != nil {
			return nil, err
		}
		return &RegisterResult{User: u}, nil
	}
	c := n.clone()
	c.Expiry = expiry
	return s.putNodeLocked(ctx, n, c, store.NodeAdmin, nil, nil)
}

// checkKeyLocked validates a presented pre-auth key. It does no expensive
// work: one map lookup and one SHA-256 (DESIGN principle 7).
func (s *State) checkKeyLocked(presented string, now time.Time) (*PreAuthKey, error) {
	id, hash, ok := parseKey(presented)
	if !ok {
		return nil, ErrKeyInvalid
	}
	k := s.keys[id]
	if k == nil {
		return nil, errKeyUnknown
	}
	if !secretMatches(k.SecretHash, hash) {
		return nil, ErrKeyInvalid
	}
	if k.Revoked || (!k.Expiration.IsZero() && !now.Before(k.Expiration)) {
		return nil, ErrKeyExpired
	}
	if !k.Reusable && k.Used {
		return nil, ErrKeyUsed
	}
	return k, nil
}

// tagsFor decides a new node's tags: those of its key, plus tags the
// client requests (--advertise-tags) that the policy lets the key's user
// own.
func (s *State) tagsFor(k *PreAuthKey, u *User, hi *tailcfg.Hostinfo) ([]string, error) {
	tags := slices.Clone(k.Tags)
	if hi == nil {
		return tags, nil
	}
	for _, t := range hi.RequestTags {
		if slices.Contains(tags, t) {
			continue
		}
		if !strings.HasPrefix(t, "tag:") {
			return nil, fmt.Errorf("requested tag %q is not a tag (tags start with tag:)", t)
		}
		if !s.pol.MayOwnTag(PolicyUser(u), t) {
			return nil, fmt.Errorf("requested tag %s is not permitted: the policy's tagOwners do not let %s own it", t, u.LoginName())
		}
		tags = append(tags, t)
	}
	slices.Sort(tags)
	return tags, nil
}

// applyHostinfoLocked copies what the server keeps from a client's
// Hostinfo: its hostname and advertised routes, approving the routes the
// policy's autoApprovers allow.
func (s *State) applyHostinfoLocked(n *Node, hi *tailcfg.Hostinfo) {
	if hi == nil {
		return
	}
	n.Hostinfo = hi
	if hi.Hostname != "" {
		n.Hostname = hi.Hostname
	}
	n.AdvertisedRoutes = slices.Clone(hi.RoutableIPs)
	var approved []netip.Prefix
	for _, r := range n.AdvertisedRoutes {
		if slices.Contains(n.ApprovedRoutes, r) || s.pol.AutoApprove(PolicyNode(n), r, s.policyUsersLocked()) {
			approved = append(approved, r)
		}
	}
	n.ApprovedRoutes = approved
}

// uniqueNameLocked turns a hostname into a DNS label unique in the
// tailnet, adding -2, -3, ... on collision.
//
// Replicas registering nodes of one hostname at once take the same next
// suffix; a retry after such a clash (spread) starts at the node's id,
// which no other replica gives out, so that their retries do not clash
// again.
func (s *State) uniqueNameLocked(hostname string, id uint64, spread bool) string {
	base := dnsLabel(hostname)
	if base == "" {
		base = "node"
	}
	name, first := base, 2
	if spread {
		first = max(2, int(id))
	}
	for i := first; ; i++ {
		if owner, taken := s.givenNames[name]; !taken || owner == id {
			return name
		}
		suffix := "-" + strconv.Itoa(i)
		name = base
		if len(name)+len(suffix) > 63 {
			name = name[:63-len(suffix)]
		}
		name += suffix
	}
}

// dnsLabel lowercases s and keeps letters, digits and inner hyphens.
func dnsLabel(s string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case r == '-' || r == '_' || r == '.' || r == ' ':
			b.WriteByte('-')
		}
	}
	out := strings.Trim(b.String(), "-")
	if len(out) > 63 {
		out = strings.TrimRight(out[:63], "-")
	}
	return out
}
