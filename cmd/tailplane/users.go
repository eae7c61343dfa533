package main

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/tailplane/tailplane/internal/admin"
)

func newUsersCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "users", Short: "Manage users (create, list, rename, delete)"}
	var email string
	create := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a user",
		Long: `Create a user. Policies name users by email; a user without --email is named
NAME@ in policies (e.g. "alice@").`,
		Example: "  tailplane users create alice --email alice@example.com",
		Args:    cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				u, err := c.CreateUser(ctx, admin.CreateUserRequest{Name: args[0], Email: email})
				if err != nil {
					return err
				}
				return printOut(g, u, func(w io.Writer) { fmt.Fprintf(w, "created user %s (id %d)\n", u.Name, u.ID) })
			})
		},
	}
	create.Flags().StringVar(&email, "email", "", "the user's email, how policies name them")
	list := &cobra.Command{
		Use: "list", Short: "List users", Args: cobra.NoArgs,
		RunE: func(_ *cobra.Command, _ []string) error {
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				us, err := c.Users(ctx)
				if err != nil {
					return err
				}
				return printOut(g, us, func(w io.Writer) {
					fmt.Fprintln(w, "ID\tNAME\tEMAIL\tCREATED")
					for _, u := range us {
						email := u.Email
						if email == "" {
							email = "-"
						}
						fmt.Fprintf(w, "%d\t%s\t%s\t%s\n", u.ID, u.Name, email, fmtTime(&u.CreatedAt))
					}
				})
			})
		},
	}
	rename := &cobra.Command{
		Use: "rename NAME NEW_NAME", Short: "Rename a user", Args: cobra.ExactArgs(2),
		RunE: func(_ *cobra.Command, args []string) error {
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				u, err := c.RenameUser(ctx, args[0], args[1])
				if err != nil {
					return err
				}
				return printOut(g, u, func(w io.Writer) { fmt.Fprintf(w, "renamed user %s to %s\n", args[0], u.Name) })
			})
		},
	}
	del := &cobra.Command{
		Use: "delete NAME", Short: "Delete a user (and its pre-auth keys); its nodes must be deleted first", Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			return adminCall(g, func(ctx context.Context, c *admin.Client) error {
				if err := c.DeleteUser(ctx, args[0]); err != nil {
					return err
				}
				return printOut(g, map[string]string{"deleted": args[0]}, func(w io.Writer) { fmt.Fprintf(w, "deleted user %s\n", args[0]) })
			})
		},
	}
	cmd.AddCommand(create, list, rename, del)
	return cmd
}
