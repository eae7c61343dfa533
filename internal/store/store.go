// Package store persists tailplane's tailnet state. It decides nothing: the
// state package validates and orders changes, the store makes them durable.
//
// The whole state is loaded once at start (Load); after that every change
// reaches the store as a batch of mutations applied in one transaction
// (Apply), which is how concurrent registrations share one commit.
package store

import (
	"context"
	"errors"
	"net/netip"
	"time"
)

// ErrConflict is returned by Apply when a conditional mutation finds the row
// already changed (ConsumeKey) or already taken (CreateUser, CreateNode,
// CreateSetting): the whole batch is rolled back.
var ErrConflict = errors.New("store: conflicting change")

// ErrNotFound is returned when a mutation names a row that does not exist.
var ErrNotFound = errors.New("store: not found")

// ErrPruned is returned by ChangesSince when the change log no longer holds
// the entries after the requested seq: they were pruned. A follower that
// fell that far behind must reload the whole state.
var ErrPruned = errors.New("store: change log pruned")

// ErrNewerChange is returned by ChangesSince for an entry this version
// cannot apply: one that names a mutation or a field it does not know,
// written by a replica running a newer version.
var ErrNewerChange = errors.New("store: change written by a newer tailplane")

// User is a tailnet user.
type User struct {
	ID          uint64
	Name        string // unique login name, e.g. "alice"
	Email       string // optional; policies name users by email when set
	DisplayName string
	CreatedAt   time.Time
}

// Node is a registered machine. The change log holds it as JSON without
// its zero fields, so that a patch (NodePatch) records only its part.
type Node struct {
	ID         uint64           `json:",omitzero"`
	MachineKey string           `json:",omitzero"` // key.MachinePublic text form ("mkey:...")
	NodeKey    string           `json:",omitzero"` // key.NodePublic text form ("nodekey:...")
	DiscoKey   string           `json:",omitzero"` // key.DiscoPublic text form; may be empty
	UserID     uint64           `json:",omitzero"` // owner; for tagged nodes the user that registered it
	Tags       []string         `json:",omitzero"`
	Hostname   string           `json:",omitzero"` // as reported by the client
	GivenName  string           `json:",omitzero"` // unique DNS label within the tailnet
	IPv4       netip.Addr       `json:",omitzero"`
	IPv6       netip.Addr       `json:",omitzero"`
	Hostinfo   []byte           `json:",omitzero"` // tailcfg.Hostinfo as JSON; may be nil
	Endpoints  []netip.AddrPort `json:",omitzero"`
	AuthKeyID  string           `json:",omitzero"` // pre-auth key used to register; may be empty
	Ephemeral  bool             `json:",omitzero"`
	Expiry     time.Time        `json:",omitzero"` // zero: never expires
	// AdvertisedRoutes are what the client asks for; ApprovedRoutes what an
	// admin or autoApprovers allowed.
	AdvertisedRoutes []netip.Prefix `json:",omitzero"`
	ApprovedRoutes   []netip.Prefix `json:",omitzero"`
	CreatedAt        time.Time      `json:",omitzero"`
	LastSeen         time.Time      `json:",omitzero"`
	// Online is whether the node had an open map stream when last
	// recorded. After a restart it is presumed still true for a while:
	// the clients of a restarted server are reconnecting, not gone.
	Online bool `json:",omitzero"`
	// Holder names the replica (its state's owner id) whose map stream
	// the node has while Online; empty when offline or not known. Other
	// replicas take over the presence of a crashed holder's nodes.
	Holder string `json:",omitzero"`
}

// NodePart names a set of a node's fields that one kind of writer owns.
// The rest of a node (its keys, owner, addresses, pre-auth key, creation
// time) changes only when the whole node is written, at registration.
type NodePart uint8

const (
	// NodeClient is what the node's client reports and its presence:
	// DiscoKey, Hostname, Hostinfo, Endpoints, AdvertisedRoutes, LastSeen,
	// Online and Holder.
	NodeClient NodePart = 1 << iota
	// NodeAdmin is what admin commands and policy decisions set:
	// GivenName, Tags, ApprovedRoutes and Expiry.
	NodeAdmin
)

// Copy copies the fields of the parts p names from src to dst.
func (p NodePart) Copy(dst, src *Node) {
	if p&NodeClient != 0 {
		dst.DiscoKey, dst.Hostname, dst.Hostinfo = src.DiscoKey, src.Hostname, src.Hostinfo
		dst.Endpoints, dst.AdvertisedRoutes = src.Endpoints, src.AdvertisedRoutes
		dst.LastSeen, dst.Online, dst.Holder = src.LastSeen, src.Online, src.Holder
	}
	if p&NodeAdmin != 0 {
		dst.GivenName, dst.Tags, dst.ApprovedRoutes, dst.Expiry = src.GivenName, src.Tags, src.ApprovedRoutes, src.Expiry
	}
}

// NodePatch is a write of some parts of a node: Node's ID and the fields
// of Part. Other fields are ignored and not recorded.
type NodePatch struct {
	Part NodePart
	Node Node
}

// PreAuthKey is a pre-authentication key. The secret itself is never
// stored, only its SHA-256.
type PreAuthKey struct {
	ID         string // public id, the part between "tpkey-auth-" and the secret
	SecretHash [32]byte
	UserID     uint64
	Reusable   bool
	Ephemeral  bool
	Tags       []string
	Expiration time.Time // zero: never
	CreatedAt  time.Time
	Used       bool // a one-off key that has been consumed
	Revoked    bool // expired by an admin
}

// Snapshot is everything the store holds, as read by Load.
type Snapshot struct {
	Users    []User
	Nodes    []Node
	Keys     []PreAuthKey
	Settings map[string][]byte
	// ChangeSeq is the newest change-log sequence number at load time.
	ChangeSeq int64
}

// Mutation is one change inside a batch. Exactly one field is set.
type Mutation struct {
	PutUser *User // insert or replace by ID
	// CreateUser inserts a new user; ErrConflict if a user with its ID or
	// name exists. Replicas allocate IDs on their own, so two can pick the
	// same one: creating fails where putting would overwrite the other's.
	CreateUser *User
	DeleteUser uint64 // by ID; fails with ErrNotFound if absent
	PutNode    *Node  // insert or replace by ID
	// CreateNode inserts a new node; ErrConflict if its ID, node key, given
	// name or an address is taken (see CreateUser).
	CreateNode *Node
	// UpdateNode replaces an existing node; ErrNotFound if absent. Unlike
	// PutNode it cannot bring back a node another replica deleted while
	// this one wrote it.
	UpdateNode *Node
	// PatchNode writes only the columns of its part of an existing node;
	// ErrNotFound if absent. Replicas write the parts of one node that
	// different actors own (its client, its admins) without undoing each
	// other's changes to the rest of the row.
	PatchNode  *NodePatch
	DeleteNode uint64 // by ID; fails with ErrNotFound if absent
	PutKey     *PreAuthKey
	// ConsumeKey marks a one-off key used; ErrConflict if it already was.
	// It is the atomic check-and-consume that stops two registrations (on
	// one replica or several) from both using a one-off key, so it also
	// conflicts when the key is revoked or reusable; ErrNotFound if absent.
	ConsumeKey string
	// PutSetting stores Value under Key (server keys, the policy, ...).
	PutSetting *Setting
	// CreateSetting stores a setting that must not exist yet;
	// ErrConflict if it does: replicas starting together on an empty
	// database each make server keys, and only the first may keep its.
	CreateSetting *Setting
}

// Setting is a named blob.
type Setting struct {
	Key   string
	Value []byte
}

// Change is one change-log entry: the mutations of one committed Apply
// batch. Replicas sharing a database replay the entries written by the others.
type Change struct {
	Seq       int64
	At        time.Time
	Mutations []Mutation
}

// Store is implemented by the sqlite and postgres packages; both pass the
// shared suite in package storetest.
type Store interface {
	// Load reads the whole state.
	Load(ctx context.Context) (*Snapshot, error)
	// Apply applies the mutations in order in one transaction, and appends
	// one change-log entry for the batch. On any error nothing is applied.
	// It returns the batch's change-log sequence number.
	Apply(ctx context.Context, muts []Mutation) (seq int64, err error)
	// Close releases the store's resources.
	Close() error
}
