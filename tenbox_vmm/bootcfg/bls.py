"""BLS entries and the one systemd-boot boots by default (imagetool child at image import; any user).

BLS (Boot Loader Specification, type #1 entries): keys title, version,
machine-id, sort-key, linux, initrd (repeatable; a line may name several
files, as GRUB's blscfg allows), options (repeatable, joined), efi,
architecture. The order is systemd-boot's: boot-counted entries with no
tries left ("+0-N") last; entries with a sort-key first, by sort-key, then
machine-id (strcmp), then version, newest first; then by the entry's id
(its file name, lower case, without the boot counter), newest first. Versions
compare with the UAPI Version Format Specification, as systemd's
`strverscmp_improved()` (`systemd-analyze compare-versions`) implements it:
see `compare_versions`. `default` is loader.conf's glob (`*`, `?`, `[...]`),
matched case-insensitively against the id with ".conf" (systemd-boot) and,
failing that, without it (GRUB's blscfg, grubenv's saved_entry); "@saved"
and no match mean the first entry. Entries with neither linux nor efi, or
for another architecture than x64, are not in the menu (systemd-boot hides
them). `$var` in options and initrd lines (Fedora's `$kernelopts`,
`$tuned_params`) take the caller's `variables`, unknown ones dropped.
"""

from __future__ import annotations

import functools
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

from tenbox_vmm.bootcfg.common import (
    MAX_CONFIG_CHARS,
    MAX_ENTRIES,
    MAX_NAME_CHARS,
    MAX_VALUE_CHARS,
    BootConfigError,
    BootEntry,
    _show,
)

_EFI_ARCH = "x64"  # BLS `architecture`: tenbox runs x86_64 guests only

_DIGITS = frozenset("0123456789")
_ALPHA = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VERSION_CHARS = _DIGITS | _ALPHA | frozenset("~-^.")


def _cmp(a: object, b: object) -> int:
    return (a > b) - (a < b)  # type: ignore[operator]


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version `a` is older, the same, newer than `b` (UAPI Version Format Specification).

    A transcription of systemd's strverscmp_improved(), which `systemd-analyze compare-versions` runs: "~"
    sorts before anything, then "-", "^" and "." prefixes before their absence; digit runs compare as numbers
    and above letter runs; letters compare as ASCII ("A" < "a"); other characters only separate.
    """
    i = j = 0
    na, nb = len(a), len(b)
    for _ in range(2 * (na + nb) + 4):  # each round consumes a character (or two rounds do): a bound, not a guess
        while i < na and a[i] not in _VERSION_CHARS:
            i += 1
        while j < nb and b[j] not in _VERSION_CHARS:
            j += 1
        for prefix in "~":  # a pre-release, before even the end of the other string
            ca, cb = a[i:i + 1], b[j:j + 1]
            if ca == prefix or cb == prefix:
                r = _cmp(ca != prefix, cb != prefix)
                if r:
                    return r
                i, j = i + 1, j + 1
        ca, cb = a[i:i + 1], b[j:j + 1]
        if not ca or not cb:  # the longer string is the newer
            return _cmp(ca, cb)
        for prefix in "-^.":  # each before its absence, in this order
            ca, cb = a[i:i + 1], b[j:j + 1]
            if ca == prefix or cb == prefix:
                r = _cmp(ca != prefix, cb != prefix)
                if r:
                    return r
                i, j = i + 1, j + 1
        ca, cb = a[i:i + 1], b[j:j + 1]
        if (ca and ca in _DIGITS) or (cb and cb in _DIGITS):
            ea, eb = i, j
            while ea < na and a[ea] in _DIGITS:
                ea += 1
            while eb < nb and b[eb] in _DIGITS:
                eb += 1
            r = _cmp(ea != i, eb != j)
            if r:
                return r
            while i < ea and a[i] == "0":
                i += 1
            while j < eb and b[j] == "0":
                j += 1
            r = _cmp(ea - i, eb - j) or _cmp(a[i:ea], b[j:eb])
        else:
            ea, eb = i, j
            while ea < na and a[ea] in _ALPHA:
                ea += 1
            while eb < nb and b[eb] in _ALPHA:
                eb += 1
            common = min(ea - i, eb - j)
            r = _cmp(a[i:i + common], b[j:j + common]) or _cmp(ea - i, eb - j)
        if r:
            return r
        i, j = ea, eb
    return 0


def glob_match(pattern: str, name: str) -> bool:
    """fnmatch without its regular expressions: "*", "?", "[...]" ("!" or "^" negates), backslash escapes.

    Iterative, O(len(pattern) * len(name)) at worst: a hostile pattern costs no more.
    """
    toks: List[Tuple[str, str]] = []  # ("*", ""), ("?", ""), ("c", char), ("[", members), ("[!", members)
    k = 0
    while k < len(pattern):
        c = pattern[k]
        if c in "*?":
            toks.append((c, ""))
        elif c == "[":
            negate = pattern[k + 1:k + 2] in ("!", "^")
            first = k + 2 if negate else k + 1
            end = pattern.find("]", first + 1)  # a "]" right after "[" or "[!" is a member
            if end < 0:
                toks.append(("c", "["))
            else:
                toks.append(("[!" if negate else "[", pattern[first:end]))
                k = end
        elif c == "\\" and k + 1 < len(pattern):
            k += 1
            toks.append(("c", pattern[k]))
        else:
            toks.append(("c", c))
        k += 1

    def one(kind: str, text: str, ch: str) -> bool:
        if kind == "?":
            return True
        if kind == "c":
            return text == ch
        hit, m = False, 0
        while m < len(text):
            if m + 2 < len(text) and text[m + 1] == "-":
                hit = hit or text[m] <= ch <= text[m + 2]
                m += 3
            else:
                hit = hit or text[m] == ch
                m += 1
        return hit != (kind == "[!")

    p = s = 0
    star_p, star_s = -1, 0
    while s < len(name):
        if p < len(toks) and toks[p][0] == "*":
            star_p, star_s = p, s
            p += 1
        elif p < len(toks) and one(toks[p][0], toks[p][1], name[s]):
            p, s = p + 1, s + 1
        elif star_p >= 0:
            star_s += 1
            p, s = star_p + 1, star_s
        else:
            return False
    while p < len(toks) and toks[p][0] == "*":
        p += 1
    return p == len(toks)


class _BlsEntry(NamedTuple):
    id: str  # the file name, lower case, without the boot counter: what `default` matches and the last sort key
    file: str
    title: str
    version: str
    machine_id: str
    sort_key: Optional[str]
    linux: Optional[str]
    efi: Optional[str]
    initrds: List[str]
    options: str
    tries_left: Optional[int]  # None: no boot counting; 0: "bad"
    tries_done: int


_COUNTER = re.compile(r"(.*)\+([0-9]{1,9})(?:-([0-9]{1,9}))?\Z")
_BLS_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def _bls_expand(value: str, variables: Dict[str, str]) -> str:
    """`$name`/`${name}` replaced, blanks collapsed; the result is bounded before it is built."""
    if "$" not in value:
        return value
    out: List[str] = []
    size = pos = 0
    for m in _BLS_VAR.finditer(value):
        piece = variables.get(m.group(1) or m.group(2), "")
        size += m.start() - pos + len(piece)
        if size > MAX_VALUE_CHARS:
            raise BootConfigError("BLS: a line longer than %d characters once its variables are expanded"
                                  % MAX_VALUE_CHARS)
        out += [value[pos:m.start()], piece]
        pos = m.end()
    out.append(value[pos:])
    return " ".join("".join(out).split())


def _bls_entry(path: str, text: str, variables: Dict[str, str]) -> Optional[_BlsEntry]:
    """One entry file; None for what is not a visible entry (not .conf, no linux or efi, another architecture)."""
    file = path.rsplit("/", 1)[-1]
    if file.startswith(".") or not file.lower().endswith(".conf"):
        return None
    if len(file) > MAX_NAME_CHARS:
        raise BootConfigError("BLS: file name longer than %d characters: %s" % (MAX_NAME_CHARS, _show(file)))
    stem = file[:-len(".conf")]
    tries_left: Optional[int] = None
    tries_done = 0
    m = _COUNTER.match(stem)
    if m:
        stem, tries_left, tries_done = m.group(1), int(m.group(2)), int(m.group(3) or 0)
    keys: Dict[str, str] = {}
    initrds: List[str] = []
    options: List[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, value = (line.split(None, 1) + [""])[:2]
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = value[1:-1]  # systemd-boot unquotes a value in double quotes
        if key == "initrd":
            initrds.extend(_bls_expand(value, variables).split())
        elif key == "options":
            options.append(_bls_expand(value, variables))
        else:
            keys[key] = value
    for key in ("title", "version", "sort-key", "machine-id"):
        if len(keys.get(key, "")) > MAX_NAME_CHARS:  # they are compared many times over when sorting
            raise BootConfigError("BLS: %s: %s longer than %d characters" % (_show(file), key, MAX_NAME_CHARS))
    arch = keys.get("architecture")
    if arch is not None and arch.lower() != _EFI_ARCH:
        return None
    if "linux" not in keys and "efi" not in keys:
        return None
    return _BlsEntry((stem + ".conf").lower(), file, keys.get("title", ""), keys.get("version", ""),
                     keys.get("machine-id", ""), keys.get("sort-key") or None, keys.get("linux"), keys.get("efi"),
                     initrds, " ".join(o for o in options if o), tries_left, tries_done)


def _bls_order(a: _BlsEntry, b: _BlsEntry) -> int:
    """systemd-boot's boot_entry_compare: negative if `a` comes first in the menu."""
    r = _cmp(a.tries_left == 0, b.tries_left == 0)
    if r:
        return r
    r = _cmp(a.sort_key is None, b.sort_key is None)
    if r:
        return r
    if a.sort_key is not None and b.sort_key is not None:
        r = _cmp(a.sort_key, b.sort_key) or _cmp(a.machine_id, b.machine_id) or -compare_versions(a.version, b.version)
        if r:
            return r
    r = -compare_versions(a.id, b.id)
    if r:
        return r
    if a.tries_left is not None and b.tries_left is not None:
        r = -_cmp(a.tries_left, b.tries_left) or _cmp(a.tries_done, b.tries_done)
        if r:
            return r
    return _cmp(a.file, b.file)  # identical for the boot loader: a stable order for us


def default_bls_entry(files: Dict[str, str], default: Optional[str] = None,
                      variables: Optional[Dict[str, str]] = None) -> BootEntry:
    """The entry systemd-boot boots by default from these /loader/entries files (name or path -> text).

    `default`: loader.conf's `default` glob, or grubenv's saved_entry; `variables`: values for `$name` in
    options and initrd lines (GRUB's blscfg takes them from grubenv or grub.cfg), unknown ones dropped.
    """
    if len(files) > MAX_ENTRIES:
        raise BootConfigError("BLS: more than %d entry files (%d)" % (MAX_ENTRIES, len(files)))
    total = sum(len(t) for t in files.values())
    if total > MAX_CONFIG_CHARS:
        raise BootConfigError("BLS: entries larger than %d characters together (%d)" % (MAX_CONFIG_CHARS, total))
    if default is not None and len(default) > MAX_NAME_CHARS:
        raise BootConfigError("BLS: default pattern longer than %d characters" % MAX_NAME_CHARS)
    variables = variables or {}
    entries = [e for e in (_bls_entry(p, t, variables) for p, t in sorted(files.items())) if e is not None]
    if not entries:
        confs = [p for p in files if p.lower().endswith(".conf")]
        if not confs:
            raise BootConfigError("BLS: no entries (no /loader/entries/*.conf)")
        raise BootConfigError("BLS: no entry has a linux or efi line for x64 (%s)" % _show(sorted(confs)[0]))
    entries.sort(key=functools.cmp_to_key(_bls_order))
    chosen = entries[0]
    if default is not None and default != "@saved":
        pattern = default.lower()
        hits = [e for e in entries if glob_match(pattern, e.id)] or \
               [e for e in entries if glob_match(pattern, e.id[:-len(".conf")])]
        if hits:
            chosen = hits[0]
    if chosen.linux is None:
        raise BootConfigError("BLS: entry %s has no linux line (it starts an EFI program)" % _show(chosen.file))
    return BootEntry(chosen.title or chosen.id[:-len(".conf")], chosen.linux, chosen.initrds, chosen.options, None)
