package state

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/tailplane/tailplane/internal/store"
)

// maxCommitBatch bounds how many requests share one transaction, so a huge
// burst still commits in steps of bounded latency.
const maxCommitBatch = 512

// commitReq is one caller's mutations; done receives the outcome (nil
// done: fire and forget, failures are logged).
type commitReq struct {
	muts []store.Mutation
	done chan error
}

// committer funnels every write through one goroutine so that concurrent
// callers share transactions (group commit): while one transaction runs,
// the next batch accumulates.
type committer struct {
	st      store.Store
	reqs    chan *commitReq
	log     *slog.Logger
	metrics CommitObserver
	stopped chan struct{}

	// closeMu orders sends against close: senders hold it shared.
	closeMu sync.RWMutex
	closed  bool

	// writeMu is held across each Apply until it is recorded in own, so
	// a follower that read an entry can wait to learn whether it is ours.
	writeMu sync.Mutex
	own     ownWrites
}

// errClosed is returned for writes after the state was closed.
var errClosed = errors.New("state is shut down")

// CommitObserver receives the size and duration of every group commit.
type CommitObserver func(requests int, d time.Duration)

func newCommitter(st store.Store, log *slog.Logger, obs CommitObserver) *committer {
	c := &committer{st: st, reqs: make(chan *commitReq, 4096), log: log, metrics: obs, stopped: make(chan struct{})}
	go c.run()
	return c
}

// pend marks the rows of muts as being written by this process (see
// ownWrites); every commit and commitAsync needs one pend first, made
// under the state lock together with the change to memory.
func (c *committer) pend(muts []store.Mutation) { c.own.pend(muts) }

// commit makes muts durable and waits for it.
func (c *committer) commit(ctx context.Context, muts []store.Mutation) error {
	r := &commitReq{muts: muts, done: make(chan error, 1)}
	c.closeMu.RLock()
	if c.closed {
		c.closeMu.RUnlock()
		c.own.unpend(muts, true)
		return errClosed
	}
	select {
	case c.reqs <- r:
		c.closeMu.RUnlock()
	case <-ctx.Done():
		c.closeMu.RUnlock()
		c.own.unpend(muts, true)
		return ctx.Err()
	}
	// Once queued the write happens regardless of ctx: the caller must
	// learn its outcome to keep memory and disk in step.
	return <-r.done
}

// commitAsync queues muts without waiting; used for soft state such as
// endpoints and last-seen times whose loss on a crash is harmless.
func (c *committer) commitAsync(muts []store.Mutation) {
	c.closeMu.RLock()
	defer c.closeMu.RUnlock()
	if c.closed {
		c.own.unpend(muts, true)
		return
	}
	select {
	case c.reqs <- &commitReq{muts: muts}:
	default:
		c.own.unpend(muts, true)
		c.log.Warn("commit queue full; dropping soft-state write", "mutations", len(muts))
	}
}

// close flushes queued writes and stops; later writes fail with errClosed.
func (c *committer) close() {
	c.closeMu.Lock()
	if !c.closed {
		c.closed = true
		close(c.reqs)
	}
	c.closeMu.Unlock()
	<-c.stopped
}

func (c *committer) run() {
	defer close(c.stopped)
	batch := make([]*commitReq, 0, maxCommitBatch)
	for r := range c.reqs {
		batch = append(batch[:0], r)
	fill:
		for len(batch) < maxCommitBatch {
			select {
			case r2, ok := <-c.reqs:
				if !ok {
					break fill
				}
				batch = append(batch, r2)
			default:
				break fill
			}
		}
		c.apply(batch)
	}
}

func (c *committer) apply(batch []*commitReq) {
	start := time.Now()
	var all []store.Mutation
	for _, r := range batch {
		all = append(all, r.muts...)
	}
	_, err := c.applyMuts(all)
	if c.metrics != nil {
		c.metrics(len(batch), time.Since(start))
	}
	if err == nil || len(batch) == 1 {
		for _, r := range batch {
			c.finish(r, err)
		}
		return
	}
	// One request's failure must not fail its neighbours: each half is
	// tried again, down to the failing requests alone, in order. Retrying
	// each request alone cost a transaction per request: among replicas a
	// lost block claim failed a batch of hundreds of registrations every
	// few hundred, and the requests queued behind waited for hundreds of
	// commits in a row (register p99 of seconds). Halving costs about
	// 2·log2(n) transactions for one failing request.
	mid := len(batch) / 2
	c.apply(batch[:mid])
	c.apply(batch[mid:])
}

// applyMuts applies one transaction and, while the state follows other
// replicas, records it as this process's own.
func (c *committer) applyMuts(muts []store.Mutation) (int64, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	seq, err := c.st.Apply(context.Background(), muts)
	if err == nil {
		c.own.committed(seq, muts)
	}
	return seq, err
}

// takeOwn returns the seqs up to upTo that this process wrote, and forgets
// them. Any transaction whose entry a follower has read has committed, so
// waiting for writeMu is waiting for its Apply to return and record it.
func (c *committer) takeOwn(upTo int64) map[int64]bool {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	return c.own.take(upTo)
}

func (c *committer) finish(r *commitReq, err error) {
	c.own.unpend(r.muts, err != nil)
	if r.done != nil {
		r.done <- err
		return
	}
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		c.log.Error("soft-state write failed", "err", err)
	}
}
