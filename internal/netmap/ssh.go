package netmap

import (
	"encoding/json"

	"tailscale.com/tailcfg"
)

// sshEncoder writes SSH policies from rules encoded once. The compiler
// shares a rule among every class that receives it and replaces it (a new
// pointer, never changed in place) when a join changes it. A rule from
// autogroup:member lists thousands of principals, and encoding each changed
// class's whole policy with encoding/json was a tenth of a join's fan-out
// under the generated 15,000-rule policy.
type sshEncoder struct {
	rules map[*tailcfg.SSHRule]*sshRuleEnc
	// gen counts sweeps; a rule not used since the previous sweep goes.
	gen uint64
}

type sshRuleEnc struct {
	json []byte
	lastUse
}

func newSSHEncoder() *sshEncoder { return &sshEncoder{rules: map[*tailcfg.SSHRule]*sshRuleEnc{}} }

// sweep drops the rules not used since the previous sweep: those a join
// replaced are no longer asked for.
func (se *sshEncoder) sweep() {
	se.gen++
	sweepUnused(se.rules, se.gen)
}

// encode returns the policy as encoding/json writes it (nil as an empty
// policy, which clients need to drop the rules they hold).
func (se *sshEncoder) encode(p *tailcfg.SSHPolicy) []byte {
	if p == nil || p.Rules == nil {
		return []byte(`{"rules":null}`)
	}
	size := len(`{"rules":[]}`)
	encs := make([][]byte, len(p.Rules))
	for i, r := range p.Rules {
		encs[i] = se.rule(r)
		size += len(encs[i]) + 1
	}
	b := make([]byte, 0, size)
	b = append(b, `{"rules":[`...)
	for i, enc := range encs {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, enc...)
	}
	return append(b, "]}"...)
}

func (se *sshEncoder) rule(r *tailcfg.SSHRule) []byte {
	if r == nil {
		return []byte("null")
	}
	re := se.rules[r]
	if re == nil {
		// An SSHRule has no field encoding/json can fail on.
		b, _ := json.Marshal(r)
		re = &sshRuleEnc{json: b}
		se.rules[r] = re
	}
	re.used = se.gen
	return re.json
}
