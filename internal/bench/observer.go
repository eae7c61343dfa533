package bench

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/util/zstdframe"
)

// zstdMagic starts every zstd frame (RFC 8878, little-endian 0xFD2FB528).
const zstdMagic = 0xFD2FB528

var errDecode = errors.New("undecodable map message")

// observer is the peer-set tracker of one observing client. It applies map
// messages the way tailscaled's map session does: a non-empty Peers is the
// complete list, otherwise PeersChanged / PeersRemoved / PeersChangedPatch /
// OnlineChange are deltas against the previous state. Only the client's own
// goroutine touches it; what others need to see goes to the shared
// convergence state.
type observer struct {
	slot  int                     // index into convergence.obs
	peers map[tailcfg.NodeID]bool // peer -> online
	conv  *convergence
	errs  *errorCounts

	buf, dec []byte              // reused message and decompression buffers
	resp     tailcfg.MapResponse // reused to decode into
}

func newObserver(slot int, conv *convergence, errs *errorCounts) *observer {
	return &observer{
		slot:  slot,
		peers: make(map[tailcfg.NodeID]bool),
		conv:  conv,
		errs:  errs,
	}
}

// resetStream forgets the peer set when a new stream starts: its first
// message carries the full set again.
func (o *observer) resetStream(now time.Time) {
	clear(o.peers)
	o.conv.update(o.slot, now, func(s *ObserverResult) {
		s.Peers, s.Online, s.synced = 0, 0, false
	})
}

// setConnected records whether the observer's stream is open.
func (o *observer) setConnected(connected bool) {
	o.conv.update(o.slot, time.Now(), func(s *ObserverResult) { s.Connected = connected })
}

// read reads a message body of size bytes from r and applies it.
func (o *observer) read(r io.Reader, size int64) error {
	o.buf = slices.Grow(o.buf[:0], int(size))[:size]
	if _, err := io.ReadFull(r, o.buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	data := o.buf
	if len(data) >= 4 && binary.LittleEndian.Uint32(data) == zstdMagic {
		var err error
		o.dec, err = zstdframe.AppendDecode(o.dec[:0], data, zstdframe.MaxDecodedSize(maxMessageSize))
		if err != nil {
			return fmt.Errorf("%w: zstd: %v", errDecode, err)
		}
		data = o.dec
	}
	o.resp = tailcfg.MapResponse{}
	if err := json.Unmarshal(data, &o.resp); err != nil {
		return fmt.Errorf("%w: json: %v", errDecode, err)
	}
	o.apply(&o.resp, len(data), time.Now())
	return nil
}

func (o *observer) apply(m *tailcfg.MapResponse, decoded int, now time.Time) {
	full := len(m.Peers) > 0
	if full {
		clear(o.peers)
		for _, p := range m.Peers {
			o.peers[p.ID] = p.Online != nil && *p.Online
		}
	} else {
		for _, id := range m.PeersRemoved {
			delete(o.peers, id)
		}
		for _, p := range m.PeersChanged {
			o.peers[p.ID] = p.Online != nil && *p.Online
		}
		for _, p := range m.PeersChangedPatch {
			if _, ok := o.peers[p.NodeID]; !ok {
				// A patch must refer to a peer the client already has;
				// tailscaled would ignore it, so it is a server bug.
				o.errs.add("map_patch_unknown_peer", fmt.Errorf("patch for unknown peer %d", p.NodeID))
				continue
			}
			if p.Online != nil {
				o.peers[p.NodeID] = *p.Online
			}
		}
		for id, online := range m.OnlineChange {
			if _, ok := o.peers[id]; ok {
				o.peers[id] = online
			}
		}
	}
	online := 0
	for _, on := range o.peers {
		if on {
			online++
		}
	}
	o.conv.update(o.slot, now, func(s *ObserverResult) {
		s.Messages++
		s.DecodedBytes += int64(decoded)
		switch {
		case m.KeepAlive:
			s.KeepAlives++
		case full:
			s.FullMaps++
		}
		s.Peers, s.Online, s.synced = len(o.peers), online, true
	})
}

// convergence is the observers' state as the rest of the run sees it.
type convergence struct {
	mu        sync.Mutex
	obs       []ObserverResult
	converged int       // observers whose peer set has the expected size
	allAt     time.Time // when converged last became len(obs); zero if not all now
}

// add registers an observer of client; expected < 0 means its expected
// peer count is not known yet (see setExpected).
func (c *convergence) add(client, expected int) int {
	c.obs = append(c.obs, ObserverResult{Client: client, Expected: expected})
	return len(c.obs) - 1
}

// update changes observer slot's state with f and maintains the count of
// converged observers and the instant they all were.
func (c *convergence) update(slot int, now time.Time, f func(*ObserverResult)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &c.obs[slot]
	peers, synced := s.Peers, s.synced
	f(s)
	if s.Peers != peers || s.synced != synced {
		s.peersAt = now
	}
	c.recheckLocked(s)
}

// clients returns the client index of every observer slot.
func (c *convergence) clients() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]int, len(c.obs))
	for i, s := range c.obs {
		out[i] = s.Client
	}
	return out
}

// setExpected sets observer slot's expected peer count, for expectations
// known only after the clients joined (Options.Expect). An observer that
// already has that many peers converged when it got them, not now.
func (c *convergence) setExpected(slot, expected int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &c.obs[slot]
	s.Expected = expected
	c.recheckLocked(s)
}

// recheckLocked recomputes s.Converged. An observer has converged when its
// stream delivered at least one message and its peer set has the expected
// size; it did so when its peer count last changed. All observers have
// converged at the latest of their instants.
func (c *convergence) recheckLocked(s *ObserverResult) {
	was := s.Converged
	s.Converged = s.synced && s.Expected >= 0 && s.Peers == s.Expected
	switch {
	case s.Converged && !was:
		s.convergedAt = s.peersAt
		c.converged++
		if c.converged == len(c.obs) {
			c.allAt = time.Time{}
			for _, o := range c.obs {
				if o.convergedAt.After(c.allAt) {
					c.allAt = o.convergedAt
				}
			}
		}
	case !s.Converged && was:
		c.converged--
		c.allAt = time.Time{}
	}
}

// settled reports whether waiting longer cannot change convergence: every
// observer has converged or has lost its stream (true if there are none).
func (c *convergence) settled() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.obs {
		if !s.Converged && s.Connected {
			return false
		}
	}
	return true
}

// count returns how many observers have converged, out of how many, and
// the fewest peers any observer has (-1 if there are no observers).
func (c *convergence) count() (converged, total, minPeers int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	minPeers = -1
	for _, s := range c.obs {
		if minPeers < 0 || s.Peers < minPeers {
			minPeers = s.Peers
		}
	}
	return c.converged, len(c.obs), minPeers
}

// snapshot reports the observers' state with times relative to since, and
// to lastEvent (the last registration or reconnect) for AfterLastSeconds.
func (c *convergence) snapshot(since, lastEvent time.Time) Convergence {
	c.mu.Lock()
	defer c.mu.Unlock()
	res := Convergence{Observers: slices.Clone(c.obs)}
	for i := range res.Observers {
		s := &res.Observers[i]
		if s.Converged {
			s.ConvergedSeconds = s.convergedAt.Sub(since).Seconds()
		}
	}
	if len(c.obs) > 0 && c.converged == len(c.obs) {
		res.Converged = true
		res.Seconds = c.allAt.Sub(since).Seconds()
		if !lastEvent.IsZero() {
			res.AfterLastSeconds = c.allAt.Sub(lastEvent).Seconds()
		}
	}
	return res
}
