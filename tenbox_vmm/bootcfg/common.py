"""What the boot-config parsers share: the entry, the one error, the limits (imagetool child at image import; any user).

Every limit the untrusted text is held to is here, in one table, whichever
parser enforces it, so the whole budget reads in one place: the grub.cfg
lexer, parser and interpreter and the BLS reader import them from here.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

MAX_CONFIG_CHARS = 1 << 20  # grub.cfg, or all BLS entries together; real ones are 5-50 KiB
MAX_NESTING = 32  # blocks inside blocks; grub-mkconfig writes 3 (submenu > menuentry > if)
MAX_ENTRIES = 1024  # menu entries and submenus, or BLS files; a host with 20 kernels has ~60
MAX_STEPS = 100_000  # commands run, function calls and loops included; grub-mkconfig's output runs ~50
MAX_RUN_DEPTH = 64  # bodies running inside each other (blocks and function calls): recursion stops here
MAX_VALUE_CHARS = 1 << 16  # one expanded word or variable
MAX_EXPANDED_CHARS = 16 << 20  # all expansions of a run together: loops copying big values stop here
MAX_WORDS = 4096  # words in one command
MAX_NAME_CHARS = 255  # a BLS file name, loader.conf's default glob, an entry's title, version, sort-key, machine-id
SHOW_CHARS = 60  # input quoted in an error message


class BootConfigError(Exception):
    """The configuration names no bootable default entry, or is too big, too deep or malformed (one line)."""


class BootEntry(NamedTuple):
    """The default entry: what to load and the command line to load it with."""

    title: str
    kernel: str  # as the config names it: /boot/vmlinuz-..., or /vmlinuz-... when /boot is its own file system
    initrds: List[str]  # in load order
    options: str  # the kernel command line, variables expanded
    root_uuid: Optional[str]  # the file system GRUB's `search --fs-uuid --set=root` chose for the kernel; None for BLS


def _show(text: str) -> str:
    """Input quoted for a one-line message: repr (no newlines), shortened."""
    if len(text) > SHOW_CHARS:
        text = text[:SHOW_CHARS] + "..."
    return repr(text)
