package state

import (
	"sync"
	"sync/atomic"

	"github.com/tailplane/tailplane/internal/store"
)

// row names what one mutation writes: a user, a part of a node (see
// nodeRows) or a key by id, or a setting by name.
type row struct {
	kind byte // 'u', 'n', 'c', 'a', 'k' or 's'
	id   uint64
	name string
}

// A node is three rows: the core written only whole ('n'), and the parts
// its client ('c') and its admins ('a') write on their own
// (store.NodePart). Tracking them apart lets another replica's write of one
// part apply while this one's write of another is in flight.
var nodeRows = []struct {
	kind byte
	part store.NodePart
}{{'n', 0}, {'c', store.NodeClient}, {'a', store.NodeAdmin}}

// eachRow calls fn with each row m writes.
func eachRow(m store.Mutation, fn func(row)) {
	node := func(id uint64, parts store.NodePart, whole bool) {
		for _, nr := range nodeRows {
			if whole || parts&nr.part != 0 {
				fn(row{kind: nr.kind, id: id})
			}
		}
	}
	switch {
	case m.PutUser != nil:
		fn(row{kind: 'u', id: m.PutUser.ID})
	case m.CreateUser != nil:
		fn(row{kind: 'u', id: m.CreateUser.ID})
	case m.DeleteUser != 0:
		fn(row{kind: 'u', id: m.DeleteUser})
	case m.PutNode != nil:
		node(m.PutNode.ID, 0, true)
	case m.CreateNode != nil:
		node(m.CreateNode.ID, 0, true)
	case m.UpdateNode != nil:
		node(m.UpdateNode.ID, 0, true)
	case m.PatchNode != nil:
		node(m.PatchNode.Node.ID, m.PatchNode.Part, false)
	case m.DeleteNode != 0:
		node(m.DeleteNode, 0, true)
	case m.PutKey != nil:
		fn(row{kind: 'k', name: m.PutKey.ID})
	case m.ConsumeKey != "":
		fn(row{kind: 'k', name: m.ConsumeKey})
	case m.PutSetting != nil:
		fn(row{kind: 's', name: m.PutSetting.Key})
	case m.CreateSetting != nil:
		fn(row{kind: 's', name: m.CreateSetting.Key})
	}
}

// ownWrites tracks, while the state follows other replicas, the rows this
// process is writing and has written, so that the follower never puts an
// older version from another replica over a newer one of this process:
// memory then ends as the change log does, with each row's last write.
//
// A row is pending from the moment a command changes it in memory (under
// the state lock, pend) until its commit is done (unpend); a committed
// write is recorded (committed) before it stops being pending, and stays
// until the follower has read (take) and applied (passed) past its entry.
// A write still pending will commit after every entry the follower can
// read now, unless it fails: then the other replicas' entries skipped for
// its rows must be read again and applied (redo), as when another replica
// created a node with the id this one's failed registration had picked.
type ownWrites struct {
	on      atomic.Bool
	mu      sync.Mutex
	pending map[row]int
	seqs    map[int64]bool // own entries the follower has not passed
	latest  map[row]int64  // each row's newest own entry among seqs
	skipped map[row]int64  // the first entry skipped while a row was pending
	redo    map[row]int64  // rows whose skipped entries must apply after all
}

// start begins tracking.
func (o *ownWrites) start() {
	o.mu.Lock()
	o.pending, o.seqs, o.latest = map[row]int{}, map[int64]bool{}, map[row]int64{}
	o.skipped, o.redo = map[row]int64{}, map[row]int64{}
	o.mu.Unlock()
	o.on.Store(true)
}

// active reports whether the state follows other replicas.
func (o *ownWrites) active() bool { return o.on.Load() }

// pend marks the rows of muts as being written. Call it under the state
// lock, in the step that changes memory, and pair it with one commit.
func (o *ownWrites) pend(muts []store.Mutation) {
	if !o.active() {
		return
	}
	o.mu.Lock()
	for _, m := range muts {
		eachRow(m, func(r row) { o.pending[r]++ })
	}
	o.mu.Unlock()
}

// unpend ends pend's marks once the write is committed (failed false) or
// has failed.
func (o *ownWrites) unpend(muts []store.Mutation, failed bool) {
	if !o.active() {
		return
	}
	o.mu.Lock()
	for _, m := range muts {
		eachRow(m, func(r row) {
			if o.pending[r]--; o.pending[r] > 0 {
				return
			}
			delete(o.pending, r)
			if seq, ok := o.skipped[r]; ok {
				delete(o.skipped, r)
				if prev, ok := o.redo[r]; failed && (!ok || seq < prev) {
					o.redo[r] = seq
				}
			}
		})
	}
	o.mu.Unlock()
}

// takeRedo returns the rows whose entries the follower skipped for a
// write of this process that then failed, with the first entry of each
// to read again, and forgets them.
func (o *ownWrites) takeRedo() map[row]int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.redo) == 0 {
		return nil
	}
	out := o.redo
	o.redo = map[row]int64{}
	return out
}

// redoLater gives back rows takeRedo returned, when reading them failed.
func (o *ownWrites) redoLater(rows map[row]int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for r, seq := range rows {
		if prev, ok := o.redo[r]; !ok || seq < prev {
			o.redo[r] = seq
		}
	}
}

// committed records muts as this process's change-log entry seq.
func (o *ownWrites) committed(seq int64, muts []store.Mutation) {
	if !o.active() {
		return
	}
	o.mu.Lock()
	o.seqs[seq] = true
	for _, m := range muts {
		eachRow(m, func(r row) { o.latest[r] = max(o.latest[r], seq) })
	}
	o.mu.Unlock()
}

// take returns the own entries up to upTo and forgets them as entries;
// they still hide older entries of their rows until passed.
func (o *ownWrites) take(upTo int64) map[int64]bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := map[int64]bool{}
	for seq := range o.seqs {
		if seq <= upTo {
			out[seq] = true
			delete(o.seqs, seq)
		}
	}
	return out
}

// passed forgets the own writes up to upTo once the follower has applied
// every entry up to there: no older entry of their rows is left to hide.
func (o *ownWrites) passed(upTo int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for r, seq := range o.latest {
		if seq <= upTo {
			delete(o.latest, r)
		}
	}
}

// newer reports whether this process holds a newer version of r than
// another replica's entry seq: one being written, or written after it.
func (o *ownWrites) newer(r row, seq int64) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.pending[r] > 0 {
		if first, ok := o.skipped[r]; !ok || seq < first {
			o.skipped[r] = seq
		}
		return true
	}
	return o.latest[r] > seq
}
