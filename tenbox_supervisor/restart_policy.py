"""Restart policies and their backoff: what `--restart` means, pure (daemon, root; and the spec's checks).

After docker's `--restart`: `no` never restarts; `on-failure[:N]` restarts
a VM whose worker failed (a crash, a kill, a lost heartbeat, a worker gone
while tenboxd was away), at most N times in a row; `always` restarts it
also after the guest powered itself off. A stop someone asked for
(vm.stop, vm.shutdown, vm.delete) is never undone. Attempts wait an
exponentially growing delay (BACKOFF_BASE_SEC, doubled each time, at most
BACKOFF_MAX_SEC); a VM that then ran for RESET_WINDOW_SEC starts counting
from zero again. A start refused for a reason that waiting cannot fix
(a file gone, no KVM) ends the policy's attempts at once: no hot loop.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Optional

from tenbox_supervisor.protocol import ErrorCode, FailureCode

BACKOFF_BASE_SEC = 1.0  # the first retry's delay; docker waits 100 ms, a VM's boot is slower anyway
BACKOFF_MAX_SEC = 60.0  # docker's cap too
RESET_WINDOW_SEC = 10.0  # a VM that ran this long has recovered: its attempt count starts again (docker: 10 s)
RETRIES_MAX = 1000  # the largest N of on-failure:N
RESTART_TICK_SEC = 0.5  # how often due retries are looked for

# vm.start refusals no delay can fix: the policy gives up at once instead of looping.
PERMANENT_REFUSALS = frozenset({ErrorCode.FILE_MISSING, ErrorCode.KVM_UNSUPPORTED, ErrorCode.PERMISSION_DENIED})
# Worker ends no delay can fix either: the runtime refused the VM's configuration, speaks another
# link version, or cannot enter its sandbox; each would fail the same way at once, forever.
PERMANENT_FAILURES = frozenset({FailureCode.START_FAILED, FailureCode.LINK_VERSION, FailureCode.SANDBOX_FAILED})

_POLICY_RE = re.compile(r"(no|always|on-failure)(?::(\d{1,6}))?\Z")
POLICY_HELP = "no, on-failure[:N] (N from 1 to %d) or always" % RETRIES_MAX


class RestartName(str, enum.Enum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


@dataclass(frozen=True)
class RestartPolicy:
    name: RestartName = RestartName.NO
    max_retries: Optional[int] = None  # on-failure:N; None: no limit

    @classmethod
    def parse(cls, text: object) -> "RestartPolicy":
        """`no`, `on-failure`, `on-failure:N` or `always`; ValueError with one line otherwise."""
        m = _POLICY_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError("restart must be %s, not %r" % (POLICY_HELP, text))
        name, count = RestartName(m.group(1)), m.group(2)
        if count is None:
            return cls(name)
        if name is not RestartName.ON_FAILURE:
            raise ValueError("only on-failure takes a retry count (on-failure:N), not %r" % text)
        if not 1 <= int(count) <= RETRIES_MAX:
            raise ValueError("the retry count of on-failure:N must be 1 to %d, not %s" % (RETRIES_MAX, count))
        return cls(name, int(count))

    def __str__(self) -> str:
        return self.name.value if self.max_retries is None else "%s:%d" % (self.name.value, self.max_retries)

    def restarts_after(self, failed: bool) -> bool:
        """Whether a VM whose worker ended on its own (failed, or the guest powered off) is started again."""
        if self.name is RestartName.ALWAYS:
            return True
        return failed and self.name is RestartName.ON_FAILURE

    def allows(self, attempt: int) -> bool:
        """Whether attempt number `attempt` (1 for the first retry) may be made."""
        return self.max_retries is None or attempt <= self.max_retries


def backoff_sec(attempt: int, cap: float = BACKOFF_MAX_SEC) -> float:
    """The delay before attempt number `attempt` (1, 2, ...): 1 s, 2 s, 4 s, ... at most `cap`
    (the cloud link's reconnects use it too, with their own cap)."""
    return min(BACKOFF_BASE_SEC * 2.0 ** min(max(attempt - 1, 0), 32), cap)
