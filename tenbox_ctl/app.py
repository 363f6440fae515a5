"""The CLI's shared state and options (CLI)."""

from __future__ import annotations

import functools
import sys
from typing import Callable, Optional

import click

from tenbox_ctl.client import Client, CliError
from tenbox_ctl.output import err


class App:
    def __init__(self, socket_path: Optional[str], timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def client(self, timeout: Optional[float] = None) -> Client:
        return Client(self.socket_path, timeout or self.timeout)


pass_app = click.make_pass_decorator(App)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")


def handle_errors(fn: Callable) -> Callable:
    """Turn CliError into one line on stderr and its documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CliError as e:
            err(e.message)
            sys.exit(e.exit_code)

    return wrapper
