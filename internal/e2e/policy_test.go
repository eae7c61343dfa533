package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"

	"github.com/tailplane/tailplane/internal/realclient"
)

// Ports and timing of TestPolicy.
const (
	policyPort1 = 8001 // on pb: allowed to pa by policy 1, denied to everyone by policy 2
	policyPort2 = 8002 // on pb: denied to everyone by policy 1, allowed to pc by policy 2

	// deniedTimeout bounds one attempt at a flow the policy denies: the
	// receiving node drops the SYN silently, so the attempt can only time out.
	// On loopback an allowed exchange takes a few milliseconds, and the first
	// SYN retransmission of the client's userspace TCP stack comes after 1 s.
	deniedTimeout = 1500 * time.Millisecond
	// deniedAttempts is how often each denied flow is tried: it must stay denied.
	deniedAttempts = 3

	// policyDeadline is the bound: clients obey a new policy within it.
	policyDeadline = 2 * time.Second
	// probeEvery and probeWindow shape the measurement after `policy set`:
	// a new connection attempt on each flow every probeEvery, for probeWindow
	// (longer than policyDeadline, so that a slow change is measured rather
	// than only detected), each bounded by probeTimeout.
	probeEvery   = 100 * time.Millisecond
	probeWindow  = 4 * time.Second
	probeTimeout = time.Second
)

// policy1: pa may reach pb on TCP 8001 and nothing else; pc may reach
// nothing. pb may reach pa and pc on port 9 (where nothing listens and which
// nothing in the test uses): that makes pb a peer of pa and of pc (a node
// sees another when either may send to the other), so the packets of denied
// flows are carried to pb and dropped by pb's packet filter, rather than
// failing for want of a route. pa and pc are not peers of each other.
const policy1 = `// TestPolicy: policy 1
{
	"acls": [
		{"action": "accept", "proto": "tcp", "src": ["pa@example.com"], "dst": ["pb@example.com:8001"]},
		// Peer visibility only; port 9 is never used.
		{"action": "accept", "proto": "tcp", "src": ["pb@example.com"], "dst": ["pa@example.com:9", "pc@example.com:9"]},
	],
}
`

// policy2 swaps the access: pc may reach pb on TCP 8002 only, pa may reach
// nothing. The peer graph is the same as under policy1, so the change is a
// change of pb's packet filter only. Its tests pass on the test's tailnet.
const policy2 = `// TestPolicy: policy 2
{
	"acls": [
		{"action": "accept", "proto": "tcp", "src": ["pc@example.com"], "dst": ["pb@example.com:8002"]},
		// Peer visibility only; port 9 is never used.
		{"action": "accept", "proto": "tcp", "src": ["pb@example.com"], "dst": ["pa@example.com:9", "pc@example.com:9"]},
	],
	"tests": [
		{"src": "pc@example.com", "proto": "tcp", "accept": ["pb@example.com:8002"], "deny": ["pb@example.com:8001"]},
		{"src": "pa@example.com", "proto": "tcp", "deny": ["pb@example.com:8001", "pb@example.com:8002"]},
	],
}
`

// policyBadSyntax is policy2 with its closing brace missing.
var policyBadSyntax = strings.TrimSuffix(strings.TrimSpace(policy2), "}")

// policyBadTests is valid but its test contradicts its rules: pa may not
// reach pb:8001 under it.
const policyBadTests = `// TestPolicy: failing tests
{
	"acls": [
		{"action": "accept", "proto": "tcp", "src": ["pc@example.com"], "dst": ["pb@example.com:8002"]},
	],
	"tests": [
		{"src": "pa@example.com", "proto": "tcp", "accept": ["pb@example.com:8001"]},
	],
}
`

// TestPolicy is the policy engine's end-to-end scenario with real clients:
// under policy 1, bytes flow from pa to pb on one TCP port, not on another
// port and not from pc; `tailplane policy set` refuses a policy with a
// syntax error and one whose tests fail, leaving policy 1 in force; then it
// activates policy 2, which swaps the access, and the running clients obey it
// within 2 s, without opening a new map stream.
func TestPolicy(t *testing.T) {
	srv := startServer(t)
	for _, u := range []string{"pa", "pb", "pc"} {
		srv.mustCLI(t, "users", "create", u, "--email", u+"@example.com")
	}
	// Policy 1 is in force before anyone joins, so no client ever runs with
	// the default allow-all filter and the denials below need no waiting.
	setPolicy(t, srv, policy1)

	keys := make([]string, 3)
	for i, u := range []string{"pa", "pb", "pc"} {
		keys[i] = srv.createKey(t, u).Key
	}
	t0 := time.Now()
	// Every drop is logged on pb: tailscaled rate-limits drop logs (a burst
	// of 10, then one per 5 s) and, separately, every log format string (a
	// burst of 5, then one per 5 s), and the test makes more drops than that.
	env := []string{"TS_DEBUG_FILTER_RATE_LIMIT_LOGS=all", "TS_DEBUG_LOG_RATE=all"}
	ms := joinEach(t, srv, env, []string{"pa", "pb", "pc"}, keys)
	a, b, c := ms[0], ms[1], ms[2]
	t.Logf("3 clients joined in %v", time.Since(t0).Round(time.Millisecond))

	// The peer graph follows the policy: pb sees pa and pc; pa and pc see
	// only pb.
	if !t.Run("peers", func(t *testing.T) {
		checkPeers(t, a, []*member{b}, []*member{c})
		checkPeers(t, b, []*member{a, c}, nil)
		checkPeers(t, c, []*member{b}, []*member{a})
	}) {
		t.FailNow()
	}

	for _, port := range []int{policyPort1, policyPort2} {
		if err := b.Serve(t.Context(), port, fmt.Sprintf("pb port %d", port)); err != nil {
			t.Fatal(err)
		}
	}

	// A client opens a new map stream only when it (re)connects to control:
	// its controlclient_map_requests_poll counter (tailscale debug metrics)
	// counts exactly the streaming map requests it has sent. That is the
	// client's own account, independent of anything the server logs, and
	// it does not depend on how requests are multiplexed over connections.
	// Recorded here, it must not move until the end of the test: neither
	// the refused policies nor the policy change may make a client
	// reconnect.
	polls0 := mapCounters(t, ms, "controlclient_map_requests_poll")
	maps0 := mapCounters(t, ms, "controlclient_map_response_map")
	t.Logf("streaming map requests so far: %v; map responses: %v", polls0, maps0)

	t.Run("policy1", func(t *testing.T) {
		checkAllowed(t, a, b, policyPort1, trafficTimeout)
		logOff := logSize(t, b)
		checkDenied(t, []flow{{a, b, policyPort2}, {c, b, policyPort1}, {c, b, policyPort2}})
		checkDropLogged(t, b, logOff, []flow{{a, b, policyPort2}, {c, b, policyPort1}, {c, b, policyPort2}})
	})

	t.Run("refused", func(t *testing.T) {
		for _, tc := range []struct {
			name, text string
			want       []string // in the error, lower case
		}{
			{"syntax", policyBadSyntax, []string{"policy"}},
			// e.g. "test(s) failed:\n tests[0]: pa -> pb:8001 is denied"
			{"tests", policyBadTests, []string{"tests[0]", "pb:8001", "denied"}},
		} {
			path := writePolicy(t, tc.name, tc.text)
			for _, verb := range []string{"check", "set"} {
				out, err := srv.CLI(t.Context(), "policy", verb, path)
				if err == nil {
					t.Errorf("policy %s with %s error succeeded: %s", verb, tc.name, out)
					continue
				}
				msg := strings.ToLower(err.Error())
				for _, w := range tc.want {
					if !strings.Contains(msg, strings.ToLower(w)) {
						t.Errorf("policy %s with %s error: want the error to mention %q, got: %v", verb, tc.name, w, err)
					}
				}
				t.Logf("policy %s refused the %s error: %v", verb, tc.name, err)
			}
		}
		// Byte for byte: the stored policy keeps its comments and layout.
		if got := srv.mustCLI(t, "policy", "get"); string(got) != policy1 {
			t.Errorf("after refused policies, policy get returns:\n%s\nwant policy 1:\n%s", got, policy1)
		}
		// Policy 1 is still what the clients obey.
		checkAllowed(t, a, b, policyPort1, trafficTimeout)
		checkDenied(t, []flow{{a, b, policyPort2}, {c, b, policyPort2}})
	})

	t.Run("change", func(t *testing.T) {
		path := writePolicy(t, "policy2", policy2)
		if out, err := srv.CLI(t.Context(), "policy", "check", path); err != nil {
			t.Fatalf("policy check of policy 2: %v", err)
		} else {
			t.Logf("policy check: %s", bytes.TrimSpace(out))
		}
		logOff := logSize(t, b)
		removed := flow{a, b, policyPort1} // allowed by policy 1 only
		added := flow{c, b, policyPort2}   // allowed by policy 2 only

		// Probing starts just before `policy set` (an attempt takes a few ms
		// when allowed) and the clock starts when it returns.
		ctx := t.Context()
		start := time.Now()
		var wg sync.WaitGroup
		var removedRes, addedRes []probeResult
		wg.Go(func() { removedRes = probeFlow(ctx, removed, start, probeWindow+time.Second) })
		wg.Go(func() { addedRes = probeFlow(ctx, added, start, probeWindow+time.Second) })
		time.Sleep(3 * probeEvery) // a few attempts under policy 1, as a baseline
		setStart := time.Now()
		_, setErr := srv.CLI(ctx, "policy", "set", path)
		set := time.Now()
		wg.Wait()
		if setErr != nil {
			t.Fatalf("policy set of policy 2: %v", setErr)
		}
		t.Logf("policy set took %v", set.Sub(setStart).Round(time.Millisecond))
		// The baseline: before policy set, the removed flow worked and the
		// added one did not. Otherwise the timings below mean nothing.
		if !slices.ContainsFunc(removedRes, func(r probeResult) bool { return r.err == nil && r.end.Before(setStart) }) {
			t.Errorf("%s: no attempt succeeded before policy set\n%s", removed, describeProbes(removedRes, set))
		}
		if slices.ContainsFunc(addedRes, func(r probeResult) bool { return r.err == nil && r.end.Before(setStart) }) {
			t.Errorf("%s: an attempt succeeded before policy set\n%s", added, describeProbes(addedRes, set))
		}

		// The new flow: the first completed exchange after policy set, and
		// every attempt started after that one also succeeds.
		okAt, err := firstAllowed(t, added, addedRes, set)
		if err != nil {
			t.Errorf("%s under policy 2: %v\n%s", added, err, describeProbes(addedRes, set))
		} else {
			t.Logf("%s: first bytes %v after policy set returned", added, okAt.Round(time.Millisecond))
			if okAt > policyDeadline {
				t.Errorf("%s: allowed only %v after policy set, want within %v", added, okAt.Round(time.Millisecond), policyDeadline)
			}
		}
		// The removed flow: the start of the first attempt from which on
		// every attempt failed.
		deniedAt, err := firstDenied(removedRes, set)
		if err != nil {
			t.Errorf("%s under policy 2: %v\n%s", removed, err, describeProbes(removedRes, set))
		} else {
			t.Logf("%s: denied from %v after policy set returned", removed, deniedAt.Round(time.Millisecond))
			if deniedAt > policyDeadline {
				t.Errorf("%s: still allowed %v after policy set, want denied within %v", removed, deniedAt.Round(time.Millisecond), policyDeadline)
			}
		}
		if t.Failed() {
			t.FailNow()
		}

		// The steady state of policy 2.
		checkAllowed(t, c, b, policyPort2, trafficTimeout)
		checkDenied(t, []flow{removed, {a, b, policyPort2}, {c, b, policyPort1}})
		checkDropLogged(t, b, logOff, []flow{removed, {a, b, policyPort2}, {c, b, policyPort1}})
		// The peer graph is the same under both policies.
		checkPeers(t, a, []*member{b}, []*member{c})
		checkPeers(t, c, []*member{b}, []*member{a})
	})

	t.Run("no-reconnect", func(t *testing.T) {
		polls := mapCounters(t, ms, "controlclient_map_requests_poll")
		maps := mapCounters(t, ms, "controlclient_map_response_map")
		t.Logf("streaming map requests: %v before, %v after; map responses: %v before, %v after", polls0, polls, maps0, maps)
		for i, m := range ms {
			if polls[i] != polls0[i] {
				t.Errorf("%s sent %d new streaming map request(s) (%d -> %d): it reconnected to control", m.Name(), polls[i]-polls0[i], polls0[i], polls[i])
			}
		}
		// pb's filter changed, so it must have had a map response on the
		// stream it already had.
		if maps[1] <= maps0[1] {
			t.Errorf("pb received no map response (%d -> %d), yet obeys policy 2?", maps0[1], maps[1])
		}
	})
}

// flow is TCP from src to dst's text service on port.
type flow struct {
	src, dst *member
	port     int
}

func (f flow) String() string {
	return fmt.Sprintf("%s -> %s:%d", f.src.Name(), f.dst.Name(), f.port)
}

func (f flow) want() string { return fmt.Sprintf("%s port %d", f.dst.Name(), f.port) }

// try makes one HTTP exchange on the flow, with a new connection, bounded by
// timeout. It succeeds only if the right text came back.
func (f flow) try(ctx context.Context, timeout time.Duration) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	body, err := f.src.HTTPGet(ctx, f.dst.ip4, f.dst.dnsName, f.port)
	if err == nil && string(body) != f.want() {
		err = fmt.Errorf("got %q, want %q", body, f.want())
	}
	return body, err
}

// setPolicy runs `policy set` with text, failing t on error.
func setPolicy(t *testing.T, srv *server, text string) {
	t.Helper()
	srv.mustCLI(t, "policy", "set", writePolicy(t, "policy", text))
}

// writePolicy writes text to a new file and returns its path.
func writePolicy(t *testing.T, name, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name+".hujson")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// joinEach starts one client per hostname, with env added to its
// environment, and logs client i in with keys[i], in parallel.
func joinEach(t *testing.T, srv *server, env, hostnames, keys []string) []*member {
	t.Helper()
	ms := make([]*member, len(hostnames))
	for i, h := range hostnames {
		ms[i] = &member{Client: realclient.Start(t, realclient.Options{Name: h, ControlURL: srv.URL(), Env: env})}
	}
	ctx, cancel := context.WithTimeout(t.Context(), joinTimeout)
	defer cancel()
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Go(func() {
			if errs[i] = m.Up(ctx, srv.URL(), keys[i], m.Name()); errs[i] != nil {
				return
			}
			st, err := m.Status(ctx)
			if err != nil {
				errs[i] = err
				return
			}
			errs[i] = m.setIdentity(st)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return ms
}

// checkPeers waits until m lists every member of want as an online peer and
// none of notWant.
func checkPeers(t *testing.T, m *member, want, notWant []*member) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), convergeTimeout)
	defer cancel()
	_, err := m.WaitStatus(ctx, func(st *ipnstate.Status) error {
		for _, o := range want {
			if err := hasPeer(st, o); err != nil {
				return err
			}
		}
		for _, o := range notWant {
			for _, p := range st.Peer {
				if slices.Contains(p.TailscaleIPs, o.ip4) {
					return fmt.Errorf("lists %s as a peer, which the policy does not allow", o.Name())
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// checkAllowed waits, bounded by timeout, until src gets dst's text on port.
func checkAllowed(t *testing.T, src, dst *member, port int, timeout time.Duration) {
	t.Helper()
	f := flow{src, dst, port}
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	start := time.Now()
	err := realclient.Eventually(ctx, 250*time.Millisecond, func() error {
		_, err := f.try(ctx, 5*time.Second)
		return err
	})
	if err != nil {
		t.Errorf("%s: want allowed: %v", f, err)
		return
	}
	t.Logf("%s: allowed (%q after %v)", f, f.want(), time.Since(start).Round(time.Millisecond))
}

// checkDenied tries every flow deniedAttempts times, in parallel across
// flows, and fails t if any attempt gets a byte of a response.
func checkDenied(t *testing.T, fs []flow) {
	t.Helper()
	var wg sync.WaitGroup
	for _, f := range fs {
		wg.Go(func() {
			var last error
			for range deniedAttempts {
				body, err := f.try(t.Context(), deniedTimeout)
				if err == nil || len(body) > 0 {
					t.Errorf("%s: want denied, got %q (err %v)", f, body, err)
					return
				}
				last = err
			}
			t.Logf("%s: denied %d times in a row (last: %v)", f, deniedAttempts, last)
		})
	}
	wg.Wait()
}

// logSize returns the current size of m's tailscaled log.
func logSize(t *testing.T, m *member) int64 {
	t.Helper()
	fi, err := os.Stat(m.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// checkDropLogged checks that dst's tailscaled logged, after offset, that its
// packet filter dropped a TCP packet of each flow because no rule matched:
// the denials were the policy's doing, not a missing route or a dead peer.
func checkDropLogged(t *testing.T, dst *member, offset int64, fs []flow) {
	t.Helper()
	for _, f := range fs {
		if m, re := findDrop(t, dst, offset, f); m == nil {
			t.Errorf("%s: no %q line in %s's log", f, re, dst.Name())
		} else {
			t.Logf("%s: %s logged %q", f, dst.Name(), m)
		}
	}
}

// dropLoggedSince reports whether f's destination logged, after offset,
// that its packet filter dropped a packet of f.
func dropLoggedSince(t *testing.T, f flow, offset int64) bool {
	t.Helper()
	m, _ := findDrop(t, f.dst, offset, f)
	return m != nil
}

// findDrop returns the first line of dst's log after offset in which its
// packet filter dropped a TCP packet of f because no rule matched, and the
// pattern it looked for.
func findDrop(t *testing.T, dst *member, offset int64, f flow) ([]byte, *regexp.Regexp) {
	t.Helper()
	b, err := os.ReadFile(dst.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	if offset > int64(len(b)) {
		offset = 0
	}
	// e.g. "Drop: TCP{100.64.0.1:41234 > 100.64.0.2:8002} 60 no rules matched"
	re := regexp.MustCompile(`Drop: TCP\{` + regexp.QuoteMeta(f.src.ip4.String()) + `:\d+ > ` +
		regexp.QuoteMeta(f.dst.ip4.String()+":"+strconv.Itoa(f.port)) + `\} \d+ no rules matched`)
	return re.Find(b[offset:]), re
}

// mapCounters returns the value of a tailscaled client metric (`tailscale
// debug metrics`) for each member.
func mapCounters(t *testing.T, ms []*member, name string) []int64 {
	t.Helper()
	out := make([]int64, len(ms))
	for i, m := range ms {
		v, err := clientMetric(t.Context(), m, name)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = v
	}
	return out
}

// clientMetric reads one counter or gauge from `tailscale debug metrics`
// (Prometheus text format). A metric that was never touched may be absent:
// it is 0.
func clientMetric(ctx context.Context, m *member, name string) (int64, error) {
	out, err := m.CLI(ctx, "debug", "metrics")
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == name {
			v, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s: metric %s: %v", m.Name(), sc.Text(), err)
			}
			return v, nil
		}
	}
	return 0, nil
}

// probeResult is one attempt of probeFlow.
type probeResult struct {
	start, end time.Time
	err        error // nil: the right text came back
	body       []byte
	// dstLog is the size of the destination's tailscaled log when the
	// attempt started: a denial by its packet filter is logged after it.
	dstLog int64
}

// probeFlow starts an attempt on f every probeEvery from start for window
// (each with a new connection, bounded by probeTimeout) and returns the
// results in the order the attempts started.
func probeFlow(ctx context.Context, f flow, start time.Time, window time.Duration) []probeResult {
	var (
		mu  sync.Mutex
		res []probeResult
		wg  sync.WaitGroup
	)
	tick := time.NewTicker(probeEvery)
	defer tick.Stop()
	for i := 0; time.Since(start) < window; i++ {
		wg.Go(func() {
			var off int64
			if fi, err := os.Stat(f.dst.LogPath()); err == nil {
				off = fi.Size()
			}
			s := time.Now()
			body, err := f.try(ctx, probeTimeout)
			mu.Lock()
			res = append(res, probeResult{start: s, end: time.Now(), err: err, body: body, dstLog: off})
			mu.Unlock()
		})
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
	}
	wg.Wait()
	slices.SortFunc(res, func(x, y probeResult) int { return x.start.Compare(y.start) })
	return res
}

// firstAllowed returns how long after set the first successful attempt
// of f ended, checking that no attempt started after that moment was
// denied, and that some succeeded. An attempt that failed without f's
// destination logging a drop of the flow since it started was lost on
// the way, not denied (on a loaded machine a SYN can be, and the retry
// comes a second later, after the attempt's timeout): it is logged and
// skipped.
func firstAllowed(t *testing.T, f flow, res []probeResult, set time.Time) (time.Duration, error) {
	t.Helper()
	var first time.Time
	for _, r := range res {
		if r.err == nil && (first.IsZero() || r.end.Before(first)) {
			first = r.end
		}
	}
	if first.IsZero() {
		return 0, errors.New("never allowed")
	}
	n := 0
	for _, r := range res {
		if r.start.After(first) {
			switch {
			case r.err == nil:
				n++
			case dropLoggedSince(t, f, r.dstLog):
				return 0, fmt.Errorf("allowed at +%v, denied again in an attempt started at +%v: %v",
					first.Sub(set).Round(time.Millisecond), r.start.Sub(set).Round(time.Millisecond), r.err)
			default:
				t.Logf("%s: the attempt started at +%v failed with no drop logged by %s: lost, not denied: %v",
					f, r.start.Sub(set).Round(time.Millisecond), f.dst.Name(), r.err)
			}
		}
	}
	if n == 0 {
		return 0, fmt.Errorf("no attempt started after the first success at +%v succeeded", first.Sub(set).Round(time.Millisecond))
	}
	return max(first.Sub(set), 0), nil
}

// firstDenied returns how long after set the run of failed attempts that
// lasts until the end of the probe window started, checking that it has a
// few attempts in it and that none of them got a byte.
func firstDenied(res []probeResult, set time.Time) (time.Duration, error) {
	i := len(res)
	for i > 0 && res[i-1].err != nil {
		i--
	}
	if i == len(res) {
		return 0, errors.New("never denied: the last attempt succeeded")
	}
	if n := len(res) - i; n < 5 {
		return 0, fmt.Errorf("denied only in the last %d attempts of the probe window", n)
	}
	for _, r := range res[i:] {
		if len(r.body) > 0 {
			return 0, fmt.Errorf("attempt at +%v failed but got bytes: %q", r.start.Sub(set).Round(time.Millisecond), r.body)
		}
	}
	return max(res[i].start.Sub(set), 0), nil
}

// describeProbes lists probe results relative to set, for failure messages.
func describeProbes(res []probeResult, set time.Time) string {
	var sb strings.Builder
	for _, r := range res {
		verdict := "ok"
		if r.err != nil {
			verdict = "fail: " + r.err.Error()
		}
		fmt.Fprintf(&sb, "  start %+v end %+v %s\n", r.start.Sub(set).Round(time.Millisecond), r.end.Sub(set).Round(time.Millisecond), verdict)
	}
	return sb.String()
}
