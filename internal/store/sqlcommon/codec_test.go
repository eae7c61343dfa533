package sqlcommon

import (
	"encoding/json"
	"errors"
	"net/netip"
	"reflect"
	"testing"

	"github.com/tailplane/tailplane/internal/store"
)

// TestDecodeMutations: what this version writes to the change log decodes
// back as it was; a kind of mutation or a field it does not know (written
// by a newer version) is store.ErrNewerChange, not dropped; a payload that
// is not JSON is another error.
func TestDecodeMutations(t *testing.T) {
	muts := []store.Mutation{
		{PutUser: &store.User{ID: 1, Name: "alice"}},
		{PatchNode: &store.NodePatch{Part: store.NodeAdmin, Node: store.Node{ID: 7, GivenName: "box", Tags: []string{"tag:a"},
			ApprovedRoutes: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24")}}}},
		{DeleteNode: 9},
	}
	payload, err := json.Marshal(muts)
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeMutations(string(payload))
	if err != nil || !reflect.DeepEqual(got, muts) {
		t.Errorf("decode of %s = %+v, %v; want what was written", payload, got, err)
	}
	for _, newer := range []string{
		`[{"RenameTailnet":{"Name":"x"}}]`,
		`[{"PatchNode":{"Part":2,"Node":{"ID":7,"Color":"red"}}}]`,
	} {
		if _, err := decodeMutations(newer); !errors.Is(err, store.ErrNewerChange) {
			t.Errorf("decode of %s: error %v, want store.ErrNewerChange", newer, err)
		}
	}
	if _, err := decodeMutations(`[{"PutUser":`); err == nil || errors.Is(err, store.ErrNewerChange) {
		t.Errorf("decode of a truncated payload: error %v, want one that is not store.ErrNewerChange", err)
	}
}
