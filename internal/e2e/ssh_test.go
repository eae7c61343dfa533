package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"

	"github.com/tailplane/tailplane/internal/realclient"
)

// TestSSH: Tailscale SSH between real clients, under the policy's ssh
// rules. The host can turn its SSH server on (the client refuses without
// the cap/ssh capability from control), the other client runs a command
// on it as root while a rule accepts that, and is refused once the policy
// no longer has the rule.
func TestSSH(t *testing.T) {
	t.Parallel()
	srv := startServer(t)
	srv.mustCLI(t, "users", "create", "alice", "--email", "alice@example.com")
	key := srv.createKey(t, "alice", "--reusable")
	const acls = `"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]`
	setPolicy(t, srv, `{`+acls+`, "ssh": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["root"]}]}`)
	ms := join(t, srv, key.Key, nil, "client", "host")
	client, host := ms[0], ms[1]
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()

	if _, err := host.CLI(ctx, "set", "--ssh"); err != nil {
		t.Fatalf("the host cannot run Tailscale SSH: %v", err)
	}
	// The client trusts the host keys the host's Hostinfo carries to it.
	if _, err := client.WaitStatus(ctx, func(st *ipnstate.Status) error {
		if p := peerByIP(st, host.ip4); p == nil || len(p.SSH_HostKeys) == 0 {
			return fmt.Errorf("no SSH host keys for %s yet", host.Name())
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	target := "root@" + host.ip4.String()
	out, err := client.CLI(ctx, "ssh", target, "echo", "tailplane-ssh-ok")
	if err != nil || strings.TrimSpace(string(out)) != "tailplane-ssh-ok" {
		t.Fatalf("ssh %s: %q, %v; want the command's output", target, out, err)
	}

	// Without the ssh rule the host refuses the same command.
	setPolicy(t, srv, `{`+acls+`}`)
	if err := realclient.Eventually(ctx, time.Second, func() error {
		out, err := client.CLI(ctx, "ssh", target, "echo", "tailplane-ssh-ok")
		if err == nil {
			return fmt.Errorf("ssh still runs commands without a rule: %q", out)
		}
		if !strings.Contains(err.Error(), "policy does not permit") {
			return fmt.Errorf("ssh failed, but not for the policy: %v", err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
