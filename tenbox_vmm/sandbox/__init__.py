"""What a worker gives up before it runs a guest, after Firecracker's jailer (worker, root until it drops).

    sandbox.enter(Plan(memory_mb, cpus, link_endpoint))

(or, for a standby's spare worker, enter_ahead(link_endpoint) before the
machine is known and narrow(Plan(...)) once it is) in this order:
rlimits; then, as root, its own mount and IPC namespaces
with a root that holds only the system, its code and the link's folder
(jail.py), and the worker user with no capabilities (privileges.py); for
any user, NoNewPrivileges and not dumpable; last the seccomp filter
(seccomp_filter.py). The process must still be single-threaded, and must
hold as descriptors every VM file it will use (passed_files): once inside,
it can open none of them. The cgroup with MemoryMax and TasksMax is made
by tenboxd, which starts the worker in it. docs/security-sandbox.md has
the threat model.

A non-root worker (a per-user tenboxd, a standalone run by a member of
the kvm group) cannot make namespaces or change user: it gets the rlimits,
no capabilities, NoNewPrivileges and the seccomp filter.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict, NamedTuple, Optional, Tuple

from tenbox_vmm import memory
from tenbox_vmm.protocol.sandbox import FALLBACK_NOTE, WorkerUser, worker_user
from tenbox_vmm.sandbox import jail, libc, privileges, resources, seccomp_filter

log = logging.getLogger("tenbox.sandbox")

# The test of the seccomp filter sets this in tenboxd's environment: a worker that has it makes a
# forbidden system call once its guest runs. tenboxd under systemd never passes TENBOX_TEST_*
# variables to workers (oshost.DROP_ENV_PREFIXES), so the packaged service cannot reach it.
SECCOMP_PROBE_ENV = "TENBOX_TEST_SECCOMP_PROBE"
PROBE_WAIT_SEC = 60.0


class SandboxError(Exception):
    """The sandbox could not be entered; the message names the step. The worker must not run its guest."""


class Plan(NamedTuple):
    memory_mb: int
    cpus: int
    link_endpoint: Optional[str] = None  # ipc://...: its folder stays reachable
    # A standalone runtime's --snapshot-out folder (a descriptor): the only place it may rename in.
    rename_dir_fd: Optional[int] = None


_ahead: Optional[Tuple[Optional[str], str]] = None  # a spare's: the link it was sandboxed for, and the summary


def enter(plan: Plan) -> str:
    """Enter the sandbox; a one-line summary of what it is. SandboxError if any step fails."""
    return _enter(plan, resources.worker_rlimits(plan.memory_mb, plan.cpus))


def enter_ahead(link_endpoint: Optional[str]) -> str:
    """Enter the sandbox before the machine is known (a standby's spare worker, tenbox_vmm/standby.py), for
    workers on that link: all of it but the memory rlimit, which narrow() sets once the order names the machine.
    A one-line summary; SandboxError if any step fails."""
    global _ahead
    summary = _enter(Plan(0, 0, link_endpoint), resources.worker_rlimits(None, 0))
    _ahead = (link_endpoint, summary)
    return summary


def entered_ahead() -> bool:
    return _ahead is not None


def narrow(plan: Plan) -> str:
    """Make the sandbox entered ahead this machine's (its memory rlimit); SandboxError if the plan needs
    another sandbox than the one entered. A one-line summary."""
    assert _ahead is not None, "narrow() is for a worker that entered its sandbox ahead"
    link, summary = _ahead
    if plan.rename_dir_fd is not None:
        raise SandboxError("a worker sandboxed ahead of its order cannot rename files (--snapshot-out)")
    if jail.link_folder(plan.link_endpoint) != jail.link_folder(link):
        raise SandboxError("the worker was sandboxed ahead for the link %s, not %s" % (link, plan.link_endpoint))
    try:
        resources.apply(resources.worker_rlimits(plan.memory_mb, plan.cpus))
    except resources.LimitError as e:
        raise SandboxError(str(e)) from None
    return summary + ", ahead of its order"


def _enter(plan: Plan, rlimits: Dict[int, int]) -> str:
    if threading.active_count() != 1:
        raise SandboxError("the worker has %d threads before its sandbox: it must have one"
                           % threading.active_count())
    root = os.geteuid() == 0
    _keep_pagemap()
    try:
        resources.apply(rlimits)
        if root:
            who = worker_user()
            if who.fallback:
                log.warning("%s", FALLBACK_NOTE)
            jail.enter(jail.default_binds(jail.link_folder(plan.link_endpoint)))
            privileges.drop_to(who)
        else:
            who = WorkerUser(os.getuid(), os.getgid(), "uid %d" % os.getuid())
            privileges.clear_capabilities()
        privileges.no_new_privileges()
        privileges.check_dropped(who, root)
        seccomp_filter.install(os.getpid(), plan.rename_dir_fd)
    except (ValueError, resources.LimitError, jail.JailError, privileges.PrivilegeError,
            seccomp_filter.FilterError) as e:
        raise SandboxError(str(e)) from None
    return "sandboxed as %s (uid %d)%s, seccomp filter loaded" % (
        who.name, who.uid, ", own mount and IPC namespaces" if root else "")


def _keep_pagemap() -> None:
    """Open /proc/self/pagemap while the worker still may, for its live snapshots (GuestMemory.data_chunks:
    a first pass skips the RAM the guest never wrote). Opened without CAP_SYS_ADMIN, so it shows which
    pages are there and never where they are in host memory (page frame numbers, a Rowhammer aid)."""
    try:
        memory.keep_pagemap(libc.open_without_capability(memory.PAGEMAP, os.O_RDONLY | os.O_CLOEXEC,
                                                         libc.CAP_SYS_ADMIN))
    except OSError as e:
        log.info("no pagemap for snapshots (%s): their first pass reads all of RAM", e.strerror or e)


def probe_forbidden_call_if_asked(is_running) -> None:
    """The seccomp test's hook: with SECCOMP_PROBE_ENV=1, a forbidden call once `is_running()` is true."""
    if os.environ.get(SECCOMP_PROBE_ENV) != "1":
        return

    def probe() -> None:
        deadline = time.monotonic() + PROBE_WAIT_SEC
        while not is_running():
            if time.monotonic() > deadline:
                return
            threading.Event().wait(0.05)
        log.warning("%s is set: making a system call outside the seccomp filter", SECCOMP_PROBE_ENV)
        seccomp_filter.probe_forbidden()

    threading.Thread(target=probe, name="seccomp-probe", daemon=True).start()
