"""The image.* methods of the control socket and the image lookups of vm.create (daemon, root).

Hashing and copying run on the default executor's threads, the rootfs
check in a child process (tenbox_vmm.imagetool): the event loop never
reads an image. The sources are opened with the rights of the caller
(caller_files.py): a group member imports only what it could read itself,
and the sizes and digests in the answers are of files it could read. One asyncio lock orders the store's changes (the end of an
import, a removal) against vm.create --image, so an image cannot be removed
between the check for its users and the creation of a VM on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Dict, List, Optional, Protocol

from tenbox_supervisor import params as P
from tenbox_supervisor.api import Caller, MethodSpec
from tenbox_supervisor.caller_files import CallerFiles, Use, owning
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.events import EventSink
from tenbox_supervisor.imagetool_child import run_imagetool
from tenbox_supervisor.images import (
    FILES_MAX,
    Image,
    ImageError,
    ImageStore,
    path_in,
    read_manifest_fd,
    resolve_sources,
    source_plan,
)
from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.protocol import ErrorCode, EventKind, Method
from tenbox_supervisor.spec import OVERLAY_NAME

log = logging.getLogger("tenboxd.images")


class VmCatalog(Protocol):
    """What the image methods need to know of the VMs: who uses an image."""

    def all(self) -> List[ManagedVm]:
        ...

    def broken(self) -> Dict[str, str]:
        ...

    def vm_dir(self, vm_id: str) -> str:
        ...


def _api_error(e: ImageError) -> ApiError:
    return ApiError(e.code, e.message)


class ImageMethods:
    def __init__(self, store: ImageStore, vms: VmCatalog, files: CallerFiles,
                 events: Optional[EventSink] = None) -> None:
        self.store = store
        self.events = events
        self.vms = vms
        self.files = files
        self.lock = asyncio.Lock()

    def method_specs(self) -> List[MethodSpec]:
        return [
            MethodSpec(Method.IMAGE_LIST, self.image_list, mutating=False),
            MethodSpec(Method.IMAGE_INSPECT, self.image_inspect, mutating=False),
            MethodSpec(Method.IMAGE_IMPORT, self.image_import, mutating=True),
            MethodSpec(Method.IMAGE_REMOVE, self.image_remove, mutating=True),
        ]

    # Lookups ------------------------------------------------------------------------------------

    def get(self, name: str) -> Image:
        try:
            return self.store.get(name)
        except ImageError as e:
            raise _api_error(e)

    def quick_users(self, image: Image) -> List[Dict[str, Any]]:
        """VMs made from the image, or whose kernel, initrd or a disk lies in its folder."""
        users = []
        for vm in self.vms.all():
            s = vm.spec
            paths = [s.kernel, s.initrd] + [d.get("path") for d in s.disks]
            if s.image == image.name or any(p and path_in(p, image.path) for p in paths):
                users.append({"id": vm.id, "name": s.name, "state": vm.state.value})
        return users

    async def users(self, image: Image) -> List[Dict[str, Any]]:
        """quick_users, plus VMs with a disk whose backing chain reaches into the image's folder.

        The chains are read by tenbox_vmm.imagetool in a child process (disk
        headers are not parsed in the daemon). Broken VM entries are checked
        through their overlay, the one disk whose place is known.
        """
        found = {u["id"]: u for u in self.quick_users(image)}
        for vm in self.vms.all():
            if vm.id in found:
                continue
            for d in vm.spec.disks:
                if d.get("format") == "raw":
                    continue
                if await self._chain_reaches(d["path"], image):
                    found[vm.id] = {"id": vm.id, "name": vm.spec.name, "state": vm.state.value}
                    break
        for vm_id in sorted(self.vms.broken()):
            overlay = os.path.join(self.vms.vm_dir(vm_id), OVERLAY_NAME)
            if os.path.isfile(overlay) and await self._chain_reaches(overlay, image):
                found[vm_id] = {"id": vm_id, "name": None, "state": "broken"}
        return sorted(found.values(), key=lambda u: (u["name"] or "", u["id"]))

    @staticmethod
    async def _chain_reaches(path: str, image: Image) -> bool:
        try:
            info = await run_imagetool("info", path)
        except ApiError:
            return False  # a disk that is missing or unreadable names no backing file we can see
        return any(path_in(entry[0], image.path) for entry in info.get("backing_chain") or [])

    # Methods ------------------------------------------------------------------------------------

    async def image_list(self, params, caller: Caller):
        images, broken = self.store.list()
        out = []
        for image in images:
            view = image.view()
            view["vms"] = self.quick_users(image)
            out.append(view)
        for name, reason in sorted(broken.items()):
            out.append({"name": name, "state": "broken", "error": reason})
        for progress in sorted(self.store.pending.values(), key=lambda p: p.name):
            out.append(progress.view())
        out.sort(key=lambda v: v["name"])
        return {"images": out, "path": self.store.images_dir}

    async def image_inspect(self, params, caller: Caller):
        image = self.get(P.name(params, "name", required=True))
        verify = P.get(params, "verify", bool, default=False)
        view = image.view()
        view["manifest"] = image.manifest
        view["vms"] = await self.users(image)
        if verify:
            loop = asyncio.get_event_loop()
            problems = await loop.run_in_executor(None, self.store.verify, image)
            view["verify"] = {"ok": not problems, "problems": problems}
        return view

    async def image_import(self, params, caller: Caller):
        name = P.name(params, "name")
        paths, folder = P.image_sources(params, FILES_MAX + 1)
        loop = asyncio.get_event_loop()
        try:
            source = resolve_sources(paths, folder)
            with await self.files.open(caller, [Use("manifest", source.manifest_path)]) as m:
                fd = os.dup(m.fd("manifest"))
                try:
                    manifest = await loop.run_in_executor(None, owning, [fd], read_manifest_fd, fd)
                except ImageError as e:
                    raise ImageError(e.code, "%s: %s" % (source.manifest_path, e.message)) from None
            plan = source_plan(source, manifest)
        except ImageError as e:
            raise _api_error(e)
        with await self.files.open(caller, [Use(fn, path) for fn, path in sorted(plan.items())]) as opened:
            sources = {fn: (path, opened.fd(fn)) for fn, path in plan.items()}
            try:
                name, progress = self.store.prepare_import(name, manifest, sources)
            except ImageError as e:
                raise _api_error(e)
            log.info("image %s: importing %d files (%d bytes) from %r", name, len(plan), progress.bytes_total,
                     os.path.dirname(source.manifest_path))
            tmp: Optional[str] = None
            try:
                own = {fn: (path, os.dup(fd)) for fn, (path, fd) in sources.items()}
                tmp = await loop.run_in_executor(None, owning, [fd for _, fd in own.values()], self.store.copy_files,
                                                 name, manifest, own, progress)
                manifest = await self._check_rootfs(os.path.join(tmp, manifest["rootfs"]), manifest)
                async with self.lock:
                    image = await loop.run_in_executor(None, self.store.finish_import, name, tmp, manifest)
                tmp = None
            except ImageError as e:
                raise _api_error(e)
            except asyncio.CancelledError:
                progress.cancel.set()  # the copying thread stops at its next block and removes its folder
                raise
            finally:
                if tmp is not None:
                    self.store.discard(tmp)  # a few unlinks; also on the way out when cancelled
                self.store.end_import(name)
        log.info("image %s: imported, every sha256 matched", name)
        if self.events is not None:
            self.events.emit(EventKind.IMAGE_IMPORTED, image=name)
        view = image.view()
        view["verified"] = True
        return view

    async def _check_rootfs(self, path: str, manifest: Dict[str, Any]) -> Dict[str, Any]:
        """The rootfs is of its declared format and stands alone; its virtual size is recorded."""
        try:
            info = await run_imagetool("info", path)
        except ApiError as e:
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "rootfs %s: %s" % (manifest["rootfs"], e.message))
        declared = manifest.get("rootfs_format")
        if declared is not None and info["format"] != declared:
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "rootfs %s is %s, the manifest says %s"
                             % (manifest["rootfs"], info["format"], declared))
        if info.get("backing_chain") or info.get("backing_file"):
            # A template's backing file would be any file of this host, readable by every VM on it.
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "rootfs %s has a backing file; a template must stand alone"
                             % manifest["rootfs"])
        if info.get("corrupt") or info.get("dirty"):
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "rootfs %s is marked corrupt or dirty (qemu-img check -r all)"
                             % manifest["rootfs"])
        if info.get("snapshots"):
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "rootfs %s has internal snapshots" % manifest["rootfs"])
        return dict(manifest, rootfs_format=info["format"], virtual_size=info["virtual_size"])

    async def image_remove(self, params, caller: Caller):
        name = P.name(params, "name", required=True)
        async with self.lock:
            image = self.get(name)
            users = await self.users(image)
            if users:
                names = ", ".join("%s (%s)" % (u["name"], u["id"]) if u["name"] else u["id"] for u in users)
                raise ApiError(ErrorCode.IMAGE_IN_USE, "image %s is used by %d VM(s): %s; delete them first (tenbox vm rm)"
                               % (name, len(users), names), vms=users)
            loop = asyncio.get_event_loop()
            try:
                await loop.run_in_executor(None, self.store.remove, name)
            except ImageError as e:
                raise _api_error(e)
        log.info("image %s: removed", name)
        if self.events is not None:
            self.events.emit(EventKind.IMAGE_REMOVED, image=name)
        return {"name": name, "removed": True}

