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
