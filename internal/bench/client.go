package bench

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"tailscale.com/control/controlhttp"
	"tailscale.com/control/ts2021"
	"tailscale.com/tailcfg"
	"tailscale.com/tstime"
	"tailscale.com/types/key"
	"tailscale.com/version"
)

const (
	// maxMessageSize caps one framed map message (testcontrol's own limit):
	// it only guards the tool against a broken length prefix.
	maxMessageSize = 256 << 20
	// maxResponseSize caps register and lite-update responses.
	maxResponseSize = 16 << 20
)

var (
	errFirstMapTimeout = errors.New("no map message within the request timeout")
	errMessageTooLarge = errors.New("map message too large")
	errConnGone        = errors.New("noise connection is closed")
)

// target is the server under test: where to dial and its Noise public key.
type target struct {
	baseURL   string
	host      string // host name without port, as used in request URLs
	httpPort  string
	httpsPort string
	serverKey key.MachinePublic
	dialer    net.Dialer
}

func newTarget(serverURL string) (*target, error) {
	u, err := url.Parse(serverURL)
	if err != nil {
		return nil, fmt.Errorf("bench: server URL: %w", err)
	}
	t := &target{baseURL: serverURL, host: u.Hostname()}
	// Mirror ts2021.NewClient's port choice: plain HTTP goes to the given
	// port and never falls back to TLS; an https URL is tried the way
	// tailscaled tries it (port 80 first, then the TLS port).
	if u.Scheme == "http" {
		t.httpPort = cmp.Or(u.Port(), "80")
		t.httpsPort = controlhttp.NoPort
	} else {
		t.httpsPort = cmp.Or(u.Port(), "443")
	}
	return t, nil
}

// fetchServerKey fetches the server's Noise key once per run. Real clients
// cache it as well, and it is not what a load test measures.
func (t *target) fetchServerKey(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	u := t.baseURL + "/key?v=" + strconv.Itoa(int(tailcfg.CurrentCapabilityVersion))
	req, err := http.NewRequestWithContext(ctx, "GET", u, nil)
	if err != nil {
		return fmt.Errorf("bench: server key request: %w", err)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("bench: fetching server key: %w", err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("bench: fetching server key from %s: %s", u, res.Status)
	}
	var keys tailcfg.OverTLSPublicKeyResponse
	if err := json.NewDecoder(io.LimitReader(res.Body, 1<<20)).Decode(&keys); err != nil {
		return fmt.Errorf("bench: decoding server key from %s: %w", u, err)
	}
	if keys.PublicKey.IsZero() {
		return fmt.Errorf("bench: server at %s sent no Noise public key", t.baseURL)
	}
	t.serverKey = keys.PublicKey
	return nil
}

// noiseConn is one machine's Noise connection with HTTP/2 on top, assembled
// the way ts2021.NewClient does it. Unlike ts2021.Client it never redials:
// a lost connection is something the tool must see and count, and a
// reconnect is an explicit step.
type noiseConn struct {
	conn *ts2021.Conn
	tr   *http.Transport
}

// bufferedConn reads its connection through a buffer. Once net/http hands
// over the upgraded connection, controlbase reads each Noise record (at
// most 4 KiB) as a 3-byte header and a body, one read(2) each: in a restart
// storm those reads were a quarter of the tool's CPU, taken from the two
// cores the server under test runs on. The server sees the same bytes.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

// readBufferSize holds four Noise records; 10,000 clients keep 160 MiB.
const readBufferSize = 16 << 10

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func (t *target) dial(ctx context.Context, mk key.MachinePrivate, timeout time.Duration) (*noiseConn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// Without an HTTPS port, controlhttp does not report a failed HTTP
	// attempt: it waits for a fallback that never starts, until ctx ends.
	// A refused connection (a restarting server) then cost a client the
	// whole timeout (1% of a 10,000-client restart storm waited 60 s), so
	// a failed TCP dial ends the attempt at once, with its own error.
	ctx, abort := context.WithCancelCause(ctx)
	defer abort(nil)
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := t.dialer.DialContext(ctx, network, addr)
		if err != nil {
			abort(err)
			return nil, err
		}
		return &bufferedConn{Conn: c, r: bufio.NewReaderSize(c, readBufferSize)}, nil
	}
	d := &controlhttp.Dialer{
		Hostname:        t.host,
		HTTPPort:        t.httpPort,
		HTTPSPort:       t.httpsPort,
		MachineKey:      mk,
		ControlKey:      t.serverKey,
		ProtocolVersion: uint16(tailcfg.CurrentCapabilityVersion),
		Dialer:          dial,
		Clock:           tstime.StdClock{},
	}
	cc, err := d.Dial(ctx)
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) && !errors.Is(cause, context.DeadlineExceeded) {
			return nil, cause
		}
		return nil, err
	}
	// ts2021.Conn consumes the optional early payload the server may send
	// before HTTP/2 starts.
	conn := ts2021.NewConn(cc.Conn, func() {})
	tr := &http.Transport{
		Protocols:       new(http.Protocols),
		MaxConnsPerHost: 1,
		// The default 1 MiB read frame size lets each connection's framer
		// keep a buffer that large after one big map; 10,000 of them would
		// hold gigabytes. 16 KiB, the protocol minimum, is plenty because
		// Noise already splits the stream into 4 KiB records.
		HTTP2: &http.HTTP2Config{MaxReadFrameSize: 16 << 10},
	}
	// HTTP/2 with prior knowledge: the Noise layer is the encryption, so
	// Go's "unencrypted" HTTP/2 is what runs inside it.
	tr.Protocols.SetUnencryptedHTTP2(true)
	var used atomic.Bool
	tr.DialTLSContext = func(context.Context, string, string) (net.Conn, error) {
		if used.Swap(true) {
			return nil, errConnGone
		}
		return conn, nil
	}
	return &noiseConn{conn: conn, tr: tr}, nil
}

func (nc *noiseConn) close() {
	nc.conn.Close()
	nc.tr.CloseIdleConnections()
}

// post sends body as JSON to path over the Noise connection. The caller
// owns the response body.
func (nc *noiseConn) post(ctx context.Context, host, path string, nodeKey key.NodePublic, body any) (*http.Response, error) {
	j, err := json.Marshal(body)
	if err != nil {
		return nil, fmt.Errorf("encoding %s request: %w", path, err)
	}
	req, err := http.NewRequestWithContext(ctx, "POST", "https://"+host+path, bytes.NewReader(j))
	if err != nil {
		return nil, err
	}
	ts2021.AddLBHeader(req, nodeKey)
	req.Header.Set("Content-Type", "application/json")
	res, err := nc.tr.RoundTrip(req)
	if err != nil {
		return nil, err
	}
	if res.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(res.Body, 512))
		res.Body.Close()
		return nil, &httpError{code: res.StatusCode, body: string(msg)}
	}
	return res, nil
}

// httpError is a non-200 answer from the server.
type httpError struct {
	code int
	body string
}

func (e *httpError) Error() string { return fmt.Sprintf("http %d: %.200s", e.code, e.body) }

// registerError is a RegisterResponse that did not authorize the node.
type registerError struct{ msg string }

func (e *registerError) Error() string { return "register: " + e.msg }

// client is one simulated machine. Its join runs on a join goroutine, after
// which a single goroutine reads its map stream (and reconnects it in a
// reconnect storm); fields without a comment are owned by whichever of the
// two is running.
type client struct {
	r       *runner
	idx     int
	spec    ClientSpec
	machine key.MachinePrivate
	node    key.NodePrivate
	disco   key.DiscoPublic
	obs     *observer // nil unless this client is an observer

	cancelStream context.CancelCauseFunc // of the current stream's context
	hdr          [4]byte                 // frame length prefix, kept here to avoid an allocation per message
	discard      io.LimitedReader        // reused to skip message bodies

	mu        sync.Mutex // guards the fields below, shared with reconnectAll
	nc        *noiseConn // current connection while live
	live      bool       // a stream goroutine is running
	reconnect bool       // the current connection is being dropped on purpose
}

func (c *client) hostinfo() *tailcfg.Hostinfo {
	return &tailcfg.Hostinfo{
		Hostname:    c.spec.Hostname,
		OS:          "linux",
		IPNVersion:  version.Long(),
		RequestTags: c.spec.Tags,
		RoutableIPs: c.spec.Routes,
	}
}

// target is the server (replica) client c talks to.
func (c *client) target() *target { return c.r.targets[c.idx%len(c.r.targets)] }

// join does what tailscaled does on first start with a pre-auth key:
// handshake, register, open the streaming map poll, send the lite update.
// On success the client's stream goroutine is running when join returns.
func (c *client) join() {
	r := c.r
	t0 := time.Now()
	nc, err := c.target().dial(r.ctx, c.machine, r.opts.RequestTimeout)
	if err != nil {
		r.fail("connect", err)
		return
	}
	t1 := time.Now()
	r.connectLat[c.idx] = t1.Sub(t0)
	if err := c.register(nc); err != nil {
		nc.close()
		r.fail("register", err)
		return
	}
	t2 := time.Now()
	r.registerLat[c.idx] = t2.Sub(t1)
	r.noteJoinEvent(t2)
	r.registered.Add(1)

	body, err := c.openStream(nc)
	if err != nil {
		nc.close()
		r.fail("map", err)
		return
	}
	r.firstMapLat[c.idx] = time.Since(t2)
	r.streaming.Add(1)
	c.sendUpdate(nc)
	c.startStream(nc, body)
}

func (c *client) register(nc *noiseConn) error {
	r := c.r
	ctx, cancel := context.WithTimeout(r.ctx, r.opts.RequestTimeout)
	defer cancel()
	req := tailcfg.RegisterRequest{
		Version:   tailcfg.CurrentCapabilityVersion,
		NodeKey:   c.node.Public(),
		Hostinfo:  c.hostinfo(),
		Ephemeral: r.opts.Ephemeral,
	}
	if c.spec.AuthKey != "" {
		req.Auth = &tailcfg.RegisterResponseAuth{AuthKey: c.spec.AuthKey}
	}
	res, err := nc.post(ctx, c.target().host, "/machine/register", c.node.Public(), &req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	var resp tailcfg.RegisterResponse
	if err := json.NewDecoder(io.LimitReader(res.Body, maxResponseSize)).Decode(&resp); err != nil {
		return fmt.Errorf("decoding register response: %w", err)
	}
	switch {
	case resp.Error != "":
		return &registerError{resp.Error}
	case resp.AuthURL != "":
		return &registerError{"interactive login required"}
	case resp.NodeKeyExpired:
		return &registerError{"node key expired"}
	case !resp.MachineAuthorized:
		return &registerError{"machine not authorized"}
	}
	return nil
}

// openStream starts the streaming map poll and waits for its first message.
// The stream's context is stored in c.cancelStream; the caller owns body.
func (c *client) openStream(nc *noiseConn) (body io.ReadCloser, err error) {
	r := c.r
	ctx, cancel := context.WithCancelCause(r.ctx)
	timer := time.AfterFunc(r.opts.RequestTimeout, func() { cancel(errFirstMapTimeout) })
	defer func() {
		// If the timer fired, the stream is canceled even if its first
		// message made it just in time.
		if !timer.Stop() {
			if body != nil {
				body.Close()
				body = nil
			}
			err = errFirstMapTimeout
		}
		if err != nil {
			cancel(nil)
		}
	}()
	req := tailcfg.MapRequest{
		Version:   tailcfg.CurrentCapabilityVersion,
		NodeKey:   c.node.Public(),
		DiscoKey:  c.disco,
		Hostinfo:  c.hostinfo(),
		Stream:    true,
		KeepAlive: true,
		Compress:  "zstd",
	}
	res, err := nc.post(ctx, c.target().host, "/machine/map", c.node.Public(), &req)
	if err != nil {
		return nil, err
	}
	if c.obs != nil {
		c.obs.resetStream(time.Now())
	}
	if err := c.readMessage(res.Body); err != nil {
		res.Body.Close()
		return nil, err
	}
	c.cancelStream = cancel
	return res.Body, nil
}

// sendUpdate sends the non-streaming "lite" map update that tailscaled's
// update routine sends alongside the stream: since capability version 68 a
// streaming request is read-only, and this is how the server learns the
// node's disco key and endpoints (and, on some servers, tells its peers).
// A failure is counted but does not stop the client.
func (c *client) sendUpdate(nc *noiseConn) {
	r := c.r
	ctx, cancel := context.WithTimeout(r.ctx, r.opts.RequestTimeout)
	defer cancel()
	// A loopback endpoint: plausible data, and nothing would ever be sent
	// anywhere even if a real client used this netmap.
	ep := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(20000+c.idx%40000))
	req := tailcfg.MapRequest{
		Version:   tailcfg.CurrentCapabilityVersion,
		NodeKey:   c.node.Public(),
		DiscoKey:  c.disco,
		Endpoints: []netip.AddrPort{ep},
		Hostinfo:  c.hostinfo(),
		OmitPeers: true,
		Compress:  "zstd",
	}
	res, err := nc.post(ctx, c.target().host, "/machine/map", c.node.Public(), &req)
	if err == nil {
		_, err = io.Copy(io.Discard, io.LimitReader(res.Body, maxResponseSize))
		res.Body.Close()
	}
	if err != nil {
		r.fail("update", err)
	}
}

// startStream hands a stream whose first message has arrived to a new
// stream goroutine.
func (c *client) startStream(nc *noiseConn, body io.ReadCloser) {
	c.mu.Lock()
	c.nc = nc
	c.live = true
	c.mu.Unlock()
	if c.obs != nil {
		c.obs.setConnected(true)
	}
	c.r.open.Add(1)
	c.r.streamWG.Add(1)
	go c.streamLoop(body)
}

// streamLoop reads the stream until it ends. A planned drop (reconnect
// storm) is followed by a reconnect on this same goroutine, so a client
// never has more than one goroutine of its own.
func (c *client) streamLoop(body io.ReadCloser) {
	r := c.r
	defer r.streamWG.Done()
	for {
		err := c.readStream(body)
		body.Close()
		c.cancelStream(nil)
		r.open.Add(-1)

		c.mu.Lock()
		planned := c.reconnect
		c.reconnect = false
		nc := c.nc
		stopping := r.stopping.Load()
		redial := !planned && r.opts.Redial
		if (!planned && !redial) || stopping {
			c.live = false
			c.nc = nil
		}
		c.mu.Unlock()

		if (!planned && !redial) || stopping {
			if planned {
				r.pending.Add(-1)
			}
			nc.close()
			c.lost()
			r.fail("map_stream", err)
			return
		}
		if redial {
			nc.close()
			body = c.redial(time.Now())
		} else {
			body = c.rejoin()
		}
		if body == nil {
			c.mu.Lock()
			c.live = false
			c.nc = nil
			c.mu.Unlock()
			c.lost()
		}
		if planned {
			// Decrement only now, so that a failed rejoin is visible
			// as a lost stream by the time reconnectAll stops waiting.
			r.pending.Add(-1)
		}
		if body == nil {
			return
		}
	}
}

// redial reconnects after an unplanned drop, retrying with backoff (200 ms
// doubling to 5 s, with jitter, as a client redials a restarting server)
// until it succeeds or the run ends. It returns the new stream's body, or
// nil.
func (c *client) redial(drop time.Time) io.ReadCloser {
	r := c.r
	r.redialDrops.Add(1)
	r.firstDrop.CompareAndSwap(0, drop.UnixNano())
	if c.obs != nil {
		c.obs.setConnected(false)
	}
	backoff := 200 * time.Millisecond
	for {
		body, stage, err := c.reopen()
		if err == nil {
			now := time.Now()
			r.redialLat[c.idx] = now.Sub(drop)
			r.noteJoinEvent(now)
			storeMax(&r.lastRedial, now.UnixNano())
			return body
		}
		if r.ctx.Err() != nil {
			r.redialFailed.Add(1)
			r.fail("redial_"+stage, err)
			return nil
		}
		r.retries.add(classify("redial_"+stage, err), err)
		t := time.NewTimer(backoff/2 + rand.N(backoff/2+1))
		select {
		case <-t.C:
		case <-r.ctx.Done():
			t.Stop()
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// reopen dials a new Noise connection and opens a streaming map poll on
// it, bounded by the semaphore. On failure it names the stage that failed:
// "connect" or "map".
func (c *client) reopen() (io.ReadCloser, string, error) {
	r := c.r
	select {
	case r.sem <- struct{}{}:
	case <-r.ctx.Done():
		return nil, "connect", r.ctx.Err()
	}
	defer func() { <-r.sem }()
	nc, err := c.target().dial(r.ctx, c.machine, r.opts.RequestTimeout)
	if err != nil {
		return nil, "connect", err
	}
	body, err := c.openStream(nc)
	if err != nil {
		nc.close()
		return nil, "map", err
	}
	c.mu.Lock()
	c.nc = nc
	c.mu.Unlock()
	if c.obs != nil {
		c.obs.setConnected(true)
	}
	r.open.Add(1)
	return body, "", nil
}

// lost notes that the client no longer has a stream.
func (c *client) lost() {
	if c.obs != nil {
		c.obs.setConnected(false)
	}
}

// rejoin reconnects after a planned drop: new Noise connection, new
// streaming map poll. It returns the new stream's body, or nil on failure.
func (c *client) rejoin() io.ReadCloser {
	t0 := time.Now()
	body, stage, err := c.reopen()
	if err != nil {
		c.r.fail("reconnect_"+stage, err)
		return nil
	}
	now := time.Now()
	c.r.reconnectLat[c.idx] = now.Sub(t0)
	c.r.noteJoinEvent(now)
	return body
}

// markReconnect flags a live client for a planned drop and returns the
// connection to close, or nil if the client has no open stream.
func (c *client) markReconnect() *noiseConn {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.live || c.reconnect {
		return nil
	}
	c.reconnect = true
	c.r.pending.Add(1)
	return c.nc
}

func (c *client) readStream(body io.Reader) error {
	for {
		if err := c.readMessage(body); err != nil {
			return err
		}
	}
}

// readMessage reads one framed map message: a 4-byte little-endian length,
// then that many bytes (zstd-compressed JSON when requested). Only
// observers look inside; everyone else skips the body without allocating.
func (c *client) readMessage(body io.Reader) error {
	if _, err := io.ReadFull(body, c.hdr[:]); err != nil {
		return err
	}
	size := int64(binary.LittleEndian.Uint32(c.hdr[:]))
	if size > maxMessageSize {
		return fmt.Errorf("%w: %d bytes", errMessageTooLarge, size)
	}
	if c.obs != nil {
		if err := c.obs.read(body, size); err != nil {
			return err
		}
	} else {
		c.discard = io.LimitedReader{R: body, N: size}
		if _, err := io.Copy(io.Discard, &c.discard); err != nil {
			return err
		}
		if c.discard.N > 0 {
			return io.ErrUnexpectedEOF
		}
	}
	c.r.messages.Add(1)
	c.r.bytes.Add(4 + size)
	return nil
}
