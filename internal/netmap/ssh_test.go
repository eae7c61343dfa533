package netmap

import (
	"bytes"
	"encoding/json"
	"testing"

	"tailscale.com/tailcfg"
)

// TestSSHEncoderMatchesEncodingJSON: policies put together from cached
// rules are what encoding/json writes, a rule shared by two policies is
// encoded once, and a replaced rule is dropped after two sweeps.
func TestSSHEncoderMatchesEncodingJSON(t *testing.T) {
	shared := &tailcfg.SSHRule{
		Principals: []*tailcfg.SSHPrincipal{{NodeIP: "100.64.0.1"}, {NodeIP: "fd7a:115c:a1e0::1"}},
		SSHUsers:   map[string]string{"root": "root", "*": "=", "<a&b>": "x"},
		Action:     &tailcfg.SSHAction{Accept: true, AllowAgentForwarding: true},
		AcceptEnv:  []string{"GIT_*"},
	}
	other := &tailcfg.SSHRule{Principals: []*tailcfg.SSHPrincipal{{Any: true}}, Action: &tailcfg.SSHAction{Reject: true, Message: "no"}}
	se := newSSHEncoder()
	for _, p := range []*tailcfg.SSHPolicy{
		nil,
		{},
		{Rules: []*tailcfg.SSHRule{}},
		{Rules: []*tailcfg.SSHRule{shared}},
		{Rules: []*tailcfg.SSHRule{other, shared, nil}},
	} {
		want, err := json.Marshal(p)
		if p == nil {
			want, err = json.Marshal(&tailcfg.SSHPolicy{})
		}
		if err != nil {
			t.Fatal(err)
		}
		if got := se.encode(p); !bytes.Equal(got, want) {
			t.Fatalf("got  %s\nwant %s", got, want)
		}
	}
	if len(se.rules) != 2 {
		t.Fatalf("%d rules cached, want 2 (the shared one once)", len(se.rules))
	}
	se.sweep()
	se.encode(&tailcfg.SSHPolicy{Rules: []*tailcfg.SSHRule{other}})
	se.sweep()
	if _, ok := se.rules[shared]; ok || len(se.rules) != 1 {
		t.Fatalf("after a sweep without it, the unused rule is still cached (%d rules)", len(se.rules))
	}
}
