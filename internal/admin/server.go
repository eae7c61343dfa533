package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/tailplane/tailplane/internal/state"
)

// maxBody bounds admin request bodies; a policy file is the largest.
const maxBody = 64 << 20

// Server serves the admin API.
type Server struct {
	st         *state.State
	log        *slog.Logger
	baseDomain string
	// PolicyFile, when set, is the file the policy comes from; setting it
	// through the API is then refused.
	policyFile string
	presence   Presence
	srv        *http.Server
}

// Presence tells where nodes' map streams are open.
type Presence interface {
	// Connected reports whether node id has a map stream open to this
	// server.
	Connected(id uint64) bool
	// Running returns which of ids, the owners (state.Owner) of other
	// processes that held nodes, are replicas running now; nil without
	// replicas.
	Running(ctx context.Context, ids []string) (map[string]bool, error)
}

// NewServer returns an admin API over st.
func NewServer(st *state.State, baseDomain, policyFile string, presence Presence, log *slog.Logger) *Server {
	s := &Server{st: st, log: log, baseDomain: baseDomain, policyFile: policyFile, presence: presence}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/users", s.listUsers)
	mux.HandleFunc("POST /v1/users", s.createUser)
	mux.HandleFunc("POST /v1/users/{name}/rename", s.renameUser)
	mux.HandleFunc("DELETE /v1/users/{name}", s.deleteUser)
	mux.HandleFunc("GET /v1/keys", s.listKeys)
	mux.HandleFunc("POST /v1/keys", s.createKeys)
	mux.HandleFunc("POST /v1/keys/{id}/expire", s.expireKey)
	mux.HandleFunc("GET /v1/nodes", s.listNodes)
	mux.HandleFunc("DELETE /v1/nodes/{id}", s.deleteNode)
	mux.HandleFunc("POST /v1/nodes/{id}/expire", s.expireNode)
	mux.HandleFunc("POST /v1/nodes/{id}/rename", s.renameNode)
	mux.HandleFunc("POST /v1/nodes/{id}/tags", s.tagNode)
	mux.HandleFunc("POST /v1/nodes/{id}/routes", s.approveRoutes)
	mux.HandleFunc("GET /v1/policy", s.getPolicy)
	mux.HandleFunc("PUT /v1/policy", s.setPolicy)
	mux.HandleFunc("POST /v1/policy/check", s.checkPolicy)
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	return s
}

// Listen opens the unix socket at path, readable and writable by the
// owner only, replacing a stale socket left by a crashed server.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("admin socket dir: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin socket %s is in use: is another tailplane serving this data directory?", path)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("admin socket permissions: %w", err)
	}
	return ln, nil
}

// Serve serves on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	err := s.srv.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Shutdown stops the server.
func (s *Server) Shutdown(ctx context.Context) error { return s.srv.Shutdown(ctx) }

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, err error) {
	code := http.StatusBadRequest
	if errors.Is(err, state.ErrNotFound) {
		code = http.StatusNotFound
	}
	writeJSON(w, code, Error{Error: err.Error()})
}

func readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	b, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		writeErr(w, fmt.Errorf("reading request: %w", err))
		return nil, false
	}
	if len(b) > maxBody {
		writeErr(w, fmt.Errorf("request larger than %d bytes", maxBody))
		return nil, false
	}
	return b, true
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	b, ok := readBody(w, r)
	if !ok {
		return false
	}
	if err := json.Unmarshal(b, v); err != nil {
		writeErr(w, fmt.Errorf("malformed request: %w", err))
		return false
	}
	return true
}

func nodeID(w http.ResponseWriter, r *http.Request) (uint64, bool) {
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil {
		writeErr(w, fmt.Errorf("node id %q is not a number", r.PathValue("id")))
		return 0, false
	}
	return id, true
}

func apiUser(u *state.User) User {
	return User{ID: u.ID, Name: u.Name, Email: u.Email, CreatedAt: u.CreatedAt}
}

func (s *Server) listUsers(w http.ResponseWriter, r *http.Request) {
	out := []User{}
	for _, u := range s.st.Users() {
		out = append(out, apiUser(u))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) createUser(w http.ResponseWriter, r *http.Request) {
	var req CreateUserRequest
	if !decode(w, r, &req) {
		return
	}
	u, err := s.st.CreateUser(r.Context(), req.Name, req.Email)
	if err != nil {
		writeErr(w, err)
		return
	}
	s.log.Info("user created", "user", u.Name)
	writeJSON(w, http.StatusCreated, apiUser(u))
}

func (s *Server) renameUser(w http.ResponseWriter, r *http.Request) {
	var req RenameRequest
	if !decode(w, r, &req) {
		return
	}
	u, err := s.st.RenameUser(r.Context(), r.PathValue("name"), req.Name)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, apiUser(u))
}

func (s *Server) deleteUser(w http.ResponseWriter, r *http.Request) {
	if err := s.st.DeleteUser(r.Context(), r.PathValue("name")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) apiKey(k *state.PreAuthKey, now time.Time) Key {
	out := Key{ID: k.ID, Reusable: k.Reusable, Ephemeral: k.Ephemeral, Tags: k.Tags, CreatedAt: k.CreatedAt,
		Used: k.Used, Revoked: k.Revoked}
	if out.Tags == nil {
		out.Tags = []string{}
	}
	if u := s.st.User(k.UserID); u != nil {
		out.User = u.Name
	}
	if !k.Expiration.IsZero() {
		e := k.Expiration
		out.Expiration = &e
	}
	out.Valid = !k.Revoked && !(k.Used && !k.Reusable) && (k.Expiration.IsZero() || now.Before(k.Expiration))
	return out
}

func (s *Server) listKeys(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	out := []Key{}
	for _, k := range s.st.Keys() {
		out = append(out, s.apiKey(&k, now))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) createKeys(w http.ResponseWriter, r *http.Request) {
	var req CreateKeysRequest
	if !decode(w, r, &req) {
		return
	}
	var exp time.Duration
	if req.Expiration != "" {
		d, err := time.ParseDuration(req.Expiration)
		if err != nil || d <= 0 {
			writeErr(w, fmt.Errorf("expiration %q: want a positive duration like 24h or 90m", req.Expiration))
			return
		}
		exp = d
	}
	if req.Count == 0 {
		req.Count = 1
	}
	keys, err := s.st.CreateKeys(r.Context(), state.KeyParams{
		User: req.User, Reusable: req.Reusable, Ephemeral: req.Ephemeral, Tags: req.Tags, Expiration: exp,
	}, req.Count)
	if err != nil {
		writeErr(w, err)
		return
	}
	now := time.Now()
	out := make([]Key, len(keys))
	for i := range keys {
		out[i] = s.apiKey(&keys[i].PreAuthKey, now)
		out[i].Key = keys[i].Key
	}
	s.log.Info("pre-auth keys created", "user", req.User, "count", len(out), "reusable", req.Reusable, "ephemeral", req.Ephemeral)
	writeJSON(w, http.StatusCreated, out)
}

func (s *Server) expireKey(w http.ResponseWriter, r *http.Request) {
	if err := s.st.ExpireKey(r.Context(), r.PathValue("id")); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// elsewhere returns, of the nodes ns, the holders that are other running
// replicas: there, not here, the nodes' streams are open. Failing to ask
// is logged, and shows them as reconnecting.
func (s *Server) elsewhere(ctx context.Context, ns ...*state.Node) map[string]bool {
	held := map[string]bool{}
	for _, n := range ns {
		if n.Online && n.Holder != "" && n.Holder != s.st.Owner() && !s.presence.Connected(n.ID) {
			held[n.Holder] = true
		}
	}
	if len(held) == 0 {
		return nil
	}
	running, err := s.presence.Running(ctx, slices.Collect(maps.Keys(held)))
	if err != nil {
		s.log.Warn("could not ask which replicas are running; their nodes show as reconnecting", "err", err)
	}
	return running
}

// apiNode shows n; elsewhere holds the running replicas that hold nodes
// (see Server.elsewhere).
func (s *Server) apiNode(n *state.Node, now time.Time, elsewhere map[string]bool) Node {
	connected := s.presence.Connected(n.ID)
	out := Node{ID: n.ID, Name: n.GivenName, FQDN: n.GivenName + "." + s.baseDomain, Hostname: n.Hostname,
		IPv4: n.IPv4, IPv6: n.IPv6, Tags: n.Tags, Online: n.Online, Connected: connected,
		ConnectedElsewhere: n.Online && !connected && elsewhere[n.Holder], Ephemeral: n.Ephemeral,
		Expired: n.Expired(now), AdvertisedRoutes: n.AdvertisedRoutes, ApprovedRoutes: n.ApprovedRoutes,
		CreatedAt: n.CreatedAt}
	if u := s.st.User(n.UserID); u != nil {
		out.User = u.Name
	}
	if out.Tags == nil {
		out.Tags = []string{}
	}
	if out.AdvertisedRoutes == nil {
		out.AdvertisedRoutes = []netip.Prefix{}
	}
	if out.ApprovedRoutes == nil {
		out.ApprovedRoutes = []netip.Prefix{}
	}
	if !n.LastSeen.IsZero() {
		ls := n.LastSeen
		out.LastSeen = &ls
	}
	if !n.Expiry.IsZero() {
		e := n.Expiry
		out.Expiry = &e
	}
	return out
}

func (s *Server) listNodes(w http.ResponseWriter, r *http.Request) {
	now := time.Now()
	out := []Node{}
	ns := s.st.Nodes()
	elsewhere := s.elsewhere(r.Context(), ns...)
	for _, n := range ns {
		out = append(out, s.apiNode(n, now, elsewhere))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) deleteNode(w http.ResponseWriter, r *http.Request) {
	id, ok := nodeID(w, r)
	if !ok {
		return
	}
	if err := s.st.DeleteNode(r.Context(), id); err != nil {
		writeErr(w, err)
		return
	}
	s.log.Info("node deleted", "node", id)
	w.WriteHeader(http.StatusNoContent)
}

// nodeUpdate runs one of the state's node commands and answers with the node.
func (s *Server) nodeUpdate(w http.ResponseWriter, r *http.Request, fn func(ctx context.Context, id uint64) (*state.Node, error)) {
	id, ok := nodeID(w, r)
	if !ok {
		return
	}
	n, err := fn(r.Context(), id)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, s.apiNode(n, time.Now(), s.elsewhere(r.Context(), n)))
}

func (s *Server) expireNode(w http.ResponseWriter, r *http.Request) {
	s.nodeUpdate(w, r, s.st.ExpireNode)
}

func (s *Server) renameNode(w http.ResponseWriter, r *http.Request) {
	var req RenameRequest
	if !decode(w, r, &req) {
		return
	}
	s.nodeUpdate(w, r, func(ctx context.Context, id uint64) (*state.Node, error) { return s.st.RenameNode(ctx, id, req.Name) })
}

func (s *Server) tagNode(w http.ResponseWriter, r *http.Request) {
	var req TagsRequest
	if !decode(w, r, &req) {
		return
	}
	s.nodeUpdate(w, r, func(ctx context.Context, id uint64) (*state.Node, error) { return s.st.TagNode(ctx, id, req.Tags) })
}

func (s *Server) approveRoutes(w http.ResponseWriter, r *http.Request) {
	var req RoutesRequest
	if !decode(w, r, &req) {
		return
	}
	s.nodeUpdate(w, r, func(ctx context.Context, id uint64) (*state.Node, error) {
		return s.st.ApproveRoutes(ctx, id, req.Routes)
	})
}

func (s *Server) getPolicy(w http.ResponseWriter, r *http.Request) {
	_, text := s.st.Policy()
	src := "database"
	switch {
	case s.policyFile != "":
		src = "file"
	case text == nil:
		src = "default"
	}
	writeJSON(w, http.StatusOK, Policy{Source: src, Text: string(text)})
}

func (s *Server) setPolicy(w http.ResponseWriter, r *http.Request) {
	if s.policyFile != "" {
		writeErr(w, fmt.Errorf("the policy comes from the file %s (policy.mode: file): edit that file instead; it is reloaded on change", s.policyFile))
		return
	}
	b, ok := readBody(w, r)
	if !ok {
		return
	}
	if err := s.st.SetPolicy(r.Context(), b); err != nil {
		writeErr(w, fmt.Errorf("policy refused, the active policy stays in force: %w", err))
		return
	}
	s.log.Info("policy updated", "bytes", len(b))
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) checkPolicy(w http.ResponseWriter, r *http.Request) {
	b, ok := readBody(w, r)
	if !ok {
		return
	}
	if _, err := s.st.CheckPolicy(b); err != nil {
		writeErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
