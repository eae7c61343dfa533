// Package e2e holds tailplane's end-to-end tests: the tailplane binary, built
// once and run as a separate process on loopback, joined by real Tailscale
// clients (see internal/realclient). They run with plain `go test
// ./internal/e2e/` and skip when the client binaries have not been built
// (scripts/build-tailscale.sh), unless TAILPLANE_REQUIRE_REALCLIENTS=1, which
// turns that into a failure (for CI).
package e2e
