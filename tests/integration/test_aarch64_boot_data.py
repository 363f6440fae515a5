"""The arm64 machine's boot data: tenbox's device tree and Image placement, with QEMU's virt board as the oracle.

tenbox's arm64 layout puts each device where QEMU's `virt` board has it
(tenbox_vmm/arch/aarch64/layout.py), so `qemu-system-aarch64 -M virt -dtb`
with tenbox's own tree boots Debian's arm64 kernel on QEMU's devices as
tenbox describes them. QEMU (TCG, no KVM needed) is given no -append and no
-initrd: the command line and the initrd's range are tenbox's (QEMU
rewrites only the memory node, with the same size). The initrd, a busybox
initramfs from Debian's arm64 busybox-static, is put where tenbox's
`plan()` puts it, with QEMU's generic loader. Its /init reports what the
guest saw and powers off through PSCI.

dtc (device-tree-compiler) decompiles every tree without a warning.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.framework import linux_guest
from tenbox_vmm.arch.aarch64 import fdt, image
from tenbox_vmm.arch.aarch64 import layout as L
from tenbox_vmm.kernel_kind import KernelError

QEMU_AARCH64 = "qemu-system-aarch64"
BOOT_DEADLINE_SEC = 300  # TCG: about 10 s on the development machines
DISK_MARKER = b"TENBOX-ARM64-DISK-OK"
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "ARM64-INIT: up"
echo "ARM64-INIT: model=$(cat /proc/device-tree/model)"
echo "ARM64-INIT: nproc=$(nproc)"
echo "ARM64-INIT: cmdline=$(cat /proc/cmdline)"
for m in $(cat /modules/load-order); do insmod /modules/$m; done
sleep 1
echo "ARM64-INIT: disk=$(head -c 20 /dev/vda)"
echo "ARM64-INIT: rtc=$(cat /sys/class/rtc/rtc0/name)"
echo "ARM64-INIT: done"
poweroff -f
"""


@pytest.fixture(scope="module")
def arm64(tmp_path_factory):
    """Debian's arm64 Image, and an initramfs of its busybox, /init above and the kernel's virtio modules."""
    if not shutil.which(QEMU_AARCH64):
        pytest.fail("%s not found: install qemu-system-arm (make deps)" % QEMU_AARCH64)
    kernel = linux_guest.foreign_kernel("arm64")
    d = tmp_path_factory.mktemp("arm64")
    initrd = linux_guest.arm64_initramfs(d / "initrd.cpio", INIT)
    disk = d / "disk.raw"
    disk.write_bytes(DISK_MARKER + bytes(1 << 20))
    return kernel, initrd, disk


def _dtc(blob: bytes, tmp_path: Path) -> str:
    path = tmp_path / "tree.dtb"
    path.write_bytes(blob)
    r = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    return r.stdout


@pytest.mark.parametrize("gic, cpus", [("v3", 1), ("v3", 2), ("v2", 2), ("v2", 4)])
def test_debians_arm64_kernel_boots_on_tenboxs_device_tree(arm64, tmp_path, gic, cpus):
    """Every vCPU up through PSCI, tenbox's command line, the PL031 found, a virtio-blk disk read through
    the virtio-mmio slot and its SPI, and a PSCI power-off: QEMU exits 0."""
    kernel, initrd, disk = arm64
    img = image.parse_image(str(kernel), kernel.read_bytes())
    ram = 512 * L.MIB
    plan = image.plan(img, ram, initrd.stat().st_size)
    cmdline = "panic=-1 tenbox.test=%s-%d" % (gic, cpus)
    blob = fdt.build(fdt.FdtConfig(cpus=cpus, ram_bytes=ram, cmdline=cmdline, gic=gic,
                                   initrd=(plan.initrd, plan.initrd_end), virtio_slots=[0], uart="pl011",
                                   rng_seed=os.urandom(fdt.RNG_SEED_BYTES)))
    dts = _dtc(blob, tmp_path)
    assert "arm,gic-v3" in dts if gic == "v3" else "arm,cortex-a15-gic" in dts
    dtb = tmp_path / "tree.dtb"
    argv = [QEMU_AARCH64, "-M", "virt,gic-version=%s" % gic[1], "-cpu", "cortex-a57", "-smp", str(cpus),
            "-m", str(ram // L.MIB), "-nographic", "-no-reboot", "-kernel", str(kernel), "-dtb", str(dtb),
            "-device", "loader,file=%s,addr=%#x,force-raw=on" % (initrd, plan.initrd),
            "-drive", "if=none,id=d0,format=raw,file=%s,readonly=on" % disk,
            # QEMU's first virtio-mmio bus is its transport at 0x0a000000: tenbox's slot 0, and only it
            # is in tenbox's tree, so the disk is found there or not at all.
            "-device", "virtio-blk-device,drive=d0,bus=virtio-mmio-bus.0"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=BOOT_DEADLINE_SEC, stdin=subprocess.DEVNULL)
    console = r.stdout.replace("\r", "")
    said = dict(re.findall(r"^ARM64-INIT: (\w+)=(.*)$", console, re.M))
    assert "ARM64-INIT: done" in console, console[-3000:]
    assert said["model"].rstrip("\0") == "tenbox arm64 virtual machine"
    assert said["nproc"] == str(cpus)
    assert said["cmdline"] == cmdline
    assert said["disk"] == DISK_MARKER.decode(), console[-3000:]
    assert said["rtc"].startswith("rtc-pl031 %x.pl031" % L.RTC)
    assert "psci: PSCIv" in console and "Freeing initrd memory" in console
    assert r.returncode == 0, (r.returncode, console[-2000:])


def test_the_kernel_goes_at_a_2_mib_boundary_and_the_initrd_after_its_image_size(arm64):
    kernel = arm64[0]
    img = image.parse_image(str(kernel), kernel.read_bytes())
    assert (img.text_offset, img.page_size) == (0, 4096)  # Debian's: 4 KiB pages, no offset
    assert img.load == L.RAM_START + 2 * L.MIB and img.image_size > len(img.data)
    plan = image.plan(img, 256 * L.MIB, 10 << 20)
    assert plan.fdt == L.RAM_START and plan.kernel == img.load
    assert plan.initrd >= img.load + img.image_size and plan.initrd % 4096 == 0
    assert plan.initrd_end == plan.initrd + (10 << 20)


def test_images_tenbox_cannot_boot_are_refused_with_one_line(arm64, tmp_path):
    kernel = arm64[0]
    data = bytearray(kernel.read_bytes()[:1 << 20])
    amd64 = linux_guest.build().vmlinuz
    cases = [
        (amd64.read_bytes(), r"is an x86-64 \(amd64\) bzImage; this host's worker boots arm64 \(aarch64\) kernels"),
        (b"text\n" * 100, r"is not a Linux kernel; this host's worker boots arm64"),
        (_with(data, 16, 0), r"image_size of 0: a kernel older than Linux 3.17"),
        (_with(data, 24, 1), "big-endian"),
        (_with(data, 8, 0x1234), "text_offset of 0x1234"),
        (_with(data, 16, 4096), "says it needs 4096 bytes but its file has"),
    ]
    for blob, message in cases:
        with pytest.raises(KernelError, match=message):
            image.parse_image("K", bytes(blob))
    img = image.parse_image(str(kernel), kernel.read_bytes())
    with pytest.raises(KernelError, match=r"and its initrd needs \d+ MiB of RAM; the guest has 64 MiB"):
        image.plan(img, 64 * L.MIB, 40 << 20)


def _with(data: bytearray, offset: int, value: int) -> bytes:
    out = bytearray(data)
    out[offset:offset + 8] = value.to_bytes(8, "little")
    return bytes(out)


@pytest.mark.parametrize("change, message", [
    (dict(cpus=9, gic="v2"), "9 vCPUs: a GICv2 machine has 1 to 8"),
    (dict(cpus=124), "124 vCPUs: a GICv3 machine has 1 to 123"),
    (dict(cmdline="x" * 2048), "longer than 2047 bytes"),
    (dict(virtio_slots=[9]), "virtio slots are 0 to 8"),  # 8: disks and NIC, then the power key
    (dict(gic="v4"), "unknown GIC version"),
    (dict(rng_seed=b"short"), "RNG seed is 5 bytes"),
])
def test_machines_the_tree_cannot_describe_are_refused(change, message):
    config = fdt.FdtConfig(cpus=1, ram_bytes=256 * L.MIB, cmdline="")._replace(**change)
    with pytest.raises(fdt.FdtError, match=re.escape(message)):
        fdt.build(config)


def test_the_largest_gicv3_machine_fits_and_decompiles(tmp_path):
    blob = fdt.build(fdt.FdtConfig(cpus=L.GICV3_MAX_VCPUS, ram_bytes=4 * L.GIB, cmdline="a" * 2047,
                                   virtio_slots=range(L.VIRTIO_MAX_DEVICES), initrd=(0x50000000, 0x60000000)))
    dts = _dtc(blob, tmp_path)
    assert dts.count('enable-method = "psci"') == L.GICV3_MAX_VCPUS
    assert "cpu@70a {" in dts  # vCPU 122: Aff1 7, Aff0 10, as KVM numbers it
    assert dts.count('compatible = "virtio,mmio"') == L.VIRTIO_MAX_DEVICES
    assert len(blob) < L.FDT_MAX_BYTES


@pytest.mark.parametrize("gic", ["v3", "v2"])
def test_every_small_machine_is_written_whole(tmp_path, gic):
    """Each vCPU count a GIC serves up to 16, with 0..8 virtio slots: every tree finishes and decompiles with
    its vCPUs and slots. (pylibfdt's FdtSw ran out of room finishing a 2-vCPU, 2-slot tree; see fdt.py.)"""
    most = min(16, L.GICV3_MAX_VCPUS if gic == "v3" else L.GICV2_MAX_VCPUS)
    for cpus in range(1, most + 1):
        for slots in range(9):
            blob = fdt.build(fdt.FdtConfig(cpus=cpus, ram_bytes=256 * L.MIB, cmdline="console=ttyS0 panic=1",
                                           gic=gic, virtio_slots=range(slots), initrd=(0x41000000, 0x41100000),
                                           rng_seed=bytes(fdt.RNG_SEED_BYTES)))
            dts = _dtc(blob, tmp_path)
            assert (dts.count('enable-method = "psci"'), dts.count('"virtio,mmio"')) == (cpus, slots)
