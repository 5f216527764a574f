#!/bin/bash
# Our iscsi CLI -> LIO's iSER target (ib_isert on Soft-RoCE, np iser = 1 via configfs):
# discovery and ls over iSER, a verified 64 MiB round trip and a short bench, all over
# iser:// URLs; no session reinstated during the bench, no isert work-request failure in dmesg.
. "$(dirname "$0")/lib.sh"
LIO_IQN=iqn.2003-01.org.linux-iscsi.testbed:cli-iser
CLI_IQN=iqn.2026-11.dev.ironstar:cli-iser
PORTAL=$RDMA_IP:3260
URL=iser://$PORTAL/$LIO_IQN/0

rxe_up
step "LIO: 128 MiB ramdisk LUN 0, iSER portal $PORTAL, open ACLs"
TPG=$(lio_target "$LIO_IQN")
lio_ramdisk ram0 128
lio_lun "$TPG" 0 core/rd_mcp_0/ram0
lio_iser_portal "$TPG"
echo 1 > "$TPG/attrib/generate_node_acls"
echo 0 > "$TPG/attrib/demo_mode_write_protect"
echo 0 > "$TPG/attrib/authentication"
echo 1 > "$TPG/enable"
wait_for 10 "LIO listening on $PORTAL" port_open "$RDMA_IP" 3260
ok "LIO target $LIO_IQN on $PORTAL (iSER)"
cli() { timeout 120 iscsi --initiator-name "$CLI_IQN" "$@"; }

step "iscsi discover / ls over iSER"
out=$(cli discover "iser://$PORTAL" 2>&1) || { echo "$out"; die "discover over iSER"; }
echo "$out"
expect_match "iSER discovery lists $LIO_IQN" "$out" "$LIO_IQN"
out=$(cli ls "iser://$PORTAL" 2>&1) || { echo "$out"; die "ls over iSER"; }
echo "$out"
expect_match "ls over iSER shows LUN 0 as a 128 MiB disk" "$out" "Lun 0: disk.*128(\.0)? MiB"
out=$(cli inq "$URL" 2>&1) || { echo "$out"; die "inq over iSER"; }
expect_match "INQUIRY over iSER: vendor LIO-ORG" "$out" "LIO-ORG"

step "64 MiB round trip over iSER"
head -c $((64 * 1024 * 1024)) /dev/urandom > /tmp/pattern
t=$(date +%s.%N)
cli write "$URL" --lba 0 -i /tmp/pattern || die "write over iSER"
w=$(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN {printf "%.2f", a - b}')
t=$(date +%s.%N)
cli read "$URL" --lba 0 --blocks 131072 -o /tmp/readback || die "read over iSER"
r=$(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN {printf "%.2f", a - b}')
check "64 MiB round trip over iSER: write ${w}s, read ${r}s, identical" cmp /tmp/pattern /tmp/readback
echo "cli->LIO 64 MiB iser: write $(awk -v s="$w" 'BEGIN {printf "%.1f", 64 / s}') MiB/s, read $(awk -v s="$r" 'BEGIN {printf "%.1f", 64 / s}') MiB/s" >> "$RES/roundtrip.txt"

step "iscsi bench over iSER (3 s each)"
for job in "randread 4k 32" "randwrite 4k 32" "read 128k 8" "write 128k 8"; do
    set -- $job
    out=$(cli bench "$URL" --rw "$1" --bs "$2" --qd "$3" --duration 3 2>&1) || { echo "$out"; die "bench $1 $2"; }
    line=$(grep -m1 'IOPS:' <<<"$out")
    expect_match "bench $1 $2 QD$3 over iSER: $line" "$out" "errors: 0"
    # Retries can hide a broken connection behind "errors: 0": the session must
    # never have been reinstated (the CLI warns "connection lost; reinstating").
    if grep -Ei 'reinstat|connection lost' <<<"$out"; then
        die "bench $1 $2 QD$3 over iSER: the session was reinstated (lines above)"
    fi
    echo "cli->LIO iser bench $1 $2 QD$3: $line" >> "$RES/roundtrip.txt"
done
# isert logs every failed work completion (flushes aside): a SEND of ours that
# does not fit its receive buffers shows up as "recv failure: local QP operation error".
wc_errors=$(dmesg | grep 'isert_print_wc' || true)
[ -z "$wc_errors" ] || { echo "$wc_errors"; die "isert reported failed work requests over this test"; }
ok "no isert work request failed (dmesg) and no session was reinstated"
finish
