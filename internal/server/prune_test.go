package server

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/sqlite"
)

// TestPruneChanges: the pruning job of the leading replica deletes
// change-log entries older than it keeps, and only those; a replica that
// does not lead prunes nothing.
func TestPruneChanges(t *testing.T) {
	db, err := sqlite.Open(filepath.Join(t.TempDir(), "tp.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var seqs []int64
	for _, name := range []string{"a", "b", "c"} {
		seq, err := db.Apply(ctx, []store.Mutation{{PutSetting: &store.Setting{Key: name, Value: []byte{1}}}})
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, seq)
	}
	var leading atomic.Bool
	go pruneChanges(ctx, db, leading.Load, 5*time.Millisecond, 0, slog.Default())
	// Another replica leads: this one prunes nothing.
	time.Sleep(50 * time.Millisecond)
	if changes, err := db.ChangesSince(ctx, 0); err != nil || len(changes) != 3 {
		t.Fatalf("while another replica leads, ChangesSince(0) = %d entries, %v; want all 3", len(changes), err)
	}
	leading.Store(true)
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := db.ChangesSince(ctx, 0)
		if errors.Is(err, store.ErrPruned) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the change log was not pruned: ChangesSince(0) = %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// The newest entry stays, and a follower that read it goes on.
	if rest, err := db.ChangesSince(ctx, seqs[1]); err != nil || len(rest) != 1 || rest[0].Seq != seqs[2] {
		t.Errorf("after pruning, ChangesSince(%d) = %+v, %v; want the newest entry", seqs[1], rest, err)
	}
}
