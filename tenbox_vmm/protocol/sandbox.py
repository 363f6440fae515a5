"""What tenboxd and its workers agree on about the worker sandbox: the user, the limits, the --fd value (worker and daemon; pure).

A worker runs as WORKER_USER (created by the package's postinst), in a
cgroup whose limits tenboxd computes from the VM's size with the functions
below, and opens no file of the VM itself: tenboxd opens them and passes
the descriptors, each named on the worker's command line by `--fd N:PATH`
(`PassedFile`). docs/security-sandbox.md explains the choices.
"""

from __future__ import annotations

import pwd
from typing import List, NamedTuple

from tenbox_vmm.protocol.limits import Limits

# One system user for every worker (not one per VM): no file of tenbox belongs to it, the
# worker gets its files as descriptors, and its mount namespace, its non-dumpable state and
# its seccomp filter keep it away from other workers (docs/security-sandbox.md, "Why one user").
WORKER_USER = "tenbox-vm"
# Where the package is not installed (a source checkout run as root): nobody, nogroup.
FALLBACK_UID = 65534
FALLBACK_GID = 65534

MIB = 1 << 20

# The logs a worker rotates by copying between descriptors tenboxd passed (it may not rename them).
CONSOLE_LOG = "console.log"
RUNTIME_LOG = "runtime.log"  # the worker's stdout and stderr


def rotated_log_names(path: str, keep: int) -> List[str]:
    """The rotated copies of log `path`, newest first: path.1 .. path.<keep>."""
    return ["%s.%d" % (path, i) for i in range(1, keep + 1)]


class WorkerUser(NamedTuple):
    uid: int
    gid: int
    name: str
    fallback: bool = False  # WORKER_USER does not exist here


FALLBACK_NOTE = "user %s does not exist (the tenbox package creates it); workers run as nobody" % WORKER_USER


def worker_user() -> WorkerUser:
    """WORKER_USER and its group, or nobody/nogroup (FALLBACK_NOTE) where it does not exist; ValueError if it is root."""
    try:
        pw = pwd.getpwnam(WORKER_USER)
    except KeyError:
        return WorkerUser(FALLBACK_UID, FALLBACK_GID, "nobody", fallback=True)
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise ValueError("user %s has uid or gid 0; it must be an unprivileged system user" % WORKER_USER)
    return WorkerUser(pw.pw_uid, pw.pw_gid, WORKER_USER)


def worker_memory_max(memory_mb: int) -> int:
    """Bytes of memory (cgroup MemoryMax) for a worker whose guest has `memory_mb` MiB of RAM.

    Guest RAM, plus Limits.WORKER_MEMORY_OVERHEAD_MB for the interpreter, the
    device models and their buffers (a worker with an idle guest has 17 MiB
    resident outside guest RAM, docs/performance.md), plus 1/64 of the guest
    RAM for KVM's own per-page structures (page tables, reverse maps, dirty
    bitmaps: about 0.4 % of guest RAM with EPT or NPT).
    """
    return (memory_mb + Limits.WORKER_MEMORY_OVERHEAD_MB + memory_mb // 64) * MIB


def worker_tasks_max(cpus: int) -> int:
    """Threads a worker may have (cgroup TasksMax): one per vCPU plus Limits.WORKER_TASKS_BASE.

    The rest of a worker is a fixed set whatever the VM's size: the main,
    controller, console and link threads, ZeroMQ's two, one I/O thread and
    up to two block helpers per virtio device (8 slots).
    """
    return Limits.WORKER_TASKS_BASE + cpus


def worker_data_max(memory_mb: int, cpus: int) -> int:
    """RLIMIT_DATA of a worker: its MemoryMax plus a stack for each of its threads.

    RLIMIT_DATA counts reserved private writable memory, and every thread's
    stack (Limits.WORKER_THREAD_STACK_MB by default) is reserved whole when
    the thread starts: so this bound is looser than MemoryMax, which counts
    pages in use. It is what bounds a worker's memory where no cgroup can.
    """
    return worker_memory_max(memory_mb) + worker_tasks_max(cpus) * Limits.WORKER_THREAD_STACK_MB * MIB


class PassedFile(NamedTuple):
    """A file tenboxd opened for the worker: descriptor `fd` stands for `path`.

    The worker's code still names its files by path (messages, backing
    names relative to an image's folder); where a path was passed, the
    descriptor is used instead of opening it. The same path may be passed
    more than once (two disks on one template): each use takes its own
    descriptor, so image locks stay per use.
    """

    fd: int
    path: str

    def to_arg(self) -> str:
        return "%d:%s" % (self.fd, self.path)

    @classmethod
    def parse(cls, text: str) -> "PassedFile":
        """The PassedFile a --fd value says; ValueError with a one-line reason."""
        fd, sep, path = text.partition(":")
        if not sep or not fd.isdigit() or int(fd) < 3 or not path.startswith("/"):
            raise ValueError("--fd %r: expected FD:PATH, a descriptor number of at least 3 and an absolute path"
                             % text)
        return cls(fd=int(fd), path=path)
