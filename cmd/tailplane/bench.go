package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"

	"github.com/tailplane/tailplane/internal/admin"
	"github.com/tailplane/tailplane/internal/bench"
	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/server"
)

func newBenchCmd(g *globals) *cobra.Command {
	var o bench.Options
	var tags, user, tailnet, debugListen string
	var expected int
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Load-test a Tailscale-compatible control server with simulated clients",
		Long: `Simulate N Tailscale clients that speak the real protocol (Noise, register
with a pre-auth key, streaming map) against any Tailscale-compatible control
server, and report registrations/s, latency percentiles, time to first map,
time until the observers have every peer they should, bytes and errors. The
JSON result goes to stdout, progress to stderr.

Keys: --authkey (one reusable key), --keys-file (one key per line), or, against
a tailplane server on this machine, --data-dir DIR --user NAME to create
unique one-off keys through its admin socket.

With --tailnet DIR (written by 'tailplane bench policy'), against a local
tailplane server (--data-dir): the tool creates the tailnet's users, sets its
policy, creates one one-off key per node with that node's user and tags, and
client i registers as node i (-n defaults to the number of nodes; a smaller
-n takes the first N). Once every client has joined it reads the server's
nodes, compiles the active policy over them with tailplane's policy engine,
and expects every observer to see exactly the peers that policy gives it.
Start from a fresh data directory: nodes left from an earlier run are
peers too (they are counted, but make the run a different tailnet).

See docs/benchmarks.md for the figures measured and how to reproduce them.`,
		Example: `  tailplane bench --server http://127.0.0.1:8080 --data-dir ./tailplane-data --user bench -n 1000 --concurrency 200
  tailplane bench --server http://127.0.0.1:8080 --authkey KEY -n 500 --observers 10 --hold 30s --server-pid $(pidof tailplane)
  tailplane bench policy --out /tmp/tn --nodes 1000 --users 250 --rules 1500
  tailplane bench --server http://127.0.0.1:8080 --data-dir ./tailplane-data --tailnet /tmp/tn --observers 10`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if debugListen != "" {
				if err := serveBenchDebug(debugListen); err != nil {
					return err
				}
			}
			if tailnet != "" {
				return runTailnetBench(cmd, g, o, tailnet)
			}
			if tags != "" {
				o.Tags = strings.Split(tags, ",")
			}
			if expected > 0 {
				o.ExpectedPeers = func(int) int { return expected }
			}
			if o.AuthKey == "" && o.KeysFile == "" {
				if !cmd.Flags().Changed("data-dir") && g.config == "" {
					return fmt.Errorf("give --authkey, --keys-file, or --data-dir and --user of a local tailplane server to create keys")
				}
				c, err := adminClient(g)
				if err != nil {
					return err
				}
				o.CreateKeys = func(ctx context.Context, n int) ([]string, error) {
					return createBenchKeys(ctx, c, user, o.Tags, o.Ephemeral, n)
				}
			}
			o.Progress = os.Stderr
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt)
			defer stop()
			return runBench(ctx, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.ServerURL, "server", "http://127.0.0.1:8080", "control server URL")
	f.StringSliceVar(&o.Replicas, "replica", nil, "URL of another replica of the same server (repeatable): clients are spread over --server and the replicas")
	f.IntVarP(&o.N, "clients", "n", 100, "number of simulated clients")
	f.IntVar(&o.Concurrency, "concurrency", 64, "clients joining at the same time")
	f.StringVar(&o.AuthKey, "authkey", "", "one reusable pre-auth key for every client")
	f.StringVar(&o.KeysFile, "keys-file", "", "file with one pre-auth key per line")
	f.StringVar(&user, "user", "bench", "with --data-dir: user the created keys belong to (created if missing)")
	f.StringVar(&tags, "tags", "", "tags every client requests, e.g. tag:bench")
	f.BoolVar(&o.Ephemeral, "ephemeral", false, "register ephemeral nodes (removed after the run by servers that support it)")
	f.DurationVar(&o.Hold, "hold", 10*time.Second, "keep streams open this long after all clients joined")
	f.DurationVar(&o.ReconnectAt, "reconnect-at", 0, "drop and reconnect every client this long after all joined (a reconnect storm)")
	f.BoolVar(&o.Redial, "redial", false, "reconnect streams that end unexpectedly, with backoff, instead of counting errors: restart the server during --hold to measure a restart storm")
	f.IntVar(&o.Observers, "observers", 5, "clients that decode every message and track their peers")
	f.IntVar(&expected, "expected-peers", 0, "peers every observer should reach (default N-1)")
	f.DurationVar(&o.Timeout, "timeout", 10*time.Minute, "bound on the whole run")
	f.IntVar(&o.ServerPID, "server-pid", 0, "server process id on this machine, to report its CPU seconds and peak RSS")
	f.StringVar(&tailnet, "tailnet", "", "directory written by 'tailplane bench policy': users, policy and one node per client (needs --data-dir)")
	f.StringVar(&debugListen, "debug-listen", "", "serve the tool's own pprof at http://ADDR/debug/pprof/, to see what the load costs on the client side")
	cmd.AddCommand(newBenchPolicyCmd())
	return cmd
}

// serveBenchDebug listens before the run starts, so that a taken address
// is an error rather than a profile silently missing.
func serveBenchDebug(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--debug-listen: %w", err)
	}
	s := &http.Server{Handler: server.DebugHandler(), ReadHeaderTimeout: 10 * time.Second}
	go s.Serve(ln)
	return nil
}

// createBenchKeys makes n unique one-off keys through the admin socket,
// creating the user first if needed.
func createBenchKeys(ctx context.Context, c *admin.Client, user string, tags []string, ephemeral bool, n int) ([]string, error) {
	if _, err := c.CreateUser(ctx, admin.CreateUserRequest{Name: user}); err != nil && !strings.Contains(err.Error(), "already exists") {
		return nil, err
	}
	keys, err := c.CreateKeys(ctx, admin.CreateKeysRequest{User: user, Tags: tags, Ephemeral: ephemeral, Count: n})
	if err != nil {
		return nil, err
	}
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = k.Key
	}
	return out, nil
}

// runBench runs the load and prints the result as JSON.
func runBench(ctx context.Context, o bench.Options) error {
	res, err := bench.Run(ctx, o)
	if res != nil {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if e := enc.Encode(res); e != nil && err == nil {
			err = e
		}
	}
	return err
}

// runTailnetBench is 'tailplane bench --tailnet DIR'.
func runTailnetBench(cmd *cobra.Command, g *globals, o bench.Options, dir string) error {
	for _, name := range []string{"authkey", "keys-file", "user", "tags", "expected-peers"} {
		if cmd.Flags().Changed(name) {
			return fmt.Errorf("--tailnet sets keys, users, tags and expected peers itself: drop --%s", name)
		}
	}
	if !cmd.Flags().Changed("data-dir") && g.config == "" {
		return errors.New("--tailnet needs --data-dir (or --config) of the local tailplane server under test")
	}
	tn, pol, err := readBenchTailnet(dir)
	if err != nil {
		return err
	}
	if !cmd.Flags().Changed("clients") {
		o.N = len(tn.Nodes)
	}
	if o.N > len(tn.Nodes) {
		return fmt.Errorf("-n %d: the tailnet in %s has only %d nodes", o.N, dir, len(tn.Nodes))
	}
	c, err := adminClient(g)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt)
	defer stop()
	if err := prepareTailnetBench(ctx, c, tn, pol, &o, os.Stderr); err != nil {
		return err
	}
	o.Progress = os.Stderr
	return runBench(ctx, o)
}

// adminWorkers bounds concurrent admin calls while setting up a tailnet.
const adminWorkers = 8

// prepareTailnetBench sets up the tailnet for the first o.N nodes of tn on
// the server behind c (users, policy, one key per node) and sets o.Client
// and o.Expect accordingly. It logs what it did to log.
func prepareTailnetBench(ctx context.Context, c *admin.Client, tn *benchTailnet, pol []byte, o *bench.Options, log io.Writer) error {
	start := time.Now()
	// Users first: the policy names them (by email) and the keys belong to
	// them. Policies match users by email, so an existing user with
	// another email would make a different tailnet.
	existing, err := c.Users(ctx)
	if err != nil {
		return err
	}
	have := map[string]admin.User{}
	for _, u := range existing {
		have[u.Name] = u
	}
	var missing []benchUser
	for _, u := range tn.Users {
		if eu, ok := have[u.Name]; !ok {
			missing = append(missing, u)
		} else if eu.Email != u.Email {
			return fmt.Errorf("user %s exists with email %q, the tailnet wants %q: start from a fresh data directory", u.Name, eu.Email, u.Email)
		}
	}
	err = parallel(ctx, len(missing), adminWorkers, func(i int) error {
		_, err := c.CreateUser(ctx, admin.CreateUserRequest{Name: missing[i].Name, Email: missing[i].Email})
		return err
	})
	if err != nil {
		return fmt.Errorf("creating users: %w", err)
	}
	fmt.Fprintf(log, "tailnet: %d users (%d created) in %.1fs\n", len(tn.Users), len(missing), time.Since(start).Seconds())

	// The policy before any client joins, so that every node is judged by
	// it from its first netmap on.
	t := time.Now()
	if err := c.SetPolicy(ctx, pol); err != nil {
		return fmt.Errorf("setting the policy: %w", err)
	}
	fmt.Fprintf(log, "tailnet: policy set (%s) in %.1fs\n", benchHumanBytes(len(pol)), time.Since(t).Seconds())

	// One one-off key per node, created per (user, tags) with Count.
	t = time.Now()
	type group struct {
		user  string
		tags  []string
		nodes []int
	}
	var groups []*group
	byKey := map[string]*group{}
	for i, n := range tn.Nodes[:o.N] {
		k := n.User + "\x00" + strings.Join(n.Tags, ",")
		gr := byKey[k]
		if gr == nil {
			gr = &group{user: n.User, tags: n.Tags}
			byKey[k] = gr
			groups = append(groups, gr)
		}
		gr.nodes = append(gr.nodes, i)
	}
	keys := make([]string, o.N)
	err = parallel(ctx, len(groups), adminWorkers, func(j int) error {
		gr := groups[j]
		ks, err := c.CreateKeys(ctx, admin.CreateKeysRequest{User: gr.user, Tags: gr.tags, Ephemeral: o.Ephemeral, Count: len(gr.nodes)})
		if err != nil {
			return fmt.Errorf("user %s, tags %v: %w", gr.user, gr.tags, err)
		}
		if len(ks) != len(gr.nodes) {
			return fmt.Errorf("user %s, tags %v: asked for %d keys, got %d", gr.user, gr.tags, len(gr.nodes), len(ks))
		}
		for x, i := range gr.nodes {
			keys[i] = ks[x].Key
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("creating keys: %w", err)
	}
	fmt.Fprintf(log, "tailnet: %d keys in %d calls in %.1fs\n", o.N, len(groups), time.Since(t).Seconds())

	nodes := tn.Nodes[:o.N]
	o.Client = func(i int) bench.ClientSpec {
		return bench.ClientSpec{Hostname: nodes[i].Hostname, AuthKey: keys[i], Routes: nodes[i].Routes}
	}
	o.Expect = func(ctx context.Context) (func(int) int, error) {
		return tailnetExpectations(ctx, c, nodes, log)
	}
	return nil
}

// tailnetExpectations compiles the server's active policy over the server's
// users and nodes, as they are after the clients registered (addresses
// included), and returns how many peers each client's node has. Client i is
// the latest node with node i's hostname. A client whose node is not there
// (its registration failed) expects -1: it cannot converge.
func tailnetExpectations(ctx context.Context, c *admin.Client, nodes []benchNode, log io.Writer) (func(int) int, error) {
	start := time.Now()
	ap, err := c.Policy(ctx)
	if err != nil {
		return nil, err
	}
	pol := policy.Default()
	if ap.Source != "default" {
		if pol, err = policy.Parse([]byte(ap.Text)); err != nil {
			return nil, fmt.Errorf("active policy: %w", err)
		}
	}
	aus, err := c.Users(ctx)
	if err != nil {
		return nil, err
	}
	ans, err := c.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	users := make([]policy.User, 0, len(aus))
	userID := map[string]uint64{}
	for _, u := range aus {
		users = append(users, policy.User{ID: u.ID, Name: u.Name, Email: u.Email})
		userID[u.Name] = u.ID
	}
	pnodes := make([]policy.Node, 0, len(ans))
	byHost := map[string]uint64{}
	for _, n := range ans {
		pnodes = append(pnodes, policy.Node{
			ID: n.ID, Hostname: n.Hostname, UserID: userID[n.User], Tags: n.Tags,
			IPv4: n.IPv4, IPv6: n.IPv6,
			AdvertisedRoutes: n.AdvertisedRoutes, ApprovedRoutes: n.ApprovedRoutes,
		})
		if n.ID > byHost[n.Hostname] {
			byHost[n.Hostname] = n.ID
		}
	}
	comp, err := pol.Compile(users, pnodes)
	if err != nil {
		return nil, fmt.Errorf("compiling the active policy over the server's %d nodes: %w", len(pnodes), err)
	}
	counts := map[uint64]int{}
	expect := func(i int) int {
		id, ok := byHost[nodes[i].Hostname]
		if !ok {
			return -1
		}
		n, ok := counts[id]
		if !ok {
			n = len(comp.Peers(id))
			counts[id] = n
		}
		return n
	}
	fmt.Fprintf(log, "tailnet: expectations from the active policy over the server's %d nodes and %d users, compiled in %.1fs\n",
		len(pnodes), len(users), time.Since(start).Seconds())
	return expect, nil
}

// parallel calls f(0..n-1) on up to workers goroutines and returns the
// first error; after one, the remaining calls are skipped.
func parallel(ctx context.Context, n, workers int, f func(i int) error) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		next  atomic.Int64
	)
	for range min(workers, n) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				mu.Lock()
				stop := first != nil
				mu.Unlock()
				if i >= n || stop {
					return
				}
				if err := ctx.Err(); err != nil {
					mu.Lock()
					first = cmp.Or(first, err)
					mu.Unlock()
					return
				}
				if err := f(i); err != nil {
					mu.Lock()
					first = cmp.Or(first, err)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	return first
}
