"""The flattened device tree an arm64 guest boots with, written by dtc's libfdt (worker).

Written with libfdt's sequential writer (Debian's python3-libfdt, the
binding of the library dtc itself uses), not a hand-written blob writer:
the format's alignment, string table and structure tokens are libfdt's.

What the tree holds, each node at layout.py's address: memory; one cpu
node per vCPU (enable-method "psci": secondary vCPUs stay off until the
guest's PSCI CPU_ON); PSCI through `hvc`, which KVM answers; the GIC
(v3 with one redistributor frame per vCPU, or v2 with its CPU interface);
the arch timer's four PPIs; the console UART (an ns16550a on MMIO, served
by the 8250 model x86 uses on port I/O, or QEMU's PL011 for the oracle);
a PL031 clock; the virtio-mmio slots in use; and `chosen` with the command
line, the initrd's range, the console path and seeds for the guest's RNG
and KASLR.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional, Sequence, Tuple

from tenbox_vmm.arch.aarch64 import layout as L

GIC_PHANDLE = 1
CLOCK_PHANDLE = 2
GPIO_PHANDLE = 3
KEY_POWER = 116  # linux/input-event-codes.h
UART_CLOCK_HZ = 1843200  # the 16550's classic crystal: a divisor of 1 is 115200 baud
APB_CLOCK_HZ = 24000000
CMDLINE_MAX = 2047  # arm64's COMMAND_LINE_SIZE is 2048, with its NUL
RNG_SEED_BYTES = 32
UARTS = ("ns16550a", "pl011")
GICS = ("v3", "v2")


class FdtError(Exception):
    """The machine cannot be described; the message says why."""


class FdtConfig(NamedTuple):
    cpus: int
    ram_bytes: int
    cmdline: str
    gic: str = "v3"  # one of GICS
    initrd: Optional[Tuple[int, int]] = None  # guest-physical [start, end)
    virtio_slots: Sequence[int] = ()  # the slots (layout.virtio_slot) that hold a device
    uart: str = "ns16550a"  # one of UARTS
    rtc: bool = True
    rng_seed: bytes = b""  # RNG_SEED_BYTES for chosen/rng-seed, and kaslr-seed from its first 8
    power_button: bool = True  # a PL061 GPIO controller with a gpio-keys KEY_POWER on one of its lines


# pylibfdt's FdtSw grows its buffer as nodes and properties are added, but not for
# fdt_finish: a tree that ends near the buffer's end fails there with FDT_ERR_NOSPACE
# (python3-libfdt 1.6.1, at 2 vCPUs and 2 virtio slots from its 1 KiB start). So the
# tree is written into a buffer made large enough first, and again into a larger one
# if finishing still runs out.
FDT_START_BYTES = 64 * 1024


def build(config: FdtConfig) -> bytes:
    """The device tree blob for `config`, at most layout.FDT_MAX_BYTES."""
    import libfdt  # python3-libfdt: only an arm64 worker needs it

    _check(config)
    size = FDT_START_BYTES
    while True:
        try:
            return _build(libfdt.FdtSw(size), config)
        except libfdt.FdtException as e:
            if e.err != -libfdt.NOSPACE or size >= L.FDT_MAX_BYTES:
                raise FdtError("the device tree cannot be written: %s" % e) from None
            size *= 4


def _build(sw, config: FdtConfig) -> bytes:
    sw.finish_reservemap()
    with sw.add_node(""):
        sw.property_string("model", "tenbox arm64 virtual machine")
        _strings(sw, "compatible", "tenbox,virt", "linux,dummy-virt")
        sw.property_u32("#address-cells", 2)
        sw.property_u32("#size-cells", 2)
        sw.property_u32("interrupt-parent", GIC_PHANDLE)
        _chosen(sw, config)
        with sw.add_node("memory@%x" % L.RAM_START):
            sw.property_string("device_type", "memory")
            _reg(sw, (L.RAM_START, config.ram_bytes))
        _cpus(sw, config.cpus)
        with sw.add_node("psci"):
            _strings(sw, "compatible", "arm,psci-1.0", "arm,psci-0.2")
            sw.property_string("method", "hvc")
        _gic(sw, config)
        _timer(sw, config)
        with sw.add_node("apb-pclk"):
            sw.property_string("compatible", "fixed-clock")
            sw.property_u32("#clock-cells", 0)
            sw.property_u32("clock-frequency", APB_CLOCK_HZ)
            sw.property_string("clock-output-names", "clk24mhz")
            sw.property_u32("phandle", CLOCK_PHANDLE)
        _uart(sw, config.uart)
        if config.rtc:
            with sw.add_node("pl031@%x" % L.RTC):
                _strings(sw, "compatible", "arm,pl031", "arm,primecell")
                _reg(sw, (L.RTC, L.RTC_SIZE))
                _cells(sw, "interrupts", L.IRQ_TYPE_SPI, L.RTC_SPI, L.IRQ_LEVEL_HIGH)
                sw.property_u32("clocks", CLOCK_PHANDLE)
                sw.property_string("clock-names", "apb_pclk")
        if config.power_button:
            _power_button(sw)
        for slot in sorted(config.virtio_slots):
            addr, spi = L.virtio_slot(slot)
            with sw.add_node("virtio_mmio@%x" % addr):
                sw.property_string("compatible", "virtio,mmio")
                _reg(sw, (addr, L.VIRTIO_MMIO_SIZE))
                _cells(sw, "interrupts", L.IRQ_TYPE_SPI, spi, L.IRQ_EDGE_RISING)
                sw.property("dma-coherent", b"")
    fdt = sw.as_fdt()
    fdt.pack()
    blob = bytes(fdt.as_bytearray())
    if len(blob) > L.FDT_MAX_BYTES:  # a command line and 123 vCPUs come nowhere near
        raise FdtError("the device tree is %d bytes, more than the 2 MiB arm64 allows" % len(blob))
    return blob


def _power_button(sw) -> None:
    """The power button as on QEMU's virt board: gpio-keys (KEY_POWER) on line POWER_GPIO of a PL061.

    Linux binds gpio-keys by this node (CONFIG_KEYBOARD_GPIO; a module in Debian's generic arm64
    kernel, which udev loads by its modalias) and systemd-logind powers off on the key.
    """
    with sw.add_node("pl061@%x" % L.GPIO):
        _strings(sw, "compatible", "arm,pl061", "arm,primecell")
        _reg(sw, (L.GPIO, L.GPIO_SIZE))
        _cells(sw, "interrupts", L.IRQ_TYPE_SPI, L.GPIO_SPI, L.IRQ_LEVEL_HIGH)
        sw.property("gpio-controller", b"")
        sw.property_u32("#gpio-cells", 2)
        sw.property_u32("clocks", CLOCK_PHANDLE)
        sw.property_string("clock-names", "apb_pclk")
        sw.property_u32("phandle", GPIO_PHANDLE)
    with sw.add_node("gpio-keys"):
        sw.property_string("compatible", "gpio-keys")
        with sw.add_node("poweroff"):
            sw.property_string("label", "GPIO Key Poweroff")
            sw.property_u32("linux,code", KEY_POWER)
            _cells(sw, "gpios", GPIO_PHANDLE, L.POWER_GPIO, 0)  # active high


def uart_path(uart: str) -> str:
    return "/%s@%x" % ("serial" if uart == "ns16550a" else "pl011", L.UART)


def _check(config: FdtConfig) -> None:
    if config.gic not in GICS:
        raise FdtError("unknown GIC version %r (one of %s)" % (config.gic, ", ".join(GICS)))
    most = L.GICV3_MAX_VCPUS if config.gic == "v3" else L.GICV2_MAX_VCPUS
    if not 1 <= config.cpus <= most:
        raise FdtError("%d vCPUs: a GIC%s machine has 1 to %d" % (config.cpus, config.gic, most))
    if config.uart not in UARTS:
        raise FdtError("unknown UART %r (one of %s)" % (config.uart, ", ".join(UARTS)))
    if len(config.cmdline.encode("utf-8")) > CMDLINE_MAX or "\0" in config.cmdline:
        raise FdtError("the kernel command line is longer than %d bytes or holds a NUL" % CMDLINE_MAX)
    if any(not 0 <= s < L.VIRTIO_MAX_DEVICES for s in config.virtio_slots):
        raise FdtError("virtio slots are 0 to %d" % (L.VIRTIO_MAX_DEVICES - 1))
    if config.rng_seed and len(config.rng_seed) != RNG_SEED_BYTES:
        raise FdtError("the RNG seed is %d bytes, not %d" % (len(config.rng_seed), RNG_SEED_BYTES))


def _chosen(sw, config: FdtConfig) -> None:
    with sw.add_node("chosen"):
        sw.property_string("bootargs", config.cmdline)
        sw.property_string("stdout-path", uart_path(config.uart))
        if config.initrd:
            start, end = config.initrd
            sw.property_u64("linux,initrd-start", start)
            sw.property_u64("linux,initrd-end", end)
        if config.rng_seed:
            sw.property("rng-seed", config.rng_seed)
            sw.property("kaslr-seed", config.rng_seed[:8])


def _cpus(sw, cpus: int) -> None:
    with sw.add_node("cpus"):
        sw.property_u32("#address-cells", 1)
        sw.property_u32("#size-cells", 0)
        for i in range(cpus):
            with sw.add_node("cpu@%x" % L.mpidr(i)):
                sw.property_string("device_type", "cpu")
                sw.property_string("compatible", "arm,arm-v8")
                sw.property_u32("reg", L.mpidr(i))
                sw.property_string("enable-method", "psci")


def _gic(sw, config: FdtConfig) -> None:
    with sw.add_node("intc@%x" % L.GIC_DIST):
        if config.gic == "v3":
            sw.property_string("compatible", "arm,gic-v3")
            _reg(sw, (L.GIC_DIST, L.GIC_DIST_SIZE), (L.GICV3_REDIST, L.GICV3_REDIST_STRIDE * config.cpus))
        else:
            sw.property_string("compatible", "arm,cortex-a15-gic")
            _reg(sw, (L.GIC_DIST, L.GIC_DIST_SIZE), (L.GICV2_CPU, L.GICV2_CPU_SIZE))
        sw.property_u32("#interrupt-cells", 3)
        sw.property_u32("#address-cells", 0)  # no children (no ITS): dtc wants it said
        sw.property("interrupt-controller", b"")
        sw.property_u32("phandle", GIC_PHANDLE)


def _timer(sw, config: FdtConfig) -> None:
    flags = L.IRQ_LEVEL_LOW
    if config.gic == "v2":  # a GICv2 PPI's flags name the CPUs it reaches
        flags |= ((1 << config.cpus) - 1) << 8
    with sw.add_node("timer"):
        sw.property_string("compatible", "arm,armv8-timer")
        _cells(sw, "interrupts", *[cell for ppi in (L.TIMER_PPI_SECURE, L.TIMER_PPI_NONSECURE,
                                                    L.TIMER_PPI_VIRTUAL, L.TIMER_PPI_HYP)
                                   for cell in (L.IRQ_TYPE_PPI, ppi, flags)])
        sw.property("always-on", b"")


def _uart(sw, uart: str) -> None:
    with sw.add_node(uart_path(uart)[1:]):
        if uart == "ns16550a":
            sw.property_string("compatible", "ns16550a")
            sw.property_u32("clock-frequency", UART_CLOCK_HZ)
            sw.property_u32("reg-shift", 0)
            sw.property_u32("reg-io-width", 1)
        else:
            _strings(sw, "compatible", "arm,pl011", "arm,primecell")
            _cells(sw, "clocks", CLOCK_PHANDLE, CLOCK_PHANDLE)
            _strings(sw, "clock-names", "uartclk", "apb_pclk")
        _reg(sw, (L.UART, L.UART_SIZE))
        _cells(sw, "interrupts", L.IRQ_TYPE_SPI, L.UART_SPI, L.IRQ_LEVEL_HIGH)


def _strings(sw, name: str, *values: str) -> None:
    sw.property(name, b"".join(v.encode("ascii") + b"\0" for v in values))


def _cells(sw, name: str, *cells: int) -> None:
    sw.property(name, struct.pack(">%dI" % len(cells), *cells))


def _reg(sw, *ranges: Tuple[int, int]) -> None:
    """`reg` of (address, size) pairs, two cells each (the root's #address-cells and #size-cells)."""
    cells = [c for addr, size in ranges for c in (addr >> 32, addr & 0xFFFFFFFF, size >> 32, size & 0xFFFFFFFF)]
    _cells(sw, "reg", *cells)
