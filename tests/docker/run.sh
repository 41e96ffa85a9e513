#!/usr/bin/env bash
# Docker end-to-end test: build the Sluice image (docker/Dockerfile.local, the
# host's release binary), run it with the Kafka port published on 127.0.0.1,
# produce 1000 keyed records with kcat through the published port, consume
# them back and compare exactly; restart the container, then replace it with a
# new one on the same data volume, and check the records survived both.
#
# Fails loudly (non-zero) when Docker is unavailable: it never skips.
# Touches only the container, volume and image tag it creates itself.
#
#   SLUICE_BIN  binary to package (default $CARGO_TARGET_DIR/release/sluice)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/sluice-target}
BIN=${SLUICE_BIN:-$CARGO_TARGET_DIR/release/sluice}
RECORDS=1000
TOPIC=docker-e2e
# Unique per run, so concurrent runs and other users' containers are untouched.
ID="sluice-dockertest-$(date +%s)-$$"
IMAGE="$ID:latest"
CONTAINER="$ID"
VOLUME="$ID-data"
WORK=$(mktemp -d)

log() { printf '[docker-test] %s\n' "$*"; }
fail() {
    printf '[docker-test] FAIL: %s\n' "$*" >&2
    exit 1
}

cleanup() {
    local rc=$?
    if [[ $rc -ne 0 ]] && docker container inspect "$CONTAINER" >/dev/null 2>&1; then
        echo "---- container state ----" >&2
        docker inspect -f '{{json .State}}' "$CONTAINER" >&2 || true
        echo "---- last 50 lines of container logs ----" >&2
        docker logs --tail 50 "$CONTAINER" >&2 || true
    fi
    docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    docker volume rm "$VOLUME" >/dev/null 2>&1 || true
    docker rmi "$IMAGE" >/dev/null 2>&1 || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- preconditions: missing pieces are failures, never skips --------------
command -v docker >/dev/null || fail "docker CLI not found"
if ! docker info >/dev/null 2>&1; then
    # The machine normally starts the daemon before anything runs; if it is
    # down, try once to start it (as root, via its init script) before failing.
    if ((EUID == 0)) && [[ -x /etc/init.d/docker ]]; then
        log "Docker daemon not reachable; trying /etc/init.d/docker start"
        /etc/init.d/docker start >/dev/null 2>&1 || true
        for _ in $(seq 1 30); do
            docker info >/dev/null 2>&1 && break
            sleep 1
        done
    fi
    docker info >/dev/null 2>&1 || fail "Docker daemon is not reachable (docker info failed): the Docker test cannot run"
fi
command -v kcat >/dev/null || fail "kcat not found (apt-get install kcat)"
[[ -x $BIN ]] || fail "no sluice binary at $BIN (cargo build --release -p sluice)"

# ---- the two Dockerfiles must share one runtime stage ---------------------
runtime_stage() {
    # From the runtime FROM to the end, minus comments, blank lines and the
    # one line that differs by design (where the binary comes from).
    sed -n '/^FROM debian:bookworm-slim/,$p' "$1" | grep -v -e '^#' -e '^[[:space:]]*$' -e '^COPY .*sluice /usr/local/bin/sluice$'
}
if ! diff <(runtime_stage "$ROOT/Dockerfile") <(runtime_stage "$ROOT/docker/Dockerfile.local") >"$WORK/stage.diff"; then
    cat "$WORK/stage.diff" >&2
    fail "runtime stages of Dockerfile and docker/Dockerfile.local differ"
fi
log "Dockerfile and docker/Dockerfile.local share the runtime stage"

# ---- build ----------------------------------------------------------------
SLUICE_BIN=$BIN "$ROOT/docker/build-local-image.sh" "$IMAGE" 2>&1 | grep -v -e DEPRECATED -e BuildKit -e 'environment-variable' -e '^$' || true
docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "image $IMAGE was not built"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
KAFKA_PORT=$(free_port)
HTTP_PORT=$(free_port)
AMQP_PORT=$(free_port)
BOOTSTRAP="127.0.0.1:$KAFKA_PORT"

wait_healthy() {
    local deadline=$((SECONDS + 90)) status running
    while ((SECONDS < deadline)); do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$CONTAINER")
        running=$(docker inspect -f '{{.State.Running}}' "$CONTAINER")
        [[ $running == true ]] || fail "container exited (status $(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER"))"
        [[ $status == healthy ]] && return 0
        sleep 1
    done
    fail "container not healthy after 90 s (health: $status)"
}

# ---- run --------------------------------------------------------------------
start_container() {
    docker run -d --name "$CONTAINER" \
        -p "127.0.0.1:$KAFKA_PORT:9092" -p "127.0.0.1:$HTTP_PORT:8080" -p "127.0.0.1:$AMQP_PORT:5672" \
        -v "$VOLUME:/data" \
        -e SLUICE_ADVERTISED_KAFKA_ADDR="$BOOTSTRAP" \
        "$IMAGE" >/dev/null
    log "started $CONTAINER (kafka $BOOTSTRAP, http 127.0.0.1:$HTTP_PORT)"
    wait_healthy
    log "container healthy"
}
docker volume create "$VOLUME" >/dev/null
start_container

uid=$(docker exec "$CONTAINER" id -u)
[[ $uid != 0 ]] || fail "broker runs as root in the container"
docker logs "$CONTAINER" 2>/dev/null | grep -q '^sluice listening kafka=' ||
    fail "broker did not print its 'sluice listening kafka=...' line"

# ---- produce and consume through the published port -------------------------
for i in $(seq 1 "$RECORDS"); do
    printf 'key-%04d:value-%04d-%s\n' "$i" "$i" "the quick brown fox jumps over the lazy dog"
done >"$WORK/expected"

# One partition, explicitly, so the order read back must equal the order sent.
# kcat's producer defaults to acks=all; the topic is created by the broker's
# auto topic creation (default on, one partition) on the first metadata request.
timeout 60 kcat -P -b "$BOOTSTRAP" -t "$TOPIC" -p 0 -K: -l "$WORK/expected" ||
    fail "kcat produce failed"
log "produced $RECORDS records"

consume_and_check() {
    local what=$1
    timeout 60 kcat -C -b "$BOOTSTRAP" -t "$TOPIC" -p 0 -o beginning -e -c "$RECORDS" -q -f '%k:%s\n' \
        >"$WORK/got" || fail "kcat consume failed ($what)"
    local n
    n=$(wc -l <"$WORK/got")
    if ! cmp -s "$WORK/expected" "$WORK/got"; then
        diff "$WORK/expected" "$WORK/got" | head -n 20 >&2 || true
        fail "$what: consumed $n records, content differs from the $RECORDS produced"
    fi
    log "$what: consumed $n records, identical to those produced"
}
consume_and_check "before restart"

# ---- AMQP through the published port: the source article's pika sample --------
PY=${SLUICE_VENV:-/var/tmp/sluice-venv}/bin/python
amqp_sample() { # amqp_sample publish|get
    timeout 60 "$PY" - "$AMQP_PORT" "$1" <<'PYEOF'
import sys, time
import pika
port, action = int(sys.argv[1]), sys.argv[2]
params = pika.ConnectionParameters("localhost", port, "/", pika.PlainCredentials("guest", "guest"))
connection = pika.BlockingConnection(params)
channel = connection.channel()
if action == "publish":
    channel.queue_declare(queue="hello", durable=True)
    channel.confirm_delivery()
    channel.basic_publish(exchange="", routing_key="hello", body="Hello World!",
                          properties=pika.BasicProperties(delivery_mode=2))
else:
    method, _, body = channel.basic_get("hello", auto_ack=True)
    assert body == b"Hello World!", body
connection.close()
PYEOF
}
amqp_sample publish || fail "pika could not publish to the container's AMQP port"
log "AMQP: pika published 'Hello World!' to queue hello"

# ---- restart: records must survive on the volume -------------------------------
docker restart --time 10 "$CONTAINER" >/dev/null
log "restarted $CONTAINER"
wait_healthy
consume_and_check "after restart"
amqp_sample get || fail "the confirmed AMQP message did not survive the restart"
log "AMQP: the confirmed message survived the restart"

# ---- a new container on the same volume: the data lives in /data ------------
docker rm -f "$CONTAINER" >/dev/null
log "removed the container; starting a new one on volume $VOLUME"
start_container
consume_and_check "new container, same volume"

log "PASS"
