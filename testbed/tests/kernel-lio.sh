#!/bin/bash
# Baseline: the Linux kernel initiator -> LIO over TCP on the same guest, with the same LU
# size, CHAP and CRC32C digests as kernel-iscsitd.sh, so that the fio figures of the two can
# be set side by side (TCG: relative figures only). Also checks the peers themselves work.
. "$(dirname "$0")/lib.sh"
IQN=iqn.2003-01.org.linux-iscsi.testbed:kernel
PORTAL=127.0.0.1:3260
CHAP_USER=vmuser CHAP_SECRET=vm-chap-secret-0123

step "LIO: 256 MiB ramdisk LUN 0, CHAP ACL for $KERNEL_INITIATOR"
TPG=$(lio_target "$IQN")
lio_ramdisk ram0 256
lio_lun "$TPG" 0 core/rd_mcp_0/ram0
lio_chap_acl "$TPG" "$KERNEL_INITIATOR" "$CHAP_USER" "$CHAP_SECRET"
echo 0 > "$TPG/attrib/generate_node_acls"
echo 1 > "$TPG/attrib/authentication"
echo 1 > "$TPG/enable"
wait_for 10 "LIO listening on $PORTAL" port_open 127.0.0.1 3260
ok "LIO target $IQN on $PORTAL"

start_iscsid
step "discovery and login (CHAP, CRC32C digests)"
iscsiadm -m discovery -t sendtargets -p "$PORTAL"
node() { iscsiadm -m node -T "$IQN" -p "$PORTAL" "$@"; }
nset() { node -o update -n "$1" -v "$2"; }
nset node.session.auth.authmethod CHAP
nset node.session.auth.username "$CHAP_USER"
nset node.session.auth.password "$CHAP_SECRET"
nset node.conn[0].iscsi.HeaderDigest CRC32C
nset node.conn[0].iscsi.DataDigest CRC32C
check "login" node --login
DEV=$(wait_disk "$IQN" 0) || die "LUN 0 did not appear"
expect_eq "LUN 0 size" "$(blockdev --getsize64 "$DEV")" 268435456
p2=$(iscsiadm -m session -P2)
expect_match "DataDigest negotiated" "$p2" "DataDigest: CRC32C"

step "fio verify=crc32c ($DEV)"
fio_verify "$DEV" randrw-4k --rw=randrw --bs=4k --iodepth=16 --size=8M
fio_verify "$DEV" seq-128k --rw=write --bs=128k --iodepth=8 --size=32M
step "fio figures (${FIO_RUNTIME}s each)"
fio_bench "kernel->LIO ramdisk" "$DEV"
check "logout" node --logout
finish
