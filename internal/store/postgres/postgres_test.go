package postgres

import (
	"context"
	"crypto/rand"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/storetest"
)

const defaultDSN = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

var (
	dsnOnce sync.Once
	baseDSN string
	dsnErr  error
)

// testDSN returns the DSN of the test database: TAILPLANE_TEST_POSTGRES,
// or the local default. If the database cannot be reached the test is
// skipped, or fails when TAILPLANE_REQUIRE_POSTGRES=1 (as in CI, where a
// silent skip would hide a broken setup).
func testDSN(tb testing.TB) string {
	tb.Helper()
	dsnOnce.Do(func() {
		baseDSN = os.Getenv("TAILPLANE_TEST_POSTGRES")
		if baseDSN == "" {
			baseDSN = defaultDSN
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		var c *pgx.Conn
		if c, dsnErr = pgx.Connect(ctx, baseDSN); dsnErr == nil {
			dsnErr = c.Ping(ctx)
			c.Close(ctx)
		}
	})
	if dsnErr != nil {
		msg := "SKIP: PostgreSQL not reachable at " + redact(baseDSN) + ": set TAILPLANE_TEST_POSTGRES (" + dsnErr.Error() + ")"
		if os.Getenv("TAILPLANE_REQUIRE_POSTGRES") == "1" {
			tb.Fatal(strings.Replace(msg, "SKIP: ", "TAILPLANE_REQUIRE_POSTGRES=1 but ", 1))
		}
		tb.Skip(msg)
	}
	return baseDSN
}

// redact hides a password in a URL DSN.
func redact(dsn string) string {
	if u, err := url.Parse(dsn); err == nil && u.User != nil {
		return u.Redacted()
	}
	return dsn
}

// schemas gives each test its own schema, so that concurrent tests and
// test runs share the database without seeing each other, and opening twice
// with the same test reopens the same tables.
var schemas sync.Map // testing.TB -> DSN

// schemaDSN returns a DSN whose connections work in a new schema that is
// dropped when tb ends.
func schemaDSN(tb testing.TB) string {
	tb.Helper()
	if dsn, ok := schemas.Load(tb); ok {
		return dsn.(string)
	}
	base := testDSN(tb)
	name := "tp_test_" + strings.ToLower(rand.Text()[:16])
	ctx := context.Background()
	c, err := pgx.Connect(ctx, base)
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, "CREATE SCHEMA "+name); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		c, err := pgx.Connect(ctx, base)
		if err != nil {
			tb.Error(err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "DROP SCHEMA "+name+" CASCADE"); err != nil {
			tb.Error(err)
		}
	})
	// pgx sends unknown DSN parameters to the server as run-time
	// parameters, so every connection of the pool starts in the schema.
	var dsn string
	if u, err := url.Parse(base); err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql") {
		q := u.Query()
		q.Set("search_path", name)
		u.RawQuery = q.Encode()
		dsn = u.String()
	} else {
		dsn = base + " search_path=" + name
	}
	schemas.Store(tb, dsn)
	return dsn
}

func openTest(tb testing.TB) store.Store {
	tb.Helper()
	s, err := Open(context.Background(), schemaDSN(tb))
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

func TestStore(t *testing.T) {
	testDSN(t) // skip once, not in every subtest
	storetest.Run(t, func(t *testing.T) store.Store { return openTest(t) })
}

func BenchmarkApplyBatch(b *testing.B) {
	storetest.BenchmarkApplyBatch(b, openTest)
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
