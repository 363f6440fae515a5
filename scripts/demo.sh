#!/bin/sh
# `make demo`: tenbox's main job, end to end. Starts tenboxd (or uses the one
# systemd runs), creates and starts a VM, shows `tenbox vm ls` and its console,
# stops and removes it.
#
# The guest depends on this host's KVM: with vmx/svm, Debian's cloud kernel and
# the project's busybox initramfs; without (a software KVM, where guest kernel
# code is emulated and stock Linux cannot boot in useful time), the `idle` test
# guest, which echoes console lines and powers off on the ACPI power button.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-/usr/bin/python3}
export PYTHONPATH="$PWD"
tenbox() { "$PY" -m tenbox_ctl "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

DEMO_DIR="$PWD/.cache/demo"
mkdir -p "$DEMO_DIR"
DAEMON_PID=""
cleanup() {
    if [ -n "$DAEMON_PID" ]; then
        kill "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT INT TERM

if [ -S /run/tenbox/tenbox.sock ] && tenbox version >/dev/null 2>&1 && tenbox system info >/dev/null 2>&1; then
    say "using the tenboxd that systemd runs (/run/tenbox/tenbox.sock)"
    unset TENBOX_SOCK || true
else
    # A try-out daemon: per-user paths under .cache/demo, logs in tenboxd.log.
    export TENBOX_SOCK="$DEMO_DIR/tenbox.sock"
    RUN_DIR=$(mktemp -d /tmp/tenbox-demo-XXXXXX)
    say "starting tenboxd for a try-out (socket $TENBOX_SOCK, log $DEMO_DIR/tenboxd.log)"
    "$PY" -m tenbox_supervisor --data-dir "$DEMO_DIR/data" --socket "$TENBOX_SOCK" --run-dir "$RUN_DIR" \
        >"$DEMO_DIR/tenboxd.log" 2>&1 &
    DAEMON_PID=$!
    i=0
    until tenbox system info >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt 100 ] || ! kill -0 "$DAEMON_PID" 2>/dev/null; then
            echo "demo: tenboxd did not start:" >&2
            cat "$DEMO_DIR/tenboxd.log" >&2
            exit 1
        fi
        sleep 0.1
    done
fi

tenbox vm rm --force demo >/dev/null 2>&1 || true
if grep -qE '\b(vmx|svm)\b' /proc/cpuinfo; then
    say "hardware virtualization found: the VM boots Debian's cloud kernel with a busybox initramfs"
    make -s linux
    tenbox vm create demo --kernel .cache/linux/vmlinuz --initrd .cache/linux/initramfs.cpio.gz \
        --memory 256 --cpus 2 --cmdline "console=ttyS0 reboot=k panic=1 pci=off quiet tenbox.shell=1"
    INPUT="uname -a"
    ANSWER="Linux"
else
    say "no vmx/svm on this host: the VM runs the 'idle' test guest (see docs/testing.md)"
    tenbox vm create demo --kernel tests/guests/out/idle.bzImage --memory 64
    INPUT="hello from the tenbox demo"
    ANSWER="echo: hello from the tenbox demo"
fi

say "tenbox vm start demo"
tenbox vm start demo
say "tenbox vm ls"
tenbox vm ls
say "tenbox vm console demo   (typing: $INPUT)"
printf '%s\n' "$INPUT" | tenbox vm console demo
i=0
until tenbox vm logs demo -n 50 | grep -q "$ANSWER"; do
    i=$((i + 1)); [ "$i" -lt 100 ] || break; sleep 0.1
done
say "tenbox vm logs demo"
tenbox vm logs demo -n 20
say "tenbox vm stop demo"
tenbox vm stop demo
tenbox vm ls
tenbox vm rm demo
say "done"
