"""Snapshot files: a complete one reads back exactly; a half-written or hostile one is refused with one line.

The file format is tenbox_vmm/snapshot/fileformat.py's; every refusal the
reader makes is exercised here on a file that was valid before the test
broke it, so a check that stopped working fails its test.
"""

import copy
import os
import struct

import msgpack
import pytest

from tenbox_vmm.snapshot import SnapshotError, fileformat
from tenbox_vmm.snapshot.fileformat import VCPU_SIZES, VM_SIZES, read_snapshot, write_snapshot

MIB = 1 << 20
HOST_CPU = {
    "vendor": "GenuineIntel",
    "signature": 0x906EA,
    "features": {"1.ecx": 0xF7FA3223, "1.edx": 0x0F8BFBFF, "7.0.ebx": 0x009C6FBF, "7.0.ecx": 0, "7.0.edx": 0,
                 "0xd.0.eax": 0x7, "0xd.1.eax": 0x1, "0x80000001.ecx": 0x121, "0x80000001.edx": 0x2C100800},
}


def machine_state(cpus=1):
    vcpu = {name: bytes(size) for name, size in VCPU_SIZES.items()}
    vcpu.update(msrs=[[0x10, 12345], [0xC0000080, 0x500]], mp_state=0,
                cpuid=[[0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69]])
    queue = dict(size=256, ready=True, desc_addr=0x1000000, avail_addr=0x1001000, used_addr=0x1002000,
                 event_idx=True, indirect=True, last_avail=10, used_idx=8, signalled=8)
    return {
        "vcpus": [copy.deepcopy(vcpu) for _ in range(cpus)],
        "vm": {name: bytes(size) for name, size in VM_SIZES.items()},
        "legacy": {
            "serial": dict(ier=1, lcr=3, mcr=0x0B, fcr=0xC1, scr=0, dll=1, dlm=0, thre_pending=False, irq=0,
                           rx=b"typed"),
            "rtc": dict(nvram=bytes(range(128)), offset=-5, reg_a=0x26, reg_b=2, index=0x38, frozen=[]),
            "pm": dict(sts=0, en=0x100, cnt=1, sci=0),
            "i8042": dict(status=0x14, ctr=0x30, output_port=3, out=None, pending=None),
            "reset_control": dict(value=0),
            "debug": dict(writes=7, last=0x42),
        },
        "virtio": [{
            "device": dict(name="blk", device_id=2, features=(1 << 32) | (1 << 28) | (1 << 29)),
            "transport": dict(status=15, device_features_sel=1, driver_features_sel=1,
                              driver_features=(1 << 32) | (1 << 28), queue_sel=0, interrupt_status=0,
                              config_generation=0),
            "queues": [queue],
        }],
    }


def ram_with_data(size=4 * MIB):
    ram = bytearray(size)
    ram[0:5] = b"hello"
    ram[3 * MIB + 17] = 0xAB  # the second chunk stays a hole
    return ram


@pytest.fixture
def snap(tmp_path):
    path = str(tmp_path / "vm.snap")
    write_snapshot(path, HOST_CPU, 1, machine_state(), ram_with_data())
    return path


def refusal(path, **kw):
    kw.setdefault("host_cpu", HOST_CPU)
    with pytest.raises(SnapshotError) as info:
        read_snapshot(path, **kw)
    text = str(info.value)
    assert "\n" not in text and text.startswith(path + ": "), text
    return text


def test_a_snapshot_reads_back_its_state_and_ram(snap):
    s = read_snapshot(snap, HOST_CPU, memory_bytes=4 * MIB, cpus=1)
    try:
        assert s.state == machine_state()
        assert s.header["tenbox_version"] and s.header["cpu"] == HOST_CPU
        ram = s.map_ram()
        assert ram[:] == ram_with_data()
        ram[0:5] = b"HELLO"  # MAP_PRIVATE: the guest's writes never reach the file
        ram.close()
        again = s.map_ram()
        assert again[0:5] == b"hello"
        again.close()
    finally:
        s.close()


def test_ram_pages_of_zeros_are_holes_in_the_file(snap):
    st = os.stat(snap)
    assert st.st_size > 4 * MIB
    assert st.st_blocks * 512 <= 2 * MIB + 64 * 1024  # the two chunks with data and the header


def test_the_ram_section_is_page_aligned_for_mmap(snap):
    s = read_snapshot(snap, HOST_CPU)
    assert s.header["ram_offset"] % 4096 == 0
    s.close()


def test_a_truncated_file_is_refused(snap):
    size = os.path.getsize(snap)
    os.truncate(snap, size - 4096)
    assert "truncated: %d bytes, the header says %d" % (size - 4096, size) in refusal(snap)
    os.truncate(snap, 30)
    assert "truncated" in refusal(snap)
    os.truncate(snap, 10)
    assert "truncated" in refusal(snap)


def test_an_empty_or_foreign_file_is_not_a_snapshot(tmp_path):
    path = str(tmp_path / "x")
    open(path, "wb").close()
    assert "not a tenbox snapshot" in refusal(path)
    with open(path, "wb") as f:
        f.write(b"QFI\xfb" + bytes(100))
    assert "not a tenbox snapshot" in refusal(path)


def test_another_format_version_is_refused(snap):
    with open(snap, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", fileformat.FORMAT_VERSION + 1))
    assert "snapshot format version %d, this tenbox" % (fileformat.FORMAT_VERSION + 1) in refusal(snap)


def test_a_changed_cpu_model_is_refused(snap):
    other = dict(HOST_CPU, signature=0x806EC)
    text = refusal(snap, host_cpu=other)
    assert "CPU model changed" in text and "model 158" in text and "model 142" in text
    amd = dict(HOST_CPU, vendor="AuthenticAMD")
    assert "CPU model changed" in refusal(snap, host_cpu=amd)


def test_a_host_without_a_feature_the_state_uses_is_refused(snap):
    fewer = copy.deepcopy(HOST_CPU)
    fewer["features"]["7.0.ebx"] &= ~(1 << 5)  # AVX2
    assert "lacks CPU features the snapshot depends on: 7.0.ebx bits 5" in refusal(snap, host_cpu=fewer)
    more = copy.deepcopy(HOST_CPU)
    more["features"]["7.0.ecx"] |= 1 << 3  # a newer host with more features takes it
    read_snapshot(snap, more).close()


def test_a_memory_size_mismatch_is_refused(snap):
    assert "memory size mismatch: the snapshot has 4 MiB of RAM, the VM 8 MiB" in refusal(snap, memory_bytes=8 * MIB)


def test_a_vcpu_count_mismatch_is_refused(snap):
    assert "the snapshot has 1 vCPUs, the VM 2" in refusal(snap, cpus=2)


def test_a_damaged_header_or_state_is_refused(tmp_path, snap):
    data = bytearray(open(snap, "rb").read())
    hurt = str(tmp_path / "hurt")
    h = bytearray(data)
    h[30] ^= 0x20
    open(hurt, "wb").write(h)
    assert "header's checksum does not match" in refusal(hurt)
    s = read_snapshot(snap, HOST_CPU)
    off = s.header["state_offset"]
    s.close()
    h = bytearray(data)
    h[off + 3] ^= 1
    open(hurt, "wb").write(h)
    assert "machine state's checksum does not match" in refusal(hurt)


def write_state(tmp_path, state, name="bad.snap"):
    path = str(tmp_path / name)
    write_snapshot(path, HOST_CPU, len(state["vcpus"]) or 1, state, bytearray(MIB))
    return path


def test_a_queue_index_past_its_size_is_refused(tmp_path):
    state = machine_state()
    state["virtio"][0]["queues"][0].update(size=16, last_avail=40, used_idx=8)
    text = refusal(write_state(tmp_path, state))
    assert "device state out of range: virtio0.queue0.last_avail = 40 is past used_idx 8 by 32" in text


@pytest.mark.parametrize("where, value, message", [
    (("virtio", 0, "queues", 0, "size"), 100, "virtio0.queue0.size = 100 (a power of two"),
    (("virtio", 0, "queues", 0, "size"), 65536, "virtio0.queue0.size = 65536 (0..32768)"),
    (("legacy", "serial", "ier"), 300, "serial.ier = 300 (0..15)"),
    (("legacy", "serial", "rx"), b"x" * 5000, "serial.rx = '5000 bytes' (at most 4096 bytes)"),
    (("legacy", "rtc", "nvram"), b"x" * 12, "rtc.nvram = '12 bytes' (exactly 128 bytes)"),
    (("legacy", "rtc", "frozen"), [[200, 1]], "rtc.frozen = [200, 1]"),
    (("legacy", "i8042", "out"), -1, "i8042.out = -1 (none or 0..255)"),
    (("legacy", "pm", "sci"), True, "pm.sci = True (0..1)"),
    (("virtio", 0, "transport", "interrupt_status"), 8, "virtio0.transport.interrupt_status = 8 (0..3)"),
])
def test_a_device_field_out_of_range_is_refused(tmp_path, where, value, message):
    state = machine_state()
    rec = state
    for key in where[:-1]:
        rec = rec[key]
    rec[where[-1]] = value
    assert "device state out of range: " + message in refusal(write_state(tmp_path, state))


def test_a_device_record_with_unknown_or_missing_fields_is_refused(tmp_path):
    state = machine_state()
    state["legacy"]["serial"]["extra"] = 1
    del state["legacy"]["serial"]["scr"]
    assert "serial has fields ['scr'] missing and ['extra'] unknown" in refusal(write_state(tmp_path, state))


def test_a_vcpu_struct_of_the_wrong_size_is_refused(tmp_path):
    state = machine_state()
    state["vcpus"][0]["xsave"] = bytes(100)
    assert "vcpu0.xsave is not 4096 bytes" in refusal(write_state(tmp_path, state))
    state = machine_state()
    state["vcpus"][0]["msrs"].append([1 << 40, 0])
    assert "vcpu0.msrs has a bad row" in refusal(write_state(tmp_path, state, "b2"))


def test_state_that_is_not_msgpack_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fileformat.msgpack, "packb", lambda state, use_bin_type: b"\xc1garbage")
    assert "does not decode" in refusal(write_state(tmp_path, machine_state()))


def test_a_write_killed_halfway_leaves_no_snapshot_under_its_name(tmp_path, monkeypatch):
    path = str(tmp_path / "vm.snap")
    calls = []

    def dies(fd, data, offset):
        calls.append(offset)
        raise KeyboardInterrupt  # stands for the worker being killed while it writes RAM

    monkeypatch.setattr(fileformat, "_pwrite_all", dies)
    with pytest.raises(KeyboardInterrupt):
        write_snapshot(path, HOST_CPU, 1, machine_state(), ram_with_data())
    assert calls and os.listdir(str(tmp_path)) == []


def test_a_failed_rewrite_keeps_the_previous_snapshot(snap, monkeypatch):
    before = open(snap, "rb").read()

    def full(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileformat, "_pwrite_all", full)
    with pytest.raises(SnapshotError, match="cannot write snapshot .*No space left"):
        write_snapshot(snap, HOST_CPU, 1, machine_state(), ram_with_data())
    assert open(snap, "rb").read() == before
    assert os.listdir(os.path.dirname(snap)) == ["vm.snap"]


def test_an_unrenamed_temporary_file_never_reads_as_valid(tmp_path):
    """What a killed writer leaves (its temporary file, cut anywhere) is refused, whatever the cut."""
    path = str(tmp_path / "whole")
    write_snapshot(path, HOST_CPU, 1, machine_state(), ram_with_data())
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut")
    for n in (0, 19, 100, 600, 4096, len(data) // 2, len(data) - 1):
        open(cut, "wb").write(data[:n])
        refusal(cut)


def test_msgpack_state_with_foreign_keys_is_refused(tmp_path, monkeypatch):
    real = msgpack.packb
    monkeypatch.setattr(fileformat.msgpack, "packb", lambda state, use_bin_type: real({1: 2}, use_bin_type=True))
    assert "does not decode" in refusal(write_state(tmp_path, machine_state()))


def test_the_cpu_description_names_vendor_model_and_feature_words():
    from tenbox_vmm.snapshot import cpu_model

    entries = [
        dict(function=0, index=0, flags=0, eax=0xD, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
        dict(function=1, index=0, flags=0, eax=0x906EA, ebx=0, ecx=0x80000001, edx=0x10),
        dict(function=7, index=0, flags=1, eax=0, ebx=0x20, ecx=0, edx=0),
        dict(function=7, index=1, flags=1, eax=0, ebx=0xFFFF, ecx=0, edx=0),
        dict(function=0xD, index=0, flags=1, eax=0x7, ebx=0, ecx=0, edx=0),
    ]
    desc = cpu_model.describe(entries)
    assert desc["vendor"] == "GenuineIntel" and desc["signature"] == 0x906EA
    assert desc["features"]["1.ecx"] == 0x80000001 and desc["features"]["7.0.ebx"] == 0x20
    assert desc["features"]["0xd.0.eax"] == 7 and desc["features"]["0x80000001.edx"] == 0
    assert cpu_model.refusal(desc, desc) is None


def test_a_snapshot_is_written_through_a_folder_descriptor_and_a_missing_folder_is_one_line(tmp_path):
    dfd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_snapshot("/hidden/by/the/sandbox/vm.snap", HOST_CPU, 1, machine_state(), ram_with_data(), dir_fd=dfd)
    finally:
        os.close(dfd)
    assert os.listdir(str(tmp_path)) == ["vm.snap"]
    read_snapshot(str(tmp_path / "vm.snap"), HOST_CPU).close()
    with pytest.raises(SnapshotError, match="cannot write a snapshot in /nonexistent: No such file"):
        write_snapshot("/nonexistent/vm.snap", HOST_CPU, 1, machine_state(), ram_with_data())


def test_a_live_writer_takes_ram_first_and_later_passes_overwrite_pages_even_with_zeros(tmp_path):
    """SnapshotWriter as a live save uses it: all of RAM while it still changes, then the changed pages
    (one of them now zeros, which must not stay as the first pass wrote it), the state last."""
    path = str(tmp_path / "live.snap")
    ram = ram_with_data()
    out = fileformat.SnapshotWriter(path, len(ram), fileformat.live_ram_offset(1))
    out.write_ram(memoryview(ram))
    assert os.listdir(str(tmp_path)) == [".live.snap.tmp-%d" % os.getpid()], "no file under its name yet"
    ram[0:5] = bytes(5)  # the guest wrote these pages after the first pass
    ram[2 * MIB : 2 * MIB + 3] = b"new"
    for offset in (0, 2 * MIB):
        out.write_ram(memoryview(ram), offset, offset + 4096, holes=False)
    out.sync()
    size = out.finish(HOST_CPU, 1, fileformat.pack_state(machine_state()))
    assert size == os.path.getsize(path) == fileformat.live_ram_offset(1) + len(ram)
    s = read_snapshot(path, HOST_CPU)
    try:
        assert bytes(s.map_ram()) == bytes(ram)
    finally:
        s.close()
    assert os.listdir(str(tmp_path)) == ["live.snap"]


def test_a_live_writer_aborted_or_with_a_state_too_big_for_its_room_leaves_nothing(tmp_path):
    path = str(tmp_path / "live.snap")
    out = fileformat.SnapshotWriter(path, 4 * MIB, 8192)
    out.write_ram(memoryview(ram_with_data()))
    with pytest.raises(SnapshotError, match=r"machine state of \d+ bytes does not fit the \d+ reserved"):
        out.finish(HOST_CPU, 1, fileformat.pack_state(machine_state(cpus=4)))
    out.abort()
    assert os.listdir(str(tmp_path)) == []


def test_a_first_pass_with_a_data_map_reads_only_the_chunks_it_marks(tmp_path):
    """write_ram(data=...) as a live save's first pass uses it (GuestMemory.data_chunks): a chunk marked 0
    is not read at all, so its bytes here, which a real map would have marked, do not reach the file."""
    path = str(tmp_path / "mapped.snap")
    ram = ram_with_data()
    ram[1 * MIB] = 0xCD  # chunk 1: data the map below says is not there
    out = fileformat.SnapshotWriter(path, len(ram), fileformat.live_ram_offset(1))
    out.write_ram(memoryview(ram), data=bytes([1, 0, 0, 1]))
    size = out.finish(HOST_CPU, 1, fileformat.pack_state(machine_state()))
    s = read_snapshot(path, HOST_CPU)
    try:
        back = bytes(s.map_ram())
    finally:
        s.close()
    assert back[:5] == b"hello" and back[3 * MIB + 17] == 0xAB
    assert back[1 * MIB] == 0, "a chunk marked empty was read"
    assert os.stat(path).st_blocks * 512 < size - 2 * MIB  # chunks 1 and 2 are holes
