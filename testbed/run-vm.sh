#!/usr/bin/env bash
# run-vm.sh: boot the test-bed VM, run one guest script as root, power off.
#
#   run-vm.sh [options] GUEST_SCRIPT
#   run-vm.sh --shell                      interactive serial console (exit the shell to stop)
#
# The guest mounts a host directory (virtio-9p, tag "testbed") on /mnt/host and runs
# GUEST_SCRIPT there with bash, cwd = the script's directory, then powers off. By default
# that directory is a fresh one under /tmp/ironstar-testbed/runs holding a copy of the
# script; with --share DIR it is DIR itself (the script must be inside it), which is how
# run-tests.sh hands the guest our release binaries and the test scripts. Whatever the
# guest writes under /mnt/host stays there. The root disk is attached with snapshot=on:
# every run starts from the same image. The serial console (kernel + script output) goes to
# DIR/console.log and, unless --quiet, to stdout.
#
# Exit status: the guest script's; 124 on timeout; 125 when the VM stopped without one.
#
# Options:
#   --image DIR      image dir (default: the one build-image.sh --dir names)
#   --share DIR      share DIR instead of a fresh run dir
#   --env NAME=VAL   environment variable for the guest script (repeatable)
#   --log FILE       console log (default SHARE/console.log)
#   --mem SIZE       guest RAM (default 2G)       --smp N   vCPUs (default 2)
#   --timeout SEC    kill the VM after SEC seconds (default 900)
#   --accel A        kvm | tcg | auto (default auto, or $TESTBED_ACCEL): kvm only when
#                    /dev/kvm is hardware virtualisation (kvm_intel/kvm_amd); a software
#                    KVM such as PVM runs Debian's kernel far slower than TCG
#   --no-nic         no virtio-net NIC (default: one on QEMU user networking with
#                    restrict=on, so the guest reaches nothing outside; 10.0.2.15/24)
#   --append ARGS    extra kernel command line
#   --quiet          do not copy the console to stdout
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

IMAGE='' ACCEL=${TESTBED_ACCEL:-auto}
SHARE='' LOG='' MEM=2G SMP=2 TIMEOUT=900 NIC=1 APPEND='' QUIET=0 SHELL_MODE=0
ENVS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --image) IMAGE=$2; shift 2 ;;
        --share) SHARE=$2; shift 2 ;;
        --env) ENVS+=("$2"); shift 2 ;;
        --log) LOG=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --accel) ACCEL=$2; shift 2 ;;
        --no-nic) NIC=0; shift ;;
        --append) APPEND=$2; shift 2 ;;
        --quiet) QUIET=1; shift ;;
        --shell) SHELL_MODE=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        --) shift; break ;;
        -*) echo "run-vm: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
SCRIPT=${1:-}
[ "$SHELL_MODE" = 1 ] || [ -n "$SCRIPT" ] || { echo "usage: $0 [options] GUEST_SCRIPT" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "run-vm: qemu-system-x86_64 missing: run testbed/setup-host.sh" >&2; exit 1; }
[ -n "$IMAGE" ] || IMAGE=$("$HERE/build-image.sh" --dir)
for f in vmlinux initrd.img rootfs.ext4 .complete; do
    [ -f "$IMAGE/$f" ] || { echo "run-vm: no image in $IMAGE: run testbed/build-image.sh" >&2; exit 1; }
done

if [ "$ACCEL" = auto ]; then
    if [ -w /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then
        ACCEL=kvm
    else
        ACCEL=tcg
    fi
fi
case "$ACCEL" in
    kvm) ACCEL_ARGS=(-accel kvm -cpu host) ;;
    tcg) ACCEL_ARGS=(-accel 'tcg,thread=multi,tb-size=512' -cpu max) ;;
    *) echo "run-vm: bad --accel $ACCEL" >&2; exit 2 ;;
esac

if [ -n "$SHARE" ]; then
    SHARE=$(cd "$SHARE" && pwd)
else
    mkdir -p /tmp/ironstar-testbed/runs
    SHARE=$(mktemp -d "/tmp/ironstar-testbed/runs/$(date +%Y%m%d-%H%M%S)-XXXX")
    [ "$SHELL_MODE" = 1 ] || cp "$SCRIPT" "$SHARE/"
    [ "$SHELL_MODE" = 1 ] || SCRIPT=$SHARE/$(basename "$SCRIPT")
fi
if [ "$SHELL_MODE" != 1 ]; then
    SCRIPT_REL=$(realpath --relative-to="$SHARE" "$SCRIPT")
    case "$SCRIPT_REL" in ../*|/*) echo "run-vm: $SCRIPT is not inside $SHARE" >&2; exit 2 ;; esac
fi
: > "$SHARE/.testbed-env"
for e in "${ENVS[@]}"; do printf 'export %q=%q\n' "${e%%=*}" "${e#*=}" >> "$SHARE/.testbed-env"; done
rm -f "$SHARE/.testbed-rc"
LOG=${LOG:-$SHARE/console.log}

KAPPEND="console=ttyS0 panic=-1 loglevel=4 testbed.root=/dev/vda"
if [ "$SHELL_MODE" = 1 ]; then KAPPEND+=" testbed.shell=1"; else KAPPEND+=" testbed.script=$SCRIPT_REL"; fi
QEMU=(qemu-system-x86_64 "${ACCEL_ARGS[@]}" -machine q35 -smp "$SMP" -m "$MEM"
      -nodefaults -no-user-config -display none -no-reboot
      -kernel "$IMAGE/vmlinux" -initrd "$IMAGE/initrd.img"
      -drive "file=$IMAGE/rootfs.ext4,format=raw,if=virtio,snapshot=on,cache=unsafe"
      -fsdev "local,id=fs0,path=$SHARE,security_model=none"
      -device "virtio-9p-pci,fsdev=fs0,mount_tag=testbed"
      -device virtio-rng-pci)
if [ "$NIC" = 1 ]; then
    QEMU+=(-netdev "user,id=n0,restrict=on" -device "virtio-net-pci,netdev=n0,speed=10000,duplex=full")
fi
QEMU+=(-append "$KAPPEND $APPEND")

if [ "$SHELL_MODE" = 1 ]; then
    exec "${QEMU[@]}" -serial mon:stdio
fi

: > "$LOG"
START=$(date +%s%N)
"${QEMU[@]}" -serial "file:$LOG" </dev/null &
QPID=$!
TPID=
if [ "$QUIET" != 1 ]; then
    tail -n +1 -f --pid="$QPID" "$LOG" &
    TPID=$!
fi
timed_out=0
deadline=$(( $(date +%s) + TIMEOUT ))
while kill -0 "$QPID" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        timed_out=1
        echo "run-vm: timeout after ${TIMEOUT}s, stopping QEMU (pid $QPID)" >&2
        kill "$QPID" 2>/dev/null || true
        sleep 2
        kill -9 "$QPID" 2>/dev/null || true
        break
    fi
    sleep 0.2
done
qrc=0; wait "$QPID" 2>/dev/null || qrc=$?
if [ -n "$TPID" ]; then sleep 0.3; kill "$TPID" 2>/dev/null || true; wait "$TPID" 2>/dev/null || true; fi
ms=$(( ($(date +%s%N) - START) / 1000000 ))
printf 'run-vm: accel %s, VM ran %d.%03d s (qemu exit %d); console log %s\n' \
    "$ACCEL" $((ms / 1000)) $((ms % 1000)) "$qrc" "$LOG" >&2

[ "$timed_out" = 1 ] && exit 124
rc=$(sed -n 's/^TESTBED-RC=\([0-9]*\).*/\1/p' "$LOG" | tail -n1)
[ -n "$rc" ] || { echo "run-vm: the guest did not report an exit status" >&2; exit 125; }
exit "$rc"
