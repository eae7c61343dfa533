package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"tailscale.com/tailcfg"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// fakeControlEnv makes the test binary serve as a cheap control server with
// that many synthetic peers in every map, so that TestScale can measure the
// tool's own cost in a process of its own.
const fakeControlEnv = "BENCH_TEST_FAKE_CONTROL_PEERS"

func TestMain(m *testing.M) {
	if v := os.Getenv(fakeControlEnv); v != "" {
		peers, err := strconv.Atoi(v)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", fakeControlEnv, err)
			os.Exit(2)
		}
		serveFakeControl(peers)
		return
	}
	os.Exit(m.Run())
}

// serveFakeControl serves testcontrol with its map logic replaced by one
// fixed map per stream (testcontrol's own maps cost O(N²) to build), and
// prints its URL on stdout.
func serveFakeControl(peers int) {
	first := &tailcfg.MapResponse{}
	for i := range peers {
		a := netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)})
		first.Peers = append(first.Peers, &tailcfg.Node{
			ID:         tailcfg.NodeID(i + 1),
			StableID:   tailcfg.StableNodeID(fmt.Sprintf("peer%d", i)),
			Name:       fmt.Sprintf("peer-%d.example.ts.net.", i),
			Key:        key.NewNode().Public(),
			Machine:    key.NewMachine().Public(),
			DiscoKey:   key.NewDisco().Public(),
			Addresses:  []netip.Prefix{netip.PrefixFrom(a, 32)},
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(a, 32)},
			Online:     new(true),
		})
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctl := &testcontrol.Server{
		Logf:            logger.Discard,
		DERPMap:         &tailcfg.DERPMap{},
		ExplicitBaseURL: "http://" + ln.Addr().String(),
		AltMapStream: func(ctx context.Context, w testcontrol.MapStreamWriter, req *tailcfg.MapRequest) {
			if !req.Stream {
				w.SendMapMessage(&tailcfg.MapResponse{})
				return
			}
			if w.SendMapMessage(first) == nil {
				<-ctx.Done()
			}
		},
	}
	fmt.Println(ctl.ExplicitBaseURL)
	fmt.Fprintln(os.Stderr, http.Serve(ln, ctl))
	os.Exit(1)
}

// TestScale measures the tool's own CPU and memory per simulated client
// against a fake server in another process. It is skipped unless
// BENCH_SCALE_N is set, e.g. BENCH_SCALE_N=10000.
func TestScale(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("BENCH_SCALE_N"))
	if n <= 0 {
		t.Skip("set BENCH_SCALE_N to measure the tool's own cost at scale")
	}
	const peers = 100
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fakeControlEnv+"="+strconv.Itoa(peers))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	url, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("reading fake server URL: %v", err)
	}

	rssBefore := readProcStatusKB(0, "VmRSS") * 1024
	res, err := Run(context.Background(), Options{
		ServerURL:     url[:len(url)-1],
		N:             n,
		AuthKey:       "tskey-auth-unused",
		Observers:     10,
		ExpectedPeers: func(int) int { return peers },
		Hold:          5 * time.Second,
		Timeout:       5 * time.Minute,
		ServerPID:     cmd.Process.Pid,
		Progress:      os.Stderr,
	})
	if err != nil {
		t.Fatal(err)
	}
	j, _ := json.MarshalIndent(res, "", "  ")
	t.Logf("result: %s", j)
	t.Logf("tool: %.3f ms CPU and %.1f KiB RSS per client (%d goroutines for %d clients)",
		res.Tool.CPUMsPerClient, float64(res.Tool.RSSBytes-rssBefore)/1024/float64(n), res.Tool.Goroutines, n)
	if res.Streaming != n || res.ErrorCount != 0 || !res.Convergence.Converged {
		t.Errorf("streaming %d/%d, errors %v, converged %v", res.Streaming, n, res.Errors, res.Convergence.Converged)
	}
}
