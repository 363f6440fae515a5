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
import json
import logging
import os
import stat
from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol

from tenbox_supervisor import params as P
from tenbox_supervisor.api import Caller, MethodSpec
from tenbox_supervisor.caller_files import SETPRIV, CallerFiles, Use, owning
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.events import EventSink
from tenbox_supervisor.imagetool_child import run_imagetool
from tenbox_supervisor.images import (
    DISK_STAGED,
    FILES_MAX,
    HOST_ARCH,
    Image,
    ImageError,
    ImageStore,
    Progress,
    copy_and_hash,
    hash_file,
    parse_manifest,
    path_in,
    read_manifest_fd,
    remove_tree,
    resolve_sources,
    source_plan,
)
from tenbox_supervisor.managed_vm import ManagedVm
from tenbox_supervisor.protocol import ErrorCode, EventKind, Method
from tenbox_supervisor.spec import OVERLAY_NAME
from tenbox_vmm.protocol.sandbox import worker_user

log = logging.getLogger("tenboxd.images")

# A cloud image's import: what the image tool's boot-files may take and write.
BOOT_FILES_TIMEOUT_SEC = 600  # it may copy a partition of a qcow2 image out to read it
BOOT_STAGING = ".boot"  # the tool's output folder in the import folder, the worker user's
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
BOOT_FILE_MAX = {"kernel": 256 << 20, "initrd": 2 << 30}


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


def _with_serial_console(cmdline: str) -> str:
    """The entry's command line, with console=ttyS0 added where it names no serial console: tenbox's
    console (vm console, the console log) is the first serial port."""
    if any(word.startswith("console=ttyS") for word in cmdline.split()):
        return cmdline
    return (cmdline + " console=ttyS0").strip()


def _take_output(folder: str, name: str, dst: str, limit: int) -> None:
    """Copy the image tool's output file `name` (a plain name in `folder`, a regular file, never followed
    through a link: the tool ran as another user) to `dst`, at most `limit` bytes."""
    if os.path.basename(name) != name or name in ("", ".", ".."):
        raise ImageError(ErrorCode.INTERNAL_ERROR, "the image tool named %r as its output" % name)
    try:
        fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ImageError(ErrorCode.INTERNAL_ERROR, "the image tool's %s: %s" % (name, e.strerror)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "the image's %s is not a regular file of at most %d MiB"
                             % (name, limit >> 20))
        copy_and_hash(fd, name, dst, st.st_size)
    finally:
        os.close(fd)


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
        if params.get("disk") is not None:
            return await self._import_disk(params, caller)
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

            async def copy() -> str:
                own = {fn: (path, os.dup(fd)) for fn, (path, fd) in sources.items()}
                return await loop.run_in_executor(None, owning, [fd for _, fd in own.values()], self.store.copy_files,
                                                  name, manifest, own, progress)

            async def describe(tmp: str) -> Dict[str, Any]:
                return await self._check_rootfs(os.path.join(tmp, manifest["rootfs"]), manifest)

            image = await self._store_import(name, progress, copy, describe)
        log.info("image %s: imported, every sha256 matched", name)
        if self.events is not None:
            self.events.emit(EventKind.IMAGE_IMPORTED, image=name)
        view = image.view()
        view["verified"] = True
        return view

    async def _import_disk(self, params, caller: Caller):
        """image.import of a distribution cloud image: one disk, its kernel and initrd found inside it.

        The disk is copied into the store as the template (its sha256 checked
        against `sha256` when given), checked as every template is (no backing
        file, no internal snapshots), and then read by the image tool's
        `boot-files` as the unprivileged worker user, through a descriptor:
        the partition table, the default entry of grub.cfg or the BLS entries,
        and the kernel and initrd it names, copied out. The manifest is made
        here. A refusal at any step leaves nothing in the store.
        """
        name = P.name(params, "name", required=True)
        path = P.file_path(params, "disk", required=True)
        expected = P.sha256(params, "sha256")
        loop = asyncio.get_event_loop()
        with await self.files.open(caller, [Use("disk", path)]) as opened:
            fd = opened.fd("disk")
            size = os.fstat(fd).st_size
            try:
                name, progress = self.store.prepare_import(name, {"files": {DISK_STAGED: {"size": size}}},
                                                           {DISK_STAGED: (path, fd)})
            except ImageError as e:
                raise _api_error(e)
            log.info("image %s: importing the cloud image %r (%d bytes)", name, path, size)
            digest = []

            async def copy() -> str:
                own = os.dup(fd)
                tmp, sha = await loop.run_in_executor(None, owning, [own], self.store.copy_disk, name, path, own,
                                                      size, expected, progress)
                digest.append(sha)
                return tmp

            async def describe(tmp: str) -> Dict[str, Any]:
                return await self._cloud_manifest(tmp, name, path, digest[0])

            image = await self._store_import(name, progress, copy, describe)
        log.info("image %s: imported from a cloud image (kernel %s)", name, image.manifest["boot"].get("kernel_path"))
        if self.events is not None:
            self.events.emit(EventKind.IMAGE_IMPORTED, image=name)
        view = image.view()
        view["verified"] = expected is not None
        return view

    async def _store_import(self, name: str, progress: Progress, copy: Callable[[], Awaitable[str]],
                            describe: Callable[[str], Awaitable[Dict[str, Any]]]) -> Image:
        """An import's last steps: `copy` fills a hidden folder (its path), `describe` checks it and gives
        the manifest, and the folder becomes the image. A failure or a cancellation removes the folder,
        and the name is free again either way."""
        loop = asyncio.get_event_loop()
        tmp: Optional[str] = None
        try:
            tmp = await copy()
            manifest = await describe(tmp)
            async with self.lock:
                image = await loop.run_in_executor(None, self.store.finish_import, name, tmp, manifest)
            tmp = None
            return image
        except ImageError as e:
            raise _api_error(e)
        except asyncio.CancelledError:
            progress.cancel.set()  # the copying thread stops at its next block and removes its folder
            raise
        finally:
            if tmp is not None:
                self.store.discard(tmp)  # a few unlinks; also on the way out when cancelled
            self.store.end_import(name)

    async def _cloud_manifest(self, tmp: str, name: str, src: str, digest: str) -> Dict[str, Any]:
        """The staged disk renamed for its format, its boot files extracted beside it; the manifest."""
        staged = os.path.join(tmp, DISK_STAGED)
        checked = await self._check_rootfs(staged, {"rootfs": os.path.basename(src)})
        rootfs = "rootfs." + checked["rootfs_format"]
        os.rename(staged, os.path.join(tmp, rootfs))
        boot = await self._boot_files(tmp, rootfs)
        loop = asyncio.get_event_loop()
        files = {rootfs: {"size": os.stat(os.path.join(tmp, rootfs)).st_size, "sha256": digest}}
        for fn in [boot["kernel"]] + ([boot["initrd"]] if boot.get("initrd") else []):
            size, sha = await loop.run_in_executor(None, hash_file, os.path.join(tmp, fn))
            files[fn] = {"size": size, "sha256": sha}
        manifest = {
            "manifest_version": 1, "name": name, "arch": HOST_ARCH, "builder": "image.import (cloud image)",
            "cloud_init": True,  # its VMs get a NoCloud seed (vm_api.image_has_cloud_init)
            "kernel": boot["kernel"], "initrd": boot.get("initrd"), "rootfs": rootfs,
            "rootfs_format": checked["rootfs_format"], "virtual_size": checked["virtual_size"],
            "cmdline": _with_serial_console(boot["cmdline"]), "files": files,
            "boot": {k: boot.get(k) for k in ("table", "root_partition", "boot_partition", "fs_uuid", "config",
                                              "title", "kernel_path")},
            "source": {"file": os.path.basename(src), "sha256": digest},
        }
        if manifest["initrd"] is None:
            del manifest["initrd"]
        try:
            parse_manifest(json.dumps(manifest).encode())  # the store reads it back through the same checks
        except ImageError as e:
            raise ImageError(ErrorCode.IMAGE_CORRUPT, "the boot entry found does not make a usable image: %s"
                             % e.message) from None
        return manifest

    async def _boot_files(self, tmp: str, rootfs: str) -> Dict[str, Any]:
        """The image tool's boot-files on the staged disk, run as the worker user with the disk passed open
        (it can open nothing of the store itself); its answer, with its output moved into `tmp`."""
        who = worker_user()
        out = os.path.join(tmp, BOOT_STAGING)
        os.mkdir(out, 0o700)
        os.chown(out, who.uid, who.gid)
        disk_path = os.path.join(tmp, rootfs)
        fd = os.open(disk_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        out_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            as_user = [SETPRIV, "--reuid=%d" % who.uid, "--regid=%d" % who.gid, "--clear-groups",
                       "--inh-caps=-all", "--no-new-privs", "--"]
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
            if os.environ.get("PYTHONPATH"):
                env["PYTHONPATH"] = os.environ["PYTHONPATH"]  # a source checkout's tenboxd (tests)
            try:
                # The data directory is not the worker user's to traverse: the tool gets the disk and
                # its output folder as descriptors, and works in that folder (its cwd).
                answer = await run_imagetool("--fd", "%d:%s" % (fd, disk_path), "--cwd-fd", str(out_fd),
                                             "boot-files", disk_path, "--out", ".",
                                             timeout=BOOT_FILES_TIMEOUT_SEC, as_user=as_user,
                                             pass_fds=[fd, out_fd], env=env)
            except ApiError as e:
                raise ImageError(e.code if e.code != ErrorCode.INVALID_ARGUMENT else ErrorCode.IMAGE_CORRUPT,
                                 "no bootable kernel found in the image: %s" % e.message) from None
        finally:
            os.close(fd)
            os.close(out_fd)
        for key, final in (("kernel", KERNEL_FILE), ("initrd", INITRD_FILE)):
            if answer.get(key):
                _take_output(out, answer[key], os.path.join(tmp, final), BOOT_FILE_MAX[key])
                answer[key] = final
        remove_tree(out)
        return answer

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

