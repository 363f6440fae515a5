"""tenbox-vm-runtime: run one VM in this process (worker; needs /dev/kvm).

Standalone, the guest's serial console is this process's terminal (raw
mode, Ctrl-] quits) or its stdin/stdout pipes. The exit status is an
`ExitCode` (see docs/runtime.md).
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import logging
import os
import signal
import sys
import time
from typing import Callable, List, Optional

from tenbox_vmm import __version__
from tenbox_vmm.protocol import ExitCode, Limits, VmState
from tenbox_vmm.protocol.disk_arg import DiskArg
from tenbox_vmm.protocol.sandbox import PassedFile

PROG = "tenbox-vm-runtime"
DUMP_SIGNAL = signal.SIGUSR2
# With --snapshot-out: take a snapshot and run on (`kill -s RTMIN+1 PID`). SIGUSR1 is the vCPU
# kick and SIGUSR2 the stack dump. Python runs a handler once for signals that arrive together,
# so several signals sent at once may make one snapshot.
SNAPSHOT_SIGNAL = signal.SIGRTMIN + 1
# Test hook: a smaller runtime.log rotation size (tenboxd drops TENBOX_TEST_* under systemd).
RUNTIME_LOG_MAX_ENV = "TENBOX_TEST_RUNTIME_LOG_MAX_BYTES"
LINK_HOLD_SEC = 1.0  # the worker link starts once the guest runs, or after this


class _Formatter(argparse.HelpFormatter):
    """argparse's, with the width found without shutil: argparse makes one per option it adds, and
    shutil's import (bz2, lzma) cost a boot about 1.5 ms before its guest ran."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_columns() - 2)


def _terminal_columns() -> int:
    """$COLUMNS, else stdout's terminal's width, else 80 (what shutil.get_terminal_size would say)."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(1).columns or 80
    except OSError:
        return 80


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write("%s: error: %s (see --help)\n" % (PROG, message))
        raise SystemExit(ExitCode.USAGE)


@functools.lru_cache(maxsize=None)  # built once per process: a standby's forked workers find it built
def build_parser() -> argparse.ArgumentParser:
    from tenbox_vmm.machine import DEFAULT_CMDLINE

    p = _Parser(
        prog=PROG,
        formatter_class=_Formatter,
        description="Run one tenbox VM on /dev/kvm.",
        epilog="example: %s --kernel vmlinuz --initrd initrd.img --memory 512 --cpus 2" % PROG,
    )
    p.add_argument("--kernel", metavar="PATH", help="the guest kernel: x86-64 bzImage or ELF vmlinux, arm64 Image (needed unless --restore)")
    p.add_argument("--initrd", metavar="PATH", help="initial ramdisk")
    p.add_argument("--cmdline", metavar="STR", default=DEFAULT_CMDLINE, help="kernel command line (default: %(default)s)")
    p.add_argument("--memory", type=int, metavar="MB",
                   help="guest RAM in MiB, at least %d (default %d; with --restore, the snapshot's)"
                   % (Limits.MEMORY_MIN_MB, Limits.MEMORY_DEFAULT_MB))
    p.add_argument("--cpus", type=int, metavar="N",
                   help="vCPUs, 1..%d (default 1; with --restore, the snapshot's)" % Limits.CPUS_MAX)
    p.add_argument("--restore", metavar="FILE",
                   help="start from a snapshot instead of booting: its RAM, vCPUs and devices; give the same "
                        "--disk/--net options, and --kernel if the guest may reset")
    p.add_argument("--snapshot-out", metavar="FILE",
                   help="on signal RTMIN+1, pause the guest, write a snapshot to FILE (replaced atomically) "
                        "and run on")
    p.add_argument("--snapshot-dir", metavar="DIR",
                   help="worker mode: where the link's snapshot command writes NAME.snap (passed with --fd)")
    p.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,serial=S][,format=F]",
                   help="a virtio-blk disk (raw or qcow2); repeat for more")
    p.add_argument("--net", action="store_true", help="a virtio-net card on user-mode NAT (libslirp)")
    p.add_argument("--mac", default="52:54:00:12:34:56", metavar="MAC", help="the card's MAC address")
    p.add_argument("--net-link", choices=("up", "down"), default="up", help="network link state at boot")
    p.add_argument("--hostfwd", action="append", default=[], metavar="SPEC",
                   help="host -> guest forward, e.g. tcp:127.0.0.1:2222-:22 (repeat)")
    p.add_argument("--guestfwd", action="append", default=[], metavar="SPEC",
                   help="guest -> host forward, e.g. guestfwd:10.0.2.3:80-127.0.0.1:18981 (repeat)")
    p.add_argument("--vm-id", default="vm", metavar="ID", help="name used in logs, [A-Za-z0-9-]{1,64}")
    p.add_argument("--vm-dir", metavar="DIR", help="the VM's folder (logs go under DIR/logs)")
    p.add_argument("--console", choices=("auto", "tty", "stdio", "none"), default="auto",
                   help="tty: raw terminal, Ctrl-] quits; stdio: plain pipes; none: discard; auto: tty if stdin is a terminal")
    p.add_argument("--link", metavar="ENDPOINT",
                   help="worker mode for tenboxd: connect to its ZeroMQ endpoint; the console goes over the link")
    p.add_argument("--fd", action="append", default=[], metavar="FD:PATH",
                   help="descriptor FD, inherited open, stands for file PATH (tenboxd passes a VM's files so)")
    p.add_argument("--standby", action="store_true",
                   help="for tenboxd: start ahead of need and wait on stdin (a socket) for the VM to run")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("--version", action="version", version="%s %s" % (PROG, __version__))
    return p


def _setup_logging(vm_id: str, verbose: int, vm_dir: Optional[str]) -> None:
    """Log to stderr; when stderr is the VM folder's runtime.log (tenboxd's workers), rotate it live."""
    from tenbox_vmm.logfiles import RuntimeLogHandler, stderr_runtime_log

    level = logging.WARNING - 10 * verbose
    runtime_log = stderr_runtime_log(vm_dir)
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if runtime_log:
        try:
            handler = RuntimeLogHandler(runtime_log, max_bytes=int(os.environ.get(
                RUNTIME_LOG_MAX_ENV, Limits.RUNTIME_LOG_MAX_BYTES)))
        except OSError as e:
            sys.stderr.write("%s: warning: %s is not rotated: %s\n" % (PROG, runtime_log, e.strerror))
    handler.setFormatter(logging.Formatter("%s[%s]: %%(levelname)s %%(message)s" % (PROG, vm_id)))
    logging.basicConfig(level=max(level, logging.DEBUG), handlers=[handler])


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _HostStop:
    """SIGTERM, SIGINT and SIGHUP from the start of main(): held until the machine exists, then passed on.

    Installed before anything slow (imports, opening disks, /dev/kvm), so a
    stop that comes while the worker starts ends it with ExitCode.STOPPED
    instead of the signal's default action.
    """

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self._machine = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self)

    def __call__(self, signum: int, frame) -> None:
        self.reason = "stopped by signal %s" % signal.Signals(signum).name
        if self._machine is not None:
            self._machine.stop(self.reason)

    def attach(self, machine) -> None:
        self._machine = machine  # first: a signal from here on reaches it through __call__
        if self.reason is not None:
            machine.stop(self.reason)


def _log_state(state, reason: str) -> None:
    logging.getLogger("tenbox").debug("state %s: %s", state.value, reason)


def _timed_restore(on_state: Callable, started: float) -> Callable:
    """on_state, and one line on stderr when the restored guest first runs: how long after main() began."""
    told = []

    def both(state, reason: str) -> None:
        if state == VmState.RUNNING and not told:
            told.append(1)
            sys.stderr.write("%s: snapshot restored: the guest runs %.1f ms after the worker's main()\n"
                             % (PROG, (time.monotonic() - started) * 1000))
            sys.stderr.flush()
        on_state(state, reason)

    return both


def _console_log(args) -> Optional[str]:
    return os.path.join(args.vm_dir, "logs", "console.log") if args.vm_dir else None


def _before_sandbox() -> None:
    """What every worker does before its sandbox, whatever its machine."""
    # SIGUSR2 writes every thread's Python stack to stderr (the runtime log under tenboxd):
    # where each vCPU thread is, for a VM that hangs, without stopping it. Before the
    # sandbox: registering sets up a signal stack (sigaltstack), which its filter forbids.
    faulthandler.register(DUMP_SIGNAL, all_threads=True)


def _enter_ahead(link: Optional[str]) -> str:
    """A standby's spare, before its order: the steps before the sandbox that need no machine, and the
    sandbox for workers on `link`; SandboxError if it cannot be entered."""
    from tenbox_vmm import sandbox
    from tenbox_vmm.kvm.api import open_ahead

    _before_sandbox()
    open_ahead()  # /dev/kvm, which _open_before_sandbox opens for any order, and what KVM supports
    return sandbox.enter_ahead(link)


def _open_before_sandbox(args, disks) -> None:
    """Open what the sandbox will hide: /dev/kvm always; a standalone root run's files too.

    tenboxd passes a VM's files (--fd); a standalone run as root opens the
    files its command line names now, as the operator who named them, and
    the worker uses the descriptors once it runs as the worker user. An
    error is kept and reported where the file is used, as before.
    """
    from tenbox_vmm import passed_files
    from tenbox_vmm.kvm.api import KVM_PATH

    passed_files.open_named([KVM_PATH], os.O_RDWR)
    if args.net:
        from tenbox_vmm.net.libslirp import SlirpUnavailable, open_library

        try:
            open_library()  # before the filter: a failed dlopen searches with a child process
        except SlirpUnavailable:
            pass  # kept, and reported where the NIC is made
    if args.fd or os.geteuid() != 0:
        return
    chains = [_backing_chain(d.path) for d in disks]  # read first: reading uses up passed descriptors
    passed_files.open_named([p for p in (args.kernel, args.initrd, args.restore) if p], os.O_RDONLY)
    for d, chain in zip(disks, chains):
        passed_files.open_named([d.path], os.O_RDONLY if d.read_only else os.O_RDWR)
        passed_files.open_named(chain, os.O_RDONLY)
    log_path = _console_log(args)
    if log_path:
        from tenbox_vmm.console import log_files

        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
        except OSError:
            pass  # reported when the log is opened
        passed_files.open_named(log_files(log_path), os.O_RDWR | os.O_CREAT)


def _snapshot_sizes(path: str):
    from tenbox_vmm import passed_files
    from tenbox_vmm.snapshot.fileformat import HEADER_MAX_BYTES, peek_size

    try:
        return peek_size(passed_files.read_head(path, HEADER_MAX_BYTES + 64))
    except OSError:
        return None  # the restore reports it


def _backing_chain(path: str) -> List[str]:
    from tenbox_vmm.disk import DiskError, image_info

    try:
        return [p for p, _ in image_info(path).get("backing_chain") or []]
    except (DiskError, OSError, ValueError):
        return []  # the disk's own open reports it


def main(argv: Optional[List[str]] = None) -> int:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    if args.standby:
        given = sys.argv[1:] if argv is None else argv
        if given not in (["--standby"], ["--standby", "--link", args.link], ["--standby", "--link=%s" % args.link]):
            sys.stderr.write("%s: error: --standby takes no other option than --link; its order brings them\n"
                             % PROG)
            return ExitCode.USAGE
        from tenbox_vmm import standby

        # The order's command line: an ExitCode as any worker's. With --link, a spare sandboxed ahead.
        return standby.serve(main, link=args.link, enter_ahead=_enter_ahead if args.link else None)
    if not args.kernel and not args.restore:
        sys.stderr.write("%s: error: --kernel is required (or --restore FILE) (see --help)\n" % PROG)
        return ExitCode.USAGE
    if not Limits.NAME_RE.match(args.vm_id):
        sys.stderr.write("%s: error: --vm-id must match [A-Za-z0-9-]{1,64}\n" % PROG)
        return ExitCode.USAGE
    host_stop = _HostStop()
    host_stop.install()

    from tenbox_vmm import passed_files, sandbox

    try:
        for value in args.fd:
            passed_files.add_arg(PassedFile.parse(value))
        disks = tuple(DiskArg.parse(d) for d in args.disk)
    except ValueError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return ExitCode.USAGE
    except OSError as e:
        sys.stderr.write("%s: error: --fd: %s\n" % (PROG, e.strerror))
        return ExitCode.USAGE
    _setup_logging(args.vm_id, args.verbose, args.vm_dir)  # after --fd: runtime.log's copies may be passed
    mode = args.console
    if args.link:
        mode = "none"
    elif mode == "auto":
        mode = "tty" if os.isatty(0) else "stdio"
    if mode == "tty" and not os.isatty(0):
        sys.stderr.write("%s: error: --console tty needs a terminal on stdin\n" % PROG)
        return ExitCode.USAGE

    ahead = sandbox.entered_ahead()  # a standby's spare: what comes before the sandbox is done
    if not ahead:
        _before_sandbox()
        _open_before_sandbox(args, disks)
    snapshot_dir = link_snapshot_dir = None
    try:  # the folders, held open: the sandbox hides their paths
        if args.snapshot_out:
            snapshot_dir = passed_files.open_fd(os.path.dirname(os.path.abspath(args.snapshot_out)),
                                                os.O_RDONLY | os.O_DIRECTORY)
        if args.snapshot_dir:
            link_snapshot_dir = passed_files.open_fd(args.snapshot_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        sys.stderr.write("%s: error: --snapshot-out/--snapshot-dir %s: %s\n"
                         % (PROG, args.snapshot_out or args.snapshot_dir, e.strerror))
        return ExitCode.USAGE
    memory_mb = args.memory if args.memory is not None else (0 if args.restore else Limits.MEMORY_DEFAULT_MB)
    cpus = args.cpus if args.cpus is not None else (0 if args.restore else 1)
    # The sandbox's limits follow the machine's size: a snapshot's is in its header.
    plan_memory, plan_cpus = memory_mb or Limits.MEMORY_DEFAULT_MB, cpus or 1
    if args.restore:
        sizes = _snapshot_sizes(args.restore)
        if sizes is not None:
            plan_memory = max(memory_mb, sizes[0] >> 20)
            plan_cpus = max(cpus, min(sizes[1], Limits.CPUS_MAX))
    try:
        plan = sandbox.Plan(plan_memory, plan_cpus, args.link, rename_dir_fd=snapshot_dir)
        summary = sandbox.narrow(plan) if ahead else sandbox.enter(plan)
    except sandbox.SandboxError as e:
        sys.stderr.write("%s: error: cannot enter the worker sandbox: %s\n" % (PROG, e))
        return ExitCode.SANDBOX
    logging.getLogger("tenbox").info("%s: %s", args.vm_id, summary)

    from tenbox_vmm.console import ConsoleOutput, RotatingLog, TerminalMode, fd_writer, pump_input
    from tenbox_vmm.machine import Machine, MachineConfig, MachineError, install_kick_handler

    writers = [] if mode == "none" else [fd_writer(1)]
    log_path = _console_log(args)
    if log_path:
        try:
            writers.append(RotatingLog(log_path))
        except OSError as e:
            sys.stderr.write("%s: error: cannot write the console log in %s: %s\n" % (PROG, args.vm_dir, e.strerror))
            return ExitCode.USAGE
    link = None
    if args.link:
        from tenbox_vmm.supervisor_link import SupervisorLink

        link = SupervisorLink(args.link, args.vm_id)
        if link_snapshot_dir is not None:
            link.snapshot_dir = (args.snapshot_dir, link_snapshot_dir)
        writers.append(link.console_output)
    output = ConsoleOutput(writers)
    net = None
    if args.net or args.hostfwd or args.guestfwd:
        from tenbox_vmm.machine import NetSpec

        net = NetSpec(mac=args.mac, hostfwds=tuple(args.hostfwd), guestfwds=tuple(args.guestfwd),
                      link_up=args.net_link == "up")
    config = MachineConfig(
        net=net,
        disks=disks,
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        memory_mb=memory_mb,
        cpus=cpus,
        vm_id=args.vm_id,
        restore=args.restore,
    )
    install_kick_handler()
    try:
        on_state = link.state_changed if link else _log_state
        machine = Machine(config, output, on_state=_timed_restore(on_state, started) if args.restore else on_state)
    except MachineError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return ExitCode.USAGE

    done_r, done_w = os.pipe()
    machine.add_done_callback(lambda: os.write(done_w, b"x"))
    host_stop.attach(machine)
    # SIGPWR ("power failure") presses the power button: the guest shuts down.
    def press_power_button(signum, frame) -> None:
        try:
            machine.power_button()
        except MachineError as e:
            logging.getLogger("tenbox.runtime").warning("SIGPWR: %s", e)

    signal.signal(signal.SIGPWR, press_power_button)
    if args.snapshot_out:
        def snapshot_done(result) -> None:
            sys.stderr.write("%s: %s%s\n" % (PROG, "error: " if result.error else "", result.message))
            sys.stderr.flush()

        signal.signal(SNAPSHOT_SIGNAL, lambda signum, frame: machine.request_snapshot(
            args.snapshot_out, snapshot_dir, snapshot_done))

    def detach() -> None:
        machine.stop("stopped from the console (Ctrl-])")

    # A signal the kernel hands to a vCPU thread (the main thread already has one pending)
    # would wait for the main thread's next wake-up to be handled; the wakeup pipe is one.
    signal_r, signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(signal_w, warn_on_full_buffer=False)
    input_fd = None if mode == "none" else 0
    machine.start()
    if link is not None:
        # The guest first: the link thread's set-up (ZeroMQ's context and sockets) holds the GIL
        # about 1.5 ms, which a restore would wait for. What it reports meanwhile waits queued.
        machine.wait_running(LINK_HOLD_SEC)
        link.start(machine)
    output.start()  # its flusher of partial lines: a thread, started after the guest as the link is
    sandbox.probe_forbidden_call_if_asked(lambda: machine.state == VmState.RUNNING)
    if mode == "tty":
        with TerminalMode(0):
            pump_input(input_fd, True, machine.console_input, done_r, detach, signal_r)
    else:
        pump_input(input_fd, False, machine.console_input, done_r, detach, signal_r)
    code = machine.wait()
    output.close()
    from tenbox_vmm.guest_log import flush_all

    flush_all()  # what the rate limits left out, counted
    if link is not None:
        link.join(2.0)
    logging.getLogger("tenbox").debug("%s: %d exits handled in user space", args.vm_id, machine.exits())
    level = logging.INFO if code in (ExitCode.POWEROFF, ExitCode.STOPPED) else logging.ERROR
    logging.getLogger("tenbox").log(level, "%s: exit %d (%s): %s", args.vm_id, code, code.description,
                                    machine.exit_reason)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
