#!/bin/bash
# The link pulled in the middle of I/O, twice: our iscsi CLI writes a 192 MiB pattern over iSER
# with 4 connections per session to iscsitd.
#
# Phase 1, the cable: the netdev under rxe0 goes down. The target must notice by itself (NOP-In
# pings and the RC retries run out, the QPs flush) and let go of everything: `itadm --json
# inspect` with no session, connection or task and its iSER registered-memory gauge back at the
# idle value taken before the I/O. Then the link comes back and the same running `iscsi write`
# completes; a read of the LU gives back exactly the pattern.
# Soft-RoCE in this guest (Debian 12's rdma_rxe) does not survive a flap under RC traffic: from
# then on every packet rxe sends to its own address is lost (its sent_pkts counter grows with
# each CM REQ, rcvd_pkts stays frozen; route/neigh flushes and re-adding the IP address do not
# help), so no rdma_cm connection succeeds, ours or perftest's. The test checks that (an
# ib_send_bw -R probe) and, when it is so, brings the link back the way that works: rxe0
# deleted and added again on the netdev — part of the test's link-return, and only possible
# because both our processes let go of the device when it is removed (below).
#
# Phase 2, the device: `rdma link delete rxe0` under a write. The deletion must complete while
# iscsitd and the initiator run (rdma_rxe has no ucontext disassociate: the kernel waits until
# every process has closed its contexts of the device), i.e. both tear down everything on
# RDMA_CM_EVENT_DEVICE_REMOVAL (and have librdmacm close its own context: see rxe1 below); the target frees every session, connection, task and region;
# `rdma link add` brings the device back, iscsitd listens again by itself and the interrupted
# write completes. Prints how long each step took.
. "$(dirname "$0")/lib.sh"
IQN=$IRONSTAR_IQN:pull
CLI_IQN=iqn.2026-11.dev.ironstar:cli-pull
PORTAL=$RDMA_IP:3260
URL=iser://$PORTAL/$IQN/0
MIB=192
export ISCSI_LOG=info,iscsi_initiator=debug,iser=debug

rxe_up
NETDEV=$(rdma link show | sed -n 's/^link rxe0\/.* netdev \([^ ]*\).*/\1/p' | head -1)
[ -n "$NETDEV" ] || die "no netdev under rxe0"
ok "rxe0 sits on $NETDEV"
# A second Soft-RoCE device that is never removed (rxe1 on a dummy netdev, carrying no traffic).
# librdmacm keeps a verbs context of every device it used open by itself and lets go of a removed
# one only when it re-reads its device list — which it skips while the list is empty
# (rdma-core 44 and upstream: sync_devices_list returns ENODEV before comparing). With rxe0
# the only device, the removal would wait until our processes exit; with this one it completes
# as soon as they have released rxe0 (what phase 2 checks).
modprobe dummy
ip link add rxeanchor type dummy && ip link set dev rxeanchor up || die "dummy netdev rxeanchor"
rdma link add rxe1 type rxe netdev rxeanchor || die "rdma link add rxe1 on rxeanchor"
ok "rxe1 on the dummy netdev rxeanchor keeps librdmacm's device list from going empty"
step "iscsitd: 256 MiB memory LU, iSER portal $PORTAL, NOP-In after 2 s of silence"
cat > /tmp/iscsitd.toml <<EOT
[defaults]
nop_in_interval = 2
nop_in_timeout = 5

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
RUST_LOG=info,iser=debug start_iscsitd_iser /tmp/iscsitd.toml
ok "iscsitd (pid $ISCSITD_PID) on $PORTAL"

# From `itadm --json inspect`: the iSER gauge as "regions bytes", and what is still alive.
gauge() { timeout 10 itadm --json inspect 2>/dev/null | gauge_of; }
# gauge_of: the same from `itadm --json inspect` output on stdin.
gauge_of() {
    local j
    j=$(tr -d ' \n' | grep -o '"iser":{[^}]*}') || return 0
    echo "$(grep -o '"regions":[0-9]*' <<<"$j" | cut -d: -f2) $(grep -o '"registered_bytes":[0-9]*' <<<"$j" | cut -d: -f2)"
}
gauge_idle() { [ "$(gauge)" = "$IDLE" ]; }
alive() { timeout 10 itadm inspect 2>/dev/null | grep -c 'Session TSIH\|Connection CID\|Tasks in flight' || true; }
connections() { timeout 10 itadm inspect 2>/dev/null | grep -c 'Connection CID' || true; }
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN {printf "%.1f", a - b}'; }
rxe_counts() { timeout 5 rdma statistic show link rxe0/1 2>/dev/null | grep -o 'sent_pkts [0-9]*\|rcvd_pkts [0-9]*' | tr '\n' ' '; }
rxe_active() { rdma link show | grep -q "^link rxe0/.*state ACTIVE"; }

IDLE=$(gauge)
[ "$IDLE" != " " ] && [ -n "$IDLE" ] || { itadm --json inspect; die "no \"iser\" gauge in itadm --json inspect"; }
ok "idle iSER gauge before any I/O: regions/bytes $IDLE"
itadm inspect | grep 'iSER registered memory' || die "no iSER line in itadm inspect"

# start_write NAME: a $MIB MiB write of a fresh pattern, 4 connections; pid in WP, once all 4 are up.
start_write() {
    head -c $((MIB * 1024 * 1024)) /dev/urandom > "/tmp/pattern-$1"
    iscsi --initiator-name "$CLI_IQN" --connections 4 --timeout 180 --replacement-timeout 180 \
        write "$URL" --lba 0 -i "/tmp/pattern-$1" > "/tmp/write-$1.txt" 2>&1 &
    WP=$!
    wait_for 60 "4 connections in itadm inspect" bash -c "[ \$(itadm inspect | grep -c 'Connection CID') -eq 4 ]"
    timeout 10 itadm --json inspect > "$RES/inspect-before-$1.json" 2>&1 || true
    BUSY=$(gauge_of < "$RES/inspect-before-$1.json")
    kill -0 "$WP" 2>/dev/null || { cat "/tmp/write-$1.txt"; die "the write ended before the pull (too fast: raise MIB)"; }
}
# threads PID: each thread's state, wait channel, syscall and kernel stack (when a process hangs).
threads() {
    local t
    echo "--- threads of pid $1 ($(cat /proc/$1/comm 2>/dev/null)):"
    for t in /proc/$1/task/*; do
        echo "  tid ${t##*/} $(cut -d' ' -f3 "$t/stat" 2>/dev/null) wchan=$(cat "$t/wchan" 2>/dev/null) syscall=$(cut -d' ' -f1 "$t/syscall" 2>/dev/null) | $(tr '\n' ' ' < "$t/stack" 2>/dev/null | cut -c1-300)"
        futex_owner "$1" "$t"
    done
}
# futex_owner PID TASKDIR: for a thread in futex(2), the mapping its futex word lies in (which
# library's lock, or the heap), as file+offset, so a user-space deadlock can be placed without gdb.
futex_owner() {
    local sc addr
    read -r -a sc < "$2/syscall" 2>/dev/null || return 0
    [ "${sc[0]:-}" = 202 ] || return 0
    addr=$((sc[1]))
    local range perms off dev inode path lo hi
    while read -r range perms off dev inode path; do
        lo=$((16#${range%-*})); hi=$((16#${range#*-}))
        if ((addr >= lo && addr < hi)); then
            printf '      futex %s op %s in %s +0x%x (%s, file offset 0x%s)\n' "${sc[1]}" "${sc[2]:-}" \
                "${path:-[anon]}" $((addr - lo)) "$perms" "$off"
            return 0
        fi
    done < "/proc/$1/maps"
}
# admin_ok: iscsitd's admin socket answers within 10 s; otherwise show where its threads are.
admin_ok() {
    timeout 10 itadm inspect >/dev/null 2>&1 && return 0
    threads "$ISCSITD_PID"
    [ -z "${WP:-}" ] || threads "$WP"
    die "iscsitd's admin socket does not answer (itadm inspect hung 10 s)"
}
# wait_freed T0 NAME: the target holds no session, connection or task and the gauge is idle; FREED = s since T0.
wait_freed() {
    local i g
    FREED=''
    for ((i = 0; i < 600; i++)); do
        admin_ok
        g=$(gauge)
        if [ "$(alive)" -eq 0 ] && [ "$g" = "$IDLE" ]; then FREED=$(since "$1"); break; fi
        sleep 0.2
    done
    timeout 10 itadm --json inspect > "$RES/inspect-after-$2.json" 2>&1 || true
    timeout 10 itadm inspect > "$RES/inspect-after-$2.txt" 2>&1 || true
    [ -n "$FREED" ] || { cat "$RES/inspect-after-$2.txt"; die "target still holds something 120 s after the pull (gauge $(gauge), idle $IDLE)"; }
}
# finish_write NAME T0: the interrupted write completes (within 240 s of T0); DONE = s since T0.
finish_write() {
    local i
    for ((i = 0; i < 1200; i++)); do
        kill -0 "$WP" 2>/dev/null || break
        if [ $((i % 50)) -eq 0 ]; then echo "  [$(since "$2")s] connections $(connections) | rxe0 $(rxe_counts)"; fi
        sleep 0.2
    done
    cp "/tmp/write-$1.txt" "$RES/write-$1.txt"
    if kill -0 "$WP" 2>/dev/null; then
        grep -v 'DEBUG.*\(sent\|received\)' "/tmp/write-$1.txt" | tail -n 30 | cut -c1-300
        die "the interrupted write ($1) did not complete within 240 s"
    fi
    wait "$WP" || { grep -v 'DEBUG.*\(sent\|received\)' "/tmp/write-$1.txt" | tail -n 30 | cut -c1-300; die "the interrupted write ($1) failed"; }
    DONE=$(since "$2")
    grep -E 'session reinstated|connection reinstated|reconnect failed' "/tmp/write-$1.txt" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | tail -n 6
}
# read_back NAME: the LU holds exactly the pattern of write NAME.
read_back() {
    local t
    t=$(now)
    ISCSI_LOG=warn timeout 300 iscsi --initiator-name "$CLI_IQN" --connections 4 read "$URL" --lba 0 --blocks $((MIB * 2048)) -o /tmp/readback ||
        die "read back"
    check "read back $MIB MiB in $(since "$t")s: identical to the pattern written across the pull ($1)" cmp "/tmp/pattern-$1" /tmp/readback
    rm -f /tmp/readback
    wait_for 60 "the session gone after the read" bash -c "[ \$(itadm inspect | grep -c 'Session TSIH') -eq 0 ]"
    wait_for 30 "the iSER gauge back at idle after the read" gauge_idle
}
# holders: who still has the device open (uverbs files per process, rdma resources), our logs.
holders() {
    local f p
    echo "--- processes with /dev/infiniband/uverbs* open:"
    for f in /proc/[0-9]*/fd/*; do
        # (the node itself is gone once the removal started: "... (deleted)")
        if readlink "$f" 2>/dev/null | grep -q 'infiniband/uverbs'; then
            p=${f#/proc/}; p=${p%%/*}
            echo "  pid $p ($(cat /proc/$p/comm 2>/dev/null)) fd ${f##*/} -> $(readlink "$f")"
        fi
    done
    for r in pd mr cq qp cm_id ctx; do timeout 5 rdma resource show "$r" 2>&1 | head -n 8 | sed "s/^/  $r: /"; done
    echo "--- iscsitd log (tail):"; grep -v DEBUG "$RES/iscsitd.log" | tail -n 12 | cut -c1-250
    for w in /tmp/write-*.txt; do echo "--- $w (tail):"; sed 's/\x1b\[[0-9;]*m//g' "$w" | grep -v 'DEBUG.*\(sent\|received\)' | tail -n 12 | cut -c1-250; done
}
# delete_rxe: rdma link delete rxe0 in the background (a D-state wait cannot be timed out), up
# to 60 s; it must return while our processes run. DEL = s it took.
delete_rxe() {
    local t i dp
    t=$(now)
    rdma link delete rxe0 &
    dp=$!
    for ((i = 0; i < 300; i++)); do kill -0 "$dp" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$dp" 2>/dev/null; then
        holders
        die "rdma link delete rxe0 did not complete within 60 s: a process still holds the device"
    fi
    wait "$dp" || die "rdma link delete rxe0 failed"
    DEL=$(since "$t")
}
# add_rxe: rxe0 back on the netdev; T_ADD when ACTIVE.
add_rxe() {
    rdma link add rxe0 type rxe netdev "$NETDEV" || die "rdma link add rxe0 type rxe netdev $NETDEV"
    wait_for 20 "rxe0 ACTIVE again" rxe_active
    T_ADD=$(now)
    ok "rxe0 added again on $NETDEV"
}

DEL1=''
step "phase 1: a $MIB MiB write over iSER, 4 connections, and the link ($NETDEV) pulled under it"
start_write flap
DEFROUTE=$(ip route show default | head -1)
ip link set dev "$NETDEV" down || die "ip link set dev $NETDEV down"
T_DOWN=$(now)
ok "$NETDEV down under the write (4 connections, iSER gauge $BUSY)"
wait_freed "$T_DOWN" flap
FREED1=$FREED
ok "link down -> target freed every session, connection, task and iSER region in ${FREED1}s (gauge $(gauge) = idle $IDLE)"
kill -0 "$WP" 2>/dev/null || { cat /tmp/write-flap.txt; die "the write gave up while the link was down"; }
ok "the write is still waiting for its session (pid $WP)"

step "phase 1: the link back"
timeout 20 ip link set dev "$NETDEV" up || die "ip link set dev $NETDEV up"
T_UP=$(now)
[ -z "$DEFROUTE" ] || timeout 10 ip route replace $DEFROUTE || true
wait_for 20 "rxe0 ACTIVE after the link came back" rxe_active
ok "$NETDEV up, rxe0 ACTIVE"
# Does rdma_cm work on this rxe after the flap? perftest alone, not our code.
before=$(rxe_counts)
timeout 12 ib_send_bw -R -d rxe0 -n 5 -p 18515 > /tmp/sbw-server.txt 2>&1 &
sbw=$!
sleep 2
if timeout 8 ib_send_bw -R -d rxe0 -n 5 -p 18515 "$RDMA_IP" > /tmp/sbw-client.txt 2>&1; then PROBE=ok; else PROBE=failed; fi
wait "$sbw" 2>/dev/null || true   # not a bare `wait`: iscsitd and the write are background jobs too
echo "  rdma_cm probe after the flap (ib_send_bw -R): $PROBE; rxe0 before: $before; after: $(rxe_counts)"
if [ "$PROBE" = ok ]; then
    LINKBACK="link up"
    ok "rdma_cm works after the flap: the initiator reconnects by itself"
else
    LINKBACK="link up + rxe0 deleted and added again (the guest's rxe loses its own traffic after the flap)"
    ok "rdma_cm does not work on this rxe after the flap (sent_pkts grows, rcvd_pkts does not): rxe0 is re-created"
    delete_rxe
    DEL1=$DEL
    ok "rdma link delete rxe0 returned in ${DEL1}s with iscsitd and the initiator running"
    add_rxe
fi
finish_write flap "$T_UP"
REC1=$DONE
AFTER_ADD=''
[ -z "$DEL1" ] || AFTER_ADD=", $(since "$T_ADD")s after rxe0 was back"
ok "phase 1: the interrupted write completed ${REC1}s after the link came back${AFTER_ADD} ($LINKBACK)"
read_back flap

step "phase 2: a $MIB MiB write over iSER, 4 connections, and rxe0 deleted under it"
# relisten_wait: iscsitd logs one more "listening again" than RELISTENS within 30 s, or fails
# with every iscsitd thread's state (and, for a thread in futex(2), whose lock it waits on).
relistened() { [ "$(grep -c "INFO.*listening again on $PORTAL" "$RES/iscsitd.log")" -gt "$RELISTENS" ]; }
relisten_wait() {
    local i
    for ((i = 0; i < 150; i++)); do relistened && return 0; sleep 0.2; done
    threads "$ISCSITD_PID"
    tail -n 20 "$RES/iscsitd.log"
    die "iscsitd did not listen again within 30 s of rdma link add"
}
for attempt in 1 2 3; do
    start_write del
    T_DEL=$(now)
    delete_rxe
    DEL2=$DEL
    ok "rdma link delete rxe0 under the write (iSER gauge $BUSY) returned in ${DEL2}s with iscsitd and the initiator running"
    wait_freed "$T_DEL" del
    FREED2=$FREED
    ok "device deleted -> target freed every session, connection, task and iSER region in ${FREED2}s (gauge $(gauge) = idle $IDLE)"
    kill -0 "$WP" 2>/dev/null && break
    # The write may have ended on its own just before the delete landed: nothing interrupted.
    if wait "$WP" && grep -q '^wrote ' /tmp/write-del.txt; then
        ((attempt < 3)) || die "the write finished before the delete every time (too fast: raise MIB)"
        echo "  the write finished before the delete landed (attempt $attempt): again"
        RELISTENS=$(grep -c "INFO.*listening again on $PORTAL" "$RES/iscsitd.log" || true)
        add_rxe
        relisten_wait
        continue
    fi
    cat /tmp/write-del.txt
    die "the write gave up while the device was gone"
done
ok "the write is still waiting for its session (pid $WP)"
sleep 2
# Earlier adds already logged re-listens: wait for one more than were there before this one.
RELISTENS=$(grep -c "INFO.*listening again on $PORTAL" "$RES/iscsitd.log" || true)
add_rxe
relisten_wait
ok "iscsitd listens again on $PORTAL ($(since "$T_ADD")s after the add)"
finish_write del "$T_ADD"
REC2=$DONE
ok "phase 2: the interrupted write completed ${REC2}s after rxe0 came back"
read_back del
PHASE2="rxe0 added back: iscsitd listened again and the write completed ${REC2}s later; both read back identical"

echo "link pulled under a 4-connection iSER write: (1) $NETDEV down: target freed all in ${FREED1}s; back by $LINKBACK${DEL1:+ (delete took ${DEL1}s)}: the write completed ${REC1}s after link up${AFTER_ADD}; read back identical; (2) rdma link delete rxe0: returned in ${DEL2}s, target freed all in ${FREED2}s; $PHASE2" |
    tee "$RES/link-pull.txt"
kill -0 "$ISCSITD_PID" || die "iscsitd died"
if grep -q -i panick "$RES/iscsitd.log"; then die "iscsitd panicked"; fi
kill "$ISCSITD_PID"
# Bounded, so that a hang in iscsitd's shutdown shows here rather than as the VM's timeout.
for ((i = 0; i < 50; i++)); do kill -0 "$ISCSITD_PID" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$ISCSITD_PID" 2>/dev/null; then
    echo "iscsitd did not stop within 10 s of SIGTERM: SIGKILL"
    kill -9 "$ISCSITD_PID"
fi
wait "$ISCSITD_PID" 2>/dev/null || true
finish
