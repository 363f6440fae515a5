"""The worker's seccomp filter: the system calls a running VM makes, and death for any other (worker, any user).

Built with libseccomp (Debian's python3-seccomp). The default action is
SECCOMP_RET_KILL_PROCESS: a call outside the list ends the whole worker
with SIGSYS, which tenboxd reports as `sandbox_violation` (the kernel log
names the call: audit type=1326). How the list was made, and why each
argument rule is there, is in docs/security-sandbox.md; in short, every
worker of the integration suites (boot, disks raw and qcow2, network with
forwards, reboot, stop, the link with a restarting tenboxd) ran under
strace, and the union of the calls it made after entering its sandbox,
plus the variants other C libraries of the supported distributions use
for the same functions, is ALLOWED.

The tuples of ALLOWED say where each call comes from. Argument rules
narrow the calls that would otherwise reach far:
  * clone only makes threads (CLONE_THREAD, no namespace flags): no fork,
    no new namespaces; clone3 fails with ENOSYS so that the C library
    falls back to clone, whose flags a filter can read;
  * ioctl only on KVM (type 0xAE) and a few terminal and descriptor
    requests: not TIOCSTI, which would type into the operator's terminal;
  * socket only for unix, IPv4 and IPv6 sockets;
  * kill, tgkill and prlimit64 only at the worker itself: not at another
    worker running as the same user.
"""

from __future__ import annotations

import errno
from typing import List, Optional, Tuple

from tenbox_vmm.sandbox import libc

# The system calls a worker makes once its sandbox is up (any arguments). OBSERVED is the union
# of what every worker of the integration suites made after loading its filter, under strace on
# Debian 12 (x86-64, glibc 2.36, Python 3.11), less clone, ioctl, socket, prctl, tgkill and
# sched_setscheduler, which rules() allows for some arguments only. The tuples after it are the
# same functions as other C libraries, Pythons and architectures make them, and calls that are
# rare by nature.
OBSERVED = (
    "accept", "accept4", "bind", "brk", "chmod", "close", "connect", "epoll_create1", "epoll_ctl",
    "epoll_wait", "eventfd2", "exit", "exit_group", "fallocate", "fcntl", "fdatasync", "futex", "getcwd",
    "getdents64", "getpeername", "getpid", "getrandom", "getsockname", "getsockopt", "gettid", "listen", "lseek",
    "madvise", "mkdir", "mmap", "mprotect", "munmap", "newfstatat", "openat", "pipe2", "poll", "pread64",
    "preadv2", "pwrite64", "pwritev2", "read", "recvfrom", "recvmmsg", "rmdir", "rseq", "rt_sigaction",
    "rt_sigprocmask", "rt_sigreturn", "sched_getaffinity", "sched_getparam", "sched_getscheduler", "sendmmsg",
    "sendto", "set_robust_list", "setsockopt", "shutdown", "unlink", "write",
)
# glibc before 2.33 (Debian 11, Ubuntu 20.04) stats with these; Pythons built without preadv2.
OLDER_LIBC = ("stat", "fstat", "lstat", "preadv", "pwritev")
# arm64 has only the *at and p* forms of these (the architecture interface is shared).
ARM64_FORMS = ("mkdirat", "unlinkat", "fchmodat", "ppoll", "pselect6", "epoll_pwait")
# Made by code that runs, but not in every suite: UDP segmentation offload (net/mmsg.py sendmsg),
# libslirp's ICMP error queue (recvmsg), console.log rotation (ftruncate), time.sleep (select on
# Python before 3.11, clock_nanosleep after), libzmq's and glibc's sleeps, realloc of large
# buffers (mremap), CPython's set_inheritable (the ioctl rules below), and faulthandler (the
# SIGUSR2 stack dump) giving back its signal stack as the interpreter ends (sigaltstack: the
# calling thread's own signal stack, nothing else), and uname (ctypes.util.find_library when a
# library such as libslirp is missing: the host's kernel name and release, which it may know).
RARE = ("sendmsg", "recvmsg", "ftruncate", "select", "clock_nanosleep", "nanosleep", "mremap", "sigaltstack",
        "uname")
# The kernel restarts a call a signal interrupted (the vCPU kick, SIGUSR1) through restart_syscall;
# the clocks are vDSO calls that become system calls where the clock source has no vDSO path.
KERNEL = ("restart_syscall", "clock_gettime", "clock_getres", "gettimeofday", "time", "getuid", "geteuid",
          "getgid", "getegid")
# A standby's spare worker is sandboxed before its order comes, and then takes the order's runtime
# log as its stdout and stderr (tenbox_vmm/standby.py): it moves its own descriptors, nothing more.
SPARE = ("dup2", "dup3")
ALLOWED = OBSERVED + OLDER_LIBC + ARM64_FORMS + RARE + KERNEL + SPARE
# A standalone runtime's --snapshot-out file is written under a temporary name in its folder (a
# descriptor opened before the sandbox) and renamed into place there: renameat, or renameat2 as
# newer C libraries and arm64 make it, allowed only with that descriptor as both folders (see
# rules()). A worker under tenboxd renames nothing: tenboxd moves its snapshots into place.
RENAME_CALLS = ("renameat", "renameat2")

KVM_IOCTL_TYPE = 0xAE
# Terminal and descriptor requests (asm-generic/ioctls.h): a standalone worker's raw-mode
# console (tcgetattr/tcsetattr), isatty(), CPython's set_inheritable and libslirp's
# non-blocking sockets. Not TIOCSTI (0x5412).
TCGETS, TCSETS, TCSETSW, TCSETSF = 0x5401, 0x5402, 0x5403, 0x5404
FIONREAD, FIONBIO, FIONCLEX, FIOCLEX = 0x541B, 0x5421, 0x5450, 0x5451  # FIONREAD: libslirp before 4.7 (UDP)
OTHER_IOCTLS = (TCGETS, TCSETS, TCSETSW, TCSETSF, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX)

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)

CLONE_THREAD = 0x00010000
# CLONE_NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
CLONE_NAMESPACES = 0x00000080 | 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 \
    | 0x40000000

SCHED_OTHER = 0
PR_SET_NAME, PR_GET_NAME = 15, 16  # thread names: libzmq names its threads (pthread_setname_np)


class FilterError(Exception):
    """libseccomp is missing or refused the filter."""


def rules(pid: int, rename_dir_fd: Optional[int] = None) -> List[Tuple[str, list]]:
    """(name, argument conditions) pairs besides ALLOWED; conditions as (arg, op, a, b) tuples, op by name.

    `rename_dir_fd`: the one folder descriptor renames may happen in (renameat's olddirfd and
    newdirfd, arguments 0 and 2), or None for no renames at all.
    """
    out: List[Tuple[str, list]] = [
        ("ioctl", [(1, "MASKED_EQ", 0xFF00, KVM_IOCTL_TYPE << 8)]),
        ("clone", [(0, "MASKED_EQ", CLONE_THREAD | CLONE_NAMESPACES, CLONE_THREAD)]),
        ("kill", [(0, "EQ", pid, 0)]),
        ("tgkill", [(0, "EQ", pid, 0)]),  # pthread_kill: the vCPU kick, and raise()
        ("prlimit64", [(0, "EQ", 0, 0)]),
        ("prlimit64", [(0, "EQ", pid, 0)]),
        # libzmq sets each of its threads' policy to the one it has (SCHED_OTHER): nothing else.
        ("sched_setscheduler", [(1, "EQ", SCHED_OTHER, 0)]),
    ]
    out += [("ioctl", [(1, "EQ", req, 0)]) for req in OTHER_IOCTLS]
    out += [("socket", [(0, "EQ", family, 0)]) for family in SOCKET_FAMILIES]
    out += [("prctl", [(0, "EQ", option, 0)]) for option in (PR_SET_NAME, PR_GET_NAME)]
    if rename_dir_fd is not None:
        out += [(name, [(0, "EQ", rename_dir_fd, 0), (2, "EQ", rename_dir_fd, 0)]) for name in RENAME_CALLS]
    return out


def install(pid: int, rename_dir_fd: Optional[int] = None) -> None:
    """Load the filter into this process (all its threads); FilterError if it cannot be.

    `rename_dir_fd`: see rules().
    """
    try:
        import seccomp
    except ImportError:
        raise FilterError("python3-seccomp is not installed (apt-get install python3-seccomp)") from None
    try:
        f = seccomp.SyscallFilter(defaction=seccomp.KILL_PROCESS)
        f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
        f.set_attr(seccomp.Attr.CTL_TSYNC, 1)
        for name in ALLOWED:
            _add(seccomp, f, seccomp.ALLOW, name)
        for name, conds in rules(pid, rename_dir_fd):
            _add(seccomp, f, seccomp.ALLOW, name,
                 *[seccomp.Arg(arg, getattr(seccomp, op), a, b) for arg, op, a, b in conds])
        # glibc 2.34+ makes threads with clone3, whose flags sit in memory a filter cannot read:
        # ENOSYS makes it use clone, as Docker's and systemd's filters do.
        _add(seccomp, f, seccomp.ERRNO(errno.ENOSYS), "clone3")
        f.load()
    except (OSError, RuntimeError, ValueError) as e:
        raise FilterError("cannot load the seccomp filter: %s" % e) from None


def _add(seccomp, f, action, name: str, *args) -> None:
    if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) < 0:
        return  # not a system call of this architecture (open, poll, ... on arm64)
    f.add_rule(action, name, *args)


def probe_forbidden() -> None:
    """Make a system call no worker needs, as the sandbox's test does (see SECCOMP_PROBE_ENV in __init__)."""
    libc.kernel_log_size()
