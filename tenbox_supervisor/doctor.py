"""Can this host run VMs? KVM checks for `doctor` and `tenboxd --doctor` (daemon or CLI host; reads /dev/kvm)."""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Any, Dict, List

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
KVM_CREATE_VM = 0xAE01
KVM_CREATE_DEVICE = 0xC00CAEE0  # _IOWR(KVMIO, 0xe0, struct kvm_create_device): type, fd, flags (u32 each)
KVM_CREATE_DEVICE_TEST = 1
ARM_VGICS = (("GICv3", 7), ("GICv2", 5))  # KVM_DEV_TYPE_ARM_VGIC_V3, _V2


def _check(check_id: str, ok: bool, message: str, required: bool = True) -> Dict[str, Any]:
    return {"id": check_id, "ok": ok, "required": required, "message": message}


def run_checks(kvm_path: str = "/dev/kvm") -> Dict[str, Any]:
    """{"supported": bool, "checks": [...]}; `supported` means every required check passed."""
    checks: List[Dict[str, Any]] = []
    machine = os.uname().machine
    if machine in ("x86_64", "amd64"):
        try:
            with open("/proc/cpuinfo") as f:
                flags = set()
                for line in f:
                    if line.startswith("flags"):
                        flags.update(line.split(":", 1)[1].split())
        except OSError:
            flags = set()
        hw = "vmx" in flags or "svm" in flags
        checks.append(_check(
            "cpu_virtualization", hw,
            "hardware virtualization (%s)" % ("vmx" if "vmx" in flags else "svm") if hw else
            "no vmx/svm in /proc/cpuinfo: guest kernels run emulated (slow); enable VT-x/AMD-V in the firmware",
            required=False))
    else:
        checks.append(_check("architecture", machine == "aarch64", "architecture %s" % machine))
    checks.append(_check("kvm_module", os.path.isdir("/sys/module/kvm"),
                         "kvm module loaded" if os.path.isdir("/sys/module/kvm") else "kvm module not loaded (modprobe kvm)"))
    exists = os.path.exists(kvm_path)
    checks.append(_check("dev_kvm_exists", exists, "%s exists" % kvm_path if exists else "%s does not exist" % kvm_path))
    access_ok, api_ok, api_msg = False, False, "not checked"
    if exists:
        try:
            fd = os.open(kvm_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            access_msg = "cannot open %s: %s" % (kvm_path, e.strerror)
        else:
            access_ok, access_msg = True, "%s is readable and writable" % kvm_path
            try:
                version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
                api_ok = version == KVM_API_VERSION
                api_msg = "KVM API version %d" % version
            except OSError as e:
                api_msg = "KVM_GET_API_VERSION failed: %s" % e.strerror
            finally:
                os.close(fd)
        checks.append(_check("dev_kvm_access", access_ok, access_msg))
        checks.append(_check("kvm_api", api_ok, api_msg))
        if api_ok and machine in ("aarch64", "arm64"):
            checks.append(_gic_check(kvm_path))
    if machine in ("aarch64", "arm64"):
        checks.append(_fdt_check())
    return {"supported": all(c["ok"] for c in checks if c["required"]), "checks": checks}


def _gic_check(kvm_path: str) -> Dict[str, Any]:
    """arm64: which virtual GIC KVM can give a VM (an arm64 guest has no interrupts without one)."""
    have: List[str] = []
    try:
        kvm = os.open(kvm_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        finally:
            os.close(kvm)
    except OSError as e:
        return _check("arm_vgic", False, "cannot make a VM to ask for a virtual GIC: %s" % e.strerror)
    try:
        for name, dev_type in ARM_VGICS:
            try:
                fcntl.ioctl(vm, KVM_CREATE_DEVICE, bytearray(struct.pack("<III", dev_type, 0, KVM_CREATE_DEVICE_TEST)))
            except OSError:
                continue
            have.append(name)
    finally:
        os.close(vm)
    if not have:
        return _check("arm_vgic", False, "KVM offers no virtual GIC (neither GICv3 nor GICv2): "
                      "arm64 guests cannot get interrupts on this host")
    return _check("arm_vgic", True, "virtual GIC: %s (VMs use %s)" % (", ".join(have), have[0]))


def _fdt_check() -> Dict[str, Any]:
    """arm64: the worker writes each guest's device tree with dtc's libfdt (python3-libfdt, a Recommends)."""
    try:
        import libfdt  # noqa: F401
    except ImportError:
        return _check("arm_fdt", False, "python3-libfdt is missing: arm64 VMs cannot start "
                      "(apt install python3-libfdt; on Debian 11, pip install pylibfdt)")
    return _check("arm_fdt", True, "dtc's libfdt for the guests' device trees (python3-libfdt)")
