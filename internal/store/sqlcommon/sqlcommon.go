// Package sqlcommon holds what the sqlite and postgres stores share: the
// statements each mutation becomes, how rows become values, the change log
// and the migration runner.
//
// Both databases accept the same DML ($n placeholders, ON CONFLICT upserts,
// RETURNING, TRUE/FALSE), and both drivers bind a time.Time and scan one
// into sql.NullTime (the sqlite store configures its driver for that), so
// what differs stays in the backend packages: the DDL, how a transaction
// is run, how a Batch's statements reach the database, and how the driver
// reports a unique violation.
package sqlcommon

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/tailplane/tailplane/internal/store"
)

// Conn is the part of a connection, pool or transaction the shared code
// uses. Each backend adapts its driver to it.
type Conn interface {
	// Exec runs a statement and returns the number of rows it affected.
	Exec(ctx context.Context, query string, args ...any) (rowsAffected int64, err error)
	Query(ctx context.Context, query string, args ...any) (Rows, error)
}

// Rows iterates a query result. pgx.Rows satisfies it as is.
type Rows interface {
	Next() bool
	Scan(dest ...any) error
	Err() error
	Close()
}

// MaxChanges caps the entries one ChangesSince call returns, so a replica
// that fell far behind catches up in bounded steps instead of one huge read.
const MaxChanges = 1000

// insert returns an INSERT of cols into table.
func insert(table string, cols ...string) string {
	ph := make([]string, len(cols))
	for i := range cols {
		ph[i] = fmt.Sprintf("$%d", i+1)
	}
	return fmt.Sprintf("INSERT INTO %s (%s) VALUES (%s)", table, strings.Join(cols, ", "), strings.Join(ph, ", "))
}

// update returns an UPDATE of cols but the first of the row whose first
// column (the primary key) matches; the arguments are those of insert.
func update(table string, cols ...string) string {
	set := make([]string, len(cols)-1)
	for i, c := range cols[1:] {
		set[i] = fmt.Sprintf("%s = $%d", c, i+2)
	}
	return fmt.Sprintf("UPDATE %s SET %s WHERE %s = $1", table, strings.Join(set, ", "), cols[0])
}

// upsert returns an insert that replaces the row whose first column (the
// primary key) matches.
func upsert(table string, cols ...string) string {
	set := make([]string, len(cols)-1)
	for i, c := range cols[1:] {
		set[i] = c + " = excluded." + c
	}
	return fmt.Sprintf("%s ON CONFLICT (%s) DO UPDATE SET %s", insert(table, cols...), cols[0], strings.Join(set, ", "))
}

var (
	userCols = []string{"id", "name", "email", "display_name", "created_at"}
	nodeCols = []string{"id", "machine_key", "node_key", "disco_key", "user_id", "tags", "hostname",
		"given_name", "ipv4", "ipv6", "hostinfo", "endpoints", "auth_key_id", "ephemeral", "expiry",
		"advertised_routes", "approved_routes", "created_at", "last_seen", "online", "holder"}
	keyCols = []string{"id", "secret_hash", "user_id", "reusable", "ephemeral", "tags", "expiration",
		"created_at", "used", "revoked"}

	putUser       = upsert("users", userCols...)
	putNode       = upsert("nodes", nodeCols...)
	putKey        = upsert("pre_auth_keys", keyCols...)
	putSetting    = upsert("settings", "name", "value")
	createUser    = insert("users", userCols...)
	createNode    = insert("nodes", nodeCols...)
	updateNode    = update("nodes", nodeCols...)
	createSetting = insert("settings", "name", "value")

	selectUsers = "SELECT " + strings.Join(userCols, ", ") + " FROM users ORDER BY id"
	selectNodes = "SELECT " + strings.Join(nodeCols, ", ") + " FROM nodes ORDER BY id"
	selectKeys  = "SELECT " + strings.Join(keyCols, ", ") + " FROM pre_auth_keys ORDER BY id"
)

// patchNode holds the UPDATE of each combination of node parts.
var patchNode = map[store.NodePart]string{
	store.NodeClient:                   update("nodes", nodePartCols(store.NodeClient)...),
	store.NodeAdmin:                    update("nodes", nodePartCols(store.NodeAdmin)...),
	store.NodeClient | store.NodeAdmin: update("nodes", nodePartCols(store.NodeClient|store.NodeAdmin)...),
}

const (
	deleteUser = "DELETE FROM users WHERE id = $1"
	deleteNode = "DELETE FROM nodes WHERE id = $1"
	// consumeKey is the check and the consumption in one statement: a key
	// that another transaction consumed or revoked first matches no row.
	consumeKey = "UPDATE pre_auth_keys SET used = TRUE WHERE id = $1 AND NOT used AND NOT revoked AND NOT reusable"
	// keyExists tells a failed consumeKey's ErrNotFound from ErrConflict.
	keyExists     = "SELECT COUNT(*) FROM pre_auth_keys WHERE id = $1"
	appendChange  = "INSERT INTO changes (at, payload) VALUES ($1, $2) RETURNING seq"
	newestChange  = "SELECT COALESCE(MAX(seq), 0) FROM changes"
	selectChanges = "SELECT seq, at, payload FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2"
	// prunedThrough is the highest seq a prune deleted, 0 before any.
	prunedThrough = "SELECT COALESCE(MAX(through), 0) FROM changes_pruned"
	// lastPrunable is the highest seq a prune with cut-off $1 deletes. It
	// spares the newest entry so that MAX(seq), and with it
	// Snapshot.ChangeSeq, never goes backwards.
	lastPrunable = "SELECT COALESCE(MAX(seq), 0) FROM changes WHERE at < $1 AND seq < (SELECT MAX(seq) FROM changes)"
	// pruneChanges is bounded by lastPrunable's result ($2): on PostgreSQL
	// each statement sees what committed before it, and an entry stamped
	// before the cut-off but committed after lastPrunable ran has a higher
	// seq; deleting it would leave a gap the mark does not cover.
	pruneChanges = "DELETE FROM changes WHERE at < $1 AND seq <= $2"
	// markPruned raises the mark to $1, never lowers it: replicas may
	// prune concurrently with different cut-offs.
	markPruned = "INSERT INTO changes_pruned (id, through) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET through = " +
		"CASE WHEN excluded.through > changes_pruned.through THEN excluded.through ELSE changes_pruned.through END"
)

// Stmt is one statement of a Batch.
type Stmt struct {
	SQL  string
	Args []any
	// Scan marks a query returning one row of one integer, which is its
	// result. Other statements are executed; their result is the number
	// of rows they affected.
	Scan bool
}

// Batch is one Apply turned into statements, for the backend to run in
// order in one transaction: SQLite one after the other, PostgreSQL in one
// pipelined round trip. Every mutation is one or two statements whose
// results Result checks afterwards, so no statement depends on the outcome
// of an earlier one.
type Batch struct {
	Stmts    []Stmt
	steps    []step // what Result checks, one per statement
	muts     []store.Mutation
	isUnique func(error) bool
}

type step struct {
	mut   int // index in muts; -1 for the backend's and the change log's statements
	check check
}

type check int

const (
	noCheck check = iota
	// mustAffect: no row affected means ErrNotFound.
	mustAffect
	// consume: no row affected means ErrNotFound or ErrConflict, told
	// apart by the next statement, which counts the rows with the key.
	consume
	// seqResult: the result is the batch's change-log seq.
	seqResult
	// unique: failing on a unique or primary-key violation means
	// ErrConflict.
	unique
)

// NewBatch returns the statements that apply muts and append their
// change-log entry stamped now, surrounded by the backend's own statements
// pre and post. isUnique reports whether a statement's error is a unique
// or primary-key violation, which only the backend's driver can tell.
func NewBatch(muts []store.Mutation, now time.Time, pre, post []Stmt, isUnique func(error) bool) (*Batch, error) {
	b := &Batch{muts: muts, isUnique: isUnique}
	add := func(mut int, c check, st Stmt) {
		b.Stmts = append(b.Stmts, st)
		b.steps = append(b.steps, step{mut, c})
	}
	for _, st := range pre {
		add(-1, noCheck, st)
	}
	norm := make([]store.Mutation, len(muts))
	for i, m := range muts {
		norm[i] = normalize(m)
		switch m := norm[i]; {
		case m.PutUser != nil:
			add(i, noCheck, Stmt{SQL: putUser, Args: userArgs(m.PutUser)})
		case m.CreateUser != nil:
			add(i, unique, Stmt{SQL: createUser, Args: userArgs(m.CreateUser)})
		case m.DeleteUser != 0:
			add(i, mustAffect, Stmt{SQL: deleteUser, Args: []any{int64(m.DeleteUser)}})
		case m.PutNode != nil:
			add(i, noCheck, Stmt{SQL: putNode, Args: nodeArgs(m.PutNode)})
		case m.CreateNode != nil:
			add(i, unique, Stmt{SQL: createNode, Args: nodeArgs(m.CreateNode)})
		case m.UpdateNode != nil:
			add(i, mustAffect, Stmt{SQL: updateNode, Args: nodeArgs(m.UpdateNode)})
		case m.PatchNode != nil:
			q, ok := patchNode[m.PatchNode.Part]
			if !ok {
				return nil, fmt.Errorf("mutation %d patches no known part of node %d (%d)", i, m.PatchNode.Node.ID, m.PatchNode.Part)
			}
			add(i, mustAffect, Stmt{SQL: q, Args: nodePartArgs(m.PatchNode)})
		case m.DeleteNode != 0:
			add(i, mustAffect, Stmt{SQL: deleteNode, Args: []any{int64(m.DeleteNode)}})
		case m.PutKey != nil:
			k := m.PutKey
			add(i, noCheck, Stmt{SQL: putKey, Args: []any{k.ID, k.SecretHash[:], int64(k.UserID), k.Reusable,
				k.Ephemeral, listArg(k.Tags), timeArg(k.Expiration), timeArg(k.CreatedAt), k.Used, k.Revoked}})
		case m.ConsumeKey != "":
			add(i, consume, Stmt{SQL: consumeKey, Args: []any{m.ConsumeKey}})
			add(i, noCheck, Stmt{SQL: keyExists, Args: []any{m.ConsumeKey}, Scan: true})
		case m.PutSetting != nil:
			add(i, noCheck, Stmt{SQL: putSetting, Args: []any{m.PutSetting.Key, bytesArg(m.PutSetting.Value)}})
		case m.CreateSetting != nil:
			add(i, unique, Stmt{SQL: createSetting, Args: []any{m.CreateSetting.Key, bytesArg(m.CreateSetting.Value)}})
		default:
			return nil, fmt.Errorf("mutation %d sets no field", i)
		}
	}
	// The payload holds the mutations as stored, so a replica replaying it
	// ends with exactly the values Load would give it.
	payload, err := json.Marshal(norm)
	if err != nil {
		return nil, fmt.Errorf("encode change: %w", err)
	}
	add(-1, seqResult, Stmt{SQL: appendChange, Args: []any{timeArg(now), string(payload)}, Scan: true})
	for _, st := range post {
		add(-1, noCheck, st)
	}
	return b, nil
}

// Result interprets the outcome of running the batch: results holds the
// results of the statements that succeeded, in order, and err, if not nil,
// is the error of the next statement. It returns the batch's change-log
// seq, or the error of the first mutation that failed, wrapping
// store.ErrConflict if a create found its row taken. The caller commits
// only if the error is nil.
func (b *Batch) Result(results []int64, err error) (int64, error) {
	var seq int64
	for i, r := range results {
		switch b.steps[i].check {
		case mustAffect:
			if r == 0 {
				return 0, b.fail(i, store.ErrNotFound)
			}
		case consume:
			if r == 0 && i+1 < len(results) {
				if results[i+1] == 0 {
					return 0, b.fail(i, store.ErrNotFound)
				}
				return 0, b.fail(i, store.ErrConflict)
			}
		case seqResult:
			seq = r
		}
	}
	if err != nil {
		i := len(results)
		if i < len(b.steps) && b.steps[i].check == unique && b.isUnique(err) {
			err = fmt.Errorf("%w: %w", store.ErrConflict, err)
		}
		return 0, b.fail(i, err)
	}
	return seq, nil
}

// fail adds to err which statement failed, naming the mutation if it was
// one's.
func (b *Batch) fail(i int, err error) error {
	switch {
	case i >= len(b.Stmts):
		return err
	case b.steps[i].mut >= 0:
		m := b.steps[i].mut
		return fmt.Errorf("mutation %d (%s): %w", m, describe(b.muts[m]), err)
	case b.steps[i].check == seqResult:
		return fmt.Errorf("append change: %w", err)
	}
	return fmt.Errorf("%s: %w", b.Stmts[i].SQL, err)
}

func userArgs(u *store.User) []any {
	return []any{int64(u.ID), u.Name, u.Email, u.DisplayName, timeArg(u.CreatedAt)}
}

func nodeArgs(n *store.Node) []any {
	return []any{int64(n.ID), n.MachineKey, n.NodeKey, n.DiscoKey, int64(n.UserID), listArg(n.Tags),
		n.Hostname, n.GivenName, addrArg(n.IPv4), addrArg(n.IPv6), bytesArg(n.Hostinfo),
		listArg(n.Endpoints), n.AuthKeyID, n.Ephemeral, timeArg(n.Expiry),
		listArg(n.AdvertisedRoutes), listArg(n.ApprovedRoutes),
		timeArg(n.CreatedAt), timeArg(n.LastSeen), n.Online, n.Holder}
}

// nodePartCols returns the id column and the columns of part p, in the
// order nodePartArgs gives their values.
func nodePartCols(p store.NodePart) []string {
	cols := []string{"id"}
	if p&store.NodeClient != 0 {
		cols = append(cols, "disco_key", "hostname", "hostinfo", "endpoints", "advertised_routes", "last_seen", "online", "holder")
	}
	if p&store.NodeAdmin != 0 {
		cols = append(cols, "given_name", "tags", "approved_routes", "expiry")
	}
	return cols
}

func nodePartArgs(p *store.NodePatch) []any {
	n := &p.Node
	args := []any{int64(n.ID)}
	if p.Part&store.NodeClient != 0 {
		args = append(args, n.DiscoKey, n.Hostname, bytesArg(n.Hostinfo), listArg(n.Endpoints),
			listArg(n.AdvertisedRoutes), timeArg(n.LastSeen), n.Online, n.Holder)
	}
	if p.Part&store.NodeAdmin != 0 {
		args = append(args, n.GivenName, listArg(n.Tags), listArg(n.ApprovedRoutes), timeArg(n.Expiry))
	}
	return args
}

// describe names a mutation in error messages without dumping its values.
func describe(m store.Mutation) string {
	switch {
	case m.PutUser != nil:
		return fmt.Sprintf("PutUser %d", m.PutUser.ID)
	case m.CreateUser != nil:
		return fmt.Sprintf("CreateUser %d", m.CreateUser.ID)
	case m.DeleteUser != 0:
		return fmt.Sprintf("DeleteUser %d", m.DeleteUser)
	case m.PutNode != nil:
		return fmt.Sprintf("PutNode %d", m.PutNode.ID)
	case m.CreateNode != nil:
		return fmt.Sprintf("CreateNode %d", m.CreateNode.ID)
	case m.UpdateNode != nil:
		return fmt.Sprintf("UpdateNode %d", m.UpdateNode.ID)
	case m.PatchNode != nil:
		return fmt.Sprintf("PatchNode %d", m.PatchNode.Node.ID)
	case m.DeleteNode != 0:
		return fmt.Sprintf("DeleteNode %d", m.DeleteNode)
	case m.PutKey != nil:
		return "PutKey " + m.PutKey.ID
	case m.ConsumeKey != "":
		return "ConsumeKey " + m.ConsumeKey
	case m.PutSetting != nil:
		return "PutSetting " + m.PutSetting.Key
	case m.CreateSetting != nil:
		return "CreateSetting " + m.CreateSetting.Key
	}
	return "no field set"
}

// Load reads the whole state through c, which should be a transaction that
// reads one consistent snapshot.
func Load(ctx context.Context, c Conn) (*store.Snapshot, error) {
	snap := &store.Snapshot{Settings: map[string][]byte{}}
	err := each(ctx, c, selectUsers, nil, func(r Rows) error {
		var u store.User
		var id int64
		var created sql.NullTime
		if err := r.Scan(&id, &u.Name, &u.Email, &u.DisplayName, &created); err != nil {
			return err
		}
		u.ID, u.CreatedAt = uint64(id), timeVal(created)
		snap.Users = append(snap.Users, u)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("load users: %w", err)
	}
	if err := each(ctx, c, selectNodes, nil, func(r Rows) error {
		n, err := scanNode(r)
		snap.Nodes = append(snap.Nodes, n)
		return err
	}); err != nil {
		return nil, fmt.Errorf("load nodes: %w", err)
	}
	if err := each(ctx, c, selectKeys, nil, func(r Rows) error {
		k, err := scanKey(r)
		snap.Keys = append(snap.Keys, k)
		return err
	}); err != nil {
		return nil, fmt.Errorf("load keys: %w", err)
	}
	if err := each(ctx, c, "SELECT name, value FROM settings", nil, func(r Rows) error {
		var name string
		var value []byte
		if err := r.Scan(&name, &value); err != nil {
			return err
		}
		snap.Settings[name] = nilIfEmpty(value)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("load settings: %w", err)
	}
	if err := queryOne(ctx, c, newestChange, nil, &snap.ChangeSeq); err != nil {
		return nil, fmt.Errorf("load change seq: %w", err)
	}
	return snap, nil
}

func scanNode(r Rows) (store.Node, error) {
	var (
		n                              store.Node
		id, userID                     int64
		tags, endpoints, adv, approved string
		ipv4, ipv6                     sql.NullString
		expiry, created, lastSeen      sql.NullTime
	)
	err := r.Scan(&id, &n.MachineKey, &n.NodeKey, &n.DiscoKey, &userID, &tags, &n.Hostname,
		&n.GivenName, &ipv4, &ipv6, &n.Hostinfo, &endpoints, &n.AuthKeyID, &n.Ephemeral, &expiry,
		&adv, &approved, &created, &lastSeen, &n.Online, &n.Holder)
	if err != nil {
		return n, err
	}
	n.ID, n.UserID = uint64(id), uint64(userID)
	n.Hostinfo = nilIfEmpty(n.Hostinfo)
	n.Expiry, n.CreatedAt, n.LastSeen = timeVal(expiry), timeVal(created), timeVal(lastSeen)
	var err4, err6 error
	n.IPv4, err4 = addrVal(ipv4)
	n.IPv6, err6 = addrVal(ipv6)
	err = errors.Join(err4, err6,
		listVal(tags, &n.Tags),
		listVal(endpoints, &n.Endpoints),
		listVal(adv, &n.AdvertisedRoutes),
		listVal(approved, &n.ApprovedRoutes))
	if err != nil {
		return n, fmt.Errorf("node %d: %w", n.ID, err)
	}
	return n, nil
}

func scanKey(r Rows) (store.PreAuthKey, error) {
	var (
		k                  store.PreAuthKey
		hash               []byte
		userID             int64
		tags               string
		expiration, create sql.NullTime
	)
	err := r.Scan(&k.ID, &hash, &userID, &k.Reusable, &k.Ephemeral, &tags, &expiration, &create,
		&k.Used, &k.Revoked)
	if err != nil {
		return k, err
	}
	if len(hash) != len(k.SecretHash) {
		return k, fmt.Errorf("key %s: secret hash is %d bytes, want %d", k.ID, len(hash), len(k.SecretHash))
	}
	copy(k.SecretHash[:], hash)
	k.UserID, k.Expiration, k.CreatedAt = uint64(userID), timeVal(expiration), timeVal(create)
	if err := listVal(tags, &k.Tags); err != nil {
		return k, fmt.Errorf("key %s: %w", k.ID, err)
	}
	return k, nil
}

// ChangesSince returns the change-log entries after seq, oldest first, at
// most MaxChanges of them. If entries after seq were pruned, it returns an
// error wrapping store.ErrPruned.
func ChangesSince(ctx context.Context, c Conn, seq int64) ([]store.Change, error) {
	// The entries are read before the mark. A prune deletes entries and
	// raises the mark in one transaction, and the mark never goes down: if
	// a prune deleted entries after seq before they were read, the mark
	// read next shows it. Had the mark been read first, it could predate
	// a prune that commits before the entries are read, and the gap would
	// go unseen. This order at worst reports a prune that came too late
	// to matter.
	var changes []store.Change
	err := each(ctx, c, selectChanges, []any{seq, MaxChanges}, func(r Rows) (err error) {
		var ch store.Change
		var at sql.NullTime
		var payload string
		if err := r.Scan(&ch.Seq, &at, &payload); err != nil {
			return err
		}
		ch.At = timeVal(at)
		if ch.Mutations, err = decodeMutations(payload); err != nil {
			return fmt.Errorf("change %d: %w", ch.Seq, err)
		}
		changes = append(changes, ch)
		return nil
	})
	if err != nil {
		return nil, err
	}
	var through int64
	if err := queryOne(ctx, c, prunedThrough, nil, &through); err != nil {
		return nil, fmt.Errorf("read pruned-through mark: %w", err)
	}
	if seq < through {
		return nil, fmt.Errorf("%w through %d", store.ErrPruned, through)
	}
	return changes, nil
}

// decodeMutations decodes a change-log entry's payload. Fields it does not
// know are an error, not ignored: they were written by a newer version (a
// new kind of mutation, or a new column), and applying the rest would leave
// this replica's memory silently out of step.
func decodeMutations(payload string) ([]store.Mutation, error) {
	d := json.NewDecoder(strings.NewReader(payload))
	d.DisallowUnknownFields()
	var muts []store.Mutation
	if err := d.Decode(&muts); err != nil {
		if strings.HasPrefix(err.Error(), "json: unknown field") {
			return nil, fmt.Errorf("%w: %v", store.ErrNewerChange, err)
		}
		return nil, err
	}
	return muts, nil
}

// PruneChanges deletes the change-log entries stamped before before,
// except the newest entry, raises the pruned-through mark to the highest
// seq it deleted, and returns how many it deleted. tx must be a
// transaction, so that no reader sees the entries gone but the mark not
// yet raised.
func PruneChanges(ctx context.Context, tx Conn, before time.Time) (int64, error) {
	// With nothing to prune, through is 0: the delete matches nothing and
	// the mark keeps its value.
	var through int64
	if err := queryOne(ctx, tx, lastPrunable, []any{timeArg(before)}, &through); err != nil {
		return 0, fmt.Errorf("find entries to prune: %w", err)
	}
	n, err := tx.Exec(ctx, pruneChanges, timeArg(before), through)
	if err != nil {
		return 0, fmt.Errorf("delete entries: %w", err)
	}
	if _, err := tx.Exec(ctx, markPruned, through); err != nil {
		return 0, fmt.Errorf("raise pruned-through mark: %w", err)
	}
	return n, nil
}

// each runs query and calls fn for every row.
func each(ctx context.Context, c Conn, query string, args []any, fn func(Rows) error) error {
	rows, err := c.Query(ctx, query, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		if err := fn(rows); err != nil {
			return err
		}
	}
	return rows.Err()
}

// queryOne scans the single row query returns into dest.
func queryOne(ctx context.Context, c Conn, query string, args []any, dest ...any) error {
	found := false
	err := each(ctx, c, query, args, func(r Rows) error {
		found = true
		return r.Scan(dest...)
	})
	if err == nil && !found {
		err = sql.ErrNoRows
	}
	return err
}
