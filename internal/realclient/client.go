package realclient

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"
)

// Bounds for the waits the harness does on its own behalf. Operations that
// take a context use its deadline, or defaultTimeout when it has none.
const (
	defaultTimeout = 60 * time.Second // per CLI call without a deadline
	readyTimeout   = 30 * time.Second // tailscaled start until LocalAPI answers
	stopTimeout    = 15 * time.Second // SIGTERM until exit, before SIGKILL
	killTimeout    = 10 * time.Second // SIGKILL until the process is reaped
	pollInterval   = 200 * time.Millisecond
	logDumpLines   = 200 // tail of tailscaled's log printed when a test fails
)

// Options configures a client started by Start.
type Options struct {
	// Name labels the client in test output and in its temp directory
	// name, e.g. "n1". Default "ts".
	Name string

	// ControlURL is the control server the client will join. It must be a
	// loopback URL. An http:// URL means the server's DERP is plain HTTP as
	// well, so the client is told to use HTTP for DERP
	// (TS_DEBUG_USE_DERP_HTTP=1); clients assume HTTPS otherwise.
	ControlURL string

	// Binaries to run. The zero value means FindBinaries(); Start skips the
	// test if they are missing.
	Binaries Binaries

	// Env holds extra KEY=VALUE environment entries for tailscaled and the
	// CLI; they override the harness defaults (e.g.
	// "TS_DEBUG_ALWAYS_USE_DERP=1" to force DERP relaying).
	Env []string
}

// Client is one running tailscaled plus the means to drive it with the
// tailscale CLI. Its methods may be called from any goroutine. The process
// is stopped when the test that started it ends.
type Client struct {
	t    testing.TB
	name string
	bins Binaries
	dir  string // state, socket, logs; short, because of the unix socket path limit
	sock string
	env  []string
	log  string // path of tailscaled's combined stdout/stderr, kept across restarts

	mu       sync.Mutex
	proc     *process // current tailscaled, nil when not running
	starts   int
	socks5   string // 127.0.0.1:port of the current process's SOCKS5 proxy
	shutdown bool   // test is over: no restarts, exits are expected
}

// Start starts a tailscaled for the test, waits until its LocalAPI answers and
// registers its shutdown with t.Cleanup. The daemon is not logged in; call
// Up. When the test fails, the tail of the daemon's log is printed. Start
// must be called from the test goroutine.
func Start(t testing.TB, opts Options) *Client {
	t.Helper()
	if err := checkLoopbackURL(opts.ControlURL); err != nil {
		t.Fatalf("realclient: %v", err)
	}
	bins := opts.Binaries
	if bins == (Binaries{}) {
		var err error
		if bins, err = FindBinaries(); err != nil {
			t.Skipf("SKIP: %v", err)
		}
	}
	name := opts.Name
	if name == "" {
		name = "ts"
	}
	// Not t.TempDir(): its path includes the test name and can push the
	// socket path past the 108-byte limit of unix socket addresses.
	dir, err := os.MkdirTemp("", "tprc-"+name+"-")
	if err != nil {
		t.Fatalf("realclient: %v", err)
	}
	c := &Client{
		t:    t,
		name: name,
		bins: bins,
		dir:  dir,
		sock: filepath.Join(dir, "ts.sock"),
		log:  filepath.Join(dir, "tailscaled.log"),
	}
	c.env = clientEnv(dir, opts.ControlURL, opts.Env)
	t.Cleanup(c.cleanup)
	if err := c.start(); err != nil {
		t.Fatalf("realclient %s: %v", name, err)
	}
	return c
}

// clientEnv is the environment of every tailscaled and CLI the harness runs,
// the same as realclients.sh and Tailscale's own integration tests use.
// Nothing in it is specific to any control server.
func clientEnv(dir, controlURL string, extra []string) []string {
	env := append(os.Environ(),
		"TS_NO_LOGS_NO_SUPPORT=true",      // never upload logs to log.tailscale.com
		"TS_DISABLE_PORTMAPPER=1",         // no UPnP/NAT-PMP/PCP probes of the gateway
		"TS_ASSUME_NETWORK_UP_FOR_TEST=1", // else `up` hangs in a netns that has only lo
		"TS_PANIC_IF_HIT_MAIN_CONTROL=1",  // never talk to controlplane.tailscale.com
		"TS_LOGS_DIR="+dir,                // else all daemons share /var/lib/tailscale
		// Any non-loopback HTTP(S) goes to a dead port; Go never proxies
		// loopback URLs, so the control server and DERP are unaffected.
		"HTTP_PROXY=http://127.0.0.1:9", "HTTPS_PROXY=http://127.0.0.1:9",
		"http_proxy=http://127.0.0.1:9", "https_proxy=http://127.0.0.1:9",
		"NO_PROXY=", "no_proxy=",
	)
	if strings.HasPrefix(controlURL, "http://") {
		env = append(env, "TS_DEBUG_USE_DERP_HTTP=1")
	}
	if hasNonLoopbackAddrs() {
		// Otherwise tailscaled advertises the host's interface addresses as
		// endpoints and sends disco pings to them. With this set, endpoints
		// come only from STUN, and a loopback STUN server yields 127.0.0.1.
		env = append(env, "TS_DEBUG_OMIT_LOCAL_ADDRS=1")
	}
	return append(env, extra...) // exec uses the last value of a duplicated key
}

// hasNonLoopbackAddrs reports whether any interface has an address other than
// a loopback one, i.e. whether we are outside a lo-only network namespace.
func hasNonLoopbackAddrs() bool {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return true // assume the worst: omitting local addresses is harmless
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLoopback() {
			return true
		}
	}
	return false
}

// checkLoopbackURL rejects URLs whose host is not a loopback address: the
// harness must never make a client talk to anything off this machine.
func checkLoopbackURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("control URL %q: %w", s, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("control URL %q: want http or https", s)
	}
	if h := u.Hostname(); h != "localhost" {
		if ip := net.ParseIP(h); ip == nil || !ip.IsLoopback() {
			return fmt.Errorf("control URL %q is not a loopback address", s)
		}
	}
	return nil
}

// Name returns the client's label from Options.Name.
func (c *Client) Name() string { return c.name }

// Dir returns the client's private directory (state, socket, logs).
func (c *Client) Dir() string { return c.dir }

// LogPath returns the file that collects tailscaled's output, across restarts.
func (c *Client) LogPath() string { return c.log }

// SOCKS5Addr returns the address (127.0.0.1:port) of the running daemon's
// SOCKS5 proxy. It changes when the daemon restarts.
func (c *Client) SOCKS5Addr() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.socks5
}

// start launches tailscaled and waits until its LocalAPI answers.
func (c *Client) start() error {
	c.mu.Lock()
	if c.proc != nil {
		c.mu.Unlock()
		return errors.New("tailscaled already running")
	}
	if c.shutdown {
		c.mu.Unlock()
		return errors.New("test is over")
	}
	c.starts++
	p, err := startProcess(c.bins.Tailscaled, []string{
		"--tun=userspace-networking",
		"--statedir=" + c.dir,
		"--state=" + filepath.Join(c.dir, "tailscaled.state"),
		"--socket=" + c.sock,
		// Port 0 lets the kernel pick free ports at bind time, so parallel
		// clients (and other tests on the machine) never race for them.
		"--port=0",
		"--socks5-server=127.0.0.1:0",
		"--no-logs-no-support",
	}, c.env, c.log, fmt.Sprintf("realclient %s: start #%d", c.name, c.starts), c.onExit)
	if err != nil {
		c.mu.Unlock()
		return err
	}
	c.proc = p
	c.socks5 = ""
	c.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	var socks5 string
	select {
	case socks5 = <-p.socks5:
	case <-p.exited:
		return fmt.Errorf("tailscaled exited during startup: %v\n%s", p.err, c.logTail(40))
	case <-ctx.Done():
		return fmt.Errorf("tailscaled did not report its SOCKS5 address within %v\n%s", readyTimeout, c.logTail(40))
	}
	c.mu.Lock()
	c.socks5 = socks5
	c.mu.Unlock()
	err = Eventually(ctx, pollInterval, func() error {
		if p.hasExited() {
			return fmt.Errorf("tailscaled exited during startup: %v", p.err)
		}
		_, err := c.Status(ctx)
		return err
	})
	if err != nil {
		return fmt.Errorf("waiting for LocalAPI: %v\n%s", err, c.logTail(40))
	}
	return nil
}

// onExit is called once per tailscaled process when it exits. An exit the
// harness did not ask for (a crash, a panic on a malformed netmap, the
// TS_PANIC_IF_HIT_MAIN_CONTROL trap) fails the test.
func (c *Client) onExit(p *process) {
	c.mu.Lock()
	expected := p.stopping || c.shutdown
	if c.proc == p {
		c.proc, c.socks5 = nil, ""
	}
	c.mu.Unlock()
	if !expected {
		c.t.Errorf("realclient %s: tailscaled exited unexpectedly: %v\n%s", c.name, p.err, c.logTail(60))
	}
}

// stop ends the running tailscaled, if any: gracefully (SIGTERM, then SIGKILL
// after stopTimeout) or with SIGKILL straight away.
func (c *Client) stop(graceful bool) error {
	c.mu.Lock()
	p := c.proc
	if p != nil {
		p.stopping = true
	}
	c.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.stop(graceful)
}

// Kill ends tailscaled with SIGKILL, as a crash or power loss would: it
// cannot log out or tell the control server anything.
func (c *Client) Kill() error { return c.stop(false) }

// Restart stops tailscaled gracefully (SIGTERM) and starts it again on the
// same state, waiting until its LocalAPI answers. The node keeps its keys
// and reconnects to its control server by itself.
func (c *Client) Restart() error { return c.RestartAfter(0) }

// RestartAfter is Restart with tailscaled down for pause in between: long
// enough for the control server to see the node's stream end on its own,
// not coalesced with the reconnect.
func (c *Client) RestartAfter(pause time.Duration) error {
	if err := c.stop(true); err != nil {
		return err
	}
	time.Sleep(pause)
	return c.start()
}

func (c *Client) cleanup() {
	c.mu.Lock()
	c.shutdown = true
	c.mu.Unlock()
	if err := c.stop(true); err != nil {
		c.t.Errorf("realclient %s: %v", c.name, err)
	}
	if c.t.Failed() {
		c.t.Logf("realclient %s: last %d lines of %s:\n%s", c.name, logDumpLines, c.log, c.logTail(logDumpLines))
	}
	os.RemoveAll(c.dir)
}

// logTail returns the last n lines of tailscaled's log.
func (c *Client) logTail(n int) string {
	b, err := os.ReadFile(c.log)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	return tailLines(b, n)
}

// tailLines returns the last n lines of b.
func tailLines(b []byte, n int) string {
	b = bytes.TrimRight(b, "\n")
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == '\n' {
			if n--; n == 0 {
				return string(b[i+1:])
			}
		}
	}
	return string(b)
}

// CLI runs the tailscale CLI against this client's daemon and returns its
// stdout. On failure the error carries the exit status and stderr. Without a
// deadline in ctx the call is bounded by a default timeout.
func (c *Client) CLI(ctx context.Context, args ...string) ([]byte, error) {
	if len(args) == 0 {
		return nil, errors.New("CLI: no arguments")
	}
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bins.Tailscale, append([]string{"--socket=" + c.sock}, args...)...)
	cmd.Env = c.env
	cmd.WaitDelay = 2 * time.Second // bound the wait for output after a kill
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String() + "\n" + stdout.String())
		return stdout.Bytes(), fmt.Errorf("tailscale %s (%s): %w: %s", args[0], c.name, err, msg)
	}
	return stdout.Bytes(), nil
}

// withDefaultTimeout bounds ctx by defaultTimeout unless it has a deadline.
func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, defaultTimeout)
}

// Up logs the client in to loginServer with a pre-auth key, as `tailscale up
// --authkey` does, and returns once the node is Running. MagicDNS and subnet
// routes are not accepted, so nothing on this host is reconfigured. When the
// control server refuses the key, the error contains the CLI's output (which
// carries the server's message).
func (c *Client) Up(ctx context.Context, loginServer, authKey, hostname string) error {
	if err := checkLoopbackURL(loginServer); err != nil {
		return err
	}
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	// Let the CLI give up a little before ctx does, so that a hang ends with
	// its own message ("timeout waiting for ...") rather than a kill.
	deadline, _ := ctx.Deadline()
	wait := max(time.Until(deadline)-2*time.Second, time.Second)
	_, err := c.CLI(ctx, "up",
		"--login-server="+loginServer,
		"--authkey="+authKey,
		"--hostname="+hostname,
		"--accept-dns=false",
		"--accept-routes=false",
		"--timeout="+wait.Round(time.Second).String(),
	)
	return err
}

// Status returns the daemon's status (`tailscale status --json`).
func (c *Client) Status(ctx context.Context) (*ipnstate.Status, error) {
	out, err := c.CLI(ctx, "status", "--json")
	if err != nil {
		return nil, err
	}
	st := new(ipnstate.Status)
	if err := json.Unmarshal(out, st); err != nil {
		return nil, fmt.Errorf("tailscale status --json (%s): %w", c.name, err)
	}
	return st, nil
}

// WaitStatus polls Status until cond returns nil and returns that status. On
// timeout the error carries cond's last complaint. Without a deadline in ctx
// the wait is bounded by a default timeout.
func (c *Client) WaitStatus(ctx context.Context, cond func(*ipnstate.Status) error) (*ipnstate.Status, error) {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	var st *ipnstate.Status
	err := Eventually(ctx, pollInterval, func() error {
		s, err := c.Status(ctx)
		if err != nil {
			return err
		}
		st = s
		return cond(s)
	})
	if err != nil {
		return st, fmt.Errorf("%s: %w", c.name, err)
	}
	return st, nil
}

// WaitPeers waits until the client's netmap has at least n peers that the
// control server reports online, and returns the status that showed it.
func (c *Client) WaitPeers(ctx context.Context, n int) (*ipnstate.Status, error) {
	return c.WaitStatus(ctx, func(st *ipnstate.Status) error {
		if got := len(OnlinePeers(st)); got < n {
			return fmt.Errorf("%d online peers, want >= %d; peers: %s", got, n, DescribePeers(st))
		}
		return nil
	})
}

// OnlinePeers returns the peers in st that the control server reports online.
func OnlinePeers(st *ipnstate.Status) []*ipnstate.PeerStatus {
	var ps []*ipnstate.PeerStatus
	for _, p := range st.Peer {
		if p.Online {
			ps = append(ps, p)
		}
	}
	return ps
}

// DescribePeers summarises st's peers for error messages.
func DescribePeers(st *ipnstate.Status) string {
	if len(st.Peer) == 0 {
		return "none"
	}
	var parts []string
	for _, p := range st.Peer {
		parts = append(parts, fmt.Sprintf("%s%v online=%v", strings.TrimSuffix(p.DNSName, "."), p.TailscaleIPs, p.Online))
	}
	return strings.Join(parts, ", ")
}

// Eventually calls f every interval until it returns nil or ctx is done; then
// it returns an error wrapping f's last error.
func Eventually(ctx context.Context, interval time.Duration, f func() error) error {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("gave up (%v): %w", context.Cause(ctx), err)
		case <-tick.C:
		}
	}
}

// process is one tailscaled run.
type process struct {
	cmd    *exec.Cmd
	death  *os.File    // write end of the TS_PARENT_DEATH_FD pipe
	socks5 chan string // receives the SOCKS5 listen address once
	exited chan struct{}
	err    error // Wait's result, valid after exited is closed

	stopping bool // guarded by Client.mu: the harness asked for this exit
}

// startProcess starts tailscaled with its output appended to logPath (after
// a banner line) and calls onExit from a goroutine when it exits.
func startProcess(bin string, args, env []string, logPath, banner string, onExit func(*process)) (*process, error) {
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(logf, "==== %s %s\n", time.Now().Format(time.RFC3339Nano), banner)
	// tailscaled exits when the read end of this pipe becomes readable,
	// i.e. when the write end closes: if the test binary dies without
	// running its cleanups, the kernel closes it and no daemon is left over.
	deathR, deathW, err := os.Pipe()
	if err != nil {
		logf.Close()
		return nil, err
	}
	p := &process{
		cmd:    exec.Command(bin, args...),
		death:  deathW,
		socks5: make(chan string, 1),
		exited: make(chan struct{}),
	}
	w := &logWriter{f: logf, socks5: p.socks5}
	p.cmd.Env = append(env[:len(env):len(env)], "TS_PARENT_DEATH_FD=3")
	p.cmd.ExtraFiles = []*os.File{deathR}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	// Stop waiting for output shortly after the process is gone, even if a
	// stray child still holds the pipe.
	p.cmd.WaitDelay = 2 * time.Second
	err = p.cmd.Start()
	deathR.Close()
	if err != nil {
		deathW.Close()
		logf.Close()
		return nil, err
	}
	go func() {
		p.err = p.cmd.Wait()
		logf.Close()
		deathW.Close()
		onExit(p)
		close(p.exited)
	}()
	return p, nil
}

func (p *process) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// stop ends the process and waits, bounded, until it is reaped.
func (p *process) stop(graceful bool) error {
	if graceful {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
			return nil
		case <-time.After(stopTimeout):
		}
	}
	p.cmd.Process.Kill()
	select {
	case <-p.exited:
		if graceful {
			return fmt.Errorf("tailscaled ignored SIGTERM for %v; killed", stopTimeout)
		}
		return nil
	case <-time.After(killTimeout):
		return fmt.Errorf("tailscaled (pid %d) not reaped %v after SIGKILL", p.cmd.Process.Pid, killTimeout)
	}
}

// logWriter appends tailscaled's output to its log file and picks out the
// SOCKS5 address that tailscaled logs when it listens on port 0.
type logWriter struct {
	f      *os.File
	socks5 chan<- string
	line   []byte // partial line, until the SOCKS5 address is found
	found  bool
}

func (w *logWriter) Write(b []byte) (int, error) {
	if !w.found {
		w.line = append(w.line, b...)
		for {
			i := bytes.IndexByte(w.line, '\n')
			if i < 0 {
				break
			}
			const marker = "SOCKS5 listening on "
			if j := bytes.Index(w.line[:i], []byte(marker)); j >= 0 {
				w.socks5 <- strings.TrimSpace(string(w.line[j+len(marker) : i]))
				w.found, w.line = true, nil
				break
			}
			w.line = w.line[i+1:]
		}
	}
	return w.f.Write(b)
}
