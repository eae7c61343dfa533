package state

// idBlock is how many node ids a replica claims at a time.
const idBlock = 256

// idAllocator hands out node ids from claimed blocks (see claims): block
// n holds ids n*idBlock+1 to (n+1)*idBlock.
type idAllocator struct {
	next   uint64
	claims claims
}

// newIDAllocator continues after the highest id in use, in the block that
// holds it.
func newIDAllocator(next uint64, settings map[string][]byte) *idAllocator {
	a := &idAllocator{next: next, claims: claims{prefix: claimPrefix + "node_id/"}}
	a.claims.load(settings)
	a.claims.resume((next-1)/idBlock, settings)
	return a
}

// allocate returns a free id from the owned blocks, or errNeedBlock; taken
// reports the ids in use (a database from before claims may hold other
// replicas' nodes in any block).
func (a *idAllocator) allocate(taken func(uint64) bool) (uint64, error) {
	c := &a.claims
	for c.ready() {
		if c.entered {
			if a.next <= c.seq*idBlock || a.next > (c.seq+1)*idBlock {
				a.next = c.seq*idBlock + 1
			}
			c.entered = false
		}
		if a.next > (c.seq+1)*idBlock {
			c.advance()
			continue
		}
		id := a.next
		a.next++
		if !taken(id) {
			return id, nil
		}
	}
	return 0, &errNeedBlock{c}
}

// unallocate gives back id, the last one allocated, when the registration
// it was for could not go on.
func (a *idAllocator) unallocate(id uint64) {
	if id+1 == a.next {
		a.next = id
	}
}

// leaveIfIn gives up the blocks if id is in one of them.
func (a *idAllocator) leaveIfIn(id uint64) {
	c := &a.claims
	if b := (id - 1) / idBlock; c.owned && b == c.seq || c.hasAhead && b == c.ahead {
		c.leave()
	}
}
