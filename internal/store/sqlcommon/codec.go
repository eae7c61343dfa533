package sqlcommon

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"net/netip"
	"time"

	"github.com/tailplane/tailplane/internal/store"
)

// The store keeps one canonical form of every value, the one Load returns:
// times in UTC at microsecond precision (what PostgreSQL keeps), the zero
// time as NULL, empty slices as nil. IDs are uint64 in memory and int64 in
// the database (neither has an unsigned 64-bit type); the conversion is a
// bit cast, so every ID round-trips.

// normalize returns m with its value in canonical form. It copies the
// pointed-to value, never modifying the caller's.
func normalize(m store.Mutation) store.Mutation {
	switch {
	case m.PutUser != nil:
		m.PutUser = normalizeUser(*m.PutUser)
	case m.CreateUser != nil:
		m.CreateUser = normalizeUser(*m.CreateUser)
	case m.PutNode != nil:
		m.PutNode = normalizeNode(*m.PutNode)
	case m.CreateNode != nil:
		m.CreateNode = normalizeNode(*m.CreateNode)
	case m.UpdateNode != nil:
		m.UpdateNode = normalizeNode(*m.UpdateNode)
	case m.PatchNode != nil:
		// Only the part's fields are kept, so the change log records
		// what the patch wrote and nothing a follower could mistake for
		// the rest of the row.
		var n store.Node
		n.ID = m.PatchNode.Node.ID
		m.PatchNode.Part.Copy(&n, &m.PatchNode.Node)
		m.PatchNode = &store.NodePatch{Part: m.PatchNode.Part, Node: *normalizeNode(n)}
	case m.PutKey != nil:
		k := *m.PutKey
		k.Tags = nilIfEmpty(k.Tags)
		k.Expiration = canonicalTime(k.Expiration)
		k.CreatedAt = canonicalTime(k.CreatedAt)
		m.PutKey = &k
	case m.PutSetting != nil:
		m.PutSetting = &store.Setting{Key: m.PutSetting.Key, Value: nilIfEmpty(m.PutSetting.Value)}
	case m.CreateSetting != nil:
		m.CreateSetting = &store.Setting{Key: m.CreateSetting.Key, Value: nilIfEmpty(m.CreateSetting.Value)}
	}
	return m
}

func normalizeUser(u store.User) *store.User {
	u.CreatedAt = canonicalTime(u.CreatedAt)
	return &u
}

func normalizeNode(n store.Node) *store.Node {
	n.Tags = nilIfEmpty(n.Tags)
	n.Hostinfo = nilIfEmpty(n.Hostinfo)
	n.Endpoints = nilIfEmpty(n.Endpoints)
	n.AdvertisedRoutes = nilIfEmpty(n.AdvertisedRoutes)
	n.ApprovedRoutes = nilIfEmpty(n.ApprovedRoutes)
	n.Expiry = canonicalTime(n.Expiry)
	n.CreatedAt = canonicalTime(n.CreatedAt)
	n.LastSeen = canonicalTime(n.LastSeen)
	return &n
}

func canonicalTime(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return t.UTC().Truncate(time.Microsecond)
}

func timeArg(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return canonicalTime(t)
}

func timeVal(t sql.NullTime) time.Time {
	if !t.Valid {
		return time.Time{}
	}
	return canonicalTime(t.Time)
}

// addrArg stores an address in its canonical text form, which is what the
// UNIQUE constraints on nodes.ipv4 and nodes.ipv6 compare; an unset address
// is NULL, which UNIQUE lets any number of nodes have.
func addrArg(a netip.Addr) any {
	if !a.IsValid() {
		return nil
	}
	return a.String()
}

func addrVal(s sql.NullString) (netip.Addr, error) {
	if !s.Valid {
		return netip.Addr{}, nil
	}
	return netip.ParseAddr(s.String)
}

func bytesArg(b []byte) any {
	if len(b) == 0 {
		return nil
	}
	return b
}

// listArg encodes a list column as a JSON array. Marshalling strings and
// netip values cannot fail, so an error here is a programming error.
func listArg[T string | netip.AddrPort | netip.Prefix](l []T) string {
	if len(l) == 0 {
		return "[]"
	}
	b, err := json.Marshal(l)
	if err != nil {
		panic(fmt.Sprintf("sqlcommon: encode %T: %v", l, err))
	}
	return string(b)
}

func listVal[T any](s string, l *[]T) error {
	if err := json.Unmarshal([]byte(s), l); err != nil {
		return fmt.Errorf("decode %T: %w", *l, err)
	}
	*l = nilIfEmpty(*l)
	return nil
}

func nilIfEmpty[S ~[]E, E any](s S) S {
	if len(s) == 0 {
		return nil
	}
	return s
}
