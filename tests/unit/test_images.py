"""The image store's pure parts: manifest checks, source resolution, copy-and-hash, the store's folder discipline."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tenbox_supervisor import images
from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.images import (
    ImageError,
    ImageStore,
    parse_manifest,
    resolve_sources,
    source_plan,
)
from tenbox_supervisor.protocol import ErrorCode
from tests.framework.images import root_sources


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FILES = {"vmlinuz": b"kernel" * 100, "initrd.img": b"initrd" * 50, "rootfs.qcow2": b"rootfs" * 300}


def manifest_for(files=None, **over):
    files = FILES if files is None else files
    m = {"manifest_version": 1, "name": "img", "arch": images.HOST_ARCH, "kernel": "vmlinuz", "initrd": "initrd.img",
         "rootfs": "rootfs.qcow2", "cmdline": "console=ttyS0 root=/dev/vda rw",
         "files": {fn: {"size": len(data), "sha256": digest(data)} for fn, data in files.items()}}
    m.update(over)
    return m


def write_image(folder, files=None, manifest=None):
    os.makedirs(str(folder), exist_ok=True)
    files = FILES if files is None else files
    for fn, data in files.items():
        (folder / fn).write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps(manifest if manifest is not None else manifest_for(files)))
    return folder


def raw(m) -> bytes:
    return json.dumps(m).encode()


# parse_manifest -----------------------------------------------------------------------------------


def test_a_complete_manifest_is_accepted_as_written():
    m = manifest_for()
    assert parse_manifest(raw(m)) == m


def test_the_initrd_is_optional():
    m = manifest_for({"vmlinuz": b"k", "rootfs.qcow2": b"r"})
    del m["initrd"]
    assert parse_manifest(raw(m))["rootfs"] == "rootfs.qcow2"


@pytest.mark.parametrize("change, words", [
    (lambda m: m.pop("manifest_version"), "manifest_version"),
    (lambda m: m.pop("files"), "files"),
    (lambda m: m.update(files={}), "files"),
    (lambda m: m.pop("kernel"), "kernel"),
    (lambda m: m.update(rootfs="other.qcow2"), "rootfs"),
    (lambda m: m.update(initrd="nope"), "initrd"),
    (lambda m: m["files"]["vmlinuz"].update(sha256="ABC"), "sha256"),
    (lambda m: m["files"]["vmlinuz"].update(sha256="0" * 63), "sha256"),
    (lambda m: m["files"]["vmlinuz"].update(size=-1), "size"),
    (lambda m: m["files"]["vmlinuz"].update(size=True), "size"),
    (lambda m: m["files"].update({"../etc/passwd": {"size": 1, "sha256": "0" * 64}}), "plain file name"),
    (lambda m: m["files"].update({".hidden": {"size": 1, "sha256": "0" * 64}}), "plain file name"),
    (lambda m: m["files"].update({"manifest.json": {"size": 1, "sha256": "0" * 64}}), "plain file name"),
    (lambda m: m.update(rootfs_format="vmdk"), "rootfs_format"),
    (lambda m: m.update(cmdline="a\nb"), "cmdline"),
    (lambda m: m.update(cmdline="caf\u00e9"), "cmdline"),
    (lambda m: m.update(name=["x"]), "name"),
])
def test_a_manifest_that_does_not_make_sense_is_image_corrupt_with_the_field_named(change, words):
    m = manifest_for()
    change(m)
    with pytest.raises(ImageError) as e:
        parse_manifest(raw(m))
    assert e.value.code == ErrorCode.IMAGE_CORRUPT and words in e.value.message, e.value.message


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"\xff\xfe", b"null", b" " * (images.MANIFEST_MAX_BYTES + 1)])
def test_garbage_is_image_corrupt(data):
    with pytest.raises(ImageError) as e:
        parse_manifest(data)
    assert e.value.code == ErrorCode.IMAGE_CORRUPT and e.value.message.startswith("manifest: ")


def test_a_newer_manifest_version_or_another_arch_is_refused_as_invalid_argument():
    with pytest.raises(ImageError) as e:
        parse_manifest(raw(manifest_for(manifest_version=2)))
    assert e.value.code == ErrorCode.INVALID_ARGUMENT and "newer" in e.value.message
    with pytest.raises(ImageError) as e:
        parse_manifest(raw(manifest_for(arch="riscv64")))
    assert e.value.code == ErrorCode.INVALID_ARGUMENT and "riscv64" in e.value.message


# resolve_sources and source_plan ------------------------------------------------------------------


def test_a_folder_is_its_manifest_and_the_files_beside_it(tmp_path):
    folder = write_image(tmp_path / "img")
    src = resolve_sources([str(folder)], folder=True)
    assert src.manifest_path == str(folder / "manifest.json") and src.files == {}
    assert source_plan(src, manifest_for()) == {fn: str(folder / fn) for fn in FILES}
    assert resolve_sources([str(folder / "manifest.json")], folder=True).manifest_path == src.manifest_path


def test_files_are_one_manifest_and_the_files_by_name(tmp_path):
    folder = write_image(tmp_path / "img")
    paths = [str(folder / fn) for fn in ("manifest.json", "vmlinuz", "initrd.img", "rootfs.qcow2")]
    src = resolve_sources(paths, folder=False)
    assert src.manifest_path == paths[0] and src.files == {fn: str(folder / fn) for fn in FILES}


def test_bad_source_sets_are_refused_by_their_names_alone(tmp_path):
    with pytest.raises(ImageError) as e:
        resolve_sources(["/srv/vmlinuz", "/srv/rootfs.qcow2"], folder=False)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT and "manifest" in e.value.message
    with pytest.raises(ImageError) as e:
        resolve_sources(["/srv/manifest.json", "/srv/vmlinuz", "/other/vmlinuz"], folder=False)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT and "two files" in e.value.message


def test_files_the_manifest_does_not_name_or_names_but_are_not_given(tmp_path):
    given = ["/s/manifest.json", "/s/vmlinuz", "/s/initrd.img", "/s/rootfs.qcow2"]
    with pytest.raises(ImageError) as e:
        source_plan(resolve_sources(given + ["/s/notes.txt"], folder=False), manifest_for())
    assert e.value.code == ErrorCode.INVALID_ARGUMENT and "notes.txt" in e.value.message
    with pytest.raises(ImageError) as e:
        source_plan(resolve_sources(given[:3], folder=False), manifest_for())
    assert e.value.code == ErrorCode.FILE_MISSING and "rootfs.qcow2" in e.value.message


# copy_and_hash ------------------------------------------------------------------------------------


def copy(src, dst, expected, progress=None):
    fd = os.open(str(src), os.O_RDONLY)
    try:
        return images.copy_and_hash(fd, str(src), str(dst), expected, progress)
    finally:
        os.close(fd)


def test_copy_and_hash_copies_and_hashes_what_it_read(tmp_path):
    src = tmp_path / "a"
    src.write_bytes(os.urandom(3 * images.COPY_BLOCK + 17))
    progress = images.Progress("x", src.stat().st_size)
    assert copy(src, tmp_path / "b", src.stat().st_size, progress) == digest(src.read_bytes())
    assert (tmp_path / "b").read_bytes() == src.read_bytes() and progress.bytes_done == src.stat().st_size


def test_copy_and_hash_keeps_zeros_as_holes(tmp_path):
    src = tmp_path / "a"
    with open(str(src), "wb") as f:
        f.write(b"head")
        f.truncate(8 * images.COPY_BLOCK)  # zeros to the end: a hole in the copy too
    data = src.read_bytes()
    assert copy(src, tmp_path / "b", len(data)) == digest(data)
    assert (tmp_path / "b").read_bytes() == data
    assert os.stat(str(tmp_path / "b")).st_blocks * 512 < 2 * images.COPY_BLOCK


@pytest.mark.parametrize("expected", [99, 101])
def test_copy_and_hash_refuses_a_file_of_another_size_without_reading_it_all(tmp_path, expected):
    src = tmp_path / "a"
    src.write_bytes(b"x" * 100)
    with pytest.raises(ImageError) as e:
        copy(src, tmp_path / "b", expected)
    assert e.value.code == ErrorCode.IMAGE_CORRUPT and "the manifest says %d" % expected in e.value.message


def test_copy_and_hash_stops_when_cancelled(tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"x" * 100)
    progress = images.Progress("x", 100)
    progress.cancel.set()
    with pytest.raises(images.ImportCancelled):
        copy(src, tmp_path / "b", 100, progress)


# The store -----------------------------------------------------------------------------------------


def prepare(store, name, folder):
    with root_sources(folder) as (manifest, files):
        return store.prepare_import(name, manifest, files)


def store_import(store, folder, name=None):
    with root_sources(folder) as (manifest, files):
        name, progress = store.prepare_import(name, manifest, files)
        try:
            tmp = store.copy_files(name, manifest, files, progress)
            return store.finish_import(name, tmp, manifest)
        finally:
            store.end_import(name)


def hidden(store):
    return [e for e in os.listdir(store.images_dir) if e.startswith(".")]


def test_an_import_lands_read_only_under_its_name_with_the_manifest(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    image = store_import(store, write_image(tmp_path / "src"), "deb")
    assert image.path == str(tmp_path / "images" / "deb")
    assert sorted(os.listdir(image.path)) == sorted(list(FILES) + ["manifest.json"])
    for fn in os.listdir(image.path):
        assert os.stat(os.path.join(image.path, fn)).st_mode & 0o777 == 0o444
    stored = json.loads((tmp_path / "images" / "deb" / "manifest.json").read_text())
    assert stored["files"] == manifest_for()["files"] and stored["imported_at"]
    assert store.get("deb").kernel == os.path.join(image.path, "vmlinuz")
    assert store.verify(store.get("deb")) == []
    assert [i.name for i in store.list()[0]] == ["deb"] and hidden(store) == []


def test_the_manifest_name_is_used_when_none_is_given(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    assert store_import(store, write_image(tmp_path / "src")).name == "img"


def test_a_file_that_differs_from_its_digest_leaves_nothing_in_the_store(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    src = write_image(tmp_path / "src")
    data = bytearray(FILES["rootfs.qcow2"])
    data[100] ^= 1  # same size, other bytes
    (src / "rootfs.qcow2").write_bytes(bytes(data))
    with pytest.raises(ImageError) as e:
        store_import(store, src, "deb")
    assert e.value.code == ErrorCode.IMAGE_CORRUPT and "rootfs.qcow2: sha256" in e.value.message
    assert os.listdir(store.images_dir) == [] and store.pending == {}


def test_a_name_clash_and_a_full_disk_are_refused_before_copying(tmp_path, monkeypatch):
    store = ImageStore(str(tmp_path / "images"))
    src = write_image(tmp_path / "src")
    store_import(store, src, "deb")
    with pytest.raises(ImageError) as e:
        prepare(store, "deb", src)
    assert e.value.code == ErrorCode.IMAGE_EXISTS
    monkeypatch.setattr(store, "free_bytes", lambda: images.SPACE_RESERVE_BYTES + 10)
    with pytest.raises(ImageError) as e:
        prepare(store, "deb2", src)
    assert e.value.code == ErrorCode.INSUFFICIENT_SPACE and "free" in e.value.message
    assert store.pending == {} and hidden(store) == []


def test_a_second_import_of_a_pending_name_is_refused(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    src = write_image(tmp_path / "src")
    prepare(store, "deb", src)
    with pytest.raises(ImageError) as e:
        prepare(store, "deb", src)
    assert e.value.code == ErrorCode.IMAGE_EXISTS and "being imported" in e.value.message


def test_a_missing_file_is_refused_when_it_is_opened(tmp_path):
    src = write_image(tmp_path / "src")
    os.unlink(str(src / "initrd.img"))
    with pytest.raises(ApiError) as e:
        prepare(ImageStore(str(tmp_path / "images")), "a", src)
    assert e.value.code == ErrorCode.FILE_MISSING and "initrd.img" in e.value.message


def test_a_size_that_differs_from_the_manifest_is_refused_before_hashing(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    src = write_image(tmp_path / "src")
    (src / "vmlinuz").write_bytes(FILES["vmlinuz"] + b"!")
    with pytest.raises(ImageError) as e:
        prepare(store, "a", src)
    assert e.value.code == ErrorCode.IMAGE_CORRUPT and "the manifest says" in e.value.message


def test_leftovers_of_a_crash_are_swept_at_start_and_broken_folders_are_listed(tmp_path):
    root = tmp_path / "images"
    (root / ".import-deb-1234").mkdir(parents=True)
    (root / ".import-deb-1234" / "rootfs.qcow2").write_bytes(b"half")
    (root / ".deleted-old-1").mkdir()
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{")
    store = ImageStore(str(root))
    assert sorted(os.listdir(str(root))) == ["broken"]
    imgs, broken = store.list()
    assert imgs == [] and list(broken) == ["broken"] and "not valid JSON" in broken["broken"]
    with pytest.raises(ImageError) as e:
        store.get("broken")
    assert e.value.code == ErrorCode.IMAGE_CORRUPT
    with pytest.raises(ImageError) as e:
        store.get("nothing")
    assert e.value.code == ErrorCode.IMAGE_NOT_FOUND
    with pytest.raises(ImageError) as e:
        store.get("../etc")
    assert e.value.code == ErrorCode.INVALID_ARGUMENT


def test_remove_takes_the_folder_away_and_verify_sees_a_changed_file(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    image = store_import(store, write_image(tmp_path / "src"), "deb")
    path = os.path.join(image.path, "initrd.img")
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"X")
    assert store.verify(image) == ["initrd.img: sha256 differs from the manifest"]
    store.remove("deb")
    assert os.listdir(store.images_dir) == []
    with pytest.raises(ImageError) as e:
        store.remove("deb")
    assert e.value.code == ErrorCode.STORE_FAILED


def test_path_in_resolves_symlinks_and_does_not_match_prefixes(tmp_path):
    (tmp_path / "images" / "deb").mkdir(parents=True)
    (tmp_path / "images" / "deb2").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "images" / "deb")
    assert images.path_in(str(tmp_path / "link" / "rootfs.qcow2"), str(tmp_path / "images" / "deb"))
    assert not images.path_in(str(tmp_path / "images" / "deb2" / "rootfs.qcow2"), str(tmp_path / "images" / "deb"))
