package netmap

import (
	"bytes"
	"encoding/json"
	"testing"

	"tailscale.com/tailcfg"
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
		got := fe.encode(rules)
		want, err := json.Marshal(rules)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("got  %s\nwant %s", got, want)
		}
	}
	if got, want := fe.encode(nil), []byte("[]"); !bytes.Equal(got, want) {
		t.Fatalf("empty filter: %s", got)
	}
}
