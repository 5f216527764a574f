#!/usr/bin/env bash
# install-test-deps.sh: install the third-party peers the interop tests drive (Debian 12, root).
#
#   libiscsi-bin                      iscsi-ls, iscsi-inq, iscsi-readcapacity16, iscsi-test-cu
#   tgt                               a known-good target, for checking the harness itself
#   open-isns-server open-isns-utils  iSNS server and client
#   sg3-utils                         SCSI tools (need a kernel device: VM test bed only)
#   qemu-block-extra                  qemu-img's iscsi:// driver; must be the exact version of qemu-utils
#   cmake clang libclang-dev          build deps of crates/iser's rdma backend (sideway's rdma-mummy-sys
#                                     builds a small shim with cmake and runs bindgen)
#   libibverbs-dev librdmacm-dev      rdma-core headers; rdma-core ibverbs-providers: the run-time
#   rdma-core ibverbs-providers       libraries and user-space drivers (rxe) the backend loads
#   ceph-mon ceph-mgr ceph-osd        a throw-away single-node Ceph cluster for the RBD LU tests
#   ceph-common uuid-runtime          (tests/ceph/single-node.sh); librbd1 comes with them and is
#                                     what iscsitd loads at run time for RBD LUs
#   librbd-dev tgt-rbd                librbd's headers (checking our declarations against them);
#                                     tgt's rbd backing store, for bench/ceph.sh
# The Ceph packages would start system services on install: a policy-rc.d that refuses is in
# place while apt runs (only if the machine has none of its own).
#
# qemu-utils on these machines comes from bookworm-backports, and qemu-block-extra must match
# it exactly. If the machine's apt sources do not carry that version, bookworm-backports is
# used through a private sources list and lists dir, so /etc/apt is left untouched (as
# shared/testbed/setup-host.sh does). If qemu-utils is absent, both come from backports.
#
# Idempotent: when everything is already installed at matching versions it exits at once,
# without touching the network.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUITE=${SUITE:-bookworm}
PKGS=(libiscsi-bin tgt open-isns-server open-isns-utils sg3-utils
      cmake clang libclang-dev libibverbs-dev librdmacm-dev rdma-core ibverbs-providers
      ceph-mon ceph-mgr ceph-osd ceph-common uuid-runtime librbd-dev tgt-rbd)
APT=(apt-get -y -q -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef
     -o Dpkg::Options::=--force-confold --no-install-recommends)

log() { echo "install-test-deps: $*" >&2; }

# Prints the installed version of a package, or nothing.
installed_version() {
    dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "installed" {print $2}'
}

all_done() {
    local p qv
    for p in "${PKGS[@]}"; do
        [ -n "$(installed_version "$p")" ] || return 1
    done
    qv=$(installed_version qemu-utils)
    [ -n "$qv" ] && [ "$(installed_version qemu-block-extra)" = "$qv" ]
}

if all_done; then
    log "all test dependencies already installed (qemu-utils and qemu-block-extra $(installed_version qemu-utils))"
    exit 0
fi

[ "$(id -u)" = 0 ] || { log "must run as root (try: sudo bash scripts/test.sh)"; exit 1; }

log "apt-get update"
apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null

missing=()
for p in "${PKGS[@]}"; do
    [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    if [ -e /usr/sbin/policy-rc.d ]; then
        "${APT[@]}" install "${missing[@]}" >/dev/null
    else
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        rc=0
        "${APT[@]}" install "${missing[@]}" >/dev/null || rc=$?
        rm -f /usr/sbin/policy-rc.d
        [ "$rc" = 0 ] || exit "$rc"
    fi
fi

# Private apt configuration that adds $SUITE-backports beside the machine's own suites.
PRIV=""
O=()
cleanup() { [ -z "$PRIV" ] || rm -rf "$PRIV"; }
trap cleanup EXIT
with_backports() {
    [ -z "$PRIV" ] || return 0
    local mirror
    mirror=${MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
        awk -v s="$SUITE" '$2 == s {sub("/$", "", $1); print $1; exit}')}
    mirror=${mirror:-http://deb.debian.org/debian}
    PRIV=$(mktemp -d /tmp/ironstar-apt.XXXXXX)
    chmod 755 "$PRIV"
    mkdir -p "$PRIV/lists/partial"
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-backports main\n' \
        "$mirror" "$SUITE" "$mirror" "$SUITE" "$mirror" "$SUITE" > "$PRIV/sources.list"
    # The security suite keeps already-patched packages resolvable.
    local sec
    sec=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
        awk -v s="$SUITE-security" '$2 == s {sub("/$", "", $1); print $1; exit}')
    [ -z "$sec" ] || printf 'deb %s %s-security main\n' "$sec" "$SUITE" >> "$PRIV/sources.list"
    O=(-o "Dir::Etc::SourceList=$PRIV/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
       -o "Dir::State::Lists=$PRIV/lists")
    log "apt-get update with a private $SUITE-backports source ($mirror)"
    apt-get -q -o DPkg::Lock::Timeout=600 "${O[@]}" update >/dev/null
}

# True if apt (with the current options) can install qemu-block-extra at version $1.
can_install_at() {
    apt-get -s -q "${O[@]}" --no-install-recommends install "qemu-block-extra=$1" >/dev/null 2>&1
}

qv=$(installed_version qemu-utils)
if [ -z "$qv" ]; then
    with_backports
    log "qemu-utils absent: installing qemu-utils and qemu-block-extra from $SUITE-backports"
    "${APT[@]}" "${O[@]}" -t "$SUITE-backports" install qemu-utils qemu-block-extra >/dev/null
elif [ "$(installed_version qemu-block-extra)" != "$qv" ]; then
    if ! can_install_at "$qv"; then
        with_backports
    fi
    if can_install_at "$qv"; then
        log "installing qemu-block-extra=$qv"
        "${APT[@]}" "${O[@]}" install "qemu-block-extra=$qv" >/dev/null
    else
        # The installed qemu-utils is no longer downloadable: move both to backports' current one.
        log "qemu-block-extra=$qv not downloadable; upgrading qemu-utils and qemu-block-extra from $SUITE-backports"
        "${APT[@]}" "${O[@]}" -t "$SUITE-backports" install qemu-utils qemu-block-extra >/dev/null
    fi
fi

if ! all_done; then
    log "failed: qemu-utils $(installed_version qemu-utils), qemu-block-extra $(installed_version qemu-block-extra)"
    exit 1
fi
log "done: ${PKGS[*]}, qemu-utils and qemu-block-extra $(installed_version qemu-utils)"
