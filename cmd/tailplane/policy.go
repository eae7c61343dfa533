package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/tailplane/tailplane/internal/admin"

	"github.com/tailplane/tailplane/internal/policy/simulate"
)

func readFileArg(name string) ([]byte, error) {
	if name == "-" {
		return io.ReadAll(io.LimitReader(os.Stdin, 64<<20))
	}
	return os.ReadFile(name)
}

func newPolicyCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "policy", Short: "Manage the ACL policy (get, set, check, simulate)"}
	get := &cobra.Command{
		Use: "get", Short: "Print the active policy", Args: cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				p, err := c.Policy(ctx)
				if err != nil {
					return err
				}
				if g.output == "json" {
					return printOut(g, p, nil)
				}
				if p.Source == "default" {
					fmt.Fprintln(os.Stderr, "no policy set: every node may reach every node (set one with 'tailplane policy set FILE')")
					return nil
				}
				// The text as stored, byte for byte (not through the table
				// writer, which would expand its tabs).
				_, err = io.WriteString(os.Stdout, p.Text)
				return err
			})
		},
	}
	set := &cobra.Command{
		Use:   "set FILE",
		Short: "Validate, test and activate a policy (HuJSON; - for stdin)",
		Long: `Validate a policy file, run its tests and sshTests against the tailnet, and
activate it. Connected clients receive the new filters and peers without
reconnecting. An invalid policy or a failing test is refused and the active
policy stays in force.`,
		Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, a []string) error {
			text, err := readFileArg(a[0])
			if err != nil {
				return err
			}
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				if err := c.SetPolicy(ctx, text); err != nil {
					return err
				}
				return printOut(g, map[string]any{"applied": true, "bytes": len(text)}, func(w io.Writer) {
					fmt.Fprintf(w, "policy applied (%d bytes)\n", len(text))
				})
			})
		},
	}
	check := &cobra.Command{
		Use:   "check FILE",
		Short: "Validate a policy and run its tests without applying it",
		Args:  cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, a []string) error {
			text, err := readFileArg(a[0])
			if err != nil {
				return err
			}
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				if err := c.CheckPolicy(ctx, text); err != nil {
					return err
				}
				return printOut(g, map[string]any{"valid": true}, func(w io.Writer) { fmt.Fprintln(w, "policy is valid and its tests pass") })
			})
		},
	}
	sim := &cobra.Command{
		Use:   "simulate CASE.json",
		Short: "Compute what every node of a tailnet would receive under a policy",
		Long: `Read a case (a policy, users and nodes, in the format of Tailscale's captured
cases, see ../shared/oracle/README.md) and print, as JSON, whether the policy is
accepted and, per node, its packet filter, peers, SSH policy and capabilities.
It runs the same engine the server uses; no server is needed.`,
		Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, a []string) error {
			in, err := readFileArg(a[0])
			if err != nil {
				return err
			}
			out, err := simulate.Run(in)
			if err != nil {
				return err
			}
			_, err = os.Stdout.Write(append(out, '\n'))
			return err
		},
	}
	cmd.AddCommand(get, set, check, sim)
	return cmd
}
