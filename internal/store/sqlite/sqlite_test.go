package sqlite

import (
	"bufio"
	"context"
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tailplane/tailplane/internal/store"
	"github.com/tailplane/tailplane/internal/store/storetest"
)

// paths gives each test its database file, so that opening twice with the
// same test reopens the same database.
var paths sync.Map // testing.TB -> string

func openTest(tb testing.TB) store.Store {
	tb.Helper()
	p, _ := paths.LoadOrStore(tb, filepath.Join(tb.TempDir(), "sub", "tailplane.db"))
	s, err := Open(p.(string))
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

// The suite skips its change-log test for a store without one.
var _ storetest.ChangeLog = (*Store)(nil)

func TestStore(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store { return openTest(t) })
}

func BenchmarkApplyBatch(b *testing.B) {
	storetest.BenchmarkApplyBatch(b, openTest)
}

func BenchmarkApplyPresence(b *testing.B) {
	storetest.BenchmarkApplyPresence(b, openTest)
}

func TestOpenCreatesPrivateFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "a", "b")
	path := filepath.Join(dir, "db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for p, want := range map[string]os.FileMode{dir: 0o700 | os.ModeDir, path: 0o600, path + "-wal": 0o600} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode() & (os.ModeDir | os.ModePerm); got&^want != 0 {
			t.Errorf("%s: mode %v, want at most %v", p, got, want)
		}
	}
}

func TestMigrations(t *testing.T) {
	path := filepath.Join(t.TempDir(), "db")
	for range 2 { // the second Open finds the schema current
		s, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	var n, v int
	if err := db.QueryRow("SELECT COUNT(*), MAX(version) FROM schema_migrations").Scan(&n, &v); err != nil {
		t.Fatal(err)
	}
	if n != len(migrations) || v != len(migrations) {
		t.Errorf("schema_migrations has %d rows up to version %d, want %d", n, v, len(migrations))
	}
	// A schema from a newer tailplane is refused, not misread.
	if _, err := db.Exec("INSERT INTO schema_migrations (version, name) VALUES (?, 'future')", len(migrations)+1); err != nil {
		t.Fatal(err)
	}
	db.Close()
	if s, err := Open(path); err == nil || !strings.Contains(err.Error(), "newer") {
		if err == nil {
			s.Close()
		}
		t.Errorf("Open of a newer schema: error %v, want one about a newer version", err)
	}
}

// crashChild names the environment variable that turns the test binary
// into TestCrash's child; its value is the database path.
const crashChild = "TAILPLANE_SQLITE_CRASH_CHILD"

// TestCrash kills a process that is applying batches with SIGKILL and
// checks that every batch it acknowledged survived, and that the batch
// in flight is there whole or not at all.
func TestCrash(t *testing.T) {
	if path := os.Getenv(crashChild); path != "" {
		crashChildMain(path)
		return
	}
	if testing.Short() {
		t.Skip("spawns a child process")
	}
	path := filepath.Join(t.TempDir(), "db")
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrash$")
	cmd.Env = append(os.Environ(), crashChild+"="+path)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Kill mid-burst: after enough acknowledgements that the child is
	// deep in its loop, with a batch in flight.
	const killAfter = 200
	acked := map[uint64]int64{} // batch -> seq
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		var batch uint64
		var seq int64
		if _, err := fmt.Sscanf(sc.Text(), "ack %d %d", &batch, &seq); err != nil {
			continue // test framework output
		}
		acked[batch] = seq
		if len(acked) == killAfter {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Acknowledgements printed before the kill are still read above.
	cmd.Wait()
	if len(acked) < killAfter {
		t.Fatalf("child acknowledged only %d batches", len(acked))
	}

	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	snap, err := s.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	users := map[uint64]bool{}
	for _, u := range snap.Users {
		users[u.ID] = true
	}
	var maxSeq int64
	for batch, seq := range acked {
		if !users[batch] || snap.Settings[strconv.FormatUint(batch, 10)] == nil {
			t.Errorf("acknowledged batch %d (seq %d) is missing", batch, seq)
		}
		maxSeq = max(maxSeq, seq)
	}
	for id := range users {
		if snap.Settings[strconv.FormatUint(id, 10)] == nil {
			t.Errorf("batch %d is half applied", id)
		}
	}
	if snap.ChangeSeq < maxSeq {
		t.Errorf("ChangeSeq %d < last acknowledged seq %d", snap.ChangeSeq, maxSeq)
	}
	t.Logf("%d batches acknowledged, %d on disk", len(acked), len(users))
}

// crashChildMain applies two-mutation batches until it is killed, printing
// each one's number and seq once Apply has returned.
func crashChildMain(path string) {
	s, err := Open(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for batch := uint64(1); ; batch++ {
		seq, err := s.Apply(context.Background(), []store.Mutation{
			{PutUser: storetest.User(batch)},
			{PutSetting: &store.Setting{Key: strconv.FormatUint(batch, 10), Value: []byte(time.Now().String())}},
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		// os.Stdout is unbuffered: the line is in the pipe before the next
		// batch starts.
		fmt.Printf("ack %d %d\n", batch, seq)
	}
}
