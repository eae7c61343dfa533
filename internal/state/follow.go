package state

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/store"
)

// Follower is a store that other replicas write to as well: its change log
// and the notifications of new entries (postgres.Store is one).
type Follower interface {
	// ChangesSince returns the change-log entries after seq, oldest
	// first, in bounded steps (call again until none is returned).
	ChangesSince(ctx context.Context, seq int64) ([]store.Change, error)
	// Listen calls fn when entries may have been added, starting with one
	// call right after it subscribed, until ctx ends or the connection
	// fails.
	Listen(ctx context.Context, fn func(seq int64)) error
}

// Retry delays of the follower after a failed catch-up or a lost
// notification connection.
const (
	followRetryMin = 500 * time.Millisecond
	followRetryMax = 30 * time.Second
)

// Follow makes the state a replica of the tailnet kept in f: changes other
// replicas commit reach memory, and the sinks, within a notification's
// round trip. Entries this process wrote are skipped; they are in memory
// already. It starts the follower's goroutines, which end with ctx. Call
// it once, right after New and before the state serves anything, so that
// every write of this process is known as its own.
//
// The returned channel receives the error that stops the follower for
// good: the change log was pruned past the entries it had yet to read
// (store.ErrPruned), so only loading the whole state again (a restart)
// brings this replica back in step; or another replica wrote a change
// this version cannot apply (store.ErrNewerChange), so only an upgrade
// does.
func (s *State) Follow(ctx context.Context, f Follower) <-chan error {
	fatal := make(chan error, 1)
	s.followMu.Lock()
	s.follower = f
	s.followMu.Unlock()
	s.commit.own.start()
	wake := make(chan struct{}, 1)
	poke := func(int64) {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
	go func() {
		delay := followRetryMin
		for {
			start := time.Now()
			err := f.Listen(ctx, poke)
			if ctx.Err() != nil {
				return
			}
			if time.Since(start) > followRetryMax {
				delay = followRetryMin // it had worked for a while
			}
			s.log.Warn("lost the change notifications of other replicas; reconnecting", "err", err, "retry_in", delay)
			if !sleepCtx(ctx, delay) {
				return
			}
			delay = min(2*delay, followRetryMax)
		}
	}()
	go func() {
		delay := followRetryMin
		for {
			select {
			case <-ctx.Done():
				return
			case <-wake:
			}
			if err := s.CatchUp(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				if errors.Is(err, store.ErrPruned) || errors.Is(err, store.ErrNewerChange) {
					// Serving on would hand clients a tailnet this
					// replica no longer follows.
					fatal <- err
					return
				}
				s.log.Error("reading other replicas' changes failed; retrying", "err", err, "retry_in", delay)
				poke(0)
				if !sleepCtx(ctx, delay) {
					return
				}
				delay = min(2*delay, followRetryMax)
				continue
			}
			delay = followRetryMin
		}
	}()
	return fatal
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// following reports whether the state follows other replicas (Follow).
func (s *State) following() bool { return s.commit.own.active() }

// CatchUp applies every change other replicas committed since the last one
// applied, and reports them to the sinks. It returns at once for a state
// that does not follow a store.
func (s *State) CatchUp(ctx context.Context) error {
	s.followMu.Lock()
	defer s.followMu.Unlock()
	if s.follower == nil {
		return nil
	}
	if err := s.redo(ctx); err != nil {
		return err
	}
	for {
		changes, err := s.follower.ChangesSince(ctx, s.seq)
		switch {
		case errors.Is(err, store.ErrPruned):
			return fmt.Errorf("this replica fell behind the other replicas' change log and must restart to reload the tailnet: %w", err)
		case errors.Is(err, store.ErrNewerChange):
			return fmt.Errorf("another replica runs a newer tailplane and wrote a change this version cannot apply; upgrade this replica: %w", err)
		case err != nil:
			return fmt.Errorf("state: read changes after %d: %w", s.seq, err)
		}
		if len(changes) == 0 {
			return nil
		}
		own := s.commit.takeOwn(changes[len(changes)-1].Seq)
		var evs []Event
		s.mu.Lock()
		for _, ch := range changes {
			if !own[ch.Seq] {
				evs = s.applyChangeLocked(ch, nil, evs)
			}
			s.seq = ch.Seq
		}
		s.commit.own.passed(s.seq)
		s.mu.Unlock()
		for _, ev := range evs {
			s.emit(ev)
		}
	}
}

// redo applies, up to the last entry read, the entries of rows that the
// follower skipped for a write of this process that then failed: they are
// the rows' last versions after all. Other rows' entries are not applied
// again. Call it with followMu held.
func (s *State) redo(ctx context.Context) error {
	rows := s.commit.own.takeRedo()
	from := s.seq
	for _, seq := range rows {
		from = min(from, seq-1)
	}
	for from < s.seq {
		changes, err := s.follower.ChangesSince(ctx, from)
		if err != nil {
			s.commit.own.redoLater(rows) // the next catch-up tries again
			return fmt.Errorf("state: read changes after %d again: %w", from, err)
		}
		var evs []Event
		s.mu.Lock()
		for _, ch := range changes {
			if ch.Seq > s.seq {
				break
			}
			evs = s.applyChangeLocked(ch, func(r row) bool { first, ok := rows[r]; return ok && ch.Seq >= first }, evs)
			from = ch.Seq
		}
		s.mu.Unlock()
		for _, ev := range evs {
			s.emit(ev)
		}
		if len(changes) == 0 || changes[len(changes)-1].Seq > s.seq {
			break
		}
	}
	return nil
}

// applyChangeLocked applies another replica's committed change to memory,
// only its mutations of the rows only selects when it is not nil, and
// appends the events it causes to evs.
func (s *State) applyChangeLocked(ch store.Change, only func(row) bool, evs []Event) []Event {
	for _, m := range ch.Mutations {
		// The rows to apply: asked for, and not hidden by this process's
		// later write, which stands. Every row is asked about, so that
		// the pending ones record what they hid.
		var buf [3]row // a node's rows, the most one mutation writes
		apply, hidden := buf[:0], 0
		eachRow(m, func(r row) {
			switch {
			case only != nil && !only(r):
			case s.commit.own.newer(r, ch.Seq):
				hidden++
			default:
				apply = append(apply, r)
			}
		})
		if len(apply) == 0 || m.DeleteNode != 0 && hidden > 0 {
			// A node is deleted whole or not at all: a write of this
			// process hiding the deletion fails, and the deletion is
			// then applied after all (redo).
			continue
		}
		switch {
		case m.PutUser != nil || m.CreateUser != nil:
			su := m.PutUser
			if su == nil {
				su = m.CreateUser
			}
			u := fromStoreUser(su)
			if old := s.users[u.ID]; old != nil && s.usersByName[old.Name] == old {
				delete(s.usersByName, old.Name)
			}
			s.users[u.ID] = u
			s.usersByName[u.Name] = u
			s.nextUserID = max(s.nextUserID, u.ID+1)
			evs = append(evs, Event{Kind: UsersChanged, Foreign: true})
		case m.DeleteUser != 0:
			if u := s.users[m.DeleteUser]; u != nil {
				delete(s.users, u.ID)
				if s.usersByName[u.Name] == u {
					delete(s.usersByName, u.Name)
				}
			}
			for id, k := range s.keys {
				if k.UserID == m.DeleteUser {
					delete(s.keys, id) // the store deletes them with the user
				}
			}
			evs = append(evs, Event{Kind: UsersChanged, Foreign: true})
		case m.PutNode != nil || m.CreateNode != nil || m.UpdateNode != nil || m.PatchNode != nil:
			sn := cmp.Or(m.PutNode, m.CreateNode, m.UpdateNode)
			if m.PatchNode != nil {
				sn = &m.PatchNode.Node
			}
			n, core, err := s.mergeNodeLocked(sn, apply)
			if err != nil {
				s.log.Error("skipping another replica's node that does not decode", "node", sn.ID, "change", ch.Seq, "err", err)
				continue
			}
			if n == nil {
				continue // a part of a node this replica no longer has
			}
			old := s.nodes[n.ID]
			if old != nil {
				s.unindexNode(old)
			}
			s.indexNode(n)
			if core { // only a whole write moves a node's addresses
				if old != nil {
					s.ips.release(old.IPv4, old.IPv6)
				}
				s.ips.markUsed(n.IPv4, n.IPv6)
			}
			if m.CreateNode != nil {
				// Another replica allocating in a block this one uses
				// (both took it up at start, each thinking itself alone):
				// this one moves on.
				s.ids.leaveIfIn(n.ID)
				s.ips.leaveIfIn(n.IPv4)
			}
			evs = append(evs, Event{Kind: NodeChanged, NodeID: n.ID, Foreign: true})
		case m.DeleteNode != 0:
			if n := s.nodes[m.DeleteNode]; n != nil {
				s.unindexNode(n)
				s.ips.release(n.IPv4, n.IPv6)
			}
			evs = append(evs, Event{Kind: NodeChanged, NodeID: m.DeleteNode, Foreign: true})
		case m.PutKey != nil:
			k := *m.PutKey
			s.keys[k.ID] = &k
		case m.ConsumeKey != "":
			if k := s.keys[m.ConsumeKey]; k != nil {
				c := *k
				c.Used = true
				s.keys[c.ID] = &c
			}
		case m.PutSetting != nil:
			evs = s.applySettingLocked(m.PutSetting.Key, m.PutSetting.Value, ch.Seq, evs)
		case m.CreateSetting != nil:
			evs = s.applySettingLocked(m.CreateSetting.Key, m.CreateSetting.Value, ch.Seq, evs)
		}
	}
	return evs
}

// mergeNodeLocked returns the node sn's rows apply (a subset of the rows
// its mutation writes) make of the one in memory, and whether they include
// its core; nil if sn writes parts of a node not in memory.
func (s *State) mergeNodeLocked(sn *store.Node, apply []row) (n *Node, core bool, err error) {
	var parts store.NodePart
	for _, r := range apply {
		for _, nr := range nodeRows {
			if r.kind == nr.kind {
				parts |= nr.part
				core = core || nr.kind == 'n'
			}
		}
	}
	if old := s.nodes[sn.ID]; old != nil {
		n = old.clone()
	} else if !core {
		return nil, false, nil
	} else {
		n = new(Node)
	}
	if core {
		if err := decodeCore(n, sn); err != nil {
			return nil, false, err
		}
	}
	if err := decodeParts(n, sn, parts); err != nil {
		return nil, false, err
	}
	return n, core, nil
}

// applySettingLocked applies another replica's setting: a policy becomes
// the active one, a claim of a block keeps this replica out of it. The
// other's address cursors do not move this replica's: it allocates in
// blocks of its own.
func (s *State) applySettingLocked(name string, value []byte, seq int64, evs []Event) []Event {
	s.settings[name] = value
	if s.ids.claims.observe(name) || s.ips.observeClaim(name) {
		return evs
	}
	switch name {
	case SettingPolicy:
		p := policy.Default()
		if len(value) > 0 {
			var err error
			if p, err = policy.Parse(value); err != nil {
				// The other replica accepted it; this one's parser may be
				// older. Keep the active policy rather than open up.
				s.log.Error("another replica set a policy this one cannot parse; keeping the active policy", "change", seq, "err", err)
				return evs
			}
		}
		s.pol, s.polText = p, value
		evs = append(evs, Event{Kind: PolicyChanged, Foreign: true})
	}
	return evs
}

// retryConflict runs op again after catching up with the other replicas
// when it failed because one of them committed a clashing change first
// (an id, address or name taken, a one-off key consumed): catching up
// makes the next attempt see it. A state that does not follow returns
// op's error as is.
//
// Replicas registering at the same time keep picking the same ids and
// addresses, so the attempts are spaced by a random pause that grows:
// one side gets ahead and the clashes stop.
func (s *State) retryConflict(ctx context.Context, op func() error) error {
	const attempts = 8
	for i := 1; ; i++ {
		err := op()
		if err == nil || !errors.Is(err, store.ErrConflict) || !s.following() || i == attempts {
			return err
		}
		if !sleepCtx(ctx, rand.N(time.Duration(i)*2*time.Millisecond)) {
			return err
		}
		if cerr := s.CatchUp(ctx); cerr != nil {
			return errors.Join(err, cerr)
		}
		// Caught up, both replicas would take the next user id again: a
		// random step apart, the next attempts rarely meet. (Node ids and
		// addresses come from blocks each replica claimed for itself.)
		s.mu.Lock()
		s.nextUserID += 1 + rand.Uint64N(64)
		s.mu.Unlock()
	}
}
