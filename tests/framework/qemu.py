"""QEMU command lines for tests and benchmarks: the reference VMM, the Linux-driver front end, the nested lane (tests and bench; any user).

Three machines, each built in one place:
  * `microvm(..., accel="kvm")`: the reference that benchmarks and the soak
    compare tenbox with, on the same guest;
  * `microvm(..., accel="tcg")`: stock Linux under software emulation, which
    runs anywhere; with `shared_memory` its RAM is a shared memfd that a
    vhost-user back end can map;
  * `pc(...)`: TCG with an HPET (the TSC measurement), virtio on PCI (image
    boots), emulated AMD-V (the nested lane).
All of them: no default devices, no user config, the serial console on
stdio, no monitor, and no reboot (a guest reboot ends QEMU). The device
helpers return the arguments for one device each.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

QEMU = "qemu-system-x86_64"
DEFAULT_MAC = "52:54:00:12:34:56"

PathLike = Union[str, Path]

_CONSOLE_ONLY = ["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot"]
# Virtio 1.0 on virtio-mmio, as tenbox offers it (QEMU's microvm defaults to the legacy interface).
_MODERN_VIRTIO_MMIO = ["-global", "virtio-mmio.force-legacy=false"]


def _machine(cpu: Optional[str], memory_mb: int, cpus: int, shared_memory: bool) -> List[str]:
    argv = ["-cpu", cpu] if cpu is not None else []
    argv += ["-m", str(memory_mb), "-smp", str(cpus)]
    if shared_memory:
        argv += ["-object", "memory-backend-memfd,id=mem,size=%dM,share=on" % memory_mb]
    return argv


def _boot(kernel: PathLike, initrd: Optional[PathLike], append: Optional[str]) -> List[str]:
    argv = ["-kernel", str(kernel)]
    if initrd is not None:
        argv += ["-initrd", str(initrd)]
    if append is not None:
        argv += ["-append", append]
    return argv


def microvm(kernel: PathLike, initrd: Optional[PathLike] = None, append: Optional[str] = None, *,
            accel: str = "kvm", memory_mb: int = 256, cpus: int = 1, cpu: Optional[str] = None,
            rtc: bool = False, shared_memory: bool = False, devices: Sequence[str] = ()) -> List[str]:
    """QEMU's microvm with ACPI; `rtc` adds the RTC, which microvm leaves out under KVM."""
    machine = "microvm,acpi=on" + (",rtc=on" if rtc else "") + (",memory-backend=mem" if shared_memory else "")
    return ([QEMU, "-M", machine, "-accel", accel] + _machine(cpu, memory_mb, cpus, shared_memory)
            + _CONSOLE_ONLY + _MODERN_VIRTIO_MMIO + _boot(kernel, initrd, append) + list(devices))


def pc(kernel: PathLike, initrd: Optional[PathLike] = None, append: Optional[str] = None, *,
       memory_mb: int = 256, cpus: int = 1, cpu: Optional[str] = None, shared_memory: bool = False,
       devices: Sequence[str] = (), accel: str = "tcg", binary: Sequence[str] = (QEMU,),
       monitor: Optional[str] = None) -> List[str]:
    """QEMU's pc machine under TCG (`accel` may add TCG options); `monitor`: a unix socket for the
    human monitor instead of none; `binary`: another QEMU build's command."""
    machine = "pc,memory-backend=mem" if shared_memory else "pc"
    console = list(_CONSOLE_ONLY)
    if monitor is not None:
        console[console.index("-monitor") + 1] = "unix:%s,server=on,wait=off" % monitor
    return (list(binary) + ["-M", machine, "-accel", accel] + _machine(cpu, memory_mb, cpus, shared_memory)
            + console + _boot(kernel, initrd, append) + list(devices))


def virtio_blk(image: PathLike, fmt: str, index: int = 0, serial: Optional[str] = None,
               queue_size: Optional[int] = None, pci: bool = False) -> List[str]:
    """QEMU's own virtio-blk on `image` (virtio-mmio, or PCI on the pc machine)."""
    device = "virtio-blk-%s,drive=d%d" % ("pci" if pci else "device", index)
    if queue_size is not None:
        device += ",num-queues=1,queue-size=%d" % queue_size
    if serial is not None:
        device += ",serial=%s" % serial
    return ["-drive", "file=%s,if=none,format=%s,id=d%d" % (image, fmt, index), "-device", device]


def user_net(forwards: Sequence[str] = (), mac: Optional[str] = None) -> List[str]:
    """QEMU's virtio-net with `-netdev user` (libslirp); forwards: "hostfwd=..." or "guestfwd=..." options."""
    device = "virtio-net-device,netdev=n0" + (",mac=%s" % mac if mac else "")
    return ["-netdev", ",".join(["user,id=n0"] + list(forwards)), "-device", device]


def vhost_user_blk(sock: PathLike, index: int = 0, reconnect: bool = False, queue_size: Optional[int] = None,
                   pci: bool = False) -> List[str]:
    """A vhost-user-blk front end on the back end listening at `sock` (reconnect: retry every second)."""
    chardev = "socket,id=vub%d,path=%s" % (index, sock) + (",reconnect=1" if reconnect else "")
    device = "vhost-user-blk%s,chardev=vub%d,num-queues=1" % ("-pci" if pci else "", index)
    if queue_size is not None:
        device += ",queue-size=%d" % queue_size
    return ["-chardev", chardev, "-device", device]


def vhost_user_net(sock: PathLike, mac: str = DEFAULT_MAC) -> List[str]:
    """A virtio-net device whose data path is the vhost-user back end listening at `sock`."""
    return ["-chardev", "socket,id=vun0,path=%s" % sock, "-netdev", "vhost-user,id=n0,chardev=vun0",
            "-device", "virtio-net-device,netdev=n0,mac=%s" % mac]
