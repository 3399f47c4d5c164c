#!/usr/bin/env bash
# Build, test and demo the broker. Runs from any working directory.
#   ./build.sh          release binaries into bin/ (broker, producer, consumer)
#   ./build.sh test     cargo fmt --check, clippy -D warnings, every test
#   ./build.sh demo     a broker, a consumer and a producer, end to end
#   ./build.sh clean    remove build output
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

build() {
    cargo build --release --locked
    mkdir -p bin
    for program in broker producer consumer; do
        cp "target/release/$program" "bin/$program"
    done
    echo "built: bin/broker bin/producer bin/consumer"
}

run_tests() {
    cargo fmt --check
    cargo clippy --locked --all-targets -- -D warnings
    local log
    log="$(mktemp)"
    # Unit tests, then the integration tests in tests/it (no doc tests:
    # the crate's examples are not meant to run).
    cargo test --locked --release --all-targets 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]}
    # One closing line with the totals of every test binary.
    awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
         END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
    rm -f "$log"
    return "$status"
}

demo() {
    build
    dir="$(mktemp -d "${TMPDIR:-/tmp}/mq-demo.XXXXXX")"
    # Keys of our own, from the shell's pid, so the demo never meets
    # another broker's queue.
    key=$(( 0x4d510000 + ($$ % 4096) * 2 ))
    pid=""
    cleanup() {
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" || true; fi
        rm -rf "$dir"
    }
    trap cleanup EXIT
    echo "== starting the broker (files in $dir)"
    bin/broker --port 0 --bind 127.0.0.1 --shm-key "$key" --sem-key "$((key + 1))" \
        --log-file "$dir/broker.log" "$dir/messages.dat" >"$dir/broker.out" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        grep -q '^listening on' "$dir/broker.out" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || { cat "$dir/broker.out"; exit 1; }
        sleep 0.05
    done
    port="$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$dir/broker.out")"
    [ -n "$port" ] || { echo "the broker did not start"; cat "$dir/broker.out"; exit 1; }
    echo "== broker pid $pid listening on 127.0.0.1:$port; its IPC objects:"
    ipcs -m -s | grep -i "$(printf '0x%08x' "$key")\|$(printf '0x%08x' "$((key + 1))")" || true
    echo "== consumer 'demo' waits for 5 messages"
    bin/consumer --port "$port" --id demo --count 5 --verbose >"$dir/consumer.out" &
    consumer=$!
    echo "== producer sends 3 lines from a pipe, then 2 numbered messages"
    printf 'hola mundo\nmensaje: con dos puntos\nthird line\n' | bin/producer --port "$port"
    bin/producer --port "$port" -n 2 -i 100
    wait "$consumer"
    echo "== the consumer printed (id<TAB>content):"
    cat "$dir/consumer.out"
    echo "== broker STATS:"
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    printf 'STATS\nQUIT\n' >&3
    head -n 1 <&3
    exec 3<&- 3>&-
    echo "== stopping the broker with SIGTERM"
    kill -TERM "$pid"
    wait "$pid"
    echo "broker exited with status $?"
    pid=""
    echo "== IPC objects left with our keys (none expected):"
    ipcs -m -s | grep -i "$(printf '0x%08x' "$key")\|$(printf '0x%08x' "$((key + 1))")" || echo "(none)"
    echo "== the messages file after a clean stop (consumed records compacted away):"
    wc -c "$dir/messages.dat"
    echo "== the offsets file:"
    cat "$dir/messages.dat.offsets"
    echo "== the log:"
    cat "$dir/broker.log"
}

case "${1:-}" in
    "") build ;;
    test) run_tests ;;
    demo) demo ;;
    clean) cargo clean; rm -rf bin ;;
    *) echo "usage: ./build.sh [test|demo|clean]" >&2; exit 2 ;;
esac
