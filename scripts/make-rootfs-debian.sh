#!/bin/bash
# Build a Debian root file system template for tenbox VMs (root).
#
#   make-rootfs-debian.sh [--arch amd64|arm64] [--suite SUITE] [--name NAME] [--out DIR] [--size SIZE]
#                         [--packages P1,P2,...] [--hostname NAME] [--ssh-key FILE|KEY]
#                         [--mirror URL] [--security-mirror URL|none] [--cache-dir DIR]
#                         [--layout plain|cloud] [--refresh] [--check]
#
# debootstraps SUITE (default bookworm, --variant=minbase) for ARCH (Debian's
# name, default this host's: dpkg --print-architecture) from Debian's
# mirror, installs what a VM needs (systemd, udev, systemd-networkd and
# systemd-resolved, e2fsprogs, iproute2, Debian's cloud kernel
# linux-image-cloud-ARCH with an initramfs-tools initramfs that carries the
# virtio modules), the security updates, and the --packages; configures it
# for a tenbox VM:
#
#   - root file system on /dev/vda (ext4), fstab says so
#   - a login prompt on the serial console ttyS0
#   - DHCP on every en* and eth* link (systemd-networkd), DNS by
#     systemd-resolved
#   - the hostname (--hostname, default "tenbox")
#   - root's password locked; --ssh-key puts one public key in
#     /root/.ssh/authorized_keys (and installs openssh-server, whose host keys
#     each VM generates at its first boot)
#   - an empty /etc/machine-id: each VM makes its own at its first boot
#   - apt's lists and caches removed (run `apt-get update` in the guest)
#
# then makes an ext4 image of it with `mkfs.ext4 -d` (no loop mount),
# converts that to a compressed qcow2 with qemu-img, and fills DIR (default
# /var/cache/tenbox/images/NAME, NAME default debian-SUITE) with:
#
#   rootfs.qcow2     the root file system template (virtual size --size, default 2G)
#   vmlinuz          the kernel, extracted from the template (an x86 bzImage,
#                    or an arm64 Image as Debian installs it)
#   initrd.img       its initramfs (root=/dev/vda on virtio-blk, MMIO or PCI)
#   packages.txt     every installed package and version
#   manifest.json    name, version, arch, the files above with their sizes
#                    and sha256, the kernel command line to boot them with
#   .stamp           the digest of this script and its inputs
#
# --layout cloud makes a whole disk shaped like Debian's genericcloud image
# instead of a bare file system (the default, --layout plain): a GPT with
# partition 14 "BIOS boot" (3 MiB), 15 an EFI system partition (vfat, empty)
# and 1 the root (ext4, from 128 MiB to the end of --size); /boot/grub/grub.cfg
# made by Debian's own grub-mkconfig with root=PARTUUID=...; cloud-init
# (datasource_list NoCloud, None: without a seed nothing waits for a metadata
# service), openssh-server and sudo; /etc/fstab by PARTUUID. DIR then holds
# disk.qcow2 (the partitioned disk) where the plain layout has rootfs.qcow2;
# vmlinuz and initrd.img are the same copies of /boot, and the manifest says
# "layout": "cloud" and boots the disk with root=PARTUUID=... .
#
# `tenbox image import DIR --name NAME` puts DIR into tenboxd's image store
# (`tenbox image build debian` runs this script and imports the result).
#
# Cached and idempotent: a rerun with the same inputs (this script, suite,
# mirrors, packages, size, hostname, key, name, layout) finds DIR/.stamp and does
# nothing; --refresh builds again anyway (to pick up new Debian updates).
# Downloaded .debs are kept in --cache-dir (default DIR/../.debs/SUITE-ARCH)
# for later builds. The build happens in a temporary folder beside DIR,
# which replaces DIR only once everything is written: an interrupted or
# failed build leaves DIR as it was. --check prints whether DIR is up to date
# (exit 0) or not (exit 1) and builds nothing.
#
# --arch arm64 on an amd64 host (or the reverse) runs the chroot's programs
# through qemu-user: qemu-user-static must be registered with binfmt_misc
# with the F flag (Debian's package does that where systemd boots the
# host); the script checks, and does not register it itself (that is the
# host kernel's global state). --layout cloud is amd64 only for now.
#
# Progress goes to stderr, one line per stage; errors are one line too.
# Exit status: 0 built or up to date, 1 a stage failed, 2 usage, 3 not root,
# a tool is missing or qemu-user is not registered for a foreign --arch,
# 4 not enough free disk space (checked before the build, and again before
# the image is made).
#
# Test hook: $TENBOX_BINFMT_DIR replaces /proc/sys/fs/binfmt_misc for the
# qemu-user check (the tests point it at a folder without the entry).
set -euo pipefail

PROG=make-rootfs-debian.sh
# Bump when the recipe changes in a way the script's own digest does not show.
RECIPE=1
# What every template gets on top of minbase (and Debian's cloud kernel for
# the architecture, linux-image-cloud-ARCH, below).
# (systemd-resolved is a package of its own from bookworm on; before, systemd has it.)
BASE_PACKAGES="systemd-sysv udev dbus e2fsprogs iproute2 initramfs-tools zstd"
# Modules the initramfs carries and loads: virtio transports (MMIO for tenbox
# and QEMU microvm, PCI for other VMMs), the disk and network cards, and the
# root file system (built into Debian's cloud kernels; listed in case not).
# The same for both architectures: Debian's arm64 cloud kernel (6.1) has
# the virtio ones as modules too, and initramfs-tools' manual_add_modules
# skips one that is built in, so a built-in module never fails the hook.
INITRAMFS_MODULES="virtio_mmio virtio_pci virtio_blk virtio_net ext4"
BINFMT_DIR=${TENBOX_BINFMT_DIR:-/proc/sys/fs/binfmt_misc}
ROOT_DEVICE=/dev/vda
# --layout cloud: what Debian's genericcloud image has on top (debian-cloud-images'
# package lists): cloud-init, sshd for the keys it installs, sudo for its default
# user, GRUB's tools (grub2-common has grub-mkconfig and update-grub, which the
# kernel's postinst hook runs in the guest after an upgrade; grub-pc-bin lets the
# guest run grub-install), and growpart for cloud-init to grow the root partition.
CLOUD_PACKAGES="cloud-init openssh-server sudo grub2-common grub-pc-bin cloud-guest-utils"
# The GPT of Debian's genericcloud image (debian-cloud-images, the partition
# hook for amd64), in 512-byte sectors: 14 BIOS boot at 1 MiB, 15 the EFI
# system partition at 4 MiB, 1 the root from 128 MiB to the last MiB (the
# backup GPT is in the last 33 sectors).
SECTOR_BYTES=512
BIOS_BOOT_START=2048 BIOS_BOOT_SECTORS=6144
ESP_START=8192 ESP_SECTORS=253952
ROOT_START=262144
DISK_TAIL_SECTORS=2048
GPT_TYPE_BIOS_BOOT=21686148-6449-6E6F-744E-656564454649
GPT_TYPE_ESP=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
GPT_TYPE_ROOT_X86_64=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709
# The kernel command line of Debian's genericcloud grub.cfg (grub-cloud-amd64's
# /etc/default/grub): the console on the screen and on the first serial port.
CLOUD_GRUB_CMDLINE="console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"
# Free space needed before debootstrap starts: the chroot (~600 MiB with the
# kernel), the ext4 image of it and its qcow2 copy, with room to spare.
MIN_FREE_MB=2048
STAGES=7

arch=""
suite=bookworm
name=""
out=""
size=2G
packages=""
hostname_=tenbox
ssh_key=""
mirror=http://deb.debian.org/debian
security_mirror=http://deb.debian.org/debian-security
cache_dir=""
layout=plain
refresh=0
check_only=0

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
die_usage() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
die_env() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 3; }
die_space() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 4; }
stage_no=0
stage() { stage_no=$((stage_no + 1)); say "[$stage_no/$STAGES] $*"; }
usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}
need_arg() { [ "$2" -ge 2 ] || die_usage "$1 needs a value (see --help)"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --arch) need_arg "$1" $#; arch=$2; shift 2 ;;
        --arch=*) arch=${1#*=}; shift ;;
        --suite) need_arg "$1" $#; suite=$2; shift 2 ;;
        --suite=*) suite=${1#*=}; shift ;;
        --name) need_arg "$1" $#; name=$2; shift 2 ;;
        --name=*) name=${1#*=}; shift ;;
        --out) need_arg "$1" $#; out=$2; shift 2 ;;
        --out=*) out=${1#*=}; shift ;;
        --size) need_arg "$1" $#; size=$2; shift 2 ;;
        --size=*) size=${1#*=}; shift ;;
        --packages) need_arg "$1" $#; packages="$packages,$2"; shift 2 ;;
        --packages=*) packages="$packages,${1#*=}"; shift ;;
        --hostname) need_arg "$1" $#; hostname_=$2; shift 2 ;;
        --hostname=*) hostname_=${1#*=}; shift ;;
        --ssh-key) need_arg "$1" $#; ssh_key=$2; shift 2 ;;
        --ssh-key=*) ssh_key=${1#*=}; shift ;;
        --mirror) need_arg "$1" $#; mirror=$2; shift 2 ;;
        --mirror=*) mirror=${1#*=}; shift ;;
        --security-mirror) need_arg "$1" $#; security_mirror=$2; shift 2 ;;
        --security-mirror=*) security_mirror=${1#*=}; shift ;;
        --cache-dir) need_arg "$1" $#; cache_dir=$2; shift 2 ;;
        --cache-dir=*) cache_dir=${1#*=}; shift ;;
        --layout) need_arg "$1" $#; layout=$2; shift 2 ;;
        --layout=*) layout=${1#*=}; shift ;;
        --refresh) refresh=1; shift ;;
        --check) check_only=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die_usage "unknown argument '$1' (see --help)" ;;
    esac
done

# --- inputs ----------------------------------------------------------------
host_arch=$(dpkg --print-architecture 2>/dev/null) || host_arch=""
if [ -z "$host_arch" ]; then
    case "$(uname -m)" in x86_64) host_arch=amd64 ;; aarch64) host_arch=arm64 ;; esac
fi
[ -n "$arch" ] || arch=$host_arch
# Per architecture: the kernel's name for it (uname -m: the manifest's "arch",
# qemu-user's), and tenbox-vm-runtime's default command line for its board
# (tenbox_vmm/machine.py for x86-64; tenbox_vmm/arch/aarch64/board.py's
# VirtBoard for arm64, whose console is a 16550 on MMIO: ttyS0 too), to which
# the manifest adds the root.
case "$arch" in
    amd64)
        MACHINE=x86_64
        CMDLINE_BASE="console=ttyS0 reboot=k panic=1 pci=off nomodeset tsc=reliable no_timer_check io_delay=none random.trust_cpu=on"
        ;;
    arm64)
        MACHINE=aarch64
        CMDLINE_BASE="console=ttyS0 panic=1 random.trust_cpu=on"
        ;;
    *) die_usage "--arch '${arch:-$(uname -m)}' is not an architecture tenbox builds images for: amd64 or arm64" ;;
esac
ARCH=$arch
KERNEL_PACKAGE=linux-image-cloud-$ARCH
printf '%s' "$suite" | grep -Eq '^[a-z][a-z0-9-]{1,30}$' || die_usage "--suite '$suite' is not a Debian suite name (e.g. bookworm)"
[ -n "$name" ] || name="debian-$suite"
printf '%s' "$name" | grep -Eq '^[A-Za-z0-9-]{1,64}$' || die_usage "--name '$name' must match [A-Za-z0-9-]{1,64}"
printf '%s' "$hostname_" | grep -Eq '^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$' \
    || die_usage "--hostname '$hostname_' is not a valid host name"
case "$mirror" in http://*|https://*) ;; *) die_usage "--mirror must be an http:// or https:// URL" ;; esac
case "$security_mirror" in http://*|https://*|none) ;; *) die_usage "--security-mirror must be a URL or 'none'" ;; esac
case "$layout" in
    plain) ;;
    cloud)
        STAGES=8
        # Debian's arm64 genericcloud disk is laid out otherwise (no BIOS boot partition, GRUB for EFI only).
        [ "$ARCH" = amd64 ] || die_usage "--layout cloud is amd64 only for now (build arm64 images with --layout plain)"
        ;;
    *) die_usage "--layout '$layout' is neither plain (a bare ext4 root) nor cloud (a GPT disk like Debian's genericcloud)" ;;
esac
case "$size" in
    *[!0-9KMGTkmgt]*|"") die_usage "--size '$size' is not a size such as 2G or 1536M" ;;
esac
size_bytes=$(/usr/bin/python3 -c '
import re, sys
m = re.fullmatch(r"(\d+)([KMGT]?)", sys.argv[1].upper())
print(int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)] if m else 0)' "$size") \
    || die_usage "--size '$size' is not a size such as 2G or 1536M"
[ "$size_bytes" -ge $((512 << 20)) ] || die_usage "--size '$size' is too small: at least 512M"
[ "$size_bytes" -le $((1 << 40)) ] || die_usage "--size '$size' is too large: at most 1T"
size_mb=$((size_bytes >> 20))
# --packages: comma- or space-separated Debian package names.
extra=$(printf '%s' "$packages" | tr -s ', ' '\n' | sed '/^$/d' | sort -u | tr '\n' ' ')
for p in $extra; do
    printf '%s' "$p" | grep -Eq '^[a-z0-9][a-z0-9.+-]+$' || die_usage "--packages: '$p' is not a Debian package name"
done
key_line=""
if [ -n "$ssh_key" ]; then
    if [ -f "$ssh_key" ]; then
        key_line=$(grep -Ev '^[[:space:]]*(#|$)' "$ssh_key" || true)
    else
        key_line=$ssh_key
    fi
    [ "$(printf '%s\n' "$key_line" | wc -l)" -eq 1 ] || die_usage "--ssh-key must be one public key (one line)"
    printf '%s' "$key_line" | grep -Eq '^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp[0-9]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+( .*)?$' \
        || die_usage "--ssh-key is neither a public key file nor a public key line (ssh-ed25519 AAAA... comment)"
    case " $extra " in *" openssh-server "*) ;; *) extra="$extra openssh-server"; say "--ssh-key given: adding openssh-server" ;; esac
fi
[ -n "$out" ] || out=/var/cache/tenbox/images/$name
case "$out" in /*) ;; *) out=$(pwd)/$out ;; esac
out=${out%/}
parent=$(dirname "$out")
[ -n "$cache_dir" ] || cache_dir=$parent/.debs/$suite-$ARCH
case "$cache_dir" in /*) ;; *) cache_dir=$(pwd)/$cache_dir ;; esac

# The stamp: this script, the recipe and every input that changes the result.
stamp_want=$( {
    sha256sum "$0" | cut -d' ' -f1
    printf 'recipe=%s\narch=%s\nsuite=%s\nname=%s\nsize=%s\npackages=%s\nhostname=%s\nkey=%s\nmirror=%s\nsecurity=%s\n' \
        "$RECIPE" "$ARCH" "$suite" "$name" "$size_bytes" "$extra" "$hostname_" "$key_line" "$mirror" "$security_mirror"
    # The layout only when it is not the default: a plain build's inputs read as before --layout.
    [ "$layout" = plain ] || printf 'layout=%s\n' "$layout"
} | sha256sum | cut -d' ' -f1)

if [ "$layout" = cloud ]; then
    # The same inputs give the same identifiers: the file system's UUID as the
    # plain layout makes it, the GPT's from the stamp and what they name.
    # (Every VM of an image shares them, as every VM of a distribution's cloud image does.)
    ids=$(printf '%s' "$stamp_want" | /usr/bin/python3 -c '
import hashlib, sys, uuid
stamp = sys.stdin.read()
print(uuid.UUID(stamp[:32]))
for what in ("disk", "root-partition", "esp-partition", "esp-volume"):
    print(uuid.UUID(hashlib.sha256(("%s:%s" % (stamp, what)).encode()).hexdigest()[:32]))')
    # shellcheck disable=SC2086 # five words
    set -- $ids
    fs_uuid=$1 disk_guid=$2 root_partuuid=$3 esp_partuuid=$4
    esp_volume_id=$(printf '%s' "$5" | tr -d - | cut -c1-8)
    image_file=disk.qcow2
    ROOT_DEVICE=PARTUUID=$root_partuuid
else
    image_file=rootfs.qcow2
fi

up_to_date() {
    [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp_want" ] && [ -f "$out/manifest.json" ] || return 1
    # Every file the manifest names is there with its size (the full sha256 check is `tenbox image import`'s).
    /usr/bin/python3 - "$out" <<'EOF'
import json, os, sys
d = sys.argv[1]
try:
    files = json.load(open(os.path.join(d, "manifest.json")))["files"]
    ok = all(os.path.getsize(os.path.join(d, n)) == f["size"] for n, f in files.items())
except (OSError, ValueError, KeyError, TypeError):
    ok = False
sys.exit(0 if ok else 1)
EOF
}

if [ "$refresh" -eq 0 ] && up_to_date; then
    say "up to date: $out ($name, suite $suite, $ARCH); nothing to do (--refresh builds again)"
    exit 0
fi
if [ "$check_only" -eq 1 ]; then
    say "not up to date: $out"
    exit 1
fi

# --- environment -----------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die_env "needs root: debootstrap and chroot do (run it with sudo)"
for tool in debootstrap mkfs.ext4 qemu-img unshare chroot sha256sum flock /usr/bin/python3; do
    command -v "$tool" >/dev/null 2>&1 || die_env "$tool not found (apt-get install debootstrap e2fsprogs qemu-utils util-linux)"
done
if [ "$ARCH" != "$host_arch" ]; then
    # debootstrap's second stage and every chroot step run ARCH's programs here.
    qemu_entry=$BINFMT_DIR/qemu-$MACHINE
    { [ -f "$qemu_entry" ] && [ "$(head -n 1 "$qemu_entry")" = enabled ] \
        && grep -Eq '^flags: *[A-Z]*F' "$qemu_entry"; } \
        || die_env "building an $ARCH image on this ${host_arch:-$(uname -m)} host needs qemu-user-static registered with binfmt_misc with the F flag ($qemu_entry is missing, disabled or without F): apt-get install qemu-user-static binfmt-support, or systemctl restart systemd-binfmt"
fi
if [ "$layout" = cloud ]; then
    for tool in sfdisk mkfs.vfat; do
        command -v "$tool" >/dev/null 2>&1 || die_env "$tool not found (apt-get install fdisk dosfstools)"
    done
fi
# mkfs.ext4 -d (populate from a folder) arrived in e2fsprogs 1.43.
mkfs_usage=$(mkfs.ext4 2>&1 || true)
case "$mkfs_usage" in *"[-d "*) ;; *) die_env "this mkfs.ext4 has no -d option (e2fsprogs 1.43 or later is needed)" ;; esac

if [ -e "$out" ] && [ ! -f "$out/.stamp" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    die_usage "$out exists and was not made by this script; choose another --out"
fi
mkdir -p "$parent"
free_mb() { df -Pm "$1" | awk 'NR == 2 { print $4 }'; }
avail=$(free_mb "$parent")
[ "$avail" -ge "$MIN_FREE_MB" ] \
    || die_space "not enough free space in $parent: ${avail} MiB free, the build needs at least ${MIN_FREE_MB} MiB"
mkdir -p "$cache_dir"
# One build per output folder at a time.
lock=$parent/.$(basename "$out").lock
exec 9>"$lock"
flock -n 9 || die "another build of $out is running (lock $lock)"

work=$(mktemp -d "$parent/.build-$name.XXXXXX")
root=$work/root
cleanup() {
    # Nothing is mounted here outside the build's own mount namespaces, which end with them.
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
log=$work/build.log
: >"$log"
fail() {
    # The stage's last lines of output, then one line.
    tail -n 25 "$log" | sed 's/^/  | /' >&2
    die "$*"
}
started=$(date +%s)

# --- 1. debootstrap --------------------------------------------------------
via=""
[ "$ARCH" = "$host_arch" ] || via=", through qemu-user"
stage "debootstrap $suite $ARCH (minbase) from $mirror$via"
# In its own mount namespace: the mounts debootstrap makes in the target vanish with it, whatever happens.
unshare --mount --propagation private \
    debootstrap --variant=minbase --arch="$ARCH" --cache-dir="$cache_dir" "$suite" "$root" "$mirror" >>"$log" 2>&1 \
    || fail "debootstrap $suite $ARCH from $mirror failed (see above; is the suite name right and the mirror reachable?)"

# --- 2. packages -----------------------------------------------------------
layout_packages=""
[ "$layout" = plain ] || layout_packages=$CLOUD_PACKAGES
stage "packages: $BASE_PACKAGES $KERNEL_PACKAGE systemd-resolved${layout_packages:+ $layout_packages}${extra:+ + $extra}"
{
    echo "deb $mirror $suite main"
    case "$suite" in
        sid|unstable|experimental) ;;
        *)
            echo "deb $mirror $suite-updates main"
            [ "$security_mirror" = none ] || echo "deb $security_mirror $suite-security main"
            ;;
    esac
} >"$root/etc/apt/sources.list"
# No service starts inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
# The initramfs: only the modules listed (small and quick to load), each loaded at boot.
mkdir -p "$root/etc/initramfs-tools/conf.d" "$root/etc/initramfs-tools/hooks"
cat >"$root/etc/initramfs-tools/conf.d/tenbox.conf" <<'EOF'
# tenbox: a small initramfs with the virtio modules (hooks/tenbox-virtio).
MODULES=list
COMPRESS=zstd
EOF
cat >"$root/etc/initramfs-tools/hooks/tenbox-virtio" <<EOF
#!/bin/sh
# tenbox: the root file system is on virtio-blk (MMIO under tenbox, PCI elsewhere).
PREREQ=""
case "\$1" in prereqs) echo "\$PREREQ"; exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for m in $INITRAMFS_MODULES; do
    manual_add_modules "\$m"
    echo "\$m" >>"\$DESTDIR/conf/modules"
done
EOF
chmod 755 "$root/etc/initramfs-tools/hooks/tenbox-virtio"
mkdir -p "$cache_dir/apt"
# shellcheck disable=SC2016,SC2086 # $1.. expanded inside the namespace; the package lists are word lists
unshare --mount --propagation private sh -euc '
    root=$1; cache=$2; shift 2
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount --rbind /dev "$root/dev"
    mount --bind "$cache" "$root/var/cache/apt/archives"
    export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
    chroot "$root" apt-get update -q
    chroot "$root" apt-get -y -q -o Dpkg::Options::=--force-confold dist-upgrade
    resolved=""
    if chroot "$root" apt-cache show systemd-resolved >/dev/null 2>&1; then resolved=systemd-resolved; fi
    chroot "$root" apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold $resolved "$@"
' sh "$root" "$cache_dir/apt" $BASE_PACKAGES "$KERNEL_PACKAGE" $layout_packages $extra >>"$log" 2>&1 \
    || fail "installing the packages failed (see above; a name in --packages that $suite does not have?)"

# --- 3. configure ----------------------------------------------------------
stage "configure: hostname $hostname_, root on $ROOT_DEVICE, console ttyS0, DHCP${key_line:+, SSH key for root}${layout_packages:+, cloud-init (NoCloud)}"
echo "$hostname_" >"$root/etc/hostname"
cat >"$root/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$hostname_
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
if [ "$layout" = plain ]; then
    cat >"$root/etc/fstab" <<EOF
# tenbox: the VM's own qcow2 overlay of the template is its first virtio disk.
$ROOT_DEVICE	/	ext4	rw,errors=remount-ro	0	1
EOF
else
    # As Debian's genericcloud: by partition UUID, whatever the disk is called in
    # the VM; systemd grows the root file system when the partition has grown
    # (cloud-init's growpart grows the partition when the disk has). The EFI
    # system partition is empty: nofail, a VM boots without it.
    cat >"$root/etc/fstab" <<EOF
# tenbox (make-rootfs-debian.sh --layout cloud): the partitions of the image's disk.
PARTUUID=$root_partuuid	/	ext4	rw,discard,errors=remount-ro,x-systemd.growfs	0	1
PARTUUID=$esp_partuuid	/boot/efi	vfat	defaults,nofail	0	0
EOF
    mkdir -p "$root/boot/efi" "$root/boot/grub" "$root/etc/cloud/cloud.cfg.d" "$root/etc/default/grub.d"
    # Without a datasource_list cloud-init tries its whole built-in list, network
    # metadata services (EC2, OpenStack, ...) among them, which tenbox has not;
    # 95 sorts after the 90_dpkg.cfg that debconf may write with such a list.
    cat >"$root/etc/cloud/cloud.cfg.d/95_tenbox.cfg" <<'EOF'
# tenbox (make-rootfs-debian.sh --layout cloud): a VM's user, keys, host name
# and user-data come from a NoCloud seed (a disk labelled cidata). Without a
# seed cloud-init goes on with the None data source (the image's defaults)
# and probes no network metadata service.
datasource_list: [ NoCloud, None ]
# As Debian's genericcloud image: the host name from the seed in /etc/hosts.
manage_etc_hosts: true
# The locale the image has (cloud-init's default, en_US.UTF-8, is not
# generated: Debian's locale-gen makes only what /etc/locale.gen lists).
locale: C.UTF-8
EOF
    # Debian's genericcloud settings (grub-cloud-amd64's /etc/default/grub, no
    # menu timeout), and root by PARTUUID also when update-grub runs in the guest
    # (a kernel upgrade), where grub-probe finds the real disk.
    cat >"$root/etc/default/grub.d/15_tenbox.cfg" <<EOF
# tenbox (make-rootfs-debian.sh --layout cloud): as Debian's genericcloud image.
GRUB_TIMEOUT=0
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="$CLOUD_GRUB_CMDLINE"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_LINUX_UUID=true
GRUB_DISABLE_LINUX_PARTUUID=false
EOF
    if [ ! -e "$root/etc/default/grub" ] && [ -f "$root/usr/share/grub/default/grub" ]; then
        # What grub-pc's postinst would install (grub2-common ships the template only).
        cp "$root/usr/share/grub/default/grub" "$root/etc/default/grub"
    fi
fi
mkdir -p "$root/etc/systemd/network"
cat >"$root/etc/systemd/network/80-tenbox-dhcp.network" <<'EOF'
# tenbox: DHCP on the VM's network card (virtio-net; tenbox's NAT answers).
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
# Nothing in the template waits for the network; if something asks, not for long.
mkdir -p "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat >"$root/etc/systemd/system/systemd-networkd-wait-online.service.d/tenbox.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
EOF
if [ -n "$key_line" ]; then
    install -d -m 700 "$root/root/.ssh"
    printf '%s\n' "$key_line" >"$root/root/.ssh/authorized_keys"
    chmod 600 "$root/root/.ssh/authorized_keys"
fi
if [ -x "$root/usr/sbin/sshd" ]; then
    # Every VM gets its own host keys at its first boot, not a copy of the template's.
    rm -f "$root"/etc/ssh/ssh_host_*
    cat >"$root/etc/systemd/system/tenbox-ssh-host-keys.service" <<'EOF'
[Unit]
Description=Generate SSH host keys (tenbox: once per VM)
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
fi
# shellcheck disable=SC2016 # expanded inside the chroot
chroot "$root" /bin/sh -euc '
    export PATH=/usr/sbin:/usr/bin:/sbin:/bin
    systemctl enable -q systemd-networkd.service systemd-resolved.service serial-getty@ttyS0.service
    if [ -f /etc/systemd/system/tenbox-ssh-host-keys.service ]; then systemctl enable -q tenbox-ssh-host-keys.service; fi
    # Periodic chores a short-lived VM does not want at boot.
    systemctl mask -q apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service
    passwd -l root
' >>"$log" 2>&1 || fail "configuring the system failed"
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
rm -f "$root/usr/sbin/policy-rc.d"
# Each VM makes its own machine id (and random seed) at its first boot.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root/var/lib/systemd/random-seed"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/* "$root"/var/tmp/* \
    "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/var/cache/debconf/*-old
mkdir -p "$root/var/lib/apt/lists/partial"

# --- 4. kernel -------------------------------------------------------------
stage "kernel and initramfs"
mkdir -p "$work/out"
set -- "$root"/boot/vmlinuz-*
{ [ $# -eq 1 ] && [ -f "$1" ]; } || fail "expected one kernel in /boot of the template, found: $*"
release=${1##*/vmlinuz-}
[ -f "$root/boot/initrd.img-$release" ] || fail "no initrd.img-$release in /boot of the template"
cp "$root/boot/vmlinuz-$release" "$work/out/vmlinuz"
cp "$root/boot/initrd.img-$release" "$work/out/initrd.img"
# shellcheck disable=SC2016 # dpkg-query's format, not the shell's
chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' | sort >"$work/out/packages.txt"
debian_version=$(cat "$root/etc/debian_version")
say "kernel $release, initramfs $(($(wc -c <"$work/out/initrd.img") >> 10)) KiB, Debian $debian_version, $(wc -l <"$work/out/packages.txt") packages"

# --- 5. grub.cfg (--layout cloud) -------------------------------------------
if [ "$layout" = cloud ]; then
    stage "grub.cfg by grub-mkconfig: root=PARTUUID=$root_partuuid, search --fs-uuid $fs_uuid"
    # grub-mkconfig asks grub-probe which device holds / and /boot, and that
    # device's file system, UUIDs and partition map; it takes no preset
    # GRUB_DEVICE*, and the /etc/grub.d scripts ask grub-probe again. The chroot
    # has no disk (the disk is made from it afterwards), so for this one run
    # grub-probe answers for the disk the next stage makes. Debian builds its
    # cloud images the same way (debian-cloud-images: a grub-probe of its own
    # for grub-mkconfig, the device named PARTUUID=...; 10_linux puts that on
    # the command line when /dev/disk/ does not know the UUIDs, as in a chroot).
    # It is bind-mounted over Debian's in a private mount namespace: the image
    # keeps the real one, which update-grub in the guest uses.
    cat >"$work/grub-probe" <<EOF
#!/bin/sh
# make-rootfs-debian.sh --layout cloud: grub-probe for grub-mkconfig in the build chroot.
target=
while [ \$# -gt 0 ]; do
    case "\$1" in
        -t|--target) target=\$2; shift 2 ;;
        --target=*) target=\${1#*=}; shift ;;
        *) shift ;;
    esac
done
case "\$target" in
    device) echo "PARTUUID=$root_partuuid" ;;
    fs) echo ext2 ;;
    fs_uuid) echo "$fs_uuid" ;;
    partuuid) echo "$root_partuuid" ;;
    partmap) echo gpt ;;
    abstraction) ;;
    drive) echo "(hd0,gpt1)" ;;
    compatibility_hint) echo hd0,gpt1 ;;
    hints_string) echo "--hint-bios=hd0,gpt1 --hint-efi=hd0,gpt1 --hint-baremetal=ahci0,gpt1 " ;;
    *) echo "grub-probe (make-rootfs-debian.sh): no answer for --target=\$target" >&2; exit 1 ;;
esac
EOF
    chmod 755 "$work/grub-probe"
    # shellcheck disable=SC2016 # $1.. expanded inside the namespace
    unshare --mount --propagation private sh -euc '
        root=$1; probe=$2
        mount --bind "$probe" "$root/usr/sbin/grub-probe"
        export LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
        chroot "$root" grub-mkconfig -o /boot/grub/grub.cfg
    ' sh "$root" "$work/grub-probe" >>"$log" 2>&1 || fail "grub-mkconfig failed"
    grep -Eq "^[[:space:]]*linux[[:space:]]+/boot/vmlinuz-$release root=PARTUUID=$root_partuuid " "$root/boot/grub/grub.cfg" \
        || fail "grub.cfg has no entry for /boot/vmlinuz-$release with root=PARTUUID=$root_partuuid"
    grep -q -- "--fs-uuid --set=root .*$fs_uuid\$" "$root/boot/grub/grub.cfg" \
        || fail "grub.cfg does not search for the root file system by its UUID $fs_uuid"
fi

# --- 5/6. ext4 (--layout plain) or the GPT disk (--layout cloud) ------------
used_mb=$(( $(du -sxm "$root" | cut -f1) ))
if [ "$layout" = plain ]; then
    stage "ext4 image of $used_mb MiB of files, size $size"
    # ext4 needs room for its own metadata and a margin for the guest.
    [ $((used_mb * 5 / 4 + 64)) -le "$size_mb" ] \
        || die_usage "the files take $used_mb MiB: --size $size is too small (use at least $((used_mb * 3 / 2 + 128))M)"
    # The ext4 file holds the files (sparse beyond them) and the qcow2 copy is smaller still.
    avail=$(free_mb "$work")
    [ "$avail" -ge $((used_mb * 2 + 256)) ] \
        || die_space "not enough free space in $parent for the image: ${avail} MiB free, $((used_mb * 2 + 256)) MiB needed"
    truncate -s "$size_bytes" "$work/rootfs.ext4"
    # The same inputs give the same file system UUID.
    uuid=$(printf '%s' "$stamp_want" | /usr/bin/python3 -c 'import sys, uuid; print(uuid.UUID(sys.stdin.read()[:32]))')
    mkfs.ext4 -q -F -d "$root" -L tenbox-root -U "$uuid" -m 1 -E root_owner=0:0 "$work/rootfs.ext4" >>"$log" 2>&1 \
        || fail "mkfs.ext4 -d failed"
    raw=$work/rootfs.ext4
else
    stage "GPT disk of $size: BIOS boot, EFI system (vfat), root (ext4) of $used_mb MiB of files"
    disk_sectors=$((size_bytes / SECTOR_BYTES))
    # The root partition ends on a MiB boundary, before the last MiB (the backup GPT).
    root_sectors=$(( (disk_sectors - ROOT_START - DISK_TAIL_SECTORS) / 2048 * 2048 ))
    root_mb=$((root_sectors * SECTOR_BYTES >> 20))
    overhead_mb=$((size_mb - root_mb))
    [ $((used_mb * 5 / 4 + 64)) -le "$root_mb" ] \
        || die_usage "the files take $used_mb MiB: --size $size is too small for them and the ${overhead_mb} MiB before the root partition (use at least $((used_mb * 3 / 2 + 128 + overhead_mb))M)"
    # The disk file holds the files (sparse elsewhere) and the qcow2 copy is smaller still.
    avail=$(free_mb "$work")
    [ "$avail" -ge $((used_mb * 2 + 256)) ] \
        || die_space "not enough free space in $parent for the image: ${avail} MiB free, $((used_mb * 2 + 256)) MiB needed"
    raw=$work/disk.raw
    truncate -s "$size_bytes" "$raw"
    sfdisk -q "$raw" >>"$log" 2>&1 <<EOF || fail "sfdisk could not write the partition table"
label: gpt
label-id: $disk_guid
unit: sectors

p14 : start=$BIOS_BOOT_START, size=$BIOS_BOOT_SECTORS, type=$GPT_TYPE_BIOS_BOOT
p15 : start=$ESP_START, size=$ESP_SECTORS, type=$GPT_TYPE_ESP, uuid=$esp_partuuid
p1 : start=$ROOT_START, size=$root_sectors, type=$GPT_TYPE_ROOT_X86_64, uuid=$root_partuuid
EOF
    # Each file system straight into its partition's bytes (no loop device, no
    # mount): mkfs.vfat --offset counts sectors, mkfs.ext4 -E offset bytes; the
    # sizes are in KiB. FAT16, as Debian's mkfs.vfat makes it for a partition of
    # this size (given a file, mkfs.vfat would choose by the whole file's size).
    mkfs.vfat -F 16 --offset "$ESP_START" -i "$esp_volume_id" "$raw" $((ESP_SECTORS * SECTOR_BYTES >> 10)) >>"$log" 2>&1 \
        || fail "mkfs.vfat of the EFI system partition failed"
    # No label: Debian's genericcloud root has none (it is found by PARTUUID and UUID).
    mkfs.ext4 -q -F -d "$root" -U "$fs_uuid" -m 1 \
        -E "root_owner=0:0,nodiscard,offset=$((ROOT_START * SECTOR_BYTES))" \
        "$raw" "$((root_sectors * SECTOR_BYTES >> 10))k" >>"$log" 2>&1 \
        || fail "mkfs.ext4 -d into the root partition failed"
    # Neither file system wrote outside its partition: the GPT (both copies) is as sfdisk made it.
    sfdisk --verify "$raw" >>"$log" 2>&1 || fail "the partition table did not survive the file systems"
fi
rm -rf --one-file-system "$root"

# --- 6/7. qcow2 ------------------------------------------------------------
stage "compressed qcow2"
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zlib "$raw" "$work/out/$image_file" >>"$log" 2>&1 \
    || fail "qemu-img convert failed"
rm -f "$raw"

# --- 7/8. manifest ---------------------------------------------------------
stage "manifest and sha256"
/usr/bin/python3 - "$work/out" "$name" "$suite" "$debian_version" "$release" "$CMDLINE_BASE root=$ROOT_DEVICE rw" \
    "$size_bytes" "$extra" "$stamp_want" "$image_file" "$layout" "$MACHINE" <<'EOF' >>"$log" 2>&1 || fail "writing the manifest failed"
import hashlib, json, os, sys, time
d, name, suite, debver, release, cmdline, size, extra, stamp, image, layout, arch = sys.argv[1:]
files = {}
for fn in sorted(os.listdir(d)):
    h = hashlib.sha256()
    with open(os.path.join(d, fn), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    files[fn] = {"size": os.path.getsize(os.path.join(d, fn)), "sha256": h.hexdigest()}
now = time.gmtime()
manifest = {
    "manifest_version": 1,
    "name": name,
    "version": "%s-%s" % (debver, time.strftime("%Y%m%d", now)),
    "arch": arch,
    "os": {"id": "debian", "suite": suite, "version": debver},
    "kernel": "vmlinuz",
    "kernel_release": release,
    "initrd": "initrd.img",
    "rootfs": image,
    "rootfs_format": "qcow2",
    "virtual_size": int(size),
    "cmdline": cmdline,
    "packages": extra.split(),
    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", now),
    "builder": "make-rootfs-debian.sh",
    "recipe": stamp,
    "files": files,
}
if layout != "plain":
    # rootfs is then the whole disk; the kernel finds its root by the command line's PARTUUID.
    manifest["layout"] = layout
with open(os.path.join(d, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
EOF
printf '%s\n' "$stamp_want" >"$work/out/.stamp"
chmod 644 "$work/out"/*
chmod 755 "$work/out"
sync -f "$work/out/$image_file"
# Swap the finished folder in: DIR is either the old build or the new one, never half of one.
if [ -e "$out" ]; then
    mv "$out" "$work/old"
fi
mv "$work/out" "$out"
qsize=$(($(wc -c <"$out/$image_file") >> 20))
say "done in $(( $(date +%s) - started ))s: $out ($image_file $qsize MiB, virtual $size; kernel $release)"
