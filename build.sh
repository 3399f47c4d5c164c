#!/usr/bin/env bash
# Build, test and demo the broker. Runs from any working directory.
#   ./build.sh          release binaries into bin/ (broker, producer, consumer)
#   ./build.sh install [FROM [TO]]  copy built binaries (target/release) into
#                       bin/ atomically, without building
#   ./build.sh test     cargo fmt --check, clippy -D warnings, every test
#   ./build.sh demo     a broker, a consumer and a producer, end to end
#   ./build.sh bench    throughput, latency and memory figures (docs/performance.md);
#                       bench --backlog [--count N]: P of 1M with no consumer, and a backlog of
#                       10M messages (RSS filling, after restart, draining; restart time; drain rate);
#                       bench --forward [--pin]: the NATS forwarder against JetStream's own publish
#                       (--pin: nats-server on CPU 1, the rest on CPU 0, as if on a host of its own)
#   ./build.sh lab      run docs/lab.md's commands and rewrite their outputs in place;
#                       lab [--in FILE] [--out FILE] [--bin DIR] [--key K]: read FILE, write
#                       another file, use the binaries in DIR (no build), SysV keys K..K+7
#   ./build.sh clean    remove build output
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

# Copies the three programs from $1 into $2 atomically: each is copied to
# a temporary name in $2 and renamed over the old one. A broker running
# from $2 keeps its (now unlinked) file, so there is no "Text file busy",
# and nobody ever runs a half-copied binary.
install_binaries() {
    local from=${1:-target/release} to=${2:-bin}
    mkdir -p "$to"
    for program in broker producer consumer; do
        local tmp="$to/.$program.tmp.$$"
        cp "$from/$program" "$tmp"
        mv -f "$tmp" "$to/$program"
    done
}

build() {
    cargo build --release --locked
    install_binaries target/release bin
    echo "built: bin/broker bin/producer bin/consumer"
}

# Makes sure command $1 (from Debian package $2) is there for the tests:
# installs it with apt-get when missing and we are root, and otherwise
# fails naming the package. Tests never skip for want of a tool.
ensure_tool() {
    local tool=$1 package=$2
    command -v "$tool" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "tests need $tool: installing the Debian package $package"
        if ! { apt-get install -y -q "$package" >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$package" >/dev/null 2>&1; }; }; then
            echo "cannot install $package; install it by hand: apt-get install $package" >&2
            return 1
        fi
        command -v "$tool" >/dev/null 2>&1 && return 0
    fi
    echo "tests need $tool: install the Debian package $package (apt-get install $package)" >&2
    return 1
}

run_tests() {
    ensure_tool strace strace
    # The lab's test (tests/it/lab.rs) runs docs/lab.md's nc sessions.
    ensure_tool nc netcat-openbsd
    # The NATS forwarder's tests (tests/it/nats_forward.rs) run real
    # nats-server processes.
    ensure_tool nats-server nats-server
    ensure_tool curl curl
    cargo fmt --check
    cargo clippy --locked --all-targets -- -D warnings
    local log status=0
    log="$(mktemp)"
    # The unit tests once in the debug profile, so overflow checks and
    # debug_assert!s run; then everything in release: the unit tests again
    # and the integration tests in tests/it (no doc tests: the crate's
    # examples are not meant to run). `|| status=$?` keeps set -e from
    # ending the script before the totals line when a test fails.
    cargo test --locked --lib --bins 2>&1 | tee "$log" || status=$?
    cargo test --locked --release --all-targets 2>&1 | tee -a "$log" || status=$?
    # One closing line with the totals of every test binary.
    awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
         END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
    rm -f "$log"
    return "$status"
}

# Starts bin/broker on a free port of 127.0.0.1 with its files in $1 and the
# SysV keys $2 and $2+1, further options after; waits (bounded) for its
# `listening on` line. Sets bpid and bport.
start_broker() {
    local dir=$1 key=$2
    shift 2
    rm -f "$dir"/messages.dat*
    ${pin_ours:-} "$here/bin/broker" --port 0 --bind 127.0.0.1 --shm-key "$key" --sem-key "$((key + 1))" \
        --log-file "$dir/broker.log" "$@" "$dir/messages.dat" >"$dir/broker.out" 2>&1 &
    bpid=$!
    # Up to 20 s: a start fsyncs its files, which can take seconds on a
    # disk that another program keeps busy.
    for _ in $(seq 1 1000); do
        grep -q '^listening on' "$dir/broker.out" 2>/dev/null && break
        kill -0 "$bpid" 2>/dev/null || { cat "$dir/broker.out"; exit 1; }
        sleep 0.02
    done
    bport="$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$dir/broker.out")"
    [ -n "$bport" ] || { echo "the broker did not start"; cat "$dir/broker.out"; exit 1; }
}

# Stops the broker started by start_broker (SIGTERM, then waits for it).
stop_broker() {
    if [ -n "${bpid:-}" ]; then kill -TERM "$bpid" 2>/dev/null || true; wait "$bpid" 2>/dev/null || true; fi
    bpid=""
}

demo() {
    build
    dir="$(mktemp -d "${TMPDIR:-/tmp}/mq-demo.XXXXXX")"
    # Keys of our own, from the shell's pid, so the demo never meets
    # another broker's queue.
    key=$(( 0x4d510000 + ($$ % 4096) * 2 ))
    bpid=""
    trap 'stop_broker; rm -rf "$dir"' EXIT
    echo "== starting the broker (files in $dir)"
    start_broker "$dir" "$key"
    local pid=$bpid port=$bport
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
    bpid=""
    echo "== IPC objects left with our keys (none expected):"
    ipcs -m -s | grep -i "$(printf '0x%08x' "$key")\|$(printf '0x%08x' "$((key + 1))")" || echo "(none)"
    echo "== the segment files after a clean stop (the active one stays):"
    wc -c "$dir"/messages.dat.[0-9]*
    echo "== the offsets file:"
    cat "$dir/messages.dat.offsets"
    echo "== the log:"
    cat "$dir/broker.log"
}


# --- benchmark -----------------------------------------------------------
# Starts brokers with their own temp dir, keys and port, drives them with
# our own clients, prints one table. Bounded: every client runs under
# `timeout`, every broker is stopped by pid.
bench_broker() { start_broker "$bdir" "$bkey" "$@"; }

now_ns() { date +%s%N; }

# msgs/s of `count` messages over `start`..now (ns)
rate() { awk -v n="$1" -v a="$2" -v b="$(now_ns)" 'BEGIN { printf "%.0f", n / ((b - a) / 1e9) }'; }

# Producer summary field: "N msgs/s" or a latency percentile.
summary_rate() { sed -n 's/.* \([0-9]*\) msgs\/s.*/\1/p' "$1" | tail -n 1; }
summary_latency() { sed -n 's/.*ack latency p50 \([0-9]*\) us p99 \([0-9]*\) us p99.9 \([0-9]*\) us.*/\1 \/ \2 \/ \3/p' "$1" | tail -n 1; }

# One end-to-end run: $1 producers and $1 consumers (one consumer id, so
# they share the work), $2 messages in all. Prints msgs/s.
bench_e() {
    local pairs=$1 total=$2 each start pids=()
    each=$((total / pairs))
    for _ in $(seq 1 "$pairs"); do
        timeout 120 "$here/bin/consumer" --host 127.0.0.1 --port "$bport" --id bench --count "$each" \
            --window 256 >/dev/null 2>>"$bdir/clients.err" &
        pids+=($!)
    done
    start=$(now_ns)
    for _ in $(seq 1 "$pairs"); do
        timeout 120 "$here/bin/producer" --host 127.0.0.1 --port "$bport" -n "$each" -i 0 --window 256 \
            --size "$bsize" >/dev/null 2>>"$bdir/clients.err" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || { echo "a client failed; see $bdir/clients.err" >&2; return 1; }; done
    rate "$total" "$start"
}

# How cost grows: message size, fan-out to K consumer ids, backlog held.
bench_scaling() {
    echo "== message size (E: 1 producer, 1 consumer, fsync interval, 100000 messages)"
    local size k b t0 t1 rss pids
    for size in 16 100 256 512 1024; do
        bench_broker
        timeout 120 "$here/bin/consumer" --host 127.0.0.1 --port "$bport" --id s --count 100000 --window 256 >/dev/null 2>&1 &
        local c=$!
        t0=$(now_ns)
        timeout 120 "$here/bin/producer" --host 127.0.0.1 --port "$bport" -n 100000 -i 0 --window 256 --size "$size" >/dev/null 2>&1
        wait "$c"; t1=$(now_ns)
        awk -v s="$size" -v a="$t0" -v b="$t1" 'BEGIN { r = 100000 / ((b-a)/1e9); printf "size %5d B: %9.0f msgs/s %7.1f MB/s\n", s, r, r*s/1e6 }'
        stop_broker
    done
    echo "== fan-out (1 producer of 20000 messages, K consumer ids each receiving all, fsync interval)"
    for k in 1 2 5 10 20 50; do
        bench_broker
        pids=()
        for i in $(seq "$k"); do
            timeout 120 "$here/bin/consumer" --host 127.0.0.1 --port "$bport" --id "f$i" --count 20000 --window 256 >/dev/null 2>&1 &
            pids+=($!)
        done
        t0=$(now_ns)
        timeout 120 "$here/bin/producer" --host 127.0.0.1 --port "$bport" -n 20000 -i 0 --window 256 --size 100 >/dev/null 2>&1
        for p in "${pids[@]}"; do wait "$p"; done
        t1=$(now_ns)
        awk -v k="$k" -v a="$t0" -v b="$t1" 'BEGIN { s = (b-a)/1e9; printf "K %2d ids: %8.0f msgs/s produced, %9.0f deliveries/s\n", k, 20000/s, k*20000/s }'
        stop_broker
    done
    echo "== backlog held (capacity 32767; fill B with no consumer, then one consumer drains it)"
    for b in 1000 10000 30000; do
        bench_broker --capacity 32767
        timeout 120 "$here/bin/producer" --host 127.0.0.1 --port "$bport" -n "$b" -i 0 --window 256 --size 100 >/dev/null 2>&1
        rss=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$bpid/status")
        t0=$(now_ns)
        timeout 120 "$here/bin/consumer" --host 127.0.0.1 --port "$bport" --id d --count "$b" --window 256 >/dev/null 2>&1
        t1=$(now_ns)
        awk -v n="$b" -v r="$rss" -v a="$t0" -v bb="$t1" 'BEGIN { printf "backlog %5d: broker RSS %6d KiB held, drained at %8.0f msgs/s\n", n, r, n/((bb-a)/1e9) }'
        stop_broker
    done
}

# VmRSS (KiB) of pid $1.
rss_of() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status" 2>/dev/null || echo 0; }

# Runs "$@" in the background and samples the broker's RSS every 50 ms
# until it ends; the largest sample (KiB) goes to $bdir/peak. Returns the
# command's status.
sample_rss_while() {
    local peak=0 r status=0
    "$@" &
    local job=$!
    while kill -0 "$job" 2>/dev/null; do
        r=$(rss_of "$bpid"); [ "${r:-0}" -gt "$peak" ] && peak=$r
        sleep 0.05
    done
    wait "$job" || status=$?
    echo "$peak" >"$bdir/peak"
    return "$status"
}

# The issue-9 figures: P of 1M messages with no consumer (interval and
# always), then a backlog of $1 messages of 100 bytes: RSS while it fills,
# after a restart, while one consumer drains it; the restart's time until
# `listening on`; the drain rate.
bench_backlog() {
    local n=$1 policy t0 t1 rss_fill rss_restart rss_drain restart_ms
    echo "== P: 1000000 messages of 100 bytes, no consumer, window 256 (fresh broker each)"
    for policy in interval always; do
        bench_broker --fsync "$policy"
        timeout 300 "$here/bin/producer" --host 127.0.0.1 --port "$bport" -n 1000000 -i 0 --window 256 \
            --size 100 >/dev/null 2>"$bdir/p.err"
        printf 'P %-8s %10s msgs/s\n' "$policy" "$(summary_rate "$bdir/p.err")"
        stop_broker
    done
    echo "== backlog: $n messages of 100 bytes (fsync interval, --ring 1000)"
    local opts=(--capacity "$((n * 2))" --max-bytes 64G)
    bench_broker "${opts[@]}"
    # A consumer id that exists but does not read: the backlog is held.
    timeout 10 "$here/bin/consumer" --host 127.0.0.1 --port "$bport" --id drain --count 1 \
        --timeout 1 >/dev/null 2>&1 || true
    t0=$(now_ns)
    sample_rss_while timeout 600 "$here/bin/producer" --host 127.0.0.1 --port "$bport" -n "$n" \
        -i 0 --window 256 --size 100 >/dev/null 2>"$bdir/fill.err" ||
        { echo "filling failed:"; cat "$bdir/fill.err"; return 1; }
    rss_fill=$(cat "$bdir/peak")
    printf 'fill: %s msgs/s, broker RSS peak %s KiB while filling, %s bytes of segments\n' \
        "$(rate "$n" "$t0")" "$rss_fill" "$(cat "$bdir"/messages.dat.[0-9]* | wc -c)"
    # Restart on the backlog (page cache warm, as after a crash).
    kill -KILL "$bpid"; wait "$bpid" 2>/dev/null || true; bpid=""
    t0=$(now_ns)
    "$here/bin/broker" --port 0 --bind 127.0.0.1 --shm-key "$bkey" --sem-key "$((bkey + 1))" \
        --log-file "$bdir/broker.log" "${opts[@]}" "$bdir/messages.dat" >"$bdir/broker.out" 2>&1 &
    bpid=$!
    until grep -q '^listening on' "$bdir/broker.out" 2>/dev/null; do
        kill -0 "$bpid" 2>/dev/null || { cat "$bdir/broker.out"; return 1; }
        sleep 0.005
    done
    t1=$(now_ns)
    restart_ms=$(( (t1 - t0) / 1000000 ))
    bport="$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$bdir/broker.out")"
    sleep 0.2
    rss_restart=$(rss_of "$bpid")
    printf 'restart: %s ms until listening on, broker RSS %s KiB after it\n' "$restart_ms" "$rss_restart"
    t0=$(now_ns)
    sample_rss_while timeout 600 "$here/bin/consumer" --host 127.0.0.1 --port "$bport" --id drain \
        --count "$n" --window 256 >/dev/null 2>"$bdir/drain.err" ||
        { echo "draining failed:"; cat "$bdir/drain.err"; return 1; }
    rss_drain=$(cat "$bdir/peak")
    printf 'drain: %s msgs/s with one consumer, broker RSS peak %s KiB while draining\n' \
        "$(rate "$n" "$t0")" "$rss_drain"
    stop_broker
}

# Starts nats-server -js on a port the kernel picks, its store and log in
# $1; waits (bounded, 20 s) for "Server is ready" in its log. Sets npid
# and nport. On failure it says why on stderr, leaves no server running
# and returns 1 (the bench runs it in command substitutions, where an exit
# would leave the caller's broker behind).
start_nats() {
    local dir=$1
    rm -rf "$dir/js" "$dir/nats.log"
    ${pin_nats:-} nats-server -js -sd "$dir/js" -p -1 -a 127.0.0.1 -l "$dir/nats.log" >/dev/null 2>&1 &
    npid=$!
    for _ in $(seq 1 1000); do
        grep -q 'Server is ready' "$dir/nats.log" 2>/dev/null && break
        kill -0 "$npid" 2>/dev/null || break
        sleep 0.02
    done
    nport="$(sed -n 's/.*Listening for client connections on 127.0.0.1:\([0-9]*\).*/\1/p' "$dir/nats.log" | tail -n 1)"
    if ! grep -q 'Server is ready' "$dir/nats.log" 2>/dev/null || [ -z "$nport" ]; then
        echo "nats-server did not start:" >&2
        cat "$dir/nats.log" >&2
        stop_nats
        return 1
    fi
}

stop_nats() {
    if [ -n "${npid:-}" ]; then kill -TERM "$npid" 2>/dev/null || true; wait "$npid" 2>/dev/null || true; fi
    npid=""
}

# One STATS value of the bench broker.
broker_stat() {
    local line
    exec 4<>"/dev/tcp/127.0.0.1/$bport"
    printf 'STATS\nQUIT\n' >&4
    read -r line <&4
    exec 4<&- 4>&-
    tr ' :' '\n\n' <<<"$line" | sed -n "s/^$1=//p"
}

# The forward row: $1 messages backlogged in the broker (the log is the
# queue: all of them at once, with no consumer running), then forwarded
# into a fresh JetStream file stream with --window $2 and --count $1, so
# the forwarder exits once the last one is in the stream and acknowledged
# to the broker. The time runs from the forwarder's start (connect, stream
# lookup, resume point included) to its exit. Prints msgs/s.
bench_forward() {
    local total=$1 window=$2 start status=0
    # Room for the forwarder's 2 x window taken and not yet acknowledged.
    bench_broker --max-ack-pending "$(( 4 * window > 1000 ? 4 * window : 1000 ))"
    start_nats "$bdir" || { stop_broker; return 1; }
    # The id exists (ack mode) before the backlog is made, so it is held for it.
    timeout 10 "$here/bin/consumer" --host 127.0.0.1 --port "$bport" --id fwd --ack --count 1 \
        --timeout 1 >/dev/null 2>&1 || true
    if ! timeout 300 "$here/bin/producer" --host 127.0.0.1 --port "$bport" -n "$total" -i 0 --window 256 \
        --size "$bsize" >/dev/null 2>>"$bdir/clients.err"; then
        echo "the producer failed:" >&2; cat "$bdir/clients.err" >&2
        stop_nats; stop_broker; return 1
    fi
    start=$(now_ns)
    ${pin_ours:-} timeout 300 "$here/bin/consumer" --host 127.0.0.1 --port "$bport" --id fwd \
        --to-nats "nats://127.0.0.1:$nport" --subject bench.forward --window "$window" \
        --count "$total" >/dev/null 2>>"$bdir/forward.err" || status=$?
    local spent=$(( $(now_ns) - start ))
    stop_nats
    stop_broker
    [ "$status" = 0 ] || { echo "the forwarder failed ($status):" >&2; cat "$bdir/forward.err" >&2; return 1; }
    awk -v n="$total" -v ns="$spent" 'BEGIN { printf "%.0f", n / (ns / 1e9) }'
}

# peerbench's jetstream P in the same sitting: 1 producer, window 256,
# PUB with a reply inbox, PubAcks counted, into a fresh file stream.
# With $1 = msg-id, peerbench is first patched (its copy, in $bdir) to
# publish as the forwarder must: HPUB with a `Nats-Msg-Id` header, unique
# per message, into a stream with a 2-minute duplicate window. That is
# JetStream's own pipelined publish rate with deduplication: the ceiling
# for an exactly-once forwarder on this server.
bench_jetstream_p() {
    local variant=${1:-plain} src="${PEERBENCH_SRC:-$here/../shared/peerbench}" out
    [ -d "$src" ] || { echo "no peerbench at $src" >&2; return 1; }
    local copy="$bdir/peerbench-$variant"
    rm -rf "$copy"
    cp -r "$src" "$copy"
    if [ "$variant" = msg-id ]; then
        (cd "$copy" && git apply) <<<"$(peerbench_msg_id_patch)" ||
            { echo "the Nats-Msg-Id patch does not apply to this peerbench" >&2; return 1; }
    fi
    (cd "$copy" && CARGO_TARGET_DIR="$here/target/peerbench-$variant" cargo build --release --quiet) >&2
    start_nats "$bdir" || return 1
    out=$(${pin_ours:-} "$here/target/peerbench-$variant/release/peerbench" run --target jetstream --addr "127.0.0.1:$nport" \
        --scenario P --n "$bcount" --size "$bsize" --window 256 --server-pid "$npid" 2>>"$bdir/clients.err" | grep '^RESULT' | tail -n 1)
    stop_nats
    sed -n 's/.* msgs_per_s=\([0-9]*\).*/\1/p' <<<"$out"
}

# The patch for bench_jetstream_p msg-id (against peerbench's src/nats.rs).
peerbench_msg_id_patch() {
    cat <<'PATCH'
--- a/src/nats.rs
+++ b/src/nats.rs
@@ -171,7 +171,7 @@
     let inbox = format!("_INBOX.pbsetup{}", names.rid);
     let mut c = connect(addr, &format!("SUB {inbox}.* 1\r\n"))?;
     let stream = format!(
-        r#"{{"name":"{}","subjects":["{}"],"retention":"workqueue","storage":"file","num_replicas":1,"discard":"old"}}"#,
+        r#"{{"name":"{}","subjects":["{}"],"retention":"workqueue","storage":"file","num_replicas":1,"discard":"old","duplicate_window":120000000000}}"#,
         names.stream, names.q
     );
     js_api(&mut c, &inbox, &format!("$JS.API.STREAM.CREATE.{}", names.stream), &stream)?;
@@ -252,14 +252,23 @@
 /// on the inbox, one per message.
 pub struct JsProd {
     head: Vec<u8>,
+    n: u64,
 }
 
 impl ProdProto for JsProd {
     #[inline]
     fn encode(&mut self, out: &mut Vec<u8>, payload: &[u8]) {
+        self.n += 1;
+        let mut h = Vec::new();
+        h.extend_from_slice(b"NATS/1.0\r\nNats-Msg-Id: 0123456789abcdef-");
+        push_u64(&mut h, self.n);
+        h.extend_from_slice(b"\r\n\r\n");
         out.extend_from_slice(&self.head);
-        push_u64(out, payload.len() as u64);
+        push_u64(out, h.len() as u64);
+        out.push(b' ');
+        push_u64(out, (h.len() + payload.len()) as u64);
         out.extend_from_slice(b"\r\n");
+        out.extend_from_slice(&h);
         out.extend_from_slice(payload);
         out.extend_from_slice(b"\r\n");
     }
@@ -287,14 +296,14 @@
 impl JsProd {
     #[cfg(test)]
     pub fn for_tests() -> JsProd {
-        JsProd { head: b"PUB s _INBOX.t.a ".to_vec() }
+        JsProd { head: b"HPUB s _INBOX.t.a ".to_vec(), n: 0 }
     }
 }
 
 pub fn connect_js_producer(addr: &str, names: &Names, idx: usize) -> Res<(Conn, JsProd)> {
     let inbox = format!("_INBOX.pb{}p{idx}", names.rid);
     let c = connect(addr, &format!("SUB {inbox}.* 1\r\n"))?;
-    Ok((c, JsProd { head: format!("PUB {} {inbox}.a ", names.q).into_bytes() }))
+    Ok((c, JsProd { head: format!("HPUB {} {inbox}.a ", names.q).into_bytes(), n: 0 }))
 }
 
 // ---------------------------------------------------------------- consumers
PATCH
}

bench() {
    build >/dev/null
    bsize=100 bcount=200000
    local scaling="" backlog="" forward_only=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --size) bsize="$2"; shift 2 ;;
            --count) bcount="$2"; shift 2 ;;
            --scaling) scaling=1; shift ;;
            --backlog) backlog=1; shift ;;
            --forward) forward_only=1; shift ;;
            # nats-server on CPU 1, everything else on CPU 0: as if the
            # server ran on a host of its own (the edge-to-cloud topology).
            --pin) pin_nats="taskset -c 1" pin_ours="taskset -c 0"; shift ;;
            *) echo "usage: ./build.sh bench [--size BYTES] [--count N] [--scaling | --backlog | --forward [--pin]]" >&2; exit 2 ;;
        esac
    done
    bdir="$(mktemp -d "${TMPDIR:-/tmp}/mq-bench.XXXXXX")"
    bkey=$(( 0x4d520000 + ($$ % 4096) * 2 ))
    bpid=""
    npid=""
    trap 'stop_broker; stop_nats; rm -rf "$bdir"' EXIT
    if [ -n "$scaling" ]; then bench_scaling; return; fi
    if [ -n "$backlog" ]; then
        [ "$bcount" = 200000 ] && bcount=10000000
        bench_backlog "$bcount"
        return
    fi
    if [ -n "$forward_only" ]; then bench_forward_rows; return; fi
    # P and L need the whole run to fit in the queue (nothing consumes).
    local fill=$(( bcount < 30000 ? bcount : 30000 )) lat=20000 peak=0
    printf 'messages of %s bytes; E/E4: %s messages, window 256; P: %s messages into an empty queue, ring of 32767; L: %s round trips, window 1\n' \
        "$bsize" "$bcount" "$fill" "$lat"
    printf '%-9s %12s %12s %12s %12s   %s\n' "fsync" "P first fill" "P" "E" "E4" "L ack p50 / p99 / p99.9 us"
    for policy in never interval always; do
        # P, first fill: the queue's shared memory is touched for the first time.
        bench_broker --fsync "$policy" --ring 32767
        timeout 120 "$here/bin/producer" --host 127.0.0.1 --port "$bport" -n "$fill" -i 0 --window 256 \
            --size "$bsize" >/dev/null 2>"$bdir/p.err"
        local p_cold; p_cold=$(summary_rate "$bdir/p.err")
        stop_broker
        # P on a broker whose queue memory was used once (the steady state).
        bench_broker --fsync "$policy" --ring 32767
        bench_e 1 32767 >/dev/null
        timeout 120 "$here/bin/producer" --host 127.0.0.1 --port "$bport" -n "$fill" -i 0 --window 256 \
            --size "$bsize" >/dev/null 2>"$bdir/p.err"
        local p_warm; p_warm=$(summary_rate "$bdir/p.err")
        stop_broker
        # E: one producer, one consumer; E4: four of each.
        bench_broker --fsync "$policy"
        local e; e=$(bench_e 1 "$bcount")
        local hwm; hwm=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$bpid/status")
        [ "$hwm" -gt "$peak" ] && peak=$hwm
        stop_broker
        bench_broker --fsync "$policy"
        local e4; e4=$(bench_e 4 "$bcount")
        stop_broker
        # L: window-1 round trips.
        bench_broker --fsync "$policy" --ring 32767
        timeout 120 "$here/bin/producer" --host 127.0.0.1 --port "$bport" -n "$lat" -i 0 --window 1 \
            --size "$bsize" >/dev/null 2>"$bdir/l.err"
        local l; l=$(summary_latency "$bdir/l.err")
        stop_broker
        printf '%-9s %12s %12s %12s %12s   %s\n' "$policy" "$p_cold" "$p_warm" "$e" "$e4" "$l"
    done
    bench_broker
    sleep 0.5
    local idle; idle=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$bpid/status")
    local threads; threads=$(sed -n 's/^Threads:[[:space:]]*\([0-9]*\)/\1/p' "/proc/$bpid/status")
    stop_broker
    printf 'broker RSS: idle %s KiB (%s threads, default pool of 100); peak during E %s KiB\n' "$idle" "$threads" "$peak"
    local sizes=""
    for program in broker producer consumer; do
        cp "$here/bin/$program" "$bdir/$program.stripped"
        strip "$bdir/$program.stripped"
        sizes+="$program $(stat -c %s "$bdir/$program.stripped") bytes; "
    done
    printf 'stripped binaries: %s\n' "${sizes%; }"
    bench_forward_rows
}

# The forward row and, for comparison, JetStream's own pipelined publish.
bench_forward_rows() {
    if ! command -v nats-server >/dev/null 2>&1; then
        echo "forward: not measured: needs the Debian package nats-server"
        return
    fi
    local fwd fwd_wide js js_before js_after id id_before id_after
    # JetStream's own rates before and after the forward runs, in mirror
    # order, so that both ratios are taken against the same machine load.
    local failed="forward bench: a run failed (see above)"
    js_before=$(bench_jetstream_p plain) || { echo "$failed" >&2; return 1; }
    id_before=$(bench_jetstream_p msg-id) || { echo "$failed" >&2; return 1; }
    fwd=$(bench_forward "$bcount" 256) || { echo "$failed" >&2; return 1; }
    fwd_wide=$(bench_forward "$bcount" 1024) || { echo "$failed" >&2; return 1; }
    id_after=$(bench_jetstream_p msg-id) || { echo "$failed" >&2; return 1; }
    js_after=$(bench_jetstream_p plain) || { echo "$failed" >&2; return 1; }
    js=$(( (js_before + js_after) / 2 ))
    id=$(( (id_before + id_after) / 2 ))
    ratios() {
        awk -v a="$1" -v p="$js" -v m="$id" \
            'BEGIN { if (p > 0 && m > 0) printf "%.2f x jetstream P, %.2f x jetstream P with Nats-Msg-Id", a / p, a / m; else print "?" }'
    }
    printf 'forward (consumer --to-nats, %s messages of %s bytes backlogged, fresh file stream):\n' "$bcount" "$bsize"
    printf '  --window 256 (default): %s msgs/s (%s)\n' "$fwd" "$(ratios "$fwd")"
    printf '  --window 1024:          %s msgs/s (%s)\n' "$fwd_wide" "$(ratios "$fwd_wide")"
    printf 'jetstream P (peerbench, PUB with a reply inbox, window 256, same sitting): %s msgs/s (runs before and after: %s, %s)\n' \
        "$js" "$js_before" "$js_after"
    printf 'jetstream P with Nats-Msg-Id (peerbench patched: HPUB, unique id, 2 min duplicate window): %s msgs/s (before and after: %s, %s; %s x jetstream P)\n' \
        "$id" "$id_before" "$id_after" "$(awk -v a="$id" -v b="$js" 'BEGIN { printf "%.2f", a / b }')"
}

# --- lab -----------------------------------------------------------------
# docs/lab.md's commands, run for real; their outputs rewritten in place.
# The convention (also at the top of docs/lab.md): a fenced block right
# after a line `<!-- lab -->` holds commands, each starting with `$ `
# (continued by lines after a trailing `\`, or up to the end word of a
# `<<'EOF'` here-document), each followed by its output; only the output
# lines are replaced. The block after `<!-- lab:setup -->` is run first as
# it is (it sets the lab's variables), then BIN, LAB and the keys are set
# to the generator's own. Every command runs in this one shell, in order,
# so variables and background jobs carry over; each must exit 0 (a command
# whose failure is the lesson ends in `; echo "exit status $?"`), and each
# must bound its own waits (nc -w, loops with a count).

# Runs command $1 (from line $2 of the input) with its output in
# $lab_work/output; a failure ends the lab, naming the command.
lab_run() {
    local status=0
    set +eu
    { eval "$1"; } </dev/null >"$lab_work/output" 2>&1 7<&-
    status=$?
    set -eu
    if [ "$status" != 0 ]; then
        echo "lab: this command failed with exit status $status ($lab_in, line $2):" >&2
        printf '%s\n' "$1" | sed 's/^/    /' >&2
        echo "its output:" >&2
        sed 's/^/  | /' "$lab_work/output" >&2
        exit 1
    fi
}

# What the lab started and left: brokers (also those under strace, whose
# pids are in their logs), background jobs, IPC objects under its keys.
lab_cleanup() {
    set +e
    local pid log k pids=()
    for log in $(find "$lab_dir" -name '*.log' 2>/dev/null); do
        for pid in $(sed -n 's/.* starting broker pid \([0-9]*\):.*/\1/p' "$log"); do
            # Ours only if its command line names our directory.
            tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "$lab_dir" && pids+=("$pid")
        done
    done
    pids+=($(jobs -p))
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 1 100); do
        local alive=""
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ -z "$alive" ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    wait 2>/dev/null
    for k in $(seq 0 7); do
        k=$(printf '0x%08x' $((lab_key + k)))
        ipcrm -M "$k" 2>/dev/null
        ipcrm -S "$k" 2>/dev/null
    done
    rm -rf "$lab_dir" "$lab_work"
}

# Reads one command starting at line $1 (text $2) from fd 7: its
# continuation lines and here-document. Sets lab_command and lab_line.
lab_read_command() {
    lab_command=${2#\$ }
    local line end=""
    if [[ $lab_command =~ \<\<-?\'?([A-Za-z_]+)\'? ]]; then end=${BASH_REMATCH[1]}; fi
    line=$2
    while [[ -n $end || $line == *\\ ]]; do
        IFS= read -r -u 7 line || break
        lab_line=$((lab_line + 1))
        printf '%s\n' "$line" >>"$lab_work/doc"
        lab_command+=$'\n'"$line"
        if [[ -n $end && $line == "$end" ]]; then end="" line=""; fi
    done
}

lab() {
    lab_in=docs/lab.md
    local out="" bindir=""
    lab_key=$(( 0x4d4c0000 + ($$ % 4096) * 8 ))
    while [ $# -gt 0 ]; do
        case "$1" in
            --in) lab_in="$2"; shift 2 ;;
            --out) out="$2"; shift 2 ;;
            --bin) bindir="$2"; shift 2 ;;
            --key) lab_key=$(( $2 )); shift 2 ;;
            *) echo "usage: ./build.sh lab [--in FILE] [--out FILE] [--bin DIR] [--key K]" >&2; exit 2 ;;
        esac
    done
    out=${out:-$lab_in}
    ensure_tool nc netcat-openbsd
    ensure_tool strace strace
    ensure_tool ipcs util-linux
    ensure_tool perl perl
    if [ -z "$bindir" ]; then build; bindir="$here/bin"; fi
    bindir="$(cd "$bindir" && pwd)"
    local start=$SECONDS
    lab_dir="$(mktemp -d "${TMPDIR:-/tmp}/mq-lab.XXXXXX")"
    lab_work="$(mktemp -d "${TMPDIR:-/tmp}/mq-lab-work.XXXXXX")"
    trap lab_cleanup EXIT
    lab_commands=0
    lab_line=0
    local line state=text blocks=0
    : >"$lab_work/doc"
    while IFS= read -r -u 7 line; do
        lab_line=$((lab_line + 1))
        case "$state:$line" in
            "text:<!-- lab -->") state=fence ;;
            "text:<!-- lab:setup -->") state=setup-fence ;;
            fence:'```'*) state=block; blocks=$((blocks + 1)) ;;
            setup-fence:'```'*) state=setup; : >"$lab_work/setup" ;;
            fence:* | setup-fence:*)
                echo "lab: $lab_in, line $lab_line: a code fence must follow the lab marker" >&2
                exit 1 ;;
            setup:'```')
                state=text
                lab_run "$(cat "$lab_work/setup")" "$lab_line"
                # The generator's own directory, binaries and keys.
                BIN=$bindir LAB=$lab_dir
                SHM=$(printf '0x%08x' "$lab_key") SEM=$(printf '0x%08x' $((lab_key + 1)))
                SHM2=$(printf '0x%08x' $((lab_key + 2))) SEM2=$(printf '0x%08x' $((lab_key + 3)))
                FOREIGN=$(printf '0x%08x' $((lab_key + 4))) ;;
            setup:*) printf '%s\n' "$line" >>"$lab_work/setup" ;;
            block:'```') state=text ;;
            block:'$ '*)
                printf '%s\n' "$line" >>"$lab_work/doc"
                local at=$lab_line
                lab_read_command "$lab_line" "$line"
                lab_run "$lab_command" "$at"
                lab_commands=$((lab_commands + 1))
                cat "$lab_work/output" >>"$lab_work/doc"
                # An output without its last newline still ends its line.
                [ -z "$(tail -c 1 "$lab_work/output")" ] || echo >>"$lab_work/doc"
                continue ;;
            block:*) continue ;;
        esac
        printf '%s\n' "$line" >>"$lab_work/doc"
    done 7<"$lab_in"
    [ "$state" = text ] || { echo "lab: $lab_in ends inside a lab block" >&2; exit 1; }
    local k left=""
    for k in $(seq 0 7); do
        k=$(printf '0x%08x' $((lab_key + k)))
        if ipcs -m -s | grep -qi "^$k "; then left+=" $k"; fi
    done
    [ -z "$left" ] || { echo "lab: IPC objects left under the lab's keys:$left" >&2; exit 1; }
    cp "$lab_work/doc" "$out.tmp.$$"
    mv -f "$out.tmp.$$" "$out"
    echo "lab: $lab_commands commands in $blocks blocks ran; wrote $out in $((SECONDS - start)) s"
}

case "${1:-}" in
    "") build ;;
    test) run_tests ;;
    install) shift; install_binaries "$@" ;;
    demo) demo ;;
    bench) shift; bench "$@" ;;
    lab) shift; lab "$@" ;;
    clean) cargo clean; rm -rf bin ;;
    *) echo "usage: ./build.sh [test|install [FROM [TO]]|demo|bench|lab|clean]" >&2; exit 2 ;;
esac
