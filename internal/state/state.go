// Package state holds the tailnet (users, nodes, pre-auth keys and the
// policy) in memory, applies every change there first, makes it durable
// through the store before acknowledging it, and reports which nodes
// changed to a Sink. Reads never touch the database.
package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/store"
)

// User is a tailnet user.
type User struct {
	ID          uint64
	Name        string
	Email       string
	DisplayName string
	CreatedAt   time.Time
}

// LoginName is how policies name the user: the email when set, otherwise
// "name@".
func (u *User) LoginName() string {
	if u.Email != "" {
		return u.Email
	}
	return u.Name + "@"
}

// Node is a registered machine. Values are never modified once published:
// a change replaces the pointer, so readers may keep one without locking.
type Node struct {
	ID               uint64
	MachineKey       key.MachinePublic
	NodeKey          key.NodePublic
	DiscoKey         key.DiscoPublic
	UserID           uint64
	Tags             []string
	Hostname         string
	GivenName        string
	IPv4             netip.Addr
	IPv6             netip.Addr
	Hostinfo         *tailcfg.Hostinfo
	Endpoints        []netip.AddrPort
	AuthKeyID        string
	Ephemeral        bool
	Expiry           time.Time
	AdvertisedRoutes []netip.Prefix
	ApprovedRoutes   []netip.Prefix
	CreatedAt        time.Time
	LastSeen         time.Time
	// Online: a streaming map session is open (or, after a restart,
	// was open when the previous process recorded it; see SetOnline).
	Online bool
	// Holder is the owner id (Owner) of the replica whose session the
	// node had when it was last written online; empty when offline.
	Holder string
}

// IsTagged reports whether the node is owned by tags rather than a user.
func (n *Node) IsTagged() bool { return len(n.Tags) > 0 }

// Expired reports whether the node's key expiry has passed.
func (n *Node) Expired(now time.Time) bool { return !n.Expiry.IsZero() && !now.Before(n.Expiry) }

// HomeDERP is the node's preferred DERP region, from its Hostinfo.
func (n *Node) HomeDERP() int {
	if n.Hostinfo != nil && n.Hostinfo.NetInfo != nil {
		return n.Hostinfo.NetInfo.PreferredDERP
	}
	return 0
}

func (n *Node) clone() *Node {
	c := *n
	return &c
}

// PreAuthKey is a pre-authentication key as kept in memory.
type PreAuthKey = store.PreAuthKey

// EventKind says what changed.
type EventKind int

const (
	// NodeChanged: the node was added, removed or modified; the receiver
	// compares with what it last saw.
	NodeChanged EventKind = iota
	// PolicyChanged: a new policy is active.
	PolicyChanged
	// UsersChanged: a user was renamed or changed.
	UsersChanged
)

// Event reports a committed change.
type Event struct {
	Kind   EventKind
	NodeID uint64
	// Foreign: another replica made the change (see Follow).
	Foreign bool
}

// Sink receives events. Notify must not block.
type Sink interface {
	Notify(Event)
}

// Options configures a State.
type Options struct {
	Store    store.Store
	V4Prefix netip.Prefix
	V6Prefix netip.Prefix
	Logger   *slog.Logger
	// OnCommit observes group commits (for metrics); may be nil.
	OnCommit CommitObserver
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// State is the in-memory tailnet.
type State struct {
	log    *slog.Logger
	now    func() time.Time
	commit *committer

	sinkMu sync.Mutex
	sinks  []Sink

	mu          sync.RWMutex
	users       map[uint64]*User
	usersByName map[string]*User
	nodes       map[uint64]*Node
	byNodeKey   map[key.NodePublic]*Node
	byMachine   map[key.MachinePublic]*Node
	givenNames  map[string]uint64
	keys        map[string]*PreAuthKey
	ips         *ipAllocator
	ids         *idAllocator
	// owner names this process in the claims it stores, for an operator
	// reading the settings table.
	owner string
	// background holds the claims made ahead (claimAhead), which Close
	// waits for; none starts once closing is set.
	background sync.WaitGroup
	closing    bool
	nextUserID uint64
	settings   map[string][]byte
	pol        *policy.Policy
	polText    []byte

	// followMu serializes catching up with other replicas (Follow);
	// seq is the last change-log entry in memory.
	followMu sync.Mutex
	follower Follower
	seq      int64
	// keyCatchUp is when (unix nanos) an unknown key last made the state
	// catch up (catchUpForKey).
	keyCatchUp atomic.Int64
}

// Setting keys kept in the store.
const (
	SettingPolicy   = "policy"
	SettingNoiseKey = "noise_private_key"
	SettingNextIPv4 = "ipalloc_next_v4"
	// SettingNextIPv4Tagged is the cursor of tagged nodes' addresses.
	SettingNextIPv4Tagged = "ipalloc_next_v4_tagged"
)

// New loads the whole state from the store.
func New(ctx context.Context, opts Options) (*State, error) {
	snap, err := opts.Store.Load(ctx)
	if err != nil {
		return nil, fmt.Errorf("state: load: %w", err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	s := &State{
		log:         log,
		now:         now,
		users:       map[uint64]*User{},
		usersByName: map[string]*User{},
		nodes:       map[uint64]*Node{},
		byNodeKey:   map[key.NodePublic]*Node{},
		byMachine:   map[key.MachinePublic]*Node{},
		givenNames:  map[string]uint64{},
		keys:        map[string]*PreAuthKey{},
		nextUserID:  1,
		owner:       fmt.Sprintf("%016x", rand.Uint64()),
		settings:    snap.Settings,
		seq:         snap.ChangeSeq,
	}
	if s.settings == nil {
		s.settings = map[string][]byte{}
	}
	s.ips, err = newIPAllocator(opts.V4Prefix, opts.V6Prefix, s.settings)
	if err != nil {
		return nil, err
	}
	nextNodeID := uint64(1)
	for i := range snap.Users {
		u := fromStoreUser(&snap.Users[i])
		s.users[u.ID] = u
		s.usersByName[u.Name] = u
		s.nextUserID = max(s.nextUserID, u.ID+1)
	}
	for i := range snap.Nodes {
		n, err := fromStoreNode(&snap.Nodes[i])
		if err != nil {
			return nil, fmt.Errorf("state: load node %d: %w", snap.Nodes[i].ID, err)
		}
		s.indexNode(n)
		s.ips.markUsed(n.IPv4, n.IPv6)
		nextNodeID = max(nextNodeID, n.ID+1)
	}
	s.ids = newIDAllocator(nextNodeID, s.settings)
	for i := range snap.Keys {
		k := snap.Keys[i]
		s.keys[k.ID] = &k
	}
	s.pol = policy.Default()
	if text := s.settings[SettingPolicy]; len(text) > 0 {
		p, err := policy.Parse(text)
		if err != nil {
			// The stored policy was valid when set; a parser change may
			// reject it now. Keep serving with the default rather than
			// refusing to start, and say so loudly.
			log.Error("stored policy no longer parses; using the default allow-all policy until a valid one is set", "err", err)
		} else {
			s.pol, s.polText = p, text
		}
	}
	s.commit = newCommitter(opts.Store, log, opts.OnCommit)
	return s, nil
}

// Close stops the committer after flushing queued writes, and waits for
// the claims made ahead to end.
func (s *State) Close() {
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	s.commit.close()
	s.background.Wait()
}

// Subscribe adds a sink for change events.
func (s *State) Subscribe(k Sink) {
	s.sinkMu.Lock()
	s.sinks = append(s.sinks, k)
	s.sinkMu.Unlock()
}

func (s *State) emit(ev Event) {
	s.sinkMu.Lock()
	sinks := s.sinks
	s.sinkMu.Unlock()
	for _, k := range sinks {
		k.Notify(ev)
	}
}

// Setting returns a stored setting.
func (s *State) Setting(name string) []byte {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.settings[name]
}

// PutSetting stores a setting durably.
func (s *State) PutSetting(ctx context.Context, name string, value []byte) error {
	if err := s.putSetting(ctx, name, value, nil, false); err != nil {
		return fmt.Errorf("state: save setting %s: %w", name, err)
	}
	return nil
}

// SettingOrCreate returns the setting name, storing gen's value first if
// there is none. Among replicas starting together on an empty database,
// the first to store it wins and the others get its value: server keys
// must be the same on every replica.
func (s *State) SettingOrCreate(ctx context.Context, name string, gen func() ([]byte, error)) ([]byte, error) {
	if v := s.Setting(name); len(v) > 0 {
		return v, nil
	}
	v, err := gen()
	if err != nil {
		return nil, err
	}
	err = s.putSetting(ctx, name, v, nil, true)
	if errors.Is(err, store.ErrConflict) && s.following() {
		if err := s.CatchUp(ctx); err != nil {
			return nil, err
		}
		if v := s.Setting(name); len(v) > 0 {
			return v, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("state: create setting %s: %w", name, err)
	}
	return v, nil
}

// putSetting sets a setting in memory, with what else apply changes under
// the same lock, commits it (create: only if no replica stored it first),
// and undoes both if the commit fails. Memory changes first, as for every
// command, so that another replica's older write cannot land over it while
// it commits (see ownWrites).
func (s *State) putSetting(ctx context.Context, name string, value []byte, apply func(), create bool) error {
	s.mu.Lock()
	old, had := s.settings[name]
	pol, polText := s.pol, s.polText
	s.settings[name] = value
	if apply != nil {
		apply()
	}
	muts := []store.Mutation{{PutSetting: &store.Setting{Key: name, Value: value}}}
	if create {
		muts = []store.Mutation{{CreateSetting: muts[0].PutSetting}}
	}
	s.commit.pend(muts)
	s.mu.Unlock()
	err := s.commit.commit(ctx, muts)
	if err != nil {
		s.mu.Lock()
		delete(s.settings, name)
		if had {
			s.settings[name] = old
		}
		if apply != nil {
			s.pol, s.polText = pol, polText
		}
		s.mu.Unlock()
	}
	return err
}

func (s *State) indexNode(n *Node) {
	s.nodes[n.ID] = n
	s.byNodeKey[n.NodeKey] = n
	s.byMachine[n.MachineKey] = n
	s.givenNames[n.GivenName] = n.ID
}

// unindexNode removes n. A node another replica created with the same id
// meanwhile (see Follow) stays in s.nodes; the caller re-indexes it.
func (s *State) unindexNode(n *Node) {
	if s.nodes[n.ID] == n {
		delete(s.nodes, n.ID)
	}
	if cur, ok := s.byNodeKey[n.NodeKey]; ok && cur.ID == n.ID {
		delete(s.byNodeKey, n.NodeKey)
	}
	if cur, ok := s.byMachine[n.MachineKey]; ok && cur.ID == n.ID {
		delete(s.byMachine, n.MachineKey)
	}
	if s.givenNames[n.GivenName] == n.ID {
		delete(s.givenNames, n.GivenName)
	}
}

// replaceNode swaps in a new version of a node, keeping indexes right.
func (s *State) replaceNode(old, n *Node) {
	s.unindexNode(old)
	s.indexNode(n)
}

// Node returns the node with id, or nil.
func (s *State) Node(id uint64) *Node {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.nodes[id]
}

// NodeByKey returns the node with the node key, or nil.
func (s *State) NodeByKey(k key.NodePublic) *Node {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.byNodeKey[k]
}

// Nodes returns every node, sorted by ID.
func (s *State) Nodes() []*Node {
	s.mu.RLock()
	out := make([]*Node, 0, len(s.nodes))
	for _, n := range s.nodes {
		out = append(out, n)
	}
	s.mu.RUnlock()
	slices.SortFunc(out, func(a, b *Node) int { return cmpU64(a.ID, b.ID) })
	return out
}

// User returns the user with id, or nil.
func (s *State) User(id uint64) *User {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.users[id]
}

// Users returns every user, sorted by ID.
func (s *State) Users() []*User {
	s.mu.RLock()
	out := make([]*User, 0, len(s.users))
	for _, u := range s.users {
		out = append(out, u)
	}
	s.mu.RUnlock()
	slices.SortFunc(out, func(a, b *User) int { return cmpU64(a.ID, b.ID) })
	return out
}

// Policy returns the active policy and its source text (nil text: the
// built-in default).
func (s *State) Policy() (*policy.Policy, []byte) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.pol, s.polText
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func fromStoreUser(u *store.User) *User {
	return &User{ID: u.ID, Name: u.Name, Email: u.Email, DisplayName: u.DisplayName, CreatedAt: u.CreatedAt}
}

func toStoreUser(u *User) *store.User {
	return &store.User{ID: u.ID, Name: u.Name, Email: u.Email, DisplayName: u.DisplayName, CreatedAt: u.CreatedAt}
}

func fromStoreNode(sn *store.Node) (*Node, error) {
	n := new(Node)
	if err := decodeCore(n, sn); err != nil {
		return nil, err
	}
	if err := decodeParts(n, sn, store.NodeClient|store.NodeAdmin); err != nil {
		return nil, err
	}
	return n, nil
}

// decodeCore sets n's fields that only a whole write changes from sn.
func decodeCore(n *Node, sn *store.Node) error {
	n.ID, n.UserID, n.IPv4, n.IPv6 = sn.ID, sn.UserID, sn.IPv4, sn.IPv6
	n.AuthKeyID, n.Ephemeral, n.CreatedAt = sn.AuthKeyID, sn.Ephemeral, sn.CreatedAt
	if err := n.MachineKey.UnmarshalText([]byte(sn.MachineKey)); err != nil {
		return fmt.Errorf("machine key: %w", err)
	}
	if err := n.NodeKey.UnmarshalText([]byte(sn.NodeKey)); err != nil {
		return fmt.Errorf("node key: %w", err)
	}
	return nil
}

// decodeParts sets n's fields of the parts p from sn (see store.NodePart).
func decodeParts(n *Node, sn *store.Node, p store.NodePart) error {
	if p&store.NodeClient != 0 {
		n.Hostname, n.Endpoints, n.AdvertisedRoutes = sn.Hostname, sn.Endpoints, sn.AdvertisedRoutes
		n.LastSeen, n.Online, n.Holder = sn.LastSeen, sn.Online, sn.Holder
		n.DiscoKey, n.Hostinfo = key.DiscoPublic{}, nil
		if sn.DiscoKey != "" {
			if err := n.DiscoKey.UnmarshalText([]byte(sn.DiscoKey)); err != nil {
				return fmt.Errorf("disco key: %w", err)
			}
		}
		if len(sn.Hostinfo) > 0 {
			n.Hostinfo = new(tailcfg.Hostinfo)
			if err := json.Unmarshal(sn.Hostinfo, n.Hostinfo); err != nil {
				return fmt.Errorf("hostinfo: %w", err)
			}
		}
	}
	if p&store.NodeAdmin != 0 {
		n.GivenName, n.Tags, n.ApprovedRoutes, n.Expiry = sn.GivenName, sn.Tags, sn.ApprovedRoutes, sn.Expiry
	}
	return nil
}

func toStoreNode(n *Node) *store.Node {
	sn := &store.Node{
		ID: n.ID, MachineKey: n.MachineKey.String(), NodeKey: n.NodeKey.String(),
		UserID: n.UserID, Tags: n.Tags, Hostname: n.Hostname, GivenName: n.GivenName,
		IPv4: n.IPv4, IPv6: n.IPv6, Endpoints: n.Endpoints, AuthKeyID: n.AuthKeyID,
		Ephemeral: n.Ephemeral, Expiry: n.Expiry, AdvertisedRoutes: n.AdvertisedRoutes,
		ApprovedRoutes: n.ApprovedRoutes, CreatedAt: n.CreatedAt, LastSeen: n.LastSeen,
		Online: n.Online, Holder: n.Holder,
	}
	if !n.DiscoKey.IsZero() {
		sn.DiscoKey = n.DiscoKey.String()
	}
	if n.Hostinfo != nil {
		sn.Hostinfo, _ = json.Marshal(n.Hostinfo)
	}
	return sn
}

// policyInputLocked converts the tailnet for the policy engine.
func (s *State) policyInputLocked() ([]policy.User, []policy.Node) {
	users := make([]policy.User, 0, len(s.users))
	for _, u := range s.users {
		users = append(users, PolicyUser(u))
	}
	nodes := make([]policy.Node, 0, len(s.nodes))
	for _, n := range s.nodes {
		nodes = append(nodes, PolicyNode(n))
	}
	return users, nodes
}

// PolicyUser converts a user for the policy engine.
func PolicyUser(u *User) policy.User {
	return policy.User{ID: u.ID, Name: u.Name, Email: u.Email}
}

// PolicyNode converts a node for the policy engine.
func PolicyNode(n *Node) policy.Node {
	return policy.Node{
		ID: n.ID, Hostname: n.Hostname, UserID: n.UserID, Tags: n.Tags,
		IPv4: n.IPv4, IPv6: n.IPv6,
		AdvertisedRoutes: n.AdvertisedRoutes, ApprovedRoutes: n.ApprovedRoutes,
	}
}

// policyUsersLocked lists the users for the policy engine's lookups.
func (s *State) policyUsersLocked() policy.Users {
	us := make(policy.Users, 0, len(s.users))
	for _, u := range s.users {
		us = append(us, PolicyUser(u))
	}
	return us
}

// Owner is this process's id among replicas: it names the process in the
// blocks it claims and as the holder of the nodes whose sessions it has.
func (s *State) Owner() string { return s.owner }

// StartOwnRanges makes the next registrations claim fresh blocks of node
// ids and addresses instead of continuing in the blocks the stored cursors
// point at: a replica starting beside running ones would otherwise share
// a block with the one that stored them.
func (s *State) StartOwnRanges() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ids.claims.leave()
	s.ips.leave()
}
