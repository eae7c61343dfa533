package policy_test

import (
	"bytes"
	"sync"
	"testing"

	"github.com/tailplane/tailplane/internal/policy"
	"github.com/tailplane/tailplane/internal/policy/policygen"
)

var benchData = sync.OnceValues(func() ([]byte, struct {
	users []policy.User
	nodes []policy.Node
}) {
	pol, users, nodes := policygen.Generate(policygen.Default())
	return pol, struct {
		users []policy.User
		nodes []policy.Node
	}{users, nodes}
})

// BenchmarkCompile15K parses and compiles a 15,000-rule policy over 10,000
// nodes.
func BenchmarkCompile15K(b *testing.B) {
	src, tn := benchData()
	p, err := policy.Parse(src)
	if err != nil {
		b.Fatal(err)
	}
	c, err := p.Compile(tn.users, tn.nodes)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		p, err := policy.Parse(src)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.Compile(tn.users, tn.nodes); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(c.NumClasses()), "classes")
}

// BenchmarkRecompileOneRuleEdit applies a one-rule edit (a protocol change) and
// recompiles.
func BenchmarkRecompileOneRuleEdit(b *testing.B) {
	src, tn := benchData()
	edited := bytes.Replace(src, []byte(`"proto":"udp"`), []byte(`"proto":"tcp"`), 1)
	if bytes.Equal(edited, src) {
		b.Fatal("edit did not apply")
	}
	b.ReportAllocs()
	for b.Loop() {
		p, err := policy.Parse(edited)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.Compile(tn.users, tn.nodes); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAddNodeTo15K adds one node at a time, with AddNodes, to the
// 15,000-rule policy compiled over 9,000 of the generated nodes: the cost
// of one join into a large tailnet without recompiling. Each iteration adds
// the next of the last 1,000 nodes; run it with -benchtime up to 1000x.
func BenchmarkAddNodeTo15K(b *testing.B) {
	src, tn := benchData()
	p, err := policy.Parse(src)
	if err != nil {
		b.Fatal(err)
	}
	const base = 9000
	c, err := p.Compile(tn.users, tn.nodes[:base])
	if err != nil {
		b.Fatal(err)
	}
	var changed int
	b.ReportAllocs()
	i := base
	for b.Loop() {
		if i == len(tn.nodes) {
			b.Fatalf("only %d nodes to add: use -benchtime %dx or less", len(tn.nodes)-base, len(tn.nodes)-base)
		}
		ch, ok := c.AddNodes(tn.nodes[i : i+1])
		if !ok {
			b.Fatalf("node %d needed a full compile", tn.nodes[i].ID)
		}
		changed += len(ch)
		i++
	}
	b.ReportMetric(float64(changed)/float64(i-base), "changed-classes/op")
}
