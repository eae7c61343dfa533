#!/usr/bin/env bash
# build-tailscale.sh [VERSION] - build the real Tailscale client binaries
# (tailscaled and the tailscale CLI) that tailplane's end-to-end tests run.
#
# VERSION is a tailscale.com module version (default v1.102.5, the version in
# go.mod and the newest release that builds with Go 1.26). The binaries go to
# ${TAILPLANE_TS_BIN:-$HOME/.cache/tailplane/tailscale-VERSION}; if both are
# already there nothing is built. The last line of output is that directory,
# so callers can do BIN=$(scripts/build-tailscale.sh | tail -1).
#
# A cold build takes about 6 minutes on 2 cores. The build runs in a scratch
# directory so that this repository's go.mod does not constrain (or get edited
# by) the tailscale.com module's dependencies.
set -euo pipefail

version=${1:-v1.102.5}
case $version in v*) ;; *) version=v$version ;; esac
bin=${TAILPLANE_TS_BIN:-${HOME:-/root}/.cache/tailplane/tailscale-$version}

if [ -x "$bin/tailscaled" ] && [ -x "$bin/tailscale" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
echo "building tailscale.com/cmd/{tailscaled,tailscale}@$version into $bin ($(go env GOVERSION))" >&2
# Without the -X stamps a module-mode build reports its version as
# "X.Y.Z-ERR-BuildInfo"; control servers only use the capability version, but
# readable versions make client logs easier to follow.
(
  cd "$scratch"
  GOBIN=$bin GOFLAGS=-buildvcs=false go install \
    -ldflags "-X tailscale.com/version.longStamp=${version#v}-tailplane -X tailscale.com/version.shortStamp=${version#v}" \
    "tailscale.com/cmd/tailscaled@$version" "tailscale.com/cmd/tailscale@$version"
)
echo "$bin"
