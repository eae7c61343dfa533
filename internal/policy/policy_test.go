package policy_test

import (
	"net/netip"
	"strings"
	"testing"

	"tailscale.com/tailcfg"

	"github.com/tailplane/tailplane/internal/policy"
)

var (
	testUsers = []policy.User{{ID: 1, Name: "odin", Email: "odin@example.com"}, {ID: 2, Name: "thor"}}
	testNodes = []policy.Node{
		{ID: 1, Hostname: "laptop", UserID: 1, IPv4: netip.MustParseAddr("100.64.0.1"), IPv6: netip.MustParseAddr("fd7a:115c:a1e0::1")},
		{ID: 2, Hostname: "phone", UserID: 1, IPv4: netip.MustParseAddr("100.64.0.2"), IPv6: netip.MustParseAddr("fd7a:115c:a1e0::2")},
		{ID: 3, Hostname: "desk", UserID: 2, IPv4: netip.MustParseAddr("100.64.0.3"), IPv6: netip.MustParseAddr("fd7a:115c:a1e0::3")},
		{ID: 4, Hostname: "db", Tags: []string{"tag:db"}, IPv4: netip.MustParseAddr("100.64.0.4"), IPv6: netip.MustParseAddr("fd7a:115c:a1e0::4")},
		{ID: 5, Hostname: "db2", Tags: []string{"tag:db"}, IPv4: netip.MustParseAddr("100.64.0.5"), IPv6: netip.MustParseAddr("fd7a:115c:a1e0::5")},
	}
)

func compile(t *testing.T, src string) *policy.Compiled {
	t.Helper()
	p, err := policy.Parse([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	c, err := p.Compile(testUsers, testNodes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestClassesShareRules(t *testing.T) {
	c := compile(t, `{
		// comments and trailing commas are HuJSON
		"tagOwners": {"tag:db": ["odin@example.com"]},
		"acls": [{"action": "accept", "src": ["thor@"], "dst": ["tag:db:5432"]},],
	}`)
	if c.ClassOf(4) != c.ClassOf(5) {
		t.Fatalf("db and db2 are indistinguishable but in classes %d and %d", c.ClassOf(4), c.ClassOf(5))
	}
	f4, f5 := c.Filter(4), c.Filter(5)
	if len(f4) != 1 || len(f5) != 1 || &f4[0].SrcIPs[0] != &f5[0].SrcIPs[0] {
		t.Fatalf("filters of one class must share their source lists: %v %v", f4, f5)
	}
	if got := f4[0].DstPorts[0].IP; got != "100.64.0.4" {
		t.Errorf("db's filter names %s, want its own address", got)
	}
	if len(c.Peers(3)) != 2 || len(c.Peers(1)) != 0 {
		t.Errorf("peers: desk sees %v, laptop sees %v", c.Peers(3), c.Peers(1))
	}
}

func TestSelf(t *testing.T) {
	c := compile(t, `{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}`)
	if p := c.Peers(1); len(p) != 1 || p[0].ID != 2 {
		t.Errorf("laptop sees %v, want only phone", p)
	}
	if p := c.Peers(3); len(p) != 0 {
		t.Errorf("desk sees %v, want nobody", p)
	}
}

func TestRejects(t *testing.T) {
	for src, want := range map[string]string{
		`{"acls": [{"action": "accept", "src": ["tag:nope"], "dst": ["*:*"]}]}`:                       "tag not found",
		`{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:0"]}]}`:                              "first port must be >0",
		`{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "extra": 1}]}`:                  "unknown field",
		`{"grants": [{"src": ["*"], "dst": ["*"]}]}`:                                                  "ip and app can not both be empty",
		`{"groups": {"group:a": ["group:b"]}}`:                                                        "cannot be recursive",
		`{"ssh": [{"action": "accept", "src": ["*"], "dst": ["autogroup:self"], "users": ["root"]}]}`: "autogroup:self",
	} {
		_, err := policy.Parse([]byte(src))
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%s) = %v, want error containing %q", src, err, want)
		}
	}
}

func TestTestsAndApprovers(t *testing.T) {
	p, err := policy.Parse([]byte(`{
		"tagOwners": {"tag:db": ["odin@example.com"], "tag:exit": ["tag:db"]},
		"autoApprovers": {"routes": {"10.0.0.0/8": ["tag:db"]}, "exitNode": ["odin@example.com"]},
		"acls": [{"action": "accept", "src": ["odin@example.com"], "dst": ["tag:db:5432"]}],
		"tests": [{"src": "odin@example.com", "accept": ["tag:db:5432"], "deny": ["tag:db:22"]}],
	}`))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.RunTests(testUsers, testNodes); err != nil {
		t.Error(err)
	}
	if !p.MayOwnTag(testUsers[0], "tag:db") || p.MayOwnTag(testUsers[1], "tag:db") || !p.MayOwnTag(policy.User{}, "tag:exit", "tag:db") {
		t.Error("tagOwners not applied")
	}
	dir := policy.Users(testUsers)
	if !p.AutoApprove(testNodes[3], netip.MustParsePrefix("10.1.0.0/16"), dir) || p.AutoApprove(testNodes[0], netip.MustParsePrefix("10.1.0.0/16"), dir) {
		t.Error("route auto-approval wrong")
	}
	if !p.AutoApprove(testNodes[0], netip.MustParsePrefix("0.0.0.0/0"), dir) || p.AutoApprove(testNodes[3], netip.MustParsePrefix("0.0.0.0/0"), dir) {
		t.Error("exit auto-approval wrong")
	}
}

// TestConcurrentReads reads one Compiled from many goroutines (run with
// -race): the server shares it between sessions.
func TestConcurrentReads(t *testing.T) {
	c := compile(t, `{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
		"ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]}]}`)
	done := make(chan bool)
	for range 8 {
		go func() {
			for _, n := range testNodes {
				c.Filter(n.ID)
				c.Peers(n.ID)
				c.SSHPolicy(n.ID)
			}
			done <- true
		}()
	}
	for range 8 {
		<-done
	}
}

// TestDefaultCaps: every node has the capabilities Tailscale grants by
// default for the features tailplane serves (without cap/ssh a client
// refuses to run its SSH server), and nodeAttrs add to them for the nodes
// they target only.
func TestDefaultCaps(t *testing.T) {
	c := compile(t, `{
		"tagOwners": {"tag:db": ["odin@example.com"]},
		"nodeAttrs": [{"target": ["tag:db"], "attr": ["funnel"]}],
	}`)
	for _, id := range []uint64{1, 3, 4} {
		caps := c.CapMap(id)
		for _, want := range []tailcfg.NodeCapability{tailcfg.CapabilitySSH, tailcfg.NodeAttrSSHBehaviorV1,
			tailcfg.NodeAttrSSHEnvironmentVariables, tailcfg.CapabilityFileSharing} {
			if _, ok := caps[want]; !ok {
				t.Errorf("node %d lacks %s: %v", id, want, caps)
			}
		}
		if _, ok := caps["funnel"]; ok != (id == 4) {
			t.Errorf("node %d has funnel: %v, want %v", id, ok, id == 4)
		}
	}
}
