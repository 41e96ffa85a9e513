#!/usr/bin/env bash
# Build the Sluice image from a binary built on this host, for a Docker engine
# that cannot pull images (see docker/Dockerfile.local).
#
# Usage: docker/build-local-image.sh [TAG]          (default TAG: sluice:local)
#   SLUICE_BIN  the binary to package (default: $CARGO_TARGET_DIR/release/sluice,
#               CARGO_TARGET_DIR defaulting to ./target)
# Build the binary first: cargo build --release -p sluice
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TAG=${1:-sluice:local}
BIN=${SLUICE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/sluice}

log() { printf '[build-local-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -x $BIN ]] || die "no sluice binary at $BIN (cargo build --release -p sluice, or set SLUICE_BIN)"
command -v docker >/dev/null || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "Docker daemon is not reachable (docker info failed)"

# The binary is dynamically linked against glibc; the image is bookworm, so
# the host must not be newer than bookworm's glibc (2.36).
host_glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
if [[ -n $host_glibc ]] && [[ $(printf '%s\n2.36\n' "$host_glibc" | sort -V | tail -n 1) != 2.36 ]]; then
    die "host glibc $host_glibc is newer than bookworm's 2.36; the binary may not run in the image (use the top-level Dockerfile)"
fi

"$ROOT/docker/build-base-image.sh"

# Stage only the binary as the build context: the target directory is large.
CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
cp "$BIN" "$CTX/sluice"
cp "$ROOT/docker/Dockerfile.local" "$CTX/Dockerfile"

# No buildx plugin here and the engine is old: use the classic builder.
log "building $TAG from $BIN"
DOCKER_BUILDKIT=0 docker build --quiet --force-rm --tag "$TAG" "$CTX" >/dev/null
log "built $TAG"
