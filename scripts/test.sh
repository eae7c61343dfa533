#!/usr/bin/env bash
# Runs tailplane's whole test suite: vet, then every Go test with the race
# detector, including the PostgreSQL storage tests and the end-to-end tests
# with real tailscaled clients. It installs what the tests need (Go modules,
# tailscaled built from the pinned tailscale.com module) and says clearly
# what it skips when a service is missing. With CI=true nothing may be
# skipped: a missing service is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

strict=0
if [ "${CI:-}" = "true" ] || [ "${TAILPLANE_STRICT:-}" = "1" ]; then strict=1; fi

echo "== go modules"
go mod download

echo "== tailscaled for the end-to-end tests"
if bin=$(scripts/build-tailscale.sh); then
  export TAILPLANE_TS_BIN="$bin"
  echo "using $bin"
else
  if [ $strict = 1 ]; then echo "FAIL: could not build tailscaled" >&2; exit 1; fi
  echo "SKIP: could not build tailscaled; end-to-end tests with real clients will be skipped"
fi

echo "== PostgreSQL"
export TAILPLANE_TEST_POSTGRES="${TAILPLANE_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test?sslmode=disable}"
pg_up() { command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; }
if ! pg_up && command -v pg_ctlcluster >/dev/null; then
  # The machine's cluster may have stopped; start it the way the machine does.
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start >/dev/null 2>&1 || true
  for _ in $(seq 1 20); do pg_up && break; sleep 0.5; done
fi
if pg_up; then
  echo "PostgreSQL reachable: $TAILPLANE_TEST_POSTGRES"
  export TAILPLANE_REQUIRE_POSTGRES=1
elif [ $strict = 1 ]; then
  echo "FAIL: PostgreSQL not reachable at 127.0.0.1:5432 and CI must not skip its tests" >&2; exit 1
else
  echo "SKIP: PostgreSQL not reachable at 127.0.0.1:5432: its storage tests will be skipped (set TAILPLANE_TEST_POSTGRES)"
fi
if [ $strict = 1 ]; then export TAILPLANE_REQUIRE_REALCLIENTS=1; fi

echo "== go vet"
go vet ./...

echo "== go test -race"
go test -race -count=1 -timeout 60m "$@" ./...
