"""The machine's architecture seam: one board per host architecture behind one interface (worker).

machine.py runs a VM the same way on every architecture: guest RAM, a
controller thread, one thread per vCPU (arch/x86_64/vcpu_loop.py's loop
serves both: KVM's port I/O, MMIO and system-event exits have one layout),
virtio-mmio devices with their irqfds and ioeventfds, reboot in the same
process, a host stop. What differs is the board's, and `Board` below says
what a board answers:

    x86_64/board.py   bzImage, ACPI tables, legacy PC devices on ports,
                      the in-kernel PIC/IOAPIC/PIT, CPUID and MSRs, snapshots
    aarch64/board.py  Image and a device tree, the UART and PL031 on MMIO,
                      the vGIC, PSCI (no snapshots yet)

`host_board()` is the board of the machine this worker runs on.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional, Tuple

# os.uname().machine → the board's package; the names Debian gives those architectures.
ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
DEBIAN_NAMES = {"x86_64": "amd64", "aarch64": "arm64"}


class BoardError(Exception):
    """The host or the configuration cannot make this board's machine; the message is for the operator."""


def host_arch() -> str:
    """This host's architecture as tenbox names it ("x86_64", "aarch64"), or its own name if unsupported."""
    machine = os.uname().machine
    return ARCHES.get(machine, machine)


class Board:
    """What machine.py asks of an architecture (the interface; x86_64 and aarch64 implement it).

    One instance per machine. Errors for the operator are BoardError, and
    kernel_kind.KernelError for a kernel or initrd.
    """

    arch = ""  # "x86_64", "aarch64"
    default_cmdline = ""
    snapshots = False  # whether snapshot/ can save and restore this board's machine
    power_button_help = ""  # what a guest needs to power off on the host's shutdown request

    def ram_regions(self, size: int) -> list:
        """memory.Region list for `size` bytes of RAM."""
        raise NotImplementedError

    def prepare(self, kvm, cpus: int) -> None:
        """Read what the host's KVM offers, once, before the first boot (BoardError if it cannot serve `cpus`)."""

    def load_kernel(self, path: str, memory, cmdline: str, initrd_size: Optional[int]) -> Tuple[Any, bytes]:
        """Read and check the kernel; (the loaded kernel, the command line as the guest gets it)."""
        raise NotImplementedError

    def build_devices(self, pio, mmio, irq: Callable[[int, int], None], console_output: Callable[[bytes], None],
                      on_poweroff: Callable[[], None], on_reset: Callable[[], None],
                      on_serial_tx_interrupts: Callable[[bool], None]):
        """The board's own devices on its buses; the result has .serial, .all() and .by_name()."""
        raise NotImplementedError

    def builtin_virtio(self, devices) -> list:
        """The board's own virtio devices, put on the slots after the VM's disks and NIC."""
        return []

    def virtio_slot(self, index: int) -> Tuple[int, int, int]:
        """(address, size, GSI) of virtio-mmio slot `index`; the board describes it to the guest."""
        raise NotImplementedError

    def max_virtio(self) -> int:
        raise NotImplementedError

    def create_vm(self, kvm, memory):
        """A KVM VM with guest RAM mapped and what must exist before vCPUs (a PC's irqchip)."""
        raise NotImplementedError

    def load_guest(self, memory, kernel, initrd: Optional[bytes], cmdline: bytes, cpus: int) -> Any:
        """Write the kernel, initrd and boot data into guest RAM; what setup_vcpus needs."""
        raise NotImplementedError

    def setup_vcpus(self, vm, vcpus: List[Any], info: Any) -> None:
        """Bring the new vCPUs to the kernel's entry state (and whatever must follow them, an arm64 vGIC)."""
        raise NotImplementedError

    def end_boot(self) -> None:
        """The boot's VM is gone: drop what the board kept of it."""

    def irq_line(self, vm, irq: int, level: int) -> None:
        """Drive interrupt `irq` (the board's numbering, as its devices and virtio GSIs use) to `level`."""
        raise NotImplementedError

    def coalesce_console(self, vm, on: bool) -> None:
        """Let KVM queue the console's transmit-register writes in the coalesced ring (OSError if it cannot)."""
        raise NotImplementedError

    def power_button(self, devices) -> None:
        """Press the power button (BoardError if this board has none)."""
        raise NotImplementedError

    def describe_vcpu(self, vcpu) -> str:
        """One line of registers, for the log when a guest dies."""
        raise NotImplementedError

    def fault_address(self, description: str) -> str:
        """The instruction address in describe_vcpu's line."""
        for part in description.split():
            if part.startswith(("rip=", "pc=")):
                return part.split("=", 1)[1]
        return "?"


def host_board(arch: Optional[str] = None) -> Board:
    """The board for `arch` (this host's by default); BoardError for an architecture tenbox has none for."""
    arch = arch or host_arch()
    if arch == "x86_64":
        from tenbox_vmm.arch.x86_64.board import PcBoard

        return PcBoard()
    if arch == "aarch64":
        from tenbox_vmm.arch.aarch64.board import VirtBoard

        return VirtBoard()
    raise BoardError("tenbox runs VMs on x86-64 and arm64 hosts; this host is %s" % arch)
