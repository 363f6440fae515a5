"""tenbox_vmm.imagetool in a child process: image headers are parsed outside the daemon (daemon, root).

Its answer is JSON on stdout (tenbox_vmm.protocol.imagetool); a failure
comes back as ApiError(invalid_argument) with the tool's one-line message
(permission_denied when the caller's rights do not reach a file),
a tool that hung or gave no answer as internal_error. Given a user's
rights (`as_user`), the tool runs with them: a disk a group member names,
and every backing file its chain names, is read as that member.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Dict, List, Optional, Sequence

from tenbox_supervisor.errors import ApiError
from tenbox_supervisor.protocol import ErrorCode
from tenbox_vmm.protocol.imagetool import (IMAGETOOL_MODULE, ImageToolBroken, ImageToolCode, ImageToolFailed,
                                           read_answer)

IMAGETOOL_TIMEOUT_SEC = 120


async def run_imagetool(*args: str, timeout: float = IMAGETOOL_TIMEOUT_SEC,
                        as_user: Optional[List[str]] = None, pass_fds: Sequence[int] = (),
                        env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run `python3 -m tenbox_vmm.imagetool ARGS` (after the `as_user` prefix, Credentials.setpriv_argv());
    its JSON result, or ApiError with its message. `pass_fds` stay open in the tool (its `--fd N:PATH`);
    `env` replaces the daemon's environment."""
    proc = await asyncio.create_subprocess_exec(
        *(as_user or []), sys.executable, "-m", IMAGETOOL_MODULE, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        cwd="/", pass_fds=tuple(pass_fds), env=env)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise ApiError(ErrorCode.INTERNAL_ERROR, "image tool timed out after %.0fs" % timeout)
    try:
        return read_answer(proc.returncode, out)
    except ImageToolFailed as e:
        if e.code == ImageToolCode.DENIED:  # run with a member's rights, which do not reach the file
            raise ApiError(ErrorCode.PERMISSION_DENIED, e.message) from None
        # Every other refusal of the tool is a bad disk or path given by the caller.
        raise ApiError(ErrorCode.INVALID_ARGUMENT, e.message) from None
    except ImageToolBroken as e:
        raise ApiError(ErrorCode.INTERNAL_ERROR, str(e)) from None
