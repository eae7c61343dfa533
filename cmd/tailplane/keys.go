package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tailplane/tailplane/internal/admin"
)

func newKeysCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "keys", Short: "Manage pre-auth keys (create, list, expire)"}
	var req admin.CreateKeysRequest
	var tags []string
	create := &cobra.Command{
		Use:   "create",
		Short: "Create a pre-auth key",
		Long: `Create a pre-auth key for 'tailscale up --authkey=KEY'. The key is printed once;
the server keeps only its id and a SHA-256 of its secret.

A one-off key (the default) admits one node and is consumed atomically. A
--reusable key admits any number. Nodes of an --ephemeral key are deleted after
they disconnect. Nodes of a key with --tags are owned by those tags.`,
		Example: `  tailplane keys create --user alice
  tailplane keys create --user alice --reusable --expiration 24h
  tailplane keys create --user ci --ephemeral --tags tag:ci --output json`,
		Args: cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			if req.User == "" {
				return fmt.Errorf("--user is required")
			}
			req.Tags = tags
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				keys, err := c.CreateKeys(ctx, req)
				if err != nil {
					return err
				}
				var out any = keys[0]
				if req.Count > 1 {
					out = keys
				}
				return printOut(g, out, func(w io.Writer) {
					for _, k := range keys {
						fmt.Fprintln(w, k.Key)
					}
					if req.Count <= 1 {
						fmt.Fprintln(os.Stderr, "This key is shown only once. Use it with: tailscale up --login-server=URL --authkey=KEY")
					}
				})
			})
		},
	}
	f := create.Flags()
	f.StringVar(&req.User, "user", "", "user that owns the nodes (required)")
	f.BoolVar(&req.Reusable, "reusable", false, "the key admits any number of nodes")
	f.BoolVar(&req.Ephemeral, "ephemeral", false, "nodes are deleted after they disconnect")
	f.StringSliceVar(&tags, "tags", nil, "tags for the nodes, e.g. tag:server,tag:prod")
	f.StringVar(&req.Expiration, "expiration", "", "the key stops admitting nodes after this long, e.g. 24h (default: never)")
	f.IntVar(&req.Count, "count", 1, "create this many keys (printed one per line; JSON array with --output json)")

	list := &cobra.Command{
		Use: "list", Short: "List pre-auth keys (without their secrets)", Args: cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				keys, err := c.Keys(ctx)
				if err != nil {
					return err
				}
				return printOut(g, keys, func(w io.Writer) {
					fmt.Fprintln(w, "ID\tUSER\tREUSABLE\tEPHEMERAL\tTAGS\tEXPIRES\tSTATE")
					for _, k := range keys {
						st := "valid"
						switch {
						case k.Revoked:
							st = "expired (revoked)"
						case k.Used && !k.Reusable:
							st = "used"
						case !k.Valid:
							st = "expired"
						}
						fmt.Fprintf(w, "%s\t%s\t%v\t%v\t%s\t%s\t%s\n", k.ID, k.User, k.Reusable, k.Ephemeral,
							strsOrDash(k.Tags), fmtTime(k.Expiration), st)
					}
				})
			})
		},
	}
	expire := &cobra.Command{
		Use: "expire ID", Short: "Expire a pre-auth key now (nodes it admitted stay)", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				if err := c.ExpireKey(ctx, args[0]); err != nil {
					return err
				}
				id := strings.TrimPrefix(args[0], "tpkey-auth-")
				return printOut(g, map[string]string{"expired": id}, func(w io.Writer) { fmt.Fprintf(w, "expired key %s\n", id) })
			})
		},
	}
	cmd.AddCommand(create, list, expire)
	return cmd
}
