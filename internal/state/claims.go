package state

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/tailplane/tailplane/internal/store"
)

// claimPrefix starts the settings that record claimed blocks.
const claimPrefix = "claim/"

// claims tracks the blocks of one numbered resource (node ids, or the
// offsets of one address lane) that this process may allocate from.
// Replicas sharing a database allocate only inside blocks they have
// claimed, so two of them registering at once never pick the same id or
// address. With one shared cursor they did again and again: clashes
// chained, and 10,000 joins spread over two replicas took 2.4 times as
// long as through one.
//
// A block is claimed by creating the setting prefix+number, an insert
// that only one replica can win, committed before anything is allocated
// from it (claimBlock), not with the registration that first uses it; the
// group commit may batch it with other writes, and a lost claim fails
// that batch, which is retried by halves. A replica that loses tries the
// next number. While a block is in use the next one is claimed ahead,
// so registrations rarely wait for a claim. Claim numbers only grow; an
// address lane maps them onto its blocks modulo their count, and so wraps
// round. The owner stored in a claim lets a restarted process take up the
// block in use and the one claimed ahead of it.
type claims struct {
	prefix string
	// seq is the block in use, when owned; entered says allocation has
	// not started in it yet.
	seq     uint64
	owned   bool
	entered bool
	// ahead is the block claimed for when seq is full, if hasAhead.
	ahead    uint64
	hasAhead bool
	// want is the number to claim first, if hasWant: the block a database
	// from before claims was filling.
	want    uint64
	hasWant bool
	// top is the highest number claimed by any replica, if anyTop.
	top    uint64
	anyTop bool
	// inflight is closed when the claim being stored is done;
	// aheadQueued says a claim ahead is about to start.
	inflight    chan struct{}
	aheadQueued bool
}

// errNeedBlock is returned by an allocation when its resource has no
// owned block with room: the caller claims one (claimBlock) and retries.
type errNeedBlock struct{ c *claims }

func (e *errNeedBlock) Error() string { return "no claimed block with room in " + e.c.prefix }

// load records the claims among stored settings.
func (c *claims) load(settings map[string][]byte) {
	for k := range settings {
		if n, ok := c.number(k); ok {
			c.observeNumber(n)
		}
	}
}

// resume takes up block seq, where the stored cursor is: owned if its
// claim is stored (with the block claimed ahead of it, if the same
// process claimed that), else to be claimed first when no block ever was.
func (c *claims) resume(seq uint64, settings map[string][]byte) {
	owner, ok := settings[c.key(seq)]
	switch {
	case ok:
		c.seq, c.owned = seq, true
		if next, ok := settings[c.key(seq+1)]; ok && bytes.Equal(next, owner) {
			c.ahead, c.hasAhead = seq+1, true
		}
	case !c.anyTop:
		c.want, c.hasWant = seq, true
	}
}

// leave gives up every block: the next allocation claims a fresh one.
func (c *claims) leave() {
	c.owned, c.hasAhead, c.hasWant = false, false, false
}

// number parses the claim number of a setting key, if it is one of c's.
func (c *claims) number(key string) (uint64, bool) {
	rest, ok := strings.CutPrefix(key, c.prefix)
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(rest, 10, 64)
	return n, err == nil
}

func (c *claims) key(seq uint64) string { return c.prefix + strconv.FormatUint(seq, 10) }

// observe records another replica's claim; it reports whether key is one
// of c's claims.
func (c *claims) observe(key string) bool {
	n, ok := c.number(key)
	if !ok {
		return false
	}
	c.observeNumber(n)
	if c.hasWant && n == c.want {
		c.hasWant = false
	}
	return true
}

func (c *claims) observeNumber(n uint64) {
	if !c.anyTop || n > c.top {
		c.top, c.anyTop = n, true
	}
}

// next is the number the next claim asks for.
func (c *claims) next() uint64 {
	switch {
	case c.hasWant:
		return c.want
	case c.anyTop:
		return c.top + 1
	}
	return 0
}

// ready reports whether there is a block to allocate from, moving to the
// one claimed ahead when the block in use was full before it came.
func (c *claims) ready() bool {
	if !c.owned && c.hasAhead {
		c.advance()
	}
	return c.owned
}

// advance moves from the full block in use to the one claimed ahead; it
// reports false when there is none.
func (c *claims) advance() bool {
	if !c.hasAhead {
		c.owned = false
		return false
	}
	c.seq, c.owned, c.entered, c.hasAhead = c.ahead, true, true, false
	return true
}

// gained records a stored claim of block n, for use now or ahead.
func (c *claims) gained(n uint64, ahead bool) {
	if ahead {
		c.ahead, c.hasAhead = n, true
		return
	}
	c.seq, c.owned, c.entered = n, true, true
}

// claimAhead starts claiming the block after the one in use, unless one
// is claimed or being claimed. Called with s.mu held.
func (s *State) claimAhead(c *claims) {
	if !c.owned || c.hasAhead || c.inflight != nil || c.aheadQueued || s.closing {
		return
	}
	c.aheadQueued = true
	s.background.Go(func() {
		if err := s.claimBlock(context.Background(), c, true); err != nil && !errors.Is(err, errClosed) {
			s.log.Warn("claiming a block ahead failed; the next registration to need it will claim it", "err", err)
		}
	})
}

// claimAttempts bounds how many numbers one claim tries: each failure is
// another replica's claim of the same number, and the next try is past it.
const claimAttempts = 16

// claimBlock stores the claim of a fresh block for c: the block to use now
// (a registration waits for it), or, ahead, the next one. One claim of c
// is stored at a time; a caller that finds one in flight waits for it.
func (s *State) claimBlock(ctx context.Context, c *claims, ahead bool) error {
	for attempt := 1; ; attempt++ {
		s.mu.Lock()
		if ahead {
			c.aheadQueued = false
		}
		if ahead && (c.hasAhead || !c.owned) || !ahead && (c.owned || c.hasAhead) {
			s.mu.Unlock()
			return nil // another caller's claim gave what this one wanted
		}
		if ch := c.inflight; ch != nil {
			s.mu.Unlock()
			if ahead {
				return nil
			}
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		n := c.next()
		c.hasWant = false
		c.observeNumber(n)
		done := make(chan struct{})
		c.inflight = done
		s.mu.Unlock()

		key := c.key(n)
		err := s.putSetting(ctx, key, []byte(s.owner), nil, true)
		s.mu.Lock()
		c.inflight = nil
		close(done)
		if err == nil {
			c.gained(n, ahead)
		}
		s.mu.Unlock()
		if err == nil {
			return nil
		}
		if !errors.Is(err, store.ErrConflict) || attempt == claimAttempts {
			return fmt.Errorf("state: claim %s: %w", key, err)
		}
		if s.following() {
			if err := s.CatchUp(ctx); err != nil {
				return err
			}
		}
	}
}
