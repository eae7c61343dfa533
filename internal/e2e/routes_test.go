package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"

	"github.com/tailplane/tailplane/internal/realclient"
)

// TestRoutes: a real client advertises a subnet route and itself as an exit
// node. Its peer sees neither while they are only advertised; once an admin
// approves them it sees the route as the router's primary route and the
// router as an exit node it may use; when the approval is taken back both
// go again. Nobody reconnects for any of it.
func TestRoutes(t *testing.T) {
	t.Parallel()
	srv, _, ms := aliceTailnet(t, "router", "user")
	router, user := ms[0], ms[1]
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()

	subnet := netip.MustParsePrefix("10.201.0.0/24")
	if _, err := router.CLI(ctx, "set", "--advertise-routes="+subnet.String(), "--advertise-exit-node"); err != nil {
		t.Fatal(err)
	}
	advertised := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0"), subnet}
	slices.SortFunc(advertised, comparePrefix)
	var id uint64
	if err := realclient.Eventually(ctx, 200*time.Millisecond, func() error {
		ns, err := srv.listNodes(ctx)
		if err != nil {
			return err
		}
		n, ok := nodeByIP(ns, router.ip4)
		if !ok {
			return fmt.Errorf("router %v not in nodes list", router.ip4)
		}
		id = n.ID
		got := slices.Clone(n.AdvertisedRoutes)
		slices.SortFunc(got, comparePrefix)
		if !slices.Equal(got, advertised) || len(n.ApprovedRoutes) != 0 {
			return fmt.Errorf("router advertises %v with %v approved, want %v with none", n.AdvertisedRoutes, n.ApprovedRoutes, advertised)
		}
		return nil
	}); err != nil {
		t.Fatalf("the server did not record the advertised routes: %v", err)
	}
	sees := func(primary, exit bool) func(*ipnstate.Status) error {
		return func(st *ipnstate.Status) error {
			p := peerByIP(st, router.ip4)
			if p == nil {
				return fmt.Errorf("router %v is not a peer", router.ip4)
			}
			var routes []netip.Prefix
			if p.PrimaryRoutes != nil {
				routes = p.PrimaryRoutes.AsSlice()
			}
			var allowed []netip.Prefix
			if p.AllowedIPs != nil {
				allowed = p.AllowedIPs.AsSlice()
			}
			if slices.Contains(routes, subnet) != primary || slices.Contains(allowed, subnet) != primary {
				return fmt.Errorf("router's primary routes %v, allowed IPs %v; want %v among both: %v", routes, allowed, subnet, primary)
			}
			if p.ExitNodeOption != exit {
				return fmt.Errorf("router offered as exit node: %v, want %v", p.ExitNodeOption, exit)
			}
			return nil
		}
	}
	before, err := user.WaitStatus(ctx, sees(false, false))
	if err != nil {
		t.Fatalf("before approval: %v", err)
	}

	start := time.Now()
	srv.mustCLI(t, "routes", "approve", strconv.FormatUint(id, 10), subnet.String(), "0.0.0.0/0", "::/0")
	if _, err := user.WaitStatus(ctx, sees(true, true)); err != nil {
		t.Fatalf("after approval: %v", err)
	}
	t.Logf("approved routes reached the peer in %v", time.Since(start).Round(time.Millisecond))
	if _, err := user.CLI(ctx, "set", "--exit-node="+router.ip4.String()); err != nil {
		t.Errorf("the peer cannot choose the approved exit node: %v", err)
	}
	if _, err := user.CLI(ctx, "set", "--exit-node="); err != nil {
		t.Fatal(err)
	}

	start = time.Now()
	srv.mustCLI(t, "routes", "approve", strconv.FormatUint(id, 10))
	after, err := user.WaitStatus(ctx, sees(false, false))
	if err != nil {
		t.Fatalf("after revoking: %v", err)
	}
	t.Logf("revoked routes left the peer in %v", time.Since(start).Round(time.Millisecond))
	if before.Self.ID != after.Self.ID || before.Self.Created != after.Self.Created {
		t.Errorf("the peer's node changed (%v created %v, now %v created %v): it re-registered", before.Self.ID, before.Self.Created, after.Self.ID, after.Self.Created)
	}
}

func peerByIP(st *ipnstate.Status, ip netip.Addr) *ipnstate.PeerStatus {
	for _, p := range st.Peer {
		if slices.Contains(p.TailscaleIPs, ip) {
			return p
		}
	}
	return nil
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}
