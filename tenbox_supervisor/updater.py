"""host.update: the seed's self-update path (daemon, root).

1. Refuse while any VM is starting, running, stopping or rebooting
   (`vms_running`, with the list). There is no force flag.
2. Refuse unless this installation is dpkg-managed: the tenbox apt source
   exists, dpkg knows the `tenbox` package, and the running tenboxd is the
   file dpkg installed (`update_disabled`, with the reason).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

from tenbox_supervisor.api import ApiError, Caller, MethodSpec
from tenbox_supervisor.protocol import ErrorCode, Method
from tenbox_supervisor.workers import ACTIVE_STATES

log = logging.getLogger("tenboxd.updater")

APT_SOURCES = ("/etc/apt/sources.list.d/tenbox.list", "/etc/apt/sources.list.d/tenbox.sources")
PACKAGE = "tenbox"


def _dpkg_version(package: str) -> Optional[str]:
    try:
        r = subprocess.run(["dpkg-query", "--show", "--showformat=${Version}", package],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _dpkg_owns(path: str) -> bool:
    try:
        r = subprocess.run(["dpkg-query", "--search", path], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and r.stdout.split(":", 1)[0].strip() == PACKAGE


def running_daemon_file() -> str:
    """The file that is this tenboxd: the package module dpkg would have installed."""
    import tenbox_supervisor

    return os.path.realpath(os.path.join(os.path.dirname(tenbox_supervisor.__file__), "__main__.py"))


def unmanaged_reason() -> Optional[str]:
    """Why this installation cannot update itself, or None if it can."""
    if not any(os.path.exists(p) for p in APT_SOURCES):
        return "no tenbox apt source (%s)" % " or ".join(APT_SOURCES)
    if _dpkg_version(PACKAGE) is None:
        return "dpkg does not know the %s package" % PACKAGE
    here = running_daemon_file()
    if not _dpkg_owns(here):
        return "the running tenboxd (%s) is not the file dpkg installed" % here
    return None


class Updater:
    def __init__(self, daemon) -> None:
        self.daemon = daemon

    def active_vms(self) -> List[Dict[str, Any]]:
        return [{"vm_id": vm.id, "name": vm.spec.name, "state": vm.state.value}
                for vm in self.daemon.workers.vms.values() if vm.state in ACTIVE_STATES]

    async def host_update(self, params: Dict[str, Any], caller: Caller) -> Dict[str, Any]:
        active = self.active_vms()
        if active:
            raise ApiError(ErrorCode.VMS_RUNNING, "%d VM(s) are still active; stop them before upgrading"
                           % len(active), running_vms=active)
        reason = unmanaged_reason()
        if reason:
            raise ApiError(ErrorCode.UPDATE_DISABLED, "cannot update: %s" % reason)
        raise ApiError(ErrorCode.UPDATE_DISABLED, "cannot update: the apt step is not in this build")

    def register(self, api) -> None:
        api.register(MethodSpec(Method.HOST_UPDATE, self.host_update, mutating=True, root_only=True))
