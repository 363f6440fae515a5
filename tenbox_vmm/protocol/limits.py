"""The bounds of one VM and of the worker link, defined once (worker and daemon; pure).

tenbox-vm-runtime enforces them; tenboxd checks the same values before it
stores a spec or spawns a worker, so an operator hears about a bad value
at `vm create`, not at `vm start`. Where two copies used to disagree, the
value chosen and the reason are given next to it.
"""

from __future__ import annotations

import re


class Limits:
    """One block of limits, with their units. Not instantiated."""

    # Identifiers: a VM id (and every name tenboxd accepts) becomes a folder and a link identity.
    NAME_RE = re.compile(r"[A-Za-z0-9-]{1,64}\Z")

    # Machine size.
    MEMORY_MIN_MB = 16
    MEMORY_DEFAULT_MB = 256
    CPUS_MIN = 1
    CPUS_MAX = 64

    # Disks: the machine has 8 virtio-mmio slots; every VM tenboxd makes has a network card.
    VIRTIO_SLOTS = 8
    DISKS_MAX = VIRTIO_SLOTS - 1
    DISK_SERIAL_MAX = 20  # virtio-blk's ID is 20 bytes (VIRTIO_BLK_ID_BYTES)
    DISK_FORMATS = ("raw", "qcow2")
    BACKING_CHAIN_MAX = 128  # images below a disk; reads recurse once per level

    # Network. The store accepted lower-case MACs only, the worker either case: a MAC is
    # the same address in either case (the kernel and QEMU read both), so both accept both.
    MAC_RE = re.compile(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\Z")
    # Per list (hostfwds, guestfwds). The store allowed 64, the worker's NetConfig 256: 64 is
    # the documented figure operators see through tenboxd, and each forward is a listening
    # socket in the worker; a standalone runtime or vhost-user-net now has the same bound.
    FORWARDS_MAX = 64
    FORWARD_SPEC_MAX_CHARS = 256

    # Logs a guest can fill (docs/security-guest-bounds.md). runtime.log is the worker's
    # stderr: tenboxd rotates it when it starts a worker, and the worker rotates it live
    # once it grows past RUNTIME_LOG_MAX_BYTES; console.log is written by the worker.
    RUNTIME_LOG_MAX_BYTES = 10 << 20
    RUNTIME_LOG_KEEP = 2  # runtime.log.1 and .2 besides runtime.log
    CONSOLE_LOG_MAX_BYTES = 1 << 20
    CONSOLE_LOG_KEEP = 2
    # Messages a guest can trigger again and again (a failed block request, a refused guest
    # forward, a broken virtqueue, its own resets): this many per kind and window are logged
    # (or reported to tenboxd), the rest counted and the count logged when the window ends.
    GUEST_LOG_BURST = 10
    GUEST_LOG_WINDOW_SEC = 60.0

    # The worker link.
    LINK_MESSAGE_MAX_BYTES = 1 << 20  # libzmq drops a peer that sends more
    LINK_QUEUE_MAX = 1000  # messages queued per direction before sends are dropped
    CONSOLE_CHUNK_MAX_BYTES = 64 << 10  # console bytes per message

    # The worker sandbox (tenbox_vmm/protocol/sandbox.py has the formulas, docs/security-sandbox.md the reasons).
    WORKER_MEMORY_OVERHEAD_MB = 256  # MemoryMax beyond guest RAM; a worker uses about 17 MiB of it idle
    WORKER_TASKS_BASE = 64  # TasksMax beyond one thread per vCPU; a worker with 7 disks and a NIC has ~30
    WORKER_THREAD_STACK_MB = 8  # glibc's default thread stack (RLIMIT_STACK), reserved per thread
    # RLIMIT_NPROC counts every task of the worker user on the host, not one worker's: the
    # fallback bound on all workers together where no pids controller is available.
    WORKER_USER_TASKS_MAX = 16384
