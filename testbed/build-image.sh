#!/usr/bin/env bash
# build-image.sh: build the test-bed VM image from Debian's packages alone, cached by its inputs.
#
#   build-image.sh            build unless cached; prints the image dir on stdout
#   build-image.sh --dir      print the image dir the current inputs map to (no build)
#   build-image.sh --force    rebuild even when cached
#
# The image dir is $TESTBED_CACHE/<hash> (TESTBED_CACHE defaults to
# ${XDG_CACHE_HOME:-$HOME/.cache}/ironstar-testbed). The hash covers this script, the
# guest's init, the suite, the guest package list and the exact kernel package (resolved
# from the host's apt lists), so a change to any of them builds a new image; older image
# dirs are removed after a successful build. The image dir holds:
#   vmlinux         the Debian kernel as an ELF (PVH entry), cut out of the bzImage of the
#                   linux-image-<ver>-amd64 .deb (downloaded and unpacked, never installed):
#                   QEMU boots it directly, skipping the decompressor (~6 s under TCG)
#   initrd.img      busybox-static + virtio/ext4 modules; mounts /dev/vda, switch_roots to /init
#   rootfs.ext4     debootstrap (minbase + test packages + the kernel's modules), mkfs.ext4 -d
#   kernel.version  the kernel release
#
# Needs root and the host tools from setup-host.sh. Knobs: MIRROR (default: the host's apt
# source for the suite), SUITE (bookworm), IMAGE_FREE_MB (free space in rootfs.ext4, 512).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
MODE=build
case "${1:-}" in
    --dir) MODE=dir ;;
    --force) MODE=force ;;
    "") ;;
    *) echo "usage: $0 [--dir|--force]" >&2; exit 2 ;;
esac
SUITE=${SUITE:-bookworm}
CACHE=${TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ironstar-testbed}
IMAGE_FREE_MB=${IMAGE_FREE_MB:-512}
KERNEL_META=linux-image-amd64
# Guest packages. open-iscsi: kernel initiator; targetcli-fb (+ dbus): LIO's CLI (the tests
# use configfs directly); rdma-core, ibverbs-*, rdmacm-utils, perftest: Soft-RoCE for iSER.
PACKAGES="open-iscsi,targetcli-fb,dbus,fio,e2fsprogs,sg3-utils,lsscsi,libiscsi-bin,rdma-core,ibverbs-utils,ibverbs-providers,rdmacm-utils,perftest,iproute2,kmod,procps,iputils-ping,util-linux,busybox-static"
# Kernel module directories left out (hardware a VM never has).
MODULE_EXCLUDES=(
    kernel/sound kernel/drivers/gpu kernel/drivers/media kernel/drivers/staging
    kernel/drivers/iio kernel/drivers/usb kernel/drivers/hid kernel/drivers/input
    kernel/drivers/comedi kernel/drivers/hwmon kernel/drivers/bluetooth
    kernel/drivers/isdn kernel/drivers/mmc kernel/drivers/mtd kernel/drivers/nfc
    kernel/drivers/w1 kernel/drivers/soundwire kernel/drivers/thunderbolt
    kernel/drivers/memstick kernel/drivers/leds kernel/drivers/pcmcia
    kernel/drivers/video kernel/drivers/gnss kernel/drivers/atm kernel/drivers/firewire
    kernel/drivers/net/wireless kernel/drivers/net/usb kernel/drivers/net/can
    kernel/drivers/net/wwan kernel/drivers/net/ieee802154 kernel/drivers/net/ethernet
    kernel/net/mac80211 kernel/net/wireless kernel/net/bluetooth
)
# Loaded by the early initramfs to reach the ext4 root on virtio-blk (dependencies resolved).
EARLY_MODULES="virtio_pci virtio_blk ext4 crc32c_generic"
# The build fails when one of these is missing.
REQUIRED_MODULES="iscsi_tcp ib_iser iscsi_target_mod target_core_mod target_core_iblock
    target_core_file target_core_user ib_isert rdma_rxe sd_mod sg virtio_net 9pnet_virtio 9p dummy veth"

log() { printf '[build-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

KPKG=$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { echo "cannot resolve $KERNEL_META from the apt lists (run setup-host.sh)" >&2; exit 1; }
KDEBVER=$(apt-cache policy "$KPKG" | awk '/Candidate:/ {print $2; exit}')
HASH=$( { cat "$0" "$HERE/guest/testbed-init"; echo "$SUITE $PACKAGES $KPKG $KDEBVER $IMAGE_FREE_MB"; } |
        sha256sum | cut -c1-16)
IMG=$CACHE/$HASH
if [ "$MODE" = dir ]; then echo "$IMG"; exit 0; fi
if [ "$MODE" = build ] && [ -f "$IMG/.complete" ]; then
    log "cached image $IMG ($KPKG $KDEBVER)"
    echo "$IMG"; exit 0
fi

[ "$(id -u)" = 0 ] || { echo "build-image.sh must run as root (debootstrap, chroot, mknod)" >&2; exit 1; }
for t in debootstrap dpkg-deb cpio xz mkfs.ext4 chroot apt-get; do
    command -v "$t" >/dev/null || { echo "missing host tool $t: run testbed/setup-host.sh" >&2; exit 1; }
done
MIRROR=${MIRROR:-$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk -v s="$SUITE" '$2 == s {sub("/$", "", $1); print $1; exit}')}
[ -n "$MIRROR" ] || { echo "no Debian mirror for $SUITE in the apt sources; set MIRROR" >&2; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9     # one build at a time; a second caller waits and then finds the image
if [ "$MODE" = build ] && [ -f "$IMG/.complete" ]; then echo "$IMG"; exit 0; fi

T0=$SECONDS
WORK=$CACHE/build
OUT=$IMG.tmp
rm -rf "$WORK" "$OUT"
mkdir -p "$WORK/debs" "$WORK/kernel" "$OUT"
trap 'rm -rf "$WORK" "$OUT"' EXIT

# 1. Kernel: the .deb the meta package names, unpacked; the ELF cut out of the bzImage.
log "kernel $KPKG $KDEBVER"
(cd "$WORK/debs" && apt-get download -q "$KPKG=$KDEBVER" 2>&1 | grep -v unsandboxed || true)
KDEB=$(ls "$WORK/debs/${KPKG}_"*.deb 2>/dev/null | head -n1)
[ -n "$KDEB" ] || { echo "apt-get download $KPKG failed" >&2; exit 1; }
dpkg-deb -x "$KDEB" "$WORK/kernel"
KVER=${KPKG#linux-image-}
VMLINUZ=$WORK/kernel/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || { echo "no vmlinuz in $KDEB" >&2; exit 1; }
# What the kernel's scripts/extract-vmlinux does (Debian uses xz); xz's complaint about
# the trailing data is expected.
off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$VMLINUZ" | head -n1 | cut -d: -f1)
[ -n "$off" ] || { echo "no xz payload in $VMLINUZ" >&2; exit 1; }
tail -c +$((off + 1)) "$VMLINUZ" | xz -dc 2>/dev/null > "$OUT/vmlinux" || true
[ "$(head -c 4 "$OUT/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] \
    || { echo "extracted kernel is not an ELF file" >&2; exit 1; }
echo "$KVER" > "$OUT/kernel.version"

# 2. Root filesystem.
ROOT=$WORK/rootfs
log "debootstrap $SUITE from $MIRROR"
T1=$SECONDS
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" \
    > "$WORK/debootstrap.log" 2>&1 || { tail -n 30 "$WORK/debootstrap.log" >&2; exit 1; }
log "debootstrap done in $((SECONDS - T1)) s"

# 3. Kernel modules, less the hardware-only ones; depmod with the guest's kmod.
rm -rf "$ROOT/lib/modules"; mkdir -p "$ROOT/lib/modules"
cp -a "$WORK/kernel/lib/modules/$KVER" "$ROOT/lib/modules/"
for d in "${MODULE_EXCLUDES[@]}"; do rm -rf "$ROOT/lib/modules/$KVER/$d"; done
chroot "$ROOT" depmod "$KVER"
for m in $REQUIRED_MODULES; do
    chroot "$ROOT" modinfo -k "$KVER" -F filename "$m" >/dev/null 2>&1 \
        || { echo "module $m missing from the image" >&2; exit 1; }
done

# 4. Guest configuration.
install -m 0755 "$HERE/guest/testbed-init" "$ROOT/init"
echo testbed > "$ROOT/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\ttestbed\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOT/etc/hosts"
: > "$ROOT/etc/fstab"
echo "InitiatorName=iqn.2025-01.test.testbed:initiator" > "$ROOT/etc/iscsi/initiatorname.iscsi"
mkdir -p "$ROOT/mnt/host" "$ROOT/etc/target"      # /etc/target: LIO's db_root
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* \
       "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* \
       "$ROOT"/usr/share/locale/*

# 5. Early initramfs: busybox + the modules that reach the ext4 root.
EARLY=$WORK/early
mkdir -p "$EARLY"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$ROOT/bin/busybox" "$EARLY/bin/busybox"
mknod -m 600 "$EARLY/dev/console" c 5 1
: > "$EARLY/modules.order"
chroot "$ROOT" modprobe -S "$KVER" --show-depends -a $EARLY_MODULES |
    awk '$1 == "insmod" && !seen[$2]++ {print $2}' | while read -r ko; do
        cp "$ROOT$ko" "$EARLY/lib/modules/"
        basename "$ko" >> "$EARLY/modules.order"
    done
cat > "$EARLY/init" <<'EOI'
#!/bin/busybox sh
# Early init: load virtio + ext4, mount the root disk, hand over to its /init.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /modules.order); do $B insmod /lib/modules/$m 2>/dev/null; done
root=/dev/vda
for w in $($B cat /proc/cmdline); do case $w in testbed.root=*) root=${w#*=};; esac; done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do $B sleep 0.05; i=$((i + 1)); done
if ! $B mount -t ext4 -o rw "$root" /newroot; then
    echo "early init: cannot mount $root"; exec $B sh
fi
$B umount /proc /sys
$B mount --move /dev /newroot/dev
exec $B switch_root /newroot /init
EOI
chmod 0755 "$EARLY/init"
(cd "$EARLY" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$OUT/initrd.img"

# 6. Root filesystem image.
size_mb=$(( $(du -sm "$ROOT" | cut -f1) * 11 / 10 + IMAGE_FREE_MB ))
mkfs.ext4 -q -F -L testbed -d "$ROOT" "$OUT/rootfs.ext4" "${size_mb}M"
echo "$SUITE $PACKAGES $KPKG $KDEBVER" > "$OUT/inputs.txt"
touch "$OUT/.complete"

# Publish: the new image replaces whatever older ones the cache holds.
rm -rf "$IMG"
mv "$OUT" "$IMG"
for d in "$CACHE"/*/; do
    d=${d%/}
    [ "$d" = "$IMG" ] || [ "$d" = "$WORK" ] || rm -rf "$d"
done
log "image $IMG: kernel $KVER, rootfs ${size_mb} MiB ($(du -sh "$IMG" | cut -f1) allocated), built in $((SECONDS - T0)) s"
echo "$IMG"
