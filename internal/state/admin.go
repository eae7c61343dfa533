package state

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/store"
)

// ErrNotFound is returned for an unknown user, node or key.
var ErrNotFound = errors.New("not found")

var userNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// CreateUser adds a user. Names are lowercase letters, digits, '.', '_'
// and '-'; email is optional (policies then name the user "name@").
func (s *State) CreateUser(ctx context.Context, name, email string) (*User, error) {
	if !userNameRE.MatchString(name) {
		return nil, fmt.Errorf("invalid user name %q: use 1-63 lowercase letters, digits, '.', '_' or '-'", name)
	}
	if email != "" && !strings.Contains(email, "@") {
		return nil, fmt.Errorf("invalid email %q", email)
	}
	var u *User
	err := s.retryConflict(ctx, func() error {
		var err error
		u, err = s.createUser(ctx, name, email)
		return err
	})
	return u, err
}

// createUser is one attempt of CreateUser. The user is created, not
// upserted, so that it cannot overwrite one another replica created with
// the same id.
func (s *State) createUser(ctx context.Context, name, email string) (*User, error) {
	s.mu.Lock()
	if _, ok := s.usersByName[name]; ok {
		s.mu.Unlock()
		return nil, fmt.Errorf("user %q already exists", name)
	}
	u := &User{ID: s.nextUserID, Name: name, Email: email, CreatedAt: s.now().UTC()}
	s.nextUserID++
	s.users[u.ID] = u
	s.usersByName[name] = u
	muts := []store.Mutation{{CreateUser: toStoreUser(u)}}
	s.commit.pend(muts)
	s.mu.Unlock()
	if err := s.commit.commit(ctx, muts); err != nil {
		s.mu.Lock()
		if s.users[u.ID] == u {
			delete(s.users, u.ID)
		}
		if s.usersByName[name] == u {
			delete(s.usersByName, name)
		}
		s.mu.Unlock()
		return nil, fmt.Errorf("create user: %w", err)
	}
	s.emit(Event{Kind: UsersChanged})
	return u, nil
}

// UserByName returns the named user or ErrNotFound.
func (s *State) UserByName(name string) (*User, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	u := s.usersByName[name]
	if u == nil {
		return nil, fmt.Errorf("user %q: %w", name, ErrNotFound)
	}
	return u, nil
}

// RenameUser changes a user's name.
func (s *State) RenameUser(ctx context.Context, oldName, newName string) (*User, error) {
	if !userNameRE.MatchString(newName) {
		return nil, fmt.Errorf("invalid user name %q: use 1-63 lowercase letters, digits, '.', '_' or '-'", newName)
	}
	s.mu.Lock()
	old := s.usersByName[oldName]
	if old == nil {
		s.mu.Unlock()
		return nil, fmt.Errorf("user %q: %w", oldName, ErrNotFound)
	}
	if _, taken := s.usersByName[newName]; taken {
		s.mu.Unlock()
		return nil, fmt.Errorf("user %q already exists", newName)
	}
	u := *old
	u.Name = newName
	s.users[u.ID] = &u
	delete(s.usersByName, oldName)
	s.usersByName[newName] = &u
	muts := []store.Mutation{{PutUser: toStoreUser(&u)}}
	s.commit.pend(muts)
	s.mu.Unlock()
	if err := s.commit.commit(ctx, muts); err != nil {
		s.mu.Lock()
		s.users[u.ID] = old
		delete(s.usersByName, newName)
		s.usersByName[oldName] = old
		s.mu.Unlock()
		return nil, fmt.Errorf("rename user: %w", err)
	}
	s.emit(Event{Kind: UsersChanged})
	return &u, nil
}

// DeleteUser removes a user and its pre-auth keys. A user that still owns
// nodes is not deleted: the nodes must be deleted first, so no machine
// loses its owner silently.
func (s *State) DeleteUser(ctx context.Context, name string) error {
	s.mu.Lock()
	u := s.usersByName[name]
	if u == nil {
		s.mu.Unlock()
		return fmt.Errorf("user %q: %w", name, ErrNotFound)
	}
	var owned int
	for _, n := range s.nodes {
		if n.UserID == u.ID {
			owned++
		}
	}
	if owned > 0 {
		s.mu.Unlock()
		return fmt.Errorf("user %q still owns %d node(s): delete them first ('tailplane nodes list', 'tailplane nodes delete ID')", name, owned)
	}
	muts := []store.Mutation{}
	var removedKeys []*PreAuthKey
	for id, k := range s.keys {
		if k.UserID == u.ID {
			removedKeys = append(removedKeys, k)
			delete(s.keys, id)
		}
	}
	delete(s.users, u.ID)
	delete(s.usersByName, name)
	muts = append(muts, store.Mutation{DeleteUser: u.ID})
	s.commit.pend(muts)
	s.mu.Unlock()
	if err := s.commit.commit(ctx, muts); err != nil {
		s.mu.Lock()
		s.users[u.ID] = u
		s.usersByName[name] = u
		for _, k := range removedKeys {
			s.keys[k.ID] = k
		}
		s.mu.Unlock()
		return fmt.Errorf("delete user: %w", err)
	}
	s.emit(Event{Kind: UsersChanged})
	return nil
}

// KeyParams describes pre-auth keys to create.
type KeyParams struct {
	User       string
	Reusable   bool
	Ephemeral  bool
	Tags       []string
	Expiration time.Duration // 0: never expires
}

// CreatedKey is a new key with its secret, which is shown only once.
type CreatedKey struct {
	PreAuthKey
	Key string
}

// MaxKeysPerCall bounds one CreateKeys call.
const MaxKeysPerCall = 100000

// CreateKeys creates count keys in one transaction.
func (s *State) CreateKeys(ctx context.Context, p KeyParams, count int) ([]CreatedKey, error) {
	if count < 1 || count > MaxKeysPerCall {
		return nil, fmt.Errorf("key count %d out of range 1..%d", count, MaxKeysPerCall)
	}
	if p.Expiration < 0 {
		return nil, errors.New("expiration must not be negative")
	}
	for _, t := range p.Tags {
		if err := validateTag(t); err != nil {
			return nil, err
		}
	}
	u, err := s.UserByName(p.User)
	if err != nil {
		return nil, err
	}
	now := s.now().UTC()
	out := make([]CreatedKey, count)
	muts := make([]store.Mutation, count)
	for i := range out {
		id, hash, full := newKeySecret()
		k := PreAuthKey{ID: id, SecretHash: hash, UserID: u.ID, Reusable: p.Reusable, Ephemeral: p.Ephemeral,
			Tags: slices.Clone(p.Tags), CreatedAt: now}
		if p.Expiration > 0 {
			k.Expiration = now.Add(p.Expiration)
		}
		out[i] = CreatedKey{PreAuthKey: k, Key: full}
		muts[i] = store.Mutation{PutKey: &out[i].PreAuthKey}
	}
	// New random ids: no other replica writes them, so memory may follow
	// the commit.
	s.commit.pend(muts)
	if err := s.commit.commit(ctx, muts); err != nil {
		return nil, fmt.Errorf("create keys: %w", err)
	}
	s.mu.Lock()
	for i := range out {
		k := out[i].PreAuthKey
		s.keys[k.ID] = &k
	}
	s.mu.Unlock()
	return out, nil
}

// Keys returns copies of every pre-auth key, oldest first.
func (s *State) Keys() []PreAuthKey {
	s.mu.RLock()
	out := make([]PreAuthKey, 0, len(s.keys))
	for _, k := range s.keys {
		out = append(out, *k)
	}
	s.mu.RUnlock()
	slices.SortFunc(out, func(a, b PreAuthKey) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}

// ExpireKey revokes a key so it admits no further node. Nodes already
// registered with it stay.
func (s *State) ExpireKey(ctx context.Context, id string) error {
	id = strings.TrimPrefix(id, KeyPrefix)
	if i := strings.IndexByte(id, '-'); i >= 0 {
		id = id[:i] // accept the full key too
	}
	s.mu.Lock()
	k := s.keys[id]
	if k == nil {
		s.mu.Unlock()
		return fmt.Errorf("key %q: %w", id, ErrNotFound)
	}
	c := *k
	c.Revoked = true
	s.keys[id] = &c
	muts := []store.Mutation{{PutKey: &c}}
	s.commit.pend(muts)
	s.mu.Unlock()
	if err := s.commit.commit(ctx, muts); err != nil {
		s.mu.Lock()
		s.keys[id] = k
		s.mu.Unlock()
		return fmt.Errorf("expire key: %w", err)
	}
	return nil
}

// updateNode applies fn to a copy of node id and commits its admin part
// (store.NodeAdmin, the only fields fn may change) durably: another
// replica's concurrent write of the node's client part stands.
func (s *State) updateNode(ctx context.Context, id uint64, fn func(n *Node) error) (*Node, error) {
	s.mu.Lock()
	old := s.nodes[id]
	if old == nil {
		s.mu.Unlock()
		return nil, fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	n := old.clone()
	if err := fn(n); err != nil {
		s.mu.Unlock()
		return nil, err
	}
	res, err := s.putNodeLocked(ctx, old, n, store.NodeAdmin, nil, nil)
	if err != nil {
		return nil, err
	}
	return res.Node, nil
}

// DeleteNode removes a node; its peers are told it left.
func (s *State) DeleteNode(ctx context.Context, id uint64) error {
	s.mu.Lock()
	n := s.nodes[id]
	if n == nil {
		s.mu.Unlock()
		return fmt.Errorf("node %d: %w", id, ErrNotFound)
	}
	s.unindexNode(n)
	muts := []store.Mutation{{DeleteNode: id}}
	s.commit.pend(muts)
	s.mu.Unlock()
	if err := s.commit.commit(ctx, muts); err != nil {
		s.mu.Lock()
		s.indexNode(n)
		s.mu.Unlock()
		return fmt.Errorf("delete node: %w", err)
	}
	s.mu.Lock()
	s.ips.release(n.IPv4, n.IPv6)
	s.mu.Unlock()
	s.emit(Event{Kind: NodeChanged, NodeID: id})
	return nil
}

// ExpireNode sets a node's key expiry to now: the client must log in again.
func (s *State) ExpireNode(ctx context.Context, id uint64) (*Node, error) {
	now := s.now()
	return s.updateNode(ctx, id, func(n *Node) error { n.Expiry = now; return nil })
}

// RenameNode sets a node's DNS name.
func (s *State) RenameNode(ctx context.Context, id uint64, name string) (*Node, error) {
	label := dnsLabel(name)
	if label == "" || label != name {
		return nil, fmt.Errorf("invalid node name %q: use lowercase letters, digits and '-', at most 63", name)
	}
	return s.updateNode(ctx, id, func(n *Node) error {
		if owner, taken := s.givenNames[label]; taken && owner != id {
			return fmt.Errorf("name %q is already used by node %d", label, owner)
		}
		n.GivenName = label
		return nil
	})
}

// TagNode replaces a node's tags; an empty list makes it user-owned again.
func (s *State) TagNode(ctx context.Context, id uint64, tags []string) (*Node, error) {
	for _, t := range tags {
		if err := validateTag(t); err != nil {
			return nil, err
		}
	}
	tags = slices.Clone(tags)
	slices.Sort(tags)
	tags = slices.Compact(tags)
	return s.updateNode(ctx, id, func(n *Node) error { n.Tags = tags; return nil })
}

// ApproveRoutes sets a node's approved routes; each must be advertised.
func (s *State) ApproveRoutes(ctx context.Context, id uint64, routes []netip.Prefix) (*Node, error) {
	return s.updateNode(ctx, id, func(n *Node) error {
		for _, r := range routes {
			if !slices.Contains(n.AdvertisedRoutes, r) {
				return fmt.Errorf("route %s is not advertised by node %d (advertised: %v)", r, id, n.AdvertisedRoutes)
			}
		}
		n.ApprovedRoutes = slices.Clone(routes)
		return nil
	})
}

// ClientUpdate is what a non-streaming map request reports.
type ClientUpdate struct {
	Hostinfo  *tailcfg.Hostinfo
	Endpoints []netip.AddrPort
	DiscoKey  key.DiscoPublic
}

// UpdateFromClient records a client's endpoints, disco key and Hostinfo.
// It is soft state: written to the store without waiting, so a busy
// database never slows the client's map request.
func (s *State) UpdateFromClient(id uint64, u ClientUpdate) {
	s.mu.Lock()
	old := s.nodes[id]
	if old == nil {
		s.mu.Unlock()
		return
	}
	if (u.Endpoints == nil || slices.Equal(u.Endpoints, old.Endpoints)) &&
		(u.DiscoKey.IsZero() || u.DiscoKey == old.DiscoKey) &&
		(u.Hostinfo == nil || u.Hostinfo.Equal(old.Hostinfo)) {
		// Clients repeat these on every reconnect and periodically: a new
		// version of an unchanged node would still re-encode it for every
		// peer and invalidate the full-map chunk holding it.
		s.mu.Unlock()
		return
	}
	n := old.clone()
	if u.Endpoints != nil {
		n.Endpoints = u.Endpoints
	}
	if !u.DiscoKey.IsZero() {
		n.DiscoKey = u.DiscoKey
	}
	part := store.NodeClient
	if u.Hostinfo != nil {
		s.applyHostinfoLocked(n, u.Hostinfo)
		if !slices.Equal(n.ApprovedRoutes, old.ApprovedRoutes) {
			part |= store.NodeAdmin // routes it stopped advertising, or auto-approved ones
		}
	}
	s.replaceNode(old, n)
	muts := []store.Mutation{{PatchNode: &store.NodePatch{Part: part, Node: *toStoreNode(n)}}}
	s.commit.pend(muts)
	s.mu.Unlock()
	s.commit.commitAsync(muts)
	s.emit(Event{Kind: NodeChanged, NodeID: id})
}

// SetOnline records whether a node has an open map stream, its holder
// (this process, while online) and its last-seen time. They are soft
// state, written without waiting; the presence is kept so that a restarted
// server can presume its nodes still online while they reconnect, and the
// holder so that other replicas can take over a crashed one's nodes.
func (s *State) SetOnline(id uint64, online bool) {
	s.mu.Lock()
	old := s.nodes[id]
	switch {
	case old == nil, old.Online == online && !(online && s.following()):
		s.mu.Unlock()
		return
	case old.Online == online:
		// Among replicas a node coming online is written even when it
		// is marked online, with its last-seen time: the replica it
		// left may count it as its own, offline soon (see Follow).
		// Memory keeps its version, which differs only in that time:
		// a new one would re-encode the node for every peer, at every
		// reconnect of a restart storm.
		sn := toStoreNode(old)
		sn.LastSeen = s.now().UTC()
		sn.Holder = s.owner
		muts := []store.Mutation{{PatchNode: &store.NodePatch{Part: store.NodeClient, Node: *sn}}}
		s.commit.pend(muts)
		s.mu.Unlock()
		s.commit.commitAsync(muts)
		return
	}
	n := old.clone()
	n.Online = online
	n.LastSeen = s.now().UTC()
	n.Holder = ""
	if online {
		n.Holder = s.owner
	}
	s.replaceNode(old, n)
	muts := []store.Mutation{{PatchNode: &store.NodePatch{Part: store.NodeClient, Node: *toStoreNode(n)}}}
	s.commit.pend(muts)
	s.mu.Unlock()
	s.commit.commitAsync(muts)
	s.emit(Event{Kind: NodeChanged, NodeID: id})
}

// CheckPolicy parses text and runs its tests against the current tailnet
// without applying it.
func (s *State) CheckPolicy(text []byte) (*policy.Policy, error) {
	p, err := policy.Parse(text)
	if err != nil {
		return nil, err
	}
	s.mu.RLock()
	users, nodes := s.policyInputLocked()
	s.mu.RUnlock()
	if _, err := p.Compile(users, nodes); err != nil {
		return nil, err
	}
	if err := p.RunTests(users, nodes); err != nil {
		return nil, err
	}
	return p, nil
}

// SetPolicy validates and activates a policy and stores it. An invalid
// policy is refused and the active one stays in force.
func (s *State) SetPolicy(ctx context.Context, text []byte) error {
	p, err := s.CheckPolicy(text)
	if err != nil {
		return err
	}
	text = slices.Clone(text)
	if err := s.putSetting(ctx, SettingPolicy, text, func() { s.pol, s.polText = p, text }, false); err != nil {
		return fmt.Errorf("save policy: %w", err)
	}
	s.emit(Event{Kind: PolicyChanged})
	return nil
}
