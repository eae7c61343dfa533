package postgres

import "github.com/tailplane/tailplane/internal/store/sqlcommon"

// migrations is the PostgreSQL schema, step by step. It mirrors the sqlite
// package's: same tables, columns and constraints, PostgreSQL's types.
//
// List columns and change payloads are JSONB. Hostinfo stays BYTEA: JSONB
// would reorder and reformat it, and it must load back byte for byte. The
// UNIQUE constraints repeat invariants the state package already keeps, so
// a bug there fails a commit instead of corrupting the data at rest. Nodes
// restrict deleting their user, pre-auth keys go with theirs (there is no
// mutation that deletes a key).
var migrations = []sqlcommon.Migration{{
	Version: 1,
	Name:    "initial schema",
	SQL: `
CREATE TABLE users (
	id           BIGINT PRIMARY KEY,
	name         TEXT NOT NULL UNIQUE,
	email        TEXT NOT NULL,
	display_name TEXT NOT NULL,
	created_at   TIMESTAMPTZ
);
CREATE TABLE nodes (
	id                BIGINT PRIMARY KEY,
	machine_key       TEXT NOT NULL,
	node_key          TEXT NOT NULL UNIQUE,
	disco_key         TEXT NOT NULL,
	user_id           BIGINT NOT NULL REFERENCES users (id),
	tags              JSONB NOT NULL,
	hostname          TEXT NOT NULL,
	given_name        TEXT NOT NULL UNIQUE,
	ipv4              TEXT UNIQUE,
	ipv6              TEXT UNIQUE,
	hostinfo          BYTEA,
	endpoints         JSONB NOT NULL,
	auth_key_id       TEXT NOT NULL,
	ephemeral         BOOLEAN NOT NULL,
	expiry            TIMESTAMPTZ,
	advertised_routes JSONB NOT NULL,
	approved_routes   JSONB NOT NULL,
	created_at        TIMESTAMPTZ,
	last_seen         TIMESTAMPTZ
);
CREATE INDEX nodes_user_id ON nodes (user_id);
CREATE TABLE pre_auth_keys (
	id          TEXT PRIMARY KEY,
	secret_hash BYTEA NOT NULL,
	user_id     BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
	reusable    BOOLEAN NOT NULL,
	ephemeral   BOOLEAN NOT NULL,
	tags        JSONB NOT NULL,
	expiration  TIMESTAMPTZ,
	created_at  TIMESTAMPTZ,
	used        BOOLEAN NOT NULL,
	revoked     BOOLEAN NOT NULL
);
CREATE INDEX pre_auth_keys_user_id ON pre_auth_keys (user_id);
CREATE TABLE settings (
	name  TEXT PRIMARY KEY,
	value BYTEA
);
CREATE TABLE changes (
	seq     BIGSERIAL PRIMARY KEY,
	at      TIMESTAMPTZ NOT NULL,
	payload JSONB NOT NULL
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
	through BIGINT NOT NULL
);
`,
}, {
	Version: 4,
	Name:    "node holder",
	SQL:     `ALTER TABLE nodes ADD COLUMN holder TEXT NOT NULL DEFAULT ''`,
}}
