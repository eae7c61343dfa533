package e2e

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/tailplane/tailplane/internal/realclient"
)

var (
	// tailplaneBin is the tailplane binary TestMain built for this run.
	tailplaneBin string
	// skipAll, if set, is why every test skips.
	skipAll string
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if testing.Short() {
		skipAll = "SKIP: end-to-end tests do not run with -short"
		return m.Run()
	}
	if _, err := realclient.FindBinaries(); err != nil {
		if os.Getenv("TAILPLANE_REQUIRE_REALCLIENTS") == "1" {
			fmt.Fprintf(os.Stderr, "e2e: %v (and TAILPLANE_REQUIRE_REALCLIENTS=1)\n", err)
			return 1
		}
		skipAll = "SKIP: " + err.Error()
		fmt.Println(skipAll) // once, visible without -v
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "tailplane-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	tailplaneBin = filepath.Join(dir, "tailplane")
	if err := buildTailplane(tailplaneBin); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	return m.Run()
}

// buildTailplane builds ./cmd/tailplane from the repository root into out.
func buildTailplane(out string) error {
	root, err := repoRoot()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/tailplane")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building tailplane: %v\n%s", err, b)
	}
	return nil
}

// repoRoot finds the directory of go.mod above the working directory (the
// package directory, under go test).
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// requireSetup skips the test when TestMain decided that nothing can run.
func requireSetup(t *testing.T) {
	t.Helper()
	if skipAll != "" {
		t.Skip(skipAll)
	}
}
