package state

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/sqlite"
)

// countingStore counts Apply calls and can be made to fail.
type countingStore struct {
	store.Store
	applies atomic.Int64
	fail    atomic.Bool
}

func (c *countingStore) Apply(ctx context.Context, m []store.Mutation) (int64, error) {
	c.applies.Add(1)
	if c.fail.Load() {
		return 0, errors.New("disk on fire")
	}
	return c.Store.Apply(ctx, m)
}

func openStore(t *testing.T, dir string) store.Store {
	t.Helper()
	st, err := sqlite.Open(filepath.Join(dir, "tp.db"))
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func newState(t *testing.T, db store.Store) *State {
	t.Helper()
	s, err := New(context.Background(), Options{
		Store:    db,
		V4Prefix: netip.MustParsePrefix("100.64.0.0/10"),
		V6Prefix: netip.MustParsePrefix("fd7a:115c:a1e0::/48"),
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func params(authKey string) RegisterParams {
	return RegisterParams{
		MachineKey: key.NewMachine().Public(), NodeKey: key.NewNode().Public(), AuthKey: authKey,
		Hostinfo: &tailcfg.Hostinfo{Hostname: "box"},
	}
}

func mustKey(t testing.TB, s *State, p KeyParams) string {
	t.Helper()
	ks, err := s.CreateKeys(context.Background(), p, 1)
	if err != nil {
		t.Fatal(err)
	}
	return ks[0].Key
}

func TestRegisterRejectsBadKeysAndChangesNothing(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db := openStore(t, dir)
	s := newState(t, db)
	defer s.Close()
	if _, err := s.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	oneOff := mustKey(t, s, KeyParams{User: "alice"})
	if _, err := s.Register(ctx, params(oneOff)); err != nil {
		t.Fatalf("first use of one-off key: %v", err)
	}
	revoked := mustKey(t, s, KeyParams{User: "alice", Reusable: true})
	id, _, _ := parseKey(revoked)
	if err := s.ExpireKey(ctx, id); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	s.now = func() time.Time { return now }
	short := mustKey(t, s, KeyParams{User: "alice", Reusable: true, Expiration: time.Minute})
	s.now = func() time.Time { return now.Add(2 * time.Minute) }

	good := mustKey(t, s, KeyParams{User: "alice", Reusable: true})
	wrongSecret := good[:len(good)-4] + "0000"
	cases := []struct {
		name string
		key  string
		want error
	}{
		{"garbage", "not-a-key", ErrKeyInvalid},
		{"unknown id", KeyPrefix + "0123456789abcdef-00", ErrKeyInvalid},
		{"wrong secret", wrongSecret, ErrKeyInvalid},
		{"used one-off", oneOff, ErrKeyUsed},
		{"revoked", revoked, ErrKeyExpired},
		{"expired", short, ErrKeyExpired},
		{"none", "", ErrNeedsAuthKey},
	}
	before := len(s.Nodes())
	keysBefore := s.Keys()
	for _, c := range cases {
		_, err := s.Register(ctx, params(c.key))
		if !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", c.name, err, c.want)
		}
	}
	if got := len(s.Nodes()); got != before {
		t.Errorf("nodes changed from %d to %d after rejected registrations", before, got)
	}
	if got := s.Keys(); len(got) != len(keysBefore) {
		t.Errorf("keys changed: %d -> %d", len(keysBefore), len(got))
	}
	// What is on disk agrees with memory.
	s.Close()
	s2 := newState(t, db)
	defer s2.Close()
	if got := len(s2.Nodes()); got != before {
		t.Errorf("after reload: %d nodes, want %d", got, before)
	}
}

func TestOneOffKeyRaceAdmitsExactlyOne(t *testing.T) {
	ctx := context.Background()
	s := newState(t, openStore(t, t.TempDir()))
	defer s.Close()
	if _, err := s.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, s, KeyParams{User: "alice"})
	var wg sync.WaitGroup
	var ok, used atomic.Int64
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.Register(ctx, params(k))
			switch {
			case err == nil:
				ok.Add(1)
			case errors.Is(err, ErrKeyUsed):
				used.Add(1)
			default:
				t.Errorf("unexpected error: %v", err)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 1 || used.Load() != 31 {
		t.Fatalf("ok=%d used=%d, want 1 and 31", ok.Load(), used.Load())
	}
}

func TestAddressesStableAndNeverReused(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db := openStore(t, dir)
	s := newState(t, db)
	if _, err := s.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, s, KeyParams{User: "alice", Reusable: true})
	p := params(k)
	r1, err := s.Register(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()

	// After a restart, the same machine re-registering with a new node key
	// keeps its id, addresses and name.
	s = newState(t, db)
	defer s.Close()
	p.NodeKey = key.NewNode().Public()
	r2, err := s.Register(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if r1.Node.ID != r2.Node.ID || r1.Node.IPv4 != r2.Node.IPv4 || r1.Node.IPv6 != r2.Node.IPv6 || r1.Node.GivenName != r2.Node.GivenName {
		t.Fatalf("re-registration changed identity: %+v -> %+v", r1.Node, r2.Node)
	}
	// A deleted node's addresses are not handed to the next node.
	if err := s.DeleteNode(ctx, r2.Node.ID); err != nil {
		t.Fatal(err)
	}
	r3, err := s.Register(ctx, params(k))
	if err != nil {
		t.Fatal(err)
	}
	if r3.Node.IPv4 == r1.Node.IPv4 || r3.Node.IPv6 == r1.Node.IPv6 {
		t.Fatalf("address %v handed out twice", r1.Node.IPv4)
	}
	// Names stay unique.
	r4, err := s.Register(ctx, params(k))
	if err != nil {
		t.Fatal(err)
	}
	if r4.Node.GivenName == r3.Node.GivenName {
		t.Fatalf("two nodes named %q", r4.Node.GivenName)
	}
}

func TestFailedCommitRollsBackMemory(t *testing.T) {
	ctx := context.Background()
	cs := &countingStore{Store: openStore(t, t.TempDir())}
	s := newState(t, cs)
	defer s.Close()
	if _, err := s.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	k := mustKey(t, s, KeyParams{User: "alice"})
	cs.fail.Store(true)
	if _, err := s.Register(ctx, params(k)); err == nil {
		t.Fatal("registration succeeded although the store failed")
	}
	if n := len(s.Nodes()); n != 0 {
		t.Fatalf("%d nodes in memory after a failed commit", n)
	}
	cs.fail.Store(false)
	if _, err := s.Register(ctx, params(k)); err != nil {
		t.Fatalf("one-off key should still be usable after a failed commit: %v", err)
	}
}

func TestConcurrentRegistrationsShareCommits(t *testing.T) {
	ctx := context.Background()
	cs := &countingStore{Store: openStore(t, t.TempDir())}
	s := newState(t, cs)
	defer s.Close()
	if _, err := s.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	ks, err := s.CreateKeys(ctx, KeyParams{User: "alice"}, 200)
	if err != nil {
		t.Fatal(err)
	}
	before := cs.applies.Load()
	var wg sync.WaitGroup
	for _, k := range ks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.Register(ctx, params(k.Key)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	commits := cs.applies.Load() - before
	if commits >= 200 {
		t.Fatalf("200 concurrent registrations took %d commits: no group commit", commits)
	}
	t.Logf("200 registrations in %d commits", commits)
	if len(s.Nodes()) != 200 {
		t.Fatalf("%d nodes, want 200", len(s.Nodes()))
	}
}

func TestLogoutExpiresOrDeletesEphemeral(t *testing.T) {
	ctx := context.Background()
	s := newState(t, openStore(t, t.TempDir()))
	defer s.Close()
	if _, err := s.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	p := params(mustKey(t, s, KeyParams{User: "alice"}))
	r, err := s.Register(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	p.AuthKey, p.Expiry = "", time.Now().Add(-time.Hour)
	if _, err := s.Register(ctx, p); err != nil {
		t.Fatal(err)
	}
	if n := s.Node(r.Node.ID); n == nil || !n.Expired(time.Now()) {
		t.Fatalf("logged-out node not expired: %+v", n)
	}
	pe := params(mustKey(t, s, KeyParams{User: "alice", Ephemeral: true}))
	re, err := s.Register(ctx, pe)
	if err != nil {
		t.Fatal(err)
	}
	pe.AuthKey, pe.Expiry = "", time.Now().Add(-time.Hour)
	if _, err := s.Register(ctx, pe); err != nil {
		t.Fatal(err)
	}
	if s.Node(re.Node.ID) != nil {
		t.Fatal("logged-out ephemeral node still exists")
	}
}

func TestDNSLabel(t *testing.T) {
	for in, want := range map[string]string{
		"My Laptop": "my-laptop", "a_b.c": "a-b-c", "--x--": "x", "ÄÖ": "", "UPPER123": "upper123",
	} {
		if got := dnsLabel(in); got != want {
			t.Errorf("dnsLabel(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestRepeatedClientUpdateIsNoChange: a client repeating its endpoints,
// disco key and Hostinfo (as on every reconnect) makes no new node version.
func TestRepeatedClientUpdateIsNoChange(t *testing.T) {
	ctx := context.Background()
	s := newState(t, openStore(t, t.TempDir()))
	defer s.Close()
	if _, err := s.CreateUser(ctx, "alice", ""); err != nil {
		t.Fatal(err)
	}
	r, err := s.Register(ctx, params(mustKey(t, s, KeyParams{User: "alice"})))
	if err != nil {
		t.Fatal(err)
	}
	id := r.Node.ID
	u := ClientUpdate{
		Hostinfo:  &tailcfg.Hostinfo{Hostname: "box", OS: "linux"},
		Endpoints: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")},
		DiscoKey:  key.NewDisco().Public(),
	}
	s.UpdateFromClient(id, u)
	v1 := s.Node(id)
	if !slices.Equal(v1.Endpoints, u.Endpoints) || v1.DiscoKey != u.DiscoKey || v1.Hostinfo.OS != "linux" {
		t.Fatalf("update not applied: %+v", v1)
	}
	again := ClientUpdate{Hostinfo: u.Hostinfo.Clone(), Endpoints: slices.Clone(u.Endpoints), DiscoKey: u.DiscoKey}
	s.UpdateFromClient(id, again)
	if s.Node(id) != v1 {
		t.Fatal("an identical update made a new node version")
	}
	again.Endpoints = []netip.AddrPort{netip.MustParseAddrPort("192.0.2.2:41641")}
	s.UpdateFromClient(id, again)
	if v := s.Node(id); v == v1 || v.Endpoints[0] != again.Endpoints[0] {
		t.Fatalf("a changed endpoint was not applied: %+v", v)
	}
}

// failingStore fails every Apply that holds the setting "bad", and
// counts the Applies.
type failingStore struct {
	store.Store
	applies atomic.Int64
}

func (f *failingStore) Apply(ctx context.Context, muts []store.Mutation) (int64, error) {
	f.applies.Add(1)
	for _, m := range muts {
		if m.PutSetting != nil && m.PutSetting.Key == "bad" {
			return 0, store.ErrConflict
		}
	}
	return f.Store.Apply(ctx, muts)
}

// TestFailedRequestSparesItsBatch: a request that fails its group commit
// fails alone; the others of its batch are committed, in a few
// transactions rather than one each.
func TestFailedRequestSparesItsBatch(t *testing.T) {
	db := openStore(t, t.TempDir())
	defer db.Close()
	fs := &failingStore{Store: db}
	c := newCommitter(fs, slog.Default(), nil)
	defer c.close()
	var batch []*commitReq
	for i := range 64 {
		name := fmt.Sprint("good", i)
		if i == 41 {
			name = "bad"
		}
		batch = append(batch, &commitReq{muts: []store.Mutation{{PutSetting: &store.Setting{Key: name}}}, done: make(chan error, 1)})
	}
	c.apply(batch)
	for i, r := range batch {
		if err := <-r.done; (err != nil) != (i == 41) {
			t.Errorf("request %d: %v", i, err)
		}
	}
	if n := fs.applies.Load(); n > 13 {
		t.Errorf("%d transactions for a batch of 64 with one failing request, want at most 13 (1 + 2·log2(64))", n)
	}
	snap, err := db.Load(context.Background())
	if err != nil || len(snap.Settings) != 63 {
		t.Errorf("%d settings stored (%v), want the 63 good ones", len(snap.Settings), err)
	}
}
