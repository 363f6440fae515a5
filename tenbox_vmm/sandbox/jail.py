"""The worker's own mount and IPC namespaces, whose root holds only what a running worker reads (worker, root).

After Firecracker's jailer, but for an interpreter: the new root is a tmpfs
holding read-only bind mounts of the system's programs and libraries
(/usr and the /lib, /bin links), the Python code the worker runs from
(every sys.path folder outside them), the three /etc files libraries
read while a VM runs, a /proc that shows the worker only itself, a /dev with null, zero, random and urandom,
the worker link's folder, and a small private /tmp (libslirp's guest
forwards are unix sockets). No VM folder, no image store, no data dir, no
home: the VM's files were opened before and are held as descriptors
(passed_files), /dev/kvm too. Mounts made here do not propagate back to
the host (the tree is made private first).

Sources are opened (O_PATH) in the new namespace before the tmpfs root is
mounted and bound from /proc/self/fd, so a source under the folder the new
root is mounted on is still reachable.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import tenbox_vmm
from tenbox_vmm.sandbox import libc

# The system: where ld.so, libc, libslirp, libzmq and the interpreter live.
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
# /etc files read after the sandbox is up: the dynamic linker's cache (libraries loaded
# late: libzmq with the link thread, libslirp with the NIC), libslirp's upstream DNS
# server (read at every query it forwards), the host's time zone for log timestamps.
ETC_FILES = ("/etc/ld.so.cache", "/etc/resolv.conf", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
# Where the new root is built, in this namespace only: every Debian system has it.
STAGING = "/mnt"
OLD_ROOT = ".old-root"
TMP_OPTIONS = "mode=1777,size=1m,nr_inodes=256"  # unix sockets and their folder only
ROOT_OPTIONS = "mode=0755,size=64k"


class JailError(Exception):
    """The namespaces or the new root could not be set up; the message says which step."""


class Bind(NamedTuple):
    path: str  # the same path inside and outside the jail
    writable: bool = False


def code_dirs() -> List[str]:
    """Folders of code the worker may import that SYSTEM_DIRS do not cover.

    The folder tenbox_vmm was loaded from (a source checkout on PYTHONPATH)
    and the interpreter's own prefixes (a virtual environment, a Python
    built elsewhere). Not the rest of sys.path: its first entry is the
    current folder of whoever started the worker.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(tenbox_vmm.__file__)))
    found: List[str] = []
    for p in (package_root, sys.prefix, sys.exec_prefix, getattr(sys, "base_prefix", sys.prefix)):
        real = os.path.realpath(p)
        if real == "/" or not os.path.isdir(real) or _under(real, SYSTEM_DIRS):
            continue
        if not any(_under(real, [f]) for f in found):
            found = [f for f in found if not _under(f, [real])] + [real]
    return found


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def default_binds(extra: Sequence[Bind] = ()) -> List[Bind]:
    binds = [Bind(p) for p in SYSTEM_DIRS + ETC_FILES + DEVICES] + [Bind(p) for p in code_dirs()]
    return binds + list(extra)


def enter(binds: Sequence[Bind]) -> None:
    """Unshare the mount and IPC namespaces and pivot into a root made of `binds`; JailError on failure.

    Missing sources are left out (a host without /lib64, without
    /etc/localtime). The caller must be root and single-threaded.
    """
    _step("unshare the mount and IPC namespaces", libc.unshare, libc.CLONE_NEWNS | libc.CLONE_NEWIPC)
    try:
        libc.mount(None, "/", None, libc.MS_REC | libc.MS_PRIVATE)
    except OSError as e:
        # Without this our mounts could propagate to the host: never go on.
        hint = (" (the root is no mount point: is tenboxd in a chroot? bind-mount the chroot's folder onto itself)"
                if e.errno == errno.EINVAL else "")
        raise JailError("cannot make the mount tree private: %s%s" % (e.strerror, hint)) from None
    sources = _open_sources(binds)  # in the new namespace: a bind's source must be one of its mounts
    # The folders made for mount points must be 0755 whatever the umask (tenboxd's is 027):
    # the worker user has to walk through them to its code.
    umask = os.umask(0o022)
    try:
        _step("mount the new root", libc.mount, "tenbox-jail", STAGING, "tmpfs",
              libc.MS_NOSUID | libc.MS_NODEV, ROOT_OPTIONS)
        _make_dir(STAGING + "/tmp")  # first: a bind under /tmp (a test's link folder) goes on top of it
        _step("mount /tmp", libc.mount, "tenbox-tmp", STAGING + "/tmp", "tmpfs",
              libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC, TMP_OPTIONS)
        for bind, fd, st in sources:
            _place(bind, fd, st)
        _mount_proc(STAGING + "/proc")
        _switch_root()
        _step("make the new root read-only", libc.mount, None, "/", None,
              libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV, ROOT_OPTIONS)
    finally:
        os.umask(umask)
        for _, fd, _ in sources:
            if fd >= 0:
                os.close(fd)
    os.environ["TMPDIR"] = "/tmp"  # the folder named by the daemon's TMPDIR is not in here


def _switch_root() -> None:
    """pivot_root into STAGING and detach the old root; chroot where pivot_root cannot (the initramfs's rootfs)."""
    _make_dir(STAGING + "/" + OLD_ROOT)
    os.chdir(STAGING)
    try:
        libc.pivot_root(".", OLD_ROOT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise JailError("cannot pivot into the new root: %s" % e.strerror) from None
        # EINVAL: the old root cannot be moved (rootfs) or is a chroot's bind mount. The old tree
        # stays mounted but out of reach: the worker will have no CAP_SYS_CHROOT to climb out,
        # and its /proc shows no other process's root.
        os.rmdir(OLD_ROOT)
        _step("chroot into the new root", os.chroot, ".")
        os.chdir("/")
        return
    os.chdir("/")
    _step("detach the old root", libc.umount2, "/" + OLD_ROOT, libc.MNT_DETACH)
    os.rmdir("/" + OLD_ROOT)


def _open_sources(binds: Sequence[Bind]) -> List[Tuple[Bind, int, os.stat_result]]:
    out = []
    for bind in binds:
        try:
            st = os.lstat(bind.path)
            if stat.S_ISLNK(st.st_mode) and bind.path in SYSTEM_DIRS:
                out.append((bind, -1, st))  # usrmerge: /lib -> usr/lib, recreated as a link
                continue
            fd = os.open(bind.path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise JailError("cannot open %s for the worker's root: %s" % (bind.path, e.strerror)) from None
        out.append((bind, fd, os.fstat(fd)))
    return out


def _place(bind: Bind, fd: int, st: os.stat_result) -> None:
    target = STAGING + bind.path
    _make_dir(os.path.dirname(target))
    if fd < 0:
        os.symlink(os.readlink(bind.path), target)
        return
    if stat.S_ISDIR(st.st_mode):
        _make_dir(target)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    source = "/proc/self/fd/%d" % fd
    _step("bind %s" % bind.path, libc.mount, source, target, None, libc.MS_BIND | libc.MS_REC)
    flags = libc.MS_REMOUNT | libc.MS_BIND | libc.MS_NOSUID
    if not stat.S_ISCHR(st.st_mode):
        flags |= libc.MS_NODEV
    if not bind.writable:
        flags |= libc.MS_RDONLY
    _step("make %s read-only" % bind.path, libc.mount, None, target, None, flags)


def _mount_proc(target: str) -> None:
    """A /proc of its own that shows the worker only itself (hidepid=ptraceable), where the kernel can.

    Linux 5.8 made each proc mount an instance of its own; before it,
    mount options changed every /proc of the pid namespace, the host's
    included, and "ptraceable" did not exist, so the mount fails there
    without effect and the host's /proc is bound instead: the worker then
    sees other processes' world-readable entries (not their memory, files
    or environment: it may not ptrace them).
    """
    _make_dir(target)
    try:
        libc.mount("proc", target, "proc", libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC, "hidepid=ptraceable")
    except OSError:
        _step("bind /proc", libc.mount, "/proc", target, None, libc.MS_BIND | libc.MS_REC)


def _make_dir(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _step(what: str, fn, *args) -> None:
    try:
        fn(*args)
    except OSError as e:
        raise JailError("cannot %s: %s" % (what, e.strerror or e)) from None


def link_folder(endpoint: Optional[str]) -> List[Bind]:
    """The worker link's folder, for an ipc:// endpoint (the socket is reached, not written: read-only)."""
    if not endpoint or not endpoint.startswith("ipc://"):
        return []
    return [Bind(os.path.dirname(endpoint[len("ipc://"):]))]
