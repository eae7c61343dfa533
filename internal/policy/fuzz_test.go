package policy_test

import (
	"net/netip"
	"testing"

	"github.com/tailplane/tailplane/internal/policy"
)

// FuzzParseCompile checks that no policy text makes Parse, Compile, the
// accessors or RunTests panic. The seed corpus is every oracle policy.
func FuzzParseCompile(f *testing.F) {
	for _, c := range loadCases(f) {
		f.Add([]byte(c.Policy))
	}
	f.Add([]byte(`{"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]}`))
	users := []policy.User{{ID: 1, Name: "odin", Email: "odin@example.com"}, {ID: 2, Name: "thor", Email: "thor@example.org"}, {ID: 3, Name: "nomail"}}
	nodes := []policy.Node{
		{ID: 1, Hostname: "a", UserID: 1, IPv4: netip.MustParseAddr("100.64.0.1"), IPv6: netip.MustParseAddr("fd7a:115c:a1e0::1")},
		{ID: 2, Hostname: "b", UserID: 2, IPv4: netip.MustParseAddr("100.64.0.2"), IPv6: netip.MustParseAddr("fd7a:115c:a1e0::2")},
		{ID: 3, Hostname: "c", Tags: []string{"tag:server"}, IPv4: netip.MustParseAddr("100.64.0.3")},
		{ID: 4, Hostname: "r", Tags: []string{"tag:router", "tag:exit"}, IPv4: netip.MustParseAddr("100.64.0.4"), IPv6: netip.MustParseAddr("fd7a:115c:a1e0::4"),
			ApprovedRoutes: []netip.Prefix{netip.MustParsePrefix("10.33.0.0/16"), netip.MustParsePrefix("0.0.0.0/0")}},
		{ID: 5, Hostname: "r2", UserID: 3, IPv4: netip.MustParseAddr("100.64.0.5"), ApprovedRoutes: []netip.Prefix{netip.MustParsePrefix("10.33.0.0/16")}},
	}
	f.Fuzz(func(t *testing.T, src []byte) {
		p, err := policy.Parse(src)
		if err != nil {
			return
		}
		c, err := p.Compile(users, nodes)
		if err != nil {
			return
		}
		for _, n := range nodes {
			c.Filter(n.ID)
			c.Peers(n.ID)
			c.SSHPolicy(n.ID)
			c.CapMap(n.ID)
			c.ClassOf(n.ID)
			for _, r := range n.ApprovedRoutes {
				p.AutoApprove(n, r, policy.Users(users))
			}
		}
		p.MayOwnTag(users[0], "tag:server")
		_ = p.RunTests(users, nodes)
	})
}
