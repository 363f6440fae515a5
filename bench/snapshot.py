"""Snapshot benchmark: tenbox-vm-runtime's snapshot and restore against QEMU's migration to and from a file, KVM, one run.

The same guest for both: the count test guest (tests/guests `count`, 64 MiB
of RAM, `count.ms=2`), which prints `count: N` from registers and stack, so
only a faithful restore goes on counting. Measured, interleaved, --runs
times each:

  * snapshot: the guest booted, counting; at `count: 5` it is saved to a
    file. paused_ms is the time the guest stood still for it, save_ms the
    time the save took. tenbox: SIGRTMIN+1 with --snapshot-out, its own
    "guest paused N ms (saved in M ms" line (it writes RAM while the
    guest runs, then the pages written meanwhile, and pauses it for the
    last pass and the machine state). QEMU: on its monitor `migrate "exec:cat > FILE"` while the
    guest runs, then `info migrate` until completed: its `downtime` and
    `total time` (a live migration's last pass stops the guest; the file
    says the guest was running, so a restore runs it);
  * the file: its length and the bytes it takes on disk;
  * restore: process start -> the restored guest runs (its first
    instruction: tenbox's own stderr line; QEMU's `info status` polled on
    its monitor every 0.5 ms), and -> its first count line.
    tenbox: `--restore FILE`; QEMU: the same machine options with
    `-incoming "exec:cat FILE"` (it runs the guest when the load ends).

  * through tenboxd (a standby ready, as by default): a clone of one from a
    snapshot of the same guest (the source stopped once snapshotted: a
    spinning count guest would take one of the host's cores from every
    case), request -> the clone runs (its runtime.log's line, polled every
    millisecond) and -> its first count line,
    interleaved with the two restores above; and, for both tenbox ways, the
    worker's own "guest runs N ms after the worker's main()" line;
  * 10 clones at once (`vm.clone --count 10`) of the `idle` guest (it halts;
    the count guest spins between its lines, and ten of them would measure
    the cores): request -> all running, and each clone's PSS, whole and less
    its own dirtied guest pages (the private dirty pages of its snapshot
    mapping); then 10 more with the host's KSM turned on until it has made
    three full scans or for 120 s (as root, where the kernel has KSM; put back as it
    was after): the same PSS once KSM merged the pages the workers copied
    from their standby (the standby offers those, never guest RAM);
  * snapshot time and size of bigger guests (--sizes, default 256 and 2048
    MiB), tenbox against QEMU as above, fewer runs: their RAM as booted
    (untouched, as the 64 MiB guest's) and in use (`count.fill`: the guest
    writes all of its RAM from 16 MiB up before it counts, as a system
    that has run a while has, and none of it is a zero page a migration
    skips); for RAM in use also the three restores above.

Prints medians and tenbox/QEMU ratios as markdown tables. Root: tenbox's
worker writes the snapshot as its sandbox user.

    python3 -m bench.snapshot [--runs 10] [--sizes 256,2048] [--clone-runs 5]
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
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench.common import interleave, median, table
from bench.control import Daemon
from tests.framework import qemu
from tests.framework.disk_tools import qemu_img
from tests.framework.guests import guest_path
from tests.framework.process import ConsoleProcess
from tests.framework.runtime import boot_argv, runtime_argv

MEM_MB = 64
CLONES = 10
RESTORED = r"snapshot restored: the guest runs ([\d.]+) ms after the worker's main\(\)"
# A line every 2 ms: the restored guest's first line comes within 2 ms of its resume, whatever the
# moment each side's save caught it at (QEMU's live save ends ~10 ms after it starts, tenbox's pause
# begins at once: with 10 ms between lines, QEMU's restores printed at once and tenbox's ~8 ms later).
CMDLINE = "console=ttyS0 count.ms=2"
COUNT = r"^count: (\d+)$"
SNAPSHOT_SIGNAL = signal.SIGRTMIN + 1
WAIT_SEC = 60.0
KSM = Path("/sys/kernel/mm/ksm")
KSM_WAIT_SEC = 120.0
# Written while the KSM row has KSM on: what to put back. A run killed meanwhile (SIGKILL, `timeout`)
# cannot; the next run does, first thing (put_ksm_back).
KSM_WAS = Path("/run/tenbox-bench-ksm-was")


def put_ksm_back() -> None:
    """Undo what a killed run's KSM row left: KSM back as it was before that run, its merges undone."""
    try:
        was = KSM_WAS.read_text().strip()
    except OSError:
        return
    if was in ("0", "1", "2"):
        if was != "1":
            (KSM / "run").write_text("2")
        (KSM / "run").write_text(was)
        print("bench.snapshot: KSM was left on by a run that was killed; put back to %s" % was, file=sys.stderr)
    KSM_WAS.unlink()
MONITOR_SEC = 30.0


class Monitor:
    """QEMU's human monitor on a unix socket: one command, its answer up to the next prompt."""

    PROMPT = b"(qemu) "

    def __init__(self, path: Path, retry_sec: float = 0.01) -> None:
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
                time.sleep(retry_sec)
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


def in_use(memory_mb: int) -> str:
    """The count guest's command line with all of its RAM written first (what fits above 16 MiB)."""
    return "%s count.fill=%d" % (CMDLINE, memory_mb)


def tenbox_snapshot(folder: Path, memory_mb: int = MEM_MB, cmdline: str = CMDLINE) -> Dict[str, float]:
    snap = folder / "tenbox.snap"
    if snap.exists():
        snap.unlink()
    argv = boot_argv(guest_path("count"), cmdline=cmdline, memory_mb=memory_mb) + ["--snapshot-out", str(snap)]
    with ConsoleProcess(argv, stdin=subprocess.DEVNULL) as p:
        p.wait_for(r"^count: 5$", WAIT_SEC)
        p.signal(SNAPSHOT_SIGNAL)
        m = p.wait_for_stderr(r"snapshot \S+ written: .* guest paused (\d+) ms \(saved in (\d+) ms.*", WAIT_SEC)
        p.stop(10)
    return dict(_file_figures(snap), paused_ms=float(m.group(1)), save_ms=float(m.group(2)))


def qemu_machine(folder: Path, monitor: Path, memory_mb: int = MEM_MB, cmdline: str = CMDLINE) -> List[str]:
    argv = qemu.microvm(guest_path("count"), append=cmdline, memory_mb=memory_mb)
    argv[argv.index("-monitor") + 1] = "unix:%s,server=on,wait=off" % monitor
    return argv


def qemu_snapshot(folder: Path, memory_mb: int = MEM_MB, cmdline: str = CMDLINE) -> Dict[str, float]:
    snap = folder / "qemu.snap"
    mon = folder / "monitor.sock"
    for f in (snap, mon):
        if f.exists():
            f.unlink()
    with ConsoleProcess(qemu_machine(folder, mon, memory_mb, cmdline), stdin=subprocess.DEVNULL) as p:
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


def restore_case(argv: List[str], monitor: Optional[Path] = None):
    """Process start -> the restored guest runs, and -> its first count line. tenbox says when its guest
    runs on stderr; QEMU's is polled on its monitor (`monitor`, the socket its argv names): `info status`
    until running, a poll every 0.5 ms or so."""
    def run() -> Dict[str, float]:
        if monitor is not None and monitor.exists():
            monitor.unlink()  # connected to only once this QEMU has made it
        out = {}
        with ConsoleProcess(argv, stdin=subprocess.DEVNULL) as p:
            if monitor is not None:
                m = Monitor(monitor, retry_sec=0.0005)
                try:
                    while "running" not in m.run("info status"):
                        time.sleep(0.0005)
                    running = time.monotonic() - p.started
                finally:
                    m.close()
            else:
                running = p.seconds_to_stderr(RESTORED, WAIT_SEC)
                out["main_to_running_ms"] = float(p.wait_for_stderr(RESTORED, WAIT_SEC).group(1))
            first = p.seconds_to(COUNT, WAIT_SEC)
            n = int(p.wait_for(COUNT, WAIT_SEC).group(1))
            if n <= 5:
                p.fail("restored at count %d: the guest was snapshotted at 5" % n)
            out.update(restore_first_line_ms=first * 1000, restore_running_ms=running * 1000)
            p.kill()
        return out
    return run


class DaemonSource:
    """A tenboxd with a test guest (64 MiB, a qcow2 overlay of a template) snapshotted once it printed `ready`, and
    stopped: the count guest at `count: 5` (it spins between its lines), or the idle guest, which halts."""

    def __init__(self, folder: Path, guest: str = "count", cmdline: Optional[str] = CMDLINE,
                 ready: str = "count: 5", memory_mb: int = MEM_MB) -> None:
        self.d = Daemon(standby_workers=1)
        template = folder / ("template-%s.qcow2" % guest)
        qemu_img("create", "-f", "qcow2", str(template), "16M")
        extra = {"cmdline": cmdline} if cmdline else {}
        vm = self.d.call("vm.create", name="src", kernel=guest_path(guest), memory_mb=memory_mb,
                         template=str(template), **extra)
        self.id = vm["id"]
        self.d.call("vm.start", vm_id=self.id)
        self.d.wait_console(self.id, ready)
        self.d.call("vm.snapshot", vm_id=self.id, name="warm")
        self.d.call("vm.stop", vm_id=self.id)  # its clones need only the snapshot
        self.serial = 0

    def clone(self, count: int) -> Dict[str, object]:
        self.d.standby_ready()  # not timed: starts are not back to back
        self.serial += 1
        t0 = time.monotonic()
        reply = self.d.call("vm.clone", vm_id=self.id, snapshot="warm", name="c%d" % self.serial, count=count)
        reply["wall_ms"] = (time.monotonic() - t0) * 1000
        reply["t0"] = t0
        bad = [vm for vm in reply["vms"] if vm.get("state") != "running"]
        if bad:
            raise RuntimeError("clones not running: %s" % bad)
        return reply

    def drop(self, reply: Dict[str, object]) -> None:
        for vm in reply["vms"]:  # type: ignore[attr-defined]
            self.d.call("vm.stop", vm_id=vm["id"])
            self.d.call("vm.delete", vm_id=vm["id"])

    def runtime_line(self, vm_id: str) -> float:
        path = self.d.d.data_dir / "vms" / vm_id / "logs" / "runtime.log"
        m = re.search(RESTORED, path.read_text())
        if not m:
            raise RuntimeError("%s: no restore line in its runtime.log" % vm_id)
        return float(m.group(1))

    def restore_case(self):
        """Request -> the clone runs and -> its first line, its files polled while the request is under way
        (tenboxd replies once the worker's link has said so, after the guest runs)."""
        def run() -> Dict[str, float]:
            vms = self.d.d.data_dir / "vms"
            before = set(os.listdir(str(vms)))
            replies: List[Dict[str, object]] = []
            caller = threading.Thread(target=lambda: replies.append(self.clone(1)))
            caller.start()
            try:
                running = _poll_new(vms, before, "runtime.log", RESTORED)
                first = _poll_new(vms, before, "console.log", COUNT)
            finally:
                caller.join(WAIT_SEC)
            if not replies:
                raise RuntimeError("vm.clone gave no reply")
            reply = replies[0]
            vm_id = reply["vms"][0]["id"]  # type: ignore[index]
            t0 = reply["t0"]
            out = {"restore_first_line_ms": (first - t0) * 1000,  # type: ignore[operator]
                   "restore_running_ms": (running - t0) * 1000,  # type: ignore[operator]
                   "main_to_running_ms": self.runtime_line(vm_id)}
            self.drop(reply)
            return out
        return run

    def clones(self, runs: int) -> Dict[str, List[float]]:
        figures: Dict[str, List[float]] = {"wall_ms": [], "start_ms": [], "pss_mib": [], "pss_above_dirtied_mib": [],
                                           "main_to_running_ms": []}
        for _ in range(runs):
            reply = self.clone(CLONES)
            time.sleep(1.0)  # idle: a few count lines each
            figures["wall_ms"].append(reply["wall_ms"])  # type: ignore[arg-type]
            figures["start_ms"].append(reply["start_sec"] * 1000)  # type: ignore[operator]
            for vm in reply["vms"]:  # type: ignore[attr-defined]
                pss, dirtied = _pss_kib(vm["pid"], "warm.snap")
                figures["pss_mib"].append(pss / 1024)
                figures["pss_above_dirtied_mib"].append((pss - dirtied) / 1024)
                figures["main_to_running_ms"].append(self.runtime_line(vm["id"]))
            self.drop(reply)
        return figures

    def clones_with_ksm(self) -> Optional[Dict[str, List[float]]]:
        """Ten clones' PSS once the host's KSM has merged what it can (None without KSM, or not as root).

        KSM is host-wide: it is turned on for this, at its own default pace unless the operator set one,
        and put back as it was (with its merges undone if it was off). The standby's pages are offered to
        it (tenbox_vmm/standby.py), the guests' RAM is not.
        """
        try:
            was = (KSM / "run").read_text().strip()
            (KSM / "run").write_text(was)
        except OSError:
            return None
        reply = self.clone(CLONES)
        try:
            scans = int((KSM / "full_scans").read_text())
            t0 = time.monotonic()
            KSM_WAS.write_text(was)
            (KSM / "run").write_text("1")
            # Merging takes two passes over a page (KSM's unstable tree, then its stable one); three full
            # scans after the clones started cover that. KSM scans every process that offers it pages
            # (QEMU offers its guests' RAM), so on a busy host the wait ends at KSM_WAIT_SEC instead.
            while int((KSM / "full_scans").read_text()) < scans + 3 and time.monotonic() - t0 < KSM_WAIT_SEC:
                time.sleep(0.1)
            figures: Dict[str, List[float]] = {"pss_mib": [], "pss_above_dirtied_mib": [],
                                               "seconds_with_ksm_on": [time.monotonic() - t0],
                                               "ksm_full_scans_meanwhile": [int((KSM / "full_scans").read_text())
                                                                            - scans]}
            for vm in reply["vms"]:  # type: ignore[attr-defined]
                pss, dirtied = _pss_kib(vm["pid"], "warm.snap")
                figures["pss_mib"].append(pss / 1024)
                figures["pss_above_dirtied_mib"].append((pss - dirtied) / 1024)
        finally:
            if was != "1":
                (KSM / "run").write_text("2")  # unmerge what it merged, then as it was
                (KSM / "run").write_text(was)
            try:
                KSM_WAS.unlink()
            except OSError:
                pass
            self.drop(reply)
        return figures

    def close(self) -> None:
        self.d.close()


def _poll_new(vms: Path, before: set, log: str, pattern: str) -> float:
    """When `pattern` (a multi-line regular expression) was first seen in logs/`log` of a VM folder that is not
    in `before`, polled every millisecond (more often measurably slowed the restore it watches, on 2 cores)."""
    deadline = time.monotonic() + WAIT_SEC
    path = None
    while True:
        now = time.monotonic()
        if path is None:
            new = set(os.listdir(str(vms))) - before
            path = vms / new.pop() / "logs" / log if new else None
        try:
            if path is not None and re.search(pattern, path.read_text(), re.M):
                return now
        except FileNotFoundError:
            pass
        if now > deadline:
            raise RuntimeError("no new VM's %s matched %r within %.0f s" % (log, pattern, WAIT_SEC))
        time.sleep(0.001)


def _pss_kib(pid: int, ram_file: str):
    """The process's PSS, and the private dirty KiB of its mapping of `ram_file` (its own dirtied guest pages)."""
    pss = dirtied = 0
    in_ram = False
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):
                in_ram = line.rstrip().endswith(ram_file)
            elif head == "Pss:":
                pss += int(line.split()[1])
            elif head == "Private_Dirty:" and in_ram:
                dirtied += int(line.split()[1])
    return pss, dirtied


def restores_in_use(folder: Path, memory_mb: int, runs: int) -> Dict[str, Dict[str, List[float]]]:
    """Snapshot and restore of the count guest with its RAM in use (`in_use`): the same cases as the 64 MiB
    guest's, the files left by the last snapshot of each side restored."""
    cmdline = in_use(memory_mb)
    out = interleave(runs, {
        "tenbox": lambda: tenbox_snapshot(folder, memory_mb, cmdline),
        "qemu": lambda: qemu_snapshot(folder, memory_mb, cmdline),
    })
    source = DaemonSource(folder, cmdline=cmdline, memory_mb=memory_mb)
    try:
        restored = interleave(runs, {
            "tenbox": restore_case(runtime_argv("--restore", str(folder / "tenbox.snap"), "--console", "stdio")),
            "daemon": source.restore_case(),
            "qemu": restore_case(qemu_machine(folder, folder / "restore-monitor.sock", memory_mb, cmdline)
                                 + ["-incoming", "exec:cat %s" % (folder / "qemu.snap")],
                                 folder / "restore-monitor.sock"),
        })
    finally:
        source.close()
    out["daemon"] = {}
    for name in out:
        out[name].update(restored[name])
    return out


def _ratio(t: float, q: float) -> str:
    return "%.2f" % (t / q) if q else "-"


def _save_rows(prefix: str, res: Dict[str, Dict[str, List[float]]]) -> list:
    """tenbox's save against QEMU's: the pause, the time, the file."""
    rows = []
    for metric, unit in (("paused_ms", "ms"), ("save_ms", "ms"), ("file_mib", "MiB"), ("file_alloc_mib", "MiB")):
        t, q = median(res["tenbox"][metric]), median(res["qemu"][metric])
        rows.append(("%s%s" % (prefix, metric), "%.1f %s" % (t, unit), "%.1f %s" % (q, unit), _ratio(t, q)))
    return rows


def _restore_rows(prefix: str, res: Dict[str, Dict[str, List[float]]]) -> list:
    """Each tenbox way's restore against QEMU's, to the guest running and to its first line; the workers'
    own main() -> running."""
    rows = []
    for metric, what in (("restore_running_ms", "restored guest runs"),
                         ("restore_first_line_ms", "restored guest's first line")):
        q = median(res["qemu"][metric])
        for who, label in (("tenbox", "bare runtime, process start"), ("daemon", "through tenboxd, clone request")):
            t = median(res[who][metric])
            rows.append(("%s%s -> %s" % (prefix, label, what), "%.1f ms" % t, "%.1f ms" % q, _ratio(t, q)))
    for who, label in (("tenbox", "bare runtime"), ("daemon", "through tenboxd")):
        rows.append(("%s%s: worker main() -> restored guest runs" % (prefix, label),
                     "%.1f ms" % median(res[who]["main_to_running_ms"]), "-", "-"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--sizes", default="256,2048", help="guest RAM sizes (MiB) for the snapshot size table")
    ap.add_argument("--size-runs", type=int, default=3)
    ap.add_argument("--clone-runs", type=int, default=5)
    args = ap.parse_args()
    put_ksm_back()
    if os.geteuid() != 0:
        print("bench.snapshot: run it as root (the worker writes its snapshot as its sandbox user)", file=sys.stderr)
        return 2
    from tenbox_vmm.protocol.sandbox import worker_user

    sizes = [int(x) for x in args.sizes.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="tenbox-bench-snap-") as tmp:
        folder = Path(tmp)
        os.chmod(tmp, 0o755)
        who = worker_user()
        os.chown(tmp, who.uid, who.gid)
        results = interleave(args.runs, {
            "tenbox": lambda: tenbox_snapshot(folder),
            "qemu": lambda: qemu_snapshot(folder),
        })
        source = DaemonSource(folder)
        try:
            restored = interleave(args.runs, {
                "tenbox": restore_case(runtime_argv("--restore", str(folder / "tenbox.snap"), "--console", "stdio")),
                "daemon": source.restore_case(),
                "qemu": restore_case(qemu_machine(folder, folder / "restore-monitor.sock")
                                     + ["-incoming", "exec:cat %s" % (folder / "qemu.snap")],
                                     folder / "restore-monitor.sock"),
            })
        finally:
            source.close()
        idle = DaemonSource(folder, "idle", None, "idle: ready")  # clones that halt, as idle machines do
        try:
            clones = idle.clones(args.clone_runs)
            ksm = idle.clones_with_ksm()
        finally:
            idle.close()
        by_size, used = {}, {}
        for mb in sizes:
            by_size[mb] = interleave(args.size_runs, {
                "tenbox": lambda mb=mb: tenbox_snapshot(folder, mb),
                "qemu": lambda mb=mb: qemu_snapshot(folder, mb),
            })
            used[mb] = restores_in_use(folder, mb, args.size_runs)
    for name in results:
        results[name].update(restored[name])

    rows = _save_rows("", results) + _restore_rows("", restored)
    print("snapshot benchmark: %d runs each, interleaved; medians; count guest, %d MiB of RAM" % (args.runs, MEM_MB))
    print(table(rows, ("metric", "tenbox", "QEMU microvm (KVM)", "tenbox/QEMU")))
    print()
    print("%d clones of one snapshot of the idle guest through tenboxd (one standby), %d runs; medians (max)"
          % (CLONES, args.clone_runs))
    crow = [(k, "%.1f" % median(v), "%.1f" % max(v)) for k, v in clones.items()]
    print(table(crow, ("metric", "median", "max")))
    print()
    if ksm is None:
        print("(the host's KSM: not in this kernel, or not writable: no figure with it)")
    else:
        print("the same, %d clones once more, with the host's KSM on (as it was after): medians (max)" % CLONES)
        print(table([(k, "%.1f" % median(v), "%.1f" % max(v)) for k, v in ksm.items()], ("metric", "median", "max")))
    print()
    srows = [row for mb, res in by_size.items() for row in _save_rows("%d MiB guest: " % mb, res)]
    print("snapshot of bigger guests, RAM as booted: %d runs each, interleaved; medians" % args.size_runs)
    print(table(srows, ("metric", "tenbox", "QEMU microvm (KVM)", "tenbox/QEMU")))
    print()
    urows = [row for mb, res in used.items()
             for row in _save_rows("%d MiB guest: " % mb, res) + _restore_rows("%d MiB guest: " % mb, res)]
    print("bigger guests with their RAM in use (count.fill): %d runs each, interleaved; medians" % args.size_runs)
    print(table(urows, ("metric", "tenbox", "QEMU microvm (KVM)", "tenbox/QEMU")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
