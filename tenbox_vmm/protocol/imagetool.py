"""What `python3 -m tenbox_vmm.imagetool` answers, for the daemon and the CLI that run it (pure).

One JSON object on stdout: the result with exit status 0, or
`{"code": ..., "message": ...}` with exit status 2. The message is the
one line a person would read (the tool also writes it to stderr, for
people running it by hand); nobody parses stderr.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any, Dict, Union

IMAGETOOL_MODULE = "tenbox_vmm.imagetool"
IMAGETOOL_FAILED_STATUS = 2

SIZE_RE = re.compile(r"(\d{1,20})([KMGT]i?B?|B)?\Z", re.I)
UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
SIZE_MAX = 64 << 40  # 64 TiB: the largest disk the tool makes or grows


def parse_size(text: str) -> int:
    """'10G', '512M', '1073741824' -> bytes (binary units); ValueError otherwise."""
    m = SIZE_RE.match(text.strip())
    if not m:
        raise ValueError("size %r is not a number with an optional K, M, G or T" % text)
    unit = (m.group(2) or "").upper()[:1]
    size = int(m.group(1)) * UNITS[unit]
    if size <= 0 or size > SIZE_MAX or size % 512:
        raise ValueError("size %r must be a positive multiple of 512 bytes up to 64 TiB" % text)
    return size


def parse_new_size(text: str, current: int) -> int:
    """A disk's new size: '20G' (the size) or '+5G' (that much more), never less than `current`; ValueError otherwise."""
    text = text.strip()
    grow = text.startswith("+")
    size = parse_size(text[1:] if grow else text)
    if grow:
        size += current
        if size > SIZE_MAX:
            raise ValueError("size %r: the disk would be over 64 TiB" % text)
    if size < current:
        raise ValueError("size %s is smaller than the disk (%d bytes): disks only grow" % (text, current))
    return size


class ImageToolCode(str, enum.Enum):
    USAGE = "usage"  # bad arguments
    BAD_IMAGE = "bad_image"  # not an image the disk code accepts, or a size or option it refuses
    IO_ERROR = "io_error"  # the file system said no: missing, unreadable, no space
    DENIED = "denied"  # the image or a backing file may not be opened with the tool's (the caller's) rights
    # boot-files: no boot configuration, default entry, kernel or initrd in the image (the message says which)
    NO_KERNEL = "no_kernel"
    UNSUPPORTED = "unsupported"  # boot-files: a file system tenbox does not read (xfs, btrfs), a non-x86 kernel
    TOOL_MISSING = "tool_missing"  # a host tool the command needs is not installed (debugfs: e2fsprogs)


class ImageToolFailed(Exception):
    def __init__(self, code: Union[ImageToolCode, str], message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ImageToolBroken(Exception):
    """The tool gave no answer (it crashed, or printed something else): a bug, not a refusal."""


def error_answer(code: ImageToolCode, message: str) -> str:
    return json.dumps({"code": code.value, "message": message}, sort_keys=True)


def read_answer(returncode: int, stdout: Union[bytes, str]) -> Dict[str, Any]:
    """The tool's result; ImageToolFailed with its code and message, or ImageToolBroken without an answer."""
    try:
        answer = json.loads(stdout)
    except ValueError:
        answer = None
    if returncode == 0 and isinstance(answer, dict):
        return answer
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        try:
            code: Union[ImageToolCode, str] = ImageToolCode(answer.get("code"))
        except ValueError:
            code = str(answer.get("code"))
        raise ImageToolFailed(code, answer["message"])
    if returncode == 0:
        raise ImageToolBroken("image tool printed something that is not JSON")
    raise ImageToolBroken("image tool failed with status %d" % returncode)
