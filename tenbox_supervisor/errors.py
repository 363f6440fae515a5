"""The two exceptions that carry an ErrorCode inside tenboxd (daemon, root).

`ApiError` is what a request answers with: code, one line, and extra
fields for the reply. `OperationError` is what the WorkerManager raises
when an operation on a VM fails; the method table turns it into the
reply with the same code and message.
"""

from __future__ import annotations

from typing import Any, Optional

from tenbox_supervisor.protocol import ErrorCode


class ApiError(Exception):
    def __init__(self, code: ErrorCode, message: Optional[str] = None, **extra: Any) -> None:
        super().__init__(message or code.message)
        self.code = code
        self.message = message or code.message
        self.extra = extra


class OperationError(Exception):
    """An operation on a VM failed; `code` is the error the request answers with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class CommandTimeout(OperationError):
    """A worker command was sent but no reply came in time: what the worker did is unknown."""
