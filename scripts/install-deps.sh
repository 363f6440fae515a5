#!/bin/sh
# Install the Debian packages tenbox's build, tests and demo need (development
# machines and CI; the .deb has its own Depends). Idempotent: apt runs only
# when something is missing. Needs root (or sudo) for apt.
set -eu

PACKAGES="
make gcc binutils libc6-dev linux-libc-dev
python3 python3-cffi python3-zmq python3-msgpack python3-psutil python3-click
python3-tenacity python3-sdnotify python3-apt python3-websockets python3-zstandard python3-seccomp
python3-pytest python3-hypothesis python3-trustme python3-prometheus-client zsh python3-libfdt device-tree-compiler
acpica-tools qemu-system-x86 qemu-system-arm qemu-utils openssh-client libslirp0 libslirp-dev libcap2-bin iproute2
busybox-static cpio gzip xz-utils zstd util-linux procps file
debootstrap e2fsprogs fdisk qemu-user-static
xorriso
dosfstools xfsprogs btrfs-progs grub-common
"

# The user workers drop to (tenbox_vmm/protocol/sandbox.py WORKER_USER), made as the package's
# postinst makes it: without it a worker run as root falls back to nobody, with a warning.
ensure_worker_user() {
    getent passwd tenbox-vm >/dev/null && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: user tenbox-vm is missing: run as root to create it" >&2
        return 0
    fi
    echo "install-deps: creating the worker user tenbox-vm"
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin tenbox-vm
}

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -z "$missing" ]; then
    echo "install-deps: all packages present"
    ensure_worker_user
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: run as root (missing:$missing)" >&2; exit 1; }
    SUDO=sudo
fi
echo "install-deps: installing$missing"
$SUDO apt-get update -q
# --no-install-recommends everywhere we install: recommends can pull in a desktop.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
ensure_worker_user
