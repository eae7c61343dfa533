// Package policy parses, validates and compiles Tailscale-compatible policy
// files (HuJSON: groups, hosts, tagOwners, acls, grants, ssh, autoApprovers,
// nodeAttrs, ipsets, tests, sshTests).
//
// Compilation works per identity class: nodes the policy cannot tell apart
// share one class, and filters, SSH policies and peer sets are computed once
// per class. See Compile.
package policy

import (
	"net/netip"
	"strings"

	"tailscale.com/tailcfg"
)

// User is a tailnet user. Policies name users by email; a user without an
// email is named "name@".
type User struct {
	ID    uint64
	Name  string
	Email string
}

// Login is how policies name the user: the email, or "name@" when there is no
// email.
func (u User) Login() string {
	if u.Email != "" {
		return u.Email
	}
	return u.Name + "@"
}

// Node is a tailnet node as the policy sees it.
type Node struct {
	ID       uint64
	Hostname string
	// UserID is the owning user. For tagged nodes (len(Tags) > 0) the user
	// identity is not used by the policy, as in Tailscale.
	UserID uint64
	Tags   []string
	IPv4   netip.Addr
	IPv6   netip.Addr
	// AdvertisedRoutes are the routes the client advertises.
	AdvertisedRoutes []netip.Prefix
	// ApprovedRoutes are the advertised routes approved by an admin or by
	// autoApprovers. Only approved routes count.
	ApprovedRoutes []netip.Prefix
}

// IsTagged reports whether the node is tagged (its identity is its tags).
func (n *Node) IsTagged() bool { return len(n.Tags) > 0 }

// Peer is a node as another node sees it.
type Peer struct {
	ID uint64
	// AllowedIPs are the peer's addresses plus the routes through it that
	// the viewer may use. The slice may be shared with other Peers: read
	// it, never modify it.
	AllowedIPs []netip.Prefix
	// PrimaryRoutes are the subnet routes the peer is primary for, limited to
	// those relevant to the viewer.
	PrimaryRoutes []netip.Prefix
}

// Policy is a parsed and validated policy. It is immutable and safe for
// concurrent use.
type Policy struct {
	groups    map[string][]string // "group:x" -> member logins
	hosts     map[string][]netip.Prefix
	ipsets    map[string][]netip.Prefix
	tagOwners map[string][]alias

	rules     []rule // from acls and grants, in order
	ssh       []sshRule
	nodeAttrs []nodeAttr
	tests     []aclTest
	sshTests  []sshTest

	autoRoutes []autoRoute
	autoExit   []alias

	// localparts lists the domains used in localpart:*@domain SSH users;
	// they must belong to the tailnet, which Compile checks.
	localparts []string
	// usesSelf is set when any rule names autogroup:self; classes then
	// separate users.
	usesSelf bool
}

// rule is one ACL or grant, normalised.
type rule struct {
	src []alias
	dst []dstEntry
	// protos is the IPProto list; nil means Tailscale's default (TCP, UDP,
	// ICMPv4, ICMPv6).
	protos []int
	// caps is set for app grants: capabilities instead of ports.
	caps      tailcfg.PeerCapMap
	via       []string
	fromGrant bool
}

type dstEntry struct {
	a     alias
	ports []tailcfg.PortRange
}

type sshRule struct {
	accept    bool // false: check
	src       []alias
	dst       []alias
	users     []string
	acceptEnv []string
}

type nodeAttr struct {
	targets []alias
	attrs   []string
}

type aclTest struct {
	where  string
	src    string
	proto  []int
	accept []string
	deny   []string
}

type sshTest struct {
	where  string
	src    string
	dst    []string
	accept []string
	check  []string
	deny   []string
}

type autoRoute struct {
	prefix    netip.Prefix
	approvers []alias
}

// Default returns the policy used when none is set: every node may reach
// every node, as in Tailscale's default policy.
func Default() *Policy {
	p, err := Parse([]byte(`{"acls":[{"action":"accept","src":["*"],"dst":["*:*"]}]}`))
	if err != nil {
		panic(err)
	}
	return p
}

// trim removes the surrounding white space Tailscale tolerates in names.
func trim(s string) string { return strings.TrimSpace(s) }
