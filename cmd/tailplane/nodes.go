package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/tailplane/tailplane/internal/admin"
)

func parseNodeID(s string) (uint64, error) {
	id, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("node id %q is not a number: see 'tailplane nodes list'", s)
	}
	return id, nil
}

func printNodes(g *globals, nodes []admin.Node) error {
	return printOut(g, nodes, func(w io.Writer) {
		fmt.Fprintln(w, "ID\tNAME\tHOSTNAME\tUSER\tIPV4\tIPV6\tTAGS\tONLINE\tLAST SEEN\tEXPIRY")
		for _, n := range nodes {
			online := "offline"
			switch {
			case n.Online && n.Connected:
				online = "online"
			case n.Online && n.ConnectedElsewhere:
				online = "online (other replica)"
			case n.Online:
				// After a restart, within restart_grace.
				online = "online (reconnecting)"
			}
			exp := fmtTime(n.Expiry)
			if n.Expired {
				exp = "expired"
			}
			fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", n.ID, n.Name, n.Hostname, n.User, n.IPv4, n.IPv6,
				strsOrDash(n.Tags), online, fmtTime(n.LastSeen), exp)
		}
	})
}

// nodeCommand builds a command taking a node id (plus more args) that
// calls fn and prints the resulting node.
func nodeCommand(g *globals, use, short string, args int, fn func(ctx context.Context, c *admin.Client, id uint64, rest []string) (*admin.Node, error)) *cobra.Command {
	return &cobra.Command{
		Use: use, Short: short, Args: cobra.ExactArgs(args),
		RunE: func(_ *cobra.Command, a []string) error {
			id, err := parseNodeID(a[0])
			if err != nil {
				return err
			}
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				n, err := fn(ctx, c, id, a[1:])
				if err != nil {
					return err
				}
				return printNodes(g, []admin.Node{*n})
			})
		},
	}
}

func newNodesCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "nodes", Short: "Manage nodes (list, delete, expire, rename, tag)"}
	list := &cobra.Command{
		Use: "list", Short: "List nodes", Args: cobra.NoArgs,
		Long: `List nodes.

ONLINE is the presence the node's peers see:
  online                  its client has a map stream open to this server
  online (other replica)  ... to another running replica sharing the database
  online (reconnecting)   it was online before this server (or the replica
                          holding it) stopped, and its client has not come
                          back yet; after restart_grace it goes offline
  offline                 no stream; LAST SEEN says since when

With --output json, "connected" and "connected_elsewhere" tell the first two
apart.`,
		RunE: func(_ *cobra.Command, _ []string) error {
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				nodes, err := c.Nodes(ctx)
				if err != nil {
					return err
				}
				return printNodes(g, nodes)
			})
		},
	}
	del := &cobra.Command{
		Use: "delete ID", Short: "Delete a node; its peers drop it within moments", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, a []string) error {
			id, err := parseNodeID(a[0])
			if err != nil {
				return err
			}
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				if err := c.DeleteNode(ctx, id); err != nil {
					return err
				}
				return printOut(g, map[string]uint64{"deleted": id}, func(w io.Writer) { fmt.Fprintf(w, "deleted node %d\n", id) })
			})
		},
	}
	expire := nodeCommand(g, "expire ID", "Expire a node's key now: the client must log in again", 1,
		func(ctx context.Context, c *admin.Client, id uint64, _ []string) (*admin.Node, error) {
			return c.ExpireNode(ctx, id)
		})
	rename := nodeCommand(g, "rename ID NAME", "Set a node's MagicDNS name", 2,
		func(ctx context.Context, c *admin.Client, id uint64, rest []string) (*admin.Node, error) {
			return c.RenameNode(ctx, id, rest[0])
		})
	tag := &cobra.Command{
		Use: "tag ID [TAG...]", Short: "Replace a node's tags (no tags: owned by its user again)", Args: cobra.MinimumNArgs(1),
		Example: "  tailplane nodes tag 7 tag:server tag:prod",
		RunE: func(_ *cobra.Command, a []string) error {
			id, err := parseNodeID(a[0])
			if err != nil {
				return err
			}
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				n, err := c.TagNode(ctx, id, a[1:])
				if err != nil {
					return err
				}
				return printNodes(g, []admin.Node{*n})
			})
		},
	}
	cmd.AddCommand(list, del, expire, rename, tag)
	return cmd
}

func newRoutesCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "routes", Short: "Manage subnet routes and exit nodes (list, approve)"}
	list := &cobra.Command{
		Use: "list", Short: "List advertised and approved routes per node", Args: cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				nodes, err := c.Nodes(ctx)
				if err != nil {
					return err
				}
				var withRoutes []admin.Node
				for _, n := range nodes {
					if len(n.AdvertisedRoutes) > 0 || len(n.ApprovedRoutes) > 0 {
						withRoutes = append(withRoutes, n)
					}
				}
				return printOut(g, withRoutes, func(w io.Writer) {
					fmt.Fprintln(w, "ID\tNAME\tADVERTISED\tAPPROVED")
					for _, n := range withRoutes {
						fmt.Fprintf(w, "%d\t%s\t%s\t%s\n", n.ID, n.Name, joinOrDash(n.AdvertisedRoutes), joinOrDash(n.ApprovedRoutes))
					}
				})
			})
		},
	}
	approve := &cobra.Command{
		Use:   "approve ID [ROUTE...]",
		Short: "Set the approved routes of a node (no routes: approve none)",
		Long: `Set the approved routes of a node. Each route must be advertised by the node
('tailscale up --advertise-routes=... / --advertise-exit-node'). Routes matched
by the policy's autoApprovers are approved without this command.`,
		Example: "  tailplane routes approve 3 10.0.0.0/24 0.0.0.0/0 ::/0",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(_ *cobra.Command, a []string) error {
			id, err := parseNodeID(a[0])
			if err != nil {
				return err
			}
			var routes []netip.Prefix
			for _, r := range a[1:] {
				p, err := netip.ParsePrefix(r)
				if err != nil {
					return fmt.Errorf("route %q: %w", r, err)
				}
				routes = append(routes, p)
			}
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				n, err := c.ApproveRoutes(ctx, id, admin.RoutesRequest{Routes: routes})
				if err != nil {
					return err
				}
				return printNodes(g, []admin.Node{*n})
			})
		},
	}
	cmd.AddCommand(list, approve)
	return cmd
}
