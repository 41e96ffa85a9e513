#!/usr/bin/env bash
# Make the base image `debian:bookworm-slim` available to a Docker engine that
# cannot pull images (no registry is reachable from this machine).
#
# It builds a minimal Debian bookworm root filesystem with debootstrap from the
# Debian mirror apt already uses here, and imports it under the same name the
# user-facing Dockerfile uses, so docker/Dockerfile.local builds unchanged.
#
# Idempotent: does nothing when the image exists. The root filesystem tarball
# is cached (default /var/tmp/sluice-docker) so a re-import is instant.
#
# Usage: docker/build-base-image.sh [--force]
#   SLUICE_BASE_IMAGE   image name to create   (default debian:bookworm-slim)
#   SLUICE_DOCKER_CACHE cache directory         (default /var/tmp/sluice-docker)
#   DEBIAN_MIRROR       mirror URL              (default: from /etc/apt/sources.list*)
set -euo pipefail

IMAGE=${SLUICE_BASE_IMAGE:-debian:bookworm-slim}
CACHE=${SLUICE_DOCKER_CACHE:-/var/tmp/sluice-docker}
SUITE=bookworm
TARBALL="$CACHE/debian-$SUITE-minbase-rootfs.tar"
FORCE=0
[[ ${1:-} == --force ]] && FORCE=1

log() { printf '[build-base-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v docker >/dev/null || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "Docker daemon is not reachable (docker info failed)"

if [[ $FORCE == 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already present; nothing to do"
    exit 0
fi

mkdir -p "$CACHE"
# Serialise concurrent runs (two test runs on one machine): the second waits
# for the first and then finds the image or the tarball ready.
exec 9>"$CACHE/.build-base-image.lock"
flock 9
if [[ $FORCE == 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE appeared while waiting for the lock; nothing to do"
    exit 0
fi

# The mirror apt is configured with here: deb822 "URIs:" lines first (Debian 12
# default), then one-line "deb URL suite ..." entries. Security and third-party
# repositories are skipped: we want the main archive carrying $SUITE.
find_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        # A stanza whose Suites include $SUITE and whose URI is a Debian archive.
        uri=$(awk -v suite="$SUITE" '
            BEGIN { RS=""; FS="\n" }
            {
                u=""; s=0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/)   { u = $i; sub(/^URIs:[ \t]*/, "", u); sub(/[ \t].*/, "", u) }
                    if ($i ~ /^Suites:/ && $i ~ ("[ \t]" suite "([ \t]|$)")) s = 1
                }
                if (s && u ~ /\/debian\/?$/) { print u; exit }
            }' "$f")
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        uri=$(awk -v suite="$SUITE" '$1 == "deb" && $0 !~ /\[/ && $3 == suite { print $2; exit }
                                     $1 == "deb" && $0 ~ /\[/ { for (i = 2; i <= NF; i++) if ($i ~ /\]$/) { if ($(i+2) == suite) { print $(i+1); exit } } }' "$f")
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    echo "http://deb.debian.org/debian"
}

if [[ $FORCE == 1 || ! -s $TARBALL ]]; then
    command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install debootstrap)"
    MIRROR=${DEBIAN_MIRROR:-$(find_mirror)}
    ROOTFS=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf --one-file-system "$ROOTFS"' EXIT
    log "debootstrap --variant=minbase $SUITE from $MIRROR (takes a few minutes)"
    if ! debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 30 "$CACHE/debootstrap.log" >&2
        die "debootstrap failed (full log: $CACHE/debootstrap.log)"
    fi
    # Slim it the way the official -slim image is slimmed: no package caches,
    # no apt lists, no docs/man pages/locales.
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
        "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
        "$ROOTFS"/var/log/*.log "$ROOTFS"/var/cache/debconf/*-old
    find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
    # apt inside the image should use the same mirror the host reaches.
    printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$ROOTFS/etc/apt/sources.list"
    tar --numeric-owner -C "$ROOTFS" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    rm -rf --one-file-system "$ROOTFS"
    trap - EXIT
    log "root filesystem cached at $TARBALL ($(du -h "$TARBALL" | cut -f1))"
else
    log "using cached root filesystem $TARBALL"
fi

docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $SUITE (sluice docker/build-base-image.sh)" \
    "$TARBALL" "$IMAGE" >/dev/null
log "imported $IMAGE"
