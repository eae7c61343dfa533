package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tailplane/tailplane/internal/admin"
)

// adminClient connects to the server of the data directory in g.
func adminClient(g *globals) (*admin.Client, error) {
	cfg, err := loadConfig(g)
	if err != nil {
		return nil, err
	}
	return admin.NewClient(cfg.AdminSocket()), nil
}

// adminCall runs fn with a client for the server of the data directory in
// g, bounded in time.
func adminCall(g *globals, fn func(ctx context.Context, c *admin.Client) error) error {
	c, err := adminClient(g)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return fn(ctx, c)
}

// printOut writes v as JSON, or calls table for people.
func printOut(g *globals, v any, table func(w io.Writer)) error {
	switch g.output {
	case "json":
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "table", "":
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		table(tw)
		return tw.Flush()
	}
	return fmt.Errorf("--output %q: want table or json", g.output)
}

func fmtTime(t *time.Time) string {
	if t == nil || t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04")
}

func joinOrDash[T fmt.Stringer](xs []T) string {
	if len(xs) == 0 {
		return "-"
	}
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = x.String()
	}
	return strings.Join(s, ",")
}

func strsOrDash(xs []string) string {
	if len(xs) == 0 {
		return "-"
	}
	return strings.Join(xs, ",")
}
