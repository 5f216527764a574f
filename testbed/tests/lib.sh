# shellcheck shell=bash disable=SC2034
# lib.sh: helpers shared by the guest tests (sourced; runs inside the VM as root).
#
# The share (/mnt/host) holds bin/ (our release iscsitd and iscsi), tests/ and results/.
# run-tests.sh sets TESTBED_RESULTS to this test's results dir (relative to the share).
# Every assertion prints "ok: ..." or "FAIL: ..." and a failure ends the script with the
# daemon's log tail and dmesg, so the console log says what went wrong.
set -euo pipefail
export PATH=/mnt/host/bin:$PATH
SHARE=/mnt/host
RES=$SHARE/${TESTBED_RESULTS:-results/$(basename "$0" .sh)}
mkdir -p "$RES"
FIO_RUNTIME=${FIO_RUNTIME:-5}
IRONSTAR_IQN=iqn.2026-11.dev.ironstar:vm
KERNEL_INITIATOR=$(sed -n 's/^InitiatorName=//p' /etc/iscsi/initiatorname.iscsi)
_t0=$(date +%s.%N)
CHECKS=0

elapsed() { awk -v a="$(date +%s.%N)" -v b="$_t0" 'BEGIN {printf "%.1f", a - b}'; }
step() { printf '\n=== [%6ss] %s\n' "$(elapsed)" "$*"; }
ok() { CHECKS=$((CHECKS + 1)); echo "ok: $*"; }
diag() {
    if [ -s "$RES/iscsitd.log" ]; then echo "--- iscsitd log (tail)"; tail -n 30 "$RES/iscsitd.log"; fi
    echo "--- dmesg (tail)"; dmesg | tail -n 30
}
die() { echo "FAIL: $*"; diag; exit 1; }
# check DESCRIPTION COMMAND...: run COMMAND; pass when it exits 0.
check() { local d=$1; shift; if "$@"; then ok "$d"; else die "$d (command: $*)"; fi; }
# expect_eq DESCRIPTION GOT WANT
expect_eq() { if [ "$2" = "$3" ]; then ok "$1 = $3"; else die "$1: got '$2', want '$3'"; fi; }
# expect_match DESCRIPTION TEXT REGEX (extended)
expect_match() { if grep -Eq -- "$3" <<<"$2"; then ok "$1"; else echo "$2"; die "$1: no match for /$3/"; fi; }
finish() { step "done: $CHECKS checks passed"; }
trap 'rc=$?; [ $rc -eq 0 ] || { echo "FAIL: line $LINENO exited $rc"; diag; }' ERR

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s until it succeeds.
wait_for() {
    local secs=$1 d=$2 i n; shift 2
    n=$((secs * 5))
    for ((i = 0; i < n; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "timed out after ${secs}s waiting for: $d"
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# start_iscsitd CONFIG: start our daemon in the background (pid in ISCSITD_PID), wait for 3260.
start_iscsitd() {
    iscsitd --check "$1" >/dev/null || die "iscsitd --check $1"
    RUST_LOG=${RUST_LOG:-info} iscsitd --config "$1" >>"$RES/iscsitd.log" 2>&1 &
    ISCSITD_PID=$!
    wait_for 20 "iscsitd listening on 127.0.0.1:3260" port_open 127.0.0.1 3260
    kill -0 "$ISCSITD_PID" || die "iscsitd exited at start"
}

start_iscsid() {
    modprobe -a iscsi_tcp sd_mod sg
    pgrep -x iscsid >/dev/null || iscsid || die "iscsid did not start"
    wait_for 10 "iscsid" pgrep -x iscsid
}

# disk_for_lun TARGET LUN: the /dev/sdX the kernel attached for LUN of TARGET's session.
disk_for_lun() {
    iscsiadm -m session -P3 2>/dev/null | awk -v t="$1" -v l="$2" '
        /^Target:/ {cur = $2}
        /Lun: / {lun = $NF}
        /Attached scsi disk/ && cur == t && lun == l {print "/dev/" $4; exit}'
}
# wait_disk TARGET LUN: wait until the disk is there, print it.
wait_disk() {
    local d i
    for ((i = 0; i < 100; i++)); do
        d=$(disk_for_lun "$1" "$2")
        if [ -n "$d" ] && [ -b "$d" ] && [ "$(blockdev --getsize64 "$d" 2>/dev/null || echo 0)" -gt 0 ]; then
            echo "$d"; return 0
        fi
        sleep 0.2
    done
    echo "no disk for $1 LUN $2" >&2
    iscsiadm -m session -P3 >&2 || true
    return 1
}

# fio_verify DEV NAME ARGS...: a bounded fio job with verify=crc32c; fails on any error.
fio_verify() {
    local dev=$1 name=$2 out; shift 2
    out=$(fio --name="$name" --filename="$dev" --ioengine=libaio --direct=1 --verify=crc32c \
              --verify_fatal=1 --do_verify=1 --output-format=terse --terse-version=3 "$@" 2>&1) \
        || { echo "$out"; die "fio $name on $dev"; }
    # terse v3: field 5 = errors; 7/8 read KiB/s, IOPS; 48/49 write KiB/s, IOPS
    awk -F';' -v n="$name" 'NF > 50 {
        if ($5 != 0) {print "errors: " $5; exit 1}
        printf "%s: read %.1f MiB/s %d IOPS, write %.1f MiB/s %d IOPS, verify ok\n", n, $7/1024, $8, $48/1024, $49}' \
        <<<"$out" || { echo "$out"; die "fio $name reported errors"; }
    ok "fio $name verify=crc32c on $dev"
}

# fio_bench LABEL DEV: the fixed benchmark set (FIO_RUNTIME s each); lines to $RES/fio.txt.
fio_bench() {
    local label=$1 dev=$2 job name args out
    for job in "randread-4k-qd32:--rw=randread --bs=4k --iodepth=32" \
               "randwrite-4k-qd32:--rw=randwrite --bs=4k --iodepth=32" \
               "seqread-128k-qd8:--rw=read --bs=128k --iodepth=8" \
               "seqwrite-128k-qd8:--rw=write --bs=128k --iodepth=8"; do
        name=${job%%:*}; args=${job#*:}
        # shellcheck disable=SC2086
        out=$(fio --name="$name" --filename="$dev" --ioengine=libaio --direct=1 $args \
                  --time_based --runtime="$FIO_RUNTIME" --output-format=terse --terse-version=3 2>&1) \
            || { echo "$out"; die "fio $name"; }
        awk -F';' -v l="$label" -v n="$name" 'NF > 50 {
            if ($7 + 0 > 0) printf "%-26s %-18s %8.1f MiB/s %7d IOPS\n", l, n, $7/1024, $8;
            else            printf "%-26s %-18s %8.1f MiB/s %7d IOPS\n", l, n, $48/1024, $49 }' \
            <<<"$out" | tee -a "$RES/fio.txt"
    done
}

# LIO through configfs. lio_target IQN: create the target's TPG 1 (TCP portal 127.0.0.1:3260).
LIO=/sys/kernel/config/target
lio_target() {
    modprobe -a target_core_mod target_core_file iscsi_target_mod
    mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
    mkdir -p "$LIO/iscsi/$1/tpgt_1/np/127.0.0.1:3260"
    echo "$LIO/iscsi/$1/tpgt_1"
}
# lio_lun TPG LUN BACKSTORE_DIR: map a backstore (core/fileio_N/name or core/rd_mcp_N/name).
lio_lun() {
    mkdir -p "$1/lun/lun_$2"
    ln -s "$LIO/$3" "$1/lun/lun_$2/$(basename "$3")"
}
# lio_fileio NAME FILE SIZE_BYTES / lio_ramdisk NAME SIZE_MIB: create and enable a backstore.
lio_fileio() {
    local d=$LIO/core/fileio_0/$1
    mkdir -p "$d"
    truncate -s "$3" "$2"
    echo "fd_dev_name=$2,fd_dev_size=$3" > "$d/control"
    echo 1 > "$d/enable"
}
lio_ramdisk() {
    local d=$LIO/core/rd_mcp_0/$1
    mkdir -p "$d"
    echo "rd_pages=$(($2 * 256))" > "$d/control"
    echo 1 > "$d/enable"
}
# lio_chap_acl TPG INITIATOR USER SECRET: an ACL for INITIATOR mapping every LUN, with CHAP.
lio_chap_acl() {
    local acl=$1/acls/$2 l
    mkdir -p "$acl"
    for l in "$1"/lun/lun_*; do
        mkdir -p "$acl/${l##*/}"
        ln -s "$l" "$acl/${l##*/}/map"
    done
    # No trailing newline: LIO of this kernel keeps it as part of the name.
    printf '%s' "$3" > "$acl/auth/userid"
    printf '%s' "$4" > "$acl/auth/password"
}

# ---- iSER (Soft-RoCE) --------------------------------------------------------------------
# rxe cannot sit on lo, so iSER runs over rxe0 on the guest NIC (10.0.2.15; QEMU's user net
# is restrict=on: nothing leaves the guest; rxe loops local traffic back itself).
RDMA_IP=10.0.2.15
# rxe_up: load rdma_rxe, bind rxe0 to eth0, wait until its port is ACTIVE.
rxe_up() {
    modprobe -a rdma_rxe rdma_cm ib_uverbs rdma_ucm
    rdma link show | grep -q '^link rxe0/' || rdma link add rxe0 type rxe netdev eth0 \
        || die "rdma link add rxe0 on eth0"
    wait_for 10 "rxe0 ACTIVE" bash -c 'rdma link show | grep -q "^link rxe0/.*state ACTIVE"'
    ok "$(rdma link show | grep '^link rxe0/' | tr -s ' ') ($RDMA_IP)"
}
# lio_iser_portal TPG: an iSER np on $RDMA_IP:3260 beside TCP (LIO keeps TCP on the same np).
lio_iser_portal() {
    modprobe ib_isert
    mkdir -p "$1/np/$RDMA_IP:3260"
    echo 1 > "$1/np/$RDMA_IP:3260/iser"
    expect_eq "LIO np $RDMA_IP:3260 iser" "$(cat "$1/np/$RDMA_IP:3260/iser")" 1
}
# fio_bench_table TARGET TRANSPORT DEV: fio_bench, and its lines also go to $RES/fio-table.txt as
# "target transport job MiB/s IOPS" rows (the iSER-vs-TCP table of the note).
fio_bench_table() {
    local target=$1 transport=$2 dev=$3 before
    before=0
    [ ! -f "$RES/fio.txt" ] || before=$(wc -l < "$RES/fio.txt")
    fio_bench "$target $transport" "$dev"
    tail -n +"$((before + 1))" "$RES/fio.txt" |
        awk -v t="$target" -v x="$transport" '{printf "%-8s %-5s %-18s %8s %8s\n", t, x, $(NF-4), $(NF-3), $(NF-1)}' \
        >> "$RES/fio-table.txt"
}
# start_iscsitd_iser CONFIG: start_iscsitd for a config whose portal group on $RDMA_IP:3260
# has iser = true; ready once TCP answers there and the daemon logged its iSER listener.
start_iscsitd_iser() {
    iscsitd --check "$1" >/dev/null || die "iscsitd --check $1"
    RUST_LOG=${RUST_LOG:-info} iscsitd --config "$1" >>"$RES/iscsitd.log" 2>&1 &
    ISCSITD_PID=$!
    wait_for 20 "iscsitd listening on $RDMA_IP:3260" port_open "$RDMA_IP" 3260
    wait_for 20 "iscsitd's iSER listener" grep -q "iser rdma: listening on $RDMA_IP:3260" "$RES/iscsitd.log"
    kill -0 "$ISCSITD_PID" || die "iscsitd exited at start"
}
