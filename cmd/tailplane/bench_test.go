package main

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tailplane/tailplane/internal/admin"
	"github.com/tailplane/tailplane/internal/bench"
	"github.com/tailplane/tailplane/internal/config"
	"github.com/tailplane/tailplane/internal/server"
	"github.com/tailplane/tailplane/internal/store/postgres/pgtest"
)

// 'tailplane bench policy' writes the same files for the same flags.
func TestBenchPolicyCommandIsReproducible(t *testing.T) {
	gen := func(dir string, seed string) (pol, tn []byte) {
		root := newRoot()
		root.SetArgs([]string{"bench", "policy", "--out", dir, "--nodes", "50", "--users", "10", "--tags", "5",
			"--groups", "4", "--hosts", "6", "--rules", "40", "--self-rules", "2", "--ssh-rules", "2", "--seed", seed})
		root.SetErr(&bytes.Buffer{})
		if err := root.Execute(); err != nil {
			t.Fatal(err)
		}
		var err error
		if pol, err = os.ReadFile(filepath.Join(dir, tailnetPolicyFile)); err != nil {
			t.Fatal(err)
		}
		if tn, err = os.ReadFile(filepath.Join(dir, tailnetFile)); err != nil {
			t.Fatal(err)
		}
		return pol, tn
	}
	base := t.TempDir()
	p1, t1 := gen(filepath.Join(base, "a"), "7")
	p2, t2 := gen(filepath.Join(base, "b"), "7")
	p3, _ := gen(filepath.Join(base, "c"), "8")
	if !bytes.Equal(p1, p2) || !bytes.Equal(t1, t2) {
		t.Error("same seed, different files")
	}
	if bytes.Equal(p1, p3) {
		t.Error("different seeds, same policy")
	}
	tn, _, err := readBenchTailnet(filepath.Join(base, "a"))
	if err != nil {
		t.Fatal(err)
	}
	if len(tn.Users) != 10 || len(tn.Nodes) != 50 {
		t.Errorf("%d users, %d nodes; want 10 and 50", len(tn.Users), len(tn.Nodes))
	}
}

// startTailplane runs a tailplane server in-process on a free loopback
// port and returns its URL and data directory; opts adjust its defaults.
func startTailplane(t *testing.T, opts ...func(*config.Config)) (url, dataDir string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cfg := config.Default()
	cfg.DataDir = t.TempDir()
	cfg.Listen = addr
	cfg.DERP.STUNListen = ""
	cfg.LogLevel = "warn"
	for _, o := range opts {
		o(&cfg)
	}
	if err := cfg.Finish(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- server.Run(ctx, cfg) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("server did not stop")
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if res, err := http.Get("http://" + addr + "/health"); err == nil {
			res.Body.Close()
			return "http://" + addr, cfg.DataDir
		}
		select {
		case err := <-done:
			t.Fatalf("server stopped: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatal("server did not come up")
	return "", ""
}

// writeBenchTailnet runs 'tailplane bench policy' with flags into a new
// directory and reads back what it wrote.
func writeBenchTailnet(t *testing.T, flags ...string) (*benchTailnet, []byte) {
	t.Helper()
	dir := t.TempDir()
	root := newRoot()
	root.SetArgs(append([]string{"bench", "policy", "--out", dir}, flags...))
	root.SetErr(&bytes.Buffer{})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	tn, pol, err := readBenchTailnet(dir)
	if err != nil {
		t.Fatal(err)
	}
	return tn, pol
}

// A generated tailnet against a real tailplane: every node registers with
// its user, tags and advertised routes (user routers' approved by the
// policy's autoApprovers), and every observer ends up with exactly the
// peers the policy gives it over the addresses and routes the server has.
func TestBenchTailnetAgainstTailplane(t *testing.T) {
	if testing.Short() {
		t.Skip("runs a server and 60 clients")
	}
	const n = 60
	url, dataDir := startTailplane(t)
	tn, pol := writeBenchTailnet(t, "--nodes", "60", "--users", "60", "--tags", "40", "--groups", "30",
		"--hosts", "10", "--rules", "200", "--self-rules", "5", "--ssh-rules", "4", "--routers", "6")

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	c := admin.NewClient(filepath.Join(dataDir, "admin.sock"))
	o := bench.Options{
		ServerURL: url, N: n, Concurrency: 16, Observers: 12,
		Hold: 300 * time.Millisecond, Timeout: 40 * time.Second,
	}
	var log strings.Builder
	if err := prepareTailnetBench(ctx, c, tn, pol, &o, &log); err != nil {
		t.Fatal(err)
	}
	res, err := bench.Run(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("setup:\n%s", log.String())
	if res.Registered != n || res.Streaming != n || res.StreamsOpenAtEnd != n || res.ErrorCount != 0 || res.TimedOut {
		t.Errorf("registered %d, streaming %d, open %d, timed out %v, errors %v %v; want %d each and none",
			res.Registered, res.Streaming, res.StreamsOpenAtEnd, res.TimedOut, res.Errors, res.ErrorExamples, n)
	}
	conv := res.Convergence
	if !conv.Converged {
		t.Errorf("not converged")
	}
	trivial := true // with this shape (seed 1), nodes see 20 to 59 peers
	for _, ob := range conv.Observers {
		t.Logf("observer %d: expected %d, peers %d, converged %v after %.2fs", ob.Client, ob.Expected, ob.Peers, ob.Converged, ob.ConvergedSeconds)
		if ob.Expected < 0 || ob.Peers != ob.Expected || !ob.Converged {
			t.Errorf("observer %d: %d peers, expected %d", ob.Client, ob.Peers, ob.Expected)
		}
		if ob.Expected != n-1 {
			trivial = false
		}
	}
	if trivial {
		t.Errorf("every observer expects all %d peers: the policy restricts nothing, the test proves little", n-1)
	}

	// Every node registered as the tailnet says: its user and tags.
	nodes, err := c.Nodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]benchNode{}
	for _, bn := range tn.Nodes {
		want[bn.Hostname] = bn
	}
	if len(nodes) != n {
		t.Errorf("server has %d nodes, want %d", len(nodes), n)
	}
	routers := 0
	for _, sn := range nodes {
		bn, ok := want[sn.Hostname]
		if !ok || sn.User != bn.User || !slices.Equal(sn.Tags, bn.Tags) || !slices.Equal(sn.AdvertisedRoutes, bn.Routes) {
			t.Errorf("node %q: user %q tags %v routes %v; tailnet wants %+v", sn.Hostname, sn.User, sn.Tags, sn.AdvertisedRoutes, bn)
		}
		// The policy's autoApprovers approve user routers' routes.
		if len(bn.Routes) > 0 && len(bn.Tags) == 0 {
			routers++
			if !slices.Equal(sn.ApprovedRoutes, bn.Routes) {
				t.Errorf("router %q owned by %s: approved routes %v, want %v", sn.Hostname, sn.User, sn.ApprovedRoutes, bn.Routes)
			}
		}
	}
	if routers == 0 {
		t.Error("no user-owned router among the first 6 nodes: the routes prove nothing")
	}
}

// The tool spreads its clients over replicas sharing one PostgreSQL
// database: each replica serves half of them, and every observer, on
// either replica, ends up with exactly the peers the policy gives it.
func TestBenchOverReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("runs two servers and 40 clients")
	}
	const n = 40
	dsn := pgtest.SchemaDSN(t)
	onPostgres := func(c *config.Config) { c.Database = config.DatabaseConfig{Type: "postgres", PostgresDSN: dsn} }
	urlA, dirA := startTailplane(t, onPostgres)
	urlB, dirB := startTailplane(t, onPostgres)
	tn, pol := writeBenchTailnet(t, "--nodes", "40", "--users", "20", "--tags", "20", "--groups", "10",
		"--hosts", "5", "--rules", "100", "--self-rules", "3", "--ssh-rules", "2")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	a, b := admin.NewClient(filepath.Join(dirA, "admin.sock")), admin.NewClient(filepath.Join(dirB, "admin.sock"))
	o := bench.Options{
		ServerURL: urlA, Replicas: []string{urlB}, N: n, Concurrency: 16, Observers: 10,
		Hold: 3 * time.Second, Timeout: 40 * time.Second,
	}
	var log strings.Builder
	if err := prepareTailnetBench(ctx, a, tn, pol, &o, &log); err != nil {
		t.Fatal(err)
	}
	// While the clients hold their streams, each replica serves half.
	connected := func(c *admin.Client) int {
		nodes, err := c.Nodes(ctx)
		if err != nil {
			t.Error(err)
		}
		k := 0
		for _, nd := range nodes {
			if nd.Connected {
				k++
			}
		}
		return k
	}
	done := make(chan struct{})
	var res *bench.Result
	go func() {
		defer close(done)
		var err error
		if res, err = bench.Run(ctx, o); err != nil {
			t.Error(err)
		}
	}()
	split := false
	for !split {
		select {
		case <-done:
			t.Fatal("the run ended before both replicas served half of the clients each")
		case <-time.After(50 * time.Millisecond):
		}
		split = connected(a) == n/2 && connected(b) == n/2
	}
	<-done
	if res == nil {
		t.FailNow()
	}
	if res.Registered != n || res.StreamsOpenAtEnd != n || res.ErrorCount != 0 || !res.Convergence.Converged {
		t.Errorf("registered %d, open %d, errors %v %v, converged %v; want %d, %d, none, true",
			res.Registered, res.StreamsOpenAtEnd, res.Errors, res.ErrorExamples, res.Convergence.Converged, n, n)
	}
	for _, ob := range res.Convergence.Observers {
		if ob.Expected < 0 || ob.Peers != ob.Expected || !ob.Converged {
			t.Errorf("observer %d: %d peers, expected %d", ob.Client, ob.Peers, ob.Expected)
		}
	}
	for name, c := range map[string]*admin.Client{"a": a, "b": b} {
		if nodes, err := c.Nodes(ctx); err != nil || len(nodes) != n {
			t.Errorf("replica %s holds %d nodes (%v), want %d", name, len(nodes), err, n)
		}
	}
}

// TestBenchDebugListen: the tool serves its own pprof, and a taken
// address is an error before any load starts.
func TestBenchDebugListen(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	if err := serveBenchDebug(taken.Addr().String()); err == nil || !strings.Contains(err.Error(), "--debug-listen") {
		t.Fatalf("a taken address: %v, want a --debug-listen error", err)
	}
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := free.Addr().String()
	free.Close()
	if err := serveBenchDebug(addr); err != nil {
		t.Fatal(err)
	}
	res, err := http.Get("http://" + addr + "/debug/pprof/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("pprof: %s", res.Status)
	}
}
