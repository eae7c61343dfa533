// Package policygen generates large, reproducible policies and tailnets for
// benchmarks and load tests.
package policygen

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/netip"

	"github.com/tailplane/tailplane/internal/policy"
)

// Options shapes the generated tailnet and policy. Zero fields take the
// defaults of Default.
type Options struct {
	Seed      uint64
	Nodes     int // total nodes
	Users     int
	Tags      int
	Groups    int
	Hosts     int
	Rules     int     // ACL rules
	SelfRules int     // of which autogroup:self rules
	SSHRules  int     // ssh rules
	Tagged    float64 // fraction of nodes that are tagged
	Routers   int     // nodes advertising (approved) subnet routes
}

// Default is the benchmark shape: 15,000 rules, 500 tags, 200 groups over
// 10,000 nodes.
func Default() Options {
	return Options{
		Seed: 1, Nodes: 10000, Users: 2500, Tags: 500, Groups: 200, Hosts: 100,
		Rules: 15000, SelfRules: 50, SSHRules: 20, Tagged: 0.4, Routers: 100,
	}
}

func (o *Options) fill() {
	d := Default()
	if o.Nodes == 0 {
		o.Nodes = d.Nodes
	}
	if o.Users == 0 {
		o.Users = d.Users
	}
	if o.Tags == 0 {
		o.Tags = d.Tags
	}
	if o.Groups == 0 {
		o.Groups = d.Groups
	}
	if o.Hosts == 0 {
		o.Hosts = d.Hosts
	}
	if o.Rules == 0 {
		o.Rules = d.Rules
	}
	if o.Tagged == 0 {
		o.Tagged = d.Tagged
	}
}

type acl struct {
	Action string   `json:"action"`
	Src    []string `json:"src"`
	Dst    []string `json:"dst"`
	Proto  string   `json:"proto,omitempty"`
}

type sshRule struct {
	Action string   `json:"action"`
	Src    []string `json:"src"`
	Dst    []string `json:"dst"`
	Users  []string `json:"users"`
}

type doc struct {
	Groups        map[string][]string `json:"groups"`
	Hosts         map[string]string   `json:"hosts"`
	TagOwners     map[string][]string `json:"tagOwners"`
	ACLs          []acl               `json:"acls"`
	SSH           []sshRule           `json:"ssh,omitempty"`
	AutoApprovers map[string]any      `json:"autoApprovers,omitempty"`
}

// Generate returns a policy (JSON), its users and nodes. The same options
// always produce the same output.
func Generate(opts Options) (policyJSON []byte, users []policy.User, nodes []policy.Node) {
	opts.fill()
	r := rand.New(rand.NewPCG(opts.Seed, 0x7a11))
	for i := range opts.Users {
		users = append(users, policy.User{ID: uint64(i + 1), Name: fmt.Sprintf("user%d", i), Email: fmt.Sprintf("user%d@example.com", i)})
	}
	d := doc{Groups: map[string][]string{}, Hosts: map[string]string{}, TagOwners: map[string][]string{}}
	for g := range opts.Groups {
		var members []string
		for range 5 + r.IntN(30) {
			members = append(members, users[r.IntN(len(users))].Email)
		}
		d.Groups[fmt.Sprintf("group:g%d", g)] = members
	}
	for t := range opts.Tags {
		d.TagOwners[fmt.Sprintf("tag:t%d", t)] = []string{fmt.Sprintf("group:g%d", r.IntN(opts.Groups))}
	}
	for h := range opts.Hosts {
		if h%2 == 0 {
			d.Hosts[fmt.Sprintf("host%d", h)] = fmt.Sprintf("10.%d.%d.0/24", h%200, r.IntN(256))
		} else {
			d.Hosts[fmt.Sprintf("host%d", h)] = netip.AddrFrom4([4]byte{100, 64 + byte(r.IntN(60)), byte(r.IntN(256)), byte(1 + r.IntN(250))}).String()
		}
	}
	for i := range opts.Nodes {
		n := policy.Node{
			ID:       uint64(i + 1),
			Hostname: fmt.Sprintf("node%d", i),
			IPv4:     netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)}),
			IPv6:     netip.AddrFrom16([16]byte{0xfd, 0x7a, 0x11, 0x5c, 0xa1, 0xe0, 12: byte(i >> 24), 13: byte(i >> 16), 14: byte(i >> 8), 15: byte(i)}),
		}
		if r.Float64() < opts.Tagged {
			n.Tags = []string{fmt.Sprintf("tag:t%d", r.IntN(opts.Tags))}
			if r.IntN(3) == 0 {
				n.Tags = append(n.Tags, fmt.Sprintf("tag:t%d", r.IntN(opts.Tags)))
			}
		} else {
			n.UserID = users[r.IntN(len(users))].ID
		}
		if i < opts.Routers {
			route := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i % 200), 0, 0}), 16)
			n.AdvertisedRoutes = []netip.Prefix{route}
			n.ApprovedRoutes = []netip.Prefix{route}
		}
		nodes = append(nodes, n)
	}
	randPorts := func() string {
		switch r.IntN(4) {
		case 0:
			return "*"
		case 1:
			return fmt.Sprint(1 + r.IntN(65000))
		case 2:
			lo := 1 + r.IntN(60000)
			return fmt.Sprintf("%d-%d", lo, lo+r.IntN(1000))
		}
		return "22,80,443"
	}
	randSrc := func() string {
		switch r.IntN(10) {
		case 0, 1, 2:
			return fmt.Sprintf("group:g%d", r.IntN(opts.Groups))
		case 3, 4, 5:
			return fmt.Sprintf("tag:t%d", r.IntN(opts.Tags))
		case 6:
			return users[r.IntN(len(users))].Email
		case 7:
			return fmt.Sprintf("host%d", r.IntN(opts.Hosts))
		case 8:
			return "autogroup:member"
		}
		return fmt.Sprintf("100.%d.0.0/16", 64+r.IntN(60))
	}
	randDst := func() string {
		switch r.IntN(6) {
		case 0, 1, 2:
			return fmt.Sprintf("tag:t%d:%s", r.IntN(opts.Tags), randPorts())
		case 3:
			return fmt.Sprintf("group:g%d:%s", r.IntN(opts.Groups), randPorts())
		case 4:
			return fmt.Sprintf("host%d:%s", r.IntN(opts.Hosts), randPorts())
		}
		return fmt.Sprintf("10.%d.0.0/16:%s", r.IntN(200), randPorts())
	}
	for i := range opts.Rules {
		a := acl{Action: "accept"}
		if i < opts.SelfRules {
			a.Src = []string{"autogroup:member"}
			a.Dst = []string{"autogroup:self:" + randPorts()}
		} else {
			for range 1 + r.IntN(3) {
				a.Src = append(a.Src, randSrc())
			}
			for range 1 + r.IntN(3) {
				a.Dst = append(a.Dst, randDst())
			}
			if r.IntN(10) == 0 {
				a.Proto = "udp"
			}
		}
		d.ACLs = append(d.ACLs, a)
	}
	for i := range opts.SSHRules {
		s := sshRule{Action: "accept", Src: []string{fmt.Sprintf("group:g%d", r.IntN(opts.Groups))}, Users: []string{"root", "autogroup:nonroot"}}
		if i%2 == 0 {
			s.Dst = []string{fmt.Sprintf("tag:t%d", r.IntN(opts.Tags))}
		} else {
			s.Src = []string{"autogroup:member"}
			s.Dst = []string{"autogroup:self"}
		}
		d.SSH = append(d.SSH, s)
	}
	d.AutoApprovers = map[string]any{"routes": map[string][]string{"10.0.0.0/8": {"autogroup:member"}}}
	b, err := json.Marshal(d)
	if err != nil {
		panic(err)
	}
	return b, users, nodes
}
