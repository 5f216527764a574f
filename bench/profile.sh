#!/usr/bin/env bash
# Where iscsitd's time goes per 4 KiB read: perf samples (cpu-clock, DWARF call graphs) of the
# release iscsitd (debug = 1 in the workspace profile) while fio's libiscsi engine drives 4 KiB
# random reads against a memory LU, then bench/profile_summary.py groups them by area.
#
#   bench/profile.sh                     # 4k random reads QD32, 8 s of samples
#   SECS=5 QD=1 bench/profile.sh         # QD1 instead
#   JOBS=64 QD=1 bench/profile.sh        # 64 sessions (fio jobs, one libiscsi session each) at QD1
#   REV=HEAD bench/profile.sh            # build a commit (git archive), not the working tree
#   ISCSITD=/path/to/iscsitd bench/profile.sh   # profile that binary, build nothing
#   FIO_EXTRA=--thread JOBS=64 QD=1 bench/profile.sh   # extra fio options (--thread: jobs as threads)
#
# Prints the summary (markdown) on stdout; perf.data is left in $OUT (default /tmp/ironstar-profile).
# Needs linux-perf, and fio with the libiscsi engine (bench/build-fio.sh builds it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECS=${SECS:-8}
QD=${QD:-32}
JOBS=${JOBS:-1}
FREQ=${FREQ:-999}
OUT=${OUT:-/tmp/ironstar-profile}
PORT=${BASE_PORT:-$((20000 + RANDOM % 12000))}
IQN=iqn.2026-11.dev.ironstar:profile
HZ=$(getconf CLK_TCK)
mkdir -p "$OUT"
PID=""
log() { echo "[profile] $*" >&2; }
cleanup() {
    set +e
    if [[ -n $PID ]] && kill -0 "$PID" 2>/dev/null; then kill "$PID"; wait "$PID" 2>/dev/null; fi
}
trap cleanup EXIT

command -v perf >/dev/null || { echo "missing: perf (linux-perf)" >&2; exit 1; }
FIO=$("$ROOT/bench/build-fio.sh")
if [[ -n ${ISCSITD:-} ]]; then
    BIN=$(cd "$(dirname "$ISCSITD")" && pwd)
    EXE=$BIN/$(basename "$ISCSITD")
else
    SRC=$ROOT
    if [[ -n ${REV:-} ]]; then
        SRC=${IRONSTAR_BENCH_CACHE:-$HOME/.cache/ironstar-bench}/src-$(git -C "$ROOT" rev-parse --short "$REV")
        if [[ ! -f $SRC/Cargo.toml ]]; then
            mkdir -p "$SRC"
            git -C "$ROOT" archive "$REV" | tar -x -C "$SRC"
        fi
    fi
    (cd "$SRC" && cargo build --release --bin iscsitd >&2)
    BIN=${CARGO_TARGET_DIR:-$SRC/target}/release
    EXE=$BIN/iscsitd
fi

cat >"$OUT/iscsitd.toml" <<EOF
[[portal_group]]
tag = 1
portals = ["127.0.0.1:$PORT"]

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
RUST_LOG=warn "$EXE" --config "$OUT/iscsitd.toml" --socket "$OUT/s.sock" >"$OUT/iscsitd.log" 2>&1 &
PID=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done

url="iscsi://127.0.0.1:$PORT/$IQN/0"
file=${url//:/\\:}
fio_args=(--ioengine=libiscsi --filename="$file" --norandommap --randrepeat=0 --output-format=json)
log "touching the LU"
"$FIO" --name=touch "${fio_args[@]}" --rw=write --bs=1m --iodepth=4 >/dev/null

# fio runs 2 s longer than perf on each side so the samples see only the steady state.
log "fio 4k randread, $JOBS session(s) x QD$QD for $((SECS + 4)) s; perf record for $SECS s in the middle"
# shellcheck disable=SC2086 # FIO_EXTRA is a list of options
"$FIO" --name=profile "${fio_args[@]}" --rw=randread --bs=4k --iodepth="$QD" --numjobs="$JOBS" \
    --group_reporting --time_based --runtime=$((SECS + 4)) ${FIO_EXTRA:-} >"$OUT/fio.json" &
FIO_PID=$!
sleep 2
t0=$(awk '{print $14 + $15}' "/proc/$PID/stat")
# Syscalls and context switches per I/O, counted over the same window as the samples.
events=raw_syscalls:sys_enter,context-switches,cpu-migrations,sched:sched_wakeup
for sc in writev recvfrom read epoll_wait futex; do events+=,syscalls:sys_enter_$sc; done
perf stat -x, -e "$events" -p "$PID" -o "$OUT/perf-stat.csv" -- sleep "$SECS" &
STAT_PID=$!
perf record -q -e cpu-clock -F "$FREQ" --call-graph dwarf,16384 -p "$PID" -o "$OUT/perf.data" -- sleep "$SECS" 2>"$OUT/perf-record.err"
wait "$STAT_PID"
t1=$(awk '{print $14 + $15}' "/proc/$PID/stat")
wait "$FIO_PID"
read -r iops _ lat < <(python3 "$ROOT/bench/parse_fio.py" <"$OUT/fio.json")
cpu_us=$(awk -v a="$t0" -v b="$t1" -v hz="$HZ" -v i="$iops" -v s="$SECS" 'BEGIN{printf "%.1f", (b-a)/hz*1e6/(i*s)}')
log "fio: $iops IOPS, clat p50/p99 $lat µs; iscsitd ${cpu_us} µs CPU per I/O while sampled"

perf script -i "$OUT/perf.data" -F comm,tid,ip,sym,dso 2>/dev/null >"$OUT/perf.script"
echo "Profile: iscsitd $(git -C "$ROOT" rev-parse --short "${REV:-HEAD}"), fio libiscsi 4k random read, $JOBS session(s) x QD$QD, memory LU,"
echo "$iops IOPS, clat p50/p99 $lat µs; iscsitd used ${cpu_us} µs of CPU per I/O while sampled ($SECS s, cpu-clock at $FREQ Hz, DWARF call graphs)."
echo -n "Per I/O over the same window: "
awk -F, -v n="$(awk -v i="$iops" -v s="$SECS" 'BEGIN{print i*s}')" '$1 ~ /^[0-9]+$/ {
    name = $3; sub(/^(raw_)?syscalls:sys_enter_?/, "", name); if (name == "") name = "all syscalls"
    printf "%s%s %.2f", (k++ ? ", " : ""), name, $1 / n } END { print "" }' "$OUT/perf-stat.csv"
echo
python3 "$ROOT/bench/profile_summary.py" "$cpu_us" <"$OUT/perf.script"
