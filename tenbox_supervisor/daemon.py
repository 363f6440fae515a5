"""tenboxd's main object: builds the parts, hands each the narrow interfaces it needs, runs the loop (daemon, root).

Nothing else takes the Daemon: the method groups, the updater and the
cloud link get the WorkerManager (or a Protocol of it), the stores and
config values they use, wired here once.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import stat
import time
from typing import List, Optional

from tenbox_supervisor.api import Api
from tenbox_supervisor.caller_files import CallerFiles
from tenbox_supervisor.cloud import CloudLink
from tenbox_supervisor.config import Config
from tenbox_supervisor.control import ControlServer, SocketBusy
from tenbox_supervisor.disk_api import DiskMethods
from tenbox_supervisor.snapshot_api import SnapshotMethods
from tenbox_supervisor.events import EventLog
from tenbox_supervisor.image_api import ImageMethods
from tenbox_supervisor.images import ImageStore
from tenbox_supervisor.link import LinkBusy, LinkServer
from tenbox_supervisor.metrics import MetricsServer
from tenbox_supervisor.modes import DAEMON_UMASK, group_id, secure_data_dir
from tenbox_supervisor.notify import Notifier
from tenbox_supervisor.oshost import SystemHost
from tenbox_supervisor.protocol import VERSION
from tenbox_supervisor.restarter import Restarter, first_start_since_boot
from tenbox_supervisor.stats import StatsMethods
from tenbox_supervisor.store import Store
from tenbox_supervisor.system_api import SystemMethods
from tenbox_supervisor.updater import Updater
from tenbox_supervisor.vm_api import VmMethods
from tenbox_supervisor.worker_manager import WorkerManager
from tenbox_vmm.protocol.sandbox import FALLBACK_NOTE, worker_user

log = logging.getLogger("tenboxd")

STATUS_INTERVAL_SEC = 5.0


class StartupError(Exception):
    """tenboxd cannot start; the message says why."""


def worker_link_access() -> dict:
    """Who may reach the worker link: a root tenboxd's workers run as the worker user (tenbox_vmm/sandbox)."""
    if os.geteuid() != 0:
        return {}
    try:
        who = worker_user()
    except ValueError as e:
        raise StartupError(str(e)) from None
    if who.fallback:
        log.warning("%s", FALLBACK_NOTE)
    return {"worker_gid": who.gid, "peer_uids": (who.uid,)}


class Daemon:
    def __init__(self, config: Config, notifier: Optional[Notifier] = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.started_at = time.time()
        self._lock_fd: Optional[int] = None
        self._stop = asyncio.Event()
        self.workers: Optional[WorkerManager] = None
        self.host: Optional[SystemHost] = None
        self.link: Optional[LinkServer] = None
        self.control: Optional[ControlServer] = None
        self.cloud: Optional[CloudLink] = None
        self.restarter: Optional[Restarter] = None
        self.metrics: Optional[MetricsServer] = None
        self._extra_tasks: List[asyncio.Task] = []

    def _lock_data_dir(self) -> None:
        os.makedirs(self.config.data_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.config.data_dir, ".tenboxd.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError("another tenboxd (pid %s) uses the data directory %s" % (holder, self.config.data_dir))
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self._lock_fd = fd

    def _check_run_dir(self) -> None:
        """The run directory holds the worker link: it must be tenboxd's and writable by nobody else.

        Without $XDG_RUNTIME_DIR a per-user daemon uses /tmp/tenbox-<uid>,
        which any user could have made first to take over the link.
        """
        path = self.config.run_dir
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        why = None
        if not stat.S_ISDIR(st.st_mode):
            why = "it is not a folder"
        elif st.st_uid != os.geteuid():
            why = "it belongs to uid %d, not to tenboxd's uid %d" % (st.st_uid, os.geteuid())
        elif st.st_mode & 0o022:
            why = "others may write in it (mode %04o)" % stat.S_IMODE(st.st_mode)
        if why:
            raise StartupError("refusing the run directory %s: %s; remove it or give --run-dir" % (path, why))

    def status_line(self) -> str:
        running = self.workers.running_count() if self.workers else 0
        total = len(self.workers.all()) if self.workers else 0
        return "%d of %d VMs running" % (running, total)

    async def run(self) -> int:
        loop = asyncio.get_event_loop()
        # Nothing tenboxd or its workers create is world-readable; logs are the group's (modes.py).
        os.umask(DAEMON_UMASK)
        log_gid = group_id(self.config.socket_group)
        try:
            self._lock_data_dir()
            self._check_run_dir()
            secure_data_dir(self.config.data_dir, log_gid)  # also repairs what older versions left
            store = Store(self.config.vms_dir, log_gid)
            self.link = LinkServer(self.config.worker_endpoint, lambda vm_id, msg: workers.on_link_message(vm_id, msg),
                                   **worker_link_access())
            host = self.host = SystemHost(self.config.standby_workers, self.config.worker_endpoint)
            workers = self.workers = WorkerManager(self.config, store, host, self.link.send)
            events = EventLog(host.time)
            workers.add_listener(events.on_state_change)  # before restore(): crashes found at start are events too
            files = CallerFiles(self.config.images_dir)
            images = ImageMethods(ImageStore(self.config.images_dir), workers, files, events)
            updater = Updater(self.config.data_dir, workers, log_gid, events)
            api = Api()
            api.register(SystemMethods(self.config, self.started_at, workers,
                                       host.standby.describe if host.standby else None).method_specs())
            # The restart policy starts VMs the way vm.start does (VmMethods.start_vm); vm.stop cancels its waits.
            restarter = self.restarter = Restarter(workers, host, lambda vm: vm_methods.start_vm(vm))
            restarter.add_listener(events.on_restart)
            vm_methods = VmMethods(workers, store, images, updater, files, restarter, events)
            api.register(vm_methods.method_specs())
            api.register(DiskMethods(workers, vm_methods.find, events).method_specs())
            api.register(SnapshotMethods(workers, vm_methods, store, updater, events).method_specs())
            api.register(events.method_specs())
            stats = StatsMethods(workers, host.monotonic, host.time)
            api.register(stats.method_specs())
            api.register(images.method_specs())
            api.register(updater.method_specs())
            await updater.restore()
            self.control = ControlServer(self.config.socket_path, self.config.socket_group, api,
                                         self.config.client_idle_sec)
            self.link.start()
            workers.restore()
            if host.standby is not None:
                host.standby.fill()  # after the umask and the adoptions: its own process, not a VM's yet
            restarter.boot(first_start_since_boot(self.config.run_dir))
            workers.add_listener(lambda vm, old, new, reason: self.notifier.status(self.status_line()))
            await self.control.start()
            if self.config.metrics_listen is not None:
                # Every VM, running or not; CPU as a counter (Prometheus takes rates itself), so no wait.
                self.metrics = MetricsServer(self.config.metrics_listen, lambda: stats.collect(
                    sorted(workers.all(), key=lambda v: (v.spec.name, v.id)), cpu_percent=False), log_gid)
                await self.metrics.start()
            self.cloud = CloudLink(self.config.cloud_url, self.config.data_dir, self.config.socket_path,
                                   self.started_at, api, workers, updater)
            self.cloud.start()
            restarter.start()
        except (StartupError, LinkBusy, SocketBusy) as e:
            await self._close()
            raise StartupError(str(e)) from None
        except OSError as e:
            await self._close()
            raise StartupError("cannot start: %s%s" % (e.strerror or e, " (%s)" % e.filename if e.filename else ""))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP: nothing to reload"))
        log.info("tenboxd %s ready: %s; data in %s", VERSION, self.status_line(), self.config.data_dir)
        self.notifier.ready(self.status_line())
        await self._main_loop()
        self.notifier.stopping()
        log.info("stopping; running VMs keep running and will be re-adopted")
        await self._close()
        return 0

    async def _main_loop(self) -> None:
        interval = STATUS_INTERVAL_SEC
        if self.notifier.watchdog_sec:
            interval = min(interval, self.notifier.watchdog_sec / 2)
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), interval)
            except asyncio.TimeoutError:
                pass
            # Pinged from the loop itself: a wedged loop stops the pings and systemd restarts us.
            self.notifier.watchdog()
            self.notifier.status(self.status_line())

    def request_stop(self) -> None:
        self._stop.set()

    async def _close(self) -> None:
        for t in self._extra_tasks:
            t.cancel()
        if self.restarter is not None:
            await self.restarter.close()
        if self.cloud is not None:
            await self.cloud.stop()
        if self.metrics is not None:
            await self.metrics.close()
        if self.control is not None:
            await self.control.close()
        if self.workers is not None:
            await self.workers.close()
        if self.host is not None:
            self.host.close()
        if self.link is not None:
            await self.link.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
