#!/bin/bash
# Build tenbox's busybox test initramfs for the kernel from get-kernel.sh.
#
#   make-initramfs.sh [--kernel-dir DIR] [--out FILE] [--init FILE]
#
# DIR (default <repo>/.cache/linux) is get-kernel.sh's output: its version
# file and modules/ (the .ko files and load-order) go into the image under
# /lib/modules/<release>/. FILE defaults to DIR/initramfs.cpio.gz.
#
# The image is a gzip'ed newc cpio made by mkcpio.py (no root, no mknod;
# /dev/console and /dev/null are described, not created) with:
#   /bin/busybox     from Debian's busybox-static (apt-get download, cached
#                    under <repo>/.cache/busybox/<version>/), plus a symlink
#                    for each of its applets
#   /init            initramfs-init from this folder (see there: it loads the
#                    modules, prints "TENBOX-INITRAMFS: up <release>", runs
#                    tenbox.run=<cmd> or tenbox.shell=1, powers off), or the
#                    --init FILE (lane-init: the nested test lane's host)
#   /usr/sbin/mke2fs, /usr/sbin/e2fsck (with mkfs.ext4 and fsck.ext4 links)
#                    e2fsprogs from this (Debian) build host, with the shared
#                    libraries ldd lists for them and the dynamic loader, at
#                    the same paths; busybox makes only ext2, and the guest
#                    tests make and check real ext4 file systems
#   /etc/udhcpc/default.script
#                    udhcpc-script from this folder: busybox udhcpc calls it
#                    to configure the interface, route and resolv.conf
#
# The output is deterministic, and it is rebuilt only when an input changed
# (busybox, e2fsprogs and its libraries, /init, the udhcpc script,
# mkcpio.py, this script, the kernel release, the modules): FILE.inputs
# records the inputs' digest.
set -euo pipefail

PROG=make-initramfs.sh
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
kdir="$repo/.cache/linux"
out=""
init="$here/initramfs-init"
bbcache="$repo/.cache/busybox"

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --kernel-dir) [ $# -ge 2 ] || die "--kernel-dir needs a directory"; kdir=$2; shift 2 ;;
        --kernel-dir=*) kdir=${1#--kernel-dir=}; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a file name"; out=$2; shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        --init) [ $# -ge 2 ] || die "--init needs a file name"; init=$2; shift 2 ;;
        --init=*) init=${1#--init=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[ -n "$out" ] || out="$kdir/initramfs.cpio.gz"
[ -f "$init" ] || die "--init $init: no such file"

for tool in apt-cache apt-get dpkg-deb sha256sum /usr/bin/python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (this script needs a Debian system)"
done

# --- 1. kernel inputs ----------------------------------------------------
say "checking kernel folder $kdir"
[ -s "$kdir/version" ] || die "no $kdir/version: run scripts/x86_64/get-kernel.sh first"
[ -f "$kdir/modules/load-order" ] || die "no $kdir/modules/load-order: run scripts/x86_64/get-kernel.sh first"
rel=$(head -n 1 "$kdir/version")
case "$rel" in ''|*/*|.*) die "bad kernel release '$rel' in $kdir/version" ;; esac
while read -r ko; do
    [ -z "$ko" ] || [ -f "$kdir/modules/$ko" ] || die "$kdir/modules/load-order names $ko, which is missing"
done <"$kdir/modules/load-order"

# --- 2. busybox ----------------------------------------------------------
say "resolving busybox-static (apt's candidate)"
bbver=$(LC_ALL=C apt-cache policy busybox-static 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')
if [ -z "$bbver" ] || [ "$bbver" = "(none)" ]; then
    die "busybox-static not found in apt's package lists; run 'apt-get update' (as root) and retry"
fi
bbdir="$bbcache/$(printf '%s' "$bbver" | tr ':' '_')"
busybox="$bbdir/busybox"
if [ -x "$busybox" ]; then
    say "busybox-static $bbver: cached at $busybox"
else
    say "downloading busybox-static=$bbver"
    mkdir -p "$bbcache"
    dl=$(mktemp -d "$bbcache/.dl.XXXXXX")
    chmod 755 "$dl"  # apt-get download as root hands the transfer to _apt
    if ! (cd "$dl" && apt-get download -q "busybox-static=$bbver" >"$dl/apt.log" 2>&1); then
        msg=$(grep -E '^(E|W):' "$dl/apt.log" | head -n 1 || true)
        rm -rf "$dl"
        die "apt-get download busybox-static=$bbver failed: $msg (run 'apt-get update' and retry)"
    fi
    deb=$(find "$dl" -maxdepth 1 -name '*.deb' | head -n 1)
    [ -n "$deb" ] || { rm -rf "$dl"; die "apt-get download produced no .deb"; }
    dpkg-deb -x "$deb" "$dl/root" || { rm -rf "$dl"; die "dpkg-deb -x failed on $deb"; }
    [ -f "$dl/root/bin/busybox" ] || { rm -rf "$dl"; die "busybox-static $bbver has no bin/busybox"; }
    mkdir -p "$bbdir"
    cp "$dl/root/bin/busybox" "$bbdir/busybox.new"
    chmod 755 "$bbdir/busybox.new"
    mv -f "$bbdir/busybox.new" "$busybox"
    rm -rf "$dl"
    say "busybox-static $bbver: cached at $busybox"
fi

# --- 3. e2fsprogs -------------------------------------------------------
# The binaries and every shared object they load (ldd's list, the loader
# included), copied to the same paths in the image. Debian installs
# e2fsprogs on every system (Priority: required).
E2FS_TOOLS="mke2fs e2fsck"
e2fs_files=""
for tool in $E2FS_TOOLS; do
    path=$(PATH="/usr/sbin:/sbin:$PATH" command -v "$tool" 2>/dev/null) \
        || die "$tool not found: install e2fsprogs (apt-get install e2fsprogs)"
    command -v ldd >/dev/null 2>&1 || die "ldd not found (libc-bin)"
    libs=$(ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }') \
        || die "ldd $path failed"
    [ -n "$libs" ] || die "ldd lists no libraries for $path (a static build?)"
    e2fs_files="$e2fs_files $path $libs"
done
# shellcheck disable=SC2086 # a word list of paths without spaces
e2fs_files=$(printf '%s\n' $e2fs_files | sort -u)
for f in $e2fs_files; do
    [ -f "$f" ] || die "$f (needed by $E2FS_TOOLS) is missing"
done
say "e2fsprogs: $(printf '%s\n' "$e2fs_files" | wc -l | tr -d ' ') files ($E2FS_TOOLS and their libraries)"

# --- 4. up to date? ------------------------------------------------------
digest=$(
    {
        printf 'release %s\n' "$rel"
        cd "$kdir/modules" && sha256sum load-order
        while read -r ko; do [ -z "$ko" ] || sha256sum "$ko"; done <load-order
        sha256sum <"$init"
        cd "$here" && sha256sum udhcpc-script mkcpio.py make-initramfs.sh
        sha256sum "$busybox" | cut -d' ' -f1
        for f in $e2fs_files; do printf '%s %s\n' "$f" "$(sha256sum <"$f" | cut -d' ' -f1)"; done
    } | sha256sum | cut -d' ' -f1
)
if [ -s "$out" ] && [ -f "$out.inputs" ] && [ "$(cat "$out.inputs")" = "$digest" ]; then
    say "up to date: $out (inputs unchanged); nothing to do"
    exit 0
fi

# --- 5. stage ------------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tenbox-initramfs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
say "staging the tree (busybox applets, /init, $(grep -c . "$kdir/modules/load-order" || true) modules for $rel)"
mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin" \
    "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/root" "$root/mnt" "$root/lib/modules/$rel"
cp "$busybox" "$root/bin/busybox"
applets=$("$busybox" --list-full) || die "cannot run $busybox --list-full"
for a in $applets; do
    case "$a" in
        bin/busybox|linuxrc|*/linuxrc|init|*/init) continue ;;
    esac
    [ -e "$root/$a" ] || [ -L "$root/$a" ] || ln -s /bin/busybox "$root/$a"
done
cp "$init" "$root/init"
chmod 755 "$root/init"
for f in $e2fs_files; do
    mkdir -p "$root$(dirname "$f")"
    rm -f "$root$f"
    cp -L "$f" "$root$f"
done
for tool in $E2FS_TOOLS; do
    path=$(PATH="/usr/sbin:/sbin:$PATH" command -v "$tool")
    if [ "$path" != "/usr/sbin/$tool" ]; then
        rm -f "$root/usr/sbin/$tool"
        ln -s "$path" "$root/usr/sbin/$tool"
    fi
done
# mke2fs picks the file system type from its name, as mkfs.ext4 does on Debian.
ln -sf mke2fs "$root/usr/sbin/mkfs.ext4"
ln -sf e2fsck "$root/usr/sbin/fsck.ext4"
mkdir -p "$root/etc/udhcpc"
cp "$here/udhcpc-script" "$root/etc/udhcpc/default.script"
chmod 755 "$root/etc/udhcpc/default.script"
cp "$kdir/modules/load-order" "$root/lib/modules/$rel/load-order"
while read -r ko; do
    [ -z "$ko" ] || cp "$kdir/modules/$ko" "$root/lib/modules/$rel/$ko"
done <"$kdir/modules/load-order"

# --- 6. pack -------------------------------------------------------------
say "packing $out"
mkdir -p "$(dirname "$out")"
rm -f "$out.inputs"
/usr/bin/python3 "$here/mkcpio.py" --root "$root" \
    --dev /dev/console:c:5:1:600 --dev /dev/null:c:1:3:666 \
    --gzip -o "$out" || die "mkcpio.py failed"
printf '%s\n' "$digest" >"$out.inputs"
say "done: $out ($(wc -c <"$out" | tr -d ' ') bytes, kernel $rel, busybox-static $bbver)"
