#!/bin/bash
# Linux kernel initiator (open-iscsi, iscsi_tcp) -> our iscsitd over TCP, both in the guest.
# CHAP, CRC32C header+data digests, fio with verify, ext4 round trip with fsck, logout/login,
# a fio verify=crc32c write stream across a SIGKILL of the daemon and a killed connection,
# and a daemon restart under an idle mounted filesystem that the kernel must ride out.
. "$(dirname "$0")/lib.sh"
IQN=$IRONSTAR_IQN
PORTAL=127.0.0.1:3260
CHAP_USER=vmuser
CHAP_SECRET=vm-chap-secret-0123
MNT=/mnt/lun1

step "iscsitd: 256 MiB memory LU (LUN 0), 128 MiB file LU (LUN 1), CHAP for $KERNEL_INITIATOR"
truncate -s 128M /tmp/lun1.img
cat > /tmp/iscsitd.toml <<EOT
[[portal_group]]
tag = 1
portals = ["$PORTAL"]

[[target]]
iqn = "$IQN"
portal_groups = [1]
auth = "chap"

[[target.lun]]
lun = 0
backend = "memory"
size = "256MiB"

[[target.lun]]
lun = 1
backend = "file"
path = "/tmp/lun1.img"

[[initiator]]
name = "$KERNEL_INITIATOR"
chap_user = "$CHAP_USER"
chap_secret = "$CHAP_SECRET"

[discovery]
auth = "none"
EOT
cp /tmp/iscsitd.toml "$RES/"
start_iscsitd /tmp/iscsitd.toml
ok "iscsitd (pid $ISCSITD_PID) listens on $PORTAL"
start_iscsid

step "discovery"
disc=$(iscsiadm -m discovery -t sendtargets -p "$PORTAL")
echo "$disc"
expect_match "SendTargets lists $IQN at $PORTAL" "$disc" "^$PORTAL,1 $IQN\$"

step "login with CHAP and CRC32C digests"
node() { iscsiadm -m node -T "$IQN" -p "$PORTAL" "$@"; }
nset() { node -o update -n "$1" -v "$2"; }
nset node.session.auth.authmethod CHAP
nset node.session.auth.username "$CHAP_USER"
nset node.session.auth.password "wrong-secret-0123"
if node --login >/tmp/badlogin.txt 2>&1; then die "login with a wrong CHAP secret succeeded"; fi
ok "login with a wrong CHAP secret refused ($(grep -o 'authorization failure\|Login failed.*' /tmp/badlogin.txt | head -n1))"
nset node.session.auth.password "$CHAP_SECRET"
nset node.conn[0].iscsi.HeaderDigest CRC32C
nset node.conn[0].iscsi.DataDigest CRC32C
nset node.session.timeo.replacement_timeout 180
login_s=$(date +%s.%N)
check "login" node --login
DEV0=$(wait_disk "$IQN" 0) || die "LUN 0 did not appear"
DEV1=$(wait_disk "$IQN" 1) || die "LUN 1 did not appear"
ok "login + disks in $(awk -v a="$(date +%s.%N)" -v b="$login_s" 'BEGIN {printf "%.2f", a - b}') s: LUN 0 $DEV0, LUN 1 $DEV1"
p2=$(iscsiadm -m session -P2)
expect_match "session LOGGED_IN" "$p2" "iSCSI Session State: LOGGED_IN"
expect_match "HeaderDigest negotiated" "$p2" "HeaderDigest: CRC32C"
expect_match "DataDigest negotiated" "$p2" "DataDigest: CRC32C"
expect_match "CHAP user in use" "$p2" "username: $CHAP_USER"
expect_eq "LUN 0 size" "$(blockdev --getsize64 "$DEV0")" 268435456
expect_eq "LUN 1 size" "$(blockdev --getsize64 "$DEV1")" 134217728
lsscsi 2>/dev/null || true

step "fio verify=crc32c on LUN 0 ($DEV0)"
fio_verify "$DEV0" randrw-4k --rw=randrw --bs=4k --iodepth=16 --size=8M
fio_verify "$DEV0" seq-128k --rw=write --bs=128k --iodepth=8 --size=32M
fio_verify "$DEV0" seq-128k-2jobs --rw=write --bs=128k --iodepth=4 --offset=128M --size=16M --numjobs=2 --offset_increment=64M --group_reporting
step "fio figures, LUN 0 (${FIO_RUNTIME}s each)"
fio_bench "kernel->iscsitd memory LU" "$DEV0"

# Faults under a verified write stream on the file LU: the daemon SIGKILLed and restarted,
# then its side of the connection killed (ss -K). fio writes with crc32c headers; every block
# it was told was written must verify afterwards (nothing acknowledged is lost).
step "fio verify=crc32c on LUN 1 ($DEV1) across a SIGKILL of iscsitd and a killed connection"
fault_fio=(fio --name=faults --filename="$DEV1" --ioengine=libaio --direct=1 --rw=randwrite
           --bs=4k --iodepth=16 --size=24M --verify=crc32c --verify_fatal=1
           --output-format=terse --terse-version=3)
"${fault_fio[@]}" --do_verify=0 > "$RES/fio-faults-write.txt" 2>&1 &
fio_pid=$!
sleep 2
kill -KILL "$ISCSITD_PID"; wait "$ISCSITD_PID" 2>/dev/null || true
ok "iscsitd SIGKILLed under the write stream"
sleep 1
start_iscsitd /tmp/iscsitd.toml
ok "iscsitd restarted (pid $ISCSITD_PID)"
wait_for 120 "kernel initiator to log in again" bash -c \
    "iscsiadm -m session -P1 | grep -q 'iSCSI Connection State: LOGGED IN'"
sleep 2
if kill -0 "$fio_pid" 2>/dev/null; then
    if ss -K state established '( sport = :3260 )' >/dev/null 2>&1; then
        ok "killed the target's side of the connection under the stream (ss -K)"
    else
        ok "ss -K not available in this kernel: connection kill skipped"
    fi
fi
wait "$fio_pid" || { cat "$RES/fio-faults-write.txt"; die "fio write stream failed across the faults"; }
awk -F';' 'NF > 50 && $5 != 0 {exit 1}' "$RES/fio-faults-write.txt" ||
    { cat "$RES/fio-faults-write.txt"; die "fio reported errors across the faults"; }
wait_for 120 "session logged in before the verify pass" bash -c \
    "iscsiadm -m session -P1 | grep -q 'iSCSI Connection State: LOGGED IN'"
echo 3 > /proc/sys/vm/drop_caches
"${fault_fio[@]}" --verify_only > "$RES/fio-faults-verify.txt" 2>&1 ||
    { cat "$RES/fio-faults-verify.txt"; die "blocks written across the faults do not verify"; }
awk -F';' 'NF > 50 && $5 != 0 {exit 1}' "$RES/fio-faults-verify.txt" ||
    { cat "$RES/fio-faults-verify.txt"; die "fio verify reported errors"; }
ok "every block fio wrote across the SIGKILL and the killed connection verifies (crc32c)"

step "ext4 on LUN 1 ($DEV1)"
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
check "remount" mount "$DEV1" "$MNT"
check "checksums after remount" bash -c "cd $MNT && sha256sum --quiet -c /tmp/sums"
check "umount" umount "$MNT"

step "logout and login again"
check "logout" node --logout
if [ -n "$(disk_for_lun "$IQN" 1)" ] || iscsiadm -m session >/dev/null 2>&1; then die "session still there after logout"; fi
ok "no session after logout"
check "login again" node --login
DEV1=$(wait_disk "$IQN" 1) || die "LUN 1 did not come back"
check "mount after re-login" mount "$DEV1" "$MNT"
check "checksums after re-login" bash -c "cd $MNT && sha256sum --quiet -c /tmp/sums"

restart_daemon() { # restart_daemon SIGNAL: stop iscsitd with SIGNAL under the idle mount, start it again
    local sig=$1 sid t
    sync; echo 3 > /proc/sys/vm/drop_caches
    sid=$(iscsiadm -m session | awk '{print $2}' | tr -d '[]')
    step "restart iscsitd with SIG$sig under the idle mounted filesystem"
    kill -s "$sig" "$ISCSITD_PID"
    wait "$ISCSITD_PID" 2>/dev/null || true
    ok "iscsitd stopped (SIG$sig)"
    sleep 2
    start_iscsitd /tmp/iscsitd.toml
    ok "iscsitd restarted (pid $ISCSITD_PID)"
    t=$(date +%s.%N)
    wait_for 120 "kernel initiator to log in again" bash -c \
        "iscsiadm -m session -P1 | grep -q 'iSCSI Session State: LOGGED_IN' &&
         iscsiadm -m session -P1 | grep -q 'iSCSI Connection State: LOGGED IN'"
    ok "session $sid LOGGED_IN again $(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN {printf "%.1f", a - b}') s after the restart"
    expect_eq "same session id" "$(iscsiadm -m session | awk '{print $2}' | tr -d '[]')" "$sid"
    check "reads after reconnect (checksums, caches dropped)" bash -c "cd $MNT && sha256sum --quiet -c /tmp/sums"
    head -c 1M /dev/urandom > "$MNT/after-$sig"
    sync
    (cd "$MNT" && sha256sum "after-$sig") >> /tmp/sums
    echo 3 > /proc/sys/vm/drop_caches
    check "write + read back after reconnect" bash -c "cd $MNT && sha256sum --quiet -c /tmp/sums"
}
restart_daemon KILL
restart_daemon TERM

step "final unmount and fsck"
check "umount" umount "$MNT"
fsck_out=$(fsck.ext4 -f -n "$DEV1" 2>&1) || { echo "$fsck_out"; die "fsck after the restarts reports problems"; }
ok "fsck.ext4 -f -n clean after the restarts"
check "logout" node --logout
if dmesg | grep -E 'I/O error|Buffer I/O error|EXT4-fs error'; then die "kernel logged I/O or ext4 errors"; fi
ok "no I/O or ext4 errors in dmesg"
kill "$ISCSITD_PID"; wait "$ISCSITD_PID" 2>/dev/null || true
finish
