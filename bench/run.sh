#!/usr/bin/env bash
# Side-by-side benchmark: Ironstar's iscsitd against tgt (tgtd) on loopback, both serving a
# 1 GiB memory-backed LU, driven by the same third-party clients (fio with its libiscsi engine,
# libiscsi's iscsi-perf, qemu-img bench) plus our own `iscsi bench`. Not part of CI: run it by hand.
#
#   bench/run.sh                 # builds in release mode, runs everything, prints the report
#   DUR=4 REPS=2 bench/run.sh    # about 11-13 minutes on the 2-core machine (DUR=5: about 15)
#   TUNED=0 bench/run.sh         # skip tgt tuned to 256 KiB segments, InitialR2T=No
#   ONLY=fio bench/run.sh        # only rows whose "client workload" matches this regex (smoke tests)
#   REV=HEAD bench/run.sh        # build a commit (exported with git archive), not the working tree
#
# Each row alternates A = iscsitd, B = tgtd with its defaults, C = the same tgtd tuned (tgt takes
# target parameters at login, and every run logs in anew, so B and C switch per run).
#
# Needs: tgt, libiscsi-bin (iscsi-perf), qemu-utils + qemu-block-extra (iscsi:// URLs), iperf3,
# python3, gcc, taskset; fio with the libiscsi engine is built once by bench/build-fio.sh.
# Only the daemons this script starts are stopped (by PID / by their own control port).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DUR=${DUR:-5}          # seconds per timed run (time-based clients)
REPS=${REPS:-2}        # A/B alternations per workload (A B C A B C ...)
TUNED=${TUNED:-1}      # also run tgt tuned (C)
ONLY=${ONLY:-}         # regex on "client workload": run only the matching rows
ROUNDS=${ROUNDS:-20000} # ping-pong round trips per reference measurement
REV=${REV:-}           # commit to build instead of the working tree (others' half-done edits)
CACHE=${IRONSTAR_BENCH_CACHE:-$HOME/.cache/ironstar-bench}
# tgtadm takes control ports up to 32767 only, so the whole block stays below that.
BASE=${BASE_PORT:-$((20000 + RANDOM % 12000))}
PORT_A=$BASE           # iscsitd
PORT_B=$((BASE + 1))   # tgtd
CTRL=$((BASE + 2))     # tgtd control port
IPERF_PORT=$((BASE + 3))
ECHO_PORT=$((BASE + 4))
IQN_A=iqn.2026-11.dev.ironstar:bench
IQN_B=iqn.2026-11.dev.ironstar:bench-tgt
LU_BYTES=$((1024 * 1024 * 1024))
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)

TMP=$(mktemp -d /tmp/ironstar-bench.XXXXXX)
SHM=/dev/shm/ironstar-bench-$$.img
PID_A=""
PID_B=""

log() { echo "[bench] $*" >&2; }

cleanup() {
    set +e
    if [[ -n $PID_B ]] && kill -0 "$PID_B" 2>/dev/null; then
        tgtadm -C "$CTRL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1
        tgtadm -C "$CTRL" --mode system --op delete >/dev/null 2>&1
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$PID_B" 2>/dev/null || break; sleep 0.3; done
        kill -0 "$PID_B" 2>/dev/null && kill -KILL "$PID_B"
    fi
    if [[ -n $PID_A ]] && kill -0 "$PID_A" 2>/dev/null; then
        kill "$PID_A"
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$PID_A" 2>/dev/null || break; sleep 0.3; done
        kill -0 "$PID_A" 2>/dev/null && kill -KILL "$PID_A"
    fi
    rm -f "$SHM"
    rm -rf "$TMP"
}
trap cleanup EXIT

for tool in tgtd tgtadm iscsi-perf qemu-img iperf3 python3 gcc taskset; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

# ---------------------------------------------------------------- build (fio first: it is cached)
log "fio with the libiscsi engine (bench/build-fio.sh; built once, then cached)"
FIO=$("$ROOT/bench/build-fio.sh")
SRC=$ROOT
if [[ -n $REV ]]; then
    SRC=$CACHE/src-$(git -C "$ROOT" rev-parse --short "$REV")
    if [[ ! -f $SRC/Cargo.toml ]]; then
        mkdir -p "$SRC"
        git -C "$ROOT" archive "$REV" | tar -x -C "$SRC"
    fi
fi
log "cargo build --release --bins in $SRC"
(cd "$SRC" && cargo build --release --bins >&2)
BIN=${CARGO_TARGET_DIR:-$SRC/target}/release
gcc -O2 -Wall -o "$TMP/pingpong" "$ROOT/bench/pingpong.c"
gcc -O2 -Wall -pthread -o "$TMP/mconn" "$ROOT/bench/mconn.c"

# ---------------------------------------------------------------- machine facts
dirty=""
if [[ -z $REV && -n $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    dirty=" (working tree with uncommitted changes)"
fi
echo "# Machine"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- nproc: $NCPU"
echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- kernel: $(uname -r)"
echo "- tgt: $(tgtd --version 2>/dev/null | head -1 || echo '?'), fio: $("$FIO" --version) (libiscsi engine, built from Debian's source package), iscsi-perf: libiscsi-bin $(dpkg-query -W -f='${Version}' libiscsi-bin 2>/dev/null || echo '?'), qemu-img: $(qemu-img --version | head -1 | awk '{print $3}')"
echo "- ironstar: $(git -C "$ROOT" rev-parse --short "${REV:-HEAD}")$dirty"
echo "- runs: ${DUR}s each (qemu-img: fixed request counts), ${REPS} alternation(s) of iscsitd / tgtd / tgtd tuned per row, mean reported"
echo

# ---------------------------------------------------------------- reference limits
log "reference limits: iperf3 and the pinned TCP ping-pong"
iperf3 -s -1 -p "$IPERF_PORT" >/dev/null 2>&1 &
IPERF_SRV=$!
sleep 0.5
IPERF_GBPS=$(iperf3 -c 127.0.0.1 -p "$IPERF_PORT" -t 5 -J 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/8e9))')
wait "$IPERF_SRV" 2>/dev/null || true

# pingpong SERVER_CPU CLIENT_CPU REQ RESP: prints "p50 p99 mean" (µs) of ROUNDS round trips.
pingpong() {
    local port=$((ECHO_PORT))
    taskset -c "$1" "$TMP/pingpong" server "$port" "$3" "$4" &
    local srv=$!
    taskset -c "$2" "$TMP/pingpong" client "$port" "$3" "$4" "$ROUNDS"
    wait "$srv"
}
# Cross-core is the shape of an initiator and a target on different cores; same-core is shown
# because loopback round trips are several times faster when both ends share a core.
CLIENT_CPU=$((NCPU > 1 ? 1 : 0))
read -r PP_P50 PP_P99 _ < <(pingpong 0 "$CLIENT_CPU" 48 48)
read -r PP4_P50 PP4_P99 _ < <(pingpong 0 "$CLIENT_CPU" 48 4144)
read -r PPS_P50 PPS_P99 _ < <(pingpong 0 0 48 48)
echo "# Reference limits"
echo "- iperf3 single stream, loopback, 5 s: ${IPERF_GBPS} GB/s"
echo "- TCP round trip (bench/pingpong.c, blocking sockets, TCP_NODELAY, ${ROUNDS} round trips after 2,000 warm-up):"
echo "  - 48-byte request, 48-byte response, server on CPU 0, client on CPU $CLIENT_CPU: p50 ${PP_P50} µs, p99 ${PP_P99} µs"
echo "  - 48-byte request, 4144-byte response (a 4 KiB read's shape), CPUs 0 / $CLIENT_CPU: p50 ${PP4_P50} µs, p99 ${PP4_P99} µs"
echo "  - 48-byte request, 48-byte response, both on CPU 0: p50 ${PPS_P50} µs, p99 ${PPS_P99} µs"
# The sessions rows' shape without iSCSI: bench/mconn.c's single-threaded epoll server and its
# threaded client, S connections x Q in flight (48-byte requests, 4144-byte answers).
log "reference limits: bare epoll server, 1 x 64 and 64 x 1 connections"
mconn() { # mconn S Q [SERVER_CPU CLIENT_CPU]: prints "round-trips/s server-µs/rt client-µs/rt"
    local port=$((ECHO_PORT + 1)) srv t0 t1 rate spin=() cpin=()
    if [[ $# -ge 4 ]]; then spin=(taskset -c "$3"); cpin=(taskset -c "$4"); fi
    "${spin[@]}" "$TMP/mconn" server "$port" 48 4144 &
    srv=$!
    sleep 0.2
    t0=$(awk '{print $14 + $15}' "/proc/$srv/stat")
    rate=$(/usr/bin/time -f "%U %S" -o "$TMP/mconn.time" "${cpin[@]}" "$TMP/mconn" client "$port" 48 4144 "$1" "$2" "$DUR")
    t1=$(awk '{print $14 + $15}' "/proc/$srv/stat")
    kill "$srv"
    wait "$srv" 2>/dev/null || true
    awk -v r="$rate" -v a="$t0" -v b="$t1" -v hz="$HZ" -v d="$DUR" '{ n = r * d; printf "%d %.1f %.1f\n", r, (b - a) / hz * 1e6 / n, ($1 + $2) * 1e6 / n }' "$TMP/mconn.time"
}
read -r MC1_RATE MC1_SRV MC1_CLI < <(mconn 1 64)
read -r MC64_RATE MC64_SRV MC64_CLI < <(mconn 64 1)
# QD1's shape, pinned as the QD1 latency runs: what one request and answer cost the kernel alone.
read -r MCQ1_RATE MCQ1_SRV MCQ1_CLI < <(mconn 1 1 0 "$CLIENT_CPU")
echo "- Bare epoll server, no iSCSI (bench/mconn.c: one thread, 48-byte requests, 4144-byte answers, a threaded client), ${DUR} s each:"
echo "  - 1 connection x 64 in flight: ${MC1_RATE} round trips/s, server ${MC1_SRV} µs CPU per round trip, client ${MC1_CLI}"
echo "  - 64 connections x 1 in flight: ${MC64_RATE} round trips/s, server ${MC64_SRV} µs CPU per round trip, client ${MC64_CLI}"
echo "  - 1 connection x 1 in flight, server on CPU 0, client on CPU $CLIENT_CPU: ${MCQ1_RATE} round trips/s, server ${MCQ1_SRV} µs CPU per round trip, client ${MCQ1_CLI}"
echo

# ---------------------------------------------------------------- targets
log "starting iscsitd on 127.0.0.1:$PORT_A"
cat >"$TMP/iscsitd.toml" <<EOF
[[portal_group]]
tag = 1
portals = ["127.0.0.1:$PORT_A"]

[[target]]
iqn = "$IQN_A"
portal_groups = [1]
auth = "none"
allowed_initiators = []

[[target.lun]]
lun = 0
backend = "memory"
size = "1GiB"
EOF
RUST_LOG=${RUST_LOG:-warn} "$BIN/iscsitd" --config "$TMP/iscsitd.toml" --socket "$TMP/s.sock" >"$TMP/iscsitd.log" 2>&1 &
PID_A=$!

log "starting tgtd on 127.0.0.1:$PORT_B (control port $CTRL)"
truncate -s "$LU_BYTES" "$SHM"
tgtd -f --iscsi portal=127.0.0.1:$PORT_B --control-port "$CTRL" >"$TMP/tgtd.log" 2>&1 &
PID_B=$!
for _ in $(seq 50); do tgtadm -C "$CTRL" --mode system --op show >/dev/null 2>&1 && break; sleep 0.1; done
tgtadm -C "$CTRL" --lld iscsi --mode target --op new --tid 1 --targetname "$IQN_B"
tgtadm -C "$CTRL" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$SHM"
tgtadm -C "$CTRL" --lld iscsi --mode target --op bind --tid 1 --initiator-address ALL

# tgt's parameters for B (its own defaults, read back from tgtadm) and C (tuned).
TGT_KEYS=(MaxRecvDataSegmentLength MaxXmitDataSegmentLength InitialR2T FirstBurstLength MaxBurstLength)
declare -A TGT_TUNED=([MaxRecvDataSegmentLength]=262144 [MaxXmitDataSegmentLength]=262144
    [InitialR2T]=No [FirstBurstLength]=262144 [MaxBurstLength]=1048576)
declare -A TGT_DEFAULT=()
tgtadm -C "$CTRL" --lld iscsi --mode target --op show --tid 1 >"$TMP/tgt-params.txt"
for k in "${TGT_KEYS[@]}"; do
    TGT_DEFAULT[$k]=$(awk -F= -v k="$k" '$1 == k {print $2; exit}' "$TMP/tgt-params.txt")
    [[ -n ${TGT_DEFAULT[$k]} ]] || { echo "tgtadm shows no $k" >&2; exit 1; }
done
TGT_MODE=defaults
tgt_mode() { # tgt_mode defaults|tuned: parameters for the next login to tgtd
    [[ $1 == "$TGT_MODE" ]] && return 0
    local k v
    for k in "${TGT_KEYS[@]}"; do
        if [[ $1 == tuned ]]; then v=${TGT_TUNED[$k]}; else v=${TGT_DEFAULT[$k]}; fi
        tgtadm -C "$CTRL" --lld iscsi --op update --mode target --tid 1 --name "$k" --value "$v"
    done
    TGT_MODE=$1
}

for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/$PORT_A) 2>/dev/null && break
    kill -0 "$PID_A" 2>/dev/null || { cat "$TMP/iscsitd.log" >&2; echo "iscsitd died" >&2; exit 1; }
    sleep 0.1
done

URL_A=iscsi://127.0.0.1:$PORT_A/$IQN_A/0
URL_B=iscsi://127.0.0.1:$PORT_B/$IQN_B/1
json_of() { # json_of PORT IQN LUN: a raw 64 MiB window of the LU for qemu-img
    printf '{"driver":"raw","size":67108864,"file":{"driver":"iscsi","transport":"tcp","portal":"127.0.0.1:%s","target":"%s","lun":%s}}' "$1" "$2" "$3"
}
# fio splits its filename option at ':', so every colon of the URL is escaped.
fio_file() { local u=$1; echo "${u//:/\\:}"; }
FIO_COMMON=(--ioengine=libiscsi --output-format=json --group_reporting --norandommap --randrepeat=0)

# ---------------------------------------------------------------- touch + verified passes
head -c $((64 * 1024 * 1024)) /dev/urandom >"$TMP/rand64.img"
for t in A B; do
    if [[ $t == A ]]; then url=$URL_A; port=$PORT_A; iqn=$IQN_A; lun=0; name=iscsitd; else url=$URL_B; port=$PORT_B; iqn=$IQN_B; lun=1; name=tgtd; fi
    log "target $t: touching the whole LU (1 GiB of 0x5a writes)"
    qemu-img bench -f raw -t none -w --pattern 0x5a -d 8 -s 1M -c 1024 "$url" >/dev/null
    log "target $t: verified pass with qemu-img (random 64 MiB in, back out, compared)"
    qemu-img convert -n -f raw -O raw -t none "$TMP/rand64.img" "$url"
    rm -f "$TMP/back64.img"
    qemu-img dd -f raw -O raw bs=1M count=64 if="$url" of="$TMP/back64.img"
    cmp "$TMP/rand64.img" "$TMP/back64.img"
    qemu-img compare -f raw "$TMP/rand64.img" "json:$(json_of "$port" "$iqn" "$lun")" >/dev/null
    # fio writes 128 MiB (past the window above) in random 4k-256k blocks, each with a crc32c
    # header, then reads every block back and checks it; any mismatch fails the bench.
    log "target $t: verified pass with fio (verify=crc32c)"
    "$FIO" --name=verify "${FIO_COMMON[@]}" --filename="$(fio_file "$url")" --rw=randwrite \
        --bsrange=4k-256k --iodepth=16 --offset=64m --size=128m --verify=crc32c --do_verify=1 \
        --verify_fatal=1 >"$TMP/verify.json" 2>"$TMP/verify.err" ||
        { cat "$TMP/verify.err" >&2; echo "fio verify failed on $name" >&2; exit 1; }
    read -r _ vios _ < <(python3 "$ROOT/bench/parse_fio.py" <"$TMP/verify.json")
    [[ $vios -gt 0 ]] || { echo "fio verify did no I/O on $name" >&2; exit 1; }
    echo "- verified pass on target $t ($name): 64 MiB random image written with \`qemu-img convert\`, read back, \`cmp\` and \`qemu-img compare\` identical; fio verify=crc32c over 128 MiB of random 4k–256k writes ($vios I/Os: the writes and the reads that verified them), no mismatch"
done
echo

# ---------------------------------------------------------------- runs
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
RUNLOG=$TMP/runs.txt
: >"$RUNLOG"
PIN=0 # 1: the client runs on CLIENT_CPU and the target's threads on CPU 0 (QD1 latency section)

# run_one TARGET CLIENT ARGS... ; sets R_IOPS R_CPU R_LAT (R_LAT "p50/p99" µs or "-") R_CCPU
# IOPS and latency from the client's own report; CPU from the target's /proc/PID/stat; the
# client's own CPU per I/O (R_CCPU: user + system of all its processes) from /usr/bin/time.
run_one() {
    local t=$1 client=$2; shift 2
    local pid url
    case $t in
        A) pid=$PID_A url=$URL_A ;;
        B) pid=$PID_B url=$URL_B; tgt_mode defaults ;;
        C) pid=$PID_B url=$URL_B; tgt_mode tuned ;;
    esac
    local out=$TMP/out.txt
    local pin=() t0 t1 n=0
    if [[ $PIN == 1 ]]; then
        pin=(taskset -c "$CLIENT_CPU")
        taskset -a -p -c 0 "$pid" >/dev/null
    fi
    R_LAT="-"
    local tm=(/usr/bin/time -f "%U %S" -o "$TMP/client.time")
    : >"$TMP/client.time"
    t0=$(ticks "$pid")
    case $client in
        iscsi-perf)
            timeout $((DUR + 30)) "${tm[@]}" "${pin[@]}" iscsi-perf "$@" -t "$DUR" "$url" 2>&1 | tr '\r' '\n' >"$out" || true
            R_IOPS=$(grep -a '^iops average' "$out" | tail -1 | awk '{print $3}' || true)
            n=$(awk -v i="${R_IOPS:-0}" -v d="$DUR" 'BEGIN{print i*d}')
            ;;
        qemu-img)
            timeout 120 "${tm[@]}" "${pin[@]}" qemu-img bench -f raw -t none "$@" "$url" >"$out" 2>&1 || true
            local secs
            secs=$(grep -a 'Run completed in' "$out" | awk '{print $4}' || true)
            n=$(grep -a '^Sending' "$out" | awk '{print $2}' || true)
            R_IOPS=$(awk -v c="${n:-0}" -v s="${secs:-0}" 'BEGIN{ if (s > 0) printf "%d", c/s; else print 0 }')
            ;;
        iscsi-bench)
            timeout $((DUR + 30)) "${tm[@]}" "${pin[@]}" "$BIN/iscsi" bench "$@" --duration "$DUR" "$url" >"$out" 2>&1 || true
            R_IOPS=$(python3 "$ROOT/bench/parse_iscsi_bench.py" iops <"$out" || true)
            R_LAT=$(python3 "$ROOT/bench/parse_iscsi_bench.py" lat <"$out" || true)
            n=$(awk -v i="${R_IOPS:-0}" -v d="$DUR" 'BEGIN{print i*d}')
            ;;
        fio)
            timeout $((DUR + 60)) "${tm[@]}" "${pin[@]}" "$FIO" --name=bench "${FIO_COMMON[@]}" --filename="$(fio_file "$url")" \
                --time_based --runtime="$DUR" "$@" >"$out" 2>"$out.err" || true
            read -r R_IOPS n R_LAT < <(python3 "$ROOT/bench/parse_fio.py" <"$out")
            ;;
    esac
    t1=$(ticks "$pid")
    [[ $PIN == 1 ]] && taskset -a -p -c "0-$((NCPU - 1))" "$pid" >/dev/null
    if [[ -z ${R_IOPS:-} || ${R_IOPS} == 0 || -z ${n:-} || ${n} == 0 ]]; then
        log "run failed ($t $client $*):"; tail -5 "$out" "$out.err" >&2 2>/dev/null; R_IOPS=0; R_CPU=0; R_LAT="-"; R_CCPU="-"; return 0
    fi
    R_CPU=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" -v n="$n" 'BEGIN{printf "%.1f", (b-a)/hz*1e6/n}')
    R_CCPU=$(awk -v n="$n" 'NF == 2 { printf "%.1f", ($1 + $2) * 1e6 / n; ok = 1 } END { if (!ok) print "-" }' "$TMP/client.time")
    log "  $t $client $*: ${R_IOPS} IOPS, ${R_CPU} µs CPU/IO (client ${R_CCPU}), lat ${R_LAT}"
    echo "$t $client $*: ${R_IOPS} IOPS, ${R_CPU} µs CPU/IO (client ${R_CCPU}), lat p50/p99 ${R_LAT} µs" >>"$RUNLOG"
}

TARGETS=(A B)
[[ $TUNED == 1 ]] && TARGETS+=(C)
ROWS=$TMP/rows.txt
: >"$ROWS"

# row WORKLOAD CLIENT BYTES_PER_IO ARGS... : alternate the targets REPS times; the means of IOPS,
# CPU and p50/p99 go to ROWS as "workload|client|bytes|T iops cpu p50 p99|...".
row() {
    local wl=$1 client=$2 bs=$3; shift 3
    [[ -z $ONLY || "$client $wl" =~ $ONLY ]] || return 0
    local samples=$TMP/samples.txt t
    : >"$samples"
    for _ in $(seq "$REPS"); do
        for t in "${TARGETS[@]}"; do
            run_one "$t" "$client" "$@"
            echo "$t $R_IOPS $R_CPU ${R_LAT/\// } $R_CCPU" >>"$samples"
        done
    done
    local line="$wl|$client|$bs"
    for t in "${TARGETS[@]}"; do
        line+="|$(awk -v t="$t" '$1 == t { n++; i += $2; c += $3; if ($4 != "-") { l++; p += $4; q += $5 } if ($6 != "-") { m++; k += $6 } }
            END { printf "%s %.0f %.1f %s %s %s", t, i / n, c / n, (l ? sprintf("%.0f", p / l) : "-"), (l ? sprintf("%.0f", q / l) : "-"), (m ? sprintf("%.1f", k / m) : "-") }' "$samples")"
    done
    echo "$line" >>"$ROWS"
}

SESSION_QD=64 # total queue depth shared by the sessions rows
workloads() {
    # fio, libiscsi engine (one libiscsi session per fio job)
    row "4k rand read QD1"          fio 4096   --rw=randread --bs=4k --iodepth=1
    row "4k rand read QD32"         fio 4096   --rw=randread --bs=4k --iodepth=32
    row "4k rand write QD32"        fio 4096   --rw=randwrite --bs=4k --iodepth=32
    row "4k rand 70/30 r/w QD32"    fio 4096   --rw=randrw --rwmixread=70 --bs=4k --iodepth=32
    row "128k seq read QD8"         fio 131072 --rw=read --bs=128k --iodepth=8
    row "128k seq write QD8"        fio 131072 --rw=write --bs=128k --iodepth=8
    local s
    for s in 1 4 16 64; do
        row "4k rand read, $s session(s) x QD$((SESSION_QD / s))" fio 4096 --rw=randread --bs=4k \
            --numjobs="$s" --iodepth=$((SESSION_QD / s))
    done
    # libiscsi's iscsi-perf (reads only; -b is in 512-byte blocks)
    row "4k rand read QD1"          iscsi-perf 4096   -m 1 -b 8 -r
    row "4k rand read QD32"         iscsi-perf 4096   -m 32 -b 8 -r
    row "128k seq read QD8"         iscsi-perf 131072 -m 8 -b 256
    # qemu-img bench (no random mode; fixed request counts)
    row "4k seq read QD32"          qemu-img   4096   -d 32 -s 4k -c 200000
    row "4k seq write QD32"         qemu-img   4096   -d 32 -s 4k -c 200000 -w
    row "128k seq read QD8"         qemu-img   131072 -d 8 -s 128k -c 60000
    row "128k seq write QD8"        qemu-img   131072 -d 8 -s 128k -c 30000 -w
    # our own initiator
    row "4k rand read QD1"          iscsi-bench 4096   --rw randread --bs 4k --qd 1
    row "4k rand read QD32"         iscsi-bench 4096   --rw randread --bs 4k --qd 32
    row "4k rand write QD32"        iscsi-bench 4096   --rw randwrite --bs 4k --qd 32
    row "128k seq read QD8"         iscsi-bench 131072 --rw read --bs 128k --qd 8
    row "128k seq write QD8"        iscsi-bench 131072 --rw write --bs 128k --qd 8
    # the sessions rows again with a lighter client: every session in one process
    for s in 1 4 16 64; do
        row "4k rand read, $s session(s) x QD$((SESSION_QD / s))" iscsi-bench 4096 --rw randread --bs 4k \
            --sessions "$s" --qd $((SESSION_QD / s))
    done
}

log "timed runs: ${TARGETS[*]} alternating"
workloads

# ---------------------------------------------------------------- QD1 latency against the round trip
# Pinned like the ping-pong: client on CLIENT_CPU, every thread of the target on CPU 0.
LAT_ROWS=$TMP/lat.txt
: >"$LAT_ROWS"
if [[ -z $ONLY || "fio pinned" =~ $ONLY ]]; then
    log "QD1 latency, pinned (client CPU $CLIENT_CPU, target CPU 0)"
    PIN=1
    : >"$TMP/pinned.txt"
    for _ in $(seq "$REPS"); do
        for t in A B; do
            run_one "$t" fio --rw=randread --bs=4k --iodepth=1
            echo "$t ${R_LAT/\// } $R_CPU" >>"$TMP/pinned.txt"
        done
    done
    PIN=0
    for t in A B; do
        awk -v t="$t" -v rt="$PP_P50" -v rt4="$PP4_P50" '$1 == t && $2 != "-" { n++; p += $2; q += $3; c += $4 }
            END { if (n) printf "%s %.0f %.0f %.2f %.2f %.1f\n", t, p / n, q / n, p / n / rt, p / n / rt4, c / n }' "$TMP/pinned.txt" >>"$LAT_ROWS"
    done
fi

# ---------------------------------------------------------------- report
declare -A NAME=([A]=iscsitd [B]=tgtd [C]="tgtd tuned")
hdr="| workload | client"
sep="|---|---"
for t in "${TARGETS[@]}"; do hdr+=" | ${NAME[$t]} IOPS, MB/s"; sep+="|---"; done
hdr+=" | ratio iscsitd/tgtd"; sep+="|---"
[[ $TUNED == 1 ]] && { hdr+=" | ratio iscsitd/tuned"; sep+="|---"; }
for t in "${TARGETS[@]}"; do hdr+=" | CPU µs/IO ${NAME[$t]}"; sep+="|---"; done
hdr+=" | latency p50/p99 µs ($(for t in "${TARGETS[@]}"; do printf "%s · " "${NAME[$t]}"; done | sed "s| · $||"))"
hdr+=" |"; sep+="|---|"

echo "# Results (tgt defaults: $(for k in "${TGT_KEYS[@]}"; do printf '%s=%s, ' "$k" "${TGT_DEFAULT[$k]}"; done | sed 's/, $//'); tuned: $(for k in "${TGT_KEYS[@]}"; do printf '%s=%s, ' "$k" "${TGT_TUNED[$k]}"; done | sed 's/, $//'))"
echo "$hdr"
echo "$sep"
python3 - "$ROWS" <<'EOF'
import sys
for line in open(sys.argv[1]):
    wl, client, bs, *targets = line.rstrip("\n").split("|")
    bs = int(bs)
    cells = [t.split() for t in targets]          # [T, iops, cpu, p50, p99]
    iops = {c[0]: float(c[1]) for c in cells}
    out = [wl, client]
    out += ["%d, %.0f" % (iops[c[0]], iops[c[0]] * bs / 1e6) for c in cells]
    for other in ("B", "C"):
        if other in iops:
            out.append("%.2f" % (iops["A"] / iops[other]) if iops[other] > 0 else "-")
    out += [c[2] for c in cells]
    out.append(" · ".join("-" if c[3] == "-" else "%s/%s" % (c[3], c[4]) for c in cells))
    print("| " + " | ".join(out) + " |")
EOF
echo

# Sessions: does IOPS hold when the same total queue depth is spread over more sessions?
if grep -q 'session' "$ROWS"; then
    echo "# Sessions at the same total queue depth (QD$SESSION_QD, 4k random reads)"
    echo "fio: one process per session; iscsi-bench: \`iscsi bench --sessions S\`, every session in one process."
    echo "CPU µs/IO: the target's, then the client's own (all its processes)."
    echo "Bare epoll server, same shapes, no iSCSI (reference limits above): 1 x 64 ${MC1_SRV} µs server / ${MC1_CLI} µs client per round trip, 64 x 1 ${MC64_SRV} / ${MC64_CLI}."
    python3 - "$ROWS" <<'EOF'
import re, sys
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1]) if "session" in l]
names = {"A": "iscsitd", "B": "tgtd", "C": "tgtd tuned"}
series = {}
for wl, client, _bs, *targets in rows:
    s = int(re.search(r"(\d+) session", wl).group(1))
    for t in targets:
        c = t.split()
        ccpu = c[5] if len(c) > 5 else "-"
        series.setdefault((client, c[0]), []).append((s, float(c[1]), c[2], ccpu))
for (client, t), pts in series.items():
    first = pts[0][1]
    worst = min(p[1] for p in pts)
    shown = ", ".join("%d: %d (%s · %s µs)" % p for p in pts)
    verdict = "holds" if worst >= 0.9 * first else "falls"
    print("- %s, %s: IOPS (CPU µs/IO target · client) by sessions %s; lowest / 1-session = %.2f (%s)"
          % (client, names[t], shown, worst / first if first else 0, verdict))
EOF
    echo
fi

if [[ -s $LAT_ROWS ]]; then
    echo "# QD1 latency against the bare TCP round trip (fio 4k random read QD1, client on CPU $CLIENT_CPU, target on CPU 0, as the ping-pong)"
    echo "| target | clat p50 µs | clat p99 µs | p50 / 48-byte round trip (${PP_P50} µs) | p50 / 4 KiB-shaped round trip (${PP4_P50} µs) | target CPU µs/IO |"
    echo "|---|---|---|---|---|---|"
    while read -r t p50 p99 r1 r4 cpu; do
        echo "| ${NAME[$t]} | $p50 | $p99 | $r1 | $r4 | $cpu |"
    done <"$LAT_ROWS"
    echo "| bare epoll server (bench/mconn.c, same pinning, no iSCSI) | - | - | - | - | ${MCQ1_SRV} |"
    echo "Goal (issue 8): iscsitd's QD1 latency within 1.5× of the bare round trip."
    awk -v bare="$MCQ1_SRV" '{ cpu[$1] = $6 } END { if (cpu["A"] > 0 && cpu["B"] > 0)
        printf "QD1 CPU per I/O, pinned: iscsitd / tgtd = %.2f; the bare server / tgtd = %.2f (what the kernel alone costs per round trip here); iscsitd − bare server = %.1f µs.\n",
            cpu["A"] / cpu["B"], bare / cpu["B"], cpu["A"] - bare }' "$LAT_ROWS"
    echo
fi

echo "# Every run"
echo '```'
cat "$RUNLOG"
echo '```'
