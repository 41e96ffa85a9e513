#!/usr/bin/env bash
# The test command: formatting, lints, release build, Rust tests, interop tests
# with real Kafka clients, and the Docker end-to-end test. CI runs exactly this
# (.ci/run). Works on a fresh machine (installs what it needs) and is quick on a
# warm one (caches outside the clone).
#
# Usage: scripts/test.sh [STEP...]
#   STEP is one of: setup docs fmt clippy build unit interop cluster docker faults bench (default: all, in
#   that order). Naming steps runs only those, e.g. `scripts/test.sh setup interop`.
#
# Environment:
#   CARGO_TARGET_DIR   build cache   (default /var/tmp/sluice-target)
#   SLUICE_VENV        Python venv   (default /var/tmp/sluice-venv)
#   SLUICE_PYTHON      interpreter the venv is made from (default python3)
#   PYTEST_ARGS        extra pytest arguments
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/sluice-target}
export SLUICE_VENV=${SLUICE_VENV:-/var/tmp/sluice-venv}
export SLUICE_BIN=$CARGO_TARGET_DIR/release/sluice
export DEBIAN_FRONTEND=noninteractive
export PYTHONDONTWRITEBYTECODE=1
# Rust tests that print backtraces help when CI fails.
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

ALL_STEPS=(setup docs fmt clippy build unit interop cluster docker faults bench)
if (($# > 0)); then STEPS=("$@"); else STEPS=("${ALL_STEPS[@]}"); fi
[[ ${1:-} == --inner ]] && STEPS=()
for s in "${STEPS[@]}"; do
    [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "unknown step '$s' (steps: ${ALL_STEPS[*]})" >&2; exit 2; }
done

STARTED=$SECONDS
TIMES=()

# Run one step with a header, a time limit and its duration; stop at the first
# failure. `timeout` puts the step in its own process group and kills the whole
# group when the limit passes, so a hung broker cannot eat the CI budget.
step() {
    local name=$1 limit=$2
    shift 2
    printf '\n==== [%s] %s ====\n' "$name" "$*"
    local t0=$SECONDS rc=0
    timeout --kill-after=30 "$limit" "$@" || rc=$?
    local dt=$((SECONDS - t0))
    TIMES+=("$(printf '%-8s %5ss' "$name" "$dt")")
    if ((rc != 0)); then
        if ((rc == 124)); then
            printf '\n==== [%s] TIMED OUT after %ss (limit %s) ====\n' "$name" "$dt" "$limit"
        else
            printf '\n==== [%s] FAILED (exit %s) after %ss ====\n' "$name" "$rc" "$dt"
        fi
        summary
        exit "$rc"
    fi
    printf '==== [%s] ok in %ss ====\n' "$name" "$dt"
}

summary() {
    printf '\n---- step durations ----\n'
    printf '%s\n' "${TIMES[@]}"
    printf 'total    %5ss\n' "$((SECONDS - STARTED))"
}

# ---- setup: system packages and the Python venv, idempotent --------------------
# rabbitmq-server: the reference broker the AMQP interop tests also run against;
# librabbitmq-client-java (RabbitMQ's Java client) and amqp-tools (rabbitmq-c's)
# are two more AMQP clients the tests drive.
# g++: librdkafka's test-runner (scripts/librdkafka-tests.sh) has C++ tests.
# chromium, chromium-driver: the web console's browser tests (tests/interop/test_console.py).
# prometheus: the Prometheus server and promtool that tests/interop/test_dashboard.py runs.
APT_PACKAGES=(kcat debootstrap ca-certificates docker-compose rabbitmq-server librabbitmq-client-java amqp-tools g++
    chromium chromium-driver prometheus)

apt_missing() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
    done
}

apt_install() {
    (($# > 0)) || return 0
    echo "installing Debian packages: $*"
    local sudo=()
    ((EUID == 0)) || sudo=(sudo)
    # Other apt users on the machine hold the lock for a while: wait for it.
    local try
    for try in 1 2 3 4 5; do
        if "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq &&
            "${sudo[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "$@" >/dev/null; then
            return 0
        fi
        echo "apt-get failed (attempt $try); retrying in 10 s" >&2
        sleep 10
    done
    return 1
}

setup_python() {
    local py=${SLUICE_PYTHON:-python3}
    # Debian's own python3 needs python3-venv for `-m venv` (ensurepip).
    if ! "$py" -c 'import venv, ensurepip' 2>/dev/null; then
        # shellcheck disable=SC2046 # empty or one package name
        apt_install $(apt_missing python3-venv)
    fi
    # Recreate a venv whose interpreter is gone or broken.
    if [[ -d $SLUICE_VENV ]] && ! "$SLUICE_VENV/bin/python" -c 'import sys' 2>/dev/null; then
        echo "removing broken venv $SLUICE_VENV"
        rm -rf "$SLUICE_VENV"
    fi
    if [[ ! -x $SLUICE_VENV/bin/python ]]; then
        echo "creating venv $SLUICE_VENV with $("$py" --version 2>&1)"
        "$py" -m venv "$SLUICE_VENV"
    fi
    # Reinstall only when a requirements file changed.
    local reqs=(scripts/requirements-test.txt) stamp="$SLUICE_VENV/.sluice-requirements.sha256" want
    [[ -f tests/interop/requirements.txt ]] && reqs+=(tests/interop/requirements.txt)
    want=$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)
    if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
        echo "installing Python packages from ${reqs[*]}"
        local args=() r
        for r in "${reqs[@]}"; do args+=(-r "$r"); done
        "$SLUICE_VENV/bin/python" -m pip install -q --disable-pip-version-check "${args[@]}"
        echo "$want" >"$stamp"
    else
        echo "Python packages up to date in $SLUICE_VENV"
    fi
}

do_setup() {
    local missing
    missing=$(apt_missing "${APT_PACKAGES[@]}")
    if [[ -n $missing ]]; then
        # shellcheck disable=SC2086 # one package per word
        apt_install $missing
    else
        echo "Debian packages present: ${APT_PACKAGES[*]}"
    fi
    # The Java client test runs a single-file program, which needs a JDK's
    # compiler; install one only where none is.
    if ! command -v javac >/dev/null; then
        apt_install default-jdk-headless
    fi
    setup_python
    command -v cargo >/dev/null || { echo "cargo not found" >&2; return 1; }
    cargo --version
    command -v docker >/dev/null || { echo "docker CLI not found" >&2; return 1; }
}

do_unit() {
    # nextest does not run doctests; run them first so the step ends with the
    # main runner's summary.
    cargo test --workspace --doc
    if cargo nextest --version >/dev/null 2>&1; then
        cargo nextest run --workspace --no-fail-fast
    else
        cargo test --workspace --no-fail-fast
    fi
}

do_interop() {
    [[ -x $SLUICE_BIN ]] || { echo "no release binary at $SLUICE_BIN (run the build step)" >&2; return 1; }
    local files
    files=$(find tests/interop -name 'test_*.py' -o -name '*_test.py' 2>/dev/null | head -n 1 || true)
    if [[ -z $files ]]; then
        echo "tests/interop has no test files; nothing to run"
        return 0
    fi
    local rc=0
    # shellcheck disable=SC2086 # PYTEST_ARGS is a list of words
    PATH="$SLUICE_VENV/bin:$PATH" "$SLUICE_VENV/bin/python" -m pytest tests/interop \
        -p no:cacheprovider -ra ${PYTEST_ARGS:-} || rc=$?
    if ((rc == 5)); then
        echo "pytest collected no tests although tests/interop has test files" >&2
    fi
    return "$rc"
}

# A step that is a shell function runs in a fresh copy of this script
# (`--inner NAME`), so `timeout` can limit it like any other command.
if [[ ${1:-} == --inner ]]; then
    "do_$2"
    exit
fi

for s in "${STEPS[@]}"; do
    case $s in
    setup) step setup 30m bash "$ROOT/scripts/test.sh" --inner setup ;;
    docs) step docs 1m bash scripts/supported-apis.sh --check ;;
    fmt) step fmt 5m cargo fmt --all -- --check ;;
    clippy) step clippy 40m cargo clippy --workspace --all-targets -- -D warnings ;;
    # The broker, and the stream engine's example jobs (the golden
    # exactly-once test in tests/interop runs topic_window_count).
    build) step build 40m cargo build --release -p sluice -p sluice-stream --bins --examples ;;
    unit) step unit 40m bash "$ROOT/scripts/test.sh" --inner unit ;;
    # interop-librdkafka: librdkafka's own idempotence and transaction tests
    # against a local three-node cluster; builds librdkafka's test-runner once
    # per version outside the clone (a few minutes), then reuses it.
    interop)
        step interop 40m bash "$ROOT/scripts/test.sh" --inner interop
        step interop-librdkafka 20m bash scripts/librdkafka-tests.sh
        ;;
    # The same interop suite against a three-node cluster (replication factor
    # 3): every "broker" is three local processes in cluster mode, killed and
    # restarted as a whole.
    cluster) step cluster 40m env SLUICE_INTEROP_CLUSTER=1 bash "$ROOT/scripts/test.sh" --inner interop ;;
    docker) step docker 15m bash tests/docker/run.sh ;;
    # Jepsen-style fault tests of the three-node compose cluster (kill, pause,
    # network partitions, kill all, rolling restart); fails on any lost,
    # duplicated or reordered acknowledged write. Bounded; --soak is longer.
    faults) step faults 25m bash tests/cluster/run.sh ;;
    # A smoke run of the comparison suite: proves every part of the benchmark
    # pipeline (sluice bench, the peers, report and charts) still works; no
    # assertion on speed. Results go to a scratch directory.
    bench) step bench 20m bash bench/run.sh --quick ;;
    esac
done

summary
printf 'all steps passed: %s\n' "${STEPS[*]}"
