// Package sqlite is the store for a single tailplane process: one SQLite
// file, written through one connection.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	modernc "modernc.org/sqlite" // the "sqlite" driver; its Error
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/sqlcommon"
)

// params configure every connection the driver opens:
//   - WAL with synchronous=FULL: a commit returns only after its WAL frames
//     are fsynced, so an acknowledged change survives a crash or power loss;
//   - busy_timeout: another process (a backup, the sqlite3 shell) holding
//     the lock briefly delays a commit instead of failing it;
//   - foreign_keys: SQLite leaves them off by default;
//   - _txlock=immediate: a transaction takes the write lock at BEGIN, so it
//     can never fail half-way with SQLITE_BUSY on lock upgrade;
//   - _time_integer_format and _inttotime: times are bound as Unix
//     microseconds and TIMESTAMP columns scan back into time.Time, which
//     lets the sqlcommon code bind and scan times as it does on PostgreSQL.
const params = "_pragma=journal_mode(WAL)&_pragma=synchronous(FULL)&_pragma=busy_timeout(10000)" +
	"&_pragma=foreign_keys(1)&_txlock=immediate&_time_integer_format=unix_micro&_inttotime=1"

// Store is a store.Store on an SQLite file.
type Store struct {
	db *sql.DB

	// stmts caches Apply's prepared statements: preparing (parsing an
	// upsert) costs more than running it.
	mu    sync.Mutex
	stmts map[string]*sql.Stmt
}

var _ store.Store = (*Store)(nil)

// Open opens the SQLite database at path, creating it (and its directory,
// mode 0700) if absent, and migrates its schema.
func Open(path string) (*Store, error) {
	// The driver reads everything after '?' as its parameters.
	if strings.Contains(path, "?") {
		return nil, fmt.Errorf("sqlite: open %q: path must not contain '?'", path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("sqlite: open: %w", err)
	}
	// Create the file ourselves: the database holds the server's private
	// keys, and SQLite would create it world-readable under the usual
	// umask. The -wal and -shm files take the database file's mode.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("sqlite: open: %w", err)
	}
	f.Close()

	db, err := sql.Open("sqlite", path+"?"+params)
	if err != nil {
		return nil, fmt.Errorf("sqlite: open %s: %w", path, err)
	}
	// One connection: SQLite has one writer anyway, and the state package
	// batches changes (group commit), so more connections would only queue
	// on the database lock instead of in database/sql. Loads happen at
	// start only.
	db.SetMaxOpenConns(1)
	db.SetConnMaxLifetime(0)
	db.SetConnMaxIdleTime(0)
	s := &Store{db: db, stmts: map[string]*sql.Stmt{}}
	if err := s.init(); err != nil {
		db.Close()
		return nil, fmt.Errorf("sqlite: open %s: %w", path, err)
	}
	return s, nil
}

func (s *Store) init() error {
	ctx := context.Background()
	// A pragma the driver could not apply fails silently: WAL, for one, is
	// refused on some network file systems. Durability depends on these.
	for pragma, want := range map[string]string{"journal_mode": "wal", "synchronous": "2", "foreign_keys": "1"} {
		var got string
		if err := s.db.QueryRowContext(ctx, "PRAGMA "+pragma).Scan(&got); err != nil {
			return fmt.Errorf("read %s: %w", pragma, err)
		}
		if got != want {
			return fmt.Errorf("%s is %q, want %q", pragma, got, want)
		}
	}
	return s.inTx(ctx, func(tx *sql.Tx) error {
		return sqlcommon.Migrate(ctx, conn{tx}, migrations)
	})
}

// inTx runs fn in a transaction (which holds the write lock, see params)
// and commits if fn succeeds.
func (s *Store) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		if rbErr := tx.Rollback(); rbErr != nil {
			err = errors.Join(err, fmt.Errorf("rollback: %w", rbErr))
		}
		return err
	}
	return tx.Commit()
}

// Load reads the whole state.
func (s *Store) Load(ctx context.Context) (*store.Snapshot, error) {
	var snap *store.Snapshot
	// In a transaction so that all tables are read at one point in time.
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		var err error
		snap, err = sqlcommon.Load(ctx, conn{tx})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("sqlite: load: %w", err)
	}
	return snap, nil
}

// Apply applies muts in one transaction, durable when it returns.
func (s *Store) Apply(ctx context.Context, muts []store.Mutation) (int64, error) {
	b, err := sqlcommon.NewBatch(muts, time.Now(), nil, nil, isUnique)
	if err != nil {
		return 0, fmt.Errorf("sqlite: apply: %w", err)
	}
	// Prepare before the transaction takes the only connection, which
	// preparing on the *sql.DB would wait for.
	stmts := make([]*sql.Stmt, len(b.Stmts))
	for i, st := range b.Stmts {
		if stmts[i], err = s.prepare(ctx, st.SQL); err != nil {
			return 0, fmt.Errorf("sqlite: apply: prepare: %w", err)
		}
	}
	var seq int64
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		results := make([]int64, 0, len(stmts))
		var err error
		for i, st := range b.Stmts {
			var r int64
			if r, err = run(ctx, tx.StmtContext(ctx, stmts[i]), st); err != nil {
				break
			}
			results = append(results, r)
		}
		seq, err = b.Result(results, err)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("sqlite: apply: %w", err)
	}
	return seq, nil
}

// isUnique reports whether err is a PRIMARY KEY or UNIQUE violation. The
// driver turns on extended result codes, which tell these from the other
// constraints (FOREIGN KEY, NOT NULL).
func isUnique(err error) bool {
	var e *modernc.Error
	if !errors.As(err, &e) {
		return false
	}
	return e.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY || e.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE
}

// run runs one statement of a batch and returns its result.
func run(ctx context.Context, ps *sql.Stmt, st sqlcommon.Stmt) (int64, error) {
	if st.Scan {
		var v int64
		err := ps.QueryRowContext(ctx, st.Args...).Scan(&v)
		return v, err
	}
	res, err := ps.ExecContext(ctx, st.Args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// prepare returns the cached prepared statement for query.
func (s *Store) prepare(ctx context.Context, query string) (*sql.Stmt, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ps, ok := s.stmts[query]; ok {
		return ps, nil
	}
	ps, err := s.db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	s.stmts[query] = ps
	return ps, nil
}

// ChangesSince returns the change-log entries after seq, oldest first, at
// most sqlcommon.MaxChanges of them: call again from the last one returned
// until the result is empty. If entries after seq were pruned, the error
// wraps store.ErrPruned.
func (s *Store) ChangesSince(ctx context.Context, seq int64) ([]store.Change, error) {
	changes, err := sqlcommon.ChangesSince(ctx, conn{s.db}, seq)
	if err != nil {
		return nil, fmt.Errorf("sqlite: changes since %d: %w", seq, err)
	}
	return changes, nil
}

// PruneChanges deletes the change-log entries stamped before before,
// keeping the newest, and returns how many it deleted. A single process
// reads nothing from its own log, so any cut-off is safe.
func (s *Store) PruneChanges(ctx context.Context, before time.Time) (int64, error) {
	var n int64
	// A transaction, like Apply's, so it waits for the write lock.
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		var err error
		n, err = sqlcommon.PruneChanges(ctx, conn{tx}, before)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("sqlite: prune changes: %w", err)
	}
	return n, nil
}

// Close closes the database. It is safe to call more than once.
func (s *Store) Close() error {
	s.mu.Lock()
	for q, ps := range s.stmts {
		ps.Close()
		delete(s.stmts, q)
	}
	s.mu.Unlock()
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("sqlite: close: %w", err)
	}
	return nil
}

// conn adapts a *sql.DB or *sql.Tx to sqlcommon.Conn.
type conn struct {
	c interface {
		ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
		QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	}
}

func (c conn) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	res, err := c.c.ExecContext(ctx, query, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

func (c conn) Query(ctx context.Context, query string, args ...any) (sqlcommon.Rows, error) {
	rows, err := c.c.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	return sqlRows{rows}, nil
}

// sqlRows drops the error of Close: database/sql reports any error of the
// iteration through Err, which the caller checks.
type sqlRows struct{ *sql.Rows }

func (r sqlRows) Close() { r.Rows.Close() }
