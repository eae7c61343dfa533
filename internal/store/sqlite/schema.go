package sqlite

import "github.com/tailplane/tailplane/internal/store/sqlcommon"

// migrations is the SQLite schema, step by step. It mirrors the postgres
// package's: same tables, columns and constraints, SQLite's types.
//
// Timestamps are declared TIMESTAMP and hold Unix microseconds (see Open).
// List columns hold JSON arrays. The UNIQUE constraints repeat invariants
// the state package already keeps, so a bug there fails a commit instead of
// corrupting the data at rest. Nodes restrict deleting their user, pre-auth
// keys go with theirs (there is no mutation that deletes a key).
var migrations = []sqlcommon.Migration{{
	Version: 1,
	Name:    "initial schema",
	SQL: `
CREATE TABLE users (
	id           INTEGER PRIMARY KEY,
	name         TEXT NOT NULL UNIQUE,
	email        TEXT NOT NULL,
	display_name TEXT NOT NULL,
	created_at   TIMESTAMP
);
CREATE TABLE nodes (
	id                INTEGER PRIMARY KEY,
	machine_key       TEXT NOT NULL,
	node_key          TEXT NOT NULL UNIQUE,
	disco_key         TEXT NOT NULL,
	user_id           INTEGER NOT NULL REFERENCES users (id),
	tags              TEXT NOT NULL,
	hostname          TEXT NOT NULL,
	given_name        TEXT NOT NULL UNIQUE,
	ipv4              TEXT UNIQUE,
	ipv6              TEXT UNIQUE,
	hostinfo          BLOB,
	endpoints         TEXT NOT NULL,
	auth_key_id       TEXT NOT NULL,
	ephemeral         BOOLEAN NOT NULL,
	expiry            TIMESTAMP,
	advertised_routes TEXT NOT NULL,
	approved_routes   TEXT NOT NULL,
	created_at        TIMESTAMP,
	last_seen         TIMESTAMP
);
CREATE INDEX nodes_user_id ON nodes (user_id);
CREATE TABLE pre_auth_keys (
	id          TEXT PRIMARY KEY,
	secret_hash BLOB NOT NULL,
	user_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	reusable    BOOLEAN NOT NULL,
	ephemeral   BOOLEAN NOT NULL,
	tags        TEXT NOT NULL,
	expiration  TIMESTAMP,
	created_at  TIMESTAMP,
	used        BOOLEAN NOT NULL,
	revoked     BOOLEAN NOT NULL
);
CREATE INDEX pre_auth_keys_user_id ON pre_auth_keys (user_id);
CREATE TABLE settings (
	name  TEXT PRIMARY KEY,
	value BLOB
);
-- AUTOINCREMENT: a sequence number is never reused, even after the newest
-- entries were deleted, so a reader's position in the log stays valid.
CREATE TABLE changes (
	seq     INTEGER PRIMARY KEY AUTOINCREMENT,
	at      TIMESTAMP NOT NULL,
	payload TEXT NOT NULL
);
`,
}, {
	Version: 2,
	Name:    "node presence",
	SQL:     `ALTER TABLE nodes ADD COLUMN online BOOLEAN NOT NULL DEFAULT FALSE`,
}, {
	Version: 3,
	Name:    "change log pruned mark",
	SQL: `
-- One row: the highest seq PruneChanges deleted. ChangesSince refuses to
-- read from below it, where entries are missing.
CREATE TABLE changes_pruned (
	id      INTEGER PRIMARY KEY CHECK (id = 1),
	through INTEGER NOT NULL
);
`,
}, {
	Version: 4,
	Name:    "node holder",
	SQL:     `ALTER TABLE nodes ADD COLUMN holder TEXT NOT NULL DEFAULT ''`,
}}
