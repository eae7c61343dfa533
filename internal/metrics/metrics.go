// Package metrics defines tailplane's Prometheus metrics. They live in one
// place so every package reports under the same names and the metrics
// listener serves one registry.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Registry holds every tailplane metric plus Go runtime and process ones.
var Registry = prometheus.NewRegistry()

var (
	// Registrations counts /machine/register outcomes by result.
	Registrations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tailplane_registrations_total", Help: "Registration requests by result.",
	}, []string{"result"})
	// RegisterSeconds is the latency of successful registrations.
	RegisterSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "tailplane_register_seconds", Help: "Latency of /machine/register.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
	})
	// Sessions is the number of open streaming map sessions.
	Sessions = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "tailplane_map_sessions", Help: "Open streaming map sessions.",
	})
	// MapMessages counts map messages written, by kind (full, delta, keepalive).
	MapMessages = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tailplane_map_messages_total", Help: "Map messages written to clients.",
	}, []string{"kind"})
	// MapBytes counts map bytes written after compression.
	MapBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "tailplane_map_bytes_total", Help: "Map bytes written to clients (after compression).",
	})
	// CommitBatch is the number of requests sharing one transaction.
	CommitBatch = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "tailplane_commit_batch_requests", Help: "Requests per group commit.",
		Buckets: prometheus.ExponentialBuckets(1, 2, 11),
	})
	// CommitSeconds is the duration of one group commit.
	CommitSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "tailplane_commit_seconds", Help: "Duration of one group commit.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
	})
	// ChangeBatch is the number of change events coalesced into one fan-out.
	ChangeBatch = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "tailplane_change_batch_events", Help: "Change events coalesced into one fan-out batch.",
		Buckets: prometheus.ExponentialBuckets(1, 2, 14),
	})
	// CompileSeconds is the duration of a policy compilation.
	CompileSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "tailplane_policy_compile_seconds", Help: "Duration of policy compilation.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18),
	})
	// DeltaSeconds is the time to turn one change batch into session updates.
	DeltaSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "tailplane_delta_build_seconds", Help: "Time to build the session updates of one change batch.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18),
	})
	// QueueMerges counts updates merged into one a session had not sent
	// yet: consecutive private updates, or a full queue folded into one.
	QueueMerges = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "tailplane_session_update_merges_total", Help: "Updates merged into a not-yet-sent update (private ones, or a full session queue).",
	})
	// QueueDepth is how many updates a session's writer found queued when
	// it woke: 1 for a client that keeps up, up to the queue's bound for
	// one that falls behind.
	QueueDepth = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "tailplane_session_queue_depth", Help: "Updates queued for a session when its writer woke.",
		Buckets: []float64{1, 2, 4, 8, 16},
	})
	// JobsLeader is 1 while this process runs the jobs one replica runs
	// for all; a server without replicas always does.
	JobsLeader = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "tailplane_jobs_leader", Help: "1 while this replica runs the jobs one replica runs for all (change-log pruning, taking over crashed replicas' nodes).",
	})
)

func init() {
	Registry.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		Registrations, RegisterSeconds, Sessions, MapMessages, MapBytes,
		CommitBatch, CommitSeconds, ChangeBatch, CompileSeconds, DeltaSeconds, QueueMerges, QueueDepth, JobsLeader,
	)
}
