#!/bin/bash
# Build tenbox's busybox test initramfs for the kernel from get-kernel.sh.
#
#   make-initramfs.sh [--arch amd64|arm64] [--kernel-dir DIR] [--out FILE] [--init FILE]
#
# DIR is get-kernel.sh's output for the same --arch (default: the host's;
# <repo>/.cache/linux for amd64, <repo>/.cache/linux-arm64 for arm64): its
# version file and modules/ (the .ko files and load-order) go into the image
# under /lib/modules/<release>/. FILE defaults to DIR/initramfs.cpio.gz.
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
#                    e2fsprogs with the shared libraries they load and the
#                    dynamic loader, at the same paths: for the host's own
#                    architecture, this (Debian) build host's, as ldd lists
#                    them; for another, Debian's packages of that
#                    architecture (apt-get download, dpkg-deb -x, the
#                    libraries found by readelf's NEEDED entries); busybox
#                    makes only ext2, and the guest tests make and check
#                    real ext4 file systems
#   /etc/udhcpc/default.script
#                    udhcpc-script from this folder: busybox udhcpc calls it
#                    to configure the interface, route and resolv.conf
#
# For another --arch than the host's, apt's package lists are the ones
# get-kernel.sh --arch keeps in <repo>/.cache/apt-ARCH (run it first).
#
# The output is deterministic, and it is rebuilt only when an input changed
# (busybox, e2fsprogs and its libraries, /init, the udhcpc script,
# mkcpio.py, this script, the kernel release, the modules): FILE.inputs
# records the inputs' digest.
set -euo pipefail

PROG=make-initramfs.sh
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
kdir=""
out=""
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
init="$here/initramfs-init"
bbcache="$repo/.cache/busybox"

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --arch) [ $# -ge 2 ] || die "--arch needs amd64 or arm64"; arch=$2; shift 2 ;;
        --arch=*) arch=${1#--arch=}; shift ;;
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
case "$arch" in
    amd64) kdir=${kdir:-$repo/.cache/linux} ;;
    arm64) kdir=${kdir:-$repo/.cache/linux-$arch} ;;
    *) die "--arch must be amd64 or arm64, not '$arch'" ;;
esac
[ -n "$out" ] || out="$kdir/initramfs.cpio.gz"
[ -f "$init" ] || die "--init $init: no such file"

for tool in apt-cache apt-get dpkg-deb sha256sum /usr/bin/python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (this script needs a Debian system)"
done

# apt's options: none for the host's own architecture; for another, get-kernel.sh's package lists.
APT_OPTS=()
foreign=0
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
    foreign=1
    aptdir="$repo/.cache/apt-$arch"
    [ -n "$(find "$aptdir/lists" -maxdepth 1 -name '*_Packages*' 2>/dev/null | head -n 1)" ] \
        || die "no apt package lists for $arch in $aptdir: run scripts/x86_64/get-kernel.sh --arch $arch first"
    APT_OPTS=(-o "APT::Architecture=$arch" -o "APT::Architectures=$arch" -o "Dir::State::Lists=$aptdir/lists"
              -o "Dir::State::status=$aptdir/status" -o "Dir::Cache=$aptdir/cache" -o "Debug::NoLocking=1")
fi

# --- 1. kernel inputs ----------------------------------------------------
say "checking kernel folder $kdir ($arch)"
[ -s "$kdir/version" ] || die "no $kdir/version: run scripts/x86_64/get-kernel.sh --arch $arch first"
[ -f "$kdir/modules/load-order" ] || die "no $kdir/modules/load-order: run scripts/x86_64/get-kernel.sh --arch $arch first"
rel=$(head -n 1 "$kdir/version")
case "$rel" in ''|*/*|.*) die "bad kernel release '$rel' in $kdir/version" ;; esac
while read -r ko; do
    [ -z "$ko" ] || [ -f "$kdir/modules/$ko" ] || die "$kdir/modules/load-order names $ko, which is missing"
done <"$kdir/modules/load-order"

# --- 2. busybox ----------------------------------------------------------
say "resolving busybox-static (apt's candidate)"
bbver=$(LC_ALL=C apt-cache "${APT_OPTS[@]}" policy busybox-static 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')
if [ -z "$bbver" ] || [ "$bbver" = "(none)" ]; then
    die "busybox-static not found in apt's package lists; run 'apt-get update' (as root) and retry"
fi
bbdir="$bbcache/$(printf '%s' "$bbver" | tr ':' '_')"
[ "$foreign" -eq 0 ] || bbdir="$bbdir-$arch"
busybox="$bbdir/busybox"
if [ -x "$busybox" ]; then
    say "busybox-static $bbver: cached at $busybox"
else
    say "downloading busybox-static=$bbver"
    mkdir -p "$bbcache"
    dl=$(mktemp -d "$bbcache/.dl.XXXXXX")
    chmod 755 "$dl"  # apt-get download as root hands the transfer to _apt
    if ! (cd "$dl" && apt-get "${APT_OPTS[@]}" download -q "busybox-static=$bbver" >"$dl/apt.log" 2>&1); then
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
# The binaries and every shared object they load, the loader included,
# copied to the same paths in the image. Debian installs e2fsprogs on every
# system (Priority: required). e2fs_files are paths in the image; e2fs_src
# is where they are read from: / for the host's own architecture, an
# unpacked set of that architecture's packages for another.
E2FS_TOOLS="mke2fs e2fsck"
e2fs_files=""
e2fs_src=""
if [ "$foreign" -eq 0 ]; then
    for tool in $E2FS_TOOLS; do
        path=$(PATH="/usr/sbin:/sbin:$PATH" command -v "$tool" 2>/dev/null) \
            || die "$tool not found: install e2fsprogs (apt-get install e2fsprogs)"
        command -v ldd >/dev/null 2>&1 || die "ldd not found (libc-bin)"
        libs=$(ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }') \
            || die "ldd $path failed"
        [ -n "$libs" ] || die "ldd lists no libraries for $path (a static build?)"
        e2fs_files="$e2fs_files $path $libs"
    done
else
    # e2fsprogs and the packages of its libraries, unpacked; the libraries
    # each ELF file needs (readelf reads any architecture's), found in it.
    command -v readelf >/dev/null 2>&1 || die "readelf not found (binutils)"
    e2cache="$repo/.cache/e2fsprogs-$arch"
    E2FS_PACKAGES="e2fsprogs libext2fs2 libcom-err2 libblkid1 libuuid1 libss2 libc6"
    vers=""
    for pkg in $E2FS_PACKAGES; do
        v=$(LC_ALL=C apt-cache "${APT_OPTS[@]}" policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }')
        if [ -z "$v" ] || [ "$v" = "(none)" ]; then
            die "$pkg ($arch) not found in apt's package lists in $aptdir"
        fi
        vers="$vers $pkg=$v"
    done
    e2fs_src="$e2cache/$(printf '%s' "$vers" | sha256sum | cut -c1-16)"
    if [ ! -d "$e2fs_src" ]; then
        say "downloading e2fsprogs and its libraries ($arch)"
        mkdir -p "$e2cache"
        dl=$(mktemp -d "$e2cache/.dl.XXXXXX")
        chmod 755 "$dl"
        # shellcheck disable=SC2086 # a word list of package=version
        if ! (cd "$dl" && apt-get "${APT_OPTS[@]}" download -q $vers >"$dl/apt.log" 2>&1); then
            msg=$(grep -E '^(E|W):' "$dl/apt.log" | head -n 1 || true)
            rm -rf "$dl"
            die "apt-get download of e2fsprogs ($arch) failed: $msg"
        fi
        for deb in "$dl"/*.deb; do
            dpkg-deb -x "$deb" "$dl/root" || { rm -rf "$dl"; die "dpkg-deb -x failed on $deb"; }
        done
        mv "$dl/root" "$e2fs_src"
        rm -rf "$dl"
    fi
    # Debian's merged /usr: /lib is usr/lib, whatever the packages' own paths.
    find_lib() {  # find_lib SONAME -> its path in the image
        for d in lib/aarch64-linux-gnu usr/lib/aarch64-linux-gnu lib usr/lib; do
            [ -e "$e2fs_src/$d/$1" ] && { printf '/%s/%s\n' "$d" "$1"; return 0; }
        done
        return 1
    }
    in_tree() {  # in_tree PATH -> PATH with its symlinks followed inside the unpacked tree
        p=$1 n=0
        while [ -L "$e2fs_src$p" ] && [ $n -lt 16 ]; do
            t=$(readlink "$e2fs_src$p")
            case "$t" in /*) p=$t ;; *) p=$(dirname "$p")/$t ;; esac
            n=$((n + 1))
        done
        printf '%s\n' "$p"
    }
    todo=""
    for tool in $E2FS_TOOLS; do todo="$todo /sbin/$tool"; done
    seen=" "
    while [ -n "$todo" ]; do
        # shellcheck disable=SC2086
        set -- $todo
        f=$1; shift; todo="$*"
        case "$seen" in *" $f "*) continue ;; esac
        seen="$seen$f "
        real=$(in_tree "$f")
        [ -f "$e2fs_src$real" ] || die "$f is not in $arch's e2fsprogs and its libraries"
        e2fs_files="$e2fs_files $f"
        f=$real
        interp=$(readelf -l "$e2fs_src$f" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
        [ -z "$interp" ] || todo="$todo $interp"
        for so in $(readelf -d "$e2fs_src$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            lib=$(find_lib "$so") || die "$so (needed by $f) is not in $arch's e2fsprogs and its libraries"
            todo="$todo $lib"
        done
    done
fi
# shellcheck disable=SC2086 # a word list of paths without spaces
e2fs_files=$(printf '%s\n' $e2fs_files | sort -u)
src_of() {  # src_of PATH -> the file to read for image path PATH
    if [ "$foreign" -eq 1 ]; then printf '%s%s\n' "$e2fs_src" "$(in_tree "$1")"; else printf '%s\n' "$1"; fi
}
for f in $e2fs_files; do
    [ -f "$(src_of "$f")" ] || die "$f (needed by $E2FS_TOOLS) is missing"
done
say "e2fsprogs: $(printf '%s\n' "$e2fs_files" | wc -l | tr -d ' ') files ($E2FS_TOOLS and their libraries, $arch)"

# --- 4. up to date? ------------------------------------------------------
digest=$(
    {
        printf 'release %s %s\n' "$rel" "$arch"
        cd "$kdir/modules" && sha256sum load-order
        while read -r ko; do [ -z "$ko" ] || sha256sum "$ko"; done <load-order
        sha256sum <"$init"
        cd "$here" && sha256sum udhcpc-script mkcpio.py make-initramfs.sh
        sha256sum "$busybox" | cut -d' ' -f1
        for f in $e2fs_files; do printf '%s %s\n' "$f" "$(sha256sum <"$(src_of "$f")" | cut -d' ' -f1)"; done
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
# The applets' paths, from the host's busybox when the image's is another architecture's (the same
# Debian version lists the same applets).
lister=$busybox
if [ "$foreign" -eq 1 ]; then
    lister=$(command -v busybox) || die "busybox not found: install busybox-static (it lists the applets)"
fi
applets=$("$lister" --list-full) || die "cannot run $lister --list-full"
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
    cp -L "$(src_of "$f")" "$root$f"
done
for tool in $E2FS_TOOLS; do
    if [ "$foreign" -eq 1 ]; then
        path=/sbin/$tool
    else
        path=$(PATH="/usr/sbin:/sbin:$PATH" command -v "$tool")
    fi
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
say "done: $out ($(wc -c <"$out" | tr -d ' ') bytes, kernel $rel, busybox-static $bbver, $arch)"
