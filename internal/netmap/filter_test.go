package netmap

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"testing"

	"tailscale.com/tailcfg"

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
