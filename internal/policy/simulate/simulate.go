// Package simulate runs the policy engine on one captured oracle case (a
// policy, users and nodes) and reports what every node would receive, in the
// oracle's shape. It backs `tailplane policy simulate CASE.json` and uses the
// same Compiled accessors the server uses to build netmaps.
package simulate

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"

	"github.com/tailplane/tailplane/internal/policy"
	"tailscale.com/tailcfg"
)

// Case is the input part of an oracle case.
type Case struct {
	Policy string     `json:"policy"`
	Users  []CaseUser `json:"users"`
	Nodes  []CaseNode `json:"nodes"`
}

// CaseUser is a user of a case.
type CaseUser struct {
	ID    uint64 `json:"id"`
	Name  string `json:"name"`
	Email string `json:"email"`
}

// CaseNode is a node of a case. ID is optional: the capture does not record
// it, so nodes without one are numbered in the order they appear. Node IDs
// stand for registration order, which decides the primary among routers of
// the same subnet.
type CaseNode struct {
	ID             uint64         `json:"id,omitempty"`
	Hostname       string         `json:"hostname"`
	User           string         `json:"user,omitempty"`
	Tags           []string       `json:"tags"`
	IPv4           string         `json:"ipv4"`
	IPv6           string         `json:"ipv6"`
	RoutableIPs    []netip.Prefix `json:"routable_ips"`
	ApprovedRoutes []netip.Prefix `json:"approved_routes"`
}

// Result is the simulation output.
type Result struct {
	PolicyStatus int                   `json:"policy_status"`
	PolicyError  string                `json:"policy_error,omitempty"`
	Nodes        map[string]NodeResult `json:"nodes"`
}

// NodeResult is what one node receives.
type NodeResult struct {
	PacketFilterRules []tailcfg.FilterRule `json:"packet_filter_rules"`
	Peers             []PeerResult         `json:"peers"`
	SSHPolicy         *tailcfg.SSHPolicy   `json:"ssh_policy"`
	SelfCapMap        []string             `json:"self_capmap"`
}

// PeerResult is a peer as a node sees it.
type PeerResult struct {
	Hostname      string         `json:"hostname"`
	AllowedIPs    []netip.Prefix `json:"allowed_ips"`
	PrimaryRoutes []netip.Prefix `json:"primary_routes"`
	Tags          []string       `json:"tags"`
}

// Run simulates a case given as JSON and returns the result as JSON.
func Run(caseJSON []byte) ([]byte, error) {
	var c Case
	if err := json.Unmarshal(caseJSON, &c); err != nil {
		return nil, fmt.Errorf("reading case: %w", err)
	}
	res, err := Simulate(&c)
	if err != nil {
		return nil, err
	}
	return json.MarshalIndent(res, "", " ")
}

// Simulate runs a decoded case. A rejected policy (status 400) reports what
// nodes receive under the default policy, as the capture does.
func Simulate(c *Case) (*Result, error) {
	pol, perr := policy.Parse([]byte(c.Policy))
	users, nodes, err := Tailnet(c, pol)
	if err != nil {
		return nil, err
	}
	res := &Result{PolicyStatus: 200}
	var comp *policy.Compiled
	err = perr
	if err == nil {
		comp, err = pol.Compile(users, nodes)
	}
	if err == nil {
		err = pol.RunTests(users, nodes)
	}
	if err != nil {
		res.PolicyStatus, res.PolicyError = 400, err.Error()
		if comp, err = policy.Default().Compile(users, nodes); err != nil {
			return nil, err
		}
	}
	res.Nodes = render(comp, nodes)
	return res, nil
}

// autoApprove adds the advertised routes the policy's autoApprovers approve,
// as the server does when a node advertises routes.
func autoApprove(pol *policy.Policy, users []policy.User, nodes []policy.Node) []policy.Node {
	out := slices.Clone(nodes)
	for i := range out {
		n := &out[i]
		for _, r := range n.AdvertisedRoutes {
			if !slices.Contains(n.ApprovedRoutes, r) && pol.AutoApprove(*n, r, policy.Users(users)) {
				n.ApprovedRoutes = append(slices.Clip(n.ApprovedRoutes), r)
			}
		}
	}
	return out
}

// Tailnet returns the case's users and nodes. With a policy, the nodes'
// advertised routes that its autoApprovers approve are approved, as the
// server does when a node advertises them.
func Tailnet(c *Case, pol *policy.Policy) ([]policy.User, []policy.Node, error) {
	users, nodes, err := tailnet(c)
	if err != nil || pol == nil {
		return users, nodes, err
	}
	return users, autoApprove(pol, users, nodes), nil
}

func tailnet(c *Case) ([]policy.User, []policy.Node, error) {
	var users []policy.User
	byName := map[string]uint64{}
	for _, u := range c.Users {
		users = append(users, policy.User{ID: u.ID, Name: u.Name, Email: u.Email})
		byName[u.Name] = u.ID
	}
	var nodes []policy.Node
	for i, cn := range c.Nodes {
		n := policy.Node{
			ID:               cn.ID,
			Hostname:         cn.Hostname,
			Tags:             cn.Tags,
			AdvertisedRoutes: cn.RoutableIPs,
			ApprovedRoutes:   cn.ApprovedRoutes,
		}
		if n.ID == 0 {
			n.ID = uint64(i + 1)
		}
		if len(n.Tags) == 0 {
			uid, ok := byName[cn.User]
			if !ok {
				return nil, nil, fmt.Errorf("node %q: unknown user %q", cn.Hostname, cn.User)
			}
			n.UserID = uid
		}
		var err error
		if cn.IPv4 != "" {
			if n.IPv4, err = netip.ParseAddr(cn.IPv4); err != nil {
				return nil, nil, fmt.Errorf("node %q: %w", cn.Hostname, err)
			}
		}
		if cn.IPv6 != "" {
			if n.IPv6, err = netip.ParseAddr(cn.IPv6); err != nil {
				return nil, nil, fmt.Errorf("node %q: %w", cn.Hostname, err)
			}
		}
		nodes = append(nodes, n)
	}
	return users, nodes, nil
}

func render(c *policy.Compiled, nodes []policy.Node) map[string]NodeResult {
	byID := map[uint64]*policy.Node{}
	for i := range nodes {
		byID[nodes[i].ID] = &nodes[i]
	}
	out := map[string]NodeResult{}
	for _, n := range nodes {
		nr := NodeResult{
			PacketFilterRules: c.Filter(n.ID),
			SSHPolicy:         c.SSHPolicy(n.ID),
			Peers:             []PeerResult{},
			SelfCapMap:        []string{},
		}
		if nr.PacketFilterRules == nil {
			nr.PacketFilterRules = []tailcfg.FilterRule{}
		}
		for _, p := range c.Peers(n.ID) {
			pn := byID[p.ID]
			pr := PeerResult{Hostname: pn.Hostname, AllowedIPs: p.AllowedIPs, PrimaryRoutes: p.PrimaryRoutes, Tags: pn.Tags}
			if pr.PrimaryRoutes == nil {
				pr.PrimaryRoutes = []netip.Prefix{}
			}
			if pr.Tags == nil {
				pr.Tags = []string{}
			}
			nr.Peers = append(nr.Peers, pr)
		}
		slices.SortFunc(nr.Peers, func(a, b PeerResult) int {
			if a.Hostname < b.Hostname {
				return -1
			}
			if a.Hostname > b.Hostname {
				return 1
			}
			return 0
		})
		for k := range c.CapMap(n.ID) {
			nr.SelfCapMap = append(nr.SelfCapMap, string(k))
		}
		slices.Sort(nr.SelfCapMap)
		out[n.Hostname] = nr
	}
	return out
}
