package netmap

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"tailscale.com/tailcfg"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/policy/policygen"
	"github.com/tailplane/tailplane/internal/session"
)

func TestFilterEncoderMatchesEncodingJSON(t *testing.T) {
	shared := []string{"100.64.0.1", "fd7a:115c:a1e0::1", "100.64.0.0/10", "*"}
	bits := 24
	rules := []tailcfg.FilterRule{
		{SrcIPs: shared, DstPorts: []tailcfg.NetPortRange{{IP: "*", Ports: tailcfg.PortRange{First: 0, Last: 65535}}}},
		{SrcIPs: shared, DstPorts: []tailcfg.NetPortRange{{IP: "100.64.0.2", Ports: tailcfg.PortRange{First: 22, Last: 22}}}, IPProto: []int{6, 17}},
		{SrcIPs: []string{"weird\"<name>"}, DstPorts: []tailcfg.NetPortRange{{IP: "10.0.0.0", Bits: &bits}}},
		{SrcIPs: nil},
		{SrcIPs: shared, CapGrant: []tailcfg.CapGrant{{Caps: []tailcfg.PeerCapability{"x"}}}},
	}
	fe := newFilterEncoder()
	for range 2 { // the second pass uses the cached source lists
		got := session.JoinParts(fe.encode(rules), false)
		want, err := json.Marshal(rules)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("got  %s\nwant %s", got, want)
		}
	}
	if got, want := session.JoinParts(fe.encode(nil), false), []byte("[]"); !bytes.Equal(got, want) {
		t.Fatalf("empty filter: %s", got)
	}
}

// TestLargeSourceListsAreShared: a source list of sharedSrcSize bytes or
// more is one shared chunk, the same for every rule and filter naming it,
// and the JSON is still what encoding/json writes.
func TestLargeSourceListsAreShared(t *testing.T) {
	var big []string
	for i := range 100 {
		big = append(big, netip.AddrFrom4([4]byte{100, 64, 1, byte(i)}).String())
	}
	fe := newFilterEncoder()
	a := []tailcfg.FilterRule{{SrcIPs: big, DstPorts: []tailcfg.NetPortRange{{IP: "100.64.0.1", Ports: tailcfg.PortRange{First: 22, Last: 22}}}}}
	b := []tailcfg.FilterRule{{SrcIPs: big, DstPorts: []tailcfg.NetPortRange{{IP: "100.64.0.2", Ports: tailcfg.PortRange{First: 80, Last: 80}}}}}
	pa, pb := fe.encode(a), fe.encode(b)
	if len(pa) != 3 || pa[1].Chunk == nil || pa[1].Chunk != pb[1].Chunk {
		t.Fatalf("want the list as one chunk shared by both filters: %+v %+v", pa, pb)
	}
	want, _ := json.Marshal(a)
	if got := session.JoinParts(pa, false); !bytes.Equal(got, want) {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
	// A list not asked for since the previous sweep is dropped.
	fe.sweep()
	fe.encode(b)
	fe.sweep()
	if len(fe.srcs) != 1 {
		t.Fatalf("%d lists kept, want 1", len(fe.srcs))
	}
	fe.sweep()
	if len(fe.srcs) != 0 {
		t.Fatalf("%d lists kept after an unused sweep", len(fe.srcs))
	}
}

// grantsPolicy has what the generated policy lacks: an app grant, a
// protocol, a wildcard destination, and autogroup:self with ports.
var grantsPolicy = []byte(`{
  "tagOwners": {"tag:web": ["alice@example.com"]},
  "hosts": {"lan": "10.1.0.0/16"},
  "acls": [
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:22,80-81"]},
    {"action": "accept", "src": ["alice@example.com"], "proto": "udp", "dst": ["tag:web:53", "lan:443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["*:*"]}
  ],
  "grants": [
    {"src": ["autogroup:member"], "dst": ["tag:web"], "app": {"example.com/cap/x": [{"k": 1}]}}
  ]
}`)

// TestEncodePartMatchesRules: a filter part written straight from the
// compiler's piece is byte for byte what encoding its Rules writes, for
// every node of a generated tailnet and a hand-written one, after joins
// too (the parts changed since).
func TestEncodePartMatchesRules(t *testing.T) {
	o := policygen.Options{Seed: 3, Nodes: 120, Users: 20, Tags: 10, Groups: 6, Hosts: 6,
		Rules: 150, SelfRules: 4, SSHRules: 2, Tagged: 0.4, Routers: 4}
	genSrc, genUsers, genNodes := policygen.Generate(o)
	users := []policy.User{{ID: 1, Name: "alice", Email: "alice@example.com"}, {ID: 2, Name: "bob", Email: "bob@example.com"}}
	var nodes []policy.Node
	for i := range 12 {
		n := policy.Node{ID: uint64(i + 1), Hostname: fmt.Sprint("n", i), UserID: uint64(1 + i%2),
			IPv4: netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)}), IPv6: netip.MustParseAddr(fmt.Sprintf("fd7a:115c:a1e0::%x", i+1))}
		if i%4 == 3 {
			n.Tags = []string{"tag:web"}
		}
		if i == 5 {
			n.ApprovedRoutes = []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}
		}
		nodes = append(nodes, n)
	}
	var caps, self, dst int
	for _, tc := range []struct {
		name  string
		src   []byte
		users []policy.User
		nodes []policy.Node
	}{
		{"generated", genSrc, genUsers, genNodes},
		{"grants", grantsPolicy, users, nodes},
	} {
		pol, err := policy.Parse(tc.src)
		if err != nil {
			t.Fatal(tc.name, err)
		}
		half := len(tc.nodes) / 2
		c, err := pol.Compile(tc.users, tc.nodes[:half])
		if err != nil {
			t.Fatal(tc.name, err)
		}
		fe := newFilterEncoder()
		check := func(what string, since uint64, all bool) (parts int) {
			for _, n := range tc.nodes {
				cl := c.ClassOf(n.ID)
				if cl < 0 {
					continue
				}
				ps := c.ClassFilterPartsSince(cl, since)
				if all {
					ps = c.ClassFilterParts(cl)
				}
				own := ownDsts(c.OwnAddrs(n.ID))
				for _, p := range ps {
					want, err := json.Marshal(p.Rules(c, n.ID))
					if err != nil {
						t.Fatal(err)
					}
					if got := session.JoinParts(fe.encodePart(c, n.ID, p, own), false); !bytes.Equal(got, want) {
						t.Fatalf("%s %s: node %d part %s:\n got %s\nwant %s", tc.name, what, n.ID, p.Name(), got, want)
					}
					parts++
					if p.HasCaps() {
						caps++
					}
					if len(p.SelfPorts()) > 0 {
						self++
					}
					if len(p.Dst()) > 0 {
						dst++
					}
				}
			}
			return parts
		}
		check("compiled", 0, true)
		check("compiled, cached", 0, true) // the second pass uses the cached parts
		gen := c.Gen()
		if _, ok := c.AddNodes(slices.Clone(tc.nodes[half:])); !ok {
			t.Fatalf("%s: AddNodes declined the join", tc.name)
		}
		if check("joined", gen, false) == 0 {
			t.Fatalf("%s: the join changed no filter part: the check compared nothing", tc.name)
		}
		check("joined, all", 0, true)
	}
	if caps == 0 || self == 0 || dst == 0 {
		t.Fatalf("parts with app grants %d, own ports %d, fixed destinations %d: want some of each", caps, self, dst)
	}
}
