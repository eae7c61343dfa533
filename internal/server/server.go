// Package server assembles a running tailplane: storage, state, the
// policy, the netmap engine, the client protocol, the embedded DERP relay,
// the admin socket, and the metrics and debug listeners.
package server

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"tailscale.com/types/key"

	"github.com/tailplane/tailplane/internal/admin"
	"github.com/tailplane/tailplane/internal/config"
	"github.com/tailplane/tailplane/internal/control"
	"github.com/tailplane/tailplane/internal/derp"
	"github.com/tailplane/tailplane/internal/metrics"
	"github.com/tailplane/tailplane/internal/netmap"
	"github.com/tailplane/tailplane/internal/state"
	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/postgres"
	"github.com/tailplane/tailplane/internal/store/sqlite"
)

// NewLogger builds the slog logger the configuration asks for.
func NewLogger(cfg config.Config) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", cfg.LogLevel)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch cfg.LogFormat {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("log format %q: want text or json", cfg.LogFormat)
}

func openStore(ctx context.Context, cfg config.Config) (store.Store, error) {
	switch cfg.Database.Type {
	case "postgres":
		return postgres.Open(ctx, cfg.Database.PostgresDSN)
	default:
		return sqlite.Open(cfg.Database.SQLitePath)
	}
}

// settingDERPMeshKey holds the secret the replicas' relays mesh with.
const settingDERPMeshKey = "derp_mesh_key"

// loadOrCreateMeshKey returns the replicas' DERP mesh key, creating it on
// the first start of a meshed replica.
func loadOrCreateMeshKey(ctx context.Context, st *state.State) (key.DERPMesh, error) {
	b, err := st.SettingOrCreate(ctx, settingDERPMeshKey, func() ([]byte, error) {
		var raw [32]byte
		rand.Read(raw[:])
		return []byte(hex.EncodeToString(raw[:])), nil
	})
	if err != nil {
		return key.DERPMesh{}, err
	}
	k, err := key.ParseDERPMesh(string(b))
	if err != nil {
		return k, fmt.Errorf("stored %s: %w", settingDERPMeshKey, err)
	}
	return k, nil
}

// replicaStore is a store that several replicas can share.
type replicaStore interface {
	state.Follower
	// Alone reports whether no other replica is running on the store.
	// Called before Follow: a following replica counts as running.
	Alone(ctx context.Context) (bool, error)
}

// followReplicas makes st follow the other replicas sharing db, if db can
// be shared, and reports whether this process is the only one running. A
// follower that can no longer follow (it fell behind the pruned change
// log, or another replica runs a newer version) sends its error on
// cannotFollow.
func followReplicas(ctx context.Context, db store.Store, st *state.State, log *slog.Logger) (alone bool, cannotFollow <-chan error, err error) {
	rs, ok := db.(replicaStore)
	if !ok {
		return true, nil, nil
	}
	if alone, err = rs.Alone(ctx); err != nil {
		return false, nil, err
	}
	if w, ok := db.(replicaWatcher); ok {
		w.SetReplica(st.Owner())
	}
	cannotFollow = st.Follow(ctx, rs)
	if err := st.CatchUp(ctx); err != nil {
		return false, nil, err
	}
	if !alone {
		st.StartOwnRanges()
	}
	log.Info("following the changes of other replicas sharing the database", "other_replicas_running", !alone)
	return alone, cannotFollow, nil
}

// replicaWatcher is a store that tells crashed replicas from running ones.
type replicaWatcher interface {
	// SetReplica names this process; called before it follows.
	SetReplica(id string)
	// Gone returns those of ids whose replicas are not running.
	Gone(ctx context.Context, ids []string) ([]string, error)
}

// presence tells the admin API where nodes' map streams are open: on this
// server (the engine's sessions), or on another running replica.
type presence struct {
	*netmap.Engine
	w replicaWatcher // nil without replicas
}

// Running implements admin.Presence.
func (p presence) Running(ctx context.Context, ids []string) (map[string]bool, error) {
	if p.w == nil {
		return nil, nil
	}
	gone, err := p.w.Gone(ctx, ids)
	if err != nil {
		return nil, err
	}
	running := make(map[string]bool, len(ids))
	for _, id := range ids {
		running[id] = true
	}
	for _, g := range gone {
		delete(running, g)
	}
	return running, nil
}

// watchReplicasEvery is how often a replica looks for others that stopped
// without marking their nodes offline; one is taken for gone after two
// looks, 15-30 s after it stopped.
const watchReplicasEvery = 15 * time.Second

// watchReplicas hands the nodes held by replicas that are gone to adopt
// (control.Server.AdoptOrphans), every every, until ctx ends. A replica
// counts as gone when two checks in a row find it so: one whose
// notification connection is being re-established is gone for a moment.
//
// Only the replica that leads (see leader) adopts; the others only watch
// for their turn.
func watchReplicas(ctx context.Context, w replicaWatcher, lead func() bool, st *state.State, adopt func(map[string]bool) int, every time.Duration, log *slog.Logger) {
	var suspects map[string]bool // gone at the last check
	led := false
	repeat(ctx, every, func() {
		if leading := lead(); leading != led {
			led = leading
			if led {
				metrics.JobsLeader.Set(1)
				log.Info("this replica now runs the jobs one replica runs for all: pruning the change log, taking over the nodes of crashed replicas")
			} else {
				metrics.JobsLeader.Set(0)
				log.Info("another replica now runs the jobs one replica runs for all")
			}
		}
		if !led {
			suspects = nil
			return
		}
		held := map[string]bool{}
		for _, n := range st.Nodes() {
			if n.Online && n.Holder != "" && n.Holder != st.Owner() {
				held[n.Holder] = true
			}
		}
		if len(held) == 0 {
			suspects = nil
			return
		}
		gone, err := w.Gone(ctx, slices.Collect(maps.Keys(held)))
		if err != nil {
			log.Warn("could not check which replicas are running", "err", err)
			return
		}
		confirmed := map[string]bool{}
		for _, g := range gone {
			if suspects[g] {
				confirmed[g] = true
			}
		}
		suspects = map[string]bool{}
		for _, g := range gone {
			suspects[g] = true
		}
		if len(confirmed) == 0 {
			return
		}
		if n := adopt(confirmed); n > 0 {
			log.Warn("replicas stopped without marking their nodes offline; their nodes count as online for the restart grace while they reconnect",
				"replicas", slices.Sorted(maps.Keys(confirmed)), "nodes", n)
		}
	})
}

// repeat runs fn every d until ctx ends.
func repeat(ctx context.Context, d time.Duration, fn func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

// Change-log pruning: every commit appends an entry, which only replicas
// following each other read, within seconds. Entries older than
// changeLogKeep go every pruneEvery; a replica that falls further behind
// than that stops (state.Follow) and reloads when restarted.
const (
	changeLogKeep = time.Hour
	pruneEvery    = 10 * time.Minute
)

// leader is a store shared by replicas that picks one of them to run the
// jobs one replica runs for all (postgres.Store.Leading).
type leader interface {
	Leading() bool
}

// leads returns whether this process runs the jobs one replica runs for
// all now: always, on a store that replicas do not share.
func leads(db store.Store) func() bool {
	if l, ok := db.(leader); ok {
		return l.Leading
	}
	return func() bool { return true }
}

// changePruner is a store whose change log can be pruned.
type changePruner interface {
	PruneChanges(ctx context.Context, before time.Time) (int64, error)
}

// pruneChanges deletes change-log entries older than keep, every every
// while lead says this process leads, until ctx ends.
func pruneChanges(ctx context.Context, p changePruner, lead func() bool, every, keep time.Duration, log *slog.Logger) {
	repeat(ctx, every, func() {
		if !lead() {
			return
		}
		start := time.Now()
		n, err := p.PruneChanges(ctx, start.Add(-keep))
		switch {
		case err != nil && ctx.Err() == nil:
			log.Error("pruning the change log failed; retrying later", "err", err)
		case n > 0:
			log.Info("pruned the change log", "entries", n, "older_than", keep, "took", time.Since(start).Round(time.Millisecond))
		}
	})
}

// loadOrCreateKey keeps a server key in the store so it survives restarts
// and is shared by replicas.
func loadOrCreateKey[T any, PT interface {
	*T
	MarshalText() ([]byte, error)
	UnmarshalText([]byte) error
}](ctx context.Context, st *state.State, name string, gen func() T) (T, error) {
	var k T
	b, err := st.SettingOrCreate(ctx, name, func() ([]byte, error) {
		k := gen()
		return PT(&k).MarshalText()
	})
	if err != nil {
		return k, err
	}
	if err := PT(&k).UnmarshalText(b); err != nil {
		return k, fmt.Errorf("stored %s: %w", name, err)
	}
	return k, nil
}

// Run serves until ctx ends or SIGINT/SIGTERM arrives. cfg must have been
// finished (config.Config.Finish).
func Run(parent context.Context, cfg config.Config) error {
	log, err := NewLogger(cfg)
	if err != nil {
		return err
	}
	slog.SetDefault(log)
	ctx, stop := signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
	defer stop()

	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	// Bind the public listener first: a port conflict is the most common
	// start-up failure and should not leave a half-started server.
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	defer ln.Close()
	adminLn, err := admin.Listen(cfg.AdminSocket())
	if err != nil {
		return err
	}
	defer adminLn.Close()

	db, err := openStore(ctx, cfg)
	if err != nil {
		return err
	}
	defer db.Close()
	v4, _ := cfg.V4Prefix()
	v6, _ := cfg.V6Prefix()
	loadStart := time.Now()
	st, err := state.New(ctx, state.Options{
		Store: db, V4Prefix: v4, V6Prefix: v6, Logger: log,
		OnCommit: func(n int, d time.Duration) {
			metrics.CommitBatch.Observe(float64(n))
			metrics.CommitSeconds.Observe(d.Seconds())
		},
	})
	if err != nil {
		return err
	}
	defer st.Close()
	log.Info("state loaded", "users", len(st.Users()), "nodes", len(st.Nodes()), "took", time.Since(loadStart).Round(time.Millisecond))
	alone, cannotFollow, err := followReplicas(ctx, db, st, log)
	if err != nil {
		return err
	}

	if cfg.Policy.Mode == "file" {
		loadPolicyFile(st, cfg.Policy.File, log)
	}

	noiseKey, err := loadOrCreateKey(ctx, st, state.SettingNoiseKey, key.NewMachine)
	if err != nil {
		return err
	}
	var derpSrv *derp.Embedded
	static := netmap.Static{BaseDomain: cfg.DNS.BaseDomain, MagicDNS: cfg.DNS.MagicDNS, Nameservers: cfg.DNS.Nameservers}
	if cfg.DERP.Enabled {
		derpKey, err := loadOrCreateKey(ctx, st, "derp_private_key", key.NewNode)
		if err != nil {
			return err
		}
		var meshKey key.DERPMesh
		if len(cfg.DERP.MeshWith) > 0 {
			// Meshed relays tell each other apart by key, so each
			// replica's is its own; clients do not pin relay keys.
			derpKey = key.NewNode()
			if meshKey, err = loadOrCreateMeshKey(ctx, st); err != nil {
				return err
			}
		}
		derpSrv, err = derp.Start(ctx, derp.Options{
			PrivateKey: derpKey, STUNListen: cfg.DERP.STUNListen, RegionID: cfg.DERP.RegionID,
			RegionCode: cfg.DERP.RegionCode, RegionName: cfg.DERP.RegionName, ServerURL: cfg.ServerURL, Logger: log,
			MeshKey: meshKey, MeshWith: cfg.DERP.MeshWith,
		})
		if err != nil {
			return err
		}
		defer derpSrv.Close()
		if static.DERPMap, err = derpSrv.DERPMap(); err != nil {
			return err
		}
	}
	eng := netmap.New(netmap.Options{State: st, Static: static, Logger: log})
	go eng.Run(ctx)

	ctlOpts := control.Options{State: st, Engine: eng, NoiseKey: noiseKey, Logger: log, EphemeralTimeout: cfg.EphemeralTimeout, OfflineGrace: cfg.OfflineGrace, RestartGrace: cfg.RestartGrace}
	if derpSrv != nil {
		ctlOpts.DERP = derpSrv.Handler()
	}
	ctl := control.New(ctlOpts)
	if alone {
		ctl.PresumeOnline()
	} else {
		log.Info("other replicas are running: nodes recorded online stay so, as they may be connected there")
	}
	ctl.ExpireStaleEphemerals()

	srv := &http.Server{
		Handler:           ctl,
		ReadHeaderTimeout: 10 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 4)
	go func() {
		if cfg.TLS.CertFile != "" {
			cert, err := tls.LoadX509KeyPair(cfg.TLS.CertFile, cfg.TLS.KeyFile)
			if err != nil {
				errc <- fmt.Errorf("tls: %w", err)
				return
			}
			srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}
			errc <- srv.ServeTLS(ln, "", "")
			return
		}
		errc <- srv.Serve(ln)
	}()

	pres := presence{Engine: eng}
	if w, ok := db.(replicaWatcher); ok && cannotFollow != nil {
		pres.w = w
	}
	adm := admin.NewServer(st, cfg.DNS.BaseDomain, policyFileOf(cfg), pres, log)
	go func() { errc <- adm.Serve(adminLn) }()

	if cfg.MetricsListen != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(metrics.Registry, promhttp.HandlerOpts{}))
		go func() { errc <- serveAux(cfg.MetricsListen, mux) }()
	}
	if cfg.DebugListen != "" {
		go func() { errc <- serveAux(cfg.DebugListen, DebugHandler()) }()
	}
	if cfg.Policy.Mode == "file" {
		go watchPolicyFile(ctx, st, cfg.Policy.File, log)
	}
	if p, ok := db.(changePruner); ok {
		go pruneChanges(ctx, p, leads(db), pruneEvery, changeLogKeep, log)
	}
	if cannotFollow != nil {
		go func() { errc <- <-cannotFollow }()
		if pres.w != nil {
			go watchReplicas(ctx, pres.w, leads(db), st, ctl.AdoptOrphans, watchReplicasEvery, log)
		}
	}
	if pres.w == nil {
		metrics.JobsLeader.Set(1) // no other replica to lead
	}

	stunInfo := "off"
	if derpSrv != nil && derpSrv.STUNPort() > 0 {
		stunInfo = fmt.Sprintf("udp/%d", derpSrv.STUNPort())
	}
	log.Info("tailplane serving", "url", cfg.ServerURL, "listen", ln.Addr().String(), "data_dir", cfg.DataDir,
		"db", cfg.Database.Type, "derp", cfg.DERP.Enabled, "stun", stunInfo, "admin_socket", cfg.AdminSocket())

	select {
	case <-ctx.Done():
	case err := <-errc:
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
	}
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	adm.Shutdown(sctx)
	// Streaming map requests never finish by themselves; closing is how
	// clients learn to reconnect.
	srv.Close()
	return nil
}

// DebugHandler serves pprof at /debug/pprof/. The server and the load
// tool both offer it on a listener of its own, never on the control port.
func DebugHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

func serveAux(addr string, h http.Handler) error {
	s := &http.Server{Addr: addr, Handler: h, ReadHeaderTimeout: 10 * time.Second}
	if err := s.ListenAndServe(); err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	return nil
}

func policyFileOf(cfg config.Config) string {
	if cfg.Policy.Mode == "file" {
		return cfg.Policy.File
	}
	return ""
}

// loadPolicyFile activates the policy in path if it is valid; otherwise the
// active policy (the last good one) stays and the error is logged.
func loadPolicyFile(st *state.State, path string, log *slog.Logger) bool {
	text, err := os.ReadFile(path)
	if err != nil {
		log.Error("policy file unreadable; the active policy stays in force", "file", path, "err", err)
		return false
	}
	if _, cur := st.Policy(); string(cur) == string(text) {
		return false
	}
	// Stored like a policy set through the API, so the last good file
	// policy is what an invalid file falls back to after a restart.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := st.SetPolicy(ctx, text); err != nil {
		log.Error("policy file refused; the active policy stays in force", "file", path, "err", strings.TrimSpace(err.Error()))
		return false
	}
	log.Info("policy loaded from file", "file", path, "bytes", len(text))
	return true
}

// watchPolicyFile reloads the policy file when it changes or on SIGHUP.
func watchPolicyFile(ctx context.Context, st *state.State, path string, log *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// The first tick always reads the file: it may have changed between
	// the load at start-up and this goroutine starting. Reading an
	// unchanged file is a no-op (loadPolicyFile compares with the active
	// policy).
	var lastMod time.Time
	lastSize := int64(-1)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			log.Info("SIGHUP: reloading policy file", "file", path)
			loadPolicyFile(st, path, log)
		case <-tick.C:
			fi, err := os.Stat(path)
			if err != nil || (fi.ModTime().Equal(lastMod) && fi.Size() == lastSize) {
				continue
			}
			lastMod, lastSize = fi.ModTime(), fi.Size()
			loadPolicyFile(st, path, log)
		}
	}
}
