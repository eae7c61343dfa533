package sqlcommon

import (
	"context"
	"fmt"
)

// Migration is one step of a backend's schema. Versions start at 1 and
// increase by one; a released migration is never edited, only followed by
// a new one, because databases in the field have already run it.
type Migration struct {
	Version int
	Name    string
	// SQL may hold several statements separated by semicolons.
	SQL string
}

// createMigrations needs no placeholder, time binding or dialect-specific
// type, so one statement serves both databases.
const createMigrations = `CREATE TABLE IF NOT EXISTS schema_migrations (
	version    INTEGER PRIMARY KEY,
	name       TEXT NOT NULL,
	applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
)`

// Migrate brings the schema up to the last of migrations, recording each
// step in schema_migrations. tx must be a transaction that the caller
// commits, holding whatever lock keeps other processes from migrating at
// the same time; so a failed step leaves the schema as it was. A database
// whose schema is newer than migrations is an error: this binary would not
// know how to read it.
func Migrate(ctx context.Context, tx Conn, migrations []Migration) error {
	for i, m := range migrations {
		if m.Version != i+1 {
			return fmt.Errorf("migration %q has version %d, want %d", m.Name, m.Version, i+1)
		}
	}
	if _, err := tx.Exec(ctx, createMigrations); err != nil {
		return fmt.Errorf("create schema_migrations: %w", err)
	}
	var current int
	if err := queryOne(ctx, tx, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations", nil, &current); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if current > len(migrations) {
		return fmt.Errorf("database schema version %d is newer than this binary supports (%d): upgrade tailplane", current, len(migrations))
	}
	for _, m := range migrations[current:] {
		if _, err := tx.Exec(ctx, m.SQL); err != nil {
			return fmt.Errorf("migration %d (%s): %w", m.Version, m.Name, err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.Version, m.Name); err != nil {
			return fmt.Errorf("record migration %d: %w", m.Version, err)
		}
	}
	return nil
}
