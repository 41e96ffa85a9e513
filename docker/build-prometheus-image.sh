#!/usr/bin/env bash
# Build a Prometheus image from Debian's `prometheus` package, for a Docker
# engine that cannot pull images (see docker/Dockerfile.prometheus). The base
# image comes from docker/build-base-image.sh (debootstrap), as for
# docker/build-local-image.sh; apt inside the build uses the same mirror.
#
# Usage: docker/build-prometheus-image.sh [TAG]     (default TAG: sluice-prometheus:local)
# Then: docker compose --profile monitoring up -d   (README, "Monitoring")
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TAG=${1:-sluice-prometheus:local}

log() { printf '[build-prometheus-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v docker >/dev/null || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "Docker daemon is not reachable (docker info failed)"

"$ROOT/docker/build-base-image.sh"

# The Dockerfile alone is the build context: it copies nothing in.
CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
cp "$ROOT/docker/Dockerfile.prometheus" "$CTX/Dockerfile"

# No buildx plugin here and the engine is old: use the classic builder.
log "building $TAG (apt-get install prometheus in debian:bookworm-slim)"
DOCKER_BUILDKIT=0 docker build --quiet --force-rm --tag "$TAG" "$CTX" >/dev/null
log "built $TAG"
