"""Snapshot benchmark: tenbox-vm-runtime's snapshot and restore against QEMU's migration to and from a file, KVM, one run.

The same guest for both: the count test guest (tests/guests `count`, 64 MiB
of RAM, `count.ms=50`), which prints `count: N` from registers and stack, so
only a faithful restore goes on counting. Measured, interleaved, --runs
times each:

  * snapshot: the guest booted, counting; at `count: 5` it is saved to a
    file. paused_ms is the time the guest stood still for it, save_ms the
    time the save took. tenbox: SIGRTMIN+1 with --snapshot-out, its own
    "guest paused N ms" line (it saves with the guest stopped: both
    figures). QEMU: on its monitor `migrate "exec:cat > FILE"` while the
    guest runs, then `info migrate` until completed: its `downtime` and
    `total time` (a live migration's last pass stops the guest; the file
    says the guest was running, so a restore runs it);
  * the file: its length and the bytes it takes on disk;
  * restore: process start -> the first count line of the restored guest.
    tenbox: `--restore FILE`; QEMU: the same machine options with
    `-incoming "exec:cat FILE"` (it runs the guest when the load ends).

Prints medians and tenbox/QEMU ratios as a markdown table. Root: tenbox's
worker writes the snapshot as its sandbox user.

    python3 -m bench.snapshot [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from bench.common import interleave, median, table
from tests.framework import qemu
from tests.framework.guests import guest_path
from tests.framework.process import ConsoleProcess
from tests.framework.runtime import boot_argv, runtime_argv

MEM_MB = 64
CMDLINE = "console=ttyS0 count.ms=10"  # the restored guest's first line comes within 10 ms of its resume
COUNT = r"^count: (\d+)$"
SNAPSHOT_SIGNAL = signal.SIGRTMIN + 1
WAIT_SEC = 60.0
MONITOR_SEC = 30.0


class Monitor:
    """QEMU's human monitor on a unix socket: one command, its answer up to the next prompt."""

    PROMPT = b"(qemu) "

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + MONITOR_SEC
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.sock.settimeout(MONITOR_SEC)
        self._until_prompt()

    def _until_prompt(self) -> str:
        buf = b""
        while not buf.endswith(self.PROMPT):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("QEMU's monitor closed: %r" % buf[-200:])
            buf += chunk
        return buf.decode(errors="replace")

    def run(self, command: str) -> str:
        self.sock.sendall(command.encode() + b"\n")
        return self._until_prompt()

    def quit(self) -> None:
        self.sock.sendall(b"quit\n")  # no prompt follows: QEMU ends, and the socket with it
        while self.sock.recv(4096):
            pass

    def close(self) -> None:
        self.sock.close()


def _file_figures(path: Path) -> Dict[str, float]:
    st = path.stat()
    return {"file_mib": st.st_size / (1 << 20), "file_alloc_mib": st.st_blocks * 512 / (1 << 20)}


def tenbox_snapshot(folder: Path) -> Dict[str, float]:
    snap = folder / "tenbox.snap"
    if snap.exists():
        snap.unlink()
    argv = boot_argv(guest_path("count"), cmdline=CMDLINE, memory_mb=MEM_MB) + ["--snapshot-out", str(snap)]
    with ConsoleProcess(argv, stdin=subprocess.DEVNULL) as p:
        p.wait_for(r"^count: 5$", WAIT_SEC)
        p.signal(SNAPSHOT_SIGNAL)
        m = p.wait_for_stderr(r"snapshot \S+ written: .* guest paused (\d+) ms", WAIT_SEC)
        p.stop(10)
    paused = float(m.group(1))
    return dict(_file_figures(snap), paused_ms=paused, save_ms=paused)  # tenbox saves with the guest stopped


def qemu_machine(folder: Path, monitor: Path) -> List[str]:
    argv = qemu.microvm(guest_path("count"), append=CMDLINE, memory_mb=MEM_MB)
    argv[argv.index("-monitor") + 1] = "unix:%s,server=on,wait=off" % monitor
    return argv


def qemu_snapshot(folder: Path) -> Dict[str, float]:
    snap = folder / "qemu.snap"
    mon = folder / "monitor.sock"
    for f in (snap, mon):
        if f.exists():
            f.unlink()
    with ConsoleProcess(qemu_machine(folder, mon), stdin=subprocess.DEVNULL) as p:
        p.wait_for(r"^count: 5$", WAIT_SEC)
        m = Monitor(mon)
        try:
            m.run('migrate "exec:cat > %s"' % snap)  # live: the file's run state says running
            while True:
                state = m.run("info migrate")
                if re.search(r"^Migration status: completed", state, re.M):
                    break
                if re.search(r"^Migration status: failed", state, re.M):
                    raise RuntimeError("QEMU's migration to a file failed: %s" % state)
                time.sleep(0.001)
            m.quit()
        finally:
            m.close()
        p.wait_exit(10)
    downtime = re.search(r"^downtime: (\d+) ms", state, re.M)
    total = re.search(r"^total time: (\d+) ms", state, re.M)
    if not downtime or not total:
        raise RuntimeError("QEMU's info migrate gave no downtime or total time: %s" % state)
    return dict(_file_figures(snap), paused_ms=float(downtime.group(1)), save_ms=float(total.group(1)))


def restore_case(argv: List[str]):
    def run() -> Dict[str, float]:
        with ConsoleProcess(argv, stdin=subprocess.DEVNULL) as p:
            first = p.seconds_to(COUNT, WAIT_SEC)
            n = int(p.wait_for(COUNT, WAIT_SEC).group(1))
            if n <= 5:
                p.fail("restored at count %d: the guest was snapshotted at 5" % n)
            p.kill()
        return {"restore_first_line_ms": first * 1000}
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench.snapshot: run it as root (the worker writes its snapshot as its sandbox user)", file=sys.stderr)
        return 2
    from tenbox_vmm.protocol.sandbox import worker_user

    with tempfile.TemporaryDirectory(prefix="tenbox-bench-snap-") as tmp:
        folder = Path(tmp)
        os.chmod(tmp, 0o755)
        who = worker_user()
        os.chown(tmp, who.uid, who.gid)
        results = interleave(args.runs, {
            "tenbox": lambda: tenbox_snapshot(folder),
            "qemu": lambda: qemu_snapshot(folder),
        })
        restored = interleave(args.runs, {
            "tenbox": restore_case(runtime_argv("--restore", str(folder / "tenbox.snap"), "--console", "stdio")),
            "qemu": restore_case(qemu_machine(folder, folder / "restore-monitor.sock")
                                 + ["-incoming", "exec:cat %s" % (folder / "qemu.snap")]),
        })
    for name in results:
        results[name].update(restored[name])

    rows = []
    for metric, unit, better in (
        ("paused_ms", "ms", "lower"),
        ("save_ms", "ms", "lower"),
        ("file_mib", "MiB", "lower"),
        ("file_alloc_mib", "MiB", "lower"),
        ("restore_first_line_ms", "ms", "lower"),
    ):
        t, q = median(results["tenbox"][metric]), median(results["qemu"][metric])
        rows.append((metric, "%.1f %s" % (t, unit), "%.1f %s" % (q, unit), "%.2f" % (t / q) if q else "-", better))
    print("snapshot benchmark: %d runs each, interleaved; medians; count guest, %d MiB of RAM" % (args.runs, MEM_MB))
    print(table(rows, ("metric", "tenbox", "QEMU microvm (KVM)", "tenbox/QEMU", "better")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
