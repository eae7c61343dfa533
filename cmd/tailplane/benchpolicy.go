package main

import (
	"github.com/spf13/cobra"
)

func newBenchPolicyCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "policy",
		Short: "Write a generated policy (users, groups, tags, hosts, rules) for load tests",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return cmd.Help()
		},
	}
}
