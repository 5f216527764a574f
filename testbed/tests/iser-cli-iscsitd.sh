#!/bin/bash
# Our iscsi CLI -> our iscsitd over iSER on Soft-RoCE, 4 connections per session (MC/S):
# a verified 64 MiB round trip and a bench with `itadm inspect` showing the 4 connections.
# Then connections pulled in the middle of I/O: the initiator killed (SIGKILL) under a write
# bench -> the target ends every task and lets go of the session (itadm inspect: no session,
# no task in flight); the daemon killed under a read bench and started again -> our initiator
# reinstates the session and the bench ends without errors.
. "$(dirname "$0")/lib.sh"
IQN=$IRONSTAR_IQN:mcs
CLI_IQN=iqn.2026-11.dev.ironstar:cli-mcs
PORTAL=$RDMA_IP:3260
URL=iser://$PORTAL/$IQN/0

rxe_up
step "iscsitd: 256 MiB memory LU, portal $PORTAL with iser = true"
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

[discovery]
auth = "none"
EOT
cp /tmp/iscsitd.toml "$RES/"
start_iscsitd_iser /tmp/iscsitd.toml
ok "iscsitd (pid $ISCSITD_PID) on $PORTAL"
cli() { timeout 300 iscsi --initiator-name "$CLI_IQN" --connections 4 "$@"; }
connections() { itadm inspect 2>/dev/null | grep -c 'Connection CID' || true; }
sessions() { itadm inspect 2>/dev/null | grep -c 'Session TSIH' || true; }

step "64 MiB round trip over iSER, 4 connections per session"
head -c $((64 * 1024 * 1024)) /dev/urandom > /tmp/pattern
t=$(date +%s.%N)
cli write "$URL" --lba 0 -i /tmp/pattern || die "write"
w=$(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN {printf "%.2f", a - b}')
t=$(date +%s.%N)
cli read "$URL" --lba 0 --blocks 131072 -o /tmp/readback || die "read"
r=$(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN {printf "%.2f", a - b}')
check "64 MiB round trip, 4 iSER connections: write ${w}s, read ${r}s, identical" cmp /tmp/pattern /tmp/readback
echo "cli->iscsitd 64 MiB iser x4: write $(awk -v s="$w" 'BEGIN {printf "%.1f", 64 / s}') MiB/s, read $(awk -v s="$r" 'BEGIN {printf "%.1f", 64 / s}') MiB/s" >> "$RES/roundtrip.txt"

step "bench over 4 iSER connections, seen by itadm inspect"
iscsi --initiator-name "$CLI_IQN" --connections 4 bench "$URL" --rw randread --bs 4k --qd 32 --duration 8 > /tmp/bench.txt 2>&1 &
BP=$!
wait_for 60 "4 connections in itadm inspect" bash -c "[ \$(itadm inspect | grep -c 'Connection CID') -eq 4 ]"
itadm inspect > "$RES/inspect-mcs.txt" 2>&1 || true
ok "itadm inspect: 1 session, $(connections) connections"
wait "$BP" || { cat /tmp/bench.txt; die "bench over 4 connections"; }
cat /tmp/bench.txt
expect_match "bench over 4 iSER connections: $(grep -m1 'IOPS:' /tmp/bench.txt)" "$(cat /tmp/bench.txt)" "errors: 0"
echo "cli->iscsitd iser x4 bench randread 4k QD32: $(grep -m1 'IOPS:' /tmp/bench.txt)" >> "$RES/roundtrip.txt"
wait_for 30 "the session gone after the bench" bash -c "[ \$(itadm inspect | grep -c 'Session TSIH') -eq 0 ]"

step "the initiator killed in the middle of writes"
iscsi --initiator-name "$CLI_IQN" --connections 4 bench "$URL" --rw write --bs 128k --qd 16 --duration 60 > /tmp/bench.txt 2>&1 &
BP=$!
wait_for 60 "4 connections" bash -c "[ \$(itadm inspect | grep -c 'Connection CID') -eq 4 ]"
sleep 2
itadm inspect > "$RES/inspect-before-kill.txt" 2>&1 || true
inflight=$(grep -o 'Tasks in flight: [0-9]*' "$RES/inspect-before-kill.txt" | awk '{s += $4} END {print s + 0}')
kill -9 "$BP"; wait "$BP" 2>/dev/null || true
ok "iscsi killed with $inflight tasks in flight at the last look"
wait_for 60 "the target to drop the session" bash -c "[ \$(itadm inspect | grep -c 'Session TSIH') -eq 0 ]"
itadm inspect > "$RES/inspect-after-kill.txt" 2>&1 || true
if grep -q 'Tasks in flight\|Connection CID' "$RES/inspect-after-kill.txt"; then
    cat "$RES/inspect-after-kill.txt"; die "tasks or connections left after the initiator died"
fi
ok "no session, connection or task left after the initiator died"
kill -0 "$ISCSITD_PID" || die "iscsitd died"
if grep -q -i panick "$RES/iscsitd.log"; then die "iscsitd panicked"; fi
# Our initiator declines Send with Invalidate in its CM REQ: the target never uses it here.
if grep -q 'Send with Invalidate in use' "$RES/iscsitd.log"; then die "Send with Invalidate used with our initiator"; fi
grep -q 'Send with Invalidate not in use' "$RES/iscsitd.log" || die "no iSER connect request logged"
ok "Send with Invalidate not in use with our initiator (it declines it)"

step "the daemon killed in the middle of reads, then started again"
iscsi --initiator-name "$CLI_IQN" --connections 4 bench "$URL" --rw randread --bs 4k --qd 16 --duration 30 --replacement-timeout 120 \
    > /tmp/bench.txt 2>&1 &
BP=$!
wait_for 60 "4 connections" bash -c "[ \$(itadm inspect | grep -c 'Connection CID') -eq 4 ]"
sleep 2
kill -9 "$ISCSITD_PID"; wait "$ISCSITD_PID" 2>/dev/null || true
ok "iscsitd killed (SIGKILL) under I/O"
sleep 3
start_iscsitd_iser /tmp/iscsitd.toml
ok "iscsitd started again (pid $ISCSITD_PID)"
wait_for 90 "our initiator back with 4 connections" bash -c "[ \$(itadm inspect | grep -c 'Connection CID') -eq 4 ]"
ok "the session is back with 4 connections"
wait "$BP" || { cat /tmp/bench.txt; die "bench across the daemon restart"; }
cat /tmp/bench.txt
# The restarted daemon's new nexus reports a power-on UNIT ATTENTION (29/00) once, which the
# bench counts as an error; anything else is a failure.
errs=$(sed -n 's/^errors: //p' /tmp/bench.txt)
uas=$(grep -c 'UNIT ATTENTION (ASC/ASCQ 0x29/0x00)' /tmp/bench.txt || true)
other=$(grep 'iscsi: bench:' /tmp/bench.txt | grep -vc 'UNIT ATTENTION (ASC/ASCQ 0x29/0x00)' || true)
[ -n "$errs" ] && [ "$other" -eq 0 ] && [ "$errs" -le "$uas" ] ||
    die "bench across the restart: $errs errors, $uas power-on unit attentions, $other other"
ok "bench across the restart: $(grep -m1 'IOPS:' /tmp/bench.txt); errors: $errs (all the power-on UNIT ATTENTION of the new nexus)"
kill "$ISCSITD_PID"; wait "$ISCSITD_PID" 2>/dev/null || true
finish
