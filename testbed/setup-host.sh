#!/usr/bin/env bash
# setup-host.sh: install what the host needs to build and boot the test-bed VM (Debian 12, root).
#
#   debootstrap cpio xz-utils e2fsprogs   building the image (build-image.sh)
#   qemu-system-x86                       booting it (run-vm.sh)
#
# qemu-system-x86 comes from bookworm. When that is not installable because a newer
# qemu-utils from bookworm-backports is already on the host (it Breaks bookworm's 7.2
# qemu-system-common), it comes from bookworm-backports instead, through a private apt
# sources list and lists dir, so /etc/apt is left untouched.
#
# Idempotent: when everything is present it only reports and touches neither apt nor the
# network. Also says which accelerator run-vm.sh will pick.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUITE=${SUITE:-bookworm}
PKGS=(debootstrap cpio xz-utils e2fsprogs)
APT=(apt-get -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends)
log() { echo "setup-host: $*" >&2; }

installed() { dpkg-query -W -f='${db:Status-Status}\n' "$1" 2>/dev/null | grep -qx installed; }

missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
need_qemu=0
command -v qemu-system-x86_64 >/dev/null || need_qemu=1
# build-image.sh resolves the kernel package from the apt lists: they must be there.
need_lists=0
[ -n "$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/')" ] || need_lists=1

if [ ${#missing[@]} -gt 0 ] || [ $need_qemu = 1 ] || [ $need_lists = 1 ]; then
    [ "$(id -u)" = 0 ] || { log "must run as root to install ${missing[*]} qemu-system-x86"; exit 1; }
    log "apt-get update"
    apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        "${APT[@]}" install "${missing[@]}" >/dev/null
    fi
    if [ $need_qemu = 1 ]; then
        if apt-get -s --no-install-recommends install qemu-system-x86 >/dev/null 2>&1; then
            log "installing qemu-system-x86 from $SUITE"
            "${APT[@]}" install qemu-system-x86 >/dev/null
        else
            MIRROR=${MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
                awk -v s="$SUITE" '$2 == s {sub("/$", "", $1); print $1; exit}')}
            [ -n "$MIRROR" ] || { log "no Debian mirror for $SUITE in the apt sources; set MIRROR"; exit 1; }
            log "qemu-system-x86 from $SUITE is not installable here (newer qemu-utils?); using $SUITE-backports"
            P=$(mktemp -d /tmp/testbed-apt.XXXX); chmod 755 "$P"
            mkdir -p "$P/lists/partial"
            printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-backports main\n' \
                "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" > "$P/sources.list"
            O=(-o "Dir::Etc::SourceList=$P/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
               -o "Dir::State::Lists=$P/lists")
            apt-get -q "${O[@]}" update >/dev/null
            "${APT[@]}" "${O[@]}" -t "$SUITE-backports" install qemu-system-x86 >/dev/null
            rm -rf "$P"
        fi
    fi
fi

log "$(qemu-system-x86_64 --version | head -n1)"
if [ -w /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
    log "accel: kvm (hardware virtualisation)"
elif [ -d /sys/module/kvm_pvm ]; then
    log "accel: tcg (/dev/kvm is PVM, a software hypervisor: a stock kernel runs far slower under it than under TCG)"
else
    log "accel: tcg (no usable /dev/kvm)"
fi
