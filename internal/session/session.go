// Package session owns one client's streaming map response: it keeps the
// updates not yet sent in a bounded queue (shared updates as they are,
// private ones merged, everything merged into one when the queue is full,
// so a slow client costs bounded memory), writes length-prefixed,
// optionally zstd-compressed messages, and sends keep-alives when idle.
package session

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/util/zstdframe"

	"github.com/tailplane/tailplane/internal/metrics"
)

// Update is a change for one client. Zero fields mean "no change". Peer
// encodings are shared, pre-encoded bytes (DESIGN principle 4).
type Update struct {
	// Full is a complete first map message, sent before anything else:
	// updates pushed while a session awaits its full map were computed
	// relative to that map, so they follow it.
	Full []Part
	// Self is the client's own node, encoded.
	Self json.RawMessage
	// PeersChanged holds added or changed peers by id.
	PeersChanged map[uint64]json.RawMessage
	// PeerChunks, when set, is PeersChanged as shared chunks: the peers'
	// encodings in id order, comma-separated, the first chunk without a
	// leading comma. Deltas of many classes then compress each run of
	// peers once. Only a shared update carries it; merging drops it.
	PeerChunks []*Chunk
	// PeersRemoved holds ids of peers that left the client's view.
	PeersRemoved map[uint64]struct{}
	// Patches are light changes (endpoints, DERP home) by peer id.
	Patches map[uint64]*Patch
	// Online changes by peer id.
	Online map[uint64]bool
	// PacketFilters replaces named filter chunks, each pre-encoded JSON
	// as parts; a nil value deletes one.
	PacketFilters map[string][]Part
	// SSHPolicy replaces the SSH policy.
	SSHPolicy json.RawMessage
	// UserProfiles adds or updates profiles.
	UserProfiles map[uint64]json.RawMessage

	// Shared, when set, caches this update's encoding for every session
	// it was pushed to unchanged: sessions of one identity class usually
	// receive the same delta, which is then encoded and compressed once.
	Shared *Encoded
}

// Patch is a light change of one peer with its JSON, encoded once for
// every session that receives it: a joining node's endpoints reach every
// peer that sees it, and encoding the patches of each delta with
// encoding/json was 4% of the server's CPU in a join storm under the
// 15,000-rule policy.
type Patch struct {
	Change *tailcfg.PeerChange
	once   sync.Once
	json   []byte
	err    error
}

// encoded returns the patch's JSON, encoding it on first use.
func (p *Patch) encoded() ([]byte, error) {
	p.once.Do(func() { p.json, p.err = json.Marshal(p.Change) })
	return p.json, p.err
}

// Encoded is an update's message, built once on first use.
type Encoded struct {
	partsOnce, jsonOnce, zstdOnce sync.Once
	parts                         []Part
	json, zstd                    []byte
	err                           error
}

func (e *Encoded) get(u *Update, compress bool) ([]byte, error) {
	e.partsOnce.Do(func() { e.parts, e.err = Encode(u) })
	if e.err != nil {
		return nil, e.err
	}
	if !compress {
		e.jsonOnce.Do(func() { e.json = JoinParts(e.parts, false) })
		return e.json, nil
	}
	e.zstdOnce.Do(func() { e.zstd = JoinParts(e.parts, true) })
	return e.zstd, nil
}

func (u *Update) empty() bool {
	return u.Full == nil && u.Self == nil && len(u.PeersChanged) == 0 && len(u.PeersRemoved) == 0 &&
		len(u.Patches) == 0 && len(u.Online) == 0 && u.PacketFilters == nil && u.SSHPolicy == nil &&
		len(u.UserProfiles) == 0
}

// merge folds a newer update n (without Full) into u. The newest value of
// everything wins; a peer change supersedes older patches and removal of
// that peer.
func (u *Update) merge(n *Update) {
	if n.Self != nil {
		u.Self = n.Self
	}
	for id, b := range n.PeersChanged {
		setMap(&u.PeersChanged, id, b)
		delete(u.PeersRemoved, id)
		delete(u.Patches, id)
		delete(u.Online, id)
	}
	for id := range n.PeersRemoved {
		setMap(&u.PeersRemoved, id, struct{}{})
		delete(u.PeersChanged, id)
		delete(u.Patches, id)
		delete(u.Online, id)
	}
	for id, p := range n.Patches {
		if old, ok := u.Patches[id]; ok {
			p = &Patch{Change: mergePatch(old.Change, p.Change)}
		}
		setMap(&u.Patches, id, p)
	}
	for id, on := range n.Online {
		setMap(&u.Online, id, on)
	}
	if n.PacketFilters != nil {
		if _, reset := n.PacketFilters["*"]; reset || u.PacketFilters == nil {
			u.PacketFilters = map[string][]Part{}
		}
		for k, v := range n.PacketFilters {
			u.PacketFilters[k] = v
		}
	}
	if n.SSHPolicy != nil {
		u.SSHPolicy = n.SSHPolicy
	}
	for id, p := range n.UserProfiles {
		setMap(&u.UserProfiles, id, p)
	}
}

func setMap[V any](m *map[uint64]V, k uint64, v V) {
	if *m == nil {
		*m = make(map[uint64]V)
	}
	(*m)[k] = v
}

func mergePatch(old, n *tailcfg.PeerChange) *tailcfg.PeerChange {
	c := *old
	if n.DERPRegion != 0 {
		c.DERPRegion = n.DERPRegion
	}
	if n.Endpoints != nil {
		c.Endpoints = n.Endpoints
	}
	if n.DiscoKey != nil {
		c.DiscoKey = n.DiscoKey
	}
	if n.Key != nil {
		c.Key = n.Key
	}
	if n.KeyExpiry != nil {
		c.KeyExpiry = n.KeyExpiry
	}
	if n.LastSeen != nil {
		c.LastSeen = n.LastSeen
	}
	if n.Online != nil {
		c.Online = n.Online
	}
	return &c
}

// Session is one streaming map response.
type Session struct {
	NodeID   uint64
	compress bool

	mu sync.Mutex
	// full is the first map, sent before the queue.
	full []Part
	// queue holds the updates not yet sent, in order. Shared ones (Shared
	// set) other sessions also received and are not ours to modify;
	// consecutive private ones are merged into one.
	queue []*Update
	// spare is the writer's emptied queue, reused by the next Push: one
	// allocation per session and batch was 10,000 per join at 10,000
	// sessions (BenchmarkAddNodeTo10k).
	spare     []*Update
	awaitFull bool // nothing is sent until the full map is pushed
	wake      chan struct{}
	done      chan struct{}
	once      sync.Once
}

// maxQueue bounds a session's queue: beyond it every update is merged into
// one private update, so a client that does not read costs bounded memory.
// Below it shared updates stay as they are and are sent as they were
// encoded once for every session: merging them for every session that
// fell behind during a join storm re-encoded and compressed their peers
// per session (a seventh of the server's CPU).
const maxQueue = 16

// New returns a session for a node; compress selects zstd.
func New(nodeID uint64, compress bool) *Session {
	return &Session{NodeID: nodeID, compress: compress, wake: make(chan struct{}, 1), done: make(chan struct{})}
}

// Push queues u and wakes the writer. It never blocks, so the fan-out is
// never held up by a slow client.
func (s *Session) Push(u *Update) {
	s.mu.Lock()
	if u.Full != nil {
		s.full, s.awaitFull = u.Full, false
		rest := *u
		rest.Full, rest.Shared = nil, nil
		u = &rest
	}
	if s.queue == nil && s.spare != nil {
		s.queue, s.spare = s.spare, nil
	}
	switch {
	case u.empty():
	case u.Shared != nil && len(s.queue) < maxQueue:
		s.queue = append(s.queue, u)
	case u.Shared == nil && len(s.queue) > 0 && s.queue[len(s.queue)-1].Shared == nil:
		metrics.QueueMerges.Inc()
		s.queue[len(s.queue)-1].merge(u)
	case len(s.queue) < maxQueue:
		var own Update
		own.merge(u)
		s.queue = append(s.queue, &own)
	default:
		// Full queue: everything folds into one private update, in
		// order (newest wins).
		metrics.QueueMerges.Inc()
		var all Update
		for _, q := range s.queue {
			all.merge(q)
		}
		all.merge(u)
		s.queue = append(s.queue[:0], &all)
	}
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// ExpectFull holds back everything until a Push with a Full map: the
// engine registers a session, then builds its first map outside its lock
// while later changes are already pushed.
func (s *Session) ExpectFull() {
	s.mu.Lock()
	s.awaitFull = true
	s.mu.Unlock()
}

// Close ends the session's Run (the client opened a newer stream, or the
// node was deleted).
func (s *Session) Close() { s.once.Do(func() { close(s.done) }) }

// Done is closed when the session is closed.
func (s *Session) Done() <-chan struct{} { return s.done }

// ErrClosed is returned by Run when the session was closed by the server.
var ErrClosed = errors.New("session closed")

// Writer is what Run writes frames to: the HTTP response.
type Writer interface {
	io.Writer
	Flush() error
}

// KeepAliveInterval is the idle time after which a keep-alive is sent, plus
// up to keepAliveJitter so that sessions reset together (a delta sent to
// every session) do not stay in step.
//
// tailscaled v1.102.5 ends a map stream that is silent for 120 s:
// controlclient's watchdogTimeout (control/controlclient/direct.go:1054) is
// reset before each message's length is read (direct.go:1301) and cancels the
// long poll when it fires (direct.go:1213-1215); the client then reconnects
// and gets a full map. Its health check warns after 125 s without a message
// (health/health.go:1146). Nothing else keeps the stream alive: the client's
// HTTP/2 transport sends no pings (control/ts2021/client.go:165-172), and a
// keep-alive is only counted and skipped (direct.go:1363-1366). A
// keep-alive is due 89-100 s after the last message (the tick below rounds
// down), which leaves at least 20 s for a keep-alive delayed by a busy
// server or by TCP retransmissions on a lossy link.
//
// Keep-alives are nearly all of an idle server's work: at 10,000 sessions
// the interval sets how many are sent per second.
const (
	KeepAliveInterval = 90 * time.Second
	keepAliveJitter   = 10 * time.Second
	// keepAliveTick aligns keep-alive deadlines to whole seconds, so that
	// the ~100 keep-alives due each second at 10,000 sessions fire from one
	// timer wake-up. Timers spread at random woke the idle process once per
	// keep-alive, and those wake-ups (futex, epoll, thread hand-offs) were
	// two thirds of a keep-alive's cost: 0.16 ms each, 0.05 ms aligned (see
	// docs/benchmarks.md, idle). The write itself is one system call.
	keepAliveTick = time.Second
)

// Run writes pending updates to w until ctx ends, the session is closed, or
// a write fails.
func (s *Session) Run(ctx context.Context, w Writer) error {
	jitter := rand.N(keepAliveJitter)
	ka := time.NewTimer(keepAliveDelay(time.Now(), jitter))
	defer ka.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			return ErrClosed
		case <-ka.C:
			msg := keepAliveMsg
			if s.compress {
				msg = keepAliveZstd
			}
			if err := s.writeEncoded(w, msg, "keepalive"); err != nil {
				return err
			}
		case <-s.wake:
			s.mu.Lock()
			if s.awaitFull {
				s.mu.Unlock()
				continue
			}
			full, queue := s.full, s.queue
			s.full, s.queue = nil, nil
			s.mu.Unlock()
			if len(queue) > 0 {
				metrics.QueueDepth.Observe(float64(len(queue)))
			}
			if full != nil {
				if err := s.writeParts(w, full, "full"); err != nil {
					return err
				}
			}
			for _, u := range queue {
				if err := s.send(w, u); err != nil {
					return err
				}
			}
			if queue != nil {
				clear(queue) // the updates may be large; let them go
				s.mu.Lock()
				s.spare = queue[:0]
				s.mu.Unlock()
			}
		}
		ka.Reset(keepAliveDelay(time.Now(), jitter))
	}
}

// send writes one queued update: a shared one as encoded for every
// session, a private one encoded here.
func (s *Session) send(w Writer, u *Update) error {
	if u.Shared != nil {
		msg, err := u.Shared.get(u, s.compress)
		if err != nil {
			return err
		}
		return s.writeEncoded(w, msg, "delta")
	}
	parts, err := Encode(u)
	if err != nil {
		return err
	}
	return s.writeParts(w, parts, "delta")
}

// keepAliveDelay is how long after now the next keep-alive is due: the
// interval plus the session's jitter, rounded down to a keepAliveTick.
func keepAliveDelay(now time.Time, jitter time.Duration) time.Duration {
	return now.Add(KeepAliveInterval + jitter).Truncate(keepAliveTick).Sub(now)
}

var (
	keepAliveMsg = []byte(`{"KeepAlive":true}`)
	// keepAliveZstd is compressed once: 10,000 idle sessions send about
	// 105 keep-alives a second. The bytes never change, so clients match
	// them without decompressing (controlclient direct.go:1489).
	keepAliveZstd = zstdframe.AppendEncode(nil, keepAliveMsg, zstdframe.FastestCompression)
)

// WriteFrame writes one map message: a 4-byte little-endian length, then
// the body, zstd-compressed when the client asked for it.
func WriteFrame(w io.Writer, msg []byte, compress bool) (int, error) {
	if compress {
		msg = zstdframe.AppendEncode(nil, msg, zstdframe.FastestCompression)
	}
	var hdr [4]byte
	binary.LittleEndian.PutUint32(hdr[:], uint32(len(msg)))
	if _, err := w.Write(hdr[:]); err != nil {
		return 0, err
	}
	if _, err := w.Write(msg); err != nil {
		return 0, err
	}
	return len(msg) + 4, nil
}

func (s *Session) writeParts(w Writer, parts []Part, kind string) error {
	n, err := writeParts(w, parts, s.compress)
	if err != nil {
		return err
	}
	return s.flushed(w, n, kind)
}

// writeEncoded writes an already compressed (if asked) message.
func (s *Session) writeEncoded(w Writer, msg []byte, kind string) error {
	n, err := WriteFrame(w, msg, false)
	if err != nil {
		return err
	}
	return s.flushed(w, n, kind)
}

// flushed flushes a message of n bytes and counts it.
func (s *Session) flushed(w Writer, n int, kind string) error {
	if err := w.Flush(); err != nil {
		return err
	}
	metrics.MapMessages.WithLabelValues(kind).Inc()
	metrics.MapBytes.Add(float64(n))
	return nil
}
