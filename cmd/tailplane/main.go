// Command tailplane is a Tailscale-compatible control server for large
// tailnets: `tailplane serve` runs it, the other commands manage a running
// server through its admin socket, and `tailplane bench` load-tests any
// Tailscale-compatible control server.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// globals are the flags every command shares.
type globals struct {
	dataDir string
	config  string
	output  string
}

func main() {
	if err := newRoot().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "tailplane:", err)
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	g := &globals{}
	root := &cobra.Command{
		Use:   "tailplane",
		Short: "A Tailscale-compatible control server for large tailnets",
		Long: `tailplane is a control server that unmodified Tailscale clients join with
'tailscale up --login-server=URL --authkey=KEY'.

Start it with 'tailplane serve' (no configuration needed: it listens on
127.0.0.1:8080 and keeps its state in ./tailplane-data). While it runs, manage
it with the users, keys, nodes, routes and policy commands, which talk to it
through the admin socket in its data directory.

A first tailnet:
  tailplane serve &
  tailplane users create alice
  tailplane keys create --user alice --reusable
  tailscale up --login-server=http://127.0.0.1:8080 --authkey=tpkey-auth-...`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	pf := root.PersistentFlags()
	pf.StringVar(&g.dataDir, "data-dir", "", "data directory of the server (default ./tailplane-data, or data_dir from --config)")
	pf.StringVarP(&g.config, "config", "c", "", "YAML config file (see config.example.yaml)")
	pf.StringVarP(&g.output, "output", "o", "table", "output format of admin commands: table or json")
	root.AddCommand(
		newServeCmd(g),
		newUsersCmd(g),
		newKeysCmd(g),
		newNodesCmd(g),
		newRoutesCmd(g),
		newPolicyCmd(g),
		newBenchCmd(g),
		newVersionCmd(),
	)
	return root
}
