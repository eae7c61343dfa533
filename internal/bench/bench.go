// Package bench is a load generator for Tailscale-compatible control servers.
//
// It simulates many Tailscale clients that speak the real protocol: each one is
// its own machine with its own machine key, node key and Noise connection
// (ts2021: HTTP upgrade at /ts2021, then HTTP/2 inside Noise). A client
// registers with a pre-auth key, opens a streaming map poll, sends the
// separate non-streaming "lite" map update that modern clients send (disco
// key, endpoints, hostinfo), and holds the stream open.
//
// Most clients only count the framed messages they receive; a few
// "observers" decode every message and track their peer set, so convergence
// is measured without the tool doing N² work. See docs/benchmarks.md for how
// to run it and what every result field means.
package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/types/key"
)

// Options configure a load run. Zero values select the documented defaults.
type Options struct {
	// ServerURL is the control server's base URL, e.g. "http://127.0.0.1:8080".
	ServerURL string
	// Replicas are more base URLs of the same tailnet's control server
	// (replicas sharing a database): client i joins and streams from
	// ServerURL when i is a multiple of 1+len(Replicas), else from
	// Replicas[i%(1+len(Replicas))-1].
	Replicas []string

	// N is the number of simulated clients. Required.
	N int

	// Concurrency bounds how many clients are joining (Noise handshake,
	// registration, first map message, lite update) at the same time, and
	// likewise how many reconnect at once in a reconnect storm.
	// Zero means 64.
	Concurrency int

	// AuthKey is one (reusable) pre-auth key used by every client.
	// Exactly one of AuthKey, KeysFile and CreateKeys must be set.
	AuthKey string
	// KeysFile names a file with one pre-auth key per line (blank lines and
	// lines starting with '#' are ignored). Client i uses key i mod the
	// number of keys, so one-off keys need at least N lines.
	KeysFile string
	// CreateKeys is called once with N and returns the keys to use, with the
	// same "i mod len" assignment as KeysFile. It lets a caller mint keys on
	// the server under test (tailplane's admin socket, say).
	CreateKeys func(ctx context.Context, n int) ([]string, error)

	// Tags are requested by every client (Hostinfo.RequestTags).
	Tags []string
	// Ephemeral registers the nodes as ephemeral, so that a server which
	// supports it removes them after they disconnect and repeated runs do
	// not grow the tailnet.
	Ephemeral bool
	// Client, if non-nil, returns per-client settings (hostname, tags, auth
	// key) that override the ones above, e.g. to follow a generated policy.
	Client func(i int) ClientSpec

	// Hold is how long streams stay open after every client has joined.
	// The run also keeps going past Hold until all observers have
	// converged, bounded by Timeout.
	Hold time.Duration

	// ReconnectAt, if positive, makes every connected client drop its
	// Noise connection at this offset after all clients have joined, and
	// reconnect at once (new Noise handshake and a new streaming map poll,
	// no new registration), as after a server restart or a network outage.
	ReconnectAt time.Duration

	// Redial makes a client whose stream ends unexpectedly (the server
	// restarted or went away) reconnect, retrying with backoff as
	// tailscaled does, instead of counting an error. The result's redial
	// section then describes the storm: restart the server during Hold.
	Redial bool

	// Observers is how many clients decode every map message and track
	// their peer set. They are spread evenly over the client indices and
	// always include client 0, which sees every later join as a delta.
	Observers int

	// ExpectedPeers returns the number of peers client i should end up
	// with. Nil means N-1 (everybody sees everybody, an allow-all policy on
	// an otherwise empty tailnet).
	ExpectedPeers func(i int) int

	// Expect, if non-nil, is called once after every client has joined or
	// failed (before the hold and any reconnect storm) and returns the
	// expected peer counts; it replaces ExpectedPeers. It is for
	// expectations that depend on what the server did during the join,
	// such as the addresses it assigned, which a policy's IP and host
	// selectors match. An observer that already had its expected peers
	// counts as converged from the moment it got them. If Expect fails, the
	// error is counted (kinds starting with "expect_") and no observer
	// converges.
	Expect func(ctx context.Context) (func(i int) int, error)

	// Timeout bounds the whole run, including waiting for convergence.
	// Zero means 10 minutes. A run that times out still returns a Result.
	Timeout time.Duration

	// RequestTimeout bounds each handshake, registration, lite update and
	// the wait for a stream's first map message. Zero means 60 seconds.
	RequestTimeout time.Duration

	// ServerPID, if positive, is the server's process id on this machine;
	// its CPU time and memory are read from /proc and reported.
	ServerPID int

	// Progress, if non-nil, receives one human-readable status line per
	// second while the run is going.
	Progress io.Writer
}

// ClientSpec holds per-client overrides returned by Options.Client. Empty
// fields fall back to the run-wide settings.
type ClientSpec struct {
	Hostname string         // default "bench-<i>"
	Tags     []string       // default Options.Tags
	AuthKey  string         // default: from AuthKey, KeysFile or CreateKeys
	Routes   []netip.Prefix // subnet routes to advertise (Hostinfo.RoutableIPs)
}

const (
	defaultConcurrency    = 64
	defaultTimeout        = 10 * time.Minute
	defaultRequestTimeout = 60 * time.Second
)

func (o *Options) validate() error {
	if o.N <= 0 {
		return errors.New("bench: N must be positive")
	}
	for _, s := range append([]string{o.ServerURL}, o.Replicas...) {
		u, err := url.Parse(s)
		if err != nil {
			return fmt.Errorf("bench: server URL: %w", err)
		}
		if u.Scheme != "http" && u.Scheme != "https" || u.Hostname() == "" {
			return fmt.Errorf("bench: server URL %q: want http://host[:port] or https://host[:port]", s)
		}
	}
	sources := 0
	for _, set := range []bool{o.AuthKey != "", o.KeysFile != "", o.CreateKeys != nil} {
		if set {
			sources++
		}
	}
	if sources != 1 && o.Client == nil {
		return errors.New("bench: exactly one of AuthKey, KeysFile and CreateKeys is required")
	}
	if sources > 1 {
		return errors.New("bench: AuthKey, KeysFile and CreateKeys are mutually exclusive")
	}
	if o.Observers < 0 || o.Concurrency < 0 || o.Hold < 0 || o.ReconnectAt < 0 {
		return errors.New("bench: Observers, Concurrency, Hold and ReconnectAt must not be negative")
	}
	if o.Concurrency == 0 {
		o.Concurrency = defaultConcurrency
	}
	o.Concurrency = min(o.Concurrency, o.N)
	o.Observers = min(o.Observers, o.N)
	if o.Timeout <= 0 {
		o.Timeout = defaultTimeout
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = defaultRequestTimeout
	}
	return nil
}

// loadKeys returns the run-wide pre-auth keys (possibly none, when every
// ClientSpec carries its own).
func (o *Options) loadKeys(ctx context.Context) ([]string, error) {
	switch {
	case o.AuthKey != "":
		return []string{o.AuthKey}, nil
	case o.KeysFile != "":
		return readKeysFile(o.KeysFile)
	case o.CreateKeys != nil:
		keys, err := o.CreateKeys(ctx, o.N)
		if err != nil {
			return nil, fmt.Errorf("bench: creating keys: %w", err)
		}
		if len(keys) == 0 {
			return nil, errors.New("bench: CreateKeys returned no keys")
		}
		return keys, nil
	}
	return nil, nil
}

func readKeysFile(name string) ([]string, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("bench: keys file: %w", err)
	}
	defer f.Close()
	var keys []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		keys = append(keys, line)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("bench: reading keys file %s: %w", name, err)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("bench: keys file %s has no keys", name)
	}
	return keys, nil
}

// Run simulates opts.N clients against opts.ServerURL and reports what
// happened. It returns an error only when the run cannot start (bad options,
// no keys, server key not fetchable); failures of individual clients are
// counted in Result.Errors.
func Run(ctx context.Context, opts Options) (*Result, error) {
	if err := opts.validate(); err != nil {
		return nil, err
	}
	keys, err := opts.loadKeys(ctx)
	if err != nil {
		return nil, err
	}
	var targets []*target
	for _, s := range append([]string{opts.ServerURL}, opts.Replicas...) {
		t, err := newTarget(s)
		if err != nil {
			return nil, err
		}
		if err := t.fetchServerKey(ctx, opts.RequestTimeout); err != nil {
			return nil, err
		}
		targets = append(targets, t)
	}
	r := newRunner(opts, targets, keys)
	return r.run(ctx), nil
}

// runner is the state of one Run. Per-client samples live in slices indexed
// by client so that clients record them without locks; they are read only
// after every client goroutine has finished.
type runner struct {
	opts    Options
	targets []*target // client i uses targets[i%len(targets)]

	ctx     context.Context // canceled when the run stops
	clients []*client
	sem     chan struct{} // bounds joins and reconnects in flight
	start   time.Time     // when the first client began to join

	stopping     atomic.Bool
	expectFailed atomic.Bool    // Options.Expect failed: no observer can converge
	joinWG       sync.WaitGroup // join attempts
	streamWG     sync.WaitGroup // stream reader goroutines

	// Counters read by the progress reporter while the run is going.
	joined     atomic.Int64 // join attempts finished, successful or not
	registered atomic.Int64
	streaming  atomic.Int64 // clients whose stream delivered a first map
	open       atomic.Int64 // streams open right now
	messages   atomic.Int64
	bytes      atomic.Int64
	pending    atomic.Int64 // reconnects not yet finished

	// lastJoinEvent is when (UnixNano) the latest registration or, in a
	// reconnect storm, the latest reconnect completed.
	lastJoinEvent atomic.Int64

	// Per-client samples; zero means "no sample".
	connectLat   []time.Duration
	registerLat  []time.Duration
	firstMapLat  []time.Duration
	reconnectLat []time.Duration
	// Redials after unplanned drops (Options.Redial): drop to new stream.
	redialLat    []time.Duration
	redialDrops  atomic.Int64
	firstDrop    atomic.Int64 // unix nanos of the first unplanned drop
	lastRedial   atomic.Int64 // unix nanos of the latest successful redial
	redialFailed atomic.Int64
	retries      errorCounts // failed redial attempts, retried

	errs errorCounts
	conv convergence
}

func newRunner(opts Options, targets []*target, keys []string) *runner {
	n := opts.N
	r := &runner{
		opts:         opts,
		targets:      targets,
		sem:          make(chan struct{}, opts.Concurrency),
		connectLat:   make([]time.Duration, n),
		registerLat:  make([]time.Duration, n),
		firstMapLat:  make([]time.Duration, n),
		reconnectLat: make([]time.Duration, n),
		redialLat:    make([]time.Duration, n),
	}
	r.clients = make([]*client, n)
	for i := range n {
		spec := ClientSpec{Hostname: fmt.Sprintf("bench-%05d", i), Tags: opts.Tags}
		if len(keys) > 0 {
			spec.AuthKey = keys[i%len(keys)]
		}
		if opts.Client != nil {
			o := opts.Client(i)
			if o.Hostname != "" {
				spec.Hostname = o.Hostname
			}
			if o.Tags != nil {
				spec.Tags = o.Tags
			}
			if o.AuthKey != "" {
				spec.AuthKey = o.AuthKey
			}
			spec.Routes = o.Routes
		}
		r.clients[i] = &client{
			r:       r,
			idx:     i,
			spec:    spec,
			machine: key.NewMachine(),
			node:    key.NewNode(),
			disco:   key.NewDisco().Public(),
		}
	}
	// Spread observers evenly; index 0 is always one because it joins first
	// and so learns about every other node through deltas.
	for j := range opts.Observers {
		i := j * n / opts.Observers
		expected := n - 1
		switch {
		case opts.Expect != nil:
			expected = -1 // known after the join phase
		case opts.ExpectedPeers != nil:
			expected = opts.ExpectedPeers(i)
		}
		slot := r.conv.add(i, expected)
		r.clients[i].obs = newObserver(slot, &r.conv, &r.errs)
	}
	return r
}

func (r *runner) run(parent context.Context) *Result {
	timeoutCtx, cancelTimeout := context.WithTimeout(parent, r.opts.Timeout)
	defer cancelTimeout()
	ctx, stop := context.WithCancel(timeoutCtx)
	defer stop()
	r.ctx = ctx

	res := &Result{
		ServerURL:   r.opts.ServerURL,
		Replicas:    r.opts.Replicas,
		Clients:     r.opts.N,
		Observers:   r.opts.Observers,
		Concurrency: r.opts.Concurrency,
	}
	srvBefore := readProcCPU(r.opts.ServerPID)
	toolBefore := selfCPU()

	r.start = time.Now()
	res.StartedAt = r.start
	progressDone := make(chan struct{})
	var progressWG sync.WaitGroup
	if r.opts.Progress != nil {
		progressWG.Go(func() { r.reportProgress(progressDone) })
	}

	r.joinAll()
	joinedAt := time.Now()
	res.JoinSeconds = joinedAt.Sub(r.start).Seconds()
	if last := r.lastJoinEvent.Load(); last > 0 {
		res.RegistrationsPerSecond = float64(r.registered.Load()) / time.Unix(0, last).Sub(r.start).Seconds()
	}
	r.applyExpect()

	if r.opts.ReconnectAt > 0 && r.sleepUntil(joinedAt.Add(r.opts.ReconnectAt)) {
		res.Convergence = r.convergenceSince(r.start)
		res.Reconnect = r.reconnectAll()
	}
	r.waitHold(joinedAt.Add(r.opts.Hold))
	res.TimedOut = timeoutCtx.Err() != nil && parent.Err() == nil

	// Snapshot everything that needs the streams still open, then stop.
	if first := r.firstDrop.Load(); first > 0 {
		res.Redial = &RedialResult{Convergence: r.convergenceSince(time.Unix(0, first))}
	}
	if res.Reconnect != nil {
		res.Reconnect.Convergence = r.convergenceSince(res.Reconnect.start)
	} else {
		res.Convergence = r.convergenceSince(r.start)
	}
	res.WallSeconds = time.Since(r.start).Seconds()
	res.StreamsOpenAtEnd = int(r.open.Load())
	res.Server = readServerStats(r.opts.ServerPID, srvBefore)
	res.Tool = readToolStats(toolBefore, r.opts.N)

	r.stopping.Store(true)
	stop()
	r.joinWG.Wait()
	r.streamWG.Wait()
	close(progressDone)
	progressWG.Wait()

	r.fillResult(res)
	return res
}

// applyExpect asks Options.Expect for the observers' expected peer counts.
func (r *runner) applyExpect() {
	if r.opts.Expect == nil || r.ctx.Err() != nil {
		return
	}
	expected, err := r.opts.Expect(r.ctx)
	if err != nil {
		r.fail("expect", err)
		r.expectFailed.Store(true)
		return
	}
	for slot, c := range r.conv.clients() {
		r.conv.setExpected(slot, expected(c))
	}
}

// noteJoinEvent records that a registration or reconnect completed at t.
func (r *runner) noteJoinEvent(t time.Time) { storeMax(&r.lastJoinEvent, t.UnixNano()) }

// storeMax raises a to v if v is larger.
func storeMax(a *atomic.Int64, v int64) {
	for {
		old := a.Load()
		if old >= v || a.CompareAndSwap(old, v) {
			return
		}
	}
}

// convergenceSince snapshots the observers relative to a phase start.
func (r *runner) convergenceSince(start time.Time) Convergence {
	var last time.Time
	if n := r.lastJoinEvent.Load(); n > 0 {
		last = time.Unix(0, n)
	}
	return r.conv.snapshot(start, last)
}

// fail counts a failed operation, unless the run is ending and the failure
// is just the run canceling what was in flight.
func (r *runner) fail(op string, err error) {
	if r.ctx.Err() != nil {
		return
	}
	r.errs.add(classify(op, err), err)
}

// joinAll starts every client's join, at most Concurrency at a time, and
// waits until each has either joined or failed.
func (r *runner) joinAll() {
	for _, c := range r.clients {
		select {
		case r.sem <- struct{}{}:
		case <-r.ctx.Done():
			r.joinWG.Wait()
			return
		}
		r.joinWG.Go(func() {
			defer func() { <-r.sem }()
			c.join()
			r.joined.Add(1)
		})
	}
	r.joinWG.Wait()
}

// sleepUntil waits until t and reports whether the run is still going.
func (r *runner) sleepUntil(t time.Time) bool {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-r.ctx.Done():
		return false
	}
}

// waitHold waits until the hold time is over and every observer has
// converged (or lost its stream, so that it never will), or the run is
// stopped.
func (r *runner) waitHold(holdEnd time.Time) {
	if !r.sleepUntil(holdEnd) {
		return
	}
	// Polling is fine here: the convergence instant itself is recorded by
	// the observers, this only decides when to stop.
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !r.expectFailed.Load() && !r.conv.settled() {
		select {
		case <-tick.C:
		case <-r.ctx.Done():
			return
		}
	}
}

// reconnectAll drops every open stream's Noise connection at once; the
// stream goroutines then reconnect (bounded by the semaphore). It returns
// when all reconnects have finished or the run is stopped.
func (r *runner) reconnectAll() *ReconnectResult {
	rr := &ReconnectResult{start: time.Now()}
	var conns []*noiseConn
	for _, c := range r.clients {
		if nc := c.markReconnect(); nc != nil {
			conns = append(conns, nc)
		}
	}
	rr.Clients = len(conns)
	// Close only after every client is marked, so that no stream's error is
	// mistaken for an unplanned drop, and close them back to back so the
	// storm really is simultaneous.
	for _, nc := range conns {
		nc.close()
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for r.pending.Load() > 0 {
		select {
		case <-tick.C:
		case <-r.ctx.Done():
			return rr
		}
	}
	rr.Seconds = time.Since(rr.start).Seconds()
	return rr
}

// reportProgress writes one status line per second until done is closed.
func (r *runner) reportProgress(done <-chan struct{}) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	prevSrv := readProcCPU(r.opts.ServerPID)
	prevTool := selfCPU()
	prevT := time.Now()
	for {
		select {
		case <-done:
			return
		case now := <-tick.C:
			dt := now.Sub(prevT).Seconds()
			tool := selfCPU()
			converged, observers, minPeers := r.conv.count()
			line := fmt.Sprintf("bench %5.0fs joined %d/%d registered %d streaming %d open %d | msgs %d (%s) | converged %d/%d (min peers %d) | errors %d | tool cpu %.2f",
				now.Sub(r.start).Seconds(), r.joined.Load(), r.opts.N, r.registered.Load(),
				r.streaming.Load(), r.open.Load(), r.messages.Load(), humanBytes(r.bytes.Load()),
				converged, observers, minPeers, r.errs.total(), (tool-prevTool)/dt)
			if p := r.pending.Load(); p > 0 {
				line += fmt.Sprintf(" | reconnecting %d", p)
			}
			if r.opts.ServerPID > 0 {
				srv := readProcCPU(r.opts.ServerPID)
				line += fmt.Sprintf(" | server cpu %.2f rss %s", (srv-prevSrv)/dt, humanBytes(readProcStatusKB(r.opts.ServerPID, "VmRSS")*1024))
				prevSrv = srv
			}
			fmt.Fprintln(r.opts.Progress, line)
			prevTool, prevT = tool, now
		}
	}
}

func humanBytes(b int64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(b)/(1<<10))
	}
	return fmt.Sprintf("%d B", b)
}
