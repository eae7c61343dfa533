// Package postgres is the store for tailplane replicas sharing one
// PostgreSQL database. Besides store.Store it offers what a replica needs to
// follow the others: the change log (ChangesSince) and its notifications
// (Listen).
package postgres

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/sqlcommon"
)

// Channel is the NOTIFY channel on which every Apply announces its change
// sequence number.
const Channel = "tailplane_changes"

// replicaLock is the advisory lock (one per schema) every running replica
// holds shared on its notification connection (Listen), so that Alone can
// tell whether any other replica runs.
const replicaLock = "hashtext('tailplane_replicas.' || current_schema())"

// migrateLock is the advisory lock key under which a process migrates the
// schema, so replicas starting together do not race on CREATE TABLE.
const migrateLock = 0x7461696c706c616e // "tailplan"

// replicaAlive is the advisory lock a running replica holds exclusive on
// its notification connection, one per replica id ($1) and schema, so that
// Gone can tell a crashed replica's from a running one's: PostgreSQL lets
// go of the lock when the connection ends.
const replicaAlive = "hashtext('tailplane_replica.' || current_schema() || '.' || $1)"

// jobsLock is the advisory lock (one per schema) that the replica running
// the singleton jobs (Leading) holds exclusive on its notification
// connection. PostgreSQL lets go of it when the connection ends, and
// another replica's Listen takes it within LeadRetry.
const jobsLock = "hashtext('tailplane_jobs.' || current_schema())"

// LeadRetry is how often a listening replica that does not run the
// singleton jobs tries to take them over.
var LeadRetry = 5 * time.Second

// ConnCheck bounds Listen's round trips between waits (taking the jobs
// lock, or checking that the leader's connection still works): a
// connection that does not answer within it is dropped, and with it the
// lead.
var ConnCheck = 5 * time.Second

// Store is a store.Store on a PostgreSQL database. Its tables live in the
// first schema of the connection's search_path.
type Store struct {
	pool *pgxpool.Pool
	// replica is this process's replica id (SetReplica), locked by Listen.
	replica atomic.Pointer[string]
	// leading: Listen's connection holds jobsLock.
	leading atomic.Bool
}

// Leading reports whether this process runs the jobs that one replica
// runs for all (pruning the change log, taking over a crashed replica's
// nodes): its notification connection (Listen) holds the jobs lock. At
// most one process of a schema leads at a time, and none while no
// connection to PostgreSQL is up.
func (s *Store) Leading() bool { return s.leading.Load() }

// SetReplica names this process among the replicas; Listen then holds
// the id's lock, so that Gone reports it running. Call it before Listen.
func (s *Store) SetReplica(id string) { s.replica.Store(&id) }

// Gone returns those of ids whose replicas are not running: no connection
// holds their lock (see SetReplica). A replica whose notification
// connection is being re-established counts as gone for that moment.
func (s *Store) Gone(ctx context.Context, ids []string) ([]string, error) {
	var gone []string
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		gone = gone[:0]
		for _, id := range ids {
			var free bool
			if err := tx.QueryRow(ctx, "SELECT pg_try_advisory_xact_lock("+replicaAlive+")", id).Scan(&free); err != nil {
				return err
			}
			if free {
				gone = append(gone, id)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("postgres: check replicas: %w", err)
	}
	return gone, nil
}

var _ store.Store = (*Store)(nil)

// Open connects to the database named by dsn (a URL or key=value string as
// pgx accepts) and migrates its schema.
func Open(ctx context.Context, dsn string) (*Store, error) {
	pool, err := pgxpool.New(ctx, dsn)
	if err != nil {
		return nil, fmt.Errorf("postgres: open: %w", err)
	}
	s := &Store{pool: pool}
	err = s.inTx(ctx, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(migrateLock)); err != nil {
			return fmt.Errorf("lock: %w", err)
		}
		return sqlcommon.Migrate(ctx, conn{tx}, migrations)
	})
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("postgres: open: migrate: %w", err)
	}
	return s, nil
}

// inTx runs fn in a transaction and commits if fn succeeds.
func (s *Store) inTx(ctx context.Context, fn func(pgx.Tx) error) error {
	return pgx.BeginFunc(ctx, s.pool, fn)
}

// Load reads the whole state from one consistent snapshot.
func (s *Store) Load(ctx context.Context) (*store.Snapshot, error) {
	var snap *store.Snapshot
	err := pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly},
		func(tx pgx.Tx) error {
			var err error
			snap, err = sqlcommon.Load(ctx, conn{tx})
			return err
		})
	if err != nil {
		return nil, fmt.Errorf("postgres: load: %w", err)
	}
	return snap, nil
}

// Sequence numbers are handed out at INSERT but become visible at COMMIT,
// so two concurrent writers could commit seq 8 before seq 7, and a replica
// that has read up to 8 would never see 7. Serializing the writers of a
// change log for the whole transaction makes commit order seq order,
// across replicas too. It is an advisory lock (one per schema), not LOCK
// TABLE: pgx prepares a batch's statements before running any, and parsing
// the INSERT already holds a lock on the table that LOCK TABLE would
// conflict with, deadlocking two new connections.
var lockChanges = sqlcommon.Stmt{SQL: "SELECT pg_advisory_xact_lock(hashtext('tailplane_changes.' || current_schema()))"}

// notify announces the seq of the change just appended; NOTIFY is
// delivered at commit, and only if the transaction commits.
var notify = sqlcommon.Stmt{
	SQL:  "SELECT pg_notify($1, currval(pg_get_serial_sequence('changes', 'seq'))::text)",
	Args: []any{Channel},
}

// Apply applies muts in one transaction that also appends their
// change-log entry and notifies Channel. The statements go to the server
// in one pipelined round trip.
func (s *Store) Apply(ctx context.Context, muts []store.Mutation) (int64, error) {
	b, err := sqlcommon.NewBatch(muts, time.Now(), []sqlcommon.Stmt{lockChanges}, []sqlcommon.Stmt{notify}, isUnique)
	if err != nil {
		return 0, fmt.Errorf("postgres: apply: %w", err)
	}
	var seq int64
	err = s.inTx(ctx, func(tx pgx.Tx) error {
		var err error
		seq, err = b.Result(run(ctx, tx, b.Stmts))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("postgres: apply: %w", err)
	}
	return seq, nil
}

// isUnique reports whether err is a unique_violation (SQLSTATE 23505),
// which PostgreSQL raises for primary keys and UNIQUE constraints alike.
func isUnique(err error) bool {
	var e *pgconn.PgError
	return errors.As(err, &e) && e.Code == "23505"
}

// run sends stmts as one pipelined batch and returns the results of those
// that succeeded, and the error of the one that did not.
func run(ctx context.Context, tx pgx.Tx, stmts []sqlcommon.Stmt) ([]int64, error) {
	var batch pgx.Batch
	for _, st := range stmts {
		batch.Queue(st.SQL, st.Args...)
	}
	br := tx.SendBatch(ctx, &batch)
	results := make([]int64, 0, len(stmts))
	for _, st := range stmts {
		var r int64
		var err error
		if st.Scan {
			err = br.QueryRow().Scan(&r)
		} else {
			var tag pgconn.CommandTag
			tag, err = br.Exec()
			r = tag.RowsAffected()
		}
		if err != nil {
			br.Close()
			return results, err
		}
		results = append(results, r)
	}
	return results, br.Close()
}

// ChangesSince returns the change-log entries after seq, oldest first, at
// most sqlcommon.MaxChanges of them: call again from the last one returned
// until the result is empty. Sequence numbers can have gaps (a rolled-back
// Apply uses one up) but never appear out of order: once seq N is visible,
// every committed entry below N is too. If entries after seq were pruned,
// the error wraps store.ErrPruned.
func (s *Store) ChangesSince(ctx context.Context, seq int64) ([]store.Change, error) {
	changes, err := sqlcommon.ChangesSince(ctx, conn{s.pool}, seq)
	if err != nil {
		return nil, fmt.Errorf("postgres: changes since %d: %w", seq, err)
	}
	return changes, nil
}

// PruneChanges deletes the change-log entries stamped before before,
// keeping the newest, and returns how many it deleted. A replica that had
// not read them yet gets store.ErrPruned from ChangesSince and must reload,
// so keep entries for longer than a replica may fall behind.
func (s *Store) PruneChanges(ctx context.Context, before time.Time) (int64, error) {
	var n int64
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		var err error
		n, err = sqlcommon.PruneChanges(ctx, conn{tx}, before)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("postgres: prune changes: %w", err)
	}
	return n, nil
}

// Listen subscribes to Channel and calls fn with the sequence number of
// each change committed from then on, by any replica, until ctx is done
// (it then returns nil) or the connection fails (it returns the error; call
// it again).
//
// Notifications are hints, not the log: one sent while no connection
// listens is lost, and NOTIFY is per database, so a store in another schema
// of the same database wakes fn too. So right after subscribing, Listen calls
// fn with the newest sequence number in the log, and fn should catch up
// with ChangesSince from the last entry it applied rather than trust seq.
// fn runs on Listen's goroutine and delays the next notification.
func (s *Store) Listen(ctx context.Context, fn func(seq int64)) error {
	pc, err := s.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("postgres: listen: %w", err)
	}
	// The connection leaves the pool: it stays subscribed while it lives,
	// and must not serve anyone else meanwhile.
	c := pc.Hijack()
	defer func() {
		closeCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c.Close(closeCtx)
	}()
	if _, err := c.Exec(ctx, "LISTEN "+Channel); err != nil {
		return listenErr(ctx, err)
	}
	// Held while the connection lives: this replica counts as running.
	if _, err := c.Exec(ctx, "SELECT pg_advisory_lock_shared("+replicaLock+")"); err != nil {
		return listenErr(ctx, err)
	}
	if id := s.replica.Load(); id != nil {
		// The lock outlives a crashed replica as long as PostgreSQL takes
		// its connection for open: when the replica's machine dies, that
		// is until TCP keepalives give up, two hours by default. These
		// make it about 30 s on this connection.
		if _, err := c.Exec(ctx, "SET tcp_keepalives_idle = 15; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"); err != nil {
			return listenErr(ctx, err)
		}
		if _, err := c.Exec(ctx, "SELECT pg_advisory_lock("+replicaAlive+")", *id); err != nil {
			return listenErr(ctx, err)
		}
	}
	var newest int64
	if err := c.QueryRow(ctx, "SELECT COALESCE(MAX(seq), 0) FROM changes").Scan(&newest); err != nil {
		return listenErr(ctx, err)
	}
	fn(newest)
	defer s.leading.Store(false) // the lock goes with the connection
	quiet := false
	for {
		// A connection cut off without failing (a network partition) is
		// noticed by a round trip made whenever no notification came for
		// LeadRetry: TCP alone would take minutes, while PostgreSQL gives
		// the locks to others after about 30 s (the keepalives above). So
		// a leader that cannot reach the database stops leading within
		// LeadRetry + ConnCheck, before another can take over.
		if quiet || !s.leading.Load() {
			if err := s.checkLead(ctx, c); err != nil {
				return listenErr(ctx, err)
			}
		}
		// The wait times out so that a replica that does not lead tries
		// the lock again; the connection stays usable.
		wait, cancel := context.WithTimeout(ctx, LeadRetry)
		n, err := c.WaitForNotification(wait)
		cancel()
		quiet = err != nil && ctx.Err() == nil && wait.Err() != nil
		if quiet {
			continue
		}
		if err != nil {
			return listenErr(ctx, err)
		}
		seq, err := strconv.ParseInt(n.Payload, 10, 64)
		if err != nil {
			return fmt.Errorf("postgres: listen: bad payload %q on %s", n.Payload, n.Channel)
		}
		fn(seq)
	}
}

// checkLead tries to take the jobs lock if this replica does not hold it,
// or checks that the connection still reaches the database if it does,
// within ConnCheck either way.
func (s *Store) checkLead(ctx context.Context, c *pgx.Conn) error {
	cctx, cancel := context.WithTimeout(ctx, ConnCheck)
	defer cancel()
	if s.leading.Load() {
		return c.Ping(cctx)
	}
	var got bool
	if err := c.QueryRow(cctx, "SELECT pg_try_advisory_lock("+jobsLock+")").Scan(&got); err != nil {
		return err
	}
	s.leading.Store(got)
	return nil
}

// Alone reports whether no other process listens (Listen) on this
// database: no other replica is running. Call it before this process
// listens itself.
func (s *Store) Alone(ctx context.Context) (bool, error) {
	var alone bool
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, "SELECT pg_try_advisory_xact_lock("+replicaLock+")").Scan(&alone)
	})
	if err != nil {
		return false, fmt.Errorf("postgres: check for other replicas: %w", err)
	}
	return alone, nil
}

func listenErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	return fmt.Errorf("postgres: listen: %w", err)
}

// Close closes all connections. It is safe to call more than once.
func (s *Store) Close() error {
	s.pool.Close()
	return nil
}

// conn adapts a pool or a transaction to sqlcommon.Conn.
type conn struct {
	c interface {
		Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
		Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	}
}

func (c conn) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	tag, err := c.c.Exec(ctx, query, args...)
	return tag.RowsAffected(), err
}

func (c conn) Query(ctx context.Context, query string, args ...any) (sqlcommon.Rows, error) {
	rows, err := c.c.Query(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	return rows, nil
}
