#!/usr/bin/env bash
# A/B of iscsitd binaries in the same session, alternating runs (A B A B ...), for data-path
# changes where the shared machine's noise is larger than the effect: every daemon serves a
# 256 MiB memory LU and fio's libiscsi engine drives 4 KiB random reads at each in turn.
#
#   bench/ab.sh OLD_ISCSITD NEW_ISCSITD [MORE_ISCSITD...]
#   REPS=4 DUR=4 CASES="64x1 1x64 pin1" bench/ab.sh old new
#   TGT=1 bench/ab.sh old new        # tgtd (defaults, a /dev/shm file LU) joins the rotation as T
#   MCONN=1 CASES="1x64 64x1" bench/ab.sh old new   # bench/mconn.c's bare epoll server joins as M
#   EXTRA=$'[defaults]\ninitial_r2t = true' CASES="w128k" bench/ab.sh old new   # TOML added to the config
#
# CASES:
#   SxQ   S sessions (fio jobs, each its own process) each at queue depth Q
#   SxQt  the same with fio's --thread (the jobs are threads of one process)
#   bSxQ  our `iscsi bench --sessions S --qd Q` (one process, two runtime threads; ISCSI=path to
#         the binary, default `iscsi` beside the first iscsitd)
#   pin1  one session at QD1, fio on CPU 1 and every thread of the target on CPU 0 (the shape of
#         bench/pingpong.c's reference, whose p50 is printed first)
#   wBS   sequential writes of BS (e.g. w128k, w1m), 1 session at QD8
#   rBS   sequential reads of BS (e.g. r512k: each one over four of a memory LU's pages), the same
# Prints one line per run and the per-case means: the target's CPU per I/O (its /proc/PID/stat),
# its context switches per I/O (voluntary + involuntary, all threads) and the client's own CPU per
# I/O (user + system of all its processes). M, bench/mconn.c's bare single-threaded epoll server
# (no iSCSI: a 48-byte request, a 4144-byte answer, the shape of a 4 KiB read), runs the session
# cases (SxQ, SxQt, bSxQ alike) with its own threaded client: what the kernel alone costs.
# Needs fio with the libiscsi engine (bench/build-fio.sh), gcc, taskset; tgt for TGT=1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -ge 1 ]] || { sed -n "2,26p" "$0" >&2; exit 2; }
BINS=("$@")
TGT=${TGT:-0}
REPS=${REPS:-3}
DUR=${DUR:-4}
CASES=${CASES:-"64x1 1x64 pin1"}
BASE=${BASE_PORT:-$((20000 + RANDOM % 12000))}
HZ=$(getconf CLK_TCK)
TMP=$(mktemp -d /tmp/ironstar-ab.XXXXXX)
IQN=iqn.2026-11.dev.ironstar:ab
PIDS=()
TGT_PID=""
M_PID=""
SHM=/dev/shm/ironstar-ab-$$.img
cleanup() {
    set +e
    for p in "${PIDS[@]}" $M_PID; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    if [[ -n $TGT_PID ]]; then
        tgtadm -C "$((BASE + 8))" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1
        tgtadm -C "$((BASE + 8))" --mode system --op delete >/dev/null 2>&1
        sleep 1
        kill -0 "$TGT_PID" 2>/dev/null && kill -KILL "$TGT_PID"
    fi
    rm -f "$SHM"
    rm -rf "$TMP"
}
trap cleanup EXIT
log() { echo "[ab] $*" >&2; }
# Voluntary and involuntary context switches of all of PID's threads so far.
ctx_switches() {
    cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^voluntary_ctxt_switches/ { v += $2 } /^nonvoluntary_ctxt_switches/ { n += $2 } END { print v + 0, n + 0 }'
}

FIO=$("$ROOT/bench/build-fio.sh")
gcc -O2 -Wall -o "$TMP/pingpong" "$ROOT/bench/pingpong.c"
MCONN=${MCONN:-0}
ISCSI=${ISCSI:-$(dirname "$1")/iscsi}
if [[ $MCONN == 1 ]]; then
    gcc -O2 -Wall -pthread -o "$TMP/mconn" "$ROOT/bench/mconn.c"
    "$TMP/mconn" server $((BASE + 6)) 48 4144 &
    M_PID=$!
fi
taskset -c 0 "$TMP/pingpong" server $((BASE + 9)) 48 4144 &
PP_PID=$!
sleep 0.2
read -r PP_P50 PP_P99 _ < <(taskset -c 1 "$TMP/pingpong" client $((BASE + 9)) 48 4144 20000)
wait "$PP_PID"
echo "ping-pong 48/4144 bytes, CPUs 0/1: p50 $PP_P50 µs, p99 $PP_P99 µs"

LABELS=(A B C D E F)
NB=${#BINS[@]}
for ((i = 0; i < NB; i++)); do
    port=$((BASE + i))
    cat >"$TMP/t$i.toml" <<EOF
[[portal_group]]
tag = 1
portals = ["127.0.0.1:$port"]

[[target]]
iqn = "$IQN"
portal_groups = [1]
auth = "none"
allowed_initiators = []

[[target.lun]]
lun = 0
backend = "memory"
size = "256MiB"
EOF
    [[ -n ${EXTRA:-} ]] && printf '\n%s\n' "$EXTRA" >>"$TMP/t$i.toml"
    RUST_LOG=warn "${BINS[$i]}" --config "$TMP/t$i.toml" --socket "$TMP/s$i.sock" >"$TMP/t$i.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done

IDX=()
for ((i = 0; i < NB; i++)); do IDX+=("$i"); done
if [[ $TGT == 1 ]]; then
    truncate -s 256M "$SHM"
    tgtd -f --iscsi portal=127.0.0.1:$((BASE + 7)) --control-port $((BASE + 8)) >"$TMP/tgtd.log" 2>&1 &
    TGT_PID=$!
    for _ in $(seq 50); do tgtadm -C $((BASE + 8)) --mode system --op show >/dev/null 2>&1 && break; sleep 0.1; done
    tgtadm -C $((BASE + 8)) --lld iscsi --mode target --op new --tid 1 --targetname "$IQN-tgt"
    tgtadm -C $((BASE + 8)) --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --backing-store "$SHM"
    tgtadm -C $((BASE + 8)) --lld iscsi --mode target --op bind --tid 1 --initiator-address ALL
    IDX+=(t)
fi
fio_file() {
    local u="iscsi://127.0.0.1:$((BASE + 7))/$IQN-tgt/1"
    [[ $1 == t ]] || u="iscsi://127.0.0.1:$((BASE + $1))/$IQN/0"
    echo "${u//:/\\:}"
}
pid_of() {
    case $1 in t) echo "$TGT_PID" ;; m) echo "$M_PID" ;; *) echo "${PIDS[$1]}" ;; esac
}
label_of() { case $1 in t) echo T ;; m) echo M ;; *) echo "${LABELS[$1]}" ;; esac; }
COMMON=(--ioengine=libiscsi --output-format=json --group_reporting --norandommap --randrepeat=0)
for i in "${IDX[@]}"; do
    "$FIO" --name=touch "${COMMON[@]}" --filename="$(fio_file $i)" --rw=write --bs=1m --iodepth=4 >/dev/null
done

[[ $MCONN == 1 ]] && IDX+=(m)
RES=$TMP/res.txt
: >"$RES"
for _ in $(seq "$REPS"); do
    for c in $CASES; do
        for i in "${IDX[@]}"; do
            client=fio
            if [[ $c == b* ]]; then
                client=bench
                [[ $i == t ]] && continue
            fi
            if [[ $i == m ]]; then
                [[ $c =~ ^b?([0-9]+)x([0-9]+)t?$ ]] || continue
                client=mconn
            fi
            pid=$(pid_of "$i")
            pin=()
            rw=(--rw=randread --bs=4k)
            if [[ $c == pin1 ]]; then
                jobs=1 qd=1
                pin=(taskset -c 1)
                taskset -a -p -c 0 "$pid" >/dev/null
            elif [[ $c == w* ]]; then
                jobs=1 qd=8
                rw=(--rw=write --bs="${c#w}")
            elif [[ $c == r* ]]; then
                jobs=1 qd=8
                rw=(--rw=read --bs="${c#r}")
            else
                jobs=${c%x*} qd=${c#*x}
                jobs=${jobs#b}
                [[ $qd == *t ]] && { qd=${qd%t}; rw+=(--thread); }
            fi
            t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
            read -r v0 n0cs < <(ctx_switches "$pid")
            read -r _ u0 n0 s0 i0 w0 _ < /proc/stat
            case $client in
            fio)
                /usr/bin/time -f "%U %S" -o "$TMP/time.txt" "${pin[@]}" "$FIO" --name=ab "${COMMON[@]}" --filename="$(fio_file $i)" "${rw[@]}" \
                    --numjobs="$jobs" --iodepth="$qd" --time_based --runtime="$DUR" >"$TMP/out.json" 2>/dev/null || true
                ;;
            bench)
                /usr/bin/time -f "%U %S" -o "$TMP/time.txt" "$ISCSI" bench "iscsi://127.0.0.1:$((BASE + i))/$IQN/0" --rw randread --bs 4k \
                    --sessions "$jobs" --qd "$qd" --duration "$DUR" >"$TMP/out.txt" 2>/dev/null || true
                ;;
            mconn)
                /usr/bin/time -f "%U %S" -o "$TMP/time.txt" "$TMP/mconn" client $((BASE + 6)) 48 4144 "$jobs" "$qd" "$DUR" >"$TMP/out.txt" 2>/dev/null || true
                ;;
            esac
            t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
            read -r v1 n1cs < <(ctx_switches "$pid")
            read -r _ u1 n1 s1 i1 w1 _ < /proc/stat
            # The machine's idle share over the run (all CPUs; ticks).
            idle=$(awk -v b=$((u1 + n1 + s1 - u0 - n0 - s0)) -v i=$((i1 + w1 - i0 - w0)) 'BEGIN{ printf "%.0f", (b + i) ? 100 * i / (b + i) : 0 }')
            [[ $c == pin1 ]] && taskset -a -p -c 0-$(($(nproc) - 1)) "$pid" >/dev/null
            case $client in
            fio) read -r iops n lat < <(python3 "$ROOT/bench/parse_fio.py" <"$TMP/out.json") ;;
            bench)
                iops=$(python3 "$ROOT/bench/parse_iscsi_bench.py" <"$TMP/out.txt")
                lat=$(python3 "$ROOT/bench/parse_iscsi_bench.py" lat <"$TMP/out.txt")
                n=$((iops * DUR))
                ;;
            mconn) iops=$(head -1 "$TMP/out.txt") lat=-/- n=$((iops * DUR)) ;;
            esac
            cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" -v n="$n" 'BEGIN{ if (n > 0) printf "%.1f", (b-a)/hz*1e6/n; else print 0 }')
            fcpu=$(awk -v n="$n" 'NR == 1 { if (n > 0) printf "%.1f", ($1 + $2) * 1e6 / n; else print 0 }' "$TMP/time.txt")
            cs=$(awk -v v=$((v1 - v0)) -v w=$((n1cs - n0cs)) -v n="$n" 'BEGIN{ if (n > 0) printf "%.2f %.2f", v / n, w / n; else print "0 0" }')
            [[ $lat == */* ]] || lat=-/-
            label=$(label_of "$i")
            echo "$label $c: $iops IOPS, $cpu µs CPU/IO (client $fcpu), target context switches/IO (voluntary, involuntary) $cs, clat p50/p99 $lat µs, idle $idle %"
            echo "$label $c $iops $cpu ${lat/\// } $cs $fcpu" >>"$RES"
        done
    done
done
echo "means (load $(cut -d' ' -f1-3 /proc/loadavg)):"
for i in "${IDX[@]}"; do
    case $i in
    t) echo "  T = tgtd" ;;
    m) echo "  M = bench/mconn.c's bare epoll server (no iSCSI), its own threaded client" ;;
    *) echo "  $(label_of "$i") = ${BINS[$i]}" ;;
    esac
done
for c in $CASES; do
    for i in "${IDX[@]}"; do
        awk -v t="$(label_of "$i")" -v c="$c" -v rt="$PP_P50" '$1 == t && $2 == c { n++; i += $3; u += $4; f += $NF; v += $7; w += $8; if ($5 != "-") { l++; p += $5; q += $6 } }
            END { if (n) printf "  %s %-6s %7.0f IOPS  %5.1f µs CPU/IO (client %5.1f)  csw/IO %.2f+%.2f  p50/p99 %s/%s µs  (p50 / ping-pong %.2f)\n", t, c, i / n, u / n, f / n, v / n, w / n,
                  (l ? sprintf("%.0f", p / l) : "-"), (l ? sprintf("%.0f", q / l) : "-"), (l ? p / l / rt : 0) }' "$RES"
    done
done
