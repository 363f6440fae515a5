"""tenbox-vm-runtime snapshots a running guest and restores it: the guest goes on from where it was.

The count guest (tests/guests/src/count.c) prints `count: N` with a delay
between lines; its count lives in registers and on the stack, so only a
faithful restore of the vCPU, the devices and RAM continues it. Real KVM,
the real runtime process, its real sandbox.
"""

import json
import os
import re
import shutil
import signal
import struct
import time

import pytest

from tests.framework.guests import guest_path
from tests.framework.runtime import boot_argv, runtime_argv

pytestmark = pytest.mark.usefixtures("kvm", "guests")

SNAPSHOT_SIGNAL = signal.SIGRTMIN + 1
COUNT = re.compile(r"^count: (\d+)$", re.M)
WAIT_SEC = 60.0


def counts(text):
    return [int(n) for n in COUNT.findall(text)]


def restore(spawn, snap, *args):
    return spawn(runtime_argv("--restore", str(snap), "--console", "stdio", *args))


@pytest.fixture(params=[1, 2], ids=["1cpu", "2cpus"])
def counted_snapshot(request, spawn, snap_dir):
    """A count guest snapshotted while it counts: (the file, the last count its console showed by then).

    With 2 vCPUs the second waits for a SIPI that never comes: its wait state is restored too.
    """
    cpus = request.param
    snap = snap_dir / "count.snap"
    # stderr merged into the console: the lines the guest printed before the pause come before the
    # runtime's report, in the order it wrote them (two pipes read on two threads would not say).
    p = spawn(boot_argv(guest_path("count"), cmdline="console=ttyS0 count.ms=50", memory_mb=64, cpus=cpus)
              + ["--snapshot-out", str(snap)], merge_stderr=True)
    p.wait_for(r"^count: 5$", timeout=WAIT_SEC)
    p.signal(SNAPSHOT_SIGNAL)
    m = p.wait_for(r"snapshot \S+ written: 64 MiB of RAM, %d vCPUs, guest paused (\d+) ms" % cpus,
                   timeout=WAIT_SEC)
    shown = counts(p.output[:m.start()])[-1]
    p.wait_for(r"^count: %d$" % (shown + 3), timeout=WAIT_SEC)  # the guest runs on after the snapshot
    assert p.stop(10) == 3
    assert int(m.group(1)) < 5000
    return snap, shown


def test_a_snapshot_restored_twice_continues_from_the_same_count_both_times(spawn, counted_snapshot):
    snap, shown = counted_snapshot
    outputs = []
    for _ in range(2):
        r = restore(spawn, snap)
        first = int(r.wait_for(r"^count: (\d+)$", timeout=WAIT_SEC).group(1))
        r.wait_for(r"^count: %d$" % (first + 4), timeout=WAIT_SEC)
        assert r.stop(10) == 3, r.errors
        outputs.append(r.output)
    seqs = [counts(out) for out in outputs]  # a line cut by the snapshot ("unt: 7") is not counted
    for out, seq in zip(outputs, seqs):
        assert "TENBOX-GUEST count start" not in out, out  # restored, not booted again
        assert seq == list(range(seq[0], seq[0] + len(seq))), seq  # one count after the other
    # Both go on from where the snapshot was taken: the line after the last the original had shown.
    # A snapshot taken in the middle of that line cuts it: a restore prints the rest of it first
    # ("unt: 6", or only its newline), and its first whole count is the one after.
    assert seqs[0][0] == seqs[1][0], seqs
    rest = outputs[0].split("\n")[0]
    resumed = seqs[0][0] if re.fullmatch(r"count: \d+", rest) else seqs[0][0] - 1
    assert ("count: %d" % resumed).endswith(rest), (rest, seqs[0][0])
    assert 5 < resumed <= shown + 1, (resumed, shown, outputs[0][:40])
    assert outputs[0].split("\n")[0] == outputs[1].split("\n")[0]


def ram_offset(snap) -> int:
    """Where guest RAM starts in a snapshot file (its JSON header's ram_offset)."""
    with open(str(snap), "rb") as f:
        head = f.read(20)
        return json.loads(f.read(struct.unpack_from("<I", head, 12)[0]))["ram_offset"]


def generation_id(snap) -> bytes:
    """The VM generation ID in a snapshot file's RAM (tenbox_vmm/arch/x86_64/layout.py VMGENID_ADDR)."""
    from tenbox_vmm.arch.x86_64 import layout as L

    at = ram_offset(snap) + L.VMGENID_ADDR
    return snap.read_bytes()[at:at + L.VMGENID_SIZE]


def test_every_restore_is_a_new_vm_generation(spawn, counted_snapshot, snap_dir):
    """A boot writes a random generation ID where the DSDT's VGEN says; each restore writes its own over
    the snapshot's (and raises the Generic Event Device's edge, which Linux's vmgenid driver turns into an
    RNG reseed: the nested lane's test_linux_vmgenid.py)."""
    snap, _ = counted_snapshot
    booted = generation_id(snap)
    assert len(booted) == 16 and booted != bytes(16)
    seen = [booted]
    for i in range(2):
        again = snap_dir / ("again%d.snap" % i)
        r = restore(spawn, snap, "--snapshot-out", str(again))
        r.wait_for(r"^count: \d+$", timeout=WAIT_SEC)
        r.signal(SNAPSHOT_SIGNAL)
        r.wait_for_stderr(r"snapshot \S+ written", timeout=WAIT_SEC)
        assert r.stop(10) == 3, r.errors
        seen.append(generation_id(again))
    assert len(set(seen)) == 3, "the boot and each restore have their own generation ID: %s" % [
        s.hex() for s in seen]


FILL_BASE = 16 << 20  # where count.fill starts writing (tests/guests/src/count.c)


def test_ram_in_use_comes_back_whole_after_a_restore_and_after_a_snapshot_of_the_restored_guest(spawn, snap_dir):
    """count.fill writes 40 MiB of RAM, each word its own address, and count.verify reads it back before each
    line. A restored worker maps the file's RAM copy-on-write: its snapshot must write out the pages it never
    touched as well as those it did. A word changed in the file is what the guest reports."""
    cmdline = "console=ttyS0 count.ms=50 count.fill=40 count.verify=1"
    first, second, bad = snap_dir / "used.snap", snap_dir / "again.snap", snap_dir / "bad.snap"
    p = spawn(boot_argv(guest_path("count"), cmdline=cmdline, memory_mb=64) + ["--snapshot-out", str(first)])
    p.wait_for(r"^count: filled 40 MiB$", timeout=WAIT_SEC)
    p.wait_for(r"^count: 3$", timeout=WAIT_SEC)
    p.signal(SNAPSHOT_SIGNAL)
    p.wait_for_stderr(r"snapshot \S+ written", timeout=WAIT_SEC)
    assert p.stop(10) == 3
    r = restore(spawn, first, "--snapshot-out", str(second))
    n = int(r.wait_for(r"^count: (\d+)$", timeout=WAIT_SEC).group(1))
    r.signal(SNAPSHOT_SIGNAL)
    r.wait_for_stderr(r"snapshot \S+ written", timeout=WAIT_SEC)
    r.wait_for(r"^count: %d$" % (n + 2), timeout=WAIT_SEC)
    assert r.stop(10) == 3
    for snap in (first, second):
        r = restore(spawn, snap)
        n = int(r.wait_for(r"^count: (\d+)$", timeout=WAIT_SEC).group(1))
        r.wait_for(r"^count: %d$" % (n + 2), timeout=WAIT_SEC)  # three lines, each after a check of all 40 MiB
        assert r.stop(10) == 3
        assert "RAM changed" not in r.output, (snap.name, r.output)
    shutil.copyfile(str(second), str(bad))
    word = FILL_BASE + (20 << 20) + 8
    with open(str(bad), "r+b") as f:
        f.seek(ram_offset(bad) + word)
        f.write(b"\xff")
    r = restore(spawn, bad)
    assert int(r.wait_for(r"^count: RAM changed at 0x([0-9a-f]+)$", timeout=WAIT_SEC).group(1), 16) == word
    r.wait_exit(WAIT_SEC)


def test_a_guest_writing_its_ram_throughout_a_live_snapshot_comes_back_as_it_was_at_the_pause(spawn, snap_dir):
    """The snapshot copies RAM while the guest runs, then the pages it wrote meanwhile (KVM's dirty log),
    and pauses it only for the last pass. count.churn has the guest rewrite one MiB of 40 each line, so
    pages change after the first pass copied them; count.verify checks every word against the line that
    last wrote it. A page left as an earlier line wrote it is what the guest reports."""
    cmdline = "console=ttyS0 count.ms=1 count.fill=40 count.verify=1 count.churn=1"
    snap, stale = snap_dir / "churn.snap", snap_dir / "stale.snap"
    p = spawn(boot_argv(guest_path("count"), cmdline=cmdline, memory_mb=64) + ["--snapshot-out", str(snap)])
    p.wait_for(r"^count: 5$", timeout=WAIT_SEC)
    p.signal(SNAPSHOT_SIGNAL)
    m = p.wait_for_stderr(r"snapshot \S+ written: .* guest paused (\d+) ms \(saved in (\d+) ms; "
                          r"passes over RAM: ([\d., ]+) MiB\)", timeout=WAIT_SEC)
    passes = [float(x) for x in m.group(3).split(", ")]
    assert len(passes) >= 2 and 40.0 <= passes[0] <= 64.0, m.group(0)  # at least the filled RAM, read once
    assert sum(passes[1:]) > 0, "the guest wrote RAM during the first pass, and the next passes took it"
    assert p.stop(10) == 3
    assert "RAM changed" not in p.output
    for _ in range(2):
        r = restore(spawn, snap)
        n = int(r.wait_for(r"^count: (\d+)$", timeout=WAIT_SEC).group(1))
        r.wait_for(r"^count: %d$" % (n + 41), timeout=WAIT_SEC)  # every MiB checked after a churn of each
        assert r.stop(10) == 3
        assert "RAM changed" not in r.output, r.output[-2000:]
    # The first fill's word in MiB 1 of the filled RAM, which line 1 rewrote: an earlier page, as a pass
    # that missed a write would have left it.
    shutil.copyfile(str(snap), str(stale))
    word = FILL_BASE + (1 << 20) + 64
    with open(str(stale), "r+b") as f:
        f.seek(ram_offset(stale) + word)
        f.write(struct.pack("<Q", word ^ 0x5A5A5A5A5A5A5A5A))
    r = restore(spawn, stale)
    assert int(r.wait_for(r"^count: RAM changed at 0x([0-9a-f]+)$", timeout=WAIT_SEC).group(1), 16) == word
    r.wait_exit(WAIT_SEC)


def test_ram_the_guest_never_wrote_is_not_read_and_comes_back_as_zeros(spawn, snap_dir):
    """A snapshot's first pass reads only the MiB the kernel says may hold data (GuestMemory.data_chunks):
    pages behind them in the worker, or, for a restored guest, its own copies and the snapshot file's data.
    count.fill=40 leaves 40 MiB written and most of the rest never touched; count.verify checks the 40
    against their addresses after every restore, so a chunk with data taken for an empty one shows. Run in
    the worker's sandbox, where /proc/self/pagemap is root's once it is not dumpable: it is opened before."""
    cmdline = "console=ttyS0 count.ms=50 count.fill=40 count.verify=1"
    first, second = snap_dir / "fresh.snap", snap_dir / "restored.snap"
    written = re.compile(r"snapshot \S+ written: 1024 MiB .*passes over RAM: ([\d.]+)")
    p = spawn(boot_argv(guest_path("count"), cmdline=cmdline, memory_mb=1024) + ["--snapshot-out", str(first)])
    p.wait_for(r"^count: 3$", timeout=WAIT_SEC)
    p.signal(SNAPSHOT_SIGNAL)
    read = float(p.wait_for_stderr(written, timeout=WAIT_SEC).group(1))
    assert p.stop(10) == 3
    assert 40 <= read <= 64, "the first pass read %.1f MiB of a guest that wrote 40-odd" % read
    r = restore(spawn, first, "--snapshot-out", str(second))
    n = int(r.wait_for(r"^count: (\d+)$", timeout=WAIT_SEC).group(1))
    r.signal(SNAPSHOT_SIGNAL)
    read = float(r.wait_for_stderr(written, timeout=WAIT_SEC).group(1))
    r.wait_for(r"^count: %d$" % (n + 2), timeout=WAIT_SEC)
    assert r.stop(10) == 3
    assert 40 <= read <= 64, "the restored guest's first pass read %.1f MiB" % read
    for snap in (first, second):
        assert os.stat(str(snap)).st_blocks * 512 < 80 << 20, "%s: the file is not sparse" % snap.name
        r = restore(spawn, snap)
        n = int(r.wait_for(r"^count: (\d+)$", timeout=WAIT_SEC).group(1))
        r.wait_for(r"^count: %d$" % (n + 2), timeout=WAIT_SEC)
        assert r.stop(10) == 3
        assert "RAM changed" not in r.output, (snap.name, r.output)


def test_a_live_virtio_blk_disk_works_after_a_restore(spawn, snap_dir, tmp_path):
    """The blk guest with its device live (rings in RAM, ioeventfd and irqfd wired) is snapshotted and
    restored over the same disk: a read through the restored device gives the same CRC as before."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(4 << 20))
    os.chmod(str(disk), 0o666)  # the worker's user reads it when run as root
    snap = snap_dir / "blk.snap"
    disk_arg = "%s,format=raw" % disk
    cmdline = "console=ttyS0 blk.stay=1 blk.read=0:64"
    p = spawn(boot_argv(guest_path("blk"), cmdline=cmdline, memory_mb=64, disks=[disk_arg])
              + ["--snapshot-out", str(snap)])
    p.wait_for(r"^blk: ready capacity=8192$", timeout=WAIT_SEC)
    crc = p.wait_for(r"^info - blk.crc32.0.64=(\w+)$").group(1)
    p.signal(SNAPSHOT_SIGNAL)
    p.wait_for_stderr(r"snapshot \S+ written", timeout=WAIT_SEC)
    assert p.stop(10) == 3  # its image lock goes with it
    r = restore(spawn, snap, "--disk", disk_arg)
    r.send("read\n")
    r.wait_for(r"^blk: reads done 1$", timeout=WAIT_SEC)
    assert r.wait_for(r"^info - blk.crc32.0.64=(\w+)$").group(1) == crc
    assert "not ok" not in r.output
    r.send("quit\n")
    assert r.wait_exit(WAIT_SEC) == 0, r.errors
    assert "TENBOX-GUEST blk PASS" in r.output


# Two rounds of the guest's 16 MiB, 4 KiB at a time with 100 us between requests: about a second a round
# here, so the snapshot (some 30 ms) falls inside one, long after that round marked its sectors unread.
READCHECK = ("console=ttyS0 blk.test=none blk.bench=readcheck blk.bench.mb=32 blk.bench.bs=4 blk.bench.depth=1 "
             "blk.bench.gap_us=100 blk.bench.stall=20")


def numbered_disk(path, mib):
    """A raw image whose sector n starts with the u64 n (the blk guest's blk.bench=readcheck)."""
    sector = bytes(504)
    with open(str(path), "wb") as f:
        for n in range(mib << 11):
            f.write(struct.pack("<Q", n) + sector)
    os.chmod(str(path), 0o666)  # the worker's user reads it when run as root


def checked(output, check):
    """Whether the guest printed `ok - <check>` as a line of its own (not inside `not ok - <check>`)."""
    return re.search(r"^ok - %s$" % re.escape(check), output, re.M) is not None


def test_what_the_device_writes_into_ram_during_a_live_snapshot_is_in_it(spawn, snap_dir, tmp_path):
    """The devices run while RAM is copied: the virtqueues mark the buffers they fill (queue.WriteLog), and
    the passes take those pages as they take the vCPUs' (KVM's dirty log). The blk guest reads its 16 MiB
    disk into RAM round after round, marking each sector's place unread first, and checks every sector only
    once the round is read: a restored guest checks what the device wrote before the pause, so a page the
    device filled after the pass that copied it would show as an unread or wrong sector."""
    disk = tmp_path / "numbered.img"
    numbered_disk(disk, 16)
    disk_arg = "%s,format=raw,ro" % disk
    snap = snap_dir / "reads.snap"
    p = spawn(boot_argv(guest_path("blk"), cmdline=READCHECK, memory_mb=64, disks=[disk_arg])
              + ["--snapshot-out", str(snap)], merge_stderr=True)
    p.wait_for(r"^blk: start$", timeout=WAIT_SEC)
    time.sleep(0.3)  # into the first round
    p.signal(SNAPSHOT_SIGNAL)
    m = p.wait_for(r"snapshot \S+ written: .*passes over RAM: ([\d., ]+) MiB\)", timeout=WAIT_SEC)
    passes = [float(x) for x in m.group(1).split(", ")]
    assert "blk: done" not in p.output[:m.start()], "the snapshot came after the reads"
    assert sum(passes[1:]) > 0, "the device read into RAM during the first pass: %s" % m.group(0)
    p.wait_for(r"^TENBOX-GUEST blk (PASS|FAIL)", timeout=WAIT_SEC * 2)
    assert checked(p.output, "every sector read carries its own number"), p.output[-2000:]
    assert "TENBOX-GUEST blk PASS" in p.output, p.output[-2000:]
    p.wait_exit(WAIT_SEC)
    for _ in range(2):
        r = restore(spawn, snap, "--disk", disk_arg)
        r.wait_for(r"^TENBOX-GUEST blk (PASS|FAIL)", timeout=WAIT_SEC * 2)
        # A used ring left as an earlier pass copied it shows as a stall: the guest waits for a
        # completion the device already gave.
        assert checked(r.output, "the device kept completing requests"), r.output[-2000:]
        assert checked(r.output, "every sector read carries its own number"), r.output[-2000:]
        assert "TENBOX-GUEST blk PASS" in r.output, r.output[-2000:]
        r.wait_exit(WAIT_SEC)


def one_line_refusal(p):
    rc = p.wait_exit(WAIT_SEC)
    err = p.errors.strip()
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1, err
    assert p.output == ""
    return err


def test_hostile_snapshot_files_refuse_to_load_with_one_line(spawn, counted_snapshot, tmp_path):
    snap, _ = counted_snapshot
    cut = tmp_path / "cut.snap"
    with open(str(snap), "rb") as src, open(str(cut), "wb") as dst:
        dst.write(src.read(os.path.getsize(str(snap)) // 2))
    assert "truncated" in one_line_refusal(restore(spawn, cut))

    other = tmp_path / "v9.snap"
    shutil.copy(str(snap), str(other))
    with open(str(other), "r+b") as f:
        f.seek(8)
        f.write((9).to_bytes(4, "little"))
    assert "snapshot format version 9" in one_line_refusal(restore(spawn, other))

    err = one_line_refusal(restore(spawn, snap, "--memory", "128"))
    assert "memory size mismatch: the snapshot has 64 MiB of RAM, the VM 128 MiB" in err

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    err = one_line_refusal(restore(spawn, snap, "--disk", "%s,format=raw" % disk))
    assert "the snapshot has 0 virtio devices (none), this VM 1 (blk)" in err


def test_a_guest_reset_after_a_restore_without_a_kernel_ends_the_vm_with_the_reason(spawn, snap_dir):
    """Nothing to boot again: the machine says so instead of running garbage."""
    snap = snap_dir / "reset.snap"
    p = spawn(boot_argv(guest_path("echo"), memory_mb=64) + ["--snapshot-out", str(snap)])
    p.wait_for(r"echo: ready", timeout=WAIT_SEC)
    p.signal(SNAPSHOT_SIGNAL)
    p.wait_for_stderr(r"snapshot \S+ written", timeout=WAIT_SEC)
    p.send("hello\n")
    p.wait_for(r"^echo: hello$", timeout=WAIT_SEC)  # the guest still answers after its snapshot
    p.stop(10)
    r = restore(spawn, snap)
    r.send("again\n")
    r.wait_for(r"^echo: again$", timeout=WAIT_SEC)  # the restored guest takes console input
    r.send("reboot\n")
    assert r.wait_exit(WAIT_SEC) == 2
    assert "no kernel to boot" in r.errors


class FakeSupervisor:
    """The ROUTER end of the worker link, as tenboxd binds it: enough to send commands and read replies."""

    def __init__(self, folder):
        import zmq

        self.zmq = zmq
        self.endpoint = "ipc://%s/link.sock" % folder
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        os.chmod("%s/link.sock" % folder, 0o666)  # connecting takes write permission on the socket
        self.peer = None
        self.introduced = False

    def receive(self, timeout):
        from tenbox_vmm.protocol.link import decode

        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError("the worker said nothing for %.0f s" % timeout)
        peer, frame = self.sock.recv_multipart()
        self.peer = peer
        return decode(frame)

    def wait_for(self, kind, timeout=WAIT_SEC):
        import time

        from tenbox_vmm.protocol.link import Hello, Who, encode

        deadline = time.monotonic() + timeout
        while True:
            msg = self.receive(max(0.1, deadline - time.monotonic()))
            if isinstance(msg, Hello):
                self.introduced = True
            elif not self.introduced:  # as tenboxd does: whoever speaks first is asked who it is
                self.sock.send_multipart([self.peer, encode(Who())])
            if isinstance(msg, kind):
                return msg
            if time.monotonic() > deadline:
                raise AssertionError("no %s from the worker" % kind.__name__)

    def command(self, req_id, name, args):
        from tenbox_vmm.protocol.link import Command, encode

        self.sock.send_multipart([self.peer, encode(Command(req_id, name, args))])

    def close(self):
        self.sock.close()


def test_the_worker_links_snapshot_command_writes_the_file_and_replies_once_it_is_in_place(spawn, snap_dir,
                                                                                          tmp_path):
    """What tenboxd will ask: `snapshot` with a name; the reply names the file, which restores."""
    from tenbox_vmm.protocol.link import CommandName, Hello, Reply

    link_dir = tmp_path / "link"
    link_dir.mkdir()
    os.chmod(str(link_dir), 0o777)  # the worker connects as its worker user when run as root
    sup = FakeSupervisor(link_dir)
    try:
        p = spawn(boot_argv(guest_path("count"), cmdline="console=ttyS0 count.ms=50", memory_mb=64)
                  + ["--link", sup.endpoint, "--vm-id", "snapvm", "--snapshot-dir", str(snap_dir)])
        sup.wait_for(Hello)
        sup.command(1, CommandName.SNAPSHOT, {"name": "../escape"})
        bad = sup.wait_for(Reply)
        assert (bad.id, bad.ok) == (1, False) and "[A-Za-z0-9-]{1,64}" in bad.error
        sup.command(2, CommandName.SNAPSHOT, {"name": "warm"})
        reply = sup.wait_for(Reply)
        assert (reply.id, reply.ok) == (2, True), reply
        path = snap_dir / "warm.snap"
        assert reply.result["path"] == str(path) and reply.result["file_bytes"] == os.path.getsize(str(path))
        assert reply.result["paused_ms"] >= 0
        assert os.listdir(str(snap_dir)) == ["warm.snap"]
        sup.command(3, CommandName.STOP, {"reason": "test"})
        assert p.wait_exit(WAIT_SEC) == 3
    finally:
        sup.close()
    r = restore(spawn, path)
    r.wait_for(r"^count: \d+$", timeout=WAIT_SEC)
    assert r.stop(10) == 3


def test_a_snapshot_asked_for_as_the_vm_stops_is_answered_before_the_worker_exits(spawn, snap_dir, tmp_path):
    """A snapshot command followed at once by a stop: the reply comes either way (the file, or why not)."""
    from tenbox_vmm.protocol.link import CommandName, ConsoleData, Hello, Reply, WorkerExit

    link_dir = tmp_path / "link"
    link_dir.mkdir()
    os.chmod(str(link_dir), 0o777)
    sup = FakeSupervisor(link_dir)
    try:
        p = spawn(boot_argv(guest_path("count"), cmdline="console=ttyS0 count.ms=50", memory_mb=64)
                  + ["--link", sup.endpoint, "--vm-id", "snapvm", "--snapshot-dir", str(snap_dir)])
        sup.wait_for(Hello)
        console = b""
        while b"count: 2\n" not in console:  # with --link the console goes over the link
            try:
                console += sup.wait_for(ConsoleData).data
            except AssertionError:
                raise AssertionError("console so far: %r; stderr: %s" % (console, p.errors))
        sup.command(1, CommandName.SNAPSHOT, {"name": "late"})
        sup.command(2, CommandName.STOP, {"reason": "test"})
        replies = {}
        while True:
            msg = sup.receive(WAIT_SEC)
            if isinstance(msg, Reply):
                replies[msg.id] = msg
            if isinstance(msg, WorkerExit):
                break
        assert 1 in replies, "the worker exited without answering the snapshot command"
        late = replies[1]
        if late.ok:
            assert os.path.exists(str(snap_dir / "late.snap"))
        else:
            # "the VM has stopped", or "the vCPUs did not pause: the guest is stopping"
            assert "late.snap not taken: " in late.error and os.listdir(str(snap_dir)) == []
        assert p.wait_exit(WAIT_SEC) == 3
    finally:
        sup.close()


def test_snapshots_one_after_the_other_are_each_written_and_the_guest_counts_on(spawn, snap_dir):
    """Three snapshots in a row, each with every vCPU parked anew; the guest counts on; the last restores."""
    snap = snap_dir / "again.snap"
    p = spawn(boot_argv(guest_path("count"), cmdline="console=ttyS0 count.ms=50", memory_mb=64, cpus=2)
              + ["--snapshot-out", str(snap)])
    p.wait_for(r"^count: 3$", timeout=WAIT_SEC)
    for n in range(1, 4):
        p.signal(SNAPSHOT_SIGNAL)
        p.wait_for_stderr(r"(?s)(snapshot \S+ written.*){%d}" % n, timeout=WAIT_SEC)
    shown = counts(p.output)[-1]
    p.wait_for(r"^count: %d$" % (shown + 2), timeout=WAIT_SEC)
    assert p.stop(10) == 3
    assert "error" not in p.errors, p.errors
    r = restore(spawn, snap)
    first = int(r.wait_for(r"^count: (\d+)$", timeout=WAIT_SEC).group(1))
    assert 3 < first <= shown + 1
    assert r.stop(10) == 3


def test_signals_sent_at_once_take_a_snapshot_every_time(spawn, snap_dir):
    """The kernel gives a signal to a vCPU thread when the main thread has one pending; Python runs the
    handler only when the main thread wakes. Without the wakeup pipe 3 runs in 8 took no snapshot."""
    snap = snap_dir / "burst.snap"
    for _ in range(4):
        p = spawn(boot_argv(guest_path("count"), cmdline="console=ttyS0 count.ms=50", memory_mb=64, cpus=2)
                  + ["--snapshot-out", str(snap)])
        p.wait_for(r"^count: 3$", timeout=WAIT_SEC)
        for _ in range(3):
            p.signal(SNAPSHOT_SIGNAL)
        p.wait_for_stderr(r"snapshot \S+ written", timeout=10)
        assert p.stop(10) == 3
