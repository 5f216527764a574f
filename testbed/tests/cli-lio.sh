#!/bin/bash
# Our initiator (the `iscsi` CLI) -> LIO, the Linux kernel target, over TCP in the guest:
# discovery, CHAP (one-way, mutual, and a wrong secret refused), ls / inq / readcap, and a
# verified 64 MiB round trip (with and without CRC32C digests).
. "$(dirname "$0")/lib.sh"
LIO_IQN=iqn.2003-01.org.linux-iscsi.testbed:cli
CLI_IQN=iqn.2026-11.dev.ironstar:cli
PORTAL=127.0.0.1:3260
USER=cliuser SECRET=cli-chap-secret-42 TUSER=lio-target TSECRET=lio-mutual-secret-7
URL=iscsi://$PORTAL/$LIO_IQN/0

step "LIO: 128 MiB fileio LUN 0, CHAP ACL for $CLI_IQN"
TPG=$(lio_target "$LIO_IQN")
lio_fileio disk0 /tmp/lio-disk0.img $((128 * 1024 * 1024))
lio_lun "$TPG" 0 core/fileio_0/disk0
lio_chap_acl "$TPG" "$CLI_IQN" "$USER" "$SECRET"
printf '%s' "$TUSER" > "$TPG/acls/$CLI_IQN/auth/userid_mutual"
printf '%s' "$TSECRET" > "$TPG/acls/$CLI_IQN/auth/password_mutual"
# `iscsi ls` with CHAP credentials offers CHAP on the discovery session too, and LIO then
# answers with its discovery credentials (not enforced: plain discovery still works).
printf '%s' "$USER" > "$LIO/iscsi/discovery_auth/userid"
printf '%s' "$SECRET" > "$LIO/iscsi/discovery_auth/password"
echo 0 > "$TPG/attrib/generate_node_acls"
echo 1 > "$TPG/attrib/authentication"
echo 1 > "$TPG/enable"
wait_for 10 "LIO listening on $PORTAL" port_open 127.0.0.1 3260
ok "LIO target $LIO_IQN on $PORTAL"

printf '%s\n' "$SECRET" > /tmp/secret
printf '%s\n' "$TSECRET" > /tmp/tsecret
printf 'not-the-secret-1\n' > /tmp/badsecret
cli() { iscsi --initiator-name "$CLI_IQN" "$@"; }
A=(--chap-user "$USER" --chap-secret-file /tmp/secret)

step "iscsi discover"
out=$(cli discover "$PORTAL") || die "discover"
echo "$out"
expect_match "discovery lists $LIO_IQN" "$out" "$LIO_IQN"

step "iscsi ls (CHAP)"
out=$(cli ls "$PORTAL" "${A[@]}") || die "ls"
echo "$out"
expect_match "ls shows LUN 0 as a 128 MiB disk" "$out" "Lun 0: disk.*128(\.0)? MiB"

step "wrong CHAP secret"
if out=$(cli readcap "$URL" --chap-user "$USER" --chap-secret-file /tmp/badsecret 2>&1); then
    echo "$out"; die "login with a wrong CHAP secret succeeded"
fi
echo "$out"
expect_match "refused with a readable error" "$out" "iscsi: error: .*(refused|authentication|failed)"
if grep -q panicked <<<"$out"; then die "the CLI panicked"; fi

step "iscsi inq / readcap (CHAP)"
out=$(cli inq "$URL" "${A[@]}") || die "inq"
echo "$out"
expect_match "INQUIRY vendor LIO-ORG" "$out" "LIO-ORG"
out=$(cli inq "$URL" "${A[@]}" --vpd 0x83) || die "inq --vpd 0x83"
echo "$out" | head -n 8
ok "VPD page 0x83 read"
out=$(cli readcap "$URL" "${A[@]}") || die "readcap"
echo "$out"
expect_match "262144 blocks" "$out" "Blocks: +262144"
expect_match "512-byte blocks" "$out" "Block size: +512"

step "mutual CHAP"
out=$(cli readcap "$URL" "${A[@]}" --target-user "$TUSER" --target-secret-file /tmp/tsecret) || die "mutual CHAP readcap"
expect_match "readcap with mutual CHAP" "$out" "Blocks: +262144"
if cli readcap "$URL" "${A[@]}" --target-user "$TUSER" --target-secret-file /tmp/badsecret >/tmp/m.txt 2>&1; then
    die "mutual CHAP accepted a target with the wrong secret"
fi
ok "mutual CHAP: a target answering with another secret is refused ($(head -n1 /tmp/m.txt))"

roundtrip() { # roundtrip LABEL LBA EXTRA_ARGS...: write 64 MiB of random data, read back, compare
    local label=$1 lba=$2 t w r; shift 2
    head -c $((64 * 1024 * 1024)) /dev/urandom > /tmp/pattern
    t=$(date +%s.%N)
    cli write "$URL" "${A[@]}" "$@" --lba "$lba" -i /tmp/pattern || die "write ($label)"
    w=$(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN {printf "%.2f", a - b}')
    t=$(date +%s.%N)
    cli read "$URL" "${A[@]}" "$@" --lba "$lba" --blocks 131072 -o /tmp/readback || die "read ($label)"
    r=$(awk -v a="$(date +%s.%N)" -v b="$t" 'BEGIN {printf "%.2f", a - b}')
    check "64 MiB round trip ($label): write ${w}s, read ${r}s, identical" cmp /tmp/pattern /tmp/readback
    echo "cli->LIO 64 MiB $label: write $(awk -v s="$w" 'BEGIN {printf "%.1f", 64 / s}') MiB/s, read $(awk -v s="$r" 'BEGIN {printf "%.1f", 64 / s}') MiB/s" >> "$RES/roundtrip.txt"
    rm -f /tmp/readback
}
step "64 MiB round trip at LBA 0"
roundtrip plain 0
step "64 MiB round trip at LBA 131072 with CRC32C digests"
roundtrip digests 131072 --digests
# Cross-check what LIO stored through its backing file, beside our own read-back.
check "LIO's backing file holds the pattern at LBA 131072" \
    cmp /tmp/pattern <(dd if=/tmp/lio-disk0.img bs=1M skip=64 count=64 status=none)
finish
