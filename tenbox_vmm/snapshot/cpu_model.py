"""The CPU a snapshot's vCPU state depends on, from KVM_GET_SUPPORTED_CPUID (worker; pure).

A saved XSAVE area, MSR list or CPUID table is only meaningful on a CPU of
the same vendor and model offering at least the same features: a restore
elsewhere would hand the guest instructions or state components the host
cannot run. The description is what the header records; `refusal` says,
in one line, why a host cannot take a snapshot, or None.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Sequence

# (label, function, index, register): the feature words whose bits a guest may have used.
FEATURE_WORDS = (
    ("1.ecx", 1, 0, "ecx"),
    ("1.edx", 1, 0, "edx"),
    ("7.0.ebx", 7, 0, "ebx"),
    ("7.0.ecx", 7, 0, "ecx"),
    ("7.0.edx", 7, 0, "edx"),
    ("0xd.0.eax", 0xD, 0, "eax"),  # the XSAVE components (XCR0 bits) KVM offers
    ("0xd.1.eax", 0xD, 1, "eax"),  # XSAVEOPT, XSAVEC, XGETBV1, XSAVES
    ("0x80000001.ecx", 0x80000001, 0, "ecx"),
    ("0x80000001.edx", 0x80000001, 0, "edx"),
)


def _leaf(entries: Sequence[Dict[str, int]], function: int, index: int) -> Optional[Dict[str, int]]:
    for e in entries:
        if e["function"] == function and e["index"] == index:
            return e
    for e in entries:  # leaves without significant indexes answer every index
        if e["function"] == function and index == 0:
            return e
    return None


def describe(supported: Sequence[Dict[str, int]]) -> Dict[str, object]:
    """{"vendor": str, "signature": int, "features": {label: int}} of a KVM_GET_SUPPORTED_CPUID table."""
    leaf0 = _leaf(supported, 0, 0)
    vendor = struct.pack("<3I", leaf0["ebx"], leaf0["edx"], leaf0["ecx"]).decode("ascii", "replace") if leaf0 else "?"
    leaf1 = _leaf(supported, 1, 0)
    features = {}
    for label, fn, idx, reg in FEATURE_WORDS:
        e = _leaf(supported, fn, idx)
        features[label] = e[reg] if e else 0
    return {"vendor": vendor.rstrip("\0"), "signature": leaf1["eax"] if leaf1 else 0, "features": features}


def _model(desc: Dict[str, object]) -> str:
    sig = int(desc["signature"])  # type: ignore[arg-type]
    family = (sig >> 8) & 0xF
    model = (sig >> 4) & 0xF
    if family in (6, 15):
        model |= ((sig >> 16) & 0xF) << 4
    if family == 15:
        family += (sig >> 20) & 0xFF
    return "%s family %d model %d stepping %d" % (desc["vendor"], family, model, sig & 0xF)


def _bits(value: int) -> List[int]:
    return [i for i in range(32) if value >> i & 1]


def refusal(saved: Dict[str, object], host: Dict[str, object]) -> Optional[str]:
    """Why this host cannot take state saved on `saved`'s CPU (one line), or None if it can."""
    if saved.get("vendor") != host.get("vendor") or saved.get("signature") != host.get("signature"):
        return "CPU model changed: the snapshot was taken on %s, this host is %s" % (_model(saved), _model(host))
    missing = []
    saved_features = saved.get("features") or {}
    host_features = host.get("features") or {}
    for label, _, _, _ in FEATURE_WORDS:
        lack = int(saved_features.get(label, 0)) & ~int(host_features.get(label, 0))  # type: ignore[union-attr]
        if lack:
            missing.append("%s bits %s" % (label, ",".join(str(b) for b in _bits(lack))))
    if missing:
        return "this host lacks CPU features the snapshot depends on: %s" % "; ".join(missing)
    return None
