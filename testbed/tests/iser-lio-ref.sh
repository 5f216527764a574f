#!/bin/bash
# Reference for the iSER comparison: the Linux kernel initiator -> LIO, over TCP and over
# iSER (ib_isert, Soft-RoCE rxe0 on the guest NIC), one 256 MiB ramdisk LU, the same fio set
# as kernel-lio (4k random read/write QD32, 128k sequential read/write QD8, FIO_RUNTIME s
# each). A 64 MiB write/read/compare and a small fio verify=crc32c run on both first.
# Rows for the note's table go to results/iser-lio-ref/fio-table.txt.
. "$(dirname "$0")/lib.sh"
IQN=iqn.2003-01.org.linux-iscsi.testbed:iser-ref

rxe_up
step "LIO: 256 MiB ramdisk LUN 0, TCP + iSER portal $RDMA_IP:3260, open ACLs"
TPG=$(lio_target "$IQN")
lio_ramdisk ram0 256
lio_lun "$TPG" 0 core/rd_mcp_0/ram0
lio_iser_portal "$TPG"
echo 1 > "$TPG/attrib/generate_node_acls"
echo 0 > "$TPG/attrib/demo_mode_write_protect"
echo 0 > "$TPG/attrib/authentication"
echo 1 > "$TPG/enable"
wait_for 10 "LIO listening on $RDMA_IP:3260" port_open "$RDMA_IP" 3260
ok "LIO target $IQN on $RDMA_IP:3260 (TCP and iSER)"

start_iscsid
modprobe ib_iser
node() { iscsiadm -m node -T "$IQN" -p "$RDMA_IP:3260" "$@"; }

# session TRANSPORT(tcp|iser): discover and log in over TRANSPORT, print the disk.
session() {
    local iface=default
    [ "$1" = iser ] && iface=iser
    iscsiadm -m discovery -t sendtargets -p "$RDMA_IP:3260" -I "$iface" >/dev/null \
        || die "discovery over $1"
    node -I "$iface" --login >/dev/null || die "login over $1"
    wait_disk "$IQN" 0
}

for transport in tcp iser; do
    step "kernel initiator -> LIO over $transport"
    DEV=$(session $transport) || die "no disk over $transport"
    p3=$(iscsiadm -m session -P3)
    if [ $transport = iser ]; then
        expect_match "session transport is iser" "$p3" "Iface Transport: iser"
    else
        expect_match "session transport is tcp" "$p3" "Iface Transport: tcp"
    fi
    head -c 64M /dev/urandom > /tmp/ref.bin
    dd if=/tmp/ref.bin of="$DEV" bs=1M oflag=direct status=none
    dd if="$DEV" of=/tmp/back.bin bs=1M count=64 iflag=direct status=none
    check "64 MiB write/read/compare over $transport" cmp /tmp/ref.bin /tmp/back.bin
    fio_verify "$DEV" "randrw-4k-$transport" --rw=randrw --bs=4k --iodepth=16 --size=4M
    fio_bench_table LIO $transport "$DEV"
    node --logout >/dev/null || die "logout over $transport"
    iscsiadm -m node -o delete >/dev/null 2>&1 || true
    ok "logout over $transport"
done
echo "--- fio table (kernel initiator, TCG, ${FIO_RUNTIME}s per job)"
cat "$RES/fio-table.txt"
finish
