#!/usr/bin/env bash
# Side-by-side benchmark: Ironstar's iscsitd against tgt (tgtd) on loopback, both serving a
# 1 GiB memory-backed LU, driven by the same third-party clients (libiscsi's iscsi-perf,
# qemu-img bench) plus our own `iscsi bench`. Not part of CI: run it by hand.
#
#   bench/run.sh                 # builds in release mode, runs everything, prints the table
#   DUR=8 REPS=3 bench/run.sh    # longer runs, more A/B alternations
#   TUNED=0 bench/run.sh         # skip the rows with tgt tuned to 256 KiB segments, InitialR2T=No
#
# Needs: tgt, libiscsi-bin (iscsi-perf), qemu-utils + qemu-block-extra (iscsi:// URLs), iperf3,
# python3. Only the daemons this script starts are stopped (by PID / by their own control port).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DUR=${DUR:-5}          # seconds per timed run (time-based clients)
REPS=${REPS:-2}        # A/B alternations per workload (A B A B ...)
TUNED=${TUNED:-1}      # also run the tgt-tuned rows
BASE=${BASE_PORT:-$((20000 + RANDOM % 20000))}
PORT_A=$BASE           # iscsitd
PORT_B=$((BASE + 1))   # tgtd
CTRL=$((BASE + 2))     # tgtd control port
IPERF_PORT=$((BASE + 3))
ECHO_PORT=$((BASE + 4))
IQN_A=iqn.2026-11.dev.ironstar:bench
IQN_B=iqn.2026-11.dev.ironstar:bench-tgt
LU_BYTES=$((1024 * 1024 * 1024))
HZ=$(getconf CLK_TCK)

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

for tool in tgtd tgtadm iscsi-perf qemu-img iperf3 python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

# ---------------------------------------------------------------- machine facts
echo "# Machine"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- nproc: $(nproc)"
echo "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- kernel: $(uname -r)"
echo "- tgt: $(tgtd --version 2>/dev/null | head -1 || echo '?'), qemu-img: $(qemu-img --version | head -1), ironstar: $(git -C "$ROOT" rev-parse --short HEAD)"
echo "- runs: ${DUR}s each (qemu-img: fixed request counts), ${REPS} A/B alternation(s) per row, mean reported"
echo

# ---------------------------------------------------------------- build
log "cargo build --release --bins"
(cd "$ROOT" && cargo build --release --bins >&2)
BIN=$ROOT/target/release

# ---------------------------------------------------------------- reference limits
log "reference limits: iperf3 and TCP ping-pong"
iperf3 -s -1 -p "$IPERF_PORT" >/dev/null 2>&1 &
IPERF_SRV=$!
sleep 0.5
IPERF_GBPS=$(iperf3 -c 127.0.0.1 -p "$IPERF_PORT" -t 5 -J 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/8e9))')
wait "$IPERF_SRV" 2>/dev/null || true

PINGPONG=$(python3 - "$ECHO_PORT" <<'EOF'
import socket, sys, threading, time
port = int(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(1)
def echo():
    c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        b = c.recv(1)
        if not b: break
        c.sendall(b)
t = threading.Thread(target=echo, daemon=True); t.start()
s = socket.create_connection(("127.0.0.1", port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(1000): s.sendall(b"x"); s.recv(1)
lat = []
for _ in range(10000):
    t0 = time.perf_counter_ns(); s.sendall(b"x"); s.recv(1); lat.append(time.perf_counter_ns() - t0)
lat.sort()
print("%.1f %.1f" % (lat[len(lat)//2] / 1000, lat[len(lat)*99//100] / 1000))
EOF
)
echo "# Reference limits"
echo "- iperf3 single stream, loopback, 5 s: ${IPERF_GBPS} GB/s"
echo "- TCP ping-pong (python3, 1-byte messages, 10,000 round trips): p50 ${PINGPONG% *} µs, p99 ${PINGPONG#* } µs"
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

# ---------------------------------------------------------------- touch + verified pass
head -c $((64 * 1024 * 1024)) /dev/urandom >"$TMP/rand64.img"
for t in A B; do
    if [[ $t == A ]]; then url=$URL_A; port=$PORT_A; iqn=$IQN_A; lun=0; else url=$URL_B; port=$PORT_B; iqn=$IQN_B; lun=1; fi
    log "target $t: touching the whole LU (1 GiB of 0x5a writes)"
    qemu-img bench -f raw -t none -w --pattern 0x5a -d 8 -s 1M -c 1024 "$url" >/dev/null
    log "target $t: verified pass (random 64 MiB in, back out, compared)"
    qemu-img convert -n -f raw -O raw -t none "$TMP/rand64.img" "$url"
    rm -f "$TMP/back64.img"
    qemu-img dd -f raw -O raw bs=1M count=64 if="$url" of="$TMP/back64.img"
    cmp "$TMP/rand64.img" "$TMP/back64.img"
    qemu-img compare -f raw "$TMP/rand64.img" "json:$(json_of "$port" "$iqn" "$lun")" >/dev/null
    echo "- verified pass on target $t ($( [[ $t == A ]] && echo iscsitd || echo tgtd )): 64 MiB random image written, read back, \`cmp\` and \`qemu-img compare\` identical"
done
echo

# ---------------------------------------------------------------- runs
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run_one TARGET CLIENT BS ARGS... ; sets R_IOPS R_CPU R_LAT
# Parses each client's own report. IOPS always from the client; CPU from the target's /proc/PID/stat.
run_one() {
    local t=$1 client=$2 bs=$3; shift 3
    local pid url
    if [[ $t == A ]]; then pid=$PID_A; url=$URL_A; else pid=$PID_B; url=$URL_B; fi
    local out=$TMP/out.txt
    local t0 t1
    t0=$(ticks "$pid")
    case $client in
        iscsi-perf)
            timeout $((DUR + 30)) iscsi-perf "$@" -t "$DUR" "$url" 2>&1 | tr '\r' '\n' >"$out" || true
            R_IOPS=$(grep -a '^iops average' "$out" | tail -1 | awk '{print $3}' || true)
            R_LAT="-"
            ;;
        qemu-img)
            timeout 120 qemu-img bench -f raw -t none "$@" "$url" >"$out" 2>&1 || true
            local secs count
            secs=$(grep -a 'Run completed in' "$out" | awk '{print $4}' || true)
            count=$(grep -a '^Sending' "$out" | awk '{print $2}' || true)
            R_IOPS=$(awk -v c="$count" -v s="$secs" 'BEGIN{ if (s > 0) printf "%d", c/s; else print 0 }')
            R_LAT="-"
            ;;
        iscsi-bench)
            timeout $((DUR + 30)) "$BIN/iscsi" bench "$@" --duration "$DUR" "$url" >"$out" 2>&1 || true
            R_IOPS=$(python3 "$ROOT/bench/parse_iscsi_bench.py" iops <"$out" || true)
            R_LAT=$(python3 "$ROOT/bench/parse_iscsi_bench.py" lat <"$out" || true)
            ;;
    esac
    t1=$(ticks "$pid")
    if [[ -z ${R_IOPS:-} || ${R_IOPS} == 0 ]]; then
        log "run failed ($t $client $*):"; tail -5 "$out" >&2; R_IOPS=0; R_CPU=0; return 0
    fi
    # total I/Os = IOPS * elapsed; elapsed for qemu-img is its own, else DUR
    local n
    if [[ $client == qemu-img ]]; then n=$(grep -a '^Sending' "$out" | awk '{print $2}'); else n=$(awk -v i="$R_IOPS" -v d="$DUR" 'BEGIN{print i*d}'); fi
    R_CPU=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" -v n="$n" 'BEGIN{printf "%.1f", (b-a)/hz*1e6/n}')
    log "  $t $client $*: ${R_IOPS} IOPS, ${R_CPU} µs CPU/IO, lat ${R_LAT}"
}

ROWS=$TMP/rows.txt
: >"$ROWS"
# row WORKLOAD CLIENT BS ARGS... : alternate A/B REPS times, record means
row() {
    local wl=$1 client=$2 bs=$3; shift 3
    local sa=0 sb=0 ca=0 cb=0 la="" lb=""
    for _ in $(seq "$REPS"); do
        run_one A "$client" "$bs" "$@"; sa=$(awk -v x="$sa" -v y="$R_IOPS" 'BEGIN{print x+y}'); ca=$(awk -v x="$ca" -v y="$R_CPU" 'BEGIN{print x+y}'); la=$R_LAT
        run_one B "$client" "$bs" "$@"; sb=$(awk -v x="$sb" -v y="$R_IOPS" 'BEGIN{print x+y}'); cb=$(awk -v x="$cb" -v y="$R_CPU" 'BEGIN{print x+y}'); lb=$R_LAT
    done
    awk -v wl="$wl" -v cl="$client" -v bs="$bs" -v sa="$sa" -v sb="$sb" -v ca="$ca" -v cb="$cb" -v n="$REPS" -v la="$la" -v lb="$lb" 'BEGIN{
        ia=sa/n; ib=sb/n;
        printf "| %s | %s | %d, %.0f | %d, %.0f | %s | %.1f | %.1f | %s / %s |\n", wl, cl, ia, ia*bs/1e6, ib, ib*bs/1e6,
            (ib>0 ? sprintf("%.2f", ia/ib) : "-"), ca/n, cb/n, la, lb }' >>"$ROWS"
}

workloads() {
    row "4k rand read QD1"   iscsi-perf 4096   -m 1 -b 8 -r
    row "4k rand read QD32"  iscsi-perf 4096   -m 32 -b 8 -r
    row "128k seq read QD8"  iscsi-perf 131072 -m 8 -b 256
    row "4k seq read QD32"   qemu-img   4096   -d 32 -s 4k -c 200000
    row "4k seq write QD32"  qemu-img   4096   -d 32 -s 4k -c 200000 -w
    row "128k seq read QD8"  qemu-img   131072 -d 8 -s 128k -c 60000
    row "128k seq write QD8" qemu-img   131072 -d 8 -s 128k -c 30000 -w
    row "4k rand read QD1"   iscsi-bench 4096   --rw randread --bs 4k --qd 1
    row "4k rand read QD32"  iscsi-bench 4096   --rw randread --bs 4k --qd 32
    row "4k rand write QD32" iscsi-bench 4096   --rw randwrite --bs 4k --qd 32
    row "128k seq read QD8"  iscsi-bench 131072 --rw read --bs 128k --qd 8
    row "128k seq write QD8" iscsi-bench 131072 --rw write --bs 128k --qd 8
}

HDR='| workload | client | iscsitd IOPS, MB/s | tgtd IOPS, MB/s | ratio | CPU µs/IO iscsitd | CPU µs/IO tgtd | latency p50/p99 µs (iscsitd / tgtd) |
|---|---|---|---|---|---|---|---|'

log "timed runs, tgt with its defaults"
workloads
echo "# Results: tgt defaults (MaxRecvDataSegmentLength 8 KiB, InitialR2T=Yes)"
echo "$HDR"
cat "$ROWS"
echo

if [[ $TUNED == 1 ]]; then
    log "timed runs, tgt tuned"
    for kv in MaxRecvDataSegmentLength=262144 MaxXmitDataSegmentLength=262144 InitialR2T=No FirstBurstLength=262144 MaxBurstLength=1048576; do
        tgtadm -C "$CTRL" --lld iscsi --op update --mode target --tid 1 --name "${kv%%=*}" --value "${kv#*=}"
    done
    : >"$ROWS"
    workloads
    echo "# Results: tgt tuned (MaxRecv/MaxXmitDataSegmentLength 256 KiB, InitialR2T=No, FirstBurstLength 256 KiB, MaxBurstLength 1 MiB)"
    echo "$HDR"
    cat "$ROWS"
    echo
fi
echo "Not covered yet: 70/30 random mix (no client here has a mix option), 1/4/16/64 sessions, fio's libiscsi engine."
