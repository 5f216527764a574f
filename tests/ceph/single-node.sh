#!/bin/bash
# single-node.sh start|stop DIR — a throw-away one-OSD Ceph cluster from Debian's packages
# (a copy of shared/ceph/single-node.sh; here with a shorter osd client watch timeout, and
# CEPH_OBJECTSTORE=memstore for an OSD in RAM: about twice as fast, for tests of small images)
# (ceph-mon ceph-mgr ceph-osd ceph-common; librbd-dev for building against librbd), bound to
# 127.0.0.1 only, with pool "rbd" (size 1) ready for images. About 13 s from nothing to ready.
# After start: export CEPH_CONF=DIR/ceph.conf; `rbd create rbd/NAME --size 1G`.
# Stop gateways (tgtd, iscsitd) that use the cluster before stopping it.
set -euo pipefail
cmd=${1:?start|stop}; C=$(realpath -m "${2:?DIR}")
export CEPH_CONF=$C/ceph.conf
if [ "$cmd" = stop ]; then
  for p in "$C"/run/*.pid; do [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null || true; done
  sleep 2
  for p in "$C"/run/*.pid; do [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null || true; done
  exit 0
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
mkdir -p "$C"/{run,log,mon.a,mgr.x,osd.0}
FSID=$(uuidgen)
cat >"$C/ceph.conf" <<CONF
[global]
fsid = $FSID
mon initial members = a
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
public network = 127.0.0.0/8
cluster network = 127.0.0.0/8
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $C/keyring
run dir = $C/run
admin socket = $C/run/\$cluster-\$name.asok
log file = $C/log/\$name.log
pid file = $C/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
auth allow insecure global id reclaim = false
mon data avail warn = 2
# A throw-away cluster on a build machine whose disk may be nearly full: the monitor must not
# refuse to start below its default 5 % free (it did at 5 % of a 252 GB disk, 14 GiB free).
mon data avail crit = 1
[mon]
mon data = $C/mon.\$id
mon cluster log file = $C/log/cluster.log
[mgr]
mgr data = $C/mgr.\$id
keyring = $C/mgr.\$id/keyring
[osd]
osd data = $C/osd.\$id
keyring = $C/osd.\$id/keyring
osd objectstore = ${CEPH_OBJECTSTORE:-bluestore}
bluestore block create = true
bluestore block size = 10737418240
bluestore block db create = false
bluestore block wal create = false
osd memory target = 1073741824
# A killed gateway's watch on the image header goes after 10 s (default 30), so the
# exclusive lock moves to another gateway sooner.
osd client watch timeout = 10
[client]
admin socket = $C/run/\$cluster-\$name.\$pid.asok
log file = $C/log/\$name.\$pid.log
CONF
ceph-authtool --create-keyring "$C/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$C/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$C/mon.keyring" --import-keyring "$C/keyring" >/dev/null
monmaptool --create --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' --fsid "$FSID" "$C/monmap" >/dev/null
ceph-mon --mkfs -i a --monmap "$C/monmap" --keyring "$C/mon.keyring"
ceph-mon -i a
for _ in $(seq 60); do ceph -s --connect-timeout 5 >/dev/null 2>&1 && break; sleep 0.5; done
ceph auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o "$C/mgr.x/keyring"
ceph-mgr -i x
UUID=$(uuidgen); SECRET=$(ceph-authtool --gen-print-key)
ID=$(echo "{\"cephx_secret\": \"$SECRET\"}" | ceph osd new "$UUID" -i -)
mkdir -p "$C/osd.$ID"; printf '[osd.%s]\n\tkey = %s\n' "$ID" "$SECRET" >"$C/osd.$ID/keyring"
ceph-osd -i "$ID" --mkfs --osd-uuid "$UUID" --key "$SECRET" >/dev/null 2>&1
ceph-osd -i "$ID"
for _ in $(seq 120); do ceph osd stat 2>/dev/null | grep -q '1 up' && break; sleep 0.5; done
ceph osd pool create rbd 32 32 replicated >/dev/null
rbd pool init rbd
echo "ceph ready: export CEPH_CONF=$C/ceph.conf"
