#!/bin/bash
# Fetch a Debian kernel for tenbox's Linux guest tests (or the nested lane's host).
#
#   get-kernel.sh [--out DIR] [--suite SUITE] [--flavour cloud|generic]
#                 [--arch amd64|arm64] [--modules "MOD1 MOD2 ..."]
#
# Resolves the versioned package behind linux-image-cloud-ARCH (--flavour
# cloud, the default: the guest kernel) or linux-image-ARCH (--flavour
# generic: it ships kvm.ko and kvm-amd.ko, which the nested test lane's
# outer host needs; see docs/testing.md), as apt's candidate, i.e. the
# running system's suite with its security/updates pockets, or the version
# from --suite (e.g. bookworm, bookworm-security, bookworm-backports);
# downloads it with `apt-get download` (no root needed) and fills DIR
# (default <repo>/.cache/linux, or <repo>/.cache/linux-ARCH for another
# architecture than amd64) with:
#
#   vmlinuz              the kernel as Debian ships it (amd64: a bzImage;
#                        arm64: a gzip'd Image)
#   version              the kernel release, e.g. 6.1.0-56-cloud-amd64
#   modules/*.ko         --modules (default: virtio, virtio_ring,
#                        virtio_mmio, virtio_blk, virtio_net, ext4) and
#                        what they depend on, minus whatever is built into
#                        the kernel (decompressed)
#   modules/load-order   the .ko files in insmod order, dependencies first
#   .stamp               what was resolved; a rerun that resolves to the same
#                        package version does nothing
#
# --arch (default: the host's) other than the host's own: apt's package lists for
# that architecture, from the host's own sources, are kept apart in
# <repo>/.cache/apt-ARCH (refreshed when a day old); the host's apt is left
# as it is (no dpkg --add-architecture).
#
# Progress goes to stderr, one line per stage; errors are one line too.
set -euo pipefail

PROG=get-kernel.sh
META=""  # from --flavour
MODULES="virtio virtio_ring virtio_mmio virtio_blk virtio_net ext4"
# Config symbols reported for information (=y means built in).
CONFIG_SYMS="VIRTIO VIRTIO_MMIO VIRTIO_BLK VIRTIO_NET NET_FAILOVER FAILOVER EXT4_FS JBD2 FS_MBCACHE CRC16 CRYPTO_CRC32C"

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=""
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
suite=""
flavour=cloud

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        --suite) [ $# -ge 2 ] || die "--suite needs a suite name"; suite=$2; shift 2 ;;
        --suite=*) suite=${1#--suite=}; shift ;;
        --flavour) [ $# -ge 2 ] || die "--flavour needs cloud or generic"; flavour=$2; shift 2 ;;
        --flavour=*) flavour=${1#--flavour=}; shift ;;
        --arch) [ $# -ge 2 ] || die "--arch needs amd64 or arm64"; arch=$2; shift 2 ;;
        --arch=*) arch=${1#--arch=}; shift ;;
        --modules) [ $# -ge 2 ] || die "--modules needs a list of module names"; MODULES=$2; shift 2 ;;
        --modules=*) MODULES=${1#--modules=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case "$arch" in
    amd64) out=${out:-$repo/.cache/linux} ;;
    arm64) out=${out:-$repo/.cache/linux-$arch} ;;
    *) die "--arch must be amd64 or arm64, not '$arch'" ;;
esac
case "$flavour" in
    cloud) META=linux-image-cloud-$arch ;;
    generic) META=linux-image-$arch ;;
    *) die "--flavour must be cloud or generic, not '$flavour'" ;;
esac
case "$MODULES" in
    *[!A-Za-z0-9_\ -]*) die "--modules takes module names separated by spaces, not '$MODULES'" ;;
    *[A-Za-z0-9]*) ;;
    *) die "--modules must name at least one module" ;;
esac

for tool in apt-cache apt-get dpkg dpkg-deb /usr/bin/python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (this script needs a Debian system)"
done

# apt's options: none for the host's own architecture; for another, its own package lists.
APT_OPTS=()
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
    aptdir="$repo/.cache/apt-$arch"
    mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial"
    [ -f "$aptdir/status" ] || : >"$aptdir/status"
    # One refresh at a time: the test session builds arm64 caches in the background (arm64_prepare.py).
    exec 8>"$aptdir/.lock"
    flock 8
    APT_OPTS=(-o "APT::Architecture=$arch" -o "APT::Architectures=$arch" -o "Dir::State::Lists=$aptdir/lists"
              -o "Dir::State::status=$aptdir/status" -o "Dir::Cache=$aptdir/cache" -o "Debug::NoLocking=1")
    if [ -z "$(find "$aptdir/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -n 1)" ]; then
        say "refreshing apt's $arch package lists in $aptdir"
        apt-get "${APT_OPTS[@]}" -q update >"$aptdir/update.log" 2>&1 \
            || die "apt-get update for $arch failed: $(grep -E '^(E|W):' "$aptdir/update.log" | head -n 1)"
    fi
fi

# --- 1. resolve ----------------------------------------------------------
if [ -n "$suite" ]; then
    say "resolving $META in suite $suite"
    meta_info=$(apt-cache "${APT_OPTS[@]}" show "$META/$suite" 2>/dev/null || true)
    [ -n "$meta_info" ] \
        || die "$META not found for suite '$suite' in apt's package lists (is the suite in sources.list? run 'apt-get update' and retry)"
else
    say "resolving $META (apt's candidate)"
    cand=$(LC_ALL=C apt-cache "${APT_OPTS[@]}" policy "$META" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')
    if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
        die "$META not found in apt's package lists; run 'apt-get update' (as root) and retry"
    fi
    meta_info=$(apt-cache "${APT_OPTS[@]}" show "$META=$cand" 2>/dev/null) \
        || die "apt-cache show $META=$cand failed; run 'apt-get update' (as root) and retry"
fi
# First stanza's Depends: the versioned image, e.g. linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2).
dep=$(printf '%s\n' "$meta_info" | awk '
    /^$/ { exit }
    /^Depends:/ {
        sub(/^Depends:[ \t]*/, "")
        n = split($0, alts, /[,|]/)
        for (i = 1; i <= n; i++) {
            s = alts[i]; gsub(/^[ \t]+|[ \t]+$/, "", s)
            if (s ~ /^linux-image-[0-9]/) { print s; exit }
        }
    }')
[ -n "$dep" ] || die "could not find the versioned linux-image package in $META's Depends"
pkg=${dep%% *}
ver=$(printf '%s\n' "$dep" | sed -n 's/.*(= *\([^)]*\)).*/\1/p')
if [ -z "$ver" ]; then
    ver=$(printf '%s\n' "$meta_info" | awk '/^$/ { exit } /^Version:/ { print $2; exit }')
fi
[ -n "$ver" ] || die "could not determine the version of $pkg"
say "resolved $pkg version $ver"

stamp_want=$(printf 'package=%s\nversion=%s\nmodules=%s\n' "$pkg" "$ver" "$MODULES")
if [ -f "$out/.stamp" ] && [ -s "$out/vmlinuz" ] && [ -s "$out/version" ] \
    && [ -f "$out/modules/load-order" ] && [ "$(cat "$out/.stamp")" = "$stamp_want" ]; then
    say "up to date: $out has $pkg $ver (kernel $(cat "$out/version")); nothing to do"
    exit 0
fi

# --- 2. download ---------------------------------------------------------
mkdir -p "$out"
out=$(cd "$out" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tenbox-get-kernel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# apt-get download as root hands the transfer to the _apt user: let it write here.
chmod 755 "$tmp"
say "downloading $pkg=$ver"
if ! (cd "$tmp" && apt-get "${APT_OPTS[@]}" download -q "$pkg=$ver" >"$tmp/apt.log" 2>&1); then
    die "apt-get download $pkg=$ver failed: $(grep -E '^(E|W):' "$tmp/apt.log" | head -n 1) (run 'apt-get update' and retry)"
fi
deb=$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n 1)
[ -n "$deb" ] || die "apt-get download produced no .deb"

# --- 3. extract ----------------------------------------------------------
say "extracting $(basename "$deb")"
dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb -x failed on $deb"
rel=$(find "$tmp/root/lib/modules" -mindepth 1 -maxdepth 1 -type d -exec basename {} \; 2>/dev/null | head -n 1)
[ -n "$rel" ] || die "no lib/modules/<release> in $pkg"
[ -f "$tmp/root/boot/vmlinuz-$rel" ] || die "no boot/vmlinuz-$rel in $pkg"
config="$tmp/root/boot/config-$rel"
if [ -f "$config" ]; then
    built_in="" as_module=""
    for sym in $CONFIG_SYMS; do
        case "$(grep -E "^CONFIG_$sym=" "$config" | cut -d= -f2)" in
            y) built_in="$built_in $sym" ;;
            m) as_module="$as_module $sym" ;;
        esac
    done
    say "config-$rel: built in (=y):${built_in:- none}; modules (=m):${as_module:- none}"
fi

# --- 4. modules ----------------------------------------------------------
say "selecting modules: $MODULES (plus dependencies)"
# shellcheck disable=SC2086 # MODULES is a word list
summary=$(/usr/bin/python3 "$here/kmods.py" --modroot "$tmp/root/lib/modules/$rel" \
    --out "$tmp/modules" $MODULES) || die "module selection failed (see above)"
say "$(printf '%s\n' "$summary" | sed -n 's/^modules: /to load: /p')"
say "$(printf '%s\n' "$summary" | sed -n 's/^builtin: /built into the kernel (nothing to copy): /p')"

# --- 5. install ----------------------------------------------------------
say "installing into $out"
rm -f "$out/.stamp"
cp "$tmp/root/boot/vmlinuz-$rel" "$out/vmlinuz.new"
mv -f "$out/vmlinuz.new" "$out/vmlinuz"
printf '%s\n' "$rel" >"$out/version.new"
mv -f "$out/version.new" "$out/version"
rm -rf "$out/modules.old"
if [ -d "$out/modules" ]; then mv "$out/modules" "$out/modules.old"; fi
cp -R "$tmp/modules" "$out/modules"
rm -rf "$out/modules.old"
printf '%s\n' "$stamp_want" >"$out/.stamp"
say "done: $out/vmlinuz ($(wc -c <"$out/vmlinuz" | tr -d ' ') bytes), kernel $rel, $(wc -l <"$out/modules/load-order" | tr -d ' ') modules"
