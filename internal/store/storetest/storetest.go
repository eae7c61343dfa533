// Package storetest is the test suite every store.Store implementation
// passes. The sqlite and postgres packages run it from their tests.
package storetest

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tailplane/tailplane/internal/store"
)

// Opener opens the store under test. It returns a store on a database
// private to tb, empty on the first call; a second call with the same tb
// must open the same database again (the suite closes the first store
// before, to test what survives a restart). The suite closes every store it
// opens, some twice: Close must be idempotent.
type Opener func(tb testing.TB) store.Store

// ChangeLog is implemented by stores that expose their change log; the
// suite checks it when present.
type ChangeLog interface {
	ChangesSince(ctx context.Context, seq int64) ([]store.Change, error)
	PruneChanges(ctx context.Context, before time.Time) (int64, error)
}

// Run runs the suite against the stores open returns, each subtest on its
// own database.
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	o := func(tb testing.TB) store.Store { return open(tb.(*testing.T)) }
	for _, tc := range []struct {
		name string
		fn   func(*testing.T, Opener)
	}{
		{"RoundTrip", testRoundTrip},
		{"Replace", testReplace},
		{"BatchAtomicity", testBatchAtomicity},
		{"ConsumeKey", testConsumeKey},
		{"ConsumeKeyRace", testConsumeKeyRace},
		{"DeleteUser", testDeleteUser},
		{"Uniqueness", testUniqueness},
		{"Create", testCreate},
		{"PatchNode", testPatchNode},
		{"ChangeSeq", testChangeSeq},
		{"ChangeLog", testChangeLog},
		{"ConcurrentApply", testConcurrentApply},
		{"Reopen", testReopen},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t, o)
		})
	}
}

// openStore opens a store and closes it when the test ends.
func openStore(tb testing.TB, open Opener) store.Store {
	tb.Helper()
	s := open(tb)
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("close: %v", err)
		}
	})
	return s
}

func apply(tb testing.TB, s store.Store, muts ...store.Mutation) int64 {
	tb.Helper()
	seq, err := s.Apply(context.Background(), muts)
	if err != nil {
		tb.Fatalf("Apply: %v", err)
	}
	return seq
}

func load(tb testing.TB, s store.Store) *store.Snapshot {
	tb.Helper()
	snap, err := s.Load(context.Background())
	if err != nil {
		tb.Fatalf("Load: %v", err)
	}
	return snap
}

// User returns a user whose unique fields derive from id.
func User(id uint64) *store.User {
	return &store.User{ID: id, Name: fmt.Sprintf("user%d", id), CreatedAt: time.Unix(1700000000, 0).UTC()}
}

// Node returns a node of user whose unique fields (keys, given name,
// addresses) derive from id, which must be below 1<<22.
func Node(id, user uint64) *store.Node {
	if id >= 1<<22 {
		panic(fmt.Sprintf("storetest.Node: id %d does not fit in 100.64.0.0/10", id))
	}
	return &store.Node{
		ID:         id,
		MachineKey: fmt.Sprintf("mkey:%064x", id),
		NodeKey:    fmt.Sprintf("nodekey:%064x", id),
		UserID:     user,
		Hostname:   fmt.Sprintf("host%d", id),
		GivenName:  fmt.Sprintf("host%d", id),
		IPv4:       netip.AddrFrom4([4]byte{100, 64 + byte(id>>16), byte(id >> 8), byte(id)}),
		IPv6:       netip.AddrFrom16([16]byte{0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 13: byte(id >> 16), 14: byte(id >> 8), 15: byte(id)}),
		CreatedAt:  time.Unix(1700000000, 0).UTC(),
	}
}

func key(id string, user uint64, reusable bool) *store.PreAuthKey {
	return &store.PreAuthKey{ID: id, SecretHash: sha256.Sum256([]byte(id)), UserID: user, Reusable: reusable}
}

// want returns a deep copy of v in the form Load returns: times in UTC
// truncated to microseconds, empty slices nil.
func want[T any](v T) T {
	return normalized(reflect.ValueOf(v)).Interface().(T)
}

func normalized(v reflect.Value) reflect.Value {
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			return v
		}
		p := reflect.New(v.Type().Elem())
		p.Elem().Set(normalized(v.Elem()))
		return p
	case reflect.Struct:
		if t, ok := v.Interface().(time.Time); ok {
			if !t.IsZero() {
				t = t.UTC().Truncate(time.Microsecond)
			}
			return reflect.ValueOf(t)
		}
		out := reflect.New(v.Type()).Elem()
		out.Set(v)
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				out.Field(i).Set(normalized(v.Field(i)))
			}
		}
		return out
	case reflect.Slice:
		if v.Len() == 0 {
			return reflect.Zero(v.Type())
		}
		out := reflect.MakeSlice(v.Type(), v.Len(), v.Len())
		for i := range v.Len() {
			out.Index(i).Set(normalized(v.Index(i)))
		}
		return out
	case reflect.Map:
		if v.IsNil() {
			return v
		}
		out := reflect.MakeMapWithSize(v.Type(), v.Len())
		for _, k := range v.MapKeys() {
			out.SetMapIndex(k, normalized(v.MapIndex(k)))
		}
		return out
	}
	return v
}

func check[T any](tb testing.TB, what string, got, want T) {
	tb.Helper()
	if !reflect.DeepEqual(got, want) {
		tb.Errorf("%s:\n got %+v\nwant %+v", what, got, want)
	}
}

// assertState checks that the store holds exactly these users, nodes and
// keys (in ID order).
func assertState(tb testing.TB, s store.Store, users []store.User, nodes []store.Node, keys []store.PreAuthKey) {
	tb.Helper()
	snap := load(tb, s)
	check(tb, "users", snap.Users, want(users))
	check(tb, "nodes", snap.Nodes, want(nodes))
	check(tb, "keys", snap.Keys, want(keys))
}

func testRoundTrip(t *testing.T, open Opener) {
	s := openStore(t, open)
	// Nanoseconds and a non-UTC zone, which the store normalizes.
	zone := time.FixedZone("UTC+5:30", 5*3600+1800)
	ts := time.Date(2025, 3, 4, 5, 6, 7, 891234567, zone)
	users := []store.User{
		{ID: 1, Name: "alice", Email: "alice@example.com", DisplayName: "Alice Ä", CreatedAt: ts},
		{ID: 2, Name: "bob"},
		// IDs are uint64; the databases' integers are signed.
		{ID: 1 << 63, Name: "big", CreatedAt: time.Now()},
	}
	nodes := []store.Node{{
		ID:               7,
		MachineKey:       "mkey:1111",
		NodeKey:          "nodekey:2222",
		DiscoKey:         "discokey:3333",
		UserID:           1,
		Tags:             []string{"tag:server", "tag:prod"},
		Hostname:         "web-1",
		GivenName:        "web-1",
		IPv4:             netip.MustParseAddr("100.64.0.7"),
		IPv6:             netip.MustParseAddr("fd7a:115c:a1e0::7"),
		Hostinfo:         []byte(`{"OS": "linux",  "Hostname":"web-1"}`),
		Endpoints:        []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641"), netip.MustParseAddrPort("[2001:db8::1]:41641")},
		AuthKeyID:        "k1",
		Ephemeral:        true,
		Expiry:           ts.Add(time.Hour),
		AdvertisedRoutes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("::/0")},
		ApprovedRoutes:   []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")},
		CreatedAt:        ts,
		LastSeen:         ts.Add(time.Minute),
		Online:           true,
		Holder:           "replica-a",
	}, {
		// Everything optional unset, and empty slices that load as nil.
		ID:               8,
		MachineKey:       "mkey:4444",
		NodeKey:          "nodekey:5555",
		UserID:           2,
		Tags:             []string{},
		GivenName:        "bare",
		Hostinfo:         []byte{},
		Endpoints:        []netip.AddrPort{},
		AdvertisedRoutes: []netip.Prefix{},
	}}
	keys := []store.PreAuthKey{{
		ID:         "k1",
		SecretHash: sha256.Sum256([]byte("secret")),
		UserID:     1,
		Reusable:   true,
		Ephemeral:  true,
		Tags:       []string{"tag:server"},
		Expiration: ts.Add(24 * time.Hour),
		CreatedAt:  ts,
		Used:       true,
		Revoked:    true,
	}, {ID: "k2", UserID: 2, Tags: []string{}}}
	settings := map[string][]byte{"policy": []byte(`{"acls":[]}`), "noise-key": {0, 1, 2, 255}, "empty": {}}

	var muts []store.Mutation
	for i := range users {
		muts = append(muts, store.Mutation{PutUser: &users[i]})
	}
	for i := range nodes {
		muts = append(muts, store.Mutation{PutNode: &nodes[i]})
	}
	for i := range keys {
		muts = append(muts, store.Mutation{PutKey: &keys[i]})
	}
	for k, v := range settings {
		muts = append(muts, store.Mutation{PutSetting: &store.Setting{Key: k, Value: v}})
	}
	apply(t, s, muts...)

	// Load sorts by ID; the databases' signed integers put 1<<63 first.
	snap := load(t, s)
	check(t, "users", snap.Users, want([]store.User{users[2], users[0], users[1]}))
	check(t, "nodes", snap.Nodes, want(nodes))
	check(t, "keys", snap.Keys, want(keys))
	check(t, "settings", snap.Settings, want(settings))
	if snap.Nodes[1].Tags != nil || snap.Nodes[1].Hostinfo != nil || snap.Settings["empty"] != nil {
		t.Errorf("empty slices should load as nil: %+v %q", snap.Nodes[1], snap.Settings["empty"])
	}
	if got := snap.Users[1].CreatedAt; got.Location() != time.UTC || got.Nanosecond() != 891234000 {
		t.Errorf("CreatedAt = %v, want UTC with microseconds", got)
	}
}

func testReplace(t *testing.T, open Opener) {
	s := openStore(t, open)
	u, n, k := User(1), Node(1, 1), key("k", 1, false)
	apply(t, s, store.Mutation{PutUser: u}, store.Mutation{PutNode: n}, store.Mutation{PutKey: k},
		store.Mutation{PutSetting: &store.Setting{Key: "a", Value: []byte("1")}})

	u2, n2, k2 := *u, *n, *k
	u2.Email = "u@example.com"
	n2.IPv4 = netip.MustParseAddr("100.100.100.100")
	n2.IPv6 = netip.Addr{}
	n2.Tags = []string{"tag:x"}
	n2.LastSeen = time.Now()
	n2.Online = !n.Online
	n2.Holder = ""
	k2.Revoked = true
	apply(t, s, store.Mutation{PutUser: &u2}, store.Mutation{PutNode: &n2}, store.Mutation{PutKey: &k2},
		store.Mutation{PutSetting: &store.Setting{Key: "a", Value: []byte("2")}})
	assertState(t, s, []store.User{u2}, []store.Node{n2}, []store.PreAuthKey{k2})
	check(t, "settings", load(t, s).Settings, map[string][]byte{"a": []byte("2")})
}

func testBatchAtomicity(t *testing.T, open Opener) {
	s := openStore(t, open)
	ctx := context.Background()
	used := key("used", 1, false)
	used.Used = true
	seq := apply(t, s, store.Mutation{PutUser: User(1)}, store.Mutation{PutUser: User(3)},
		store.Mutation{PutKey: used})

	for _, tc := range []struct {
		name string
		last store.Mutation
		err  error
	}{
		{"DeleteNode missing", store.Mutation{DeleteNode: 99}, store.ErrNotFound},
		{"DeleteUser missing", store.Mutation{DeleteUser: 99}, store.ErrNotFound},
		{"ConsumeKey missing", store.Mutation{ConsumeKey: "nope"}, store.ErrNotFound},
		{"ConsumeKey used", store.Mutation{ConsumeKey: "used"}, store.ErrConflict},
	} {
		// Earlier mutations of every kind succeed, then the last one fails.
		_, err := s.Apply(ctx, []store.Mutation{
			{PutUser: User(2)},
			{PutNode: Node(1, 2)},
			{PutKey: key("new", 2, false)},
			{PutSetting: &store.Setting{Key: "s", Value: []byte("v")}},
			{DeleteUser: 3},
			tc.last,
		})
		if !errors.Is(err, tc.err) {
			t.Errorf("%s: Apply error = %v, want %v", tc.name, err, tc.err)
		}
	}
	snap := load(t, s)
	check(t, "users", snap.Users, want([]store.User{*User(1), *User(3)}))
	check(t, "nodes", snap.Nodes, nil)
	check(t, "keys", snap.Keys, want([]store.PreAuthKey{*used}))
	check(t, "settings", snap.Settings, map[string][]byte{})
	check(t, "change seq", snap.ChangeSeq, seq)
}

func testConsumeKey(t *testing.T, open Opener) {
	s := openStore(t, open)
	ctx := context.Background()
	revoked := key("revoked", 1, false)
	revoked.Revoked = true
	apply(t, s, store.Mutation{PutUser: User(1)}, store.Mutation{PutKey: key("once", 1, false)},
		store.Mutation{PutKey: key("reusable", 1, true)}, store.Mutation{PutKey: revoked})

	apply(t, s, store.Mutation{ConsumeKey: "once"})
	for _, id := range []string{"once", "reusable", "revoked"} {
		if _, err := s.Apply(ctx, []store.Mutation{{ConsumeKey: id}}); !errors.Is(err, store.ErrConflict) {
			t.Errorf("ConsumeKey %s: error = %v, want ErrConflict", id, err)
		}
	}
	once := key("once", 1, false)
	once.Used = true
	check(t, "keys", load(t, s).Keys, want([]store.PreAuthKey{*once, *key("reusable", 1, true), *revoked}))
}

func testConsumeKeyRace(t *testing.T, open Opener) {
	s := openStore(t, open)
	const keys, racers = 5, 8
	muts := []store.Mutation{{PutUser: User(1)}}
	for i := range keys {
		muts = append(muts, store.Mutation{PutKey: key(fmt.Sprint(i), 1, false)})
	}
	apply(t, s, muts...)

	for i := range keys {
		var wg sync.WaitGroup
		errs := make([]error, racers)
		start := make(chan struct{})
		for r := range racers {
			wg.Go(func() {
				<-start
				// Each racer also registers a node, as a registration would.
				_, errs[r] = s.Apply(context.Background(), []store.Mutation{
					{ConsumeKey: fmt.Sprint(i)},
					{PutNode: Node(uint64(i*racers+r+1), 1)},
				})
			})
		}
		close(start)
		wg.Wait()
		wins := 0
		for _, err := range errs {
			switch {
			case err == nil:
				wins++
			case !errors.Is(err, store.ErrConflict):
				t.Errorf("key %d: unexpected error %v", i, err)
			}
		}
		if wins != 1 {
			t.Errorf("key %d: %d racers consumed it, want 1", i, wins)
		}
	}
	if n := len(load(t, s).Nodes); n != keys {
		t.Errorf("%d nodes registered, want %d", n, keys)
	}
}

func testDeleteUser(t *testing.T, open Opener) {
	s := openStore(t, open)
	ctx := context.Background()
	apply(t, s, store.Mutation{PutUser: User(1)}, store.Mutation{PutUser: User(2)},
		store.Mutation{PutKey: key("k1", 1, false)}, store.Mutation{PutKey: key("k2", 2, false)},
		store.Mutation{PutNode: Node(1, 1)})

	// A user who still owns nodes stays.
	_, err := s.Apply(ctx, []store.Mutation{{DeleteUser: 1}})
	if err == nil {
		t.Fatal("DeleteUser of a user with nodes succeeded")
	}
	assertState(t, s, []store.User{*User(1), *User(2)}, []store.Node{*Node(1, 1)},
		[]store.PreAuthKey{*key("k1", 1, false), *key("k2", 2, false)})

	// Once the nodes are gone the user goes, with their keys.
	apply(t, s, store.Mutation{DeleteNode: 1}, store.Mutation{DeleteUser: 1})
	assertState(t, s, []store.User{*User(2)}, nil, []store.PreAuthKey{*key("k2", 2, false)})

	if _, err := s.Apply(ctx, []store.Mutation{{DeleteUser: 1}}); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("second DeleteUser: error = %v, want ErrNotFound", err)
	}
}

func testUniqueness(t *testing.T, open Opener) {
	s := openStore(t, open)
	ctx := context.Background()
	apply(t, s, store.Mutation{PutUser: User(1)}, store.Mutation{PutNode: Node(1, 1)})

	clash := func(f func(n *store.Node)) *store.Node {
		n := Node(2, 1)
		f(n)
		return n
	}
	other := User(2)
	other.Name = User(1).Name
	for _, tc := range []struct {
		name string
		mut  store.Mutation
	}{
		{"node IPv4", store.Mutation{PutNode: clash(func(n *store.Node) { n.IPv4 = Node(1, 1).IPv4 })}},
		{"node IPv6", store.Mutation{PutNode: clash(func(n *store.Node) { n.IPv6 = Node(1, 1).IPv6 })}},
		{"node key", store.Mutation{PutNode: clash(func(n *store.Node) { n.NodeKey = Node(1, 1).NodeKey })}},
		{"given name", store.Mutation{PutNode: clash(func(n *store.Node) { n.GivenName = Node(1, 1).GivenName })}},
		{"node of missing user", store.Mutation{PutNode: Node(2, 9)}},
		{"user name", store.Mutation{PutUser: other}},
		{"key of missing user", store.Mutation{PutKey: key("k", 9, false)}},
	} {
		_, err := s.Apply(ctx, []store.Mutation{{PutSetting: &store.Setting{Key: "x"}}, tc.mut})
		t.Logf("%s: %v", tc.name, err)
		if err == nil {
			t.Errorf("%s: Apply succeeded", tc.name)
		} else if errors.Is(err, store.ErrNotFound) || errors.Is(err, store.ErrConflict) {
			t.Errorf("%s: error %v should be neither ErrNotFound nor ErrConflict", tc.name, err)
		}
	}
	// Unset addresses do not collide.
	n3 := Node(3, 1)
	n3.IPv4, n3.IPv6 = netip.Addr{}, netip.Addr{}
	n4 := Node(4, 1)
	n4.IPv4, n4.IPv6 = netip.Addr{}, netip.Addr{}
	apply(t, s, store.Mutation{PutNode: n3}, store.Mutation{PutNode: n4})

	assertState(t, s, []store.User{*User(1)}, []store.Node{*Node(1, 1), *n3, *n4}, nil)
	check(t, "settings", load(t, s).Settings, map[string][]byte{})
}

func testCreate(t *testing.T, open Opener) {
	s := openStore(t, open)
	ctx := context.Background()
	apply(t, s, store.Mutation{CreateUser: User(1)}, store.Mutation{CreateNode: Node(1, 1)},
		store.Mutation{CreateSetting: &store.Setting{Key: "made", Value: []byte("1")}})
	assertState(t, s, []store.User{*User(1)}, []store.Node{*Node(1, 1)}, nil)

	sameID := User(1)
	sameID.Name = "other"
	sameName := User(2)
	sameName.Name = User(1).Name
	// taken returns node 2 with one field of node 1.
	taken := func(f func(n *store.Node)) *store.Node {
		n := Node(2, 1)
		f(n)
		return n
	}
	for _, tc := range []struct {
		name string
		mut  store.Mutation
		err  error // nil: any error but ErrConflict
	}{
		{"user ID", store.Mutation{CreateUser: sameID}, store.ErrConflict},
		{"user name", store.Mutation{CreateUser: sameName}, store.ErrConflict},
		{"node ID", store.Mutation{CreateNode: taken(func(n *store.Node) { n.ID = 1 })}, store.ErrConflict},
		{"node key", store.Mutation{CreateNode: taken(func(n *store.Node) { n.NodeKey = Node(1, 1).NodeKey })}, store.ErrConflict},
		{"given name", store.Mutation{CreateNode: taken(func(n *store.Node) { n.GivenName = Node(1, 1).GivenName })}, store.ErrConflict},
		{"node IPv4", store.Mutation{CreateNode: taken(func(n *store.Node) { n.IPv4 = Node(1, 1).IPv4 })}, store.ErrConflict},
		{"node IPv6", store.Mutation{CreateNode: taken(func(n *store.Node) { n.IPv6 = Node(1, 1).IPv6 })}, store.ErrConflict},
		{"setting", store.Mutation{CreateSetting: &store.Setting{Key: "made", Value: []byte("2")}}, store.ErrConflict},
		// Only a taken row is a conflict.
		{"node of missing user", store.Mutation{CreateNode: Node(2, 9)}, nil},
	} {
		// The batch's first mutation is rolled back with the create.
		_, err := s.Apply(ctx, []store.Mutation{{PutSetting: &store.Setting{Key: "x"}}, tc.mut})
		t.Logf("%s: %v", tc.name, err)
		switch {
		case err == nil:
			t.Errorf("%s: Apply succeeded", tc.name)
		case tc.err != nil && !errors.Is(err, tc.err):
			t.Errorf("%s: error %v, want %v", tc.name, err, tc.err)
		case tc.err == nil && errors.Is(err, store.ErrConflict):
			t.Errorf("%s: error %v should not be ErrConflict", tc.name, err)
		case !strings.Contains(err.Error(), "mutation 1 (Create"):
			t.Errorf("%s: error %q does not name the mutation", tc.name, err)
		}
	}
	assertState(t, s, []store.User{*User(1)}, []store.Node{*Node(1, 1)}, nil)
	check(t, "settings", load(t, s).Settings, map[string][]byte{"made": []byte("1")})

	// PutNode still replaces.
	n := Node(1, 1)
	n.Hostname, n.Online = "renamed", true
	apply(t, s, store.Mutation{PutNode: n})
	assertState(t, s, []store.User{*User(1)}, []store.Node{*n}, nil)

	// UpdateNode replaces a node that exists, and brings back none.
	n.Hostname = "updated"
	apply(t, s, store.Mutation{UpdateNode: n})
	assertState(t, s, []store.User{*User(1)}, []store.Node{*n}, nil)
	gone := Node(2, 1)
	if _, err := s.Apply(ctx, []store.Mutation{{UpdateNode: gone}}); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("UpdateNode of a missing node: %v, want ErrNotFound", err)
	}
	assertState(t, s, []store.User{*User(1)}, []store.Node{*n}, nil)
}

// testPatchNode: a patch writes its part's columns and no other, so
// writers of different parts do not undo each other's changes.
func testPatchNode(t *testing.T, open Opener) {
	s := openStore(t, open)
	ctx := context.Background()
	n := Node(1, 1)
	n.Tags = []string{"tag:a"}
	n.Expiry = time.Unix(1800000000, 0).UTC()
	apply(t, s, store.Mutation{PutUser: User(1)}, store.Mutation{CreateNode: n})

	// Every field of the patch's node differs from the stored one.
	other := Node(2, 2)
	other.ID = 1
	other.DiscoKey = fmt.Sprintf("discokey:%064x", 2)
	other.Hostinfo = []byte(`{"Hostname":"moved"}`)
	other.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")}
	other.AdvertisedRoutes = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	other.ApprovedRoutes = other.AdvertisedRoutes
	other.Tags = []string{"tag:b"}
	other.Expiry = time.Unix(1900000000, 0).UTC()
	other.LastSeen = time.Unix(1850000000, 0).UTC()
	other.Online, other.Holder = true, "replica-2"
	other.AuthKeyID, other.Ephemeral = "k2", true

	expect := *n
	seqs := map[store.NodePart]int64{}
	for _, part := range []store.NodePart{store.NodeClient, store.NodeAdmin} {
		seqs[part] = apply(t, s, store.Mutation{PatchNode: &store.NodePatch{Part: part, Node: *other}})
		part.Copy(&expect, other)
		assertState(t, s, []store.User{*User(1)}, []store.Node{expect}, nil)
	}
	if expect.NodeKey == other.NodeKey || expect.IPv4 == other.IPv4 || expect.Ephemeral {
		t.Fatal("the patches wrote more than their parts")
	}

	// The change log records only what a patch wrote.
	if cl, ok := s.(ChangeLog); ok {
		changes, err := cl.ChangesSince(ctx, seqs[store.NodeClient]-1)
		if err != nil || len(changes) != 2 {
			t.Fatalf("ChangesSince = %d changes, %v; want the two patches", len(changes), err)
		}
		var logged store.Node
		logged.ID = 1
		store.NodeClient.Copy(&logged, other)
		check(t, "logged client patch", changes[0].Mutations,
			want([]store.Mutation{{PatchNode: &store.NodePatch{Part: store.NodeClient, Node: logged}}}))
	}

	for _, tc := range []struct {
		name string
		p    *store.NodePatch
		err  error
	}{
		{"missing node", &store.NodePatch{Part: store.NodeClient | store.NodeAdmin, Node: *Node(3, 1)}, store.ErrNotFound},
		{"no part", &store.NodePatch{Node: *n}, nil},
	} {
		_, err := s.Apply(ctx, []store.Mutation{{PatchNode: tc.p}})
		if err == nil || tc.err != nil && !errors.Is(err, tc.err) {
			t.Errorf("PatchNode of %s: error %v, want %v", tc.name, err, tc.err)
		}
	}
	assertState(t, s, []store.User{*User(1)}, []store.Node{expect}, nil)
}

func testChangeSeq(t *testing.T, open Opener) {
	s := openStore(t, open)
	if seq := load(t, s).ChangeSeq; seq != 0 {
		t.Errorf("empty store: ChangeSeq = %d, want 0", seq)
	}
	last := int64(0)
	for i := range 5 {
		seq := apply(t, s, store.Mutation{PutSetting: &store.Setting{Key: fmt.Sprint(i)}})
		if seq <= last {
			t.Errorf("Apply %d: seq %d after %d", i, seq, last)
		}
		last = seq
	}
	check(t, "ChangeSeq", load(t, s).ChangeSeq, last)
}

func testChangeLog(t *testing.T, open Opener) {
	s := openStore(t, open)
	cl, ok := s.(ChangeLog)
	if !ok {
		t.Skipf("%T has no change log", s)
	}
	ctx := context.Background()
	n := Node(1, 1)
	n.Tags = []string{}
	n.LastSeen = time.Now()
	created := Node(2, 2)
	created.Endpoints = []netip.AddrPort{}
	created.LastSeen = time.Now()
	batches := [][]store.Mutation{
		{{PutUser: User(1)}, {PutNode: n}, {PutKey: key("k", 1, false)},
			{CreateUser: User(2)}, {CreateNode: created}},
		{{ConsumeKey: "k"}, {PutSetting: &store.Setting{Key: "p", Value: []byte{1}}}},
		{{DeleteNode: 1}},
	}
	var seqs []int64
	for _, b := range batches {
		seqs = append(seqs, apply(t, s, b...))
	}
	before := time.Now()
	changes, err := cl.ChangesSince(ctx, 0)
	if err != nil {
		t.Fatalf("ChangesSince: %v", err)
	}
	if len(changes) != len(batches) {
		t.Fatalf("ChangesSince(0) returned %d changes, want %d", len(changes), len(batches))
	}
	for i, c := range changes {
		if c.Seq != seqs[i] {
			t.Errorf("change %d: seq %d, want %d", i, c.Seq, seqs[i])
		}
		if c.At.IsZero() || c.At.After(before) {
			t.Errorf("change %d: At = %v", i, c.At)
		}
		// The log holds the values as stored, as Load would return them.
		check(t, fmt.Sprintf("change %d", i), c.Mutations, want(batches[i]))
	}
	if tail, err := cl.ChangesSince(ctx, seqs[1]); err != nil || len(tail) != 1 || tail[0].Seq != seqs[2] {
		t.Errorf("ChangesSince(%d) = %+v, %v; want the last change", seqs[1], tail, err)
	}

	// Pruning goes by age: the entries applied before the cut-off go, the
	// later one stays. The sleeps keep the cut-off clear of the entries'
	// times, which the store keeps to the microsecond.
	time.Sleep(5 * time.Millisecond)
	cut := time.Now()
	time.Sleep(5 * time.Millisecond)
	seqs = append(seqs, apply(t, s, store.Mutation{PutSetting: &store.Setting{Key: "q"}}))
	if n, err := cl.PruneChanges(ctx, cut); err != nil || n != 3 {
		t.Errorf("PruneChanges(cut-off before the last change) = %d, %v; want 3", n, err)
	}
	assertPruned(t, cl, seqs[2], seqs[3:])
	// An earlier cut-off finds nothing left to prune, and the mark stays.
	if n, err := cl.PruneChanges(ctx, cut.Add(-time.Hour)); err != nil || n != 0 {
		t.Errorf("PruneChanges(earlier cut-off) = %d, %v; want 0", n, err)
	}
	assertPruned(t, cl, seqs[2], seqs[3:])

	// Pruning everything keeps the newest entry, so ChangeSeq holds.
	seqs = append(seqs, apply(t, s, store.Mutation{PutSetting: &store.Setting{Key: "r"}}))
	if n, err := cl.PruneChanges(ctx, time.Now().Add(time.Hour)); err != nil || n != 1 {
		t.Errorf("PruneChanges(cut-off after every change) = %d, %v; want 1", n, err)
	}
	assertPruned(t, cl, seqs[3], seqs[4:])
	check(t, "ChangeSeq after prune", load(t, s).ChangeSeq, seqs[4])
	if seq := apply(t, s, store.Mutation{DeleteUser: 1}); seq <= seqs[4] {
		t.Errorf("seq after prune %d, want > %d", seq, seqs[4])
	}
}

// assertPruned checks that the change log was pruned through seq through:
// reading from below it fails with store.ErrPruned, reading from it
// returns the entries rest.
func assertPruned(t *testing.T, cl ChangeLog, through int64, rest []int64) {
	t.Helper()
	ctx := context.Background()
	for _, seq := range []int64{0, through - 1} {
		if _, err := cl.ChangesSince(ctx, seq); !errors.Is(err, store.ErrPruned) {
			t.Errorf("ChangesSince(%d) after pruning through %d: error %v, want ErrPruned", seq, through, err)
		}
	}
	changes, err := cl.ChangesSince(ctx, through)
	if err != nil {
		t.Fatalf("ChangesSince(%d) after pruning through %d: %v", through, through, err)
	}
	var got []int64
	for _, c := range changes {
		got = append(got, c.Seq)
	}
	check(t, fmt.Sprintf("seqs after %d", through), got, rest)
}

func testConcurrentApply(t *testing.T, open Opener) {
	s := openStore(t, open)
	const workers, batches = 16, 10
	var wg sync.WaitGroup
	seqs := make(chan int64, workers*batches)
	for w := range workers {
		wg.Go(func() {
			for b := range batches {
				id := uint64(w*batches + b + 1)
				seq, err := s.Apply(context.Background(), []store.Mutation{
					{PutUser: User(id)},
					{PutNode: Node(id, id)},
					{PutSetting: &store.Setting{Key: fmt.Sprint(id), Value: []byte{byte(w)}}},
				})
				if err != nil {
					t.Errorf("worker %d batch %d: %v", w, b, err)
					return
				}
				seqs <- seq
			}
		})
	}
	wg.Wait()
	close(seqs)
	seen := map[int64]bool{}
	var maxSeq int64
	for seq := range seqs {
		if seen[seq] {
			t.Errorf("seq %d returned twice", seq)
		}
		seen[seq] = true
		maxSeq = max(maxSeq, seq)
	}
	snap := load(t, s)
	if len(snap.Users) != workers*batches || len(snap.Nodes) != workers*batches || len(snap.Settings) != workers*batches {
		t.Errorf("loaded %d users, %d nodes, %d settings; want %d each",
			len(snap.Users), len(snap.Nodes), len(snap.Settings), workers*batches)
	}
	check(t, "ChangeSeq", snap.ChangeSeq, maxSeq)
}

func testReopen(t *testing.T, open Opener) {
	s := openStore(t, open) // closed twice: Close must allow it
	n := Node(1, 1)
	n.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:1")}
	n.LastSeen = time.Now()
	apply(t, s, store.Mutation{PutUser: User(1)}, store.Mutation{PutNode: n},
		store.Mutation{PutKey: key("k", 1, false)})
	seq := apply(t, s, store.Mutation{ConsumeKey: "k"},
		store.Mutation{PutSetting: &store.Setting{Key: "policy", Value: []byte("{}")}})
	before := load(t, s)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	s = openStore(t, open)
	after := load(t, s)
	check(t, "snapshot after reopen", after, before)
	check(t, "ChangeSeq after reopen", after.ChangeSeq, seq)
	if next := apply(t, s, store.Mutation{DeleteNode: 1}); next <= seq {
		t.Errorf("seq after reopen %d, want > %d", next, seq)
	}
}
