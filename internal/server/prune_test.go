package server

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/sqlite"
)

// TestPruneChanges: the pruning job deletes change-log entries older than
// it keeps, and only those.
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
	go pruneChanges(ctx, db, 5*time.Millisecond, 0, slog.Default())
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
