#!/usr/bin/python3
"""Pick kernel modules and their dependencies out of an unpacked kernel package.

    kmods.py --modroot ROOT/lib/modules/RELEASE --out DIR MODULE...

For each MODULE (a module name; '-' and '_' are the same) this finds what
it needs to be loaded by `insmod` alone, without modprobe or depmod on the
target:

  * hard dependencies, from ROOT/lib/modules/RELEASE/modules.dep when the
    package ships one, otherwise from each module's own `.modinfo`
    `depends=` field (Debian's linux-image packages ship no modules.dep:
    depmod writes it at install time from the same information);
  * `softdep=` "pre:" dependencies (e.g. ext4 -> crc32c), resolved through
    module names and aliases, since no modprobe will load them later;
  * modules listed in modules.builtin are built into the kernel: nothing to
    copy, and a built-in module's dependencies are built in too.

It copies the needed .ko files into DIR (decompressing .ko.xz, .ko.gz and
.ko.zst; zstd needs the `zstd` tool) and writes DIR/load-order: one file
name per line, every module after the modules it depends on. On stdout it
prints two summary lines, `modules: ...` and `builtin: ...`.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import shutil
import struct
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Set

SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


class KmodError(Exception):
    pass


def norm(name: str) -> str:
    return name.replace("-", "_")


def strip_suffix(filename: str) -> Optional[str]:
    for suf in SUFFIXES:
        if filename.endswith(suf):
            return filename[: -len(suf)]
    return None


def read_module(path: str) -> bytes:
    """The ELF bytes of a module, decompressed if need be."""
    if path.endswith(".ko"):
        with open(path, "rb") as f:
            return f.read()
    if path.endswith(".ko.xz"):
        with lzma.open(path) as f:
            return f.read()
    if path.endswith(".ko.gz"):
        with gzip.open(path) as f:
            return f.read()
    if path.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise KmodError("%s is zstd-compressed: install zstd (apt-get install zstd)" % path)
        try:
            return subprocess.run(["zstd", "-dcq", path], check=True, stdout=subprocess.PIPE,
                                  timeout=120).stdout
        except (subprocess.SubprocessError, OSError) as e:
            raise KmodError("zstd -d %s failed: %s" % (path, e)) from None
    raise KmodError("not a module file: %s" % path)


def elf_modinfo(elf: bytes, what: str) -> List[str]:
    """The key=value strings of the ELF's .modinfo section."""
    if elf[:4] != b"\x7fELF":
        raise KmodError("%s: not an ELF file" % what)
    cls, data = elf[4], elf[5]
    end = "<" if data == 1 else ">"
    if cls == 2:
        shoff, = struct.unpack_from(end + "Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x3A)
        sh_fmt, off_i, size_i = end + "IIQQQQIIQQ", 4, 5
    elif cls == 1:
        shoff, = struct.unpack_from(end + "I", elf, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x2E)
        sh_fmt, off_i, size_i = end + "IIIIIIIIII", 4, 5
    else:
        raise KmodError("%s: unknown ELF class %d" % (what, cls))
    try:
        sections = [struct.unpack_from(sh_fmt, elf, shoff + i * shentsize) for i in range(shnum)]
        strtab = sections[shstrndx]
        stroff = strtab[off_i]
        for sec in sections:
            name_end = elf.index(b"\0", stroff + sec[0])
            if elf[stroff + sec[0]:name_end] == b".modinfo":
                blob = elf[sec[off_i]:sec[off_i] + sec[size_i]]
                return [s.decode("utf-8", "replace") for s in blob.split(b"\0") if s]
    except (struct.error, IndexError, ValueError) as e:
        raise KmodError("%s: bad ELF section table (%s)" % (what, e)) from None
    raise KmodError("%s: no .modinfo section" % what)


class ModTree:
    def __init__(self, modroot: str) -> None:
        if not os.path.isdir(modroot):
            raise KmodError("no module folder %s" % modroot)
        self.root = modroot
        self.files: Dict[str, str] = {}  # module name -> path relative to root
        for dirpath, dirnames, filenames in os.walk(modroot):
            dirnames.sort()
            for fn in sorted(filenames):
                base = strip_suffix(fn)
                if base is not None:
                    rel = os.path.relpath(os.path.join(dirpath, fn), modroot)
                    self.files.setdefault(norm(base), rel)
        self.builtin: Set[str] = set()
        self.builtin_info: Dict[str, List[str]] = {}
        p = os.path.join(modroot, "modules.builtin")
        if os.path.exists(p):
            with open(p) as f:
                for line in f:
                    base = strip_suffix(os.path.basename(line.strip()))
                    if base:
                        self.builtin.add(norm(base))
        p = os.path.join(modroot, "modules.builtin.modinfo")
        if os.path.exists(p):
            with open(p, "rb") as f:
                for s in f.read().split(b"\0"):
                    mod, dot, kv = s.decode("utf-8", "replace").partition(".")
                    if dot and "=" in kv:
                        self.builtin_info.setdefault(norm(mod), []).append(kv)
        self.dep: Optional[Dict[str, List[str]]] = None
        p = os.path.join(modroot, "modules.dep")
        if os.path.exists(p):
            self.dep = {}
            with open(p) as f:
                for line in f:
                    head, _, tail = line.partition(":")
                    name = strip_suffix(os.path.basename(head.strip()))
                    if name:
                        self.dep[norm(name)] = [norm(strip_suffix(os.path.basename(d)) or d)
                                                for d in tail.split()]
        self._info: Dict[str, List[str]] = {}
        self._aliases: Optional[Dict[str, List[str]]] = None

    def info(self, name: str) -> List[str]:
        if name not in self._info:
            path = os.path.join(self.root, self.files[name])
            self._info[name] = elf_modinfo(read_module(path), path)
        return self._info[name]

    def field(self, name: str, key: str) -> List[str]:
        src = self.builtin_info.get(name, []) if name in self.builtin else self.info(name)
        return [kv.split("=", 1)[1] for kv in src if kv.startswith(key + "=")]

    def depends(self, name: str) -> List[str]:
        if name in self.builtin:
            return []
        if self.dep is not None and name in self.dep:
            return self.dep[name]
        return [norm(d) for v in self.field(name, "depends") for d in v.split(",") if d]

    def softdeps_pre(self, name: str) -> List[str]:
        out: List[str] = []
        for v in self.field(name, "softdep"):
            mode = None
            for word in v.split():
                if word.endswith(":"):
                    mode = word[:-1]
                elif mode == "pre":
                    out.append(word)
        return out

    def resolve(self, name: str) -> Optional[str]:
        """A module name or alias -> a module name (built-in preferred), or None."""
        n = norm(name)
        if n in self.builtin or n in self.files:
            return n
        if self._aliases is None:
            self._aliases = {}
            for mod, kvs in self.builtin_info.items():
                for kv in kvs:
                    if kv.startswith("alias="):
                        self._aliases.setdefault(kv[6:], []).append(mod)
            for mod in sorted(self.files):
                for kv in self.info(mod):
                    if kv.startswith("alias="):
                        self._aliases.setdefault(kv[6:], []).append(mod)
        cands = self._aliases.get(name, []) + self._aliases.get(n, [])
        for c in cands:
            if c in self.builtin:
                return c
        return cands[0] if cands else None


def closure(tree: ModTree, wanted: Iterable[str], builtin_seen: Optional[Set[str]] = None) -> List[str]:
    """Module names to insmod, dependencies first; built-in ones left out
    (and added to builtin_seen)."""
    order: List[str] = []
    state: Dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: List[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise KmodError("dependency cycle: %s" % " -> ".join(chain + [name]))
        if name not in tree.builtin and name not in tree.files:
            raise KmodError("module %s (needed by %s) is neither built in nor in the package"
                            % (name, " -> ".join(chain) or "the request"))
        state[name] = 1
        for d in tree.depends(name):
            visit(d, chain + [name])
        for soft in tree.softdeps_pre(name):
            r = tree.resolve(soft)
            if r is None:
                sys.stderr.write("kmods.py: note: softdep %s of %s matches no module; skipped\n"
                                 % (soft, name))
            else:
                visit(r, chain + [name])
        state[name] = 2
        if name not in tree.builtin:
            order.append(name)
        elif builtin_seen is not None:
            builtin_seen.add(name)

    for w in wanted:
        visit(norm(w), [])
    return order


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="kmods.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--modroot", required=True, metavar="DIR", help="the package's lib/modules/RELEASE")
    p.add_argument("--out", required=True, metavar="DIR", help="where the .ko files and load-order go")
    p.add_argument("modules", nargs="+", metavar="MODULE")
    args = p.parse_args(argv)
    try:
        tree = ModTree(args.modroot)
        builtin: Set[str] = set()
        order = closure(tree, args.modules, builtin)
        os.makedirs(args.out, exist_ok=True)
        names = []
        for mod in order:
            src = os.path.join(tree.root, tree.files[mod])
            fn = strip_suffix(os.path.basename(src)) + ".ko"
            with open(os.path.join(args.out, fn), "wb") as f:
                f.write(read_module(src))
            names.append(fn)
        with open(os.path.join(args.out, "load-order"), "w") as f:
            f.write("".join(n + "\n" for n in names))
    except (KmodError, OSError) as e:
        sys.stderr.write("kmods.py: error: %s\n" % e)
        return 1
    print("modules: " + (" ".join(order) or "(none)"))
    print("builtin: " + (" ".join(sorted(builtin)) or "(none)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
