#!/usr/bin/env bash
# tgt-as-iscsitd.sh --config FILE: stands in for iscsitd with tgt (a known-good target), to
# check the interop harness itself (its start/stop, its URLs, its output parsing).
#
#   IRONSTAR_ISCSITD=$PWD/scripts/tgt-as-iscsitd.sh IRONSTAR_TEST_LUN_OFFSET=1 \
#       cargo test -p ironstar-interop --test compliance -- --nocapture
#
# It reads the subset of the config the tests write (one portal, one target, memory/null
# LUs, auth none/chap with one [[initiator]]), serves each LUN N as tgt LUN N+1 (tgt's
# LUN 0 is its controller: hence IRONSTAR_TEST_LUN_OFFSET=1), backed by a file in /dev/shm.
# Needs root and tgt. tgt's "Vendor" is IET, so the inquiry tests fail on purpose.
# A watchdog stops tgtd and removes the files when this script dies, even by SIGKILL.
set -euo pipefail
[ "${1:-}" = --config ] && [ -n "${2:-}" ] || { echo "usage: $0 --config FILE" >&2; exit 2; }
CONF=$2

val() { awk -F'"' -v k="$1" '$0 ~ "^"k" *=" {print $2; exit}' "$CONF"; }
portal=$(val portals)
addr=${portal%:*}
port=${portal##*:}
iqn=$(val iqn)
auth=$(awk -F'"' '/^\[\[target\]\]/ {t=1} t && /^auth *=/ {print $2; exit}' "$CONF")
read -r chap_user chap_secret < <(awk -F'"' '/^\[\[/ {i = ($0 == "[[initiator]]")}
    i && /^chap_user/ {u=$2} i && /^chap_secret/ {s=$2} END {print u, s}' "$CONF")
# "lun size block_size" per [[target.lun]]
luns=$(awk -F' *= *' '/^\[\[/ {if (l != "") print l, sz, bs; l=""; inlun = ($0 == "[[target.lun]]"); sz=""; bs=512}
    inlun && $1 == "lun" {l=$2} inlun && $1 == "size" {gsub(/"/, "", $2); sz=$2}
    inlun && $1 == "block_size" {bs=$2}
    /^\[discovery\]|^\[\[initiator\]\]/ {if (l != "") print l, sz, bs; l=""}
    END {if (l != "") print l, sz, bs}' "$CONF")

ctl=$((port % 30000 + 1))  # tgtd's control port has a small range
T=(tgtadm -C "$ctl" --lld iscsi)
files=()
cleanup() {
    "${T[@]}" --mode target --op delete --force --tid 1 >/dev/null 2>&1 || true
    tgtadm -C "$ctl" --mode system --op delete >/dev/null 2>&1 || true
    rm -f /dev/shm/ironstar-tgt-"$port"-*.img
}

# Listen on 127.0.0.2 until the target is configured, so "port accepts" means "ready".
tgtd -f --control-port "$ctl" --iscsi portal="127.0.0.2:$port" &
tgtd_pid=$!
me=$$
( while kill -0 "$me" 2>/dev/null && kill -0 "$tgtd_pid" 2>/dev/null; do sleep 0.2; done; cleanup ) &
for _ in $(seq 100); do
    tgtadm -C "$ctl" --mode system --op show >/dev/null 2>&1 && break
    sleep 0.05
done
"${T[@]}" --mode target --op new --tid 1 --targetname "$iqn"
while read -r lun size bs; do
    [ -n "$lun" ] || continue
    bytes=$(numfmt --from=iec-i "${size%B}")
    f=/dev/shm/ironstar-tgt-$port-$lun.img
    truncate -s "$bytes" "$f"
    "${T[@]}" --mode logicalunit --op new --tid 1 --lun $((lun + 1)) --backing-store "$f" --blocksize "$bs"
done <<< "$luns"
"${T[@]}" --mode target --op bind --tid 1 --initiator-address ALL
if [ "$auth" = chap ]; then
    "${T[@]}" --mode account --op new --user "$chap_user" --password "$chap_secret"
    "${T[@]}" --mode account --op bind --tid 1 --user "$chap_user"
fi
"${T[@]}" --mode portal --op new --param portal="$addr:$port"
"${T[@]}" --mode portal --op delete --param portal="127.0.0.2:$port"
echo "tgt serving $iqn on $addr:$port (LUNs shifted by one)" >&2
wait "$tgtd_pid"
