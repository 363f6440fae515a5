"""host.update: the seed's self-update path, with a structured answer every time (daemon, root).

1. Refuse while any VM is starting, running, stopping or rebooting
   (`vms_running`, with the list). There is no force flag.
2. Refuse unless this installation is dpkg-managed (`update_disabled`).
3. `apt-get update` (the tenbox source only) and `apt-get install
   --only-upgrade tenbox[=V]` run **outside tenboxd's cgroup**, as a
   transient service of their own (`systemd-run --unit=tenbox-update-*
   --wait`): the package's restart of tenboxd can never kill dpkg half-way,
   and, unlike a `--scope` (which only moves a child of ours to another
   cgroup), apt does not inherit tenboxd's sandbox (read-only /proc/sys,
   NoNewPrivileges, ...), which other packages' maintainer scripts may need.
   The transcript is timestamped into <data_dir>/logs/update.log by a filter
   inside that service. Without systemd (containers, chroots) apt runs in a
   session of its own.
4. The answer: the new package's postinst tells the running daemon its
   version (`host.update.notify`) before it restarts it; the daemon sends the
   success `{from, to}`, waits until it is on the wire, and only then lets the
   postinst go on. Without that notify, apt's exit decides: `apt_failed`
   (with apt's status and the log's tail) or `version_unchanged` (compared
   with python-apt's version_compare). If the daemon dies anyway, the next
   one finds <data_dir>/update.json and reports the outcome on its first
   cloud connection.
While an update runs, vm.start and vm.create are refused (`update_in_progress`),
checked again under the VM's lock right before a worker is spawned. The update
is claimed before anything is checked or awaited, so no VM can start between
the check for active VMs and apt. When apt outlives APT_TIMEOUT_SEC, its
transient unit is stopped (its process group without systemd) and the update
stays claimed until nothing of it runs any more. dpkg-query runs as a child
process with a deadline: the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import time
from typing import Any, Dict, List, Optional, Protocol

from tenbox_supervisor import params as P
from tenbox_supervisor.api import Caller, MethodSpec
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.events import EventSink
from tenbox_supervisor.fsutil import atomic_write_json, tail_lines
from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.modes import make_log_dir
from tenbox_supervisor.protocol import ErrorCode, EventKind, Method, cloud_response

log = logging.getLogger("tenboxd.updater")

try:
    import apt_pkg  # python3-apt, a dependency of the package

    apt_pkg.init_system()
except ImportError:  # a source checkout on a Python without python3-apt: updates are off anyway
    apt_pkg = None

APT_SOURCES = ("/etc/apt/sources.list.d/tenbox.list", "/etc/apt/sources.list.d/tenbox.sources")
PACKAGE = "tenbox"
APT_LOCK_TIMEOUT_SEC = 120  # wait this long for someone else's dpkg lock
APT_TIMEOUT_SEC = 1800
# After the timeout: the unit's own stop timeout (SIGTERM, then SIGKILL from systemd), or
# without systemd SIGTERM to apt's process group and SIGKILL this long after.
APT_STOP_TIMEOUT_SEC = 60
APT_GONE_POLL_SEC = 0.5
QUERY_TIMEOUT_SEC = 30  # dpkg-query, systemctl show
ACTIVE_UNIT_STATES = ("active", "activating", "deactivating", "reloading", "refreshing")
NOTIFY_DELIVERY_SEC = 15.0  # how long the postinst waits for our reply to leave
LOG_TAIL_LINES = 20
STATE_FILE = "update.json"

# Runs inside the transient service: apt's output goes through a timestamp filter
# straight into the log file, never through tenboxd (whose death would SIGPIPE dpkg).
APT_SCRIPT = r"""
log="$1"; rcfile="$2"; target="$3"; sources="$4"
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$line"; done; }
run() { { echo "+ $*"; "$@"; echo $? > "$rcfile"; } 2>&1 | stamp >> "$log"; read rc < "$rcfile"; return "$rc"; }
export DEBIAN_FRONTEND=noninteractive
lock="-o DPkg::Lock::Timeout=__LOCK__"
# A repository that cannot be fetched is an error, not a warning (apt >= 2.1; older apt
# ignores the option and the daemon reads "Failed to fetch" in the transcript instead).
strict="-o APT::Update::Error-Mode=any"
if [ -n "$sources" ]; then
    run apt-get $lock $strict -o Dir::Etc::sourcelist="$sources" -o Dir::Etc::sourceparts=- \
        -o APT::Get::List-Cleanup=0 update || exit $?
else
    run apt-get $lock $strict update || exit $?
fi
run apt-get $lock -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    install -y --only-upgrade --no-install-recommends "$target"
rc=$?
echo "[tenbox-update] apt-get install exited $rc" | stamp >> "$log"
exit $rc
""".replace("__LOCK__", str(APT_LOCK_TIMEOUT_SEC))


async def _query(*argv: str, timeout: float = QUERY_TIMEOUT_SEC) -> Optional[str]:
    """A query command's stdout when it exits 0 within `timeout`, else None; a child process, never the loop."""
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    return out.decode("utf-8", "replace") if proc.returncode == 0 else None


async def dpkg_version(package: str = PACKAGE) -> Optional[str]:
    out = await _query("dpkg-query", "--show", "--showformat=${Version}", package)
    return out.strip() if out and out.strip() else None


async def _dpkg_owns(path: str) -> bool:
    out = await _query("dpkg-query", "--search", path)
    return out is not None and out.split(":", 1)[0].strip() == PACKAGE


def running_daemon_file() -> str:
    return os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py"))


async def unmanaged_reason() -> Optional[str]:
    """Why this installation cannot update itself, or None if it can."""
    if not any(os.path.exists(p) for p in APT_SOURCES):
        return "no tenbox apt source (%s)" % " or ".join(APT_SOURCES)
    if await dpkg_version() is None:
        return "dpkg does not know the %s package" % PACKAGE
    here = running_daemon_file()
    if not await _dpkg_owns(here):
        return "the running tenboxd (%s) is not the file dpkg installed" % here
    return None


def version_compare(a: str, b: str) -> int:
    """Debian's own version ordering (python3-apt), never string equality."""
    if apt_pkg is None:
        raise ApiError(ErrorCode.UPDATE_DISABLED, "python3-apt is not installed")
    return apt_pkg.version_compare(a, b)


def lock_holder(lines: List[str]) -> Optional[str]:
    for line in reversed(lines):
        m = re.search(r"held by process (\d+)", line)
        if m:
            return m.group(1)
    return None


class Job:
    def __init__(self, old: str, target: Optional[str], stream, caller: Caller) -> None:
        self.old = old
        self.unit: Optional[str] = None  # apt's transient unit, when systemd runs it
        self.target = target
        self.stream = stream
        self.caller = caller
        self.notified = asyncio.Event()
        self.new_version: Optional[str] = None
        self.delivered = asyncio.Event()


class ActiveVms(Protocol):
    def active(self) -> List[ManagedVm]:
        """The VMs in a state with a worker: starting, running, stopping, rebooting."""


class Updater:
    def __init__(self, data_dir: str, vms: ActiveVms, log_gid: Optional[int] = None,
                 events: Optional[EventSink] = None) -> None:
        self.vms = vms
        self.events = events
        self.log_gid = log_gid
        self.job: Optional[Job] = None
        self.log_path = os.path.join(data_dir, "logs", "update.log")
        self.state_path = os.path.join(data_dir, STATE_FILE)
        self._late: List[Dict[str, Any]] = []

    def method_specs(self) -> List[MethodSpec]:
        return [
            MethodSpec(Method.HOST_UPDATE, self.host_update, mutating=True, root_only=True, stream=True),
            MethodSpec(Method.HOST_UPDATE_NOTIFY, self.host_update_notify, mutating=True, root_only=True),
            MethodSpec(Method.HOST_UPDATE_LOG, self.host_update_log, mutating=False, root_only=True),
        ]

    def check_start_allowed(self) -> None:
        """Asked by vm.start and vm.create, last right before they act (under the VM's lock): not while updating."""
        if self.job is not None:
            raise ApiError(ErrorCode.UPDATE_IN_PROGRESS, "an update of tenbox is running; try again when it is done")

    def active_vms(self) -> List[Dict[str, Any]]:
        return [{"vm_id": vm.id, "name": vm.spec.name, "state": vm.state.value} for vm in self.vms.active()]

    # The request ------------------------------------------------------------------------------

    async def host_update(self, params: Dict[str, Any], caller: Caller, stream) -> Dict[str, Any]:
        target = P.debian_version(params)
        if self.job is not None:
            raise ApiError(ErrorCode.UPDATE_IN_PROGRESS, "an update is already running")
        # Claimed before the check and before any await: a vm.start checks the claim under its
        # VM's lock right before it spawns, so either it sees the claim or its VM is active here.
        job = self.job = Job("?", target, stream, caller)
        release = True  # False while apt, stopped after its timeout, has not ended yet
        keep_state = False
        started = False  # apt was started: its outcome is an event, the refusals before it are not
        try:
            active = self.active_vms()
            if active:
                raise ApiError(ErrorCode.VMS_RUNNING, "%d VM(s) are still active; stop them before upgrading"
                               % len(active), running_vms=active)
            reason = await unmanaged_reason()
            if reason:
                raise ApiError(ErrorCode.UPDATE_DISABLED, "cannot update: %s" % reason)
            old = job.old = await dpkg_version() or "?"
            log.info("host.update: from %s to %s, requested by %s", old, target or "the newest", caller)
            self._save_state({"from": old, "target": target, "started_at": time.time(), "transport": caller.transport,
                              "request_id": getattr(stream, "request_id", None), "delivered": False})
            self._tell("started", {"from": old, "to": target})
            started = True
            proc = await self._start_apt(target)
            waiter = asyncio.ensure_future(proc.wait())
            notified = asyncio.ensure_future(job.notified.wait())
            done, _ = await asyncio.wait({waiter, notified}, timeout=APT_TIMEOUT_SEC,
                                         return_when=asyncio.FIRST_COMPLETED)
            if notified in done:
                result = {"from": old, "to": job.new_version}
                if await stream.reply(result):  # on the wire before the postinst goes on
                    self._save_state(dict(self._load_state() or {}, delivered=True, to=job.new_version))
                else:
                    keep_state = True  # the asker is gone: the next daemon reports the outcome
                job.delivered.set()
                log.info("host.update: %s -> %s answered; the package restarts tenboxd", old, job.new_version)
                self._tell("finished", result)
                await asyncio.wait({waiter}, timeout=APT_TIMEOUT_SEC)
                return result
            notified.cancel()
            if waiter not in done:
                log.error("host.update: apt did not finish within %d s; stopping it", APT_TIMEOUT_SEC)
                release = await self._stop_apt(proc, job)
                raise ApiError(ErrorCode.APT_FAILED, "apt did not finish within %d s; it was stopped%s"
                               % (APT_TIMEOUT_SEC, "" if release else " but still runs: VM starts stay refused "
                                  "until it has ended"), log_tail=self._tail())
            return await self._judge(old, self._apt_status(waiter.result()), stream)
        except ApiError as e:
            if started:
                self._tell("failed", {"from": job.old, "error_code": e.code.value, "error": e.message})
            raise
        finally:
            if release:
                self.job = None
            if not keep_state:
                self._clear_state()

    async def _apt_running(self, proc, job: Job) -> bool:
        """Whether anything of apt still runs: its transient unit, or a process of its process group."""
        if job.unit is not None:
            state = await _query("systemctl", "show", "--property=ActiveState", "--value", job.unit)
            if state is not None and state.strip() in ACTIVE_UNIT_STATES:
                return True
        try:
            os.killpg(proc.pid, 0)  # apt's session: its process group is its pid
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    async def _stop_apt(self, proc, job: Job) -> bool:
        """Stop apt after its timeout; True once nothing of it runs, False (the claim then stays, released
        by a watcher when it ends) if it still runs after APT_STOP_TIMEOUT_SEC and a SIGKILL."""
        if job.unit is not None:
            # systemd-run --wait is only a watcher: killing it would leave dpkg running in the unit.
            await _query("systemctl", "stop", "--no-block", job.unit)
        self._signal_group(proc, signal.SIGTERM)
        loop = asyncio.get_event_loop()
        deadline = loop.time() + APT_STOP_TIMEOUT_SEC
        killed = False
        while await self._apt_running(proc, job):
            if loop.time() > deadline:
                if killed:
                    log.error("host.update: apt still runs after SIGKILL; VM starts stay refused until it ends")
                    asyncio.ensure_future(self._release_when_gone(proc, job))
                    return False
                if job.unit is not None:
                    await _query("systemctl", "kill", "--signal=SIGKILL", job.unit)
                self._signal_group(proc, signal.SIGKILL)
                killed, deadline = True, loop.time() + APT_STOP_TIMEOUT_SEC
            await asyncio.sleep(APT_GONE_POLL_SEC)
        log.info("host.update: apt has ended")
        return True

    @staticmethod
    def _signal_group(proc, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def _release_when_gone(self, proc, job: Job) -> None:
        while await self._apt_running(proc, job):
            await asyncio.sleep(APT_GONE_POLL_SEC * 10)
        if self.job is job:
            self.job = None
            log.info("host.update: apt has ended at last; VMs may start again")

    async def _judge(self, old: str, rc: int, stream) -> Dict[str, Any]:
        tail = self._tail()
        fetch_failed = [line for line in tail_lines([self.log_path], 10000) if "Failed to fetch" in line]
        if rc == 0 and fetch_failed:
            raise ApiError(ErrorCode.APT_FAILED, "apt-get update could not fetch the tenbox repository: %s"
                           % fetch_failed[0].split("Failed to fetch", 1)[1].strip(), exit_code=rc, log_tail=tail)
        if rc != 0:
            holder = lock_holder(tail)
            message = "apt-get exited with status %d" % rc
            if holder:
                message += ": dpkg lock held by PID %s" % holder
            raise ApiError(ErrorCode.APT_FAILED, message, exit_code=rc, log_tail=tail)
        new = await dpkg_version() or "?"
        if old != "?" and new != "?" and version_compare(new, old) <= 0:
            raise ApiError(ErrorCode.VERSION_UNCHANGED, "apt succeeded but tenbox is still %s (the repository may not "
                           "be synced yet)" % new, version=new)
        result = {"from": old, "to": new}
        self._tell("finished", result)
        await stream.reply(result)
        return result

    async def _start_apt(self, target: Optional[str]):
        make_log_dir(os.path.dirname(self.log_path), self.log_gid)
        with open(self.log_path, "w") as f:  # one transcript per attempt: the log stays bounded
            f.write("%s [tenbox-update] from %s to %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                          self.job.old, target or "the newest"))
        rcfile = self.log_path + ".rc"
        try:
            os.unlink(rcfile)  # a stale status must not speak for this attempt
        except FileNotFoundError:
            pass
        sources = APT_SOURCES[0] if os.path.exists(APT_SOURCES[0]) else ""
        pkg = PACKAGE + ("=" + target if target else "")
        argv = ["/bin/sh", "-c", APT_SCRIPT, "tenbox-update", self.log_path, rcfile, pkg, sources]
        new_session = True
        if os.path.isdir("/run/systemd/system") and shutil.which("systemd-run"):
            # A transient service run by PID 1: restarting tenboxd (our cgroup) leaves it alone.
            # systemd-run itself stays our child and exits with the service when --wait ends.
            self.job.unit = "tenbox-update-%d" % int(time.time())
            argv = ["systemd-run", "--unit", self.job.unit, "--collect", "--wait", "--quiet", "--service-type=exec",
                    "--property=TimeoutStopSec=%d" % APT_STOP_TIMEOUT_SEC, "--"] + argv
        # Without systemd (containers, chroots) a new session is all there is; a restart
        # there is a plain signal to tenboxd, which does not reach this process group.
        return await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL,
                                                    start_new_session=new_session)

    def _tail(self) -> List[str]:
        return tail_lines([self.log_path], LOG_TAIL_LINES)

    def _apt_status(self, runner_status: int) -> int:
        """apt's status: the rc file the script leaves (systemd-run's own status is only a fallback)."""
        try:
            with open(self.log_path + ".rc") as f:
                return int(f.read().strip() or runner_status)
        except (OSError, ValueError):
            return runner_status

    # The package's postinst ----------------------------------------------------------------------

    async def host_update_notify(self, params: Dict[str, Any], caller: Caller) -> Dict[str, Any]:
        version = P.debian_version(params, required=True)
        job = self.job
        if job is None:
            log.info("the tenbox package is being upgraded to %s (not by host.update); restarting soon", version)
            return {"acknowledged": True, "pending_request": False}
        job.new_version = version
        job.notified.set()
        try:
            await asyncio.wait_for(job.delivered.wait(), NOTIFY_DELIVERY_SEC)
        except asyncio.TimeoutError:
            log.warning("host.update: the answer for %s did not go out in %.0fs; the next daemon will report it",
                        version, NOTIFY_DELIVERY_SEC)
            return {"acknowledged": True, "pending_request": True, "delivered": False}
        return {"acknowledged": True, "pending_request": True, "delivered": True}

    async def host_update_log(self, params: Dict[str, Any], caller: Caller) -> Dict[str, Any]:
        lines = P.get(params, "lines", int, default=P.LOG_LINES_DEFAULT)
        return {"path": self.log_path, "lines": tail_lines([self.log_path], max(0, min(lines, P.LOG_LINES_MAX)))}

    # Surviving a restart ---------------------------------------------------------------------------

    def _save_state(self, state: Dict[str, Any]) -> None:
        try:
            atomic_write_json(self.state_path, state, 0o600)
        except OSError as e:
            log.error("cannot record the update in %s: %s", self.state_path, e.strerror)

    def _load_state(self) -> Optional[Dict[str, Any]]:
        try:
            with open(self.state_path) as f:
                state = json.load(f)
            return state if isinstance(state, dict) else None
        except (OSError, ValueError):
            return None

    def _clear_state(self) -> None:
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            pass

    async def restore(self) -> None:
        """At start-up: an update.json means the previous daemon died during an update; judge it now."""
        state = self._load_state()
        if state is None:
            return
        self._clear_state()
        old, now = state.get("from") or "?", await dpkg_version() or "?"
        upgraded = old != "?" and now != "?" and version_compare(now, old) > 0
        if upgraded:
            body = {"ok": True, "payload": {"from": old, "to": now, "reported_after_restart": True}}
        else:
            tail = self._tail()
            rc_line = [l for l in tail if "apt-get install exited" in l]
            failed = rc_line and not rc_line[-1].rstrip().endswith("exited 0")
            code = ErrorCode.APT_FAILED if failed or not rc_line else ErrorCode.VERSION_UNCHANGED
            body = {"ok": False, "error_code": code.value, "error": "the update from %s did not complete (now %s)"
                    % (old, now), "log_tail": tail}
        log.info("host.update before the restart: %s", "from %s to %s" % (old, now) if upgraded else body["error"])
        if upgraded:
            self._tell("finished", {"from": old, "to": now, "reported_after_restart": True})
        else:
            self._tell("failed", {"from": old, "error_code": body["error_code"], "error": body["error"]})
        if state.get("transport") == "cloud" and not state.get("delivered"):
            self._late.append({"type": cloud_response(Method.HOST_UPDATE.value), "id": state.get("request_id"),
                               "payload": body})

    def _tell(self, action: str, fields: Dict[str, Any]) -> None:
        if self.events is not None:
            self.events.emit(EventKind.HOST_UPDATE, action=action, **fields)

    def pending_reports(self) -> List[Dict[str, Any]]:
        """Answers a previous daemon owed the cloud; handed out once."""
        out, self._late = self._late, []
        return out
