package postgres

import (
	"context"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"
)

// freezer is a TCP proxy to PostgreSQL that can cut its connections off
// without closing them, as a network partition does: bytes stop flowing
// and neither end learns anything.
type freezer struct {
	ln     net.Listener
	target string

	mu     sync.Mutex
	frozen bool
	conns  []net.Conn
	thaw   chan struct{} // closed when the test ends
}

func newFreezer(t *testing.T, target string) *freezer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{ln: ln, target: target, thaw: make(chan struct{})}
	t.Cleanup(func() {
		ln.Close()
		close(f.thaw)
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, c := range f.conns {
			c.Close()
		}
	})
	go f.serve()
	return f
}

func (f *freezer) serve() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		if f.frozen { // new connections are cut off too
			f.conns = append(f.conns, c)
			f.mu.Unlock()
			continue
		}
		up, err := net.Dial("tcp", f.target)
		if err != nil {
			f.mu.Unlock()
			c.Close()
			continue
		}
		f.conns = append(f.conns, c, up)
		f.mu.Unlock()
		go f.pipe(c, up)
		go f.pipe(up, c)
	}
}

// pipe copies from src to dst until the proxy freezes; then it holds
// what it read and stops reading, leaving both connections open.
func (f *freezer) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		f.mu.Lock()
		frozen := f.frozen
		f.mu.Unlock()
		if frozen {
			<-f.thaw
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			dst.Close()
			return
		}
	}
}

func (f *freezer) freeze() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.frozen = true
}

// TestPartitionedLeaderStopsLeading: a leader whose connection to
// PostgreSQL stops carrying anything, without failing, stops leading
// within LeadRetry + ConnCheck, well before PostgreSQL would let another
// replica take the lock (about 30 s), and Listen returns so that the
// caller reconnects.
func TestPartitionedLeaderStopsLeading(t *testing.T) {
	retry, check := LeadRetry, ConnCheck
	t.Cleanup(func() { LeadRetry, ConnCheck = retry, check })
	LeadRetry, ConnCheck = 100*time.Millisecond, 500*time.Millisecond

	// The proxy stands between the store and the test database: the
	// schema's DSN with the proxy's address.
	u, err := url.Parse(schemaDSN(t))
	if err != nil || u.Host == "" {
		t.Fatalf("the test database's DSN is not a URL with a host: %v", err)
	}
	target := u.Host
	if u.Port() == "" {
		target += ":5432"
	}
	proxy := newFreezer(t, target)
	u.Host = proxy.ln.Addr().String()
	s, err := Open(context.Background(), u.String())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetReplica("partitioned")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Listen(ctx, func(int64) {}) }()
	for end := time.Now().Add(5 * time.Second); !s.Leading(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the only replica did not lead")
		}
	}

	proxy.freeze()
	frozen := time.Now()
	select {
	case err := <-done:
		if err == nil {
			t.Error("Listen returned nil for a connection cut off")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Listen did not notice its connection was cut off within 5 s")
	}
	if s.Leading() {
		t.Error("the cut-off replica still leads")
	}
	if d := time.Since(frozen); d > LeadRetry+ConnCheck+time.Second {
		t.Errorf("the cut-off leader stopped after %v, want at most LeadRetry + ConnCheck", d)
	}
}
