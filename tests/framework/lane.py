"""The nested test lane: stock Linux under tenbox's own KVM, inside QEMU's emulated AMD-V (tests and bench; root).

Hosts without vmx/svm (the development and CI machines, whose /dev/kvm
emulates guest kernel code, see docs/testing.md) cannot run a stock Linux
guest in useful time. QEMU's software emulator (TCG) implements AMD-V with
nested paging, so KVM works inside a QEMU TCG machine. The lane is that
machine:

- Debian's generic kernel (`linux-image-amd64`: it ships kvm.ko and
  kvm-amd.ko) from scripts/x86_64/get-kernel.sh --flavour generic, and a
  busybox initramfs whose /init is scripts/x86_64/lane-init;
- `qemu-system-x86_64 -M pc -accel tcg -cpu max` (svm and npt), the build
  host's / shared read-only over virtio-9p with a tmpfs overlay, so the
  checkout and every installed tool run unchanged inside;
- a second, writable 9p share (`out`, /lane-out inside) for results.

`run()` boots it for one command and returns the command's exit code and
the lane's console. Timings inside are a proxy (every exit crosses emulated
AMD-V): compare ratios, never absolute times.

By hand, from the repository root (root needed for nothing but reading
files the tests read):

    python3 -m tests.framework.lane -- python3 -m pytest -q tests/integration/test_linux_tenbox.py
    python3 -m tests.framework.lane --shell      # an interactive shell in the lane
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from tests.framework import qemu
from tests.framework.linux_guest import SCRIPTS
from tests.framework.repo import CACHE, PYTHON, REPO

LANE_DIR = CACHE / "lane"
KERNEL_DIR = LANE_DIR / "kernel"
INITRAMFS = LANE_DIR / "initramfs.cpio.gz"
# The end-to-end tests' Debian image (built on the build host, imported in the lane) and its key.
E2E_IMAGE_DIR = CACHE / "images" / "lane-e2e"
SSH_DIR = LANE_DIR / "ssh"

# virtio-pci carries the 9p shares; overlay puts a tmpfs over the read-only
# share; kvm-amd is the point of the lane.
MODULES = "virtio_pci 9p 9pnet_virtio overlay kvm_amd"
# Two vCPUs, one per core (MTTCG gives each a host thread). One vCPU was tried on 2026-12-06
# against the stack guard panics of two (docs/testing.md, "What the lane's failures were"): it
# wedged in 3 of 4 lanes, where two vCPUs wedge less often; _WedgeCheck finds a wedge in
# about a minute either way. The run itself is on the last one alone (lane-init's lane.cpu=),
# the other takes the device interrupts.
CPUS = 2
MEMORY_MB = 4096  # half of it is the overlay's tmpfs
WATCH_SEC = 5.0  # how often run() asks its watchdog and looks at the lane's interrupts
# A lane vCPU whose local APIC has held the same pending interrupt for this long has wedged: the
# emulator no longer delivers it (seen 2026-12-06: a halted CPU with its timer pending, and a CPU
# looping in one instruction of the nested guest). A normal CPU takes it within microseconds.
WEDGE_SEC = 60.0
SCRIPT_TIMEOUT_SEC = 900  # the first get-kernel.sh run downloads ~70 MB
BOOT_DEADLINE_SEC = 120.0  # up to the command: ~8 s on the development machines
CONSOLE_KEEP_CHARS = 1 << 20  # the console kept in memory; the log file has all of it
EXIT_LANE_FAILED = 125  # the CLI's exit code when the lane itself failed
MONITOR = "monitor.sock"
HANG_REPORT = "hang.txt"
# The lane mounts these afresh (lane-init): a checkout under one of them is not there.
LANE_OWN_DIRS = ("/tmp", "/run", "/dev", "/proc", "/sys")

_UP = re.compile(r"LANE: up ")  # anywhere in its line: the firmware's screen escapes come before it
_RC = re.compile(r"^LANE: rc=(\d+)\s*$", re.M)
_ERROR = re.compile(r"^LANE: error: (.*)$", re.M)
# The lane kernel's own oops or panic: its first line says what (the console kept is only its tail).
_OOPS = re.compile(r"\] (BUG: .*|Kernel panic - not syncing: .*|general protection fault.*)$")


class LaneError(Exception):
    """The lane could not be built or booted; the message is one line for people."""


def has_hw_virt() -> bool:
    """True where the CPU has vmx or svm: stock Linux guests run directly here."""
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"^flags\s*:.*\b(vmx|svm)\b", f.read(), re.M) is not None
    except OSError:
        return False


def in_lane() -> bool:
    """True inside the lane (lane-init sets TENBOX_LANE=inner)."""
    return os.environ.get("TENBOX_LANE") == "inner"


def needs_lane() -> bool:
    """Tests that need hardware virtualization run in the lane here."""
    return not has_hw_virt() and not in_lane()


_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=,+@")


def _encode(text: str) -> str:
    """%-encode for the kernel command line (lane-init decodes): no spaces, quotes or non-ASCII."""
    return "".join(chr(b) if b in _PLAIN else "%%%02x" % b for b in text.encode())


def _run_script(argv: Sequence[str]) -> None:
    try:
        r = subprocess.run(list(argv), cwd=str(REPO), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=SCRIPT_TIMEOUT_SEC)
    except subprocess.TimeoutExpired:
        raise LaneError("%s did not finish within %d s" % (Path(argv[0]).name, SCRIPT_TIMEOUT_SEC)) from None
    if r.returncode != 0:
        last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or ["exit %d" % r.returncode]
        raise LaneError("%s failed: %s" % (Path(argv[0]).name, last[0]))


def build() -> None:
    """The lane's kernel and initramfs from Debian's packages (cached: a no-op when nothing changed)."""
    if shutil.which(qemu.QEMU) is None:
        raise LaneError("%s not found: the nested lane needs Debian's qemu-system-x86 (make deps)" % qemu.QEMU)
    _run_script([str(SCRIPTS / "get-kernel.sh"), "--flavour", "generic", "--out", str(KERNEL_DIR),
                 "--modules", MODULES])
    _run_script([str(SCRIPTS / "make-initramfs.sh"), "--kernel-dir", str(KERNEL_DIR),
                 "--init", str(SCRIPTS / "lane-init"), "--out", str(INITRAMFS)])


def ssh_key() -> Path:
    """The e2e image's SSH key pair (private key path; .pub beside it), made once with ssh-keygen."""
    key = SSH_DIR / "id_ed25519"
    if not key.exists():
        if shutil.which("ssh-keygen") is None:
            raise LaneError("ssh-keygen not found: install openssh-client (make deps)")
        SSH_DIR.mkdir(parents=True, exist_ok=True)
        os.chmod(str(SSH_DIR), 0o700)
        tmp = SSH_DIR / "id_ed25519.new"
        for f in (tmp, Path(str(tmp) + ".pub")):
            if f.exists():
                f.unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tenbox-lane", "-f", str(tmp)],
                       check=True, stdin=subprocess.DEVNULL)
        os.replace(str(tmp) + ".pub", str(key) + ".pub")
        os.replace(str(tmp), str(key))
    return key


def build_e2e_image() -> Path:
    """`tenbox image build debian --no-import` of the e2e image with ssh_key() (cached by the script's stamp)."""
    key = ssh_key()
    argv = [PYTHON, "-m", "tenbox_ctl", "image", "build", "debian", "--layout", "plain", "--name", "e2e",
            "--ssh-key", str(key) + ".pub", "--out", str(E2E_IMAGE_DIR), "--no-import"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        r = subprocess.run(argv, cwd=str(REPO), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           env=env, timeout=1800)
    except subprocess.TimeoutExpired:
        raise LaneError("tenbox image build debian did not finish within 1800 s") from None
    if r.returncode != 0:
        last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1:] or ["exit %d" % r.returncode]
        raise LaneError("tenbox image build debian failed: %s" % last[0])
    return E2E_IMAGE_DIR


def qemu_argv(command: str, out_dir: Path, cwd: Path = REPO, cpus: int = CPUS,
              memory_mb: int = MEMORY_MB, accel: str = "tcg", binary: Sequence[str] = (qemu.QEMU,),
              pin: bool = True) -> List[str]:
    """QEMU's command line for a lane that runs `command` (a shell command line) in `cwd`.

    `accel` may be "tcg,thread=single": one host thread for all the lane's
    vCPUs instead of one each (MTTCG), to tell emulation races from guest bugs.
    `pin`: the command runs on the lane's last CPU alone (lane-init's lane.cpu=, which says why).
    """
    append = "console=ttyS0 panic=-1 quiet lane.cwd=%s lane.run=%s" % (_encode(str(cwd)), _encode(command))
    if pin and cpus > 1:
        append += " lane.cpu=%d" % (cpus - 1)
    if len(append) > 2000:  # COMMAND_LINE_SIZE is 2048 on x86
        raise LaneError("the lane's command is too long for the kernel command line; put it in a script")
    shares = [
        "-virtfs", "local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs", "local,path=%s,mount_tag=out,security_model=passthrough" % out_dir,
    ]
    # -cpu max: AMD-V with nested paging, which TCG emulates. The monitor is
    # for a look inside a lane that hangs (monitor_command).
    return qemu.pc(KERNEL_DIR / "vmlinuz", INITRAMFS, append, memory_mb=memory_mb, cpus=cpus, cpu="max",
                   devices=shares, accel=accel, binary=binary, monitor=str(out_dir / MONITOR))


def monitor_command(out_dir: Path, command: str, timeout: float = 10.0) -> str:
    """One human-monitor command to the running lane whose share is out_dir; its answer."""
    import socket

    def read_prompt(sock: "socket.socket") -> str:
        data = b""
        while not data.endswith(b"(qemu) "):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "replace")

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(out_dir / MONITOR))
        read_prompt(sock)
        sock.sendall(command.encode() + b"\n")
        answer = read_prompt(sock)
    lines = answer.replace("\r", "").splitlines()
    return "\n".join(ln for ln in lines if not ln.startswith("(qemu)") and ln.strip() != command)


class LaneResult(NamedTuple):
    rc: Optional[int]  # the command's exit code; None when the lane failed before or while running it
    reason: str  # why the lane failed, one line; empty when rc is set
    console: str  # the lane's console (the last CONSOLE_KEEP_CHARS of it)
    elapsed: float


def run(command: str, out_dir: Path, deadline_sec: float, console_log: Optional[Path] = None,
        echo: Optional[Callable[[str], None]] = None, cwd: Path = REPO, cpus: int = CPUS,
        memory_mb: int = MEMORY_MB, accel: str = "tcg", binary: Sequence[str] = (qemu.QEMU,),
        watchdog: Optional[Callable[[], Optional[str]]] = None, arch: str = "x86_64", gic: str = "3",
        pin: bool = True) -> LaneResult:
    """Boot the lane, run `command` in it, power it off; never longer than deadline_sec.

    `arch` "aarch64" boots the arm64 lane instead (lane_arm64.py, with GIC version `gic`):
    an emulated EL2 host with a Debian arm64 userland, this checkout mounted at its path.

    The console goes to console_log (all of it) and, line by line, to echo.
    `watchdog`, asked every WATCH_SEC, says why the lane is to be taken as
    hung (a reason) or nothing: the lane is killed at once, its vCPUs'
    registers kept, rather than at the deadline. `pin` (x86 lanes): the
    command on one CPU, see qemu_argv.
    """
    real = os.path.realpath(str(cwd))
    for d in LANE_OWN_DIRS:
        if real == d or real.startswith(d + "/"):
            raise LaneError("the checkout is under %s, which the lane mounts afresh: "
                            "run the tests from a checkout elsewhere" % d)
    if arch == "aarch64":
        from tests.framework import lane_arm64

        try:
            lane_arm64.build()
            argv = lane_arm64.qemu_argv("panic=-1 quiet lane.cwd=%s lane.run=%s lane.repo=%s" % (
                _encode(str(cwd)), _encode(command), _encode(str(REPO))), out_dir, cpus, memory_mb, gic)
        except lane_arm64.LaneArm64Error as e:
            raise LaneError(str(e)) from None
        argv += ["-monitor", "unix:%s,server=on,wait=off" % (out_dir / MONITOR)]
    else:
        build()
        argv = qemu_argv(command, out_dir, cwd, cpus, memory_mb, accel, binary, pin)
    started = time.monotonic()
    log = open(str(console_log), "w", encoding="utf-8", errors="replace") if console_log else None
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    kept: List[str] = []
    kept_chars = 0
    seen: Dict[str, object] = {"up": False, "oops": ""}  # over the whole console, not only the tail kept
    done = threading.Event()

    def pump() -> None:
        nonlocal kept_chars
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").replace("\r", "")
            _note(seen, line)
            if log:
                log.write(line)
                log.flush()
            if echo:
                echo(line.rstrip("\n"))
            kept.append(line)
            kept_chars += len(line)
            while kept_chars > CONSOLE_KEEP_CHARS and len(kept) > 1:
                kept_chars -= len(kept.pop(0))
        done.set()

    reader = threading.Thread(target=pump, name="lane-console", daemon=True)
    reader.start()
    timed_out = False
    stalled = ""
    ends = started + deadline_sec
    stuck = _WedgeCheck(out_dir, cpus) if arch == "x86_64" else None  # it reads x86 registers and LAPICs
    try:
        while True:
            try:
                proc.wait(timeout=max(0.0, min(WATCH_SEC, ends - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= ends:
                timed_out = True
            else:
                stalled = ((stuck.check(time.monotonic()) if stuck else "")
                           or (watchdog() if watchdog is not None else "") or "")
            if timed_out or stalled:
                _record_hang(out_dir)
                break
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        done.wait(10)
        if log:
            log.close()
    console = "".join(kept)
    if stalled:
        return LaneResult(None, "the lane stalled: %s (its vCPUs' registers: %s)" % (stalled, out_dir / HANG_REPORT),
                          console, time.monotonic() - started)
    return _result(console, seen, timed_out, proc.returncode, deadline_sec, out_dir, time.monotonic() - started)


def pending_interrupts(lapic: str) -> str:
    """The IRR line of `info lapic`: the vectors waiting for delivery ("" for none)."""
    for line in lapic.splitlines():
        if line.startswith("IRR"):
            vectors = line[3:].strip()
            return "" if vectors == "(none)" else vectors
    return ""


_CPU_STATE = re.compile(r"^RIP=([0-9a-f]+) .*HLT=(\d)", re.M)


def running_rips(registers: str) -> List[str]:
    """Per vCPU of `info registers -a`, its RIP, or "" for a halted vCPU."""
    return [rip if halted == "0" else "" for rip, halted in _CPU_STATE.findall(registers)]


class _WedgeCheck:
    """Each lane vCPU, looked at through the monitor: a reason once one has held the same pending
    interrupts, or has run at one RIP without halting, for WEDGE_SEC (both seen in wedged lanes;
    a working vCPU takes an interrupt within microseconds, and a sampled RIP moves)."""

    def __init__(self, out_dir: Path, cpus: int) -> None:
        self.out_dir, self.cpus = out_dir, cpus
        self.since: Dict[Tuple[str, int], Tuple[str, float]] = {}

    def _same_for(self, key: Tuple[str, int], value: str, now: float) -> float:
        """How long `value` (non-empty) has been what `key` shows; 0 when it just changed."""
        held = self.since.get(key)
        if not value:
            self.since.pop(key, None)
            return 0.0
        if held is None or held[0] != value:
            self.since[key] = (value, now)
            return 0.0
        return now - held[1]

    def check(self, now: float) -> str:
        try:
            rips = running_rips(monitor_command(self.out_dir, "info registers -a"))
            lapics = [pending_interrupts(monitor_command(self.out_dir, "info lapic %d" % cpu))
                      for cpu in range(self.cpus)]
        except OSError:
            return ""  # no monitor (yet, or any more): the deadline and the watchdog still hold
        for cpu, pending in enumerate(lapics):
            held = self._same_for(("irr", cpu), pending, now)
            if held >= WEDGE_SEC:
                return "its vCPU %d has held interrupt vector(s) %s pending for %.0f s (the emulator wedged)" % (
                    cpu, pending, held)
        for cpu, rip in enumerate(rips):
            held = self._same_for(("rip", cpu), rip, now)
            if held >= WEDGE_SEC:
                return "its vCPU %d has run at RIP %s for %.0f s without halting (the emulator wedged)" % (
                    cpu, rip, held)
        return ""


def _note(seen: Dict[str, object], line: str) -> None:
    """What the whole console said, line by line: whether the lane came up, its kernel's first oops."""
    seen["up"] = seen["up"] or bool(_UP.search(line))
    oops = _OOPS.search(line.rstrip("\n"))
    if oops and not seen["oops"]:
        seen["oops"] = oops.group(1)[:200]


def _result(console: str, seen: Dict[str, object], timed_out: bool, qemu_rc: Optional[int], deadline_sec: float,
            out_dir: Path, elapsed: float) -> LaneResult:
    """The command's exit status from the console's tail, or why there is none, in one line."""
    m = _RC.search(console)
    if m and not timed_out:
        return LaneResult(int(m.group(1)), "", console, elapsed)
    err = _ERROR.search(console)
    if err:
        reason = "the lane failed: %s" % err.group(1)
    elif timed_out:
        where = "running the command" if seen["up"] else "booting"
        reason = "the lane passed its deadline of %.0f s while %s (its vCPUs' registers: %s)" % (
            deadline_sec, where, out_dir / HANG_REPORT)
    elif seen["oops"]:
        reason = "the lane's own kernel died %s: %s (QEMU exit %s)" % (
            "running the command" if seen["up"] else "booting", seen["oops"], qemu_rc)
    elif not seen["up"]:
        reason = "the lane's kernel did not come up (QEMU exit %s)" % qemu_rc
    else:
        reason = "the lane ended without the command's exit code (a kernel panic? QEMU exit %s)" % qemu_rc
    return LaneResult(None, reason, console, elapsed)


def _record_hang(out_dir: Path) -> None:
    """Before a lane that passed its deadline is killed: where its vCPUs are, into HANG_REPORT."""
    parts = []
    for command in ("info cpus", "info registers -a"):
        try:
            parts.append("(qemu) %s\n%s" % (command, monitor_command(out_dir, command)))
        except OSError as e:
            parts.append("(qemu) %s: %s" % (command, e))
    (out_dir / HANG_REPORT).write_text("\n".join(parts) + "\n")


def tail(console: str, lines: int = 60) -> str:
    return "\n".join(console.rstrip("\n").splitlines()[-lines:])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.framework.lane",
                                description="Run a command in the nested test lane (QEMU TCG with AMD-V, "
                                            "the build host's files over 9p).")
    p.add_argument("--cpus", type=int, default=CPUS, help="the lane's vCPUs (default %(default)s)")
    p.add_argument("--memory", type=int, default=MEMORY_MB, help="the lane's RAM in MiB (default %(default)s)")
    p.add_argument("--deadline", type=float, default=3600.0, help="seconds before the lane is killed")
    p.add_argument("--out", type=Path, help="the folder shared as /lane-out (default: a new temporary folder)")
    p.add_argument("--shell", action="store_true", help="an interactive shell in the lane (leave it to power off)")
    p.add_argument("--qemu", type=shlex.split, default=[qemu.QEMU], help=argparse.SUPPRESS)
    p.add_argument("--arch", choices=("x86_64", "aarch64"), default="x86_64",
                   help="aarch64: the arm64 lane (emulated EL2, a Debian arm64 userland)")
    p.add_argument("--gic", choices=("3", "2"), default="3", help="the arm64 lane's GIC version")
    p.add_argument("--single-thread", action="store_true",
                   help="emulate every lane vCPU on one host thread (TCG without MTTCG)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="x86: let the command run on every lane CPU (by default it runs on the last alone)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if args.shell == bool(command):
        p.error("give either --shell or a command after --")
    out = args.out or Path(tempfile.mkdtemp(prefix="tenbox-lane-"))
    out.mkdir(parents=True, exist_ok=True)
    accel = "tcg,thread=single" if args.single_thread else "tcg"
    try:
        if args.shell:
            build()
            argv_ = qemu_argv("exec /bin/sh -i", out, cpus=args.cpus, memory_mb=args.memory, accel=accel,
                              binary=args.qemu, pin=args.pin)
            return subprocess.call(argv_)
        shell_cmd = " ".join(shlex.quote(a) for a in command)
        res = run("export PYTHONPATH=%s; %s" % (shlex.quote(str(REPO)), shell_cmd), out, args.deadline,
                  console_log=out / "console.log", echo=print, cpus=args.cpus, memory_mb=args.memory,
                  accel=accel, binary=args.qemu, arch=args.arch, gic=args.gic, pin=args.pin)
    except LaneError as e:
        print("lane: %s" % e, file=sys.stderr)
        return EXIT_LANE_FAILED
    if res.rc is None:
        print("lane: %s (console: %s)" % (res.reason, out / "console.log"), file=sys.stderr)
        return EXIT_LANE_FAILED
    print("lane: exit %d after %.1f s (results in %s)" % (res.rc, res.elapsed, out), file=sys.stderr)
    return res.rc


if __name__ == "__main__":
    sys.exit(main())
