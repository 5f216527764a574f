#!/usr/bin/env bash
# Builds fio with its libiscsi engine from Debian's own source package and caches the binary.
# Debian's fio package is built without that engine, so bench/run.sh calls this first.
#
#   bench/build-fio.sh        # prints the path of the cached fio binary (builds it once)
#
# The deb-src line lives in a private apt tree under the cache dir (sources, lists and package
# cache all redirected there), so the system's apt configuration and lists are never changed.
# Build dependencies are installed with apt-get (root only): libiscsi-dev, zlib1g-dev, libaio-dev.
set -euo pipefail

CACHE=${IRONSTAR_BENCH_CACHE:-$HOME/.cache/ironstar-bench}/fio
FIO=$CACHE/bin/fio
log() { echo "[build-fio] $*" >&2; }

# A cached binary that really has the engine is reused as is.
if [[ -x $FIO ]] && "$FIO" --enghelp 2>/dev/null | grep -qx '[[:space:]]*libiscsi'; then
    echo "$FIO"
    exit 0
fi

# ---------------------------------------------------------------- private apt tree with deb-src
# Mirror and suite are read from the machine's own Debian source (deb822 or one-line format).
APT=$CACHE/apt
mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/sources.list.d"
mirror=""
suite=""
if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    mirror=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    suite=$(awk '/^Suites:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [[ -z $mirror && -f /etc/apt/sources.list ]]; then
    read -r mirror suite < <(awk '$1 == "deb" && $0 !~ /security/ {
        for (i = 2; i <= NF; i++) if ($i ~ /^(http|https|file):/) { print $i, $(i + 1); exit } }' /etc/apt/sources.list)
fi
[[ -n $mirror ]] || mirror=http://deb.debian.org/debian
[[ -n $suite ]] || suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb-src [signed-by=$keyring] $mirror $suite main" >"$APT/sources.list"
log "private deb-src: $(cat "$APT/sources.list")"

# Every apt-get call below sees only the private tree's sources, lists and caches.
apt_private=(
    -o "Dir::Etc::SourceList=$APT/sources.list"
    -o "Dir::Etc::SourceParts=$APT/sources.list.d"
    -o "Dir::State::Lists=$APT/lists"
    -o "Dir::Cache=$APT"
    -o "Dir::Cache::Archives=$APT/archives"
    -o "APT::Get::List-Cleanup=0"
    -o "APT::Sandbox::User=root" # the private tree is root-owned; _apt cannot write there
)
apt-get "${apt_private[@]}" -q update >&2

# ---------------------------------------------------------------- build dependencies
# The subset of fio's Build-Depends this build uses, plus libiscsi-dev for the engine.
deps=(libiscsi-dev zlib1g-dev libaio-dev pkg-config dpkg-dev)
missing=()
for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing build dependencies: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -q -y install --no-install-recommends "${missing[@]}" >&2
fi

# ---------------------------------------------------------------- source and build
SRC=$CACHE/src
rm -rf "$SRC"
mkdir -p "$SRC"
log "apt-get source fio (into $SRC)"
(cd "$SRC" && apt-get "${apt_private[@]}" -q source fio >&2)
dir=$(find "$SRC" -mindepth 1 -maxdepth 1 -type d -name 'fio-*' | head -1)
[[ -n $dir ]] || { log "no fio source tree after apt-get source"; exit 1; }

# -j2 at most: the machine has 2 cores and is shared.
log "configure --enable-libiscsi && make -j2 in $dir"
(cd "$dir" && ./configure --enable-libiscsi --disable-native >&2 && make -j2 fio >&2)
mkdir -p "$CACHE/bin"
install -m 0755 "$dir/fio" "$FIO"
"$FIO" --enghelp | grep -qx '[[:space:]]*libiscsi' || { log "built fio has no libiscsi engine"; exit 1; }
log "cached $FIO ($("$FIO" --version))"
echo "$FIO"
