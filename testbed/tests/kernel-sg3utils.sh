#!/bin/bash
# sg3-utils against our LUN through the kernel initiator: the kernel's view of our SCSI
# emulation (INQUIRY and VPD pages, READ CAPACITY(16), REPORT LUNS, persistent
# reservations, REPORT TARGET PORT GROUPS). Each command must succeed and decode cleanly:
# exit 0 and nothing on stderr.
. "$(dirname "$0")/lib.sh"
IQN=$IRONSTAR_IQN
PORTAL=127.0.0.1:3260

step "iscsitd: two 64 MiB memory LUs, no authentication"
cat > /tmp/iscsitd.toml <<EOT
[[portal_group]]
tag = 1
portals = ["$PORTAL"]

[[target]]
iqn = "$IQN"
portal_groups = [1]

[[target.lun]]
lun = 0
backend = "memory"
size = "64MiB"

[[target.lun]]
lun = 1
backend = "memory"
size = "64MiB"
EOT
start_iscsitd /tmp/iscsitd.toml
start_iscsid
iscsiadm -m discovery -t sendtargets -p "$PORTAL" >/dev/null
check "login" iscsiadm -m node -T "$IQN" -p "$PORTAL" --login
DEV=$(wait_disk "$IQN" 0) || die "LUN 0 did not appear"
ok "LUN 0 is $DEV"

# sg NAME ARGS...: run an sg3-utils command on $DEV; output in $OUT; fails on rc != 0 or stderr.
sg() {
    local name=$1 err; shift
    step "$name $* $DEV"
    err=$(mktemp)
    if ! OUT=$("$name" "$@" "$DEV" 2>"$err"); then
        echo "$OUT"; cat "$err"; die "$name $* failed"
    fi
    echo "$OUT"
    if [ -s "$err" ]; then cat "$err"; die "$name $* wrote to stderr"; fi
    rm -f "$err"
    ok "$name $*"
}

sg sg_inq
expect_match "peripheral: direct access block device" "$OUT" "PDT=0 .*\[0x0\]|Peripheral device type: disk"
expect_match "version SPC-4 or later" "$OUT" "version=0x0[67]"
sg sg_vpd -p 0x00
for p in sn di bl bdc lbpv; do expect_match "page [$p] listed as supported" "$OUT" "\\[$p\\]"; done
sg sg_vpd -p 0x80
expect_match "unit serial number present" "$OUT" "Unit serial number: [^ ]"
sg sg_vpd -p 0x83
expect_match "NAA designator" "$OUT" "designator type: NAA"
expect_match "target port designator" "$OUT" "Relative target port|Target port group|iSCSI name"
sg sg_vpd -p 0xb0
expect_match "block limits decoded" "$OUT" "Maximum transfer length"
sg sg_vpd -p 0xb1
expect_match "block device characteristics decoded" "$OUT" "Medium rotation rate|Non-rotating"
sg sg_vpd -p 0xb2
expect_match "logical block provisioning decoded" "$OUT" "Provisioning type|LBPU"
sg sg_readcap -l
expect_match "64 MiB of 512-byte blocks" "$OUT" "Number of logical blocks=131072"
expect_match "block length 512" "$OUT" "Logical block length=512 bytes"
sg sg_luns
expect_match "LUN 0 reported" "$OUT" "^ +0000000000000000"
expect_match "LUN 1 reported" "$OUT" "^ +0001000000000000"

sg sg_persist -i -k
expect_match "no keys at first" "$OUT" "there are NO registered reservation keys"
sg sg_persist -i -r
expect_match "no reservation at first" "$OUT" "there is NO reservation held"
sg sg_persist -o --register --param-sark=0x1234abcd
sg sg_persist -i -k
expect_match "key 0x1234abcd registered" "$OUT" "0x1234abcd"
sg sg_persist -o --reserve --param-rk=0x1234abcd --prout-type=1
sg sg_persist -i -r
expect_match "Write Exclusive reservation held by 0x1234abcd" "$OUT" "Key=0x1234abcd"
expect_match "type Write Exclusive" "$OUT" "type: Write Exclusive"
sg sg_persist -i -s
sg sg_persist -o --release --param-rk=0x1234abcd --prout-type=1
sg sg_persist -o --register --param-rk=0x1234abcd --param-sark=0
sg sg_persist -i -k
expect_match "key removed" "$OUT" "there are NO registered reservation keys"

step "sg_rtpg $DEV"
tpgs=$(sg_inq "$DEV" | sed -n 's/.*TPGS=\([0-9]\).*/\1/p' | head -n1)
echo "INQUIRY TPGS=$tpgs"
if [ "${tpgs:-0}" = 0 ]; then
    # Without ALUA (TPGS=0) SPC-4 lets the target reject REPORT TARGET PORT GROUPS; it must
    # do so cleanly with ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
    if out=$(sg_rtpg "$DEV" 2>&1); then
        echo "$out"; ok "sg_rtpg decoded (target reports TPGS=0 but answers)"
    else
        echo "$out"
        expect_match "sg_rtpg rejected cleanly as unsupported (TPGS=0)" "$out" "not supported|Illegal request|Invalid opcode"
    fi
else
    sg sg_rtpg
    expect_match "target port group reported" "$OUT" "target port group id"
fi

check "logout" iscsiadm -m node -T "$IQN" -p "$PORTAL" --logout
kill "$ISCSITD_PID"; wait "$ISCSITD_PID" 2>/dev/null || true
finish
