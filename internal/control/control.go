// Package control serves the Tailscale client protocol: /key, the /ts2021
// Noise upgrade with HTTP/2 over it, /machine/register and /machine/map.
// Handlers validate and translate requests into state commands and attach
// streaming sessions to the netmap engine; they never build netmaps.
package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"tailscale.com/control/controlhttp/controlhttpserver"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/metrics"
	"github.com/tailplane/tailplane/internal/netmap"
	"github.com/tailplane/tailplane/internal/session"
	"github.com/tailplane/tailplane/internal/state"
	"github.com/tailplane/tailplane/internal/store"
)

// MinCapVer is the oldest client capability version served: Tailscale
// v1.80 (capability version 113). Older clients get a clear refusal.
const MinCapVer tailcfg.CapabilityVersion = 113

// Limits on unauthenticated and per-request work (DESIGN principle 8).
const (
	maxRequestBody   = 1 << 20 // register and map requests are a few KiB
	handshakeTimeout = 10 * time.Second
	requestTimeout   = 30 * time.Second // register and non-streaming map
)

// Options configures a Server.
type Options struct {
	State    *state.State
	Engine   *netmap.Engine
	NoiseKey key.MachinePrivate
	Logger   *slog.Logger
	// EphemeralTimeout is how long an ephemeral node may be disconnected
	// before it is deleted.
	EphemeralTimeout time.Duration
	// OfflineGrace is how long a node whose map stream ended still counts
	// as online: a client reconnecting within it never appears offline,
	// so a reconnect storm changes no peer's view (each flap reached every
	// peer and re-encoded the node in every full map).
	OfflineGrace time.Duration
	// RestartGrace is how long, after a restart, nodes that were online
	// when the previous process last recorded it still count as online
	// while their clients reconnect (PresumeOnline); 0 marks them offline
	// at start. Loading every node offline made each reconnect of a
	// restart storm a presence change for every peer.
	RestartGrace time.Duration
	// DERP serves /derp when non-nil.
	DERP http.Handler
}

// Server is the client-facing HTTP handler.
type Server struct {
	st       *state.State
	eng      *netmap.Engine
	noiseKey key.MachinePrivate
	log      *slog.Logger
	mux      *http.ServeMux
	h2mux    *http.ServeMux
	ephTO    time.Duration
	offGrace time.Duration
	rsGrace  time.Duration

	// timerMu guards the per-node timers: ephemeral expiry, and marking
	// nodes offline when their grace has passed.
	timerMu   sync.Mutex
	ephTimers map[uint64]nodeTimer
	offTimers map[uint64]nodeTimer
}

// nodeTimer is a pending timer of a node, and when it was set.
type nodeTimer struct {
	t   *time.Timer
	set time.Time
}

// New returns the protocol handler.
func New(o Options) *Server {
	s := &Server{
		st: o.State, eng: o.Engine, noiseKey: o.NoiseKey, log: o.Logger,
		ephTO: o.EphemeralTimeout, ephTimers: map[uint64]nodeTimer{},
		offGrace: o.OfflineGrace, offTimers: map[uint64]nodeTimer{}, rsGrace: o.RestartGrace,
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	s.st.Subscribe(s)
	s.mux = http.NewServeMux()
	s.mux.HandleFunc("GET /key", s.serveKey)
	s.mux.HandleFunc("/ts2021", s.serveNoise)
	s.mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	s.mux.HandleFunc("GET /generate_204", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	if o.DERP != nil {
		s.mux.Handle("/derp", o.DERP)
		s.mux.HandleFunc("/derp/probe", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
		s.mux.HandleFunc("/derp/latency-check", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	}
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "tailplane: unknown endpoint "+r.URL.Path, http.StatusNotFound)
	})

	s.h2mux = http.NewServeMux()
	s.h2mux.HandleFunc("POST /machine/register", s.serveRegister)
	s.h2mux.HandleFunc("POST /machine/map", s.serveMap)
	s.h2mux.HandleFunc("POST /machine/set-dns", s.serveSetDNS)
	s.h2mux.HandleFunc("POST /machine/update-health", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, io.LimitReader(r.Body, maxRequestBody))
		w.WriteHeader(http.StatusNoContent)
	})
	s.h2mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "tailplane: unsupported endpoint "+r.URL.Path, http.StatusNotFound)
	})
	return s
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

func (s *Server) serveKey(w http.ResponseWriter, r *http.Request) {
	if v := r.URL.Query().Get("v"); v != "" {
		cv, err := strconv.Atoi(v)
		if err != nil {
			http.Error(w, "bad v parameter", http.StatusBadRequest)
			return
		}
		if tailcfg.CapabilityVersion(cv) < MinCapVer {
			http.Error(w, tooOldMessage(tailcfg.CapabilityVersion(cv)), http.StatusBadRequest)
			return
		}
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(&tailcfg.OverTLSPublicKeyResponse{PublicKey: s.noiseKey.Public()})
}

func tooOldMessage(v tailcfg.CapabilityVersion) string {
	return fmt.Sprintf("tailplane needs Tailscale v1.80 or newer (capability version %d); this client is capability version %d: please upgrade it", MinCapVer, v)
}

type machineKeyCtx struct{}

func (s *Server) serveNoise(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost && r.Method != http.MethodGet {
		http.Error(w, "POST or GET required", http.StatusMethodNotAllowed)
		return
	}
	// The handshake is unauthenticated: bound it in time.
	hctx, cancel := context.WithTimeout(r.Context(), handshakeTimeout)
	conn, err := controlhttpserver.AcceptHTTP(hctx, batchingWriter{w}, r, s.noiseKey, nil)
	cancel()
	if err != nil {
		s.log.Debug("noise handshake rejected", "remote", r.RemoteAddr, "err", err)
		return
	}
	defer conn.Close()
	h2 := &http2.Server{
		MaxConcurrentStreams: 16,
		MaxReadFrameSize:     1 << 20,
		IdleTimeout:          5 * time.Minute,
	}
	h2.ServeConn(conn, &http2.ServeConnOpts{
		Context:    context.WithValue(r.Context(), machineKeyCtx{}, conn.Peer()),
		BaseConfig: &http.Server{Handler: s.h2mux, ReadHeaderTimeout: handshakeTimeout},
	})
}

func machineKey(r *http.Request) (key.MachinePublic, bool) {
	k, ok := r.Context().Value(machineKeyCtx{}).(key.MachinePublic)
	return k, ok
}

// readJSON reads a bounded request body into v.
func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxRequestBody+1))
	if err != nil {
		http.Error(w, "reading request: "+err.Error(), http.StatusBadRequest)
		return false
	}
	if len(body) > maxRequestBody {
		http.Error(w, fmt.Sprintf("request body larger than %d bytes", maxRequestBody), http.StatusRequestEntityTooLarge)
		return false
	}
	if err := json.Unmarshal(body, v); err != nil {
		http.Error(w, "malformed request: "+err.Error(), http.StatusBadRequest)
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func (s *Server) serveRegister(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	mk, ok := machineKey(r)
	if !ok {
		http.Error(w, "no machine key", http.StatusUnauthorized)
		return
	}
	var req tailcfg.RegisterRequest
	if !readJSON(w, r, &req) {
		metrics.Registrations.WithLabelValues("bad_request").Inc()
		return
	}
	if req.Version < MinCapVer {
		metrics.Registrations.WithLabelValues("too_old").Inc()
		writeJSON(w, &tailcfg.RegisterResponse{Error: tooOldMessage(req.Version)})
		return
	}
	if req.NodeKey.IsZero() {
		http.Error(w, "register request without a node key", http.StatusBadRequest)
		return
	}
	p := state.RegisterParams{
		MachineKey: mk, NodeKey: req.NodeKey, OldNodeKey: req.OldNodeKey,
		Hostinfo: req.Hostinfo, Expiry: req.Expiry,
	}
	if req.Auth != nil {
		p.AuthKey = req.Auth.AuthKey
	}
	ctx, cancel := context.WithTimeout(r.Context(), requestTimeout)
	defer cancel()
	res, err := s.st.Register(ctx, p)
	if err != nil {
		result := "error"
		switch {
		case errors.Is(err, state.ErrKeyInvalid):
			result = "key_invalid"
		case errors.Is(err, state.ErrKeyExpired):
			result = "key_expired"
		case errors.Is(err, state.ErrKeyUsed):
			result = "key_used"
		case errors.Is(err, state.ErrNeedsAuthKey):
			result = "needs_key"
		}
		metrics.Registrations.WithLabelValues(result).Inc()
		s.log.Info("registration refused", "machine", mk.ShortString(), "reason", err)
		writeJSON(w, &tailcfg.RegisterResponse{Error: err.Error()})
		return
	}
	metrics.Registrations.WithLabelValues("ok").Inc()
	metrics.RegisterSeconds.Observe(time.Since(start).Seconds())
	resp := &tailcfg.RegisterResponse{MachineAuthorized: true}
	if res.User != nil {
		prof := netmap.UserProfile(res.User)
		resp.User = tailcfg.User{ID: prof.ID, DisplayName: prof.DisplayName, Created: res.User.CreatedAt}
		resp.Login = tailcfg.Login{ID: tailcfg.LoginID(prof.ID), LoginName: prof.LoginName, DisplayName: prof.DisplayName}
	}
	if res.Node != nil {
		resp.NodeKeyExpired = res.Node.Expired(time.Now())
		s.log.Info("node registered", "node", res.Node.ID, "name", res.Node.GivenName, "ipv4", res.Node.IPv4, "ms", time.Since(start).Milliseconds())
	}
	writeJSON(w, resp)
}

func (s *Server) serveMap(w http.ResponseWriter, r *http.Request) {
	mk, ok := machineKey(r)
	if !ok {
		http.Error(w, "no machine key", http.StatusUnauthorized)
		return
	}
	var req tailcfg.MapRequest
	if !readJSON(w, r, &req) {
		return
	}
	if req.Version < MinCapVer {
		http.Error(w, tooOldMessage(req.Version), http.StatusBadRequest)
		return
	}
	n := s.st.NodeByKey(req.NodeKey)
	if n == nil {
		http.Error(w, "node key not registered here (the node may have been deleted): run 'tailscale up' again", http.StatusUnauthorized)
		return
	}
	if n.MachineKey != mk {
		http.Error(w, "node key does not belong to this machine", http.StatusUnauthorized)
		return
	}
	// A streaming request from a current client is read-only: clients
	// send Hostinfo and endpoints in separate non-streaming requests.
	if !req.Stream || req.Version < 68 {
		s.st.UpdateFromClient(n.ID, state.ClientUpdate{
			Hostinfo: req.Hostinfo, Endpoints: validEndpoints(req.Endpoints), DiscoKey: req.DiscoKey,
		})
	}
	if !req.Stream {
		if req.OmitPeers {
			w.WriteHeader(http.StatusOK)
			return
		}
		full, ok := s.eng.FullMap(n.ID)
		if !ok {
			http.Error(w, "node vanished", http.StatusGone)
			return
		}
		w.WriteHeader(http.StatusOK)
		session.WriteFrame(w, full, req.Compress == "zstd")
		return
	}
	s.stream(w, r, n.ID, req.Compress == "zstd")
}

func (s *Server) stream(w http.ResponseWriter, r *http.Request, nodeID uint64, compress bool) {
	sess := session.New(nodeID, compress)
	if !s.eng.Attach(sess) {
		http.Error(w, "node vanished", http.StatusGone)
		return
	}
	s.cancelEphemeralExpiry(nodeID)
	s.cancelOffline(nodeID)
	s.st.SetOnline(nodeID, true)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	err := sess.Run(r.Context(), flushWriter{w, http.NewResponseController(w)})
	if s.eng.Detach(sess) {
		s.scheduleOffline(nodeID)
		s.scheduleEphemeralExpiry(nodeID)
	}
	if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, session.ErrClosed) {
		s.log.Debug("map stream ended", "node", nodeID, "err", err)
	}
}

type flushWriter struct {
	io.Writer
	rc *http.ResponseController
}

func (f flushWriter) Flush() error { return f.rc.Flush() }

// validEndpoints drops endpoints a peer could not use.
func validEndpoints(eps []netip.AddrPort) []netip.AddrPort {
	out := eps[:0:0]
	for _, ep := range eps {
		if ep.IsValid() && ep.Port() != 0 {
			out = append(out, ep)
		}
	}
	return out
}

func (s *Server) serveSetDNS(w http.ResponseWriter, r *http.Request) {
	var req tailcfg.SetDNSRequest
	if !readJSON(w, r, &req) {
		return
	}
	http.Error(w, "tailplane does not manage DNS records for ACME challenges", http.StatusNotImplemented)
}

// scheduleEphemeralExpiry deletes an ephemeral node that stays offline
// for the configured timeout.
func (s *Server) scheduleEphemeralExpiry(id uint64) {
	n := s.st.Node(id)
	if n == nil || !n.Ephemeral {
		return
	}
	s.after(s.ephTimers, id, s.ephTO, func() {
		if n := s.st.Node(id); n == nil || s.eng.Connected(id) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
		defer cancel()
		if err := s.st.DeleteNode(ctx, id); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return // another replica deleted it first
			}
			s.log.Error("deleting disconnected ephemeral node", "node", id, "err", err)
			return
		}
		s.log.Info("deleted disconnected ephemeral node", "node", id)
	})
}

func (s *Server) cancelEphemeralExpiry(id uint64) { s.cancel(s.ephTimers, id) }

// scheduleOffline marks a node whose stream ended offline once the grace
// has passed without a new stream.
func (s *Server) scheduleOffline(id uint64) { s.offlineAfter(id, s.offGrace, nil) }

// offlineAfter marks node id offline, and then runs then (if set), once d
// has passed (at once for d <= 0) unless it has a stream by then.
func (s *Server) offlineAfter(id uint64, d time.Duration, then func()) {
	gone := func() {
		if !s.eng.Connected(id) {
			s.st.SetOnline(id, false)
			if then != nil {
				then()
			}
		}
	}
	if d <= 0 {
		gone()
		return
	}
	s.after(s.offTimers, id, d, gone)
}

func (s *Server) cancelOffline(id uint64) { s.cancel(s.offTimers, id) }

// after runs fn for node id once d has passed, replacing the node's
// pending timer in timers.
func (s *Server) after(timers map[uint64]nodeTimer, id uint64, d time.Duration, fn func()) {
	s.timerMu.Lock()
	defer s.timerMu.Unlock()
	if nt, ok := timers[id]; ok {
		nt.t.Stop()
	}
	var t *time.Timer
	t = time.AfterFunc(d, func() {
		s.timerMu.Lock()
		if timers[id].t == t {
			delete(timers, id)
		}
		s.timerMu.Unlock()
		fn()
	})
	timers[id] = nodeTimer{t: t, set: time.Now()}
}

// cancel stops the node's pending timer in timers.
func (s *Server) cancel(timers map[uint64]nodeTimer, id uint64) {
	s.timerMu.Lock()
	defer s.timerMu.Unlock()
	if nt, ok := timers[id]; ok {
		nt.t.Stop()
		delete(timers, id)
	}
}

// Notify implements state.Sink: a node that another replica saw come
// online after its stream here ended is that replica's now, so this one's
// timers must not mark it offline or delete it (ephemeral). A node another
// replica marked offline while its stream here is open (that replica took
// this one for gone, see AdoptOrphans) is marked online again.
func (s *Server) Notify(ev state.Event) {
	if !ev.Foreign || ev.Kind != state.NodeChanged {
		return
	}
	n := s.st.Node(ev.NodeID)
	if n != nil && !n.Online && s.eng.Connected(n.ID) {
		s.st.SetOnline(n.ID, true)
		return
	}
	if n == nil || !n.Online {
		return
	}
	s.timerMu.Lock()
	defer s.timerMu.Unlock()
	for _, timers := range []map[uint64]nodeTimer{s.offTimers, s.ephTimers} {
		if nt, ok := timers[ev.NodeID]; ok && n.LastSeen.After(nt.set) {
			nt.t.Stop()
			delete(timers, ev.NodeID)
		}
	}
}

// PresumeOnline keeps the nodes loaded as online (their streams ended with
// the previous process) online for the restart grace, and marks those
// that have not reconnected by then offline, scheduling the expiry of
// ephemeral ones. Call it once at start, before serving.
func (s *Server) PresumeOnline() {
	n := 0
	for _, node := range s.st.Nodes() {
		if node.Online {
			n++
			id := node.ID
			s.offlineAfter(id, s.rsGrace, func() { s.scheduleEphemeralExpiry(id) })
		}
	}
	if n > 0 {
		s.log.Info("nodes online before the restart count as online while they reconnect", "nodes", n, "restart_grace", s.rsGrace)
	}
}

// AdoptOrphans takes over the presence of the nodes that replicas in gone
// held: those stopped without marking their nodes offline (they crashed).
// As after a restart, such nodes count as online for the restart grace
// while their clients reconnect, to any replica; then they are marked
// offline, and ephemeral ones are deleted after their timeout. It returns
// how many nodes it took over; nodes already taken over are left as they
// are, so it can run again and again.
func (s *Server) AdoptOrphans(gone map[string]bool) int {
	adopted := 0
	for _, node := range s.st.Nodes() {
		id := node.ID
		if !node.Online || !gone[node.Holder] || s.eng.Connected(id) || s.pending(s.offTimers, id) {
			continue
		}
		s.offlineAfter(id, s.rsGrace, func() { s.scheduleEphemeralExpiry(id) })
		adopted++
	}
	return adopted
}

// pending reports whether node id has a timer in timers.
func (s *Server) pending(timers map[uint64]nodeTimer, id uint64) bool {
	s.timerMu.Lock()
	defer s.timerMu.Unlock()
	_, ok := timers[id]
	return ok
}

// ExpireStaleEphemerals schedules deletion of ephemeral nodes that are
// offline at start-up (their sessions ended with the previous process).
func (s *Server) ExpireStaleEphemerals() {
	for _, n := range s.st.Nodes() {
		if n.Ephemeral && !n.Online {
			s.scheduleEphemeralExpiry(n.ID)
		}
	}
}
