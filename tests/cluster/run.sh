#!/usr/bin/env bash
# Fault tests of a three-node Sluice cluster (CI entry point).
#
#   1. unit tests of the history checker (tests/cluster/test_checker.py)
#   2. docker-compose.yml validated by `docker compose config` / `docker-compose config`
#   3. deploy/kubernetes/ validated offline (tests/cluster/validate-k8s.sh)
#   4. the image built from the host's release binary (docker/build-local-image.sh,
#      nothing pulled), the compose cluster started under a project name of its own
#   5. the Jepsen-style scenarios (tests/cluster/jepsen.py): kill / pause / partition
#      the leader, partition a follower or the controller, a bridge (the link between
#      the controller and one node cut) and a one-way link cut (single links are cut
#      with iptables in the containers' network namespaces: root, nsenter and
#      /usr/sbin/iptables on the host), kill all, rolling restart, a fourth node
#      joining, taking over partition 0 and leaving again; each checked for
#      lost, duplicated, reordered or dirty-read records, partitions left unwritable
#      by a bridge and a cut-off controller that still reports healthy
#   6. teardown (`down -v`) even on failure; only this run's project, volumes and
#      image tag are touched
#
# Usage: tests/cluster/run.sh [--soak] [--check-only] [--keep] [--scenarios a,b] [--rounds N]
#   --soak        4x the rounds with longer, varied faults (about 25-30 minutes)
#   --check-only  steps 1-3 only: no Docker cluster
#   --keep        leave the cluster running at the end (then: docker-compose -p NAME down -v)
#
# Environment:
#   CARGO_TARGET_DIR     build cache (default /var/tmp/sluice-target)
#   SLUICE_BIN           the binary to package (default $CARGO_TARGET_DIR/release/sluice;
#                        built with cargo when missing)
#   SLUICE_VENV          Python venv with confluent-kafka (default /var/tmp/sluice-venv;
#                        `bash scripts/test.sh setup` makes it)
#   SLUICE_JEPSEN_OUT    where histories and logs go (default: a fresh /tmp directory)
#   SLUICE_JEPSEN_SEED   random seed of the nemeses
#   SLUICE_JEPSEN_TIMEOUT  hard limit of the scenarios in seconds (default 720, soak 3600)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/sluice-target}
export SLUICE_VENV=${SLUICE_VENV:-/var/tmp/sluice-venv}
export PYTHONDONTWRITEBYTECODE=1
BIN=${SLUICE_BIN:-$CARGO_TARGET_DIR/release/sluice}
PY=$SLUICE_VENV/bin/python

SOAK=0 CHECK_ONLY=0 KEEP=0 SCENARIOS="" ROUNDS=""
while (($#)); do
    case $1 in
    --soak) SOAK=1 ;;
    --check-only) CHECK_ONLY=1 ;;
    --keep) KEEP=1 ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[cluster-test %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() {
    printf '[cluster-test] FAIL: %s\n' "$*" >&2
    exit 1
}

[[ -x $PY ]] || fail "no Python venv at $SLUICE_VENV (run: bash scripts/test.sh setup)"
"$PY" -c 'import confluent_kafka, pytest' 2>/dev/null || fail "confluent-kafka/pytest missing in $SLUICE_VENV (run: bash scripts/test.sh setup)"

# ---- 1. checker unit tests --------------------------------------------------------
log "checker unit tests"
"$PY" -m pytest tests/cluster/test_checker.py -q -p no:cacheprovider

# ---- 2. compose file ------------------------------------------------------------------
command -v docker >/dev/null || fail "docker CLI not found"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE=(docker-compose)
else
    fail "neither 'docker compose' nor 'docker-compose' is installed"
fi
log "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
"${COMPOSE[@]}" -f docker-compose.yml config -q || fail "docker-compose.yml does not validate"
log "docker-compose.yml validates"

# ---- 3. Kubernetes manifests -------------------------------------------------------------
bash tests/cluster/validate-k8s.sh

if ((CHECK_ONLY)); then
    log "PASS (checks only; no cluster started)"
    exit 0
fi

# ---- 4. image and cluster ------------------------------------------------------------------
docker info >/dev/null 2>&1 || fail "Docker daemon is not reachable (docker info failed)"
if [[ ! -x $BIN ]]; then
    log "no release binary at $BIN: cargo build --release -p sluice"
    cargo build --release -p sluice
fi
"$BIN" serve --help | grep -q -- '--cluster-peers' || fail "$BIN has no cluster mode (--cluster-peers)"

PROJECT="sluice-cluster-test-$$"
IMAGE="sluice-cluster-test:$$"
OUT=${SLUICE_JEPSEN_OUT:-$(mktemp -d /tmp/sluice-jepsen.XXXXXX)}
mkdir -p "$OUT"

compose() { SLUICE_IMAGE=$IMAGE "${COMPOSE[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | grep -q .; then
        if ((rc != 0)); then
            log "failure: container logs (tail) below; full logs in $OUT"
            local c
            for c in $(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"); do
                docker logs "$c" >"$OUT/$(docker inspect -f '{{.Name}}' "$c" | tr -d /).log" 2>&1 || true
            done
            compose logs --no-color --tail 40 2>&1 | tail -n 150 || true
        fi
        if ((KEEP)); then
            log "--keep: cluster left running: ${COMPOSE[*]} -p $PROJECT -f docker-compose.yml down -v; docker rmi $IMAGE"
            exit "$rc"
        fi
        # A paused container cannot be stopped.
        for c in $(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter status=paused); do
            docker unpause "$c" >/dev/null 2>&1 || true
        done
        compose down -v --remove-orphans -t 10 >/dev/null 2>&1 || log "warning: compose down failed"
    fi
    docker rmi "$IMAGE" >/dev/null 2>&1 || true
    log "torn down project $PROJECT (histories in $OUT)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "building image $IMAGE from $BIN"
SLUICE_BIN=$BIN "$ROOT/docker/build-local-image.sh" "$IMAGE" 2>&1 |
    grep -v -e DEPRECATED -e BuildKit -e 'environment-variable' -e '^$' || true
docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "image $IMAGE was not built"

# The StatefulSet's start script and ConfigMap in this image: pod sluice-2 must come
# up as node 3, a voter of the TOML's peers, and pod sluice-3 (after `kubectl scale`)
# as node 4, a broker naming its own Raft address; as the non-root user, on a
# read-only root.
k8s_probe() {
    local pod=$1 node=$2 want=$3
    local name="$PROJECT-k8s-probe-$pod" cfg script i
    cfg=$(mktemp -d)
    "$PY" - "$cfg" <<'EOF'
import sys, yaml
cm = yaml.safe_load(open("deploy/kubernetes/configmap.yaml"))
open(f"{sys.argv[1]}/sluice.toml", "w").write(cm["data"]["sluice.toml"])
sts = yaml.safe_load(open("deploy/kubernetes/statefulset.yaml"))
open(f"{sys.argv[1]}/start.sh", "w").write(sts["spec"]["template"]["spec"]["containers"][0]["args"][0])
EOF
    chmod 755 "$cfg"
    chmod 644 "$cfg"/*
    script=$(cat "$cfg/start.sh")
    docker run -d --name "$name" --hostname "$pod" --read-only --user 10001:10001 \
        --tmpfs /data:uid=10001 -v "$cfg:/etc/sluice:ro" --network none \
        -e SLUICE_ADVERTISED_KAFKA_ADDR="$pod.sluice-headless.default.svc.cluster.local:9092" \
        -e SLUICE_REPLICA_ADDR="$pod.sluice-headless.default.svc.cluster.local:9092" \
        --entrypoint bash "$IMAGE" -c "$script" >/dev/null
    local ok=0
    for i in $(seq 1 40); do
        if docker logs "$name" 2>&1 | grep -q "cluster mode node=$node $want.*peers=3"; then
            ok=1
            break
        fi
        sleep 0.25
    done
    ((ok)) || docker logs "$name" 2>&1 | tail -n 20 >&2
    docker rm -f "$name" >/dev/null 2>&1 || true
    rm -rf "$cfg"
    ((ok)) || fail "the StatefulSet's start script did not bring pod $pod up as node $node ($want) in the image"
    log "StatefulSet start script: pod $pod runs as node $node ($want) with the ConfigMap's peers (non-root, read-only root)"
}
k8s_probe sluice-2 3 'role=voter .*advertised=sluice-2.sluice-headless:9093'
k8s_probe sluice-3 4 'role=broker .*advertised=sluice-3.sluice-headless:9093'

# The documented ports when free, otherwise free ones (another cluster on this machine).
read -r -a PORTS <<<"$("$PY" - <<'EOF'
import socket
want = [19092, 19093, 19094, 18081, 18082, 18083, 19095, 18084, 5672, 5673, 5674, 5675]
def free(p):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", p))
            return True
        except OSError:
            return False
if not all(free(p) for p in want):
    socks = [socket.socket() for _ in want]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    want = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
print(" ".join(map(str, want)))
EOF
)"
export SLUICE_KAFKA_PORT_1=${PORTS[0]} SLUICE_KAFKA_PORT_2=${PORTS[1]} SLUICE_KAFKA_PORT_3=${PORTS[2]}
export SLUICE_HTTP_PORT_1=${PORTS[3]} SLUICE_HTTP_PORT_2=${PORTS[4]} SLUICE_HTTP_PORT_3=${PORTS[5]}
export SLUICE_KAFKA_PORTS="${PORTS[0]},${PORTS[1]},${PORTS[2]}" SLUICE_HTTP_PORTS="${PORTS[3]},${PORTS[4]},${PORTS[5]}"
# sluice4 (compose profile "grow") is started by the add-node scenario.
export SLUICE_KAFKA_PORT_4=${PORTS[6]} SLUICE_HTTP_PORT_4=${PORTS[7]}
export SLUICE_AMQP_PORT_1=${PORTS[8]} SLUICE_AMQP_PORT_2=${PORTS[9]} SLUICE_AMQP_PORT_3=${PORTS[10]} SLUICE_AMQP_PORT_4=${PORTS[11]}
export SLUICE_AMQP_PORTS="${PORTS[8]},${PORTS[9]},${PORTS[10]}"
export SLUICE_IMAGE=$IMAGE
export SLUICE_COMPOSE="${COMPOSE[*]} -p $PROJECT -f $ROOT/docker-compose.yml"

log "starting project $PROJECT (kafka $SLUICE_KAFKA_PORTS, http $SLUICE_HTTP_PORTS)"
compose up -d 2>&1 | grep -v -e '^$' || true
[[ $(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l) == 3 ]] ||
    fail "compose did not start three containers"

# ---- 5. scenarios ---------------------------------------------------------------------------
ARGS=(--project "$PROJECT" --out "$OUT")
LIMIT=${SLUICE_JEPSEN_TIMEOUT:-720}
if ((SOAK)); then
    ARGS+=(--soak)
    LIMIT=${SLUICE_JEPSEN_TIMEOUT:-3600}
fi
[[ -n $SCENARIOS ]] && ARGS+=(--scenarios "$SCENARIOS")
[[ -n $ROUNDS ]] && ARGS+=(--rounds "$ROUNDS")
rc=0
timeout --kill-after=30 "$LIMIT" "$PY" -u tests/cluster/jepsen.py "${ARGS[@]}" || rc=$?
if ((rc == 124)); then
    fail "scenarios did not finish within ${LIMIT}s"
elif ((rc != 0)); then
    fail "fault tests failed (exit $rc); histories and logs in $OUT"
fi
log "PASS"
