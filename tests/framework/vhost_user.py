"""tenbox's vhost-user back ends (python3 -m tenbox_vmm.vhost_user) as child processes (tests and bench; root for an unshare wrap).

QEMU is the front end (qemu.vhost_user_blk / vhost_user_net); the guest's
RAM must be shared (qemu.microvm(shared_memory=True)).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional, Sequence, Union

from tests.framework.process import ConsoleProcess
from tests.framework.repo import PYTHON

READY_SEC = 30.0  # python start-up, imports, opening the image, on a loaded host
EXIT_SEC = 10.0  # a back end ends within seconds of its front end


class Backend(ConsoleProcess):
    """`python3 -m tenbox_vmm.vhost_user KIND --socket SOCK -v ARGS...`, listening once constructed (wait=True).

    `wrap` goes in front of the command (e.g. unshare); it must exec the back
    end so that the pid is the back end's. Its log is `errors` (stderr).
    """

    def __init__(self, kind: str, sock: Union[str, Path], args: Sequence[str], wrap: Sequence[str] = (),
                 wait: bool = True) -> None:
        self.sock = Path(sock)
        argv = list(wrap) + [PYTHON, "-m", "tenbox_vmm.vhost_user", kind, "--socket", str(sock), "-v"] + list(args)
        super().__init__(argv, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_listening()

    def wait_listening(self) -> None:
        """Until the back end listens on its socket (it says so after listen())."""
        __tracebackhide__ = True
        self.wait_for_stderr("waiting for a front end", READY_SEC)

    def wait_exit(self, timeout: Optional[float] = EXIT_SEC) -> int:
        __tracebackhide__ = True
        return super().wait_exit(timeout)


def one_line_error(stderr: str) -> str:
    """A back end's only stderr line, which must name the problem (no traceback)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, "expected one line of error, got:\n" + stderr
    assert "Traceback" not in stderr
    return lines[0]
