package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tailplane/tailplane/internal/policy/policygen"
)

// Files of a generated tailnet directory (tailplane bench policy --out DIR).
const (
	tailnetPolicyFile = "policy.hujson"
	tailnetFile       = "tailnet.json"
)

// benchTailnet is tailnet.json: the users and nodes a generated policy was
// written for. Node i is what simulated client i registers as.
type benchTailnet struct {
	Generator policygen.Options `json:"generator"` // how it was generated, for the record
	Users     []benchUser       `json:"users"`
	Nodes     []benchNode       `json:"nodes"`
}

type benchUser struct {
	Name  string `json:"name"`
	Email string `json:"email"`
}

// benchNode is one node. User owns its pre-auth key. A tagged node is owned
// by its tags; its key belongs to a user that owns its first tag (in sorted
// order) in the policy's tagOwners.
type benchNode struct {
	Hostname string   `json:"hostname"`
	User     string   `json:"user"`
	Tags     []string `json:"tags,omitempty"`
	// Routes are the subnet routes the client advertises.
	Routes []netip.Prefix `json:"routes,omitempty"`
}

// readBenchTailnet reads the policy and tailnet.json of a directory written
// by 'tailplane bench policy'.
func readBenchTailnet(dir string) (*benchTailnet, []byte, error) {
	pol, err := os.ReadFile(filepath.Join(dir, tailnetPolicyFile))
	if err != nil {
		return nil, nil, fmt.Errorf("--tailnet: %w (write one with 'tailplane bench policy --out %s')", err, dir)
	}
	b, err := os.ReadFile(filepath.Join(dir, tailnetFile))
	if err != nil {
		return nil, nil, fmt.Errorf("--tailnet: %w", err)
	}
	var tn benchTailnet
	if err := json.Unmarshal(b, &tn); err != nil {
		return nil, nil, fmt.Errorf("--tailnet: %s: %w", tailnetFile, err)
	}
	if len(tn.Nodes) == 0 {
		return nil, nil, fmt.Errorf("--tailnet: %s has no nodes", tailnetFile)
	}
	users := map[string]bool{}
	for _, u := range tn.Users {
		users[u.Name] = true
	}
	for i, n := range tn.Nodes {
		if n.Hostname == "" || !users[n.User] {
			return nil, nil, fmt.Errorf("--tailnet: %s: node %d (%q) has no hostname or an unknown user %q", tailnetFile, i, n.Hostname, n.User)
		}
	}
	return &tn, pol, nil
}

// generateBenchTailnet runs the policy generator and returns the policy
// (HuJSON, with a header) and the tailnet it was written for.
func generateBenchTailnet(o policygen.Options, header string) ([]byte, *benchTailnet, error) {
	raw, users, nodes := policygen.Generate(o)
	// Indent for people; the policy engine reads it either way.
	var doc struct {
		Groups    map[string][]string `json:"groups"`
		TagOwners map[string][]string `json:"tagOwners"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, nil, err
	}
	var pretty strings.Builder
	for line := range strings.Lines(header) {
		pretty.WriteString("// " + line)
	}
	pretty.WriteString("\n")
	var buf bytes.Buffer
	if err := json.Indent(&buf, raw, "", "  "); err != nil {
		return nil, nil, err
	}
	pretty.Write(buf.Bytes())
	pretty.WriteString("\n")

	tn := &benchTailnet{Generator: o}
	nameByEmail := map[string]string{}
	nameByID := map[uint64]string{}
	for _, u := range users {
		tn.Users = append(tn.Users, benchUser{Name: u.Name, Email: u.Email})
		nameByEmail[u.Email] = u.Name
		nameByID[u.ID] = u.Name
	}
	// tagOwner is a user that owns tag: the first member of the first
	// owning group, or the owner itself if it is an email.
	tagOwner := func(tag string) string {
		for _, owner := range doc.TagOwners[tag] {
			members := []string{owner}
			if strings.HasPrefix(owner, "group:") {
				members = doc.Groups[owner]
			}
			for _, m := range members {
				if name, ok := nameByEmail[m]; ok {
					return name
				}
			}
		}
		return users[0].Name
	}
	for _, n := range nodes {
		// Sorted and without duplicates, as the server keeps them.
		tags := slices.Compact(slices.Sorted(slices.Values(n.Tags)))
		bn := benchNode{Hostname: n.Hostname, Tags: tags, Routes: n.AdvertisedRoutes}
		if len(n.Tags) > 0 {
			bn.User = tagOwner(tags[0])
		} else {
			bn.User = nameByID[n.UserID]
		}
		tn.Nodes = append(tn.Nodes, bn)
	}
	return []byte(pretty.String()), tn, nil
}

func newBenchPolicyCmd() *cobra.Command {
	o := policygen.Default()
	// Routers recompile the policy when they join: none unless asked for.
	o.Routers = 0
	var out string
	cmd := &cobra.Command{
		Use:   "policy --out DIR",
		Short: "Write a generated policy (users, groups, tags, hosts, rules) for load tests",
		Long: `Generate a large, reproducible policy and the tailnet it is written for, for
'tailplane bench --tailnet DIR'. The same flags and --seed always write the
same files. Two files go to --out DIR:

  policy.hujson  the policy: --groups groups of 5-34 users (by email), --tags
                 tags each owned by a group, --hosts host aliases (half /24
                 subnets, half single 100.64.0.0/10 addresses), --rules ACL
                 rules, of which the first --self-rules are
                 autogroup:member -> autogroup:self and the others have 1-3
                 sources (groups, tags, user emails, hosts,
                 autogroup:member, 100.x.0.0/16 CIDRs) and 1-3 destinations
                 (tags, groups, hosts, 10.x.0.0/16 subnets) with random
                 ports, 10% of them udp; --ssh-rules SSH rules.
  tailnet.json   the users (name, email) and, per node, its hostname, its
                 user, its tags and its routes. A --tagged fraction of the
                 nodes carry 1-2 tags; their pre-auth key belongs to a user
                 that owns the first tag. The first --routers nodes
                 advertise a 10.x.0.0/16 subnet route. Node i is what
                 simulated client i registers as.

The policy's host aliases and CIDRs select nodes by address, and a server
assigns addresses as nodes register, so how many peers each node sees is
only known once they have: 'tailplane bench --tailnet DIR' computes it then,
from the server's node list and this policy, with tailplane's policy engine.

The policy's autoApprovers approve routes in 10.0.0.0/8 for autogroup:member,
so routers owned by a user are approved as they register; tagged routers'
routes stay advertised but unapproved (approve them with 'tailplane routes
approve'). Routers joining make tailplane recompile the whole policy, so
--routers defaults to 0.`,
		Example: `  tailplane bench policy --out /tmp/tn --nodes 1000 --users 250 --rules 1500
  tailplane serve --data-dir /tmp/tp --listen 127.0.0.1:8080 &
  tailplane bench --tailnet /tmp/tn --data-dir /tmp/tp --server http://127.0.0.1:8080 --server-pid $! > result.json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("give --out DIR")
			}
			if o.Nodes < 1 || o.Users < 1 || o.Tags < 1 || o.Groups < 1 || o.Hosts < 1 || o.Rules < 1 {
				return errors.New("--nodes, --users, --tags, --groups, --hosts and --rules must be at least 1")
			}
			if o.SelfRules < 0 || o.SelfRules > o.Rules || o.SSHRules < 0 {
				return errors.New("--self-rules must be between 0 and --rules, --ssh-rules not negative")
			}
			if o.Routers < 0 || o.Routers > o.Nodes || o.Routers > 200 {
				return errors.New("--routers must be between 0 and --nodes, and at most 200 (one 10.x.0.0/16 route each)")
			}
			if o.Tagged < 0 || o.Tagged > 1 {
				return errors.New("--tagged is a fraction between 0 and 1")
			}
			gen := o
			if gen.Tagged == 0 {
				// The generator reads 0 as "default"; this is "never".
				gen.Tagged = math.SmallestNonzeroFloat64
			}
			header := fmt.Sprintf("Generated by: tailplane bench policy --nodes %d --users %d --tags %d --groups %d --hosts %d --rules %d --self-rules %d --ssh-rules %d --tagged %g --routers %d --seed %d\nUse with: tailplane bench --tailnet DIR (see docs/benchmarks.md)\n",
				o.Nodes, o.Users, o.Tags, o.Groups, o.Hosts, o.Rules, o.SelfRules, o.SSHRules, o.Tagged, o.Routers, o.Seed)
			pol, tn, err := generateBenchTailnet(gen, header)
			if err != nil {
				return err
			}
			tn.Generator = o
			tnJSON, err := json.MarshalIndent(tn, "", " ")
			if err != nil {
				return err
			}
			if err := os.MkdirAll(out, 0o755); err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(out, tailnetPolicyFile), pol, 0o644); err != nil {
				return err
			}
			if err := os.WriteFile(filepath.Join(out, tailnetFile), append(tnJSON, '\n'), 0o644); err != nil {
				return err
			}
			tagged, owners, keyGroups := 0, map[string]bool{}, map[string]bool{}
			for _, n := range tn.Nodes {
				if len(n.Tags) > 0 {
					tagged++
				} else {
					owners[n.User] = true
				}
				keyGroups[n.User+"\x00"+strings.Join(n.Tags, ",")] = true
			}
			fmt.Fprintf(os.Stderr, "wrote %s (%s: %d groups, %d tags, %d hosts, %d ACL rules of which %d autogroup:self, %d SSH rules) and %s (%d users, %d nodes: %d tagged, %d owned by %d users; %d distinct key owner/tags pairs), seed %d\n",
				filepath.Join(out, tailnetPolicyFile), benchHumanBytes(len(pol)), o.Groups, o.Tags, o.Hosts, o.Rules, o.SelfRules, o.SSHRules,
				filepath.Join(out, tailnetFile), len(tn.Users), len(tn.Nodes), tagged, len(tn.Nodes)-tagged, len(owners), len(keyGroups), o.Seed)
			fmt.Fprintf(os.Stderr, "run it: tailplane bench --tailnet %s --data-dir DATA_DIR --server URL (against a fresh server)\n", out)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&out, "out", "", "directory to write policy.hujson and tailnet.json to (created if missing)")
	f.IntVar(&o.Nodes, "nodes", o.Nodes, "nodes in the tailnet")
	f.IntVar(&o.Users, "users", o.Users, "users")
	f.IntVar(&o.Tags, "tags", o.Tags, "tags (tag:t0 ...), each owned by a group")
	f.IntVar(&o.Groups, "groups", o.Groups, "groups (group:g0 ...)")
	f.IntVar(&o.Hosts, "hosts", o.Hosts, "host aliases")
	f.IntVar(&o.Rules, "rules", o.Rules, "ACL rules")
	f.IntVar(&o.SelfRules, "self-rules", o.SelfRules, "of the ACL rules, autogroup:member -> autogroup:self rules")
	f.IntVar(&o.SSHRules, "ssh-rules", o.SSHRules, "SSH rules")
	f.Float64Var(&o.Tagged, "tagged", o.Tagged, "fraction of the nodes that are tagged")
	f.IntVar(&o.Routers, "routers", o.Routers, "nodes (the first ones) that advertise a subnet route")
	f.Uint64Var(&o.Seed, "seed", o.Seed, "random seed: the same flags and seed write the same files")
	return cmd
}

func benchHumanBytes(n int) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
