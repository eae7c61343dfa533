package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/tailplane/tailplane/internal/admin"
	"github.com/tailplane/tailplane/internal/bench"
)

func newBenchCmd(g *globals) *cobra.Command {
	var o bench.Options
	var tags, user string
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

See docs/benchmarks.md for the figures measured and how to reproduce them.`,
		Example: `  tailplane bench --server http://127.0.0.1:8080 --data-dir ./tailplane-data --user bench -n 1000 --concurrency 200
  tailplane bench --server http://127.0.0.1:8080 --authkey KEY -n 500 --observers 10 --hold 30s --server-pid $(pidof tailplane)`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
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
			res, err := bench.Run(ctx, o)
			if res != nil {
				enc := json.NewEncoder(os.Stdout)
				enc.SetIndent("", "  ")
				if e := enc.Encode(res); e != nil && err == nil {
					err = e
				}
			}
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.ServerURL, "server", "http://127.0.0.1:8080", "control server URL")
	f.IntVarP(&o.N, "clients", "n", 100, "number of simulated clients")
	f.IntVar(&o.Concurrency, "concurrency", 64, "clients joining at the same time")
	f.StringVar(&o.AuthKey, "authkey", "", "one reusable pre-auth key for every client")
	f.StringVar(&o.KeysFile, "keys-file", "", "file with one pre-auth key per line")
	f.StringVar(&user, "user", "bench", "with --data-dir: user the created keys belong to (created if missing)")
	f.StringVar(&tags, "tags", "", "tags every client requests, e.g. tag:bench")
	f.BoolVar(&o.Ephemeral, "ephemeral", false, "register ephemeral nodes (removed after the run by servers that support it)")
	f.DurationVar(&o.Hold, "hold", 10*time.Second, "keep streams open this long after all clients joined")
	f.DurationVar(&o.ReconnectAt, "reconnect-at", 0, "drop and reconnect every client this long after all joined (a reconnect storm)")
	f.IntVar(&o.Observers, "observers", 5, "clients that decode every message and track their peers")
	f.IntVar(&expected, "expected-peers", 0, "peers every observer should reach (default N-1)")
	f.DurationVar(&o.Timeout, "timeout", 10*time.Minute, "bound on the whole run")
	f.IntVar(&o.ServerPID, "server-pid", 0, "server process id on this machine, to report its CPU seconds and peak RSS")
	cmd.AddCommand(newBenchPolicyCmd())
	return cmd
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
