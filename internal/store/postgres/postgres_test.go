package postgres

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/postgres/pgtest"
	"github.com/tailplane/tailplane/internal/store/storetest"
)

// testDSN and schemaDSN give the tests the shared test database and a
// schema of their own in it (see pgtest).
var (
	testDSN   = pgtest.DSN
	schemaDSN = pgtest.SchemaDSN
)

func openTest(tb testing.TB) store.Store {
	tb.Helper()
	s, err := Open(context.Background(), schemaDSN(tb))
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

// The suite skips its change-log test for a store without one.
var _ storetest.ChangeLog = (*Store)(nil)

func TestStore(t *testing.T) {
	testDSN(t) // skip once, not in every subtest
	storetest.Run(t, func(t *testing.T) store.Store { return openTest(t) })
}

func BenchmarkApplyBatch(b *testing.B) {
	storetest.BenchmarkApplyBatch(b, openTest)
}

func BenchmarkApplyPresence(b *testing.B) {
	storetest.BenchmarkApplyPresence(b, openTest)
}

func TestMigrations(t *testing.T) {
	dsn := schemaDSN(t)
	ctx := context.Background()
	for range 2 { // the second Open finds the schema current
		openTest(t).Close()
	}
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var n, v int
	if err := c.QueryRow(ctx, "SELECT COUNT(*), MAX(version) FROM schema_migrations").Scan(&n, &v); err != nil {
		t.Fatal(err)
	}
	if n != len(migrations) || v != len(migrations) {
		t.Errorf("schema_migrations has %d rows up to version %d, want %d", n, v, len(migrations))
	}
	// A schema from a newer tailplane is refused, not misread.
	if _, err := c.Exec(ctx, "INSERT INTO schema_migrations (version, name) VALUES ($1, 'future')", len(migrations)+1); err != nil {
		t.Fatal(err)
	}
	if s, err := Open(ctx, dsn); err == nil || !strings.Contains(err.Error(), "newer") {
		if err == nil {
			s.Close()
		}
		t.Errorf("Open of a newer schema: error %v, want one about a newer version", err)
	}
}

// TestConcurrentOpen starts several replicas on an empty schema at once:
// the migration lock lets exactly one create the tables.
func TestConcurrentOpen(t *testing.T) {
	dsn := schemaDSN(t)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			s, err := Open(context.Background(), dsn)
			if err != nil {
				t.Error(err)
				return
			}
			s.Close()
		})
	}
	wg.Wait()
}

// TestReplicas has two stores on one schema, as two replicas would be:
// one follows the other's changes through Listen and ChangesSince.
func TestReplicas(t *testing.T) {
	a := openTest(t).(*Store)
	defer a.Close()
	b := openTest(t).(*Store)
	defer b.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	seqs := make(chan int64, 100)
	done := make(chan error, 1)
	go func() { done <- b.Listen(ctx, func(seq int64) { seqs <- seq }) }()
	if first := <-seqs; first != 0 {
		t.Errorf("Listen first reported %d, want the newest seq 0", first)
	}

	seq, err := a.Apply(ctx, []store.Mutation{{PutUser: storetest.User(1)}})
	if err != nil {
		t.Fatal(err)
	}
	// Other tests' schemas share the channel; wait for this one's seq and
	// check the log, which is per schema.
	timeout := time.After(10 * time.Second)
	for got := int64(-1); got != seq; {
		select {
		case got = <-seqs:
		case <-timeout:
			t.Fatalf("no notification for seq %d", seq)
		}
	}
	changes, err := b.ChangesSince(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(changes) != 1 || changes[0].Seq != seq || changes[0].Mutations[0].PutUser.Name != "user1" {
		t.Errorf("ChangesSince(0) = %+v, want the PutUser at seq %d", changes, seq)
	}

	cancel()
	if err := <-done; err != nil {
		t.Errorf("Listen returned %v after cancel, want nil", err)
	}
}

// TestAlone checks that a replica listening on the database is seen by
// another one's Alone and Gone, and only while it listens.
func TestAlone(t *testing.T) {
	a, b := openTest(t).(*Store), openTest(t).(*Store)
	defer a.Close()
	defer b.Close()
	ctx := context.Background()
	if alone, err := b.Alone(ctx); err != nil || !alone {
		t.Fatalf("Alone with no replica listening = %v, %v; want true", alone, err)
	}
	a.SetReplica("a")
	lctx, stop := context.WithCancel(ctx)
	listening := make(chan struct{}, 1)
	done := make(chan error, 1)
	go func() {
		done <- a.Listen(lctx, func(int64) {
			select {
			case listening <- struct{}{}:
			default:
			}
		})
	}()
	<-listening
	if alone, err := b.Alone(ctx); err != nil || alone {
		t.Errorf("Alone while another replica listens = %v, %v; want false", alone, err)
	}
	gone := func(s *Store, want ...string) {
		t.Helper()
		got, err := s.Gone(ctx, []string{"a", "z"})
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("Gone(a, z) = %v, %v; want %v", got, err, want)
		}
	}
	gone(b, "z")
	// Another schema's replicas are other tailnets.
	other := openOther(t)
	defer other.Close()
	if alone, err := other.Alone(ctx); err != nil || !alone {
		t.Errorf("Alone in another schema = %v, %v; want true", alone, err)
	}
	gone(other, "a", "z")
	stop()
	if err := <-done; err != nil {
		t.Fatalf("Listen: %v", err)
	}
	// PostgreSQL lets go of a closed connection's locks when its backend
	// exits, a moment after the client closed it: on a loaded machine
	// the next query can come first.
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		alone, err := b.Alone(ctx)
		if err == nil && alone {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("Alone 5 s after the other replica stopped = %v, %v; want true", alone, err)
		}
	}
	gone(b, "a", "z")
}

// openOther opens a store in a schema of its own, not the test's.
func openOther(t *testing.T) *Store {
	s, err := Open(context.Background(), pgtest.NewSchemaDSN(t))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestLeading: of the replicas listening on one schema exactly one leads;
// when it stops, another takes over, and waiting for the jobs lock does
// not cost the others their notifications. Another schema has its own.
func TestLeading(t *testing.T) {
	// Restored after every replica's Listen has returned: cleanups run
	// last registered first.
	retry := LeadRetry
	t.Cleanup(func() { LeadRetry = retry })
	LeadRetry = 50 * time.Millisecond
	ctx := context.Background()
	type replica struct {
		s    *Store
		seqs chan int64
		stop context.CancelFunc
		done chan error
	}
	listen := func(s *Store) *replica {
		r := &replica{s: s, seqs: make(chan int64, 100), done: make(chan error, 1)}
		var lctx context.Context
		lctx, r.stop = context.WithCancel(ctx)
		go func() { r.done <- s.Listen(lctx, func(seq int64) { r.seqs <- seq }) }()
		<-r.seqs
		t.Cleanup(func() { r.stop(); <-r.done; s.Close() })
		return r
	}
	leaders := func(rs ...*replica) (n int, leader *replica) {
		for _, r := range rs {
			if r.s.Leading() {
				n, leader = n+1, r
			}
		}
		return n, leader
	}
	eventuallyOneLeads := func(rs ...*replica) *replica {
		t.Helper()
		for end := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			n, leader := leaders(rs...)
			if n == 1 {
				return leader
			}
			if n > 1 || time.Now().After(end) {
				t.Fatalf("%d replicas lead, want one", n)
			}
		}
	}

	a, b := listen(openTest(t).(*Store)), listen(openTest(t).(*Store))
	leader := eventuallyOneLeads(a, b)
	other := a
	if leader == a {
		other = b
	}
	time.Sleep(5 * LeadRetry) // the other tries, and fails, several times
	if n, _ := leaders(a, b); n != 1 {
		t.Fatalf("%d replicas lead after the other's retries, want one", n)
	}
	seq, err := leader.s.Apply(ctx, []store.Mutation{{PutUser: storetest.User(1)}})
	if err != nil {
		t.Fatal(err)
	}
	for timeout, got := time.After(5*time.Second), int64(-1); got != seq; {
		select {
		case got = <-other.seqs:
		case <-timeout:
			t.Fatalf("the replica waiting to lead got no notification for seq %d", seq)
		}
	}
	if o := listen(openOther(t)); eventuallyOneLeads(o) != o {
		t.Error("another schema's replica does not lead its own")
	}

	leader.stop()
	if err := <-leader.done; err != nil {
		t.Fatal(err)
	}
	leader.done <- nil // for the cleanup
	if leader.s.Leading() {
		t.Error("a replica that stopped listening still leads")
	}
	if eventuallyOneLeads(a, b) != other {
		t.Error("the other replica did not take over")
	}
}
