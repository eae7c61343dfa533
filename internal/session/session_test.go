package session

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"io"
	"net/netip"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	dto "github.com/prometheus/client_model/go"
	"tailscale.com/tailcfg"
	"tailscale.com/util/zstdframe"

	"github.com/tailplane/tailplane/internal/metrics"
)

// frames records written frames.
type frames struct {
	mu  sync.Mutex
	buf bytes.Buffer
	got chan struct{}
}

func newFrames() *frames { return &frames{got: make(chan struct{}, 100)} }

func (f *frames) Write(b []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.buf.Write(b)
}

func (f *frames) Flush() error {
	f.got <- struct{}{}
	return nil
}

// messages decodes every frame written so far (uncompressed sessions).
func (f *frames) messages(t *testing.T) []tailcfg.MapResponse {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	r := bytes.NewReader(f.buf.Bytes())
	var out []tailcfg.MapResponse
	for {
		var hdr [4]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return out
		}
		b := make([]byte, binary.LittleEndian.Uint32(hdr[:]))
		io.ReadFull(r, b)
		var m tailcfg.MapResponse
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatalf("bad frame %q: %v", b, err)
		}
		out = append(out, m)
	}
}

func (f *frames) wait(t *testing.T, n int) {
	t.Helper()
	for range n {
		select {
		case <-f.got:
		case <-time.After(5 * time.Second):
			t.Fatal("timed out waiting for a frame")
		}
	}
}

func run(t *testing.T, s *Session) *frames {
	f := newFrames()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx, f); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return f
}

func peer(id uint64) json.RawMessage {
	b, _ := json.Marshal(tailcfg.Node{ID: tailcfg.NodeID(id), Name: "p"})
	return b
}

func TestFullMapGoesFirst(t *testing.T) {
	s := New(1, false)
	s.ExpectFull()
	f := run(t, s)
	s.Push(&Update{PeersChanged: map[uint64]json.RawMessage{7: peer(7)}})
	time.Sleep(50 * time.Millisecond) // the writer must hold the delta back
	s.Push(&Update{Full: []Part{{Raw: []byte(`{"Domain":`)}, {Chunk: NewChunk([]byte(`"full"`))}, {Raw: []byte(`}`)}}})
	f.wait(t, 2)
	ms := f.messages(t)
	if len(ms) != 2 || ms[0].Domain != "full" || len(ms[1].PeersChanged) != 1 {
		t.Fatalf("messages: %+v", ms)
	}
}

func TestSlowClientUpdatesMergeIntoOne(t *testing.T) {
	s := New(1, false)
	for i := range uint64(1000) {
		s.Push(&Update{PeersChanged: map[uint64]json.RawMessage{i: peer(i)}})
	}
	s.Push(&Update{PeersRemoved: map[uint64]struct{}{3: {}}})
	s.Push(&Update{Online: map[uint64]bool{5: true}})
	f := run(t, s)
	f.wait(t, 1)
	ms := f.messages(t)
	if len(ms) != 1 {
		t.Fatalf("%d messages, want 1 merged", len(ms))
	}
	m := ms[0]
	if len(m.PeersChanged) != 999 || len(m.PeersRemoved) != 1 || !m.OnlineChange[5] {
		t.Fatalf("merged: %d changed, removed %v, online %v", len(m.PeersChanged), m.PeersRemoved, m.OnlineChange)
	}
	for i := 1; i < len(m.PeersChanged); i++ {
		if m.PeersChanged[i-1].ID >= m.PeersChanged[i].ID {
			t.Fatal("peers not sorted by id")
		}
	}
}

func TestSharedUpdateEncodedOnceAndNotModified(t *testing.T) {
	shared := &Update{PeersChanged: map[uint64]json.RawMessage{1: peer(1)}, Shared: new(Encoded)}
	a, b := New(10, true), New(11, true)
	b.Push(shared)
	b.Push(&Update{PeersChanged: map[uint64]json.RawMessage{2: peer(2)}}) // merges: must copy
	a.Push(shared)
	fa, fb := run(t, a), run(t, b)
	fa.wait(t, 1)
	fb.wait(t, 1)
	if len(shared.PeersChanged) != 1 {
		t.Fatalf("shared update modified by a merge: %d peers", len(shared.PeersChanged))
	}
	if shared.Shared.zstd == nil {
		t.Fatal("shared update was not encoded through its shared encoding")
	}
}

func TestKeepAliveFrameIsValid(t *testing.T) {
	var buf bytes.Buffer
	if _, err := WriteFrame(&buf, keepAliveMsg, false); err != nil {
		t.Fatal(err)
	}
	var m tailcfg.MapResponse
	if err := json.Unmarshal(buf.Bytes()[4:], &m); err != nil || !m.KeepAlive {
		t.Fatalf("keepalive: %v %+v", err, m)
	}
}

// tailscaled ends a map stream after 120 s without a message
// (controlclient's watchdogTimeout).
const clientWatchdog = 120 * time.Second

// TestKeepAliveTiming checks that keep-alives follow 89-100 s of silence,
// well inside the client's watchdog, and fall on whole seconds, so that
// sessions due in the same second fire from one timer wake-up.
func TestKeepAliveTiming(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		for i := range 20 {
			s := New(uint64(i), false)
			f := newFrames()
			go s.Run(ctx, f)
			// Start the silence off the tick grid, after a delta.
			time.Sleep(time.Duration(i) * 37 * time.Millisecond)
			s.Push(&Update{PeersChanged: map[uint64]json.RawMessage{7: peer(7)}})
			<-f.got
			for range 3 {
				last := time.Now()
				<-f.got
				silence := time.Since(last)
				if silence < KeepAliveInterval-keepAliveTick || silence > KeepAliveInterval+keepAliveJitter {
					t.Fatalf("session %d: keep-alive after %v of silence", i, silence)
				}
				if silence > clientWatchdog-20*time.Second {
					t.Fatalf("session %d: %v of silence leaves under 20 s before the client's watchdog", i, silence)
				}
				if time.Now().Nanosecond() != 0 {
					t.Fatalf("session %d: keep-alive at %v, not on a whole second", i, time.Now())
				}
			}
			ms := f.messages(t)
			if len(ms) != 4 || !ms[1].KeepAlive || !ms[3].KeepAlive {
				t.Fatalf("session %d: messages %+v", i, ms)
			}
		}
	})
}

func TestFullMapPartsDecodeAsOneMessage(t *testing.T) {
	chunk := NewChunk([]byte(`,{"ID":2},{"ID":3}`))
	parts := []Part{{Raw: []byte(`{"Peers":[{"ID":1}`)}, {Chunk: chunk}, {Raw: []byte(`]}`)}}
	for _, compress := range []bool{false, true} {
		msg := JoinParts(parts, compress)
		if compress {
			var err error
			if msg, err = zstdframe.AppendDecode(nil, msg); err != nil {
				t.Fatal(err)
			}
		}
		var m tailcfg.MapResponse
		if err := json.Unmarshal(msg, &m); err != nil || len(m.Peers) != 3 {
			t.Fatalf("compress=%v: %v %s", compress, err, msg)
		}
	}
	// The shared chunk was compressed once and is reused as is.
	a, b := JoinParts(parts, true), JoinParts(parts, true)
	if !bytes.Contains(a, chunk.compressed()) || !bytes.Equal(a, b) {
		t.Fatal("chunk frame not spliced")
	}
}

// TestOwnPartFollowsSharedPart: a session's own part of a batch (its
// filter chunks) pushed after the batch's shared part is sent as a second
// message, so the shared one is still encoded once for every session.
func TestOwnPartFollowsSharedPart(t *testing.T) {
	shared := &Update{PeersChanged: map[uint64]json.RawMessage{1: peer(1)}, Shared: new(Encoded)}
	own := func(v string) *Update {
		return &Update{PacketFilters: map[string][]Part{"0000001": {{Raw: []byte(`[{"SrcIPs":["` + v + `"]}]`)}}}}
	}
	a, b := New(10, false), New(11, false)
	a.Push(shared)
	a.Push(own("100.64.0.1"))
	b.Push(shared)
	b.Push(own("100.64.0.2"))
	fa, fb := run(t, a), run(t, b)
	fa.wait(t, 2)
	fb.wait(t, 2)
	for _, f := range []*frames{fa, fb} {
		ms := f.messages(t)
		if len(ms) != 2 || len(ms[0].PeersChanged) != 1 || ms[0].PacketFilters != nil || len(ms[1].PacketFilters["0000001"]) != 1 {
			t.Fatalf("want the shared delta, then the own filter chunk: %+v", ms)
		}
	}
	if got := fb.messages(t)[1].PacketFilters["0000001"][0].SrcIPs[0]; got != "100.64.0.2" {
		t.Fatalf("b's own chunk: %s", got)
	}

	// A later shared update is queued after them as it is.
	c := New(12, false)
	c.Push(shared)
	c.Push(own("100.64.0.3"))
	later := &Update{PeersChanged: map[uint64]json.RawMessage{2: peer(2)}, Shared: new(Encoded)}
	c.Push(later)
	c.Push(own("100.64.0.4"))
	fc := run(t, c)
	fc.wait(t, 4)
	ms := fc.messages(t)
	if len(ms) != 4 || ms[0].PeersChanged[0].ID != 1 || ms[1].PacketFilters["0000001"][0].SrcIPs[0] != "100.64.0.3" ||
		ms[2].PeersChanged[0].ID != 2 || ms[3].PacketFilters["0000001"][0].SrcIPs[0] != "100.64.0.4" {
		t.Fatalf("want shared, own, shared, own in order: %+v", ms)
	}
	if len(shared.PeersChanged) != 1 {
		t.Fatalf("shared update modified by a merge: %d peers", len(shared.PeersChanged))
	}
}

// TestFilterChunkPartsDecode: a filter chunk whose source list is a shared
// chunk decodes, compressed or not, as the rule it stands for, and the
// shared frame is spliced in as compressed once.
func TestFilterChunkPartsDecode(t *testing.T) {
	srcs := NewChunk([]byte(`["100.64.0.1","100.64.0.2"]`))
	rule := []Part{{Raw: []byte(`[{"SrcIPs":`)}, {Chunk: srcs}, {Raw: []byte(`,"DstPorts":[{"IP":"100.64.0.3","Ports":{"First":22,"Last":22}}]}]`)}}
	u := &Update{PacketFilters: map[string][]Part{"00007": rule, "*": nil}}
	parts, err := Encode(u)
	if err != nil {
		t.Fatal(err)
	}
	for _, compress := range []bool{false, true} {
		msg := JoinParts(parts, compress)
		if compress {
			if !bytes.Contains(msg, srcs.compressed()) {
				t.Fatal("source list frame not spliced")
			}
			if msg, err = zstdframe.AppendDecode(nil, msg); err != nil {
				t.Fatal(err)
			}
		}
		var m tailcfg.MapResponse
		if err := json.Unmarshal(msg, &m); err != nil {
			t.Fatalf("compress=%v: %v %s", compress, err, msg)
		}
		r := m.PacketFilters["00007"]
		if len(r) != 1 || len(r[0].SrcIPs) != 2 || r[0].DstPorts[0].IP != "100.64.0.3" {
			t.Fatalf("compress=%v: %s", compress, msg)
		}
		if v, ok := m.PacketFilters["*"]; !ok || v != nil {
			t.Fatalf("compress=%v: reset missing: %s", compress, msg)
		}
	}
}

// TestFullQueueMergesInOrder: a session that falls maxQueue updates behind
// folds them into one merged message, newest winning, and what follows is
// queued after it; the shared updates folded in are not modified.
func TestFullQueueMergesInOrder(t *testing.T) {
	s := New(1, false)
	var shared []*Update
	for i := range uint64(maxQueue + 3) {
		u := &Update{PeersChanged: map[uint64]json.RawMessage{i: peer(i)}, Shared: new(Encoded)}
		shared = append(shared, u)
		s.Push(u)
	}
	s.Push(&Update{PeersRemoved: map[uint64]struct{}{3: {}}})
	before := queueDepthSum(t)
	f := run(t, s)
	f.wait(t, 4)
	if got := queueDepthSum(t) - before; got != 4 {
		t.Errorf("queue depth observed %v, want the writer to find 4 updates", got)
	}
	ms := f.messages(t)
	if len(ms) != 4 {
		t.Fatalf("%d messages, want the merged one, two shared, one own", len(ms))
	}
	if len(ms[0].PeersChanged) != maxQueue+1 || ms[1].PeersChanged[0].ID != maxQueue+1 ||
		ms[2].PeersChanged[0].ID != maxQueue+2 || ms[3].PeersRemoved[0] != 3 {
		t.Fatalf("messages: %+v", ms)
	}
	for _, u := range shared {
		if len(u.PeersChanged) != 1 {
			t.Fatal("a shared update was modified by the merge")
		}
	}
}

func queueDepthSum(t *testing.T) float64 {
	t.Helper()
	var m dto.Metric
	if err := metrics.QueueDepth.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleSum()
}

// countWriter records each Write.
type countWriter struct {
	bytes.Buffer
	writes int
}

func (w *countWriter) Write(p []byte) (int, error) {
	w.writes++
	return w.Buffer.Write(p)
}

func (w *countWriter) Flush() error { return nil }

// TestWritePartsCoalesces: a message of hundreds of ~4 KiB frames (a full
// map's chunks) reaches the writer in a few large writes, a frame larger
// than a write on its own, and the bytes are the length-prefixed message.
func TestWritePartsCoalesces(t *testing.T) {
	var parts []Part
	for i := range 300 {
		j := bytes.Repeat([]byte{'a' + byte(i%26)}, 4000+i)
		if i%2 == 0 {
			parts = append(parts, Part{Chunk: NewChunk(j)})
		} else {
			parts = append(parts, Part{Raw: j})
		}
	}
	parts = append(parts, Part{Raw: bytes.Repeat([]byte{'z'}, 3*writeSize)})
	for _, compress := range []bool{false, true} {
		var w countWriter
		n, err := writeParts(&w, parts, compress)
		if err != nil {
			t.Fatal(err)
		}
		msg := JoinParts(parts, compress)
		want := binary.LittleEndian.AppendUint32(nil, uint32(len(msg)))
		want = append(want, msg...)
		if n != len(want) || !bytes.Equal(w.Bytes(), want) {
			t.Fatalf("compress=%v: wrote %d bytes (returned %d), want the %d-byte message", compress, w.Len(), n, len(want))
		}
		// A write is cut only when the next frame does not fit, so two
		// writes in a row carry more than writeSize.
		if most := 2*len(want)/writeSize + 3; w.writes > most {
			t.Fatalf("compress=%v: %d writes for %d bytes, want at most %d", compress, w.writes, len(want), most)
		}
	}
}

// TestPatchesMerge: private patches of one peer queued before the writer
// runs are merged (newest field wins, older fields kept) and sent as
// encoding/json writes a PeerChange; the shared patch itself is not
// modified.
func TestPatchesMerge(t *testing.T) {
	on := true
	ep := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:41641")}
	first := &Patch{Change: &tailcfg.PeerChange{NodeID: 7, DERPRegion: 1, Endpoints: ep}}
	s := New(10, false)
	s.Push(&Update{Patches: map[uint64]*Patch{7: first}})
	s.Push(&Update{Patches: map[uint64]*Patch{7: {Change: &tailcfg.PeerChange{NodeID: 7, DERPRegion: 2, Online: &on}}, 8: {Change: &tailcfg.PeerChange{NodeID: 8, Online: &on}}}})
	f := run(t, s)
	f.wait(t, 1)
	ms := f.messages(t)
	want, _ := json.Marshal([]tailcfg.PeerChange{{NodeID: 7, DERPRegion: 2, Endpoints: ep, Online: &on}, {NodeID: 8, Online: &on}})
	if len(ms) != 1 {
		t.Fatalf("%d messages, want the merged one", len(ms))
	}
	if got, _ := json.Marshal(ms[0].PeersChangedPatch); !bytes.Equal(got, want) {
		t.Fatalf("patches\n got %s\nwant %s", got, want)
	}
	if first.Change.DERPRegion != 1 || first.Change.Online != nil {
		t.Fatalf("the first patch was modified by the merge: %+v", first.Change)
	}
}

// TestPeerChunksEncodeAsPeersChanged: an update whose peers are shared
// chunks encodes, compressed or not, as the same message as its peers
// listed one by one; merged into a private update, the chunks are dropped
// and its peers listed with the rest.
func TestPeerChunksEncodeAsPeersChanged(t *testing.T) {
	peers := map[uint64]json.RawMessage{}
	for id := uint64(1); id <= 6; id++ {
		peers[id] = peer(id)
	}
	join := func(bare bool, ids ...uint64) *Chunk {
		var b []byte
		for i, id := range ids {
			if i > 0 || !bare {
				b = append(b, ',')
			}
			b = append(b, peers[id]...)
		}
		return NewChunk(b)
	}
	plain := &Update{PeersChanged: peers}
	chunked := &Update{PeersChanged: peers, PeerChunks: []*Chunk{join(true, 1, 2), join(false, 3), join(false, 4, 5, 6)}, Shared: new(Encoded)}
	pp, err := Encode(plain)
	if err != nil {
		t.Fatal(err)
	}
	cp, err := Encode(chunked)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := JoinParts(pp, false), JoinParts(cp, false); !bytes.Equal(a, b) {
		t.Fatalf("chunked peers encode as %s, want %s", b, a)
	}
	msg, err := zstdframe.AppendDecode(nil, JoinParts(cp, true))
	if err != nil || !bytes.Equal(msg, JoinParts(pp, false)) {
		t.Fatalf("compressed: %v %s", err, msg)
	}
	if z := JoinParts(cp, true); !bytes.Contains(z, chunked.PeerChunks[2].compressed()) {
		t.Fatal("peer chunk frame not spliced")
	}

	var merged Update
	merged.merge(chunked)
	merged.merge(&Update{PeersChanged: map[uint64]json.RawMessage{9: peer(9)}})
	if merged.PeerChunks != nil {
		t.Fatal("merge kept the chunks")
	}
	mp, err := Encode(&merged)
	if err != nil {
		t.Fatal(err)
	}
	var m tailcfg.MapResponse
	if err := json.Unmarshal(JoinParts(mp, false), &m); err != nil || len(m.PeersChanged) != 7 {
		t.Fatalf("merged: %v %+v", err, m.PeersChanged)
	}
}
