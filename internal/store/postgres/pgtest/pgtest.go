// Package pgtest gives tests a PostgreSQL database of their own: a fresh
// schema in the test database, dropped when the test ends.
package pgtest

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
)

const defaultDSN = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

var (
	dsnOnce sync.Once
	baseDSN string
	dsnErr  error
)

// DSN returns the DSN of the test database: TAILPLANE_TEST_POSTGRES, or the
// local default. If the database cannot be reached the test is skipped, or
// fails when TAILPLANE_REQUIRE_POSTGRES=1 (as in CI, where a silent skip
// would hide a broken setup).
func DSN(tb testing.TB) string {
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

// SchemaDSN returns a DSN whose connections work in a new schema that is
// dropped when tb ends; the same one for every call of one test.
func SchemaDSN(tb testing.TB) string {
	tb.Helper()
	if dsn, ok := schemas.Load(tb); ok {
		return dsn.(string)
	}
	dsn := NewSchemaDSN(tb)
	schemas.Store(tb, dsn)
	tb.Cleanup(func() { schemas.Delete(tb) })
	return dsn
}

// NewSchemaDSN returns a DSN whose connections work in a new schema, another
// at each call, dropped when tb ends.
func NewSchemaDSN(tb testing.TB) string {
	tb.Helper()
	base := DSN(tb)
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
	return dsn
}
