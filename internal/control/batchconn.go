package control

import (
	"bufio"
	"net"
	"net/http"
	"sync"
	"time"
)

// batchConn is the client connection under a Noise connection. Noise
// writes each frame of at most 4 KiB with its own write(2), and HTTP/2
// hands it 4 KiB at a time (so a frame and a 19-byte remainder): a full
// map of a large tailnet is hundreds of syscalls, and in a restart storm
// under the 15,000-rule policy those writes were a third of the server's
// CPU. batchConn hands writes to a goroutine that writes whatever has
// accumulated with one syscall: the first frame goes out at once, and the
// frames written while a write is in progress go out together with the
// next. Writes block only while maxPending bytes wait, so a client that
// does not read still holds HTTP/2 back.
type batchConn struct {
	net.Conn
	mu      sync.Mutex
	cond    sync.Cond // signalled when a write finished
	pending []byte
	err     error // first write error, or net.ErrClosed
	wake    chan struct{}
	closing chan struct{}
	done    chan struct{} // closed when the writer goroutine returns
	once    sync.Once
}

const (
	maxPending = 256 << 10
	// batchBufSize is the size of the pooled buffers pending bytes start
	// in; an idle connection holds none.
	batchBufSize = 64 << 10
	// closeFlushTimeout bounds how long Close waits to write what is
	// pending (an HTTP/2 GOAWAY, say) to a client that does not read.
	closeFlushTimeout = time.Second
)

var batchBufs = sync.Pool{New: func() any { b := make([]byte, 0, batchBufSize); return &b }}

func newBatchConn(c net.Conn) *batchConn {
	b := &batchConn{Conn: c, wake: make(chan struct{}, 1), closing: make(chan struct{}), done: make(chan struct{})}
	b.cond.L = &b.mu
	go b.writeLoop()
	return b
}

// Write queues p for the writer goroutine. An error is that of an earlier
// write, as with a socket whose failure shows on a later call.
func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	for b.err == nil && len(b.pending) >= maxPending {
		b.cond.Wait()
	}
	if b.err != nil {
		err := b.err
		b.mu.Unlock()
		return 0, err
	}
	if b.pending == nil {
		b.pending = (*batchBufs.Get().(*[]byte))[:0]
	}
	b.pending = append(b.pending, p...)
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
	return len(p), nil
}

// writeLoop writes what is pending, all at once, until the connection
// fails or is closed.
func (b *batchConn) writeLoop() {
	defer close(b.done)
	for {
		select {
		case <-b.wake:
		case <-b.closing:
			b.flush()
			return
		}
		if !b.flush() {
			return
		}
	}
}

// flush writes the pending bytes and reports whether the connection is
// still good.
func (b *batchConn) flush() bool {
	b.mu.Lock()
	buf := b.pending
	b.pending = nil
	err := b.err
	b.mu.Unlock()
	if err != nil || len(buf) == 0 {
		return err == nil
	}
	_, err = b.Conn.Write(buf)
	if cap(buf) == batchBufSize {
		buf = buf[:0]
		batchBufs.Put(&buf)
	}
	b.mu.Lock()
	if err != nil && b.err == nil {
		b.err = err
	}
	b.cond.Broadcast()
	b.mu.Unlock()
	return err == nil
}

// Close writes what is pending (for at most closeFlushTimeout) and closes
// the connection.
func (b *batchConn) Close() error {
	b.once.Do(func() {
		b.Conn.SetWriteDeadline(time.Now().Add(closeFlushTimeout))
		close(b.closing)
		<-b.done
		b.mu.Lock()
		if b.err == nil {
			b.err = net.ErrClosed
		}
		b.cond.Broadcast()
		b.mu.Unlock()
	})
	return b.Conn.Close()
}

// batchingWriter gives AcceptHTTP a hijacked connection that batches its
// writes (batchConn).
type batchingWriter struct {
	http.ResponseWriter
}

func (w batchingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h, ok := w.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, http.ErrNotSupported
	}
	c, brw, err := h.Hijack()
	if err != nil {
		return nil, nil, err
	}
	return newBatchConn(c), brw, nil
}
