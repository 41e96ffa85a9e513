#!/usr/bin/env bash
# Before/after on one machine in one run: two `sluice` binaries (e.g. the last
# release and a change), measured alternately so both see the same conditions.
#
# Usage: bench/compare.sh BEFORE_BIN AFTER_BIN [ROUNDS]   (default 3 rounds)
#
# Per round and binary, on a fresh single-node data directory:
#   - start-up: time from `sluice serve` to its listening line (polled every
#     millisecond from bash, so an upper bound by a few ms, more on a busy
#     machine), and idle RSS two seconds later (/proc/PID/status VmRSS);
#   - produce 100 B, acks=all, 1 producer, 10 s;
#   - produce 1 KiB, acks=all, 4 producers on 4 partitions, 10 s;
#   - produce 1 KiB, acks=all, 1 producer, 5 s, with each codec in $CODECS
#     (default "gzip snappy lz4 zstd"; the broker walks every record of a
#     compressed batch, so this is where record validation costs most).
# The load generator is AFTER_BIN's `sluice bench` for both, so only the broker
# differs. Not part of the test suite (it measures, it does not check).
set -euo pipefail
BEFORE=${1:?before binary} AFTER=${2:?after binary} ROUNDS=${3:-3}
CODECS=${CODECS-gzip snappy lz4 zstd}
WORK=$(mktemp -d /var/tmp/sluice-compare.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

rate() { python3 -c 'import json,sys; print(round(json.load(sys.stdin)["records_per_sec"]))'; }

run() { # run LABEL BIN
    local label=$1 bin=$2 dir="$WORK/$1-$RANDOM" t0 t1 boot pid rss
    t0=$(date +%s%N)
    "$bin" serve --data-dir "$dir" --kafka-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 --amqp-addr 127.0.0.1:0 \
        >"$dir.out" 2>/dev/null &
    pid=$!
    until grep -q listening "$dir.out" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "$label: serve exited" >&2; return 1; }
        sleep 0.001
    done
    t1=$(date +%s%N)
    sleep 2
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    boot=$(sed -n 's/.*kafka=\([^ ]*\).*/\1/p' "$dir.out")
    local one four
    one=$("$AFTER" bench produce --bootstrap "$boot" --topic p1 --partitions 1 \
        --record-size 100 --acks all --duration 10 --json | rate)
    four=$("$AFTER" bench produce --bootstrap "$boot" --topic p4 --partitions 4 --producers 4 \
        --record-size 1024 --acks all --duration 10 --json | rate)
    local codecs="" codec r
    for codec in $CODECS; do
        r=$("$AFTER" bench produce --bootstrap "$boot" --topic "c-$codec" --partitions 1 \
            --record-size 1024 --acks all --compression "$codec" --duration 5 --json | rate)
        codecs+=" produce_1KiB_$codec=$r"
    done
    printf '%-6s ready_ms=%-6s idle_rss_kib=%-6s produce_100B_1p=%-9s produce_1KiB_4p=%s%s\n' \
        "$label" "$(((t1 - t0) / 1000000))" "$rss" "$one" "$four" "$codecs"
    kill "$pid"
    wait "$pid" || true
    rm -rf "$dir" "$dir.out"
}

for _ in $(seq "$ROUNDS"); do
    run before "$BEFORE"
    run after "$AFTER"
done
