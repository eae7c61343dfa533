package bench

import (
	"context"
	"errors"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Result is what a run measured. It is meant to be printed as JSON; every
// field is described in docs/benchmarks.md.
type Result struct {
	ServerURL   string    `json:"server_url"`
	Replicas    []string  `json:"replicas,omitempty"`
	Clients     int       `json:"clients"`
	Observers   int       `json:"observers"`
	Concurrency int       `json:"concurrency"`
	StartedAt   time.Time `json:"started_at"`
	WallSeconds float64   `json:"wall_seconds"` // first join to end of hold
	TimedOut    bool      `json:"timed_out"`

	Registered             int     `json:"registered"`
	Streaming              int     `json:"streaming"` // clients whose stream delivered a first map
	StreamsOpenAtEnd       int     `json:"streams_open_at_end"`
	JoinSeconds            float64 `json:"join_seconds"` // until every client joined or failed
	RegistrationsPerSecond float64 `json:"registrations_per_second"`

	ConnectLatency  Latency `json:"connect_latency"`   // TCP + HTTP upgrade + Noise handshake
	RegisterLatency Latency `json:"register_latency"`  // POST /machine/register
	FirstMapLatency Latency `json:"first_map_latency"` // streaming POST /machine/map to its first message

	Convergence Convergence      `json:"convergence"`
	Reconnect   *ReconnectResult `json:"reconnect,omitempty"`
	Redial      *RedialResult    `json:"redial,omitempty"`

	MapMessages int64 `json:"map_messages"`
	MapBytes    int64 `json:"map_bytes"` // on the wire inside Noise: length prefixes + (compressed) bodies

	ErrorCount    int64             `json:"error_count"`
	Errors        map[string]int    `json:"errors"`
	ErrorExamples map[string]string `json:"error_examples,omitempty"` // first full message per kind

	Server *ServerStats `json:"server,omitempty"`
	Tool   ToolStats    `json:"tool"`
}

// Latency summarizes one kind of per-client latency over the clients that
// got that far.
type Latency struct {
	Count int     `json:"count"`
	P50Ms float64 `json:"p50_ms"`
	P95Ms float64 `json:"p95_ms"`
	P99Ms float64 `json:"p99_ms"`
	MaxMs float64 `json:"max_ms"`
}

// Convergence tells whether and when every observer had its expected
// number of peers.
type Convergence struct {
	Converged bool `json:"converged"`
	// Seconds is from the start of the phase (first join, or the reconnect
	// storm) until every observer had its expected peer count.
	Seconds float64 `json:"seconds"`
	// AfterLastSeconds is the same instant relative to the last successful
	// registration (join phase) or the last reconnect (reconnect phase):
	// the pure propagation delay once nobody is joining any more.
	AfterLastSeconds float64          `json:"after_last_seconds"`
	Observers        []ObserverResult `json:"observers"`
}

// ObserverResult is one observer's view at the time of the snapshot.
type ObserverResult struct {
	Client           int     `json:"client"`
	Expected         int     `json:"expected_peers"`
	Peers            int     `json:"peers"`
	Online           int     `json:"online_peers"`
	Converged        bool    `json:"converged"`
	Connected        bool    `json:"connected"`         // stream open at the time of the snapshot
	ConvergedSeconds float64 `json:"converged_seconds"` // since phase start, if converged
	Messages         int64   `json:"messages"`
	FullMaps         int64   `json:"full_maps"` // messages with a non-empty Peers
	KeepAlives       int64   `json:"keep_alives"`
	DecodedBytes     int64   `json:"decoded_bytes"` // JSON after zstd

	convergedAt time.Time
	peersAt     time.Time // when Peers or synced last changed
	synced      bool      // the current stream delivered a message
}

// ReconnectResult describes the reconnect storm (Options.ReconnectAt).
type ReconnectResult struct {
	Clients     int         `json:"clients"`     // streams dropped on purpose
	Reconnected int         `json:"reconnected"` // got a first map on the new stream
	Seconds     float64     `json:"seconds"`     // drop until every reconnect succeeded or failed
	Latency     Latency     `json:"latency"`     // new handshake + streaming map to first message
	Convergence Convergence `json:"convergence"` // relative to the drop

	start time.Time
}

// RedialResult describes the reconnects after unplanned drops (a server
// restart) with Options.Redial.
type RedialResult struct {
	Drops       int64       `json:"drops"`       // streams that ended unexpectedly
	Reconnected int         `json:"reconnected"` // clients that got a first map again
	Failed      int64       `json:"failed"`      // clients that gave up (the run ended first)
	Seconds     float64     `json:"seconds"`     // first drop until the last reconnect
	Latency     Latency     `json:"latency"`     // a client's drop until its new stream's first message
	Convergence Convergence `json:"convergence"` // relative to the first drop
	// Retries are the failed attempts that were retried, by kind (as
	// errors), with the first message of each.
	Retries       map[string]int    `json:"retries,omitempty"`
	RetryExamples map[string]string `json:"retry_examples,omitempty"`
}

// ServerStats are read from /proc for Options.ServerPID.
type ServerStats struct {
	PID        int     `json:"pid"`
	CPUSeconds float64 `json:"cpu_seconds"` // user+system during the run
	// PeakRSSBytes is VmHWM: the high-water mark since the process
	// started, not since the run started.
	PeakRSSBytes int64 `json:"peak_rss_bytes"`
	RSSBytes     int64 `json:"rss_bytes"` // VmRSS with all streams still open
}

// ToolStats is the load generator's own cost, so that its share of the
// machine is known when it runs next to the server.
type ToolStats struct {
	CPUSeconds     float64 `json:"cpu_seconds"`
	CPUMsPerClient float64 `json:"cpu_ms_per_client"`
	RSSBytes       int64   `json:"rss_bytes"`      // with all streams open
	PeakRSSBytes   int64   `json:"peak_rss_bytes"` // since the tool started
	Goroutines     int     `json:"goroutines"`     // with all streams open
}

func (r *runner) fillResult(res *Result) {
	res.Registered = int(r.registered.Load())
	res.Streaming = int(r.streaming.Load())
	res.ConnectLatency = latencyOf(r.connectLat)
	res.RegisterLatency = latencyOf(r.registerLat)
	res.FirstMapLatency = latencyOf(r.firstMapLat)
	if res.Reconnect != nil {
		res.Reconnect.Latency = latencyOf(r.reconnectLat)
		res.Reconnect.Reconnected = res.Reconnect.Latency.Count
	}
	if res.Redial != nil {
		res.Redial.Drops = r.redialDrops.Load()
		res.Redial.Failed = r.redialFailed.Load()
		res.Redial.Latency = latencyOf(r.redialLat)
		res.Redial.Reconnected = res.Redial.Latency.Count
		res.Redial.Retries, res.Redial.RetryExamples = r.retries.snapshot()
		if last := r.lastRedial.Load(); last > 0 {
			res.Redial.Seconds = time.Unix(0, last).Sub(time.Unix(0, r.firstDrop.Load())).Seconds()
		}
	}
	res.MapMessages = r.messages.Load()
	res.MapBytes = r.bytes.Load()
	res.ErrorCount = r.errs.total()
	res.Errors, res.ErrorExamples = r.errs.snapshot()
}

// latencyOf summarizes the non-zero samples with nearest-rank percentiles.
func latencyOf(samples []time.Duration) Latency {
	var s []time.Duration
	for _, d := range samples {
		if d > 0 {
			s = append(s, d)
		}
	}
	if len(s) == 0 {
		return Latency{}
	}
	slices.Sort(s)
	pct := func(p float64) float64 {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		return ms(s[max(i, 0)])
	}
	return Latency{
		Count: len(s),
		P50Ms: pct(0.50),
		P95Ms: pct(0.95),
		P99Ms: pct(0.99),
		MaxMs: ms(s[len(s)-1]),
	}
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/1e3) / 1e3 }

// maxErrorKinds bounds the error map: messages that embed per-client data
// would otherwise make a kind per client.
const maxErrorKinds = 100

// errorCounts counts failures by kind. Errors are rare, so a mutex is fine.
type errorCounts struct {
	n        atomic.Int64
	mu       sync.Mutex
	kinds    map[string]int
	examples map[string]string
}

func (e *errorCounts) add(kind string, err error) {
	e.n.Add(1)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.kinds == nil {
		e.kinds = make(map[string]int)
		e.examples = make(map[string]string)
	}
	if _, ok := e.kinds[kind]; !ok && len(e.kinds) >= maxErrorKinds {
		kind, _, _ = strings.Cut(kind, ":")
		kind += ":other"
	}
	e.kinds[kind]++
	if _, ok := e.examples[kind]; !ok && err != nil {
		e.examples[kind] = truncate(err.Error(), 300)
	}
}

func (e *errorCounts) total() int64 { return e.n.Load() }

func (e *errorCounts) snapshot() (map[string]int, map[string]string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	kinds := make(map[string]int, len(e.kinds))
	for k, v := range e.kinds {
		kinds[k] = v
	}
	examples := make(map[string]string, len(e.examples))
	for k, v := range e.examples {
		examples[k] = v
	}
	return kinds, examples
}

// errnoKinds maps well-known socket error texts to short kinds. Text is
// matched because controlhttp flattens its dial errors into strings.
var errnoKinds = []struct{ text, kind string }{
	{"connection refused", "refused"},
	{"connection reset", "reset"},
	{"broken pipe", "broken_pipe"},
	{"too many open files", "too_many_open_files"},
	{"cannot assign requested address", "no_local_ports"},
	{"i/o timeout", "timeout"},
	{"deadline exceeded", "timeout"},
}

// classify names the kind of a failed operation op, e.g.
// "register_http_500", "register_error:invalid authkey", "map_stream_eof".
func classify(op string, err error) string {
	var he *httpError
	var re *registerError
	switch {
	case errors.As(err, &he):
		return op + "_http_" + strconv.Itoa(he.code)
	case errors.As(err, &re):
		return "register_error:" + truncate(re.msg, 40)
	case errors.Is(err, io.EOF):
		return op + "_eof"
	case errors.Is(err, io.ErrUnexpectedEOF):
		return op + "_unexpected_eof"
	case errors.Is(err, errFirstMapTimeout), errors.Is(err, context.DeadlineExceeded):
		return op + "_timeout"
	case errors.Is(err, errMessageTooLarge):
		return op + "_too_large"
	case errors.Is(err, errDecode):
		return op + "_decode"
	case errors.Is(err, errConnGone):
		return op + "_conn_gone"
	}
	msg := err.Error()
	// controlhttp reports a failed upgrade as "unexpected HTTP response: 404 Not Found".
	if _, rest, ok := strings.Cut(msg, "unexpected HTTP response: "); ok {
		code, _, _ := strings.Cut(rest, " ")
		return op + "_http_" + code
	}
	for _, k := range errnoKinds {
		if strings.Contains(msg, k.text) {
			return op + "_" + k.kind
		}
	}
	return op + "_error:" + truncate(msg, 40)
}

func truncate(s string, n int) string {
	s, _, _ = strings.Cut(s, "\n")
	if len(s) > n {
		s = s[:n]
	}
	return s
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times; it is 100 on
// every Linux architecture Go supports, and reading it properly would need
// cgo (sysconf).
const clockTicks = 100

// readProcCPU returns pid's user+system CPU seconds, or 0 if unavailable.
func readProcCPU(pid int) float64 {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// The command name may contain spaces; fields start after its ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	// f[0] is field 3 (state), so utime (14) and stime (15) are f[11], f[12].
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return float64(utime+stime) / clockTicks
}

// readProcStatusKB returns a "kB" field such as VmRSS from /proc/PID/status,
// or 0 if unavailable. pid 0 means this process.
func readProcStatusKB(pid int, field string) int64 {
	p := "/proc/self/status"
	if pid > 0 {
		p = "/proc/" + strconv.Itoa(pid) + "/status"
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			v, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return v
		}
	}
	return 0
}

func readServerStats(pid int, cpuBefore float64) *ServerStats {
	if pid <= 0 {
		return nil
	}
	return &ServerStats{
		PID:          pid,
		CPUSeconds:   readProcCPU(pid) - cpuBefore,
		PeakRSSBytes: readProcStatusKB(pid, "VmHWM") * 1024,
		RSSBytes:     readProcStatusKB(pid, "VmRSS") * 1024,
	}
}

// selfCPU returns this process's user+system CPU seconds.
func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

func readToolStats(cpuBefore float64, clients int) ToolStats {
	cpu := selfCPU() - cpuBefore
	return ToolStats{
		CPUSeconds:     cpu,
		CPUMsPerClient: cpu * 1e3 / float64(clients),
		RSSBytes:       readProcStatusKB(0, "VmRSS") * 1024,
		PeakRSSBytes:   readProcStatusKB(0, "VmHWM") * 1024,
		Goroutines:     runtime.NumGoroutine(),
	}
}
