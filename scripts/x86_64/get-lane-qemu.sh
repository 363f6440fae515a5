#!/bin/bash
# Fetch the QEMU that runs the nested test lane (tests/framework/lane.py).
#
#   get-lane-qemu.sh [--out DIR] [--mirror URL]
#
# The lane emulates AMD-V with QEMU's TCG, and KVM runs inside it. Debian
# 12's QEMU 7.2 gets that emulation wrong now and then under load: its
# lane's own kernel crashed with corrupted stacks, and guests under the
# lane's KVM triple-faulted or lost an interrupt (docs/testing.md has the
# measurements). QEMU 10 from bookworm-backports does not. So where the
# system's qemu-system-x86_64 is older than QEMU_MIN, this script takes
# qemu-system-x86, qemu-system-common, qemu-system-data and seabios from
# <codename>-backports on Debian's mirror with `apt-get download` (a private
# apt configuration: the system's sources and installed packages are not
# touched; no root needed) and unpacks them into DIR (default
# <repo>/.cache/lane/qemu). The shared libraries come from the system: a
# missing one is named, with the package to install.
#
# On stdout it prints the command to run the lane's QEMU with, one argument
# per line: the system's qemu-system-x86_64 when it is new enough, else
# DIR/usr/bin/qemu-system-x86_64 with its -L data folders. Cached: a rerun
# that resolves the same versions does nothing. Progress and errors go to
# stderr, one line each.
set -euo pipefail

PROG=get-lane-qemu.sh
QEMU_MIN=8
PACKAGES="qemu-system-x86 qemu-system-common qemu-system-data seabios"

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out="$repo/.cache/lane/qemu"
mirror=http://deb.debian.org/debian

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; mirror=$2; shift 2 ;;
        --mirror=*) mirror=${1#--mirror=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

major() { "$1" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' | head -n 1; }

system=$(command -v qemu-system-x86_64 || true)
if [ -n "$system" ]; then
    v=$(major "$system")
    if [ -n "$v" ] && [ "$v" -ge "$QEMU_MIN" ]; then
        say "the system's QEMU $v is new enough for the lane"
        printf '%s\n' "$system"
        exit 0
    fi
fi

for tool in apt-get dpkg-deb ldd; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (this script needs a Debian system)"
done
# shellcheck source=/dev/null
codename=$(. /etc/os-release 2>/dev/null && printf '%s' "${VERSION_CODENAME:-}")
[ -n "$codename" ] || die "cannot tell the Debian release (no VERSION_CODENAME in /etc/os-release)"
suite="$codename-backports"

state="$repo/.cache/lane/apt-$suite"
mkdir -p "$state/lists/partial" "$state/archives/partial" "$state/parts" "$state/prefs"
chmod -R a+rwX "$state"  # apt-get as root hands downloads to the _apt user
printf 'deb %s %s main\n' "$mirror" "$suite" >"$state/sources.list"
: >"$state/status"
apt_opts=(-o "Dir::Etc::SourceList=$state/sources.list" -o "Dir::Etc::SourceParts=$state/parts"
          -o "Dir::Etc::Preferences=$state/preferences" -o "Dir::Etc::PreferencesParts=$state/prefs"
          -o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state" -o "Dir::Cache::Archives=$state/archives"
          -o "Dir::State::status=$state/status" -o "APT::Get::List-Cleanup=false" -q)

say "reading $suite from $mirror"
apt-get "${apt_opts[@]}" update >"$state/update.log" 2>&1 \
    || die "apt-get update of $suite failed: $(grep -E '^(E|W):' "$state/update.log" | head -n 1)"
versions=""
for p in $PACKAGES; do
    v=$(apt-cache "${apt_opts[@]}" show "$p" 2>/dev/null | awk '/^Version:/ { print $2; exit }')
    [ -n "$v" ] || die "$p is not in $suite on $mirror"
    versions="$versions $p=$v"
done
stamp_want="suite=$suite mirror=$mirror$versions"
bin="$out/usr/bin/qemu-system-x86_64"
if [ -f "$out/.stamp" ] && [ -x "$bin" ] && [ "$(cat "$out/.stamp")" = "$stamp_want" ]; then
    say "up to date: $out has$versions"
else
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/tenbox-lane-qemu.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    chmod 755 "$tmp"
    say "downloading$versions"
    # shellcheck disable=SC2086 # a word list of package=version
    (cd "$tmp" && apt-get "${apt_opts[@]}" download $versions >"$tmp/apt.log" 2>&1) \
        || die "apt-get download failed: $(grep -E '^(E|W):' "$tmp/apt.log" | head -n 1)"
    for deb in "$tmp"/*.deb; do
        dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb -x failed on $(basename "$deb")"
    done
    [ -x "$tmp/root/usr/bin/qemu-system-x86_64" ] || die "the packages have no usr/bin/qemu-system-x86_64"
    rm -rf "$out.new"
    mkdir -p "$(dirname "$out")"
    mv "$tmp/root" "$out.new"
    rm -rf "$out"
    mv "$out.new" "$out"
    printf '%s\n' "$stamp_want" >"$out/.stamp"
fi

missing=$(ldd "$bin" | awk '/not found/ { print $1 }' | tr '\n' ' ')
[ -z "$missing" ] || die "the lane's QEMU needs shared libraries this system lacks: $missing(install them with apt-get; apt-file or 'apt-cache search' names the packages)"
"$bin" -L "$out/usr/share/qemu" -L "$out/usr/share/seabios" --version >/dev/null \
    || die "$bin does not run"
say "the lane's QEMU: $("$bin" --version | head -n 1)"
printf '%s\n' "$bin" -L "$out/usr/share/qemu" -L "$out/usr/share/seabios"
