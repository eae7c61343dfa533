// Package realclient runs real, unmodified Tailscale clients (tailscaled and
// the tailscale CLI) on this machine for end-to-end tests of a control server.
//
// It is the Go form of the shared realclients.sh reference script: every
// daemon runs in userspace-networking mode with its own state directory,
// LocalAPI socket, UDP port and SOCKS5 proxy, with an environment that keeps
// all of its traffic on loopback (see clientEnv). Tests drive the clients
// through the tailscale CLI, exactly as a user would, and reach other nodes'
// services through a client's SOCKS5 proxy.
//
// The binaries are built by scripts/build-tailscale.sh; see FindBinaries.
package realclient

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// DefaultVersion is the tailscale.com release whose binaries the harness
// runs unless TAILPLANE_TS_BIN says otherwise. It must match the tailscale.com
// version in go.mod (a test checks this) and the default of
// scripts/build-tailscale.sh.
const DefaultVersion = "v1.102.5"

// ErrNoBinaries is returned (wrapped) by FindBinaries when tailscaled or the
// tailscale CLI has not been built.
var ErrNoBinaries = errors.New("tailscaled not built; run scripts/build-tailscale.sh")

// Binaries locates one build of the Tailscale client.
type Binaries struct {
	Dir        string // directory holding both binaries
	Tailscaled string // path of tailscaled
	Tailscale  string // path of the tailscale CLI
}

// FindBinaries returns the client binaries in $TAILPLANE_TS_BIN or, if that
// is unset, in $HOME/.cache/tailplane/tailscale-<DefaultVersion> (where
// scripts/build-tailscale.sh puts them). The error wraps ErrNoBinaries if
// either binary is missing.
func FindBinaries() (Binaries, error) {
	dir := os.Getenv("TAILPLANE_TS_BIN")
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return Binaries{}, fmt.Errorf("locating tailscaled: %w", err)
		}
		dir = filepath.Join(home, ".cache", "tailplane", "tailscale-"+DefaultVersion)
	}
	b := Binaries{
		Dir:        dir,
		Tailscaled: filepath.Join(dir, "tailscaled"),
		Tailscale:  filepath.Join(dir, "tailscale"),
	}
	for _, p := range []string{b.Tailscaled, b.Tailscale} {
		fi, err := os.Stat(p)
		if err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return Binaries{}, fmt.Errorf("%w (no executable %s)", ErrNoBinaries, p)
		}
	}
	return b, nil
}
