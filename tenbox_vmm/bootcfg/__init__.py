"""The default boot entry of a cloud image, from grub.cfg or BLS entries (imagetool child at image import; any user).

A parser only: it is handed the text of files another module read from the
image, and never touches a file system or a partition. The text is
untrusted (an operator's image), so every size, depth, count and step is
bounded, and every refusal is one `BootConfigError` line.

    entry = default_grub_entry(grub_cfg_text)                     # /boot/grub/grub.cfg
    entry = default_bls_entry({"a.conf": text, ...}, default="*")  # /loader/entries/*.conf

The modules: common.py holds `BootEntry`, `BootConfigError` and the limits;
grub_script.py turns grub.cfg into a syntax tree, which grub.py runs the way
GRUB builds its menu (its docstring says what is understood and what GRUB it
plays); bls.py reads Boot Loader Specification entries and orders them as
systemd-boot does.
"""

from __future__ import annotations

from tenbox_vmm.bootcfg.bls import compare_versions, default_bls_entry, glob_match
from tenbox_vmm.bootcfg.common import (
    MAX_CONFIG_CHARS,
    MAX_ENTRIES,
    MAX_EXPANDED_CHARS,
    MAX_NAME_CHARS,
    MAX_NESTING,
    MAX_RUN_DEPTH,
    MAX_STEPS,
    MAX_VALUE_CHARS,
    MAX_WORDS,
    SHOW_CHARS,
    BootConfigError,
    BootEntry,
)
from tenbox_vmm.bootcfg.grub import default_grub_entry

__all__ = [
    "BootConfigError",
    "BootEntry",
    "compare_versions",
    "default_bls_entry",
    "default_grub_entry",
    "glob_match",
    "MAX_CONFIG_CHARS",
    "MAX_ENTRIES",
    "MAX_EXPANDED_CHARS",
    "MAX_NAME_CHARS",
    "MAX_NESTING",
    "MAX_RUN_DEPTH",
    "MAX_STEPS",
    "MAX_VALUE_CHARS",
    "MAX_WORDS",
    "SHOW_CHARS",
]
