package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tailplane/tailplane/internal/admin"
	"github.com/tailplane/tailplane/internal/realclient"
)

const (
	serverReadyTimeout = 30 * time.Second // start until /key answers
	serverStopTimeout  = 20 * time.Second // SIGTERM until exit
	cliTimeout         = 30 * time.Second // one admin command
	logDumpLines       = 200              // of the server log, when a test fails
)

// server is one tailplane server process on a fixed loopback port and data
// directory, which can be stopped and started again on both.
type server struct {
	t       *testing.T // the test that owns the process; only for Errorf
	dataDir string
	listen  string   // 127.0.0.1:PORT
	extra   []string // more `serve` flags
	logPath string   // output of every run, appended

	mu       sync.Mutex
	cmd      *exec.Cmd
	exited   chan struct{}
	stopping bool // the test asked for the current process's exit
	starts   int
}

// startServer starts `tailplane serve --data-dir DIR --listen 127.0.0.1:PORT`
// on a new data directory and a free port, plus extraArgs, and waits until
// it answers. It is stopped when the test ends; if the test failed, the tail
// of its log is printed.
func startServer(t *testing.T, extraArgs ...string) *server {
	t.Helper()
	s := newServer(t, extraArgs...)
	s.Start(t)
	return s
}

// newServer is startServer without the start: the server's URL is known
// before it runs (see Start).
func newServer(t *testing.T, extraArgs ...string) *server {
	t.Helper()
	requireSetup(t)
	// Not t.TempDir(): the admin socket lives in the data directory, and a
	// path with the test name in it can exceed the 108-byte limit of unix
	// socket addresses.
	dir, err := os.MkdirTemp("", "tpe2e-")
	if err != nil {
		t.Fatal(err)
	}
	s := &server{
		t:       t,
		dataDir: filepath.Join(dir, "data"),
		listen:  net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t))),
		// STUN on a free port: the default, 3478, would collide between
		// servers of parallel tests.
		extra:   append([]string{"--stun-listen", "127.0.0.1:0"}, extraArgs...),
		logPath: filepath.Join(dir, "tailplane.log"),
	}
	t.Cleanup(func() {
		s.mu.Lock()
		s.stopping = true
		s.mu.Unlock()
		if !s.signalAndWait(syscall.SIGTERM, serverStopTimeout) {
			t.Errorf("tailplane did not exit within %v of SIGTERM; killing it", serverStopTimeout)
			s.signalAndWait(syscall.SIGKILL, 10*time.Second)
		}
		if t.Failed() {
			t.Logf("tailplane server log (last %d lines of %s):\n%s", logDumpLines, s.logPath, s.logTail(logDumpLines))
		}
		os.RemoveAll(dir)
	})
	return s
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago. The
// server's URL is derived from its listen address, so the port must be known
// before it starts; the race with other processes is a few microseconds.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// URL is the control URL clients use.
func (s *server) URL() string { return "http://" + s.listen }

// Start runs the server (again) and waits until GET /key?v=115 answers 200.
// Like every method that takes t, it must be called from t's goroutine; t
// may be a subtest of the test that started the server.
func (s *server) Start(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	if s.cmd != nil {
		s.mu.Unlock()
		t.Fatal("tailplane already running")
	}
	s.starts++
	logf, err := os.OpenFile(s.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		s.mu.Unlock()
		t.Fatal(err)
	}
	fmt.Fprintf(logf, "==== %s e2e: start #%d\n", time.Now().Format(time.RFC3339Nano), s.starts)
	args := append([]string{"serve", "--data-dir", s.dataDir, "--listen", s.listen}, s.extra...)
	cmd := exec.Command(tailplaneBin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = serverProcAttr()
	if err := cmd.Start(); err != nil {
		logf.Close()
		s.mu.Unlock()
		t.Fatal(err)
	}
	exited := make(chan struct{})
	s.cmd, s.exited, s.stopping = cmd, exited, false
	s.mu.Unlock()
	go func() {
		err := cmd.Wait()
		logf.Close()
		s.mu.Lock()
		expected := s.stopping
		s.cmd = nil
		s.mu.Unlock()
		if !expected {
			s.t.Errorf("tailplane exited unexpectedly: %v\n%s", err, s.logTail(40))
		}
		close(exited)
	}()

	ctx, cancel := context.WithTimeout(t.Context(), serverReadyTimeout)
	defer cancel()
	err = realclient.Eventually(ctx, 100*time.Millisecond, func() error {
		select {
		case <-exited:
			return fmt.Errorf("tailplane exited")
		default:
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.URL()+"/key?v=115", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /key: %s", resp.Status)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("tailplane serve did not come up: %v\n%s", err, s.logTail(40))
	}
}

// Stop ends the server gracefully (SIGTERM) and waits for it to exit.
func (s *server) Stop(t *testing.T) {
	t.Helper()
	if !s.halt(syscall.SIGTERM, serverStopTimeout) {
		s.halt(syscall.SIGKILL, 10*time.Second)
		t.Fatalf("tailplane did not exit within %v of SIGTERM\n%s", serverStopTimeout, s.logTail(40))
	}
}

// Kill ends the server with SIGKILL, as a crash or power loss would.
func (s *server) Kill(t *testing.T) {
	t.Helper()
	if !s.halt(syscall.SIGKILL, 10*time.Second) {
		t.Fatal("tailplane not reaped 10s after SIGKILL")
	}
}

// halt marks the exit as expected and signals the server.
func (s *server) halt(sig syscall.Signal, timeout time.Duration) bool {
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
	return s.signalAndWait(sig, timeout)
}

// signalAndWait sends sig to the running server, if any, and reports whether
// it exited within timeout.
func (s *server) signalAndWait(sig syscall.Signal, timeout time.Duration) bool {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.mu.Unlock()
	if cmd == nil {
		return true
	}
	cmd.Process.Signal(sig)
	select {
	case <-exited:
		return true
	case <-time.After(timeout):
		return false
	}
}

func (s *server) logTail(n int) string {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// CLI runs `tailplane --data-dir DIR args...` and returns its stdout; on
// failure the error carries stderr.
func (s *server) CLI(ctx context.Context, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, tailplaneBin, append([]string{"--data-dir", s.dataDir}, args...)...)
	cmd.WaitDelay = 2 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("tailplane %s: %w: %s", strings.Join(args, " "), err,
			strings.TrimSpace(stderr.String()+"\n"+stdout.String()))
	}
	return stdout.Bytes(), nil
}

// mustCLI is CLI that fails t on error.
func (s *server) mustCLI(t *testing.T, args ...string) []byte {
	t.Helper()
	out, err := s.CLI(t.Context(), args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// authKey is the JSON of `keys create --output json`.
type authKey struct {
	Key string   `json:"key"`
	ID  stringID `json:"id"`
}

// stringID accepts a JSON string or number, so the tests depend only on the
// CLI contract ("an id"), not on its JSON type.
type stringID string

func (id *stringID) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		*id = stringID(s)
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("id %s is neither a string nor a number", b)
	}
	*id = stringID(n.String())
	return nil
}

// createKey runs `keys create --user USER [flags] --output json`.
func (s *server) createKey(t *testing.T, user string, flags ...string) authKey {
	t.Helper()
	args := append([]string{"keys", "create", "--user", user}, flags...)
	out := s.mustCLI(t, append(args, "--output", "json")...)
	var k authKey
	if err := json.Unmarshal(out, &k); err != nil || k.Key == "" || k.ID == "" {
		t.Fatalf("keys create: want JSON with key and id, got %q (%v)", out, err)
	}
	return k
}

// node is one element of `nodes list --output json`: the admin API's
// node, read back from the CLI's output.
type node struct{ admin.Node }

func (n node) String() string {
	return fmt.Sprintf("#%d %s (host %s, %v %v, online=%v, connected=%v, elsewhere=%v)",
		n.ID, n.Name, n.Hostname, n.IPv4, n.IPv6, n.Online, n.Connected, n.ConnectedElsewhere)
}

// listNodes runs `nodes list --output json`.
func (s *server) listNodes(ctx context.Context) ([]node, error) {
	out, err := s.CLI(ctx, "nodes", "list", "--output", "json")
	if err != nil {
		return nil, err
	}
	var ns []node
	if err := json.Unmarshal(out, &ns); err != nil {
		return nil, fmt.Errorf("nodes list: %v in %q", err, out)
	}
	return ns, nil
}

// mustListNodes is listNodes that fails t on error.
func (s *server) mustListNodes(t *testing.T) []node {
	t.Helper()
	ns, err := s.listNodes(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return ns
}

// nodeByIP finds the node with IPv4 address ip.
func nodeByIP(ns []node, ip netip.Addr) (node, bool) {
	for _, n := range ns {
		if n.IPv4 == ip {
			return n, true
		}
	}
	return node{}, false
}
