package control

import (
	"bytes"
	"errors"
	"net"
	"sync"
	"testing"
	"time"
)

// recConn records each write it is given; a write blocks while gate is
// held and fails once fail is set.
type recConn struct {
	net.Conn
	gate   sync.Mutex
	mu     sync.Mutex
	writes [][]byte
	fail   error
	closed bool
}

func (c *recConn) Write(p []byte) (int, error) {
	c.gate.Lock()
	defer c.gate.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fail != nil {
		return 0, c.fail
	}
	c.writes = append(c.writes, bytes.Clone(p))
	return len(p), nil
}

func (c *recConn) SetWriteDeadline(time.Time) error { return nil }
func (c *recConn) Close() error                     { c.mu.Lock(); c.closed = true; c.mu.Unlock(); return nil }

func (c *recConn) got() (writes int, all []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, w := range c.writes {
		all = append(all, w...)
	}
	return len(c.writes), all
}

func frame(i int) []byte { return bytes.Repeat([]byte{byte(i)}, 4096) }

// TestBatchConnCoalesces: frames written while a write is in progress go
// out together in one write, in order.
func TestBatchConnCoalesces(t *testing.T) {
	rc := &recConn{}
	b := newBatchConn(rc)
	defer b.Close()

	rc.gate.Lock() // the first write blocks in the socket
	var want []byte
	for i := range 10 {
		if _, err := b.Write(frame(i)); err != nil {
			t.Fatal(err)
		}
		want = append(want, frame(i)...)
	}
	rc.gate.Unlock()
	waitFor(t, func() bool { _, all := rc.got(); return len(all) == len(want) })
	n, all := rc.got()
	if !bytes.Equal(all, want) {
		t.Fatal("bytes reordered or changed")
	}
	if n > 2 {
		t.Fatalf("10 frames took %d writes; want the first alone and the other 9 together", n)
	}
}

// TestBatchConnBackpressure: a client that does not read holds writers
// back once maxPending bytes wait.
func TestBatchConnBackpressure(t *testing.T) {
	rc := &recConn{}
	b := newBatchConn(rc)
	defer b.Close()
	rc.gate.Lock()
	wrote := make(chan int)
	go func() {
		n := 0
		for range maxPending/4096 + 64 {
			if _, err := b.Write(frame(n)); err != nil {
				break
			}
			n++
		}
		wrote <- n
	}()
	select {
	case n := <-wrote:
		t.Fatalf("%d frames written to a connection that takes none", n)
	case <-time.After(100 * time.Millisecond):
	}
	rc.gate.Unlock()
	if n := <-wrote; n != maxPending/4096+64 {
		t.Fatalf("%d frames written after the client read, want all", n)
	}
}

// TestBatchConnReportsErrors: a failed socket write fails the next Write.
func TestBatchConnReportsErrors(t *testing.T) {
	rc := &recConn{fail: errors.New("connection reset")}
	b := newBatchConn(rc)
	defer b.Close()
	b.Write(frame(0))
	waitFor(t, func() bool {
		_, err := b.Write(frame(1))
		return err != nil && err.Error() == "connection reset"
	})
}

// TestBatchConnCloseFlushes: what is pending when the server closes the
// connection (an HTTP/2 GOAWAY, say) is written before it closes.
func TestBatchConnCloseFlushes(t *testing.T) {
	rc := &recConn{}
	b := newBatchConn(rc)
	rc.gate.Lock()
	b.Write(frame(1))
	b.Write(frame(2))
	go func() { time.Sleep(20 * time.Millisecond); rc.gate.Unlock() }()
	b.Close()
	if _, all := rc.got(); !bytes.Equal(all, append(frame(1), frame(2)...)) {
		t.Fatalf("%d bytes written before close, want 8192", len(all))
	}
	if !rc.closed {
		t.Fatal("underlying connection not closed")
	}
	if _, err := b.Write(frame(3)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("write after close: %v, want net.ErrClosed", err)
	}
}
