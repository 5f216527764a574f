#!/bin/bash
# The Linux kernel iSER initiator (ib_iser, iscsiadm -I iser) -> our iscsitd over iSER on
# Soft-RoCE: discovery and login over iSER, fio verify=crc32c (4k random, 128k sequential,
# writes verified by reading back, and a mixed job), ext4 + fsck -f + checksums; then the
# fio set over iSER and over TCP on the same 256 MiB memory LU, rows into fio-table.txt
# beside iser-lio-ref's. Send with Invalidate: ib_iser allows it in its CM REQ, so our
# target invalidates each task's STag with the SCSI Response; the kernel's own debug trace
# shows the remote invalidations, dmesg has no iSER error, and the daemon counts them.
. "$(dirname "$0")/lib.sh"
IQN=$IRONSTAR_IQN:iser
PORTAL=$RDMA_IP:3260
MNT=/mnt/iser

rxe_up
step "iscsitd: 256 MiB memory LU 0, 128 MiB file LU 1, portal $PORTAL with iser = true"
truncate -s 128M /tmp/lun1.img
cat > /tmp/iscsitd.toml <<EOT
[[portal_group]]
tag = 1
portals = ["$PORTAL"]
iser = true

[[target]]
iqn = "$IQN"
portal_groups = [1]
auth = "none"

[[target.lun]]
lun = 0
backend = "memory"
size = "256MiB"

[[target.lun]]
lun = 1
backend = "file"
path = "/tmp/lun1.img"

[discovery]
auth = "none"
EOT
cp /tmp/iscsitd.toml "$RES/"
# iser=debug: the per-connection count of SCSI Responses sent with invalidate.
export RUST_LOG=${RUST_LOG:-info,iser=debug}
start_iscsitd_iser /tmp/iscsitd.toml
ok "iscsitd (pid $ISCSITD_PID) listens on $PORTAL, TCP and iSER"
start_iscsid
modprobe ib_iser
node() { iscsiadm -m node -T "$IQN" -p "$PORTAL" "$@"; }

step "discovery over iSER"
disc=$(iscsiadm -m discovery -t sendtargets -p "$PORTAL" -I iser) || die "iSER discovery"
echo "$disc"
expect_match "SendTargets over iSER lists $IQN" "$disc" "^$PORTAL,1 $IQN\$"

step "login over iSER"
t=$(date +%s.%N)
check "login -I iser" node -I iser --login
DEV0=$(wait_disk "$IQN" 0) || die "LUN 0 did not appear"
DEV1=$(wait_disk "$IQN" 1) || die "LUN 1 did not appear"
ok "login + disks in $(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN {printf "%.2f", a - b}') s: $DEV0, $DEV1"
p3=$(iscsiadm -m session -P3)
expect_match "session transport is iser" "$p3" "Iface Transport: iser"
expect_match "session LOGGED_IN" "$p3" "iSCSI Session State: LOGGED_IN"
expect_match "no header digest over iSER" "$p3" "HeaderDigest: None"
expect_eq "LUN 0 size" "$(blockdev --getsize64 "$DEV0")" 268435456
expect_match "our target uses Send with Invalidate with ib_iser (CM REQ allows it)" \
    "$(cat "$RES/iscsitd.log")" "Send with Invalidate in use"

step "fio verify=crc32c over iSER ($DEV0)"
fio_verify "$DEV0" randwrite-4k --rw=randwrite --bs=4k --iodepth=32 --size=8M
fio_verify "$DEV0" randrw-4k --rw=randrw --bs=4k --iodepth=16 --offset=16M --size=8M
fio_verify "$DEV0" seqwrite-128k --rw=write --bs=128k --iodepth=8 --offset=32M --size=32M
fio_verify "$DEV0" seqrw-128k-2jobs --rw=rw --bs=128k --iodepth=4 --offset=96M --size=16M \
    --numjobs=2 --offset_increment=16M --group_reporting

step "Send with Invalidate, seen by the kernel ($DEV0)"
# ib_iser traces each remote invalidation at debug_level > 2 (iser_check_remote_inv):
# trace a few direct I/Os only (the trace is per I/O), past fio's regions.
DBG=/sys/module/ib_iser/parameters/debug_level
echo "ib_iser always_register=$(cat /sys/module/ib_iser/parameters/always_register 2>/dev/null || echo '?')"
if [ -w "$DBG" ]; then
    echo 3 > "$DBG"
    dd if=/dev/urandom of=/tmp/swi.bin bs=64k count=4 status=none
    check "64 KiB direct writes" dd if=/tmp/swi.bin of="$DEV0" bs=64k seek=3200 oflag=direct status=none
    check "4 KiB and 64 KiB direct reads" bash -c \
        "dd if=$DEV0 of=/dev/null bs=4k count=4 skip=51200 iflag=direct status=none &&
         dd if=$DEV0 of=/tmp/swi.back bs=64k count=4 skip=3200 iflag=direct status=none"
    echo 0 > "$DBG"
    check "direct read-back matches" cmp /tmp/swi.bin /tmp/swi.back
    inv=$(dmesg | grep -c 'remote invalidation for rkey' || true)
    { dmesg | grep 'remote invalidation for rkey' || true; } | tail -n 3
    [ "$inv" -ge 12 ] || die "ib_iser traced $inv remote invalidations for 12 direct I/Os"
    ok "ib_iser traced $inv remote invalidations (12 direct I/Os)"
else
    echo "note: $DBG not writable: the kernel-side trace is skipped"
fi

step "ext4 on LUN 1 over iSER ($DEV1)"
check "mkfs.ext4" mkfs.ext4 -q -F "$DEV1"
mkdir -p "$MNT"
check "mount" mount "$DEV1" "$MNT"
mkdir -p "$MNT/dir/sub"
for i in 1 2 3 4 5 6 7 8; do head -c $((i * 300 * 1024 + i * 7)) /dev/urandom > "$MNT/file$i"; done
for i in $(seq 1 200); do echo "small file $i" > "$MNT/dir/sub/s$i"; done
head -c 6M /dev/urandom > "$MNT/dir/big"
(cd "$MNT" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > /tmp/sums
ok "wrote $(wc -l < /tmp/sums) files ($(du -sh "$MNT" | cut -f1))"
check "umount" umount "$MNT"
fsck_out=$(fsck.ext4 -f -n "$DEV1" 2>&1) || { echo "$fsck_out"; die "fsck -f -n reports problems"; }
ok "fsck.ext4 -f -n clean: $(tail -n1 <<<"$fsck_out")"
echo 3 > /proc/sys/vm/drop_caches
check "remount" mount "$DEV1" "$MNT"
check "checksums after remount" bash -c "cd $MNT && sha256sum --quiet -c /tmp/sums"
check "umount" umount "$MNT"

step "fio figures over iSER (${FIO_RUNTIME}s each)"
fio_bench_table iscsitd iser "$DEV0"
check "logout over iSER" node --logout
# The daemon logs the count when the connection's completion task ends, just after logout.
wait_for 10 "iscsitd's count of SCSI Responses sent with invalidate" \
    grep -Eq 'sends=[1-9][0-9]* .*SCSI Responses sent with invalidate|SCSI Responses sent with invalidate.*sends=[1-9]' "$RES/iscsitd.log"
grep -a 'SCSI Responses sent with invalidate' "$RES/iscsitd.log" | tail -n 2
ok "iscsitd sent SCSI Responses with invalidate"
iser_errs=$(dmesg | grep -E 'iser: .*(unexpected remote invalidation|Bogus remote invalidation|failed to get task)' || true)
[ -z "$iser_errs" ] || { echo "$iser_errs"; die "ib_iser refused a remote invalidation"; }
# ib_iser reports every async event at error level, the GID table being filled when rxe0 comes
# up included (IB_EVENT_GID_CHANGE, 18: whether it lands depends on the boot's timing): not an
# error of the session.
iser_errs=$(dmesg --level=emerg,alert,crit,err | grep -E '(^|\] )iser: ' | grep -v 'async event GID changed (18)' || true)
[ -z "$iser_errs" ] || { echo "$iser_errs"; die "ib_iser logged errors"; }
ok "no ib_iser error in dmesg"
iscsiadm -m node -o delete >/dev/null 2>&1 || true

step "the same over TCP, same portal and LU"
iscsiadm -m discovery -t sendtargets -p "$PORTAL" >/dev/null || die "TCP discovery"
check "login over TCP" node --login
DEV0=$(wait_disk "$IQN" 0) || die "LUN 0 did not appear over TCP"
expect_match "session transport is tcp" "$(iscsiadm -m session -P3)" "Iface Transport: tcp"
fio_bench_table iscsitd tcp "$DEV0"
check "logout over TCP" node --logout
if dmesg | grep -E 'I/O error|Buffer I/O error|EXT4-fs error'; then die "kernel logged I/O or ext4 errors"; fi
ok "no I/O or ext4 errors in dmesg"
kill "$ISCSITD_PID"; wait "$ISCSITD_PID" 2>/dev/null || true
echo "--- fio table (kernel initiator, TCG, ${FIO_RUNTIME}s per job)"
cat "$RES/fio-table.txt"
finish
