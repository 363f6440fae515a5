"""The records of a snapshot's machine state and their bounds (worker; pure).

Every value a snapshot file carries is checked here, before anything of it
is loaded into KVM or a device model: a record whose value is outside what
the device can hold is refused with one line naming the record and field.
The field names are the ones each device's `save_state`/`load_state` use.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple, Union

from tenbox_vmm.snapshot.errors import SnapshotError

U8, U16, U32, U64 = (1 << 8) - 1, (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
QUEUE_SIZE_MAX = 32768  # virtio's largest split queue (devices/virtio/queue.py)
SERIAL_RX_MAX = 4096  # devices/serial.py RX_QUEUE_MAX
CMOS_BYTES = 128
RTC_OFFSET_MAX_SEC = 1 << 40
MSRS_MAX = 1024
CPUID_ENTRIES_MAX = 256
VIRTIO_DEVICES_MAX = 8
QUEUES_MAX = 16

# A field's kind: an int bound (0..max), "bool", ("bytes", exact length or -max), ("opt", max) for None or 0..max.
Kind = Union[int, str, Tuple[str, int]]

SERIAL: Dict[str, Kind] = {
    "ier": 0x0F, "lcr": U8, "mcr": 0x1F, "fcr": U8, "scr": U8, "dll": U8, "dlm": U8,
    "thre_pending": "bool", "irq": 1, "rx": ("bytes", -SERIAL_RX_MAX),
}
RTC: Dict[str, Kind] = {
    "nvram": ("bytes", CMOS_BYTES), "offset": "sint40", "reg_a": 0x7F, "reg_b": U8, "index": 0x7F,
    "frozen": "frozen",
}
ACPI_PM: Dict[str, Kind] = {"sts": U16, "en": U16, "cnt": U16, "sci": 1}
I8042: Dict[str, Kind] = {"status": U8, "ctr": U8, "output_port": U8, "out": ("opt", U8), "pending": ("opt", U8)}
RESET_CONTROL: Dict[str, Kind] = {"value": U8}
DEBUG_PORT: Dict[str, Kind] = {"writes": U64, "last": U8}
LEGACY: Dict[str, Dict[str, Kind]] = {
    "serial": SERIAL, "rtc": RTC, "pm": ACPI_PM, "i8042": I8042, "reset_control": RESET_CONTROL, "debug": DEBUG_PORT,
}
TRANSPORT: Dict[str, Kind] = {
    "status": U8, "device_features_sel": U32, "driver_features_sel": U32, "driver_features": U64,
    "queue_sel": U32, "interrupt_status": 3, "config_generation": U32,
}
QUEUE: Dict[str, Kind] = {
    "size": QUEUE_SIZE_MAX, "ready": "bool", "desc_addr": U64, "avail_addr": U64, "used_addr": U64,
    "event_idx": "bool", "indirect": "bool", "last_avail": U16, "used_idx": U16, "signalled": U16,
}
VIRTIO: Dict[str, Kind] = {"name": "str", "device_id": U32, "features": U64}


def check_fields(where: str, record: Any, schema: Mapping[str, Kind]) -> None:
    """Refuse `record` unless it is a map with exactly schema's fields, each in its range."""
    if not isinstance(record, dict):
        raise SnapshotError("device state out of range: %s is not a record" % where)
    if set(record) != set(schema):
        extra = sorted(set(record) - set(schema))
        missing = sorted(set(schema) - set(record))
        raise SnapshotError("device state out of range: %s has fields %s missing and %s unknown"
                            % (where, missing or "none", extra or "none"))
    for name, kind in schema.items():
        _check_value("%s.%s" % (where, name), record[name], kind)


def _bad(where: str, value: Any, what: str) -> SnapshotError:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return SnapshotError("device state out of range: %s = %s (%s)" % (where, text, what))


def _check_value(where: str, value: Any, kind: Kind) -> None:
    if kind == "bool":
        if not isinstance(value, bool):
            raise _bad(where, value, "true or false")
    elif kind == "str":
        if not isinstance(value, str) or not 0 < len(value) <= 32:
            raise _bad(where, value, "a name")
    elif kind == "sint40":
        if not _is_int(value) or abs(value) > RTC_OFFSET_MAX_SEC:
            raise _bad(where, value, "within +-2^40")
    elif kind == "frozen":
        if not isinstance(value, list) or len(value) > CMOS_BYTES:
            raise _bad(where, value, "a list of [index, byte]")
        for pair in value:
            if (not isinstance(pair, list) or len(pair) != 2 or not all(_is_int(x) for x in pair)
                    or not 0 <= pair[0] < CMOS_BYTES or not 0 <= pair[1] <= U8):
                raise _bad(where, pair, "[index 0..127, byte]")
    elif isinstance(kind, tuple):
        tag, bound = kind
        if tag == "bytes":
            if not isinstance(value, bytes):
                raise _bad(where, value, "bytes")
            if (bound >= 0 and len(value) != bound) or (bound < 0 and len(value) > -bound):
                raise _bad(where, "%d bytes" % len(value), "%s %d bytes" % ("exactly" if bound >= 0 else "at most",
                                                                           abs(bound)))
        elif tag == "opt":
            if value is not None and (not _is_int(value) or not 0 <= value <= bound):
                raise _bad(where, value, "none or 0..%d" % bound)
    else:
        if not _is_int(value) or not 0 <= value <= kind:
            raise _bad(where, value, "0..%d" % kind)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_queue(where: str, q: Any) -> None:
    """A virtqueue's record: its fields, a power-of-two size, and indexes no further apart than the ring."""
    check_fields(where, q, QUEUE)
    size = q["size"]
    if size < 1 or size & (size - 1):
        raise _bad(where + ".size", size, "a power of two 1..%d" % QUEUE_SIZE_MAX)
    if q["ready"]:
        in_flight = (q["last_avail"] - q["used_idx"]) & U16
        if in_flight > size:
            raise SnapshotError("device state out of range: %s.last_avail = %d is past used_idx %d by %d, "
                                "more than the queue's size %d" % (where, q["last_avail"], q["used_idx"],
                                                                   in_flight, size))


def check_virtio(where: str, rec: Any) -> None:
    if not isinstance(rec, dict) or set(rec) != {"device", "transport", "queues"}:
        raise SnapshotError("device state out of range: %s is not a virtio record" % where)
    check_fields(where + ".device", rec["device"], VIRTIO)
    check_fields(where + ".transport", rec["transport"], TRANSPORT)
    queues = rec["queues"]
    if not isinstance(queues, list) or not 0 < len(queues) <= QUEUES_MAX:
        raise _bad(where + ".queues", queues, "1..%d queues" % QUEUES_MAX)
    for i, q in enumerate(queues):
        check_queue("%s.queue%d" % (where, i), q)


def check_vcpu(where: str, rec: Any, sizes: Mapping[str, int]) -> None:
    """A vCPU's record: each KVM struct exactly its size, MSRs and CPUID entries in range."""
    if not isinstance(rec, dict):
        raise SnapshotError("vCPU state out of range: %s is not a record" % where)
    wanted = set(sizes) | {"msrs", "mp_state", "cpuid"}
    if set(rec) != wanted:
        raise SnapshotError("vCPU state out of range: %s has fields %s, wants %s"
                            % (where, sorted(rec), sorted(wanted)))
    for name, size in sizes.items():
        v = rec[name]
        if not isinstance(v, bytes) or len(v) != size:
            raise SnapshotError("vCPU state out of range: %s.%s is not %d bytes" % (where, name, size))
    if not _is_int(rec["mp_state"]) or not 0 <= rec["mp_state"] <= 8:
        raise SnapshotError("vCPU state out of range: %s.mp_state = %r (0..8)" % (where, rec["mp_state"]))
    _check_rows(where + ".msrs", rec["msrs"], MSRS_MAX, (U32, U64))
    _check_rows(where + ".cpuid", rec["cpuid"], CPUID_ENTRIES_MAX, (U32,) * 7)


def _check_rows(where: str, rows: Any, max_rows: int, bounds: Sequence[int]) -> None:
    if not isinstance(rows, list) or len(rows) > max_rows:
        raise SnapshotError("vCPU state out of range: %s is not a list of at most %d rows" % (where, max_rows))
    for row in rows:
        if (not isinstance(row, list) or len(row) != len(bounds)
                or not all(_is_int(x) and 0 <= x <= b for x, b in zip(row, bounds))):
            raise SnapshotError("vCPU state out of range: %s has a bad row %.60r" % (where, row))


def check_state(state: Any, cpus: int, vcpu_sizes: Mapping[str, int], vm_sizes: Mapping[str, int]) -> None:
    """The whole machine record: `cpus` vCPUs, the VM's in-kernel devices, the legacy devices, virtio."""
    if not isinstance(state, dict) or set(state) != {"vcpus", "vm", "legacy", "virtio"}:
        raise SnapshotError("machine state out of range: not a machine record")
    vcpus = state["vcpus"]
    if not isinstance(vcpus, list) or len(vcpus) != cpus:
        raise SnapshotError("machine state out of range: %s vCPU records, the header says %d"
                            % (len(vcpus) if isinstance(vcpus, list) else "no", cpus))
    for i, rec in enumerate(vcpus):
        check_vcpu("vcpu%d" % i, rec, vcpu_sizes)
    vm = state["vm"]
    if not isinstance(vm, dict) or set(vm) != set(vm_sizes):
        raise SnapshotError("machine state out of range: the VM record wants %s" % sorted(vm_sizes))
    for name, size in vm_sizes.items():
        if not isinstance(vm[name], bytes) or len(vm[name]) != size:
            raise SnapshotError("machine state out of range: vm.%s is not %d bytes" % (name, size))
    legacy = state["legacy"]
    if not isinstance(legacy, dict) or set(legacy) != set(LEGACY):
        raise SnapshotError("device state out of range: the legacy devices are %s" % sorted(LEGACY))
    for name, schema in LEGACY.items():
        check_fields(name, legacy[name], schema)
    virtio = state["virtio"]
    if not isinstance(virtio, list) or len(virtio) > VIRTIO_DEVICES_MAX:
        raise SnapshotError("device state out of range: at most %d virtio devices" % VIRTIO_DEVICES_MAX)
    for i, rec in enumerate(virtio):
        check_virtio("virtio%d" % i, rec)
