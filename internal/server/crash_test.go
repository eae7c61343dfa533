package server

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tailplane/tailplane/internal/admin"
	"github.com/tailplane/tailplane/internal/config"
	"github.com/tailplane/tailplane/internal/store/sqlite"
	"github.com/tailplane/tailplane/internal/testclient"
)

// TestServerChild is not a test: it is the server process that
// TestCrashDuringRegistrationBurstLosesNothing starts and kills.
func TestServerChild(t *testing.T) {
	dir := os.Getenv("TAILPLANE_CHILD_DATA_DIR")
	if dir == "" {
		t.Skip("only runs as the crash test's child process")
	}
	cfg := config.Default()
	cfg.DataDir = dir
	cfg.Listen = os.Getenv("TAILPLANE_CHILD_LISTEN")
	cfg.DERP.STUNListen = ""
	cfg.LogLevel = "warn"
	if err := cfg.Finish(); err != nil {
		t.Fatal(err)
	}
	if err := Run(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func startChild(t *testing.T, dir, addr string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestServerChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), "TAILPLANE_CHILD_DATA_DIR="+dir, "TAILPLANE_CHILD_LISTEN="+addr)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if res, err := http.Get("http://" + addr + "/health"); err == nil {
			res.Body.Close()
			return cmd
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("server child did not come up")
	return nil
}

// A kill -9 in the middle of a burst of registrations loses none that
// were acknowledged: every registration answered with success is on disk.
func TestCrashDuringRegistrationBurstLosesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server process")
	}
	dir := t.TempDir()
	addr := freeAddr(t)
	child := startChild(t, dir, addr)
	url := "http://" + addr

	ctx := context.Background()
	ac := admin.NewClient(filepath.Join(dir, "admin.sock"))
	if _, err := ac.CreateUser(ctx, admin.CreateUserRequest{Name: "crash"}); err != nil {
		t.Fatal(err)
	}
	const n = 300
	keys, err := ac.CreateKeys(ctx, admin.CreateKeysRequest{User: "crash", Count: n})
	if err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	acked := map[string]bool{}
	killAt := make(chan struct{})
	var once sync.Once
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	for i, k := range keys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			c, err := testclient.New(rctx, url)
			if err != nil {
				return // the server is gone: nothing was acknowledged
			}
			defer c.Close()
			if _, err := c.Register(rctx, k.Key, fmt.Sprintf("n%d", i)); err != nil {
				return
			}
			mu.Lock()
			acked[c.Node.Public().String()] = true
			if len(acked) == n/3 {
				once.Do(func() { close(killAt) })
			}
			mu.Unlock()
		}()
	}
	<-killAt
	child.Process.Signal(syscall.SIGKILL)
	child.Wait()
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	if len(acked) >= n {
		t.Fatalf("all %d registrations finished before the kill; the test proves nothing", n)
	}
	db, err := sqlite.Open(filepath.Join(dir, "tailplane.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	snap, err := db.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	onDisk := map[string]bool{}
	for _, nd := range snap.Nodes {
		onDisk[nd.NodeKey] = true
	}
	lost := 0
	for k := range acked {
		if !onDisk[k] {
			lost++
		}
	}
	if lost > 0 {
		t.Fatalf("%d of %d acknowledged registrations lost after kill -9", lost, len(acked))
	}
	t.Logf("killed after %d acknowledged registrations; %d nodes on disk, none lost", len(acked), len(snap.Nodes))
}
