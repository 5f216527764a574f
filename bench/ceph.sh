#!/usr/bin/env bash
# RBD LUs side by side: iscsitd's RBD backend against tgt's rbd backing store (tgt-rbd), on the
# same throw-away single-node Ceph cluster (tests/ceph/single-node.sh, bluestore on a file) and
# the same 1 GiB image, with `rbd bench` (librbd straight to the cluster) as the cluster's own
# limit. Both targets are driven by our `iscsi bench`; they run one after the other, so the
# image's exclusive lock never bounces between them. Not part of CI: run it by hand.
#
# iscsitd opens images with the librbd cache off (an acknowledged write is on the OSDs, so a
# gateway's death loses nothing that multipath failover would hide). librbd's default is a
# write-back cache, which `rbd bench` and tgt-rbd use unless told otherwise: both run twice,
# with the cache (their default) and without it (iscsitd's footing), and the table gives
# iscsitd's ratio to tgt-rbd on the same footing.
#
#   bench/ceph.sh               # builds in release mode, prints a markdown table
#   DUR=10 bench/ceph.sh        # seconds per run (default 5)
#   OBJECTSTORE=memstore bench/ceph.sh   # an OSD in RAM instead of bluestore on a file
#
# Needs: ceph-mon ceph-mgr ceph-osd ceph-common tgt tgt-rbd (scripts/install-test-deps.sh).
# Stops only what it started: its gateways by PID / control port, then its cluster.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DUR=${DUR:-5}
OBJECTSTORE=${OBJECTSTORE:-bluestore}
BASE=${BASE_PORT:-$((20000 + RANDOM % 12000))}
PORT_A=$BASE; PORT_B=$((BASE + 1)); CTRL=$((BASE + 2))
IQN=iqn.2026-11.dev.ironstar:ceph-bench
TMP=$(mktemp -d /tmp/ironstar-ceph-bench.XXXXXX)
C=$TMP/cluster
PID_A=""; PID_B=""

log() { echo "[ceph-bench] $*" >&2; }

stop_a() {
    [[ -n $PID_A ]] || return 0
    kill "$PID_A" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$PID_A" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$PID_A" 2>/dev/null || true
    PID_A=""
}

stop_b() {
    [[ -n $PID_B ]] || return 0
    # tgtd ignores SIGTERM while it has targets.
    tgtadm -C "$CTRL" --lld iscsi --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
    tgtadm -C "$CTRL" --mode system --op delete >/dev/null 2>&1 || true
    for _ in $(seq 20); do kill -0 "$PID_B" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$PID_B" 2>/dev/null || true
    PID_B=""
}

cleanup() {
    set +e
    stop_a; stop_b
    bash "$ROOT/tests/ceph/single-node.sh" stop "$C" >/dev/null 2>&1
    rm -rf "$TMP"
}
trap cleanup EXIT

for tool in ceph-mon ceph-osd rbd tgtd tgtadm; do
    command -v "$tool" >/dev/null || { echo "missing $tool: run scripts/install-test-deps.sh" >&2; exit 1; }
done
[[ -e /usr/lib/x86_64-linux-gnu/tgt/backing-store/bs_rbd.so ]] || dpkg -s tgt-rbd >/dev/null 2>&1 ||
    { echo "missing tgt-rbd" >&2; exit 1; }

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p iscsitd -p iscsi-initiator --bins)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

log "starting a single-node cluster ($OBJECTSTORE)"
CEPH_OBJECTSTORE=$OBJECTSTORE bash "$ROOT/tests/ceph/single-node.sh" start "$C" >"$TMP/cluster.log" 2>&1
export CEPH_CONF=$C/ceph.conf
rbd create rbd/bench --size 1G
log "filling the image once (reads then hit allocated objects)"
rbd bench --io-type write --io-size 4M --io-pattern seq --io-total 1G rbd/bench >/dev/null

# name, rbd bench args, iscsi bench args
WORKLOADS=(
    "4k rand read QD32|--io-type read --io-size 4K --io-threads 32 --io-pattern rand|--rw randread --bs 4k --qd 32"
    "4k rand write QD32|--io-type write --io-size 4K --io-threads 32 --io-pattern rand|--rw randwrite --bs 4k --qd 32"
    "128k seq read QD8|--io-type read --io-size 128K --io-threads 8 --io-pattern seq|--rw read --bs 128k --qd 8"
    "128k seq write QD8|--io-type write --io-size 128K --io-threads 8 --io-pattern seq|--rw write --bs 128k --qd 8"
)

# The same cluster without the librbd cache, for rbd bench and tgt-rbd's second runs.
NOCACHE_CONF=$TMP/ceph-nocache.conf
{ cat "$CEPH_CONF"; printf '\n[client.admin]\nrbd cache = false\n'; } >"$NOCACHE_CONF"

declare -A R
# rbd bench runs a fixed amount: about DUR seconds' worth at the rates seen here.
for conf in cache:"$CEPH_CONF" nocache:"$NOCACHE_CONF"; do
    for w in "${WORKLOADS[@]}"; do
        IFS='|' read -r name rargs _ <<<"$w"
        total=$([[ $name == 4k* ]] && echo 64M || echo 1G)
        # shellcheck disable=SC2086
        out=$(CEPH_CONF=${conf#*:} rbd bench $rargs --io-total "$total" rbd/bench 2>&1 | tail -1)
        R["rbd-${conf%%:*}|$name"]=$(awk '{for (i=1;i<=NF;i++) if ($i=="ops/sec:") print int($(i+1))}' <<<"$out")
        log "rbd bench (${conf%%:*}) $name: ${R["rbd-${conf%%:*}|$name"]} IOPS"
    done
done

iscsi_bench() { # url, args -> IOPS
    # shellcheck disable=SC2086
    timeout $((DUR + 60)) "$BIN/iscsi" bench $2 --duration "$DUR" "$1" 2>&1 |
        python3 "$ROOT/bench/parse_iscsi_bench.py" iops
}

log "iscsitd with an RBD LU on 127.0.0.1:$PORT_A"
cat >"$TMP/iscsitd.toml" <<EOF
[[portal_group]]
tag = 1
portals = ["127.0.0.1:$PORT_A"]

[[target]]
iqn = "$IQN"
portal_groups = [1]
auth = "none"

[[lu]]
guid = "6001405C0FFEEB00"
backend = "rbd"
pool = "rbd"
image = "bench"
ceph_conf = "$CEPH_CONF"
ceph_id = "admin"

[[view]]
lu = "6001405C0FFEEB00"
lun = 0
EOF
RUST_LOG=${RUST_LOG:-warn} "$BIN/iscsitd" --config "$TMP/iscsitd.toml" --socket "$TMP/s.sock" >"$TMP/iscsitd.log" 2>&1 &
PID_A=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT_A) 2>/dev/null && break; sleep 0.1; done
for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r name _ iargs <<<"$w"
    R["a|$name"]=$(iscsi_bench "iscsi://127.0.0.1:$PORT_A/$IQN/0" "$iargs")
    log "iscsitd $name: ${R["a|$name"]} IOPS"
done
stop_a

for conf in cache:"$CEPH_CONF" nocache:"$NOCACHE_CONF"; do
    log "tgtd with --bstype rbd (librbd ${conf%%:*}) on 127.0.0.1:$PORT_B"
    tgtd -f --iscsi portal=127.0.0.1:$PORT_B --control-port "$CTRL" >"$TMP/tgtd.log" 2>&1 &
    PID_B=$!
    for _ in $(seq 50); do tgtadm -C "$CTRL" --mode system --op show >/dev/null 2>&1 && break; sleep 0.1; done
    tgtadm -C "$CTRL" --lld iscsi --mode target --op new --tid 1 --targetname "$IQN"
    tgtadm -C "$CTRL" --lld iscsi --mode logicalunit --op new --tid 1 --lun 1 --bstype rbd \
        --backing-store rbd/bench --bsopts "conf=${conf#*:};id=admin"
    tgtadm -C "$CTRL" --lld iscsi --mode target --op bind --tid 1 --initiator-address ALL
    # tgt's defaults (8 KiB segments, InitialR2T=Yes) cripple large writes; give it ours.
    for kv in MaxRecvDataSegmentLength=262144 MaxXmitDataSegmentLength=262144 InitialR2T=No \
        FirstBurstLength=262144 MaxBurstLength=1048576; do
        tgtadm -C "$CTRL" --lld iscsi --op update --mode target --tid 1 --name "${kv%=*}" --value "${kv#*=}"
    done
    for w in "${WORKLOADS[@]}"; do
        IFS='|' read -r name _ iargs <<<"$w"
        R["b-${conf%%:*}|$name"]=$(iscsi_bench "iscsi://127.0.0.1:$PORT_B/$IQN/1" "$iargs")
        log "tgt-rbd (${conf%%:*}) $name: ${R["b-${conf%%:*}|$name"]} IOPS"
    done
    stop_b
done

fmt() { # name, iops -> "IOPS" or "MB/s" for 128k rows
    if [[ $1 == 128k* ]]; then echo "$(( ${2:-0} * 128 / 1024 )) MB/s"; else echo "${2:-0} IOPS"; fi
}
echo
echo "RBD LU, 1 GiB image, single-node Ceph 16.2 ($OBJECTSTORE, 1 OSD) on 127.0.0.1, $(nproc) cores; ${DUR}s runs of \`iscsi bench\`"
echo
echo "| workload | rbd bench, librbd cache on | rbd bench, cache off | iscsitd (cache off) | tgt-rbd, cache on | tgt-rbd, cache off | iscsitd / tgt-rbd, both cache off |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for w in "${WORKLOADS[@]}"; do
    IFS='|' read -r name _ _ <<<"$w"
    a=${R["a|$name"]:-0} b=${R["b-nocache|$name"]:-0}
    ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    echo "| $name | $(fmt "$name" "${R["rbd-cache|$name"]}") | $(fmt "$name" "${R["rbd-nocache|$name"]}") | $(fmt "$name" "$a") | $(fmt "$name" "${R["b-cache|$name"]}") | $(fmt "$name" "$b") | $ratio |"
done
